//! blockd as a plain vhost-user-blk backend, with QEMU (`-accel tcg`) as the frontend and a
//! real Linux guest (the kit from `tests/kit/build-linux-kit.sh`) driving it with its own
//! virtio-blk driver. Data written by the guest is checked on the host (the raw file's bytes,
//! or `qemu-io`/`qemu-img check` for qcow2); data put there by the host is checked in the guest.
//!
//! Needs `qemu-system-x86_64`, `qemu-img` and `qemu-io` (`scripts/setup-host` installs them).
//! Every wait is bounded: TCG vhost-user-blk has been seen to stall in long runs, so the I/O
//! here is a few 64 KiB transfers.

use flotilla_tests::bus::Bus;
use flotilla_tests::machine::TempDir;
use flotilla_tests::qemu_guest::QemuGuest;
use flotilla_tests::process::{signal, spawn_ready, wait_timeout, Collector, Reaper};
use flotilla_tests::tmpfs::Tmpfs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
const LEN: usize = 64 * 1024;

/// The blockd executable (built with the others by `process::binaries`).
fn blockd_bin() -> &'static Path {
    let p = &flotilla_tests::process::binaries().blockd;
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// A running blockd serving one drive on `dir/vub.sock`.
struct Blockd {
    reaper: Reaper,
    log: Collector,
    socket: PathBuf,
}

impl Blockd {
    fn start(dir: &TempDir, drive: &str) -> Blockd {
        Blockd::start_with(dir, drive, &[])
    }

    /// With more arguments (`--dbus-address A --instance I`); returns once blockd wrote
    /// `ready` on its --ready-fd pipe (socket listening, bus name owned).
    fn start_with(dir: &TempDir, drive: &str, extra: &[&str]) -> Blockd {
        let socket = dir.path("vub.sock");
        let mut cmd = Command::new(blockd_bin());
        cmd.arg("--socket-path").arg(&socket).args(["--drive", drive]).args(extra).env("BLOCKD_LOG", "info");
        let (reaper, log) = spawn_ready(&mut cmd, &dir.0.display().to_string(), Duration::from_secs(10));
        Blockd { reaper, log, socket }
    }

    /// Stops blockd with SIGTERM (it flushes the image and exits 0) and returns its log.
    fn stop(mut self) -> String {
        signal(self.reaper.pid(), libc::SIGTERM);
        let status = wait_timeout(self.reaper.child(), Duration::from_secs(10));
        let log = self.log.take();
        assert!(status.is_some_and(|s| s.success()), "blockd did not exit cleanly on SIGTERM ({status:?}):\n{log}");
        log
    }
}

/// QEMU with the guest kit and one vhost-user-blk-pci device on blockd's socket.
fn boot(dir: &TempDir, tag: &str, blockd: &Blockd, smp: u32, num_queues: u32) -> QemuGuest {
    let devices = [
        "-chardev".to_string(),
        format!("socket,id=vub,path={}", blockd.socket.display()),
        "-device".to_string(),
        format!("vhost-user-blk-pci,chardev=vub,num-queues={num_queues}"),
    ];
    QemuGuest::boot(&dir.path(&format!("serial-{tag}.sock")), smp, &devices, "console=ttyS0 panic=-1", BOOT, REPLY)
}

/// Guest shell: md5 of 64 KiB of byte `c` (a printable character).
fn fill_md5_cmd(c: char) -> String {
    format!("R=$(head -c {LEN} /dev/zero | tr '\\0' '{c}' | md5sum | cut -c1-32)")
}

/// Guest shell: md5 of 64 KiB of /dev/vda at byte offset `off` (page cache dropped first).
fn read_md5_cmd(off: u64) -> String {
    format!(
        "echo 3 > /proc/sys/vm/drop_caches; R=$(dd if=/dev/vda bs=4096 skip={} count={} 2>/dev/null | md5sum | cut -c1-32)",
        off / 4096,
        LEN / 4096
    )
}

/// Guest shell: writes 64 KiB of byte `c` at `off`, fsync'd; R is dd's exit status.
fn write_cmd(c: char, off: u64) -> String {
    format!(
        "head -c {LEN} /dev/zero | tr '\\0' '{c}' > /tmp/p; dd if=/tmp/p of=/dev/vda bs=4096 seek={} conv=fsync 2>/dev/null; R=$?",
        off / 4096
    )
}

