//! The test guest's virtio-pci drivers (`tests/guest/virtio_*.c`, commands in
//! `tests/guest/PROTOCOL.md`) proven against QEMU's own devices under TCG, before vmm-core's
//! transport exists: QEMU's virtio-blk-pci on a raw file, vhost-user-blk-pci served by our
//! blockd, and QEMU's virtio-balloon-pci driven over QMP. What the guest writes is checked in the
//! file on the host, and what the host changes (block_resize, balloon target) must reach the
//! guest as the lines the protocol promises.
//!
//! Needs `qemu-system-x86_64` (scripts/setup-host installs it). The guest boots in well under a
//! second under TCG; every wait is bounded.

use flotilla_tests::console::{field, Console};
use flotilla_tests::guest::guest_elf;
use flotilla_tests::machine::TempDir;
use flotilla_tests::process::{signal, wait_timeout, Collector, Reaper};
use flotilla_tests::qmp::{QmpAddr, RawQmp};
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(20);
const REPLY: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// The pattern `blkqd` uses when none is given (PROTOCOL.md).
const QD_PATTERN: u32 = 0x51de_0000;

/// The test guest on QEMU (q35, TCG) with its serial console and a QMP socket.
struct Guest {
    reaper: Reaper,
    console: Console,
    stderr: Collector,
    qmp: RawQmp,
}

impl Guest {
    fn boot(dir: &TempDir, mem_mib: u64, extra: &[String]) -> Guest {
        let serial = dir.path("serial.sock");
        let qmp = dir.path("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "q35", "-m", &mem_mib.to_string()])
            .arg("-kernel")
            .arg(guest_elf())
            .args(["-display", "none", "-vga", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=on", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning qemu-system-x86_64 (scripts/setup-host installs it)");
        // Marked by the serial socket path: only this QEMU mentions it (blockd shares `dir`).
        let mut reaper = Reaper::new(child, &serial.display().to_string());
        let mut stderr = Collector::new(reaper.child().stderr.take().expect("stderr"));
        let mut console = match Console::connect(&serial, BOOT) {
            Ok(c) => c,
            Err(e) => {
                let _ = reaper.child().kill();
                panic!("QEMU's serial socket: {e}\nQEMU's stderr:\n{}", stderr.take());
            }
        };
        if let Err(e) = console.expect("READY", BOOT) {
            let _ = reaper.child().kill();
            panic!("the guest did not boot: {e}\nQEMU's stderr:\n{}", stderr.take());
        }
        let mut qmp = RawQmp::connect(&QmpAddr::Unix(qmp), REPLY);
        qmp.negotiate();
        Guest { reaper, console, stderr, qmp }
    }

    fn fail(&mut self, what: &str) -> ! {
        let _ = self.reaper.child().kill();
        let _ = self.reaper.child().wait();
        panic!("{what}\nQEMU's stderr:\n{}", self.stderr.take());
    }

    /// Sends a guest command and returns the answer line starting with `answer` (an `ERR` line
    /// instead fails at once, with the console's last lines).
    fn ask(&mut self, cmd: &str, answer: &str) -> String {
        if let Err(e) = self.console.send(cmd) {
            self.fail(&format!("sending {cmd:?}: {e}"));
        }
        self.wait_line(answer, &format!("answer to {cmd:?}"))
    }

    /// Waits for a line starting with `prefix`; an `ERR` line fails.
    fn wait_line(&mut self, prefix: &str, what: &str) -> String {
        let deadline = Instant::now() + REPLY;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.console.expect("", left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) if l.starts_with("ERR") => self.fail(&format!("{what}: {l}")),
                Ok(_) => {}
                Err(e) => self.fail(&format!("{what}: {e}")),
            }
        }
    }

    fn qmp(&mut self, name: &str, args: Value) -> Value {
        let r = self.qmp.execute(name, args.clone());
        if r.get("return").is_none() {
            self.fail(&format!("QMP {name} {args}: {r}"));
        }
        r["return"].clone()
    }

