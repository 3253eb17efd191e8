//! Block storage end to end on vmm-core under KVM: the `flotilla` launcher with `-drive`
//! starts blockd, vmm-core (virtio-pci + vhost-user frontend) and the gateway; the test guest's
//! own virtio-blk driver (tests/guest, commands in PROTOCOL.md) does the I/O, and every QMP
//! block command is checked over QMP and from inside the guest: data written through blockd is
//! read back and found in the image on the host, `block_resize` reaches the guest as a
//! config-change interrupt, `blockdev-snapshot-sync` switches to an overlay under the running
//! guest (`qemu-img check` clean afterwards), errors carry the seed's classes, a SIGKILLed
//! blockd is restarted and reconnected without the guest seeing an error, `werror=stop`
//! turns ENOSPC into the `io-error` run state until `cont` retries the write, malformed
//! descriptor chains from the guest get errors while blockd keeps serving, and
//! qemu-storage-daemon works as the backend of `-device vhost-user-blk-pci`.
//!
//! Every wait is bounded; a failing test kills what it started.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_tests::console::{field, Console};
use flotilla_tests::process::{children, signal, wait_gone};
use flotilla_tests::qmp::{class, QmpVm, RawQmp, VmOptions, BOOT, REPLY};
use flotilla_tests::tmpfs::Tmpfs;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// The guest fills each sector with (pattern ^ sector number) as little-endian u32s.
fn sector_bytes(pattern: u32, sector: u64) -> Vec<u8> {
    let word = (pattern ^ sector as u32).to_le_bytes();
    word.iter().copied().cycle().take(SECTOR as usize).collect()
}