fn run(cmd: &mut Command) -> String {
    let out =
        cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e} (scripts/setup-host installs qemu-img/qemu-io)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// `qemu-io -r -c 'read -P pattern off len'` must find the pattern.
fn qemu_io_expect(image: &Path, fmt: &str, pattern: u8, off: u64) {
    let c = format!("read -P {pattern:#x} {off} {LEN}");
    let out = run(Command::new("qemu-io").args(["-r", "-f", fmt, "-c", &c]).arg(image));
    assert!(!out.contains("failed") && out.contains("read"), "{}: {c}:\n{out}", image.display());
}

#[test]
fn raw_drive_reads_writes_and_serves_a_reconnecting_frontend() {
    let dir = TempDir::new("blockd-raw");
    let image = dir.path("disk.raw");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(64 * MIB).unwrap();
    file.write_all_at(&[b'Z'; LEN], MIB).unwrap();
    drop(file);
    let blockd = Blockd::start(&dir, &format!("file={},format=raw,serial=flotilla-raw", image.display()));

    let mut q = boot(&dir, "1", &blockd, 2, 2);
    assert_eq!(q.ask("SZ", "R=$(cat /sys/block/vda/size)", REPLY), (64 * MIB / 512).to_string());
    assert_eq!(q.ask("RO", "R=$(cat /sys/block/vda/ro)", REPLY), "0");
    assert_eq!(q.ask("SER", "R=$(cat /sys/block/vda/serial)", REPLY), "flotilla-raw");
    assert_eq!(q.ask("NQ", "R=$(ls /sys/block/vda/mq | wc -l)", REPLY), "2", "two request queues");
    // Host data reads right in the guest.
    let z = q.ask("MZ", &fill_md5_cmd('Z'), REPLY);
    assert_eq!(q.ask("M1", &read_md5_cmd(MIB), REPLY), z);
    // The guest writes, flushes, and reads back from the device.
    assert_eq!(q.ask("WR", &write_cmd('Q', 2 * MIB), REPLY), "0");
    assert_eq!(q.ask("SY", "sync; R=$?", REPLY), "0");
    let qm = q.ask("MQ", &fill_md5_cmd('Q'), REPLY);
    assert_eq!(q.ask("M2", &read_md5_cmd(2 * MIB), REPLY), qm);
    q.poweroff();

    // The bytes are in the file.
    let mut got = vec![0u8; LEN];
    std::fs::File::open(&image).unwrap().read_exact_at(&mut got, 2 * MIB).unwrap();
    assert!(got.iter().all(|&b| b == b'Q'), "the guest's write is not in {}", image.display());

    // A second frontend connects to the same blockd and sees the data.
    let mut q = boot(&dir, "2", &blockd, 1, 1);
    let qm2 = q.ask("MQ", &fill_md5_cmd('Q'), REPLY);
    assert_eq!(q.ask("M2", &read_md5_cmd(2 * MIB), REPLY), qm2);
    // DISCARD from the guest punches a hole in the raw file: the range reads as zeroes.
    let zero = q.ask("M0", &format!("R=$(head -c {LEN} /dev/zero | md5sum | cut -c1-32)"), REPLY);
    assert_eq!(q.ask("DI", &format!("blkdiscard -o {} -l {LEN} /dev/vda; R=$?", 2 * MIB), REPLY), "0");
    assert_eq!(q.ask("M3", &read_md5_cmd(2 * MIB), REPLY), zero);
    q.poweroff();
    let log = blockd.stop();
    assert_eq!(log.matches("frontend connected").count(), 2, "blockd's log:\n{log}");
    assert!(log.contains("event_idx=true"), "Linux did not negotiate EVENT_IDX; blockd's log:\n{log}");
    assert!(log.contains("io_uring=true"), "a raw drive is served through io_uring; blockd's log:\n{log}");
    std::fs::File::open(&image).unwrap().read_exact_at(&mut got, 2 * MIB).unwrap();
    assert!(got.iter().all(|&b| b == 0), "the discarded range is not zero in {}", image.display());
}

