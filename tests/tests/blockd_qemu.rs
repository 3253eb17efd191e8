//! blockd as a plain vhost-user-blk backend, with QEMU (`-accel tcg`) as the frontend and a
//! real Linux guest (the kit from `tests/kit/build-linux-kit.sh`) driving it with its own
//! virtio-blk driver. Data written by the guest is checked on the host (the raw file's bytes,
//! or `qemu-io`/`qemu-img check` for qcow2); data put there by the host is checked in the guest.
//!
//! Needs `qemu-system-x86_64`, `qemu-img` and `qemu-io` (`scripts/setup-host` installs them).
//! Every wait is bounded: TCG vhost-user-blk has been seen to stall in long runs, so the I/O
//! here is a few 64 KiB transfers.

use flotilla_tests::console::Console;
use flotilla_tests::machine::TempDir;
use flotilla_tests::process::{signal, wait_timeout, Collector, Reaper};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
const LEN: usize = 64 * 1024;

struct Kit {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// The Linux guest kit (cached after the first build).
fn kit() -> &'static Kit {
    static KIT: OnceLock<Kit> = OnceLock::new();
    KIT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kit/build-linux-kit.sh");
        let mut child = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        let mut out = Collector::new(child.stdout.take().expect("stdout"));
        let mut err = Collector::new(child.stderr.take().expect("stderr"));
        let Some(status) = wait_timeout(&mut child, Duration::from_secs(600)) else {
            // SAFETY: kill(2) on the process group created above.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("{} timed out:\n{}", script.display(), err.take());
        };
        let (out, err) = (out.take(), err.take());
        assert!(status.success(), "{} failed:\n{err}", script.display());
        let get = |key: &str| -> PathBuf {
            out.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in:\n{out}")).into()
        };
        Kit { kernel: get("KERNEL="), initrd: get("INITRD=") }
    })
}

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
        let socket = dir.path("vub.sock");
        let child = Command::new(blockd_bin())
            .arg("--socket-path")
            .arg(&socket)
            .args(["--drive", drive])
            .env("BLOCKD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning blockd");
        let mut reaper = Reaper::new(child, &dir.0.display().to_string());
        let log = Collector::new(reaper.child().stderr.take().expect("stderr"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "blockd did not create {}", socket.display());
            if let Ok(Some(st)) = reaper.child().try_wait() {
                panic!("blockd exited early ({st})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
struct Qemu {
    reaper: Reaper,
    console: Console,
    stderr: Collector,
}

impl Qemu {
    fn boot(dir: &TempDir, tag: &str, blockd: &Blockd, smp: u32, num_queues: u32) -> Qemu {
        let serial = dir.path(&format!("serial-{tag}.sock"));
        let kit = kit();
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "512", "-smp", &smp.to_string()])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=vub,path={}", blockd.socket.display()))
            .args(["-device", &format!("vhost-user-blk-pci,chardev=vub,num-queues={num_queues}")])
            .arg("-kernel")
            .arg(&kit.kernel)
            .arg("-initrd")
            .arg(&kit.initrd)
            .args(["-append", "console=ttyS0 panic=-1", "-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=on", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning qemu-system-x86_64 (scripts/setup-host installs it)");
        let mut reaper = Reaper::new(child, &serial.display().to_string());
        let stderr = Collector::new(reaper.child().stderr.take().expect("stderr"));
        let console = Console::connect(&serial, Duration::from_secs(20)).expect("QEMU's serial socket");
        let mut q = Qemu { reaper, console, stderr };
        if let Err(e) = q.console.expect("FLOTILLA-LINUX-READY", BOOT) {
            q.fail(&format!("Linux did not reach /init: {e}"));
        }
        // The shell may drop what is typed before it starts: ask until it answers.
        let deadline = Instant::now() + REPLY;
        loop {
            match q.console.command("echo \"UP\"\"=1\"", "UP=1", Duration::from_secs(2)) {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => q.fail(&format!("the shell does not answer: {e}")),
                Err(_) => {}
            }
        }
        q
    }

    fn fail(&mut self, what: &str) -> ! {
        let _ = self.reaper.child().kill();
        let _ = self.reaper.child().wait();
        panic!("{what}\nQEMU's stderr:\n{}", self.stderr.take());
    }

    /// Runs `cmd` in the guest shell; its output is the value of the `key=` line it echoes
    /// (the key is split with quotes in the typed line, so the echo of the input never matches).
    fn ask(&mut self, key: &str, cmd: &str) -> String {
        let (a, b) = key.split_at(1);
        let line = format!("{cmd}; echo \"{a}\"\"{b}=$R\"");
        match self.console.command(&line, &format!("{key}="), REPLY) {
            Ok(l) => l[key.len() + 1..].trim().to_string(),
            Err(e) => self.fail(&format!("guest command {cmd:?}: {e}")),
        }
    }

    /// Powers the guest off and waits for QEMU to exit (killed if it does not).
    fn poweroff(mut self) {
        let _ = self.console.send("sync; poweroff -f");
        if wait_timeout(self.reaper.child(), Duration::from_secs(20)).is_none() {
            let _ = self.reaper.child().kill();
            let _ = self.reaper.child().wait();
        }
    }
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
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e} (scripts/setup-host installs qemu-img/qemu-io)"));
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

    let mut q = Qemu::boot(&dir, "1", &blockd, 2, 2);
    assert_eq!(q.ask("SZ", "R=$(cat /sys/block/vda/size)"), (64 * MIB / 512).to_string());
    assert_eq!(q.ask("RO", "R=$(cat /sys/block/vda/ro)"), "0");
    assert_eq!(q.ask("SER", "R=$(cat /sys/block/vda/serial)"), "flotilla-raw");
    assert_eq!(q.ask("NQ", "R=$(ls /sys/block/vda/mq | wc -l)"), "2", "two request queues");
    // Host data reads right in the guest.
    let z = q.ask("MZ", &fill_md5_cmd('Z'));
    assert_eq!(q.ask("M1", &read_md5_cmd(MIB)), z);
    // The guest writes, flushes, and reads back from the device.
    assert_eq!(q.ask("WR", &write_cmd('Q', 2 * MIB)), "0");
    assert_eq!(q.ask("SY", "sync; R=$?"), "0");
    let qm = q.ask("MQ", &fill_md5_cmd('Q'));
    assert_eq!(q.ask("M2", &read_md5_cmd(2 * MIB)), qm);
    q.poweroff();

    // The bytes are in the file.
    let mut got = vec![0u8; LEN];
    std::fs::File::open(&image).unwrap().read_exact_at(&mut got, 2 * MIB).unwrap();
    assert!(got.iter().all(|&b| b == b'Q'), "the guest's write is not in {}", image.display());

    // A second frontend connects to the same blockd and sees the data.
    let mut q = Qemu::boot(&dir, "2", &blockd, 1, 1);
    let qm2 = q.ask("MQ", &fill_md5_cmd('Q'));
    assert_eq!(q.ask("M2", &read_md5_cmd(2 * MIB)), qm2);
    // DISCARD from the guest punches a hole in the raw file: the range reads as zeroes.
    let zero = q.ask("M0", &format!("R=$(head -c {LEN} /dev/zero | md5sum | cut -c1-32)"));
    assert_eq!(q.ask("DI", &format!("blkdiscard -o {} -l {LEN} /dev/vda; R=$?", 2 * MIB)), "0");
    assert_eq!(q.ask("M3", &read_md5_cmd(2 * MIB)), zero);
    q.poweroff();
    let log = blockd.stop();
    assert_eq!(log.matches("frontend connected").count(), 2, "blockd's log:\n{log}");
    assert!(log.contains("event_idx=true"), "Linux did not negotiate EVENT_IDX; blockd's log:\n{log}");
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
    let mut q = Qemu::boot(&dir, "1", &blockd, 2, 2);
    assert_eq!(q.ask("SZ", "R=$(cat /sys/block/vda/size)"), (64 * MIB / 512).to_string());
    // Backing data ('Z' = 0x5a) reads through the overlay.
    let z = q.ask("MZ", &fill_md5_cmd('Z'));
    assert_eq!(q.ask("M1", &read_md5_cmd(MIB)), z, "backing file data");
    // Unallocated everywhere: zeroes.
    let zero = q.ask("M0", &format!("R=$(head -c {LEN} /dev/zero | md5sum | cut -c1-32)"));
    assert_eq!(q.ask("M3", &read_md5_cmd(8 * MIB)), zero);
    // Writes go to the overlay: one over backing data, one to fresh space.
    assert_eq!(q.ask("WR", &write_cmd('Q', 2 * MIB)), "0");
    assert_eq!(q.ask("WB", &write_cmd('A', MIB)), "0");
    // Parallel writers on both vCPUs (taskset pins them), to fresh clusters.
    let par = format!(
        "head -c {LEN} /dev/zero | tr '\\0' 'P' > /tmp/pp; \
         taskset 1 dd if=/tmp/pp of=/dev/vda bs=4096 seek={} conv=fsync 2>/dev/null & \
         taskset 2 dd if=/tmp/pp of=/dev/vda bs=4096 seek={} conv=fsync 2>/dev/null; R=$?; wait",
        16 * MIB / 4096,
        32 * MIB / 4096
    );
    assert_eq!(q.ask("PW", &par), "0");
    assert_eq!(q.ask("SY", "sync; R=$?"), "0");
    let qm = q.ask("MQ", &fill_md5_cmd('Q'));
    assert_eq!(q.ask("M2", &read_md5_cmd(2 * MIB)), qm);
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

    let mut q = Qemu::boot(&dir, "1", &blockd, 1, 1);
    assert_eq!(q.ask("RO", "R=$(cat /sys/block/vda/ro)"), "1");
    let z = q.ask("MZ", &fill_md5_cmd('Z'));
    assert_eq!(q.ask("M1", &read_md5_cmd(MIB)), z);
    assert_ne!(q.ask("WR", &write_cmd('Q', MIB)), "0", "a write to a read-only drive succeeded");
    assert_eq!(q.ask("M2", &read_md5_cmd(MIB)), z);
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
    for (bit, name) in [(30, "PROTOCOL_FEATURES"), (32, "VERSION_1"), (29, "EVENT_IDX"), (9, "FLUSH"), (12, "MQ"),
        (13, "DISCARD"), (14, "WRITE_ZEROES")]
    {
        assert_ne!(features & (1 << bit), 0, "feature {name} missing from {features:#x}");
    }
    assert_eq!(features & (1 << 5), 0, "RO offered for a writable drive");
    drop(conn);
    signal(reaper.pid(), libc::SIGTERM);
    let status = wait_timeout(reaper.child(), Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "blockd on SIGTERM: {status:?}\n{}", log.take());
}