/// The image (read as raw bytes) holds the guest's pattern at `sector..sector+count`.
fn assert_image_pattern(image: &Path, sector: u64, count: u64, pattern: u32) {
    let f = std::fs::File::open(image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    for s in sector..sector + count {
        let mut buf = vec![0u8; SECTOR as usize];
        f.read_exact_at(&mut buf, s * SECTOR).unwrap_or_else(|e| panic!("reading sector {s}: {e}"));
        assert_eq!(buf, sector_bytes(pattern, s), "sector {s} of {} does not hold the guest's data", image.display());
    }
}

fn sparse_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.set_len(size).expect("set_len");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// The blockd child of the launcher (other than `not`), waiting up to `timeout`.
fn blockd_pid(vm: &QmpVm, not: Option<i32>, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = children(vm.pid()).into_iter().find(|&c| {
            Some(c) != not
                && std::fs::read_link(format!("/proc/{c}/exe"))
                    .ok()
                    .and_then(|e| e.file_name().map(|n| n.to_string_lossy().starts_with("blockd")))
                    .unwrap_or(false)
        });
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn qmp(vm: &QmpVm) -> RawQmp {
    let mut q = vm.raw(0);
    q.negotiate();
    q
}


fn error_class(q: &mut RawQmp, name: &str, args: Value) -> String {
    let r = q.execute(name, args.clone());
    assert!(r.get("error").is_some(), "{name} {args} should fail: {r}");
    class(&r).to_string()
}

fn hmp(q: &mut RawQmp, line: &str) -> String {
    q.ok("human-monitor-command", json!({"command-line": line})).as_str().unwrap_or_default().to_string()
}

fn guest_blk(con: &mut Console) -> String {
    con.command("blk", "BLK ", REPLY).expect("blk")
}

fn blkwrite(con: &mut Console, sector: u64, count: u64, pattern: u32) {
    let l = con.command(&format!("blkwrite {sector} {count} {pattern:08x}"), "BLKWROTE", REPLY).expect("blkwrite");
    assert_eq!(field(&l, "status"), Some("0"), "{l}");
}

fn blkcheck(con: &mut Console, sector: u64, count: u64, pattern: u32) {
    let l = con.command(&format!("blkcheck {sector} {count} {pattern:08x}"), "BLKCHECK", REPLY).expect("blkcheck");
    assert!(l.ends_with(" ok") && field(&l, "status") == Some("0"), "{l}");
}

fn capacity(line: &str) -> u64 {
    field(line, "capacity").and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no capacity in {line}"))
}

#[test]
fn every_block_command_end_to_end_with_the_guest_confirming() {
    let dir = flotilla_tests::machine::TempDir::new("blk-e2e");
    let image = dir.path("disk0.raw");
    sparse_image(&image, 16 * MIB);
    let drive = format!("file={},if=virtio,format=raw,id=disk0", image.display());
    let vm = QmpVm::start("blk-e2e", &VmOptions { name: "blk-e2e", qmp: &[true], extra: &["-drive", &drive] });
    let mut con = vm.console_ready();
    let mut q = qmp(&vm);

    // The guest finds the function and its driver comes up with the image's capacity.
    let virtio = con.command("virtio", "VIRTIO", REPLY).expect("virtio");
    assert!(virtio.contains("type=blk"), "{virtio}");
    let blk = guest_blk(&mut con);
    assert_eq!(capacity(&blk), 16 * MIB / SECTOR, "{blk}");
    assert_eq!(field(&blk, "ro"), Some("0"), "{blk}");

    // Data through blockd, back in the guest and on the host.
    blkwrite(&mut con, 100, 16, 0xdead_beef);
    blkcheck(&mut con, 100, 16, 0xdead_beef);
    let flush = con.command("blkflush", "BLKFLUSH", REPLY).expect("blkflush");
    assert_eq!(field(&flush, "status"), Some("0"), "{flush}");
    assert_image_pattern(&image, 100, 16, 0xdead_beef);
    let qd = con.command("blkqd 16 1000 256", "BLKQD", REPLY).expect("blkqd");
    assert!(qd.ends_with(" ok") && field(&qd, "status") == Some("0"), "{qd}");

    // query-block names the drive by its id and describes the image.
    let blocks = q.ok("query-block", json!({}));
    let d0 = blocks.as_array().and_then(|l| l.iter().find(|b| b["device"] == "disk0")).cloned();
    let d0 = d0.unwrap_or_else(|| panic!("disk0 not in query-block: {blocks}"));
    assert_eq!(d0["inserted"]["file"], image.display().to_string(), "{d0}");
    assert_eq!(d0["inserted"]["drv"], "raw", "{d0}");
    assert_eq!(d0["inserted"]["ro"], false, "{d0}");
    assert_eq!(d0["removable"], false, "{d0}");

    // query-blockstats counted what the guest did.
    let stats = q.ok("query-blockstats", json!({}));
    let s0 = stats.as_array().and_then(|l| l.iter().find(|b| b["device"] == "disk0")).cloned();
    let s0 = s0.unwrap_or_else(|| panic!("disk0 not in query-blockstats: {stats}"));
    let st = &s0["stats"];
    assert!(st["wr_bytes"].as_u64().unwrap_or(0) >= (16 + 256) * SECTOR, "{s0}");
    assert!(st["rd_bytes"].as_u64().unwrap_or(0) >= (16 + 256) * SECTOR, "{s0}");
    assert!(st["wr_operations"].as_u64().unwrap_or(0) >= 2, "{s0}");
    assert!(st["flush_operations"].as_u64().unwrap_or(0) >= 1, "{s0}");
    assert!(st["wr_highest_offset"].as_u64().unwrap_or(0) >= (1000 + 256) * SECTOR - 1, "{s0}");

    // HMP over the same replies.
    let info = hmp(&mut q, "info block");
    assert!(info.starts_with(&format!("disk0: {} (raw)\r\n", image.display())), "{info:?}");
    let bs = hmp(&mut q, "info blockstats");
    assert!(bs.starts_with("disk0: rd_bytes="), "{bs:?}");

    // block_resize: the image grows and the guest sees the new capacity at once.
    assert_eq!(q.ok("block_resize", json!({"device": "disk0", "size": 32 * MIB})), json!({}));
    let changed = con.expect("BLKCONFIG", REPLY).expect("config-change interrupt");
    assert_eq!(capacity(&changed), 32 * MIB / SECTOR, "{changed}");
    assert_eq!(std::fs::metadata(&image).expect("image").len(), 32 * MIB);
    blkwrite(&mut con, 60_000, 8, 0x1234_5678);
    blkcheck(&mut con, 60_000, 8, 0x1234_5678);
    // HMP block_resize takes MiB.
    assert_eq!(hmp(&mut q, "block_resize disk0 48"), "");
    let changed = con.expect("BLKCONFIG", REPLY).expect("config-change interrupt");
    assert_eq!(capacity(&changed), 48 * MIB / SECTOR, "{changed}");

    // Errors as the seed names them.
    assert_eq!(error_class(&mut q, "block_resize", json!({"device": "nosuch", "size": MIB})), "DeviceNotFound");
    assert_eq!(error_class(&mut q, "block_passwd", json!({"device": "nosuch", "password": "x"})), "DeviceNotFound");
    assert_eq!(error_class(&mut q, "block_passwd", json!({"device": "disk0", "password": "x"})), "DeviceNotEncrypted");
    assert_eq!(
        error_class(&mut q, "blockdev-snapshot-sync", json!({"device": "nosuch", "snapshot-file": "/nonexistent/x"})),
        "DeviceNotFound"
    );

    // blockdev-snapshot-sync: new writes land in the overlay, old data reads through it.
    let overlay = dir.path("overlay.qcow2");
    let r = q.ok(
        "blockdev-snapshot-sync",
        json!({"device": "disk0", "snapshot-file": overlay.display().to_string(), "format": "qcow2"}),
    );
    assert_eq!(r, json!({}));
    blkwrite(&mut con, 200, 8, 0xcafe_f00d);
    blkcheck(&mut con, 200, 8, 0xcafe_f00d);
    blkcheck(&mut con, 100, 16, 0xdead_beef);
    let blocks = q.ok("query-block", json!({}));
    let d0 = &blocks[0];
    assert_eq!(d0["inserted"]["file"], overlay.display().to_string(), "{d0}");
    assert_eq!(d0["inserted"]["drv"], "qcow2", "{d0}");
    assert_eq!(d0["inserted"]["backing_file"], image.display().to_string(), "{d0}");
    let flush = con.command("blkflush", "BLKFLUSH", REPLY).expect("blkflush");
    assert_eq!(field(&flush, "status"), Some("0"), "{flush}");

    // The base image did not get the post-snapshot write; the overlay is clean and holds it.
    let f = std::fs::File::open(&image).expect("image");
    let mut buf = vec![0u8; SECTOR as usize];
    f.read_exact_at(&mut buf, 200 * SECTOR).expect("read");
    assert_ne!(buf, sector_bytes(0xcafe_f00d, 200), "a write after the snapshot reached the base image");
    let mut vm = vm;
    let core = vm.vmm_core();
    q.ok("quit", json!({}));
    vm.assert_exits_0_and_cleaned_up(core);
    run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&overlay));
    let flat = dir.path("flat.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&overlay).arg(&flat));
    assert_image_pattern(&flat, 100, 16, 0xdead_beef);
    assert_image_pattern(&flat, 200, 8, 0xcafe_f00d);
    assert_image_pattern(&flat, 60_000, 8, 0x1234_5678);
}

#[test]
fn blockd_killed_mid_run_is_restarted_and_the_guest_sees_no_error() {
    let dir = flotilla_tests::machine::TempDir::new("blk-restart");
    let image = dir.path("disk.raw");
    sparse_image(&image, 8 * MIB);
    let drive = format!("file={},if=virtio,format=raw,id=d0", image.display());
    let vm = QmpVm::start("blk-restart", &VmOptions { name: "blk-restart", qmp: &[true], extra: &["-drive", &drive] });
    let mut con = vm.console_ready();
    guest_blk(&mut con);
    blkwrite(&mut con, 10, 8, 0x0bad_cafe);
    let first = blockd_pid(&vm, None, BOOT).expect("blockd runs");
    signal(first, libc::SIGKILL);
    assert!(wait_gone(first, Duration::from_secs(5)), "blockd survived SIGKILL");
    // The guest's next requests wait in the ioeventfd until the new blockd is connected.
    blkwrite(&mut con, 20, 8, 0x600d_f00d);
    blkcheck(&mut con, 10, 8, 0x0bad_cafe);
    blkcheck(&mut con, 20, 8, 0x600d_f00d);
    let second = blockd_pid(&vm, Some(first), Duration::from_secs(5)).expect("blockd restarted");
    assert_ne!(first, second);
    let flush = con.command("blkflush", "BLKFLUSH", REPLY).expect("blkflush");
    assert_eq!(field(&flush, "status"), Some("0"), "{flush}");
    assert_image_pattern(&image, 10, 8, 0x0bad_cafe);
    assert_image_pattern(&image, 20, 8, 0x600d_f00d);
}

#[test]
fn enospc_with_werror_stop_pauses_in_io_error_and_cont_completes_the_write() {
    let dir = flotilla_tests::machine::TempDir::new("blk-enospc");
    let fs = Tmpfs::mount(&dir.path("small"), "2m");
    let image = fs.0.join("disk.raw");
    sparse_image(&image, 16 * MIB);
    let drive = format!("file={},if=virtio,format=raw,id=d0,werror=stop", image.display());
    let vm = QmpVm::start("blk-enospc", &VmOptions { name: "blk-enospc", qmp: &[true], extra: &["-drive", &drive] });
    let mut con = vm.console_ready();
    let mut q = qmp(&vm);
    guest_blk(&mut con);

    // 4 MiB does not fit in a 2 MiB tmpfs: blockd holds the failing write and the VM stops.
    con.send("blkwrite 0 8192 a5a5a5a5").expect("send");
    let err = q.wait_event("BLOCK_IO_ERROR", REPLY);
    assert_eq!(err["data"]["device"], "d0", "{err}");
    assert_eq!(err["data"]["operation"], "write", "{err}");
    assert_eq!(err["data"]["action"], "stop", "{err}");
    q.wait_event("STOP", REPLY);
    let st = q.ok("query-status", json!({}));
    assert_eq!(st["status"], "io-error", "{st}");
    assert_eq!(st["running"], false, "{st}");
    let blocks = q.ok("query-block", json!({}));
    assert_eq!(blocks[0]["io-status"], "nospace", "{blocks}");

    // Space is freed; cont retries the held request and the guest's write completes.
    fs.resize("64m");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", REPLY);
    let wrote = con.expect("BLKWROTE", REPLY).expect("the held write completes");
    assert_eq!(field(&wrote, "status"), Some("0"), "{wrote}");
    blkcheck(&mut con, 0, 8192, 0xa5a5_a5a5);
    let blocks = q.ok("query-block", json!({}));
    assert_eq!(blocks[0]["io-status"], "ok", "{blocks}");
    let flush = con.command("blkflush", "BLKFLUSH", REPLY).expect("blkflush");
    assert_eq!(field(&flush, "status"), Some("0"), "{flush}");
    assert_image_pattern(&image, 0, 8192, 0xa5a5_a5a5);
}

#[test]
fn a_hostile_guest_gets_errors_and_blockd_keeps_serving() {
    let dir = flotilla_tests::machine::TempDir::new("blk-hostile");
    let image = dir.path("disk.raw");
    sparse_image(&image, 8 * MIB);
    let drive = format!("file={},if=virtio,format=raw,id=d0", image.display());
    let vm = QmpVm::start("blk-hostile", &VmOptions { name: "blk-hostile", qmp: &[true], extra: &["-drive", &drive] });
    let mut con = vm.console_ready();
    let mut q = qmp(&vm);
    guest_blk(&mut con);
    let blockd = blockd_pid(&vm, None, BOOT).expect("blockd runs");
    for (i, kind) in ["oob", "huge", "loop", "badnext", "dir", "nostatus", "short"].into_iter().enumerate() {
        let l = con.command(&format!("blkbad {kind}"), "BLKBAD", REPLY).expect("blkbad");
        // blockd puts every chain it is given on the used ring, malformed or not, so the
        // guest's queue never stalls; where it can write a status it writes an error, except
        // for badnext, whose chain ends (for virtio-queue) before the bad index and reads as a
        // plain request.
        assert!(l.contains(" used=yes "), "{l}");
        if matches!(kind, "oob" | "dir" | "short") {
            assert_eq!(field(&l, "status"), Some("1"), "{l}");
        }
        let pattern = 0x7000_0000 | i as u32;
        blkwrite(&mut con, 100 + 8 * i as u64, 8, pattern);
        blkcheck(&mut con, 100 + 8 * i as u64, 8, pattern);
    }
    assert!(!con.history.iter().any(|l| l.starts_with("WARN blk")), "the device needed a reset: {:?}", con.history);
    assert_eq!(blockd_pid(&vm, None, REPLY), Some(blockd), "blockd was restarted: it died");
    let st = q.ok("query-status", json!({}));
    assert_eq!(st["status"], "running", "{st}");
    let flush = con.command("blkflush", "BLKFLUSH", REPLY).expect("blkflush");
    assert_eq!(field(&flush, "status"), Some("0"), "{flush}");
    for i in 0..7u64 {
        assert_image_pattern(&image, 100 + 8 * i, 8, 0x7000_0000 | i as u32);
    }
}

/// qemu-storage-daemon, QEMU's own vhost-user-blk export, as the backend of a vhost-user-blk-pci
/// device on vmm-core: `-chardev socket,path=...` + `-device vhost-user-blk-pci,chardev=...`.
#[test]
fn qemu_storage_daemon_serves_a_vhost_user_blk_pci_device_on_vmm_core() {
    let dir = flotilla_tests::machine::TempDir::new("blk-qsd");
    let image = dir.path("qsd.raw");
    sparse_image(&image, 8 * MIB);
    let sock = dir.path("qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", image.display()))
        .arg("--export")
        .arg(format!("type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on", sock.display()))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (scripts/setup-host installs qemu-system-x86, which brings it)");
    let deadline = Instant::now() + REPLY;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-storage-daemon did not create {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    let chardev = format!("socket,id=qsd0,path={}", sock.display());
    let vm = QmpVm::start(
        "blk-qsd",
        &VmOptions {
            name: "blk-qsd",
            qmp: &[true],
            extra: &["-chardev", &chardev, "-device", "vhost-user-blk-pci,chardev=qsd0,id=ext0"],
        },
    );
    let mut con = vm.console_ready();
    let blk = guest_blk(&mut con);
    assert_eq!(capacity(&blk), 8 * MIB / SECTOR, "{blk}");
    blkwrite(&mut con, 64, 16, 0x0051_d000);
    blkcheck(&mut con, 64, 16, 0x0051_d000);
    let qd = con.command("blkqd 8 512 128", "BLKQD", REPLY).expect("blkqd");
    assert!(qd.ends_with(" ok"), "{qd}");
    let flush = con.command("blkflush", "BLKFLUSH", REPLY).expect("blkflush");
    assert_eq!(field(&flush, "status"), Some("0"), "{flush}");
    assert_image_pattern(&image, 64, 16, 0x0051_d000);
    assert!(blockd_pid(&vm, None, Duration::from_millis(100)).is_none(), "no blockd for an external backend");
    drop(con);
    drop(vm);
    let _ = qsd.kill();
    let _ = qsd.wait();
}

/// After blockdev-snapshot-sync the drive's image is the overlay; a blockd that dies then is
/// restarted by the launcher with the VM's original config, and must go on with the overlay
/// (recorded in the runtime directory), not reopen the base image under it.
#[test]
fn a_blockd_restarted_after_a_snapshot_goes_on_with_the_overlay() {
    let dir = flotilla_tests::machine::TempDir::new("blk-snap-restart");
    let image = dir.path("base.raw");
    sparse_image(&image, 8 * MIB);
    let overlay = dir.path("overlay.qcow2");
    let drive = format!("file={},if=virtio,format=raw,id=d0", image.display());
    let vm = QmpVm::start("blk-snap-rs", &VmOptions { name: "blk-snap-rs", qmp: &[true], extra: &["-drive", &drive] });
    let mut con = vm.console_ready();
    let mut q = qmp(&vm);
    guest_blk(&mut con);
    blkwrite(&mut con, 10, 8, 0xaaaa_0001);
    let snap = json!({"device": "d0", "snapshot-file": overlay.display().to_string(), "format": "qcow2"});
    assert_eq!(q.ok("blockdev-snapshot-sync", snap), json!({}));
    blkwrite(&mut con, 20, 8, 0xbbbb_0002);
    // Make the overlay's write durable first: imago keeps qcow2 metadata (the new cluster's
    // L2 entry) in blockd's memory until a flush, so a SIGKILL before one loses the mapping
    // (a raw image's writes are in the page cache and survive).
    let flush = con.command("blkflush", "BLKFLUSH", REPLY).expect("blkflush");
    assert_eq!(field(&flush, "status"), Some("0"), "{flush}");
    let first = blockd_pid(&vm, None, BOOT).expect("blockd runs");
    signal(first, libc::SIGKILL);
    assert!(wait_gone(first, Duration::from_secs(5)), "blockd survived SIGKILL");
    blkwrite(&mut con, 30, 8, 0xcccc_0003);
    let second = blockd_pid(&vm, Some(first), Duration::from_secs(5)).expect("blockd restarted");
    assert_ne!(first, second);
    for (sector, pattern) in [(10, 0xaaaa_0001), (20, 0xbbbb_0002), (30, 0xcccc_0003)] {
        blkcheck(&mut con, sector, 8, pattern);
    }
    let blocks = q.ok("query-block", json!({}));
    assert_eq!(blocks[0]["inserted"]["file"], overlay.display().to_string(), "{blocks}");
    assert_eq!(blocks[0]["inserted"]["backing_file"], image.display().to_string(), "{blocks}");
    let flush = con.command("blkflush", "BLKFLUSH", REPLY).expect("blkflush");
    assert_eq!(field(&flush, "status"), Some("0"), "{flush}");
    let mut vm = vm;
    let core = vm.vmm_core();
    q.ok("quit", json!({}));
    vm.assert_exits_0_and_cleaned_up(core);
    // The base image holds only what was written before the snapshot.
    assert_image_pattern(&image, 10, 8, 0xaaaa_0001);
    let f = std::fs::File::open(&image).expect("image");
    for (sector, pattern) in [(20u64, 0xbbbb_0002u32), (30, 0xcccc_0003)] {
        let mut buf = vec![0u8; SECTOR as usize];
        f.read_exact_at(&mut buf, sector * SECTOR).expect("read");
        assert_ne!(buf, sector_bytes(pattern, sector), "sector {sector} reached the base image");
    }
    run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&overlay));
    let flat = dir.path("flat.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&overlay).arg(&flat));
    for (sector, pattern) in [(10, 0xaaaa_0001), (20, 0xbbbb_0002), (30, 0xcccc_0003)] {
        assert_image_pattern(&flat, sector, 8, pattern);
    }
}