#[test]
fn qcow2_with_backing_file_reads_backing_data_and_stays_clean() {
    let dir = TempDir::new("blockd-qcow2");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&base).arg("64M"));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", &format!("write -P 0x5a {MIB} {LEN}")]).arg(&base));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&base).arg(&top));
    let blockd = Blockd::start(&dir, &format!("file={},format=qcow2", top.display()));

    // Two vCPUs, two queues: the parallel writes below reach imago from both queue workers.
    let mut q = boot(&dir, "1", &blockd, 2, 2);
    assert_eq!(q.ask("SZ", "R=$(cat /sys/block/vda/size)", REPLY), (64 * MIB / 512).to_string());
    // Backing data ('Z' = 0x5a) reads through the overlay.
    let z = q.ask("MZ", &fill_md5_cmd('Z'), REPLY);
    assert_eq!(q.ask("M1", &read_md5_cmd(MIB), REPLY), z, "backing file data");
    // Unallocated everywhere: zeroes.
    let zero = q.ask("M0", &format!("R=$(head -c {LEN} /dev/zero | md5sum | cut -c1-32)"), REPLY);
    assert_eq!(q.ask("M3", &read_md5_cmd(8 * MIB), REPLY), zero);
    // Writes go to the overlay: one over backing data, one to fresh space.
    assert_eq!(q.ask("WR", &write_cmd('Q', 2 * MIB), REPLY), "0");
    assert_eq!(q.ask("WB", &write_cmd('A', MIB), REPLY), "0");
    // Parallel writers on both vCPUs (taskset pins them), to fresh clusters.
    let par = format!(
        "head -c {LEN} /dev/zero | tr '\\0' 'P' > /tmp/pp; \
         taskset 1 dd if=/tmp/pp of=/dev/vda bs=4096 seek={} conv=fsync 2>/dev/null & \
         taskset 2 dd if=/tmp/pp of=/dev/vda bs=4096 seek={} conv=fsync 2>/dev/null; R=$?; wait",
        16 * MIB / 4096,
        32 * MIB / 4096
    );
    assert_eq!(q.ask("PW", &par, REPLY), "0");
    assert_eq!(q.ask("SY", "sync; R=$?", REPLY), "0");
    let qm = q.ask("MQ", &fill_md5_cmd('Q'), REPLY);
    assert_eq!(q.ask("M2", &read_md5_cmd(2 * MIB), REPLY), qm);
    q.poweroff();
    let log = blockd.stop();

    let served = log.lines().find(|l| l.contains("requests completed per queue")).unwrap_or_default().to_string();
    let counts: Vec<u64> = served
        .split_once("served=[")
        .and_then(|(_, r)| r.split_once(']'))
        .map(|(l, _)| l.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_default();
    // blockd offers 4 queues; QEMU was told to use 2.
    assert!(counts.len() == 4 && counts[..2].iter().all(|&n| n > 0), "both queues should serve requests:\n{log}");
    let check = run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&top));
    assert!(check.contains("No errors were found"), "qemu-img check:\n{check}\nblockd:\n{log}");
    qemu_io_expect(&top, "qcow2", b'Q', 2 * MIB);
    qemu_io_expect(&top, "qcow2", b'A', MIB);
    qemu_io_expect(&top, "qcow2", b'P', 16 * MIB);
    qemu_io_expect(&top, "qcow2", b'P', 32 * MIB);
    // The backing file is untouched.
    qemu_io_expect(&base, "qcow2", 0x5a, MIB);
    qemu_io_expect(&base, "qcow2", 0, 2 * MIB);
}

#[test]
fn readonly_drive_refuses_guest_writes() {
    let dir = TempDir::new("blockd-ro");
    let image = dir.path("ro.raw");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(16 * MIB).unwrap();
    file.write_all_at(&[b'Z'; LEN], MIB).unwrap();
    drop(file);
    let before = std::fs::read(&image).unwrap();
    let blockd = Blockd::start(&dir, &format!("file={},format=raw,readonly=on", image.display()));

    let mut q = boot(&dir, "1", &blockd, 1, 1);
    assert_eq!(q.ask("RO", "R=$(cat /sys/block/vda/ro)", REPLY), "1");
    let z = q.ask("MZ", &fill_md5_cmd('Z'), REPLY);
    assert_eq!(q.ask("M1", &read_md5_cmd(MIB), REPLY), z);
    assert_ne!(q.ask("WR", &write_cmd('Q', MIB), REPLY), "0", "a write to a read-only drive succeeded");
    assert_eq!(q.ask("M2", &read_md5_cmd(MIB), REPLY), z);
    q.poweroff();
    blockd.stop();
    assert!(std::fs::read(&image).unwrap() == before, "the read-only image changed");
}

