//! Option parsing, and a short smoke run of the bench frontend against a real blockd.

use super::*;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

#[test]
fn defaults_and_options() {
    let o = parse_args(&[]).unwrap().unwrap();
    assert_eq!(o, Options::default());
    assert_eq!((o.image_size, o.rounds, o.sides.len(), o.workloads.len()), (1 << 30, 3, 3, 6));
    let o = parse_args(&args(
        "--image-size 256M --runtime-s 0.5 --warmup-s 0 --rounds 2 --only qsd,blockd,qsd --json \
         --workloads randread-4k-qd1,seqwrite-1m-qd8 --dir /x --blockd /b --qsd /q --fio /f --blockd-opts aio=threads,x=y",
    ))
    .unwrap()
    .unwrap();
    assert_eq!(o.image_size, 256 << 20);
    assert_eq!((o.runtime, o.warmup, o.rounds), (Duration::from_millis(500), Duration::ZERO, 2));
    assert_eq!(o.sides, [Side::Qsd, Side::Blockd]);
    assert_eq!(o.workloads.iter().map(|w| w.key).collect::<Vec<_>>(), ["randread-4k-qd1", "seqwrite-1m-qd8"]);
    assert!(o.json);
    assert_eq!(o.blockd_opts.as_deref(), Some("aio=threads,x=y"));
    assert_eq!((o.dir.to_str(), o.blockd.unwrap().to_str()), (Some("/x"), Some("/b")));
    assert!(parse_args(&args("--help")).unwrap().is_none());
}

#[test]
fn sizes() {
    assert_eq!(parse_size("1G"), Some(1 << 30));
    assert_eq!(parse_size("1536m"), Some(1536 << 20));
    assert_eq!(parse_size("1048576"), Some(1 << 20));
    assert_eq!(parse_size("1024K"), Some(1 << 20));
    for bad in ["", "G", "1.5G", "100K", "1000000", "-1G", "99999999999T"] {
        assert_eq!(parse_size(bad), None, "{bad}");
    }
}

#[test]
fn bad_arguments() {
    for bad in [
        "--image-size 1",
        "--runtime-s 0",
        "--runtime-s x",
        "--warmup-s -1",
        "--rounds 0",
        "--only nbd",
        "--only ,",
        "--workloads randread",
        "--frobnicate",
        "--dir",
        "--blockd-opts aio",
        "--blockd-opts aio=threads,",
    ] {
        assert!(matches!(parse_args(&args(bad)), Err(BlockError::Usage(_))), "{bad}");
    }
}

#[test]
fn rotation_starts_each_round_elsewhere() {
    assert_eq!(rotated(3, 4).collect::<Vec<_>>(), [1, 2, 0]);
}

/// The bench frontend against the workspace's blockd (built by flotilla-tests, debug profile
/// for `cargo test`): the data check (a write read back through the backend, and seen on the
/// host in the file), then a short random-write and random-read run at QD1 and QD32. About a
/// second of I/O; every wait is bounded by the frontend's stall limit.
#[test]
fn smoke_against_blockd() {
    let blockd = flotilla_tests::process::binaries().blockd.clone();
    assert!(blockd.is_file(), "{} missing", blockd.display());
    let dir = std::env::temp_dir().join(format!("flotilla-bench-block-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image_path = dir.join("disk.raw");
    let size = 16u64 << 20;
    image::create(&image_path, size, 1).unwrap();
    let socket = dir.join("blockd.sock");
    let log = dir.join("blockd.log");
    let a = vec![
        "--socket-path".to_string(),
        socket.display().to_string(),
        "--drive".into(),
        format!("file={},format=raw", image_path.display()),
        "--num-queues".into(),
        "1".into(),
    ];
    let server = Server::start("blockd", &blockd, &a, &socket, &log, Duration::from_secs(10)).unwrap();
    let ws = [WORKLOADS[3], WORKLOADS[1], WORKLOADS[0]];
    let mut dev = Device::connect(&socket, frontend::memory_for(&ws)).unwrap();
    assert_eq!(dev.capacity_bytes(), size);
    // VERSION_1 and PROTOCOL_FEATURES acked; EVENT_IDX (29) and INDIRECT_DESC (28) not.
    assert_ne!(dev.acked & (1 << 32), 0);
    assert_ne!(dev.acked & (1 << 30), 0);
    assert_eq!(dev.acked & (1 << 29 | 1 << 28), 0);
    let offset = 5 * 4096;
    let pattern = dev.check_data(offset, 4096, 77).unwrap();
    image::drop_cache(&image_path).unwrap();
    let on_disk = std::fs::read(&image_path).unwrap();
    assert_eq!(&on_disk[offset as usize..offset as usize + 4096], &pattern[..]);
    dev.fill_buffers(2).unwrap();
    for w in ws {
        let m = dev.run(&w, size, Duration::from_millis(50), Duration::from_millis(300), 3).unwrap();
        assert!(m.ops > 10, "{}: {} ops", w.key, m.ops);
        assert_eq!(m.latencies_us.len() as u64, m.ops);
        assert!(m.latencies_us.iter().all(|&l| l > 0.0 && l < 10e6));
    }
    dev.close().unwrap();
    let ended = server.stop(Duration::from_secs(5)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ended.contains("exit status: 0") || ended.contains("signal"), "{ended}");
}