    /// Quits QEMU over QMP and waits for it (killed if it does not go).
    fn quit(mut self) -> String {
        let _ = self.qmp.execute("quit", Value::Null);
        if wait_timeout(self.reaper.child(), Duration::from_secs(10)).is_none() {
            let _ = self.reaper.child().kill();
            let _ = self.reaper.child().wait();
        }
        self.stderr.take()
    }
}

fn num(line: &str, key: &str) -> u64 {
    let v = field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    parsed.unwrap_or_else(|e| panic!("{key}={v} in {line:?}: {e}"))
}

/// A sector as the guest's `blkwrite` fills it: little-endian u32s of `pattern ^ sector`.
fn sector_bytes(pattern: u32, sector: u64) -> Vec<u8> {
    (pattern ^ sector as u32).to_le_bytes().repeat((SECTOR / 4) as usize)
}

/// Asserts that sectors [first, first + count) of `image` hold the guest's pattern.
fn assert_pattern_on_host(image: &Path, first: u64, count: u64, pattern: u32) {
    let f = std::fs::File::open(image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    let mut buf = vec![0u8; (count * SECTOR) as usize];
    f.read_exact_at(&mut buf, first * SECTOR).unwrap();
    for (i, got) in buf.chunks(SECTOR as usize).enumerate() {
        let s = first + i as u64;
        assert_eq!(
            got,
            sector_bytes(pattern, s),
            "sector {s} of {} is not the guest's pattern {pattern:#x}",
            image.display()
        );
    }
}

/// CRC-32 as zlib computes it (the guest's `blkread` answer).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn host_crc(image: &Path, first: u64, count: u64) -> u32 {
    let mut buf = vec![0u8; (count * SECTOR) as usize];
    std::fs::File::open(image).unwrap().read_exact_at(&mut buf, first * SECTOR).unwrap();
    crc32(&buf)
}

/// A raw image of `size` bytes with the host's own pattern in sectors 2048..2056.
fn raw_image(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let image = dir.path(name);
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(size).unwrap();
    for s in 2048..2056 {
        f.write_all_at(&sector_bytes(0x0057_0000, s), s * SECTOR).unwrap();
    }
    image
}

/// The I/O both block tests run: host data read in the guest, guest writes seen in the file,
/// CRC of a read, flush, serial, 16 requests in flight, discard and write-zeroes.
fn block_io(g: &mut Guest, image: &Path, serial: &str) {
    let l = g.ask("blkcheck 2048 8 570000", "BLKCHECK");
    assert!(l.ends_with(" ok"), "host data read in the guest: {l}");
    let l = g.ask("blkcheck 2048 8 12345678", "BLKCHECK");
    assert!(l.ends_with("bad sector=2048"), "a wrong pattern must be caught: {l}");

    let l = g.ask("blkwrite 100 300 deadbeef", "BLKWROTE");
    assert_eq!(l, "BLKWROTE 100 300 status=0");
    let l = g.ask("blkcheck 100 300 deadbeef", "BLKCHECK");
    assert_eq!(l, "BLKCHECK 100 300 status=0 ok");
    assert_eq!(g.ask("blkflush", "BLKFLUSH"), "BLKFLUSH status=0");
    assert_pattern_on_host(image, 100, 300, 0xdead_beef);
    let l = g.ask("blkread 100 37", "BLKREAD");
    assert_eq!(l, format!("BLKREAD 100 37 status=0 crc={:#010x}", host_crc(image, 100, 37)));
    assert_eq!(g.ask("blkid", "BLKID"), format!("BLKID status=0 id={serial}"));

    let l = g.ask("blkqd 16 4096 1000", "BLKQD");
    assert_eq!(l, "BLKQD depth=16 status=0 ok");
    assert_pattern_on_host(image, 4096, 1000, QD_PATTERN);

    assert_eq!(g.ask("blkzeroes 4096 64", "BLKZEROES"), "BLKZEROES 4096 64 status=0");
    assert_eq!(g.ask("blkdiscard 4160 64", "BLKDISCARD"), "BLKDISCARD 4160 64 status=0");
    g.ask("blkflush", "BLKFLUSH status=0");
    let mut buf = vec![0u8; (64 * SECTOR) as usize];
    std::fs::File::open(image).unwrap().read_exact_at(&mut buf, 4096 * SECTOR).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "write-zeroes left data in {}", image.display());
    let l = g.ask("blkread 4096 64", "BLKREAD");
    assert_eq!(num(&l, "crc") as u32, crc32(&buf), "{l}");
    // Past the zeroed and discarded range the qd pattern is intact.
    assert_pattern_on_host(image, 4224, 872, QD_PATTERN);

    // The request queue's MSI-X vector (0x41) fired.
    let v = g.ask("vectors", "VECTORS");
    assert!(field(&v, "v41").is_some_and(|n| n != "0"), "no queue interrupts counted: {v}");
}