#[test]
fn print_capabilities_follows_the_vhost_user_spec() {
    let out = run(Command::new(blockd_bin()).arg("--print-capabilities"));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["type"], "block", "{out}");
}

/// `--fd N`: blockd serves a listening socket it inherits. Talks vhost-user by hand
/// (GET_FEATURES) and checks the virtio-blk feature bits it offers.
#[test]
fn inherited_listening_fd_is_served() {
    let dir = TempDir::new("blockd-fd");
    let image = dir.path("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    let sock = dir.path("inherited.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(blockd_bin());
    cmd.args(["--fd", "3", "--drive", &format!("file={},format=raw", image.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 and fcntl are async-signal-safe; they put the listener on fd 3 without
    // CLOEXEC in the child (dup2 onto itself would keep the flag, hence the fcntl).
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    let child = cmd.spawn().expect("spawning blockd");
    let mut reaper = Reaper::new(child, &dir.0.display().to_string());
    let mut log = Collector::new(reaper.child().stderr.take().expect("stderr"));
    drop(listener);

    let mut conn = UnixStream::connect(&sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Header: request GET_FEATURES (1), flags: version 1, payload size 0.
    let mut msg = Vec::new();
    for w in [1u32, 1, 0] {
        msg.extend_from_slice(&w.to_le_bytes());
    }
    conn.write_all(&msg).unwrap();
    let mut reply = [0u8; 20];
    conn.read_exact(&mut reply).unwrap_or_else(|e| panic!("no GET_FEATURES reply: {e}\n{}", log.take()));
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 8);
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    for (bit, name) in [
        (30, "PROTOCOL_FEATURES"),
        (32, "VERSION_1"),
        (29, "EVENT_IDX"),
        (9, "FLUSH"),
        (12, "MQ"),
        (13, "DISCARD"),
        (14, "WRITE_ZEROES"),
    ] {
        assert_ne!(features & (1 << bit), 0, "feature {name} missing from {features:#x}");
    }
    assert_eq!(features & (1 << 5), 0, "RO offered for a writable drive");
    drop(conn);
    signal(reaper.pid(), libc::SIGTERM);
    let status = wait_timeout(reaper.child(), Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "blockd on SIGTERM: {status:?}\n{}", log.take());
}

// ---- blockd's D-Bus side with QEMU as the frontend ----

use flotilla_schema::dbus::{self as fdbus, EVENTS_INTERFACE, EVENT_SIGNAL};
use flotilla_schema::dbus_server::zbus::export::futures_core::Stream;
use flotilla_schema::dbus_server::zbus::{self, Connection, MatchRule, MessageStream};
use serde_json::{json, Value};

/// A zbus client standing in for the gateway (method calls) and vmm-core (RESUME).
struct Dbus {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    block: String,
}

impl Dbus {
    fn connect(bus: &Bus, instance: &str) -> Dbus {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let conn = rt.block_on(async {
            tokio::time::timeout(REPLY, zbus::connection::Builder::address(bus.address.as_str()).build())
                .await
                .expect("connect in time")
                .expect("connect")
        });
        Dbus { rt, conn, block: fdbus::bus_name(instance, "Block") }
    }

    fn call<B>(&self, method: &str, body: &B) -> Value
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        self.rt.block_on(async {
            let call = self.conn.call_method(
                Some(self.block.as_str()),
                "/org/flotilla/Block",
                Some("org.flotilla.Block1"),
                method,
                body,
            );
            let reply = tokio::time::timeout(REPLY, call).await.expect("reply in time");
            let reply = reply.unwrap_or_else(|e| panic!("{method}: {e}"));
            match reply.body().deserialize::<String>() {
                Ok(t) => serde_json::from_str(&t).expect("JSON reply"),
                Err(_) => json!({}),
            }
        })
    }

    /// blockd's QmpEvent signals.
    fn block_events(&self) -> MessageStream {
        self.rt.block_on(async {
            let rule = MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .sender(self.block.as_str())
                .interface(EVENTS_INTERFACE)
                .member(EVENT_SIGNAL)
                .build()
                .expect("rule");
            MessageStream::for_match_rule(rule, &self.conn, None).await.expect("AddMatch")
        })
    }

    /// The next QmpEvent named `want` on `stream`, bounded.
    fn next_event(&self, stream: &mut MessageStream, want: &str) -> Value {
        self.rt.block_on(async {
            let deadline = tokio::time::Instant::now() + REPLY;
            loop {
                let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx));
                let msg = tokio::time::timeout_at(deadline, next).await.unwrap_or_else(|_| panic!("no {want} in time"));
                let msg = msg.expect("stream open").expect("message");
                let (event, data, _, _): (String, String, i64, i64) = msg.body().deserialize().expect("(ssxx)");
                if event == want {
                    return serde_json::from_str(&data).expect("data JSON");
                }
            }
        })
    }

    /// Acts as vmm-core: owns its name and emits RESUME (what `cont` does).
    fn resume_as_vmm_core(&self, instance: &str) {
        self.rt.block_on(async {
            self.conn.request_name(fdbus::bus_name(instance, "VmmCore")).await.expect("own the VmmCore name");
            flotilla_schema::dbus_server::emit_qmp_event(
                &self.conn,
                "/org/flotilla/VmmCore",
                "RESUME",
                &json!({}),
                std::time::SystemTime::now(),
            )
            .await
            .expect("emit RESUME");
        })
    }
}

fn dbus_args<'a>(bus: &'a Bus, instance: &'a str) -> [&'a str; 4] {
    ["--dbus-address", bus.address.as_str(), "--instance", instance]
}

/// Stats of drive 0 from query-blockstats, as numbers.
fn stat(c: &Dbus, key: &str) -> u64 {
    let s = c.call("QueryBlockstats", &());
    s[0]["stats"][key].as_u64().unwrap_or_else(|| panic!("{key} in {s}"))
}

#[test]
fn block_resize_over_dbus_reaches_the_guest_and_stats_count_its_io() {
    let dir = TempDir::new("blockd-resize");
    let image = dir.path("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    let bus = Bus::start(&dir, Duration::from_secs(10));
    let blockd =
        Blockd::start_with(&dir, &format!("file={},format=raw,id=vd0", image.display()), &dbus_args(&bus, "rsz"));
    let c = Dbus::connect(&bus, "rsz");
    let mut q = boot(&dir, "1", &blockd, 1, 1);
    assert_eq!(q.ask("SZ", "R=$(cat /sys/block/vda/size)", REPLY), (8 * MIB / 512).to_string());

    // query-blockstats moves by what the guest does: 64 KiB written with O_DIRECT-free dd +
    // fsync (one or more requests), and 64 KiB read after dropping the page cache.
    let (wb, wo, rb, fl) =
        (stat(&c, "wr_bytes"), stat(&c, "wr_operations"), stat(&c, "rd_bytes"), stat(&c, "flush_operations"));
    assert_eq!(q.ask("WR", &write_cmd('S', 4 * MIB), REPLY), "0");
    assert_eq!(stat(&c, "wr_bytes") - wb, LEN as u64, "exactly the guest's 64 KiB were written");
    assert!(stat(&c, "wr_operations") > wo);
    assert!(stat(&c, "flush_operations") > fl, "conv=fsync flushes");
    assert_eq!(stat(&c, "wr_highest_offset"), 4 * MIB + LEN as u64);
    let s = q.ask("MS", &fill_md5_cmd('S'), REPLY);
    assert_eq!(q.ask("RD", &read_md5_cmd(4 * MIB), REPLY), s);
    assert!(stat(&c, "rd_bytes") - rb >= LEN as u64, "the guest's read is counted");
    let all = c.call("QueryBlockstats", &());
    assert_eq!(all[0]["device"], "vd0");
    assert_eq!(all[0]["parent"]["stats"]["wr_highest_offset"], 4 * MIB + LEN as u64, "{all}");

    // Grow: QEMU gets CONFIG_CHANGE_MSG, re-reads the config, Linux sees it at once.
    c.call("BlockResize", &("vd0", (24 * MIB) as i64));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 24 * MIB);
    let want = (24 * MIB / 512).to_string();
    let deadline = Instant::now() + REPLY;
    loop {
        let got = q.ask("SZ", "R=$(cat /sys/block/vda/size)", REPLY);
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "/sys/block/vda/size is {got}, want {want}");
    }
    // The new space is usable.
    assert_eq!(q.ask("WN", &write_cmd('N', 20 * MIB), REPLY), "0");
    let n = q.ask("MN", &fill_md5_cmd('N'), REPLY);
    assert_eq!(q.ask("RN", &read_md5_cmd(20 * MIB), REPLY), n);
    q.poweroff();
    let log = blockd.stop();
    assert!(log.contains("resized"), "{log}");
    let mut got = vec![0u8; LEN];
    std::fs::File::open(&image).unwrap().read_exact_at(&mut got, 20 * MIB).unwrap();
    assert!(got.iter().all(|&b| b == b'N'));
}