#[test]
fn qemu_virtio_blk_io_resize_and_recovery() {
    let dir = TempDir::new("guest-vblk");
    let image = raw_image(&dir, "disk.raw", 64 * MIB);
    let extra = [
        "-drive".to_string(),
        format!("if=none,id=d0,node-name=n0,format=raw,file={}", image.display()),
        "-device".to_string(),
        "virtio-blk-pci,drive=d0,serial=qemu-vblk".to_string(),
    ];
    let mut g = Guest::boot(&dir, 256, &extra);
    let v = g.ask("virtio", "VIRTIO");
    assert!(v.contains(" type=blk devid=2 ") && num(&v, "msix") >= 2, "{v}");
    let l = g.ask("blk", "BLK ");
    assert_eq!(num(&l, "capacity"), 64 * MIB / SECTOR, "{l}");
    assert_eq!(field(&l, "ro"), Some("0"));
    assert_eq!(field(&l, "blk_size"), Some("512"));
    let features = num(&l, "features");
    assert_ne!(features & (1 << 32), 0, "VERSION_1 not negotiated: {l}");
    assert_ne!(features & (1 << 9), 0, "FLUSH not negotiated: {l}");
    assert_eq!(g.ask("blk", "BLK "), l, "blk is idempotent");

    block_io(&mut g, &image, "qemu-vblk");

    // block_resize: a config interrupt, then one BLKCONFIG line from the command loop.
    let before = num(&g.ask("blkcap", "BLKCAP"), "config_irqs");
    g.qmp("block_resize", json!({"node-name": "n0", "size": 128 * MIB}));
    let l = g.wait_line("BLKCONFIG", "BLKCONFIG after block_resize");
    assert_eq!(l, format!("BLKCONFIG capacity={}", 128 * MIB / SECTOR));
    let cap = g.ask("blkcap", "BLKCAP");
    assert_eq!(num(&cap, "capacity"), 128 * MIB / SECTOR, "{cap}");
    assert!(num(&cap, "config_irqs") > before, "no config interrupt counted: {cap}");
    // The new space is usable.
    g.ask("blkwrite 200000 8 abc", "BLKWROTE 200000 8 status=0");
    g.ask("blkflush", "BLKFLUSH status=0");
    assert_pattern_on_host(&image, 200_000, 8, 0xabc);

    // QEMU's virtio-blk marks itself broken on a malformed chain (NEEDS_RESET, no used
    // entry); the guest resets and re-initialises it, and I/O works again.
    let l = g.ask("blkbad huge", "BLKBAD");
    assert_eq!(l, "BLKBAD huge used=no status=none len=0");
    g.ask("blkwrite 300 8 5eed", "BLKWROTE 300 8 status=0");
    g.ask("blkcheck 300 8 5eed", "BLKCHECK 300 8 status=0 ok");
    let err = g.quit();
    assert!(err.contains("bogus descriptor"), "QEMU did not report the bad descriptor:\n{err}");
}