#[test]
fn snapshot_while_the_guest_writes_keeps_every_write() {
    let dir = TempDir::new("blockd-snap");
    let image = dir.path("disk.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M"));
    let bus = Bus::start(&dir, Duration::from_secs(10));
    let blockd =
        Blockd::start_with(&dir, &format!("file={},format=qcow2,id=vd0", image.display()), &dbus_args(&bus, "snap"));
    let c = Dbus::connect(&bus, "snap");
    let mut q = boot(&dir, "1", &blockd, 1, 1);

    // 40 x 64 KiB of 'W', each fsync'd, in the background; the snapshot lands in the middle.
    let blocks = 40;
    let cmd = format!(
        "head -c {LEN} /dev/zero | tr '\\0' 'W' > /tmp/w; (i=0; while [ $i -lt {blocks} ]; do \
         dd if=/tmp/w of=/dev/vda bs={LEN} seek=$i count=1 conv=fsync 2>/dev/null || echo WFAIL; \
         echo \"W\"\"P=$i\"; i=$((i+1)); done; echo \"W\"\"DONE\") &"
    );
    q.console.send(&cmd).expect("send");
    q.console.expect("WP=5", REPLY).unwrap_or_else(|e| q.fail(&format!("the writer did not start: {e}")));
    let overlay = dir.path("overlay.qcow2");
    c.call("BlockdevSnapshotSync", &("vd0", overlay.display().to_string(), vec!["qcow2"]));
    let done = q.console.expect("WDONE", Duration::from_secs(60));
    if let Err(e) = done {
        q.fail(&format!("the writer did not finish: {e}"));
    }
    assert!(!q.console.history.iter().any(|l| l.starts_with("WFAIL")), "a write failed");
    let info = c.call("QueryBlock", &());
    assert_eq!(info[0]["inserted"]["file"], overlay.display().to_string(), "{info}");
    assert_eq!(info[0]["inserted"]["backing_file"], image.display().to_string(), "{info}");
    let w = q.ask("MW", &fill_md5_cmd('W'), REPLY);
    for i in [0u64, 5, 20, 39] {
        assert_eq!(q.ask("RW", &read_md5_cmd(i * LEN as u64), REPLY), w, "block {i}");
    }
    q.poweroff();
    blockd.stop();

    // What the guest wrote, flat on the host: the overlay (with its backing file) equals it.
    let expect = dir.path("expect.raw");
    let mut bytes = vec![0u8; 16 * MIB as usize];
    bytes[..blocks * LEN].fill(b'W');
    std::fs::write(&expect, &bytes).unwrap();
    let check = run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&overlay));
    assert!(check.contains("No errors were found"), "{check}");
    let check = run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&image));
    assert!(check.contains("No errors were found"), "{check}");
    run(Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&overlay).arg(&expect));
}

#[test]
fn cache_none_opens_the_image_with_o_direct() {
    let dir = TempDir::new("blockd-direct");
    let image = dir.path("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(16 * MIB).unwrap();
    let blockd = Blockd::start(&dir, &format!("file={},format=raw,cache=none", image.display()));
    // One of blockd's descriptors on the image has O_DIRECT (the buffered one is for
    // unaligned requests only).
    let fds = std::fs::read_dir(format!("/proc/{}/fd", blockd.reaper.pid())).unwrap();
    let direct = fds.filter_map(Result::ok).any(|e| {
        std::fs::read_link(e.path()).is_ok_and(|t| t == image)
            && std::fs::read_to_string(format!(
                "/proc/{}/fdinfo/{}",
                blockd.reaper.pid(),
                e.file_name().to_string_lossy()
            ))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("flags:").map(|v| v.trim().to_string())))
            .and_then(|v| u32::from_str_radix(&v, 8).ok())
            .is_some_and(|f| f & libc::O_DIRECT as u32 != 0)
    });
    assert!(direct, "no O_DIRECT descriptor on {}", image.display());
    let mut q = boot(&dir, "1", &blockd, 1, 1);
    assert_eq!(q.ask("WR", &write_cmd('D', 3 * MIB), REPLY), "0");
    let d = q.ask("MD", &fill_md5_cmd('D'), REPLY);
    assert_eq!(q.ask("RD", &read_md5_cmd(3 * MIB), REPLY), d);
    q.poweroff();
    blockd.stop();
    let mut got = vec![0u8; LEN];
    std::fs::File::open(&image).unwrap().read_exact_at(&mut got, 3 * MIB).unwrap();
    assert!(got.iter().all(|&b| b == b'D'));
}

#[test]
fn enospc_holds_the_write_until_resume_and_nothing_is_lost() {
    let dir = TempDir::new("blockd-enospc");
    let fs = Tmpfs::mount(&dir.path("small"), "1m");
    let image = fs.0.join("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(16 * MIB).unwrap();
    let bus = Bus::start(&dir, Duration::from_secs(10));
    // werror=enospc is the default: ENOSPC stops, anything else would be reported.
    let blockd =
        Blockd::start_with(&dir, &format!("file={},format=raw,id=vd0", image.display()), &dbus_args(&bus, "nospc"));
    let c = Dbus::connect(&bus, "nospc");
    let mut events = c.block_events();
    let mut q = boot(&dir, "1", &blockd, 1, 1);
    assert_eq!(c.call("QueryBlock", &())[0]["io-status"], "ok");

    // 2 MiB of 'E' do not fit in 1 MiB: blockd holds the failing write(s).
    let size = 2 * MIB;
    let cmd = format!(
        "head -c {size} /dev/zero | tr '\\0' 'E' > /tmp/e; (dd if=/tmp/e of=/dev/vda bs=65536 conv=fsync 2>/dev/null; \
         R=$?; echo; echo \"D\"\"D=$R\") &"
    );
    q.console.send(&cmd).expect("send");
    let ev = c.next_event(&mut events, "BLOCK_IO_ERROR");
    assert_eq!(ev["device"], "vd0", "{ev}");
    assert_eq!(ev["operation"], "write", "{ev}");
    assert_eq!(ev["action"], "stop", "{ev}");
    assert_eq!(ev["nospace"], true, "{ev}");
    assert_eq!(ev["reason"], "No space left on device", "{ev}");
    assert_eq!(c.call("QueryBlock", &())[0]["io-status"], "nospace");
    // The guest's dd does not complete while the write is held.
    assert!(q.console.expect("DD=", Duration::from_secs(2)).is_err(), "the held write completed");

    // Space is freed; vmm-core's RESUME (the test stands in for it) retries the held writes.
    fs.resize("64m");
    c.resume_as_vmm_core("nospc");
    let dd = q.console.expect("DD=", REPLY).unwrap_or_else(|e| q.fail(&format!("the held write never completed: {e}")));
    assert_eq!(dd, "DD=0", "the guest saw an error");
    assert_eq!(c.call("QueryBlock", &())[0]["io-status"], "ok");
    q.poweroff();
    let log = blockd.stop();
    assert!(log.contains("retrying held requests"), "{log}");
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[..size as usize].iter().all(|&b| b == b'E'), "a write was lost");
    assert!(bytes[size as usize..].iter().all(|&b| b == 0));
}