/// blockd serving one raw drive on `dir/vub.sock`.
fn start_blockd(dir: &TempDir, drive: &str) -> (Reaper, Collector, PathBuf) {
    let bin = &flotilla_tests::process::binaries().blockd;
    let socket = dir.path("vub.sock");
    let child = Command::new(bin)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--drive", drive])
        .env("BLOCKD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let mut reaper = Reaper::new(child, &socket.display().to_string());
    let log = Collector::new(reaper.child().stderr.take().expect("stderr"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "blockd did not create {}", socket.display());
        if let Ok(Some(st)) = reaper.child().try_wait() {
            panic!("blockd exited early ({st})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (reaper, log, socket)
}

#[test]
fn vhost_user_blk_on_blockd_io_and_malformed_chains() {
    let dir = TempDir::new("guest-vublk");
    let image = raw_image(&dir, "vu.raw", 64 * MIB);
    let (mut blockd, mut log, socket) =
        start_blockd(&dir, &format!("file={},format=raw,serial=blockd-vu", image.display()));
    let extra: Vec<String> = [
        "-object",
        "memory-backend-memfd,id=m,size=256M,share=on",
        "-numa",
        "node,memdev=m",
        "-chardev",
        &format!("socket,id=vub,path={}", socket.display()),
        "-device",
        "vhost-user-blk-pci,chardev=vub",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut g = Guest::boot(&dir, 256, &extra);
    let l = g.ask("blk", "BLK ");
    assert_eq!(num(&l, "capacity"), 64 * MIB / SECTOR, "{l}");
    block_io(&mut g, &image, "blockd-vu");

    // Every malformed chain is answered (or not) without hurting the guest, and the queue
    // keeps working after each.
    for (i, kind) in ["oob", "huge", "loop", "badnext", "dir", "nostatus", "short"].iter().enumerate() {
        let l = g.ask(&format!("blkbad {kind}"), "BLKBAD");
        assert!(l.starts_with(&format!("BLKBAD {kind} used=")), "{l}");
        if *kind == "dir" || *kind == "short" {
            // A read into a device-readable buffer, a short header: never a success.
            assert!(field(&l, "status") != Some("0"), "{l}");
        }
        let s = 6000 + 8 * i as u64;
        let p = 0x00ba_d000 + i as u32;
        g.ask(&format!("blkwrite {s} 8 {p:x}"), &format!("BLKWROTE {s} 8 status=0"));
        g.ask(&format!("blkcheck {s} 8 {p:x}"), &format!("BLKCHECK {s} 8 status=0 ok"));
    }
    g.ask("blkflush", "BLKFLUSH status=0");
    for i in 0..7u64 {
        assert_pattern_on_host(&image, 6000 + 8 * i, 8, 0x00ba_d000 + i as u32);
    }
    g.quit();
    signal(blockd.pid(), libc::SIGTERM);
    let status = wait_timeout(blockd.child(), Duration::from_secs(10));
    let log = log.take();
    assert!(status.is_some_and(|s| s.success()), "blockd did not exit cleanly ({status:?}):\n{log}");
}

#[test]
fn qemu_virtio_balloon_follows_qmp_and_reports_stats() {
    let dir = TempDir::new("guest-balloon");
    let extra = ["-device".to_string(), "virtio-balloon-pci,id=bal".to_string()];
    let mut g = Guest::boot(&dir, 256, &extra);
    // No virtio-blk on this machine: a clear error, and the guest goes on.
    let l = g.console.command("blk", "ERR", REPLY).unwrap_or_else(|e| panic!("blk without a device: {e}"));
    assert_eq!(l, "ERR blk no-device");
    let mem = g.ask("mem", "MEM");
    let total = num(&mem, "total");
    let l = g.ask("balloon", "BALLOON ");
    assert_eq!(field(&l, "num_pages"), Some("0"), "{l}");
    assert_eq!(field(&l, "actual"), Some("0"), "{l}");
    assert_ne!(num(&l, "features") & (1 << 32), 0, "VERSION_1: {l}");
    assert_ne!(num(&l, "features") & (1 << 1), 0, "STATS_VQ: {l}");

    // Touch the RAM the balloon gives away first, so inflating really frees host memory.
    assert_eq!(g.ask("touch 64", "TOUCHED"), format!("TOUCHED {}", 64 * MIB));
    // Inflate: 256 MiB guest, target 160 MiB -> 96 MiB = 24576 pages in the balloon.
    g.qmp("balloon", json!({"value": 160 * MIB}));
    assert_eq!(g.wait_line("BALLOONED", "inflate"), "BALLOONED actual=24576");
    assert_eq!(g.qmp("query-balloon", Value::Null)["actual"], json!(160 * MIB));
    assert!(g.ask("touchcheck", "TOUCHCHECK").starts_with("TOUCHCHECK ok"));
    // Deflate back: the pages return, zeroed by the host (it discarded them) or as written.
    g.qmp("balloon", json!({"value": 256 * MIB}));
    assert_eq!(g.wait_line("BALLOONED", "deflate"), "BALLOONED actual=0");
    assert_eq!(g.qmp("query-balloon", Value::Null)["actual"], json!(256 * MIB));
    let l = g.ask("touchcheck", "TOUCHCHECK");
    assert!(l.starts_with("TOUCHCHECK ok"), "{l}");
    assert_eq!(num(&l, "checked"), 64 * MIB / 4096, "{l}");
    assert_eq!(num(&l, "zero"), 64 * MIB / 4096, "QEMU discards inflated pages, so they read back zero: {l}");

    // Stats: QEMU returns the buffer every polling interval; the guest refills it.
    g.qmp(
        "qom-set",
        json!({"path": "/machine/peripheral/bal", "property": "guest-stats-polling-interval", "value": 1}),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let s = g.qmp("qom-get", json!({"path": "/machine/peripheral/bal", "property": "guest-stats"}));
        if s["stats"]["stat-total-memory"] == json!(total) && s["stats"]["stat-minor-faults"].as_u64() >= Some(2) {
            break s;
        }
        if Instant::now() >= deadline {
            g.fail(&format!("guest stats never arrived: {s}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(stats["stats"]["stat-swap-in"], json!(0), "{stats}");
    assert!(stats["stats"]["stat-free-memory"].as_u64().is_some_and(|f| f > 0 && f <= total), "{stats}");
    let sent = num(&g.ask("balloonstats", "BALLOONSTATS"), "sent");
    assert!(sent >= 3, "stats buffers sent: {sent}");

    // Bad PFNs: QEMU skips what is not RAM and returns the buffer; the balloon goes on.
    for kind in ["oob", "hole", "huge"] {
        assert_eq!(g.ask(&format!("balloonbad {kind}"), "BALLOONBAD"), format!("BALLOONBAD {kind} used=yes"));
    }
    assert_eq!(g.qmp("query-status", Value::Null)["status"], json!("running"));
    g.qmp("balloon", json!({"value": 200 * MIB}));
    assert_eq!(g.wait_line("BALLOONED", "inflate after bad PFNs"), "BALLOONED actual=14336");
    assert_eq!(g.qmp("query-balloon", Value::Null)["actual"], json!(200 * MIB));
    g.quit();
}

/// SeaBIOS moves 64-bit BARs above 4 GiB when the 32-bit window is full (here: a 2 GiB
/// ivshmem BAR): the guest maps the virtio BAR there and the driver works the same.
#[test]
fn virtio_blk_bar_above_4gib() {
    let dir = TempDir::new("guest-vblk-high");
    let image = raw_image(&dir, "disk.raw", 16 * MIB);
    let extra = [
        "-object".to_string(),
        "memory-backend-ram,id=shm,size=2G".to_string(),
        "-device".to_string(),
        "ivshmem-plain,memdev=shm".to_string(),
        "-drive".to_string(),
        format!("if=none,id=d0,format=raw,file={}", image.display()),
        "-device".to_string(),
        "virtio-blk-pci,drive=d0".to_string(),
    ];
    let mut g = Guest::boot(&dir, 256, &extra);
    let v = g.ask("virtio", "VIRTIO");
    assert!(num(&v, "bar") >= 1 << 32, "the BAR is below 4 GiB, nothing proven: {v}");
    let l = g.ask("blk", "BLK ");
    assert_eq!(num(&l, "capacity"), 16 * MIB / SECTOR, "{l}");
    g.ask("blkwrite 64 16 c0ffee", "BLKWROTE 64 16 status=0");
    g.ask("blkcheck 64 16 c0ffee", "BLKCHECK 64 16 status=0 ok");
    g.ask("blkflush", "BLKFLUSH status=0");
    assert_pattern_on_host(&image, 64, 16, 0xc0_ffee);
    let vec = g.ask("vectors", "VECTORS");
    assert!(field(&vec, "v41").is_some_and(|n| n != "0"), "no queue interrupts counted: {vec}");
    g.quit();
}
