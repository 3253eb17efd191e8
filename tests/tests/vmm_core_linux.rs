//! Linux's own drivers doing real work on vmm-core, through the `flotilla` launcher and its
//! daemons (blockd, balloond, qmp-gateway), on this host's kvm_pvm: the project's test kernel
//! (`tests/kit/build-pvm-kernel.sh`, `flotilla_tests::pvm_kernel`) booted from a root disk the
//! host writes (an MBR, one ext4 partition whose `/sbin/init` spins in user mode without a system
//! call: user space cannot make one on kvm_pvm, so this keeps the kernel alive after it starts
//! init). Each claim is checked against a truth the test has independently of the machine: the
//! kernel's own log, its System.map, the host's view of the guest-RAM memfd.
//!
//! - `linux_on_vmm_core_drivers_balloon_power_button_and_reset` boots the PVH vmlinux once with
//!   2 vCPUs, a 2-queue virtio-blk disk and a balloon, `-mem-prealloc`: partition scan, both
//!   queues, the ext4 root mounted, init started; no error Linux blames on the machine;
//!   query-cpus's pcs inside the kernel's text or init's two instructions; memsave of
//!   `linux_banner` equal to the banner the kernel printed; the balloon inflating (the memfd's
//!   allocation drops) and deflating; the ACPI power button reaching the input layer (evbug);
//!   `system_reset` booting the kernel a second time to init.
//! - `linux_bzimage_boots_on_vmm_core` boots the same kernel as a bzImage (real-mode setup
//!   header, 64-bit entry, the decompressor) to init.
//!
//! A boot takes ~60-70 s of wall time here (the guest's privileged code is emulated); every wait
//! is bounded with room for a loaded 2-core CI machine. A failure prints the console's tail and
//! flotilla's stderr; everything the test started is killed.

use flotilla_tests::machine::TempDir;
use flotilla_tests::process::{binaries, describe, processes_mentioning, vmm_core_child, wait_timeout, Collector, Reaper};
use flotilla_tests::pvm_kernel::{self, PvmKernel, SystemMap};
use flotilla_tests::qmp::{gateway_binary, Incoming, QmpAddr, RawQmp};
use flotilla_tests::stamped::{Line, NoLine, StampedConsole};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const RAM_MIB: u64 = 512;
const RAM: u64 = RAM_MIB * MIB;
const BALLOON_MIB: u64 = 64;
/// Launch (or reset) to `Run /sbin/init`: ~60-70 s here; room for a loaded CI machine.
const BOOT: Duration = Duration::from_secs(240);
/// The bzImage path is slower (the boot stub's LZ4 decompression): banner at ~40 s, init at
/// ~85 s measured here, against ~9 s and ~53 s for the PVH vmlinux.
const BZIMAGE_BOOT: Duration = Duration::from_secs(420);
/// 64 MiB of balloon at ~8 MiB/s measured here.
const BALLOON_WAIT: Duration = Duration::from_secs(120);
/// The power button's event through ACPI's SCI, the button driver and evbug.
const EVENT_WAIT: Duration = Duration::from_secs(60);
const QMP_CONNECT: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(30);

/// `ignore_loglevel` puts evbug's debug-level lines on the console. The RCU stall timeout is
/// the most Linux allows (300 s, was 21): a vCPU thread starved by a loaded host is not the
/// machine's fault, and a stall report's `Call Trace` would trip the denylist. (The kernel's
/// tick must skip missed ticks, HZ_100 + NO_HZ_IDLE + HIGH_RES_TIMERS in the kit: a periodic
/// 250 Hz tick replaying every missed tick livelocked the boot here on a loaded host, from the
/// switch to kvm-clock on, both vCPUs in tick code at every query-cpus.)
const APPEND: &str = "console=ttyS0 root=/dev/vda1 rootwait ignore_loglevel rcupdate.rcu_cpu_stall_timeout=300";
/// What the kernel prints when it hands over to init.
const RUN_INIT: &str = "Run /sbin/init as init process";
const BANNER: &str = "Linux version ";
/// The spinning init's code (`pause` at 0x400078, `jmp` at 0x40007a): pvm_kernel::spinning_init.
const INIT_CODE: std::ops::Range<u64> = 0x40_0078..0x40_007c;
/// evbug's line for KEY_POWER (116, linux/input-event-codes.h) pressed (EV_KEY = 1, value 1).
const POWER_KEY_EVENT: &str = "evbug: Event. Dev: input0, Type: 1, Code: 116, Value: 1";

/// Kernel messages in which Linux blames the machine (its firmware tables, its devices).
const DENYLIST: &[&str] = &[
    "not reserved",
    "_OSC: platform retains control",
    "AE_NOT_FOUND",
    "ACPI Error",
    "ACPI BIOS Error",
    "[Firmware Bug]",
    "FW_BUG",
    "i8042: Can't read CTR",
    "failed with error",
    "WARNING:",
    "BUG:",
    "Call Trace",
    "timed out",
    "nobody cared",
];

/// The kernel's console, every line kept with the instant it reached the host.
struct KernelLog {
    con: StampedConsole,
    lines: Vec<Line>,
}

impl KernelLog {
    /// Reads lines until one contains `needle` (lines already read are not searched again).
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Line, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.con.next(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => {
                    let hit = l.text.contains(needle);
                    self.lines.push(l.clone());
                    if hit {
                        return Ok(l);
                    }
                }
                Err(NoLine::Timeout) => return Err(format!("no console line with {needle:?} within {timeout:?}")),
                Err(NoLine::Closed) => return Err(format!("the console closed while waiting for {needle:?}")),
            }
        }
    }

    /// Lines from index `from` on that contain `needle`.
    fn find(&self, from: usize, needle: &str) -> Option<&Line> {
        self.lines[from..].iter().find(|l| l.text.contains(needle))
    }

    /// The last `n` lines, each with its arrival time after `t0`.
    fn tail(&self, n: usize, t0: Instant) -> String {
        let from = self.lines.len().saturating_sub(n);
        self.lines[from..]
            .iter()
            .map(|l| format!("+{:7.1}s {}", l.at.saturating_duration_since(t0).as_secs_f64(), l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One `flotilla` machine; on a panic it is killed, then its console tail and stderr printed.
struct Machine {
    reaper: Option<Reaper>,
    stderr: Option<Collector>,
    log: KernelLog,
    qmp_path: PathBuf,
    started: Instant,
    dir: TempDir,
    /// The kernel's System.map, read at start (for naming where the vCPUs are on a failure).
    symbols: SystemMap,
    /// Held while the machine lives (dropped after it, as the last field).
    _turn: MutexGuard<'static, ()>,
}

static ONE_BOOT_AT_A_TIME: Mutex<()> = Mutex::new(());

impl Machine {
    /// `flotilla -m 512 -smp 2 -kernel KERNEL -drive DISK (2 queues) [extra] -qmp -serial`,
    /// started in `dir` (also the launcher's runtime directory, so that every process of the VM
    /// mentions it); returns once the console is connected (vmm-core waits for it: wait=on).
    fn start(dir: TempDir, k: &PvmKernel, kernel: &Path, disk: &Path, extra: &[&str]) -> Machine {
        // One boot at a time: each is a core's worth of emulation for minutes, and two at once
        // on a 2-core machine slow both past their bounds.
        let turn = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let serial = dir.path("serial.sock");
        let qmp_path = dir.path("qmp.sock");
        let b = binaries();
        let started = Instant::now();
        let mut child = Command::new(&b.flotilla)
            .env("FLOTILLA_VMM_CORE", &b.vmm_core)
            .env("FLOTILLA_QMP_GATEWAY", gateway_binary())
            .env("FLOTILLA_BLOCKD", &b.blockd)
            .env("FLOTILLA_BALLOOND", &b.balloond)
            .env("XDG_RUNTIME_DIR", &dir.0)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .args(["-m", &RAM_MIB.to_string(), "-smp", "2", "-display", "none"])
            .arg("-kernel")
            .arg(kernel)
            .args(["-append", APPEND])
            .arg("-drive")
            .arg(format!("file={},if=none,format=raw,id=disk0", disk.display()))
            .args(["-device", "virtio-blk-pci,drive=disk0,num-queues=2"])
            .args(extra)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=on", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning flotilla");
        let stderr = Collector::new(child.stderr.take().expect("stderr"));
        let reaper = Reaper::new(child, &dir.0.display().to_string());
        let con = StampedConsole::connect(&serial, QMP_CONNECT);
        Machine {
            reaper: Some(reaper),
            stderr: Some(stderr),
            log: KernelLog { con: con.unwrap_or_else(|e| panic!("serial console: {e}")), lines: Vec::new() },
            qmp_path,
            started,
            dir,
            symbols: k.system_map().unwrap_or_else(|e| panic!("{e}")),
            _turn: turn,
        }
    }

    fn pid(&self) -> i32 {
        self.reaper.as_ref().expect("running").pid()
    }

    fn qmp(&self) -> RawQmp {
        let mut q = RawQmp::connect(&QmpAddr::Unix(self.qmp_path.clone()), QMP_CONNECT);
        q.negotiate();
        q
    }

    /// Waits for `needle` on the console; a miss fails the test.
    fn expect_line(&mut self, needle: &str, timeout: Duration) -> Line {
        self.log.wait_for(needle, timeout).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits for `needle` until `limit` after `since`; a miss fails the test, saying where the
    /// vCPUs are.
    fn expect_line_by(&mut self, needle: &str, since: Instant, limit: Duration) -> Line {
        let left = (since + limit).saturating_duration_since(Instant::now());
        match self.log.wait_for(needle, left) {
            Ok(l) => l,
            Err(e) => panic!("{e} ({limit:?} after launch or reset)\n{}", self.where_the_cpus_are()),
        }
    }

    /// query-cpus three times a second apart, each pc named from System.map; never panics on
    /// a QMP failure (it is only said).
    fn where_the_cpus_are(&self) -> String {
        let Ok(mut q) = RawQmp::try_connect(&QmpAddr::Unix(self.qmp_path.clone())) else {
            return "(no QMP connection for query-cpus)".into();
        };
        let mut ask = |cmd: &str| -> Option<Value> {
            q.send_raw(format!("{{\"execute\": \"{cmd}\"}}\n").as_bytes());
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match q.next(deadline.saturating_duration_since(Instant::now()))? {
                    Incoming::Msg(m) if m.get("event").is_some() => continue,
                    Incoming::Msg(m) => return Some(m),
                    Incoming::Closed => return None,
                }
            }
        };
        ask("qmp_capabilities");
        let mut out = String::from("vCPUs (query-cpus, 1 s apart):");
        for i in 0..3 {
            if i > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            let Some(r) = ask("query-cpus") else { return out + " (no reply)" };
            for c in r["return"].as_array().into_iter().flatten() {
                let pc = c["pc"].as_i64().unwrap_or(0) as u64;
                out += &format!(
                    "\n  CPU {} halted={} pc={pc:#x} {}",
                    c["CPU"],
                    c["halted"],
                    symbolize(&self.symbols, pc)
                );
            }
        }
        out
    }

    /// Ends the machine with `quit`: flotilla must exit 0 and leave nothing running.
    fn quit(mut self, q: &mut RawQmp) {
        assert_eq!(q.execute("quit", Value::Null), json!({"return": {}}), "quit");
        let status = wait_timeout(self.reaper.as_mut().expect("running").child(), EXIT);
        let Some(status) = status else { panic!("flotilla still runs {EXIT:?} after quit") };
        let marker = self.reaper.take().map(|r| r.marker.clone()).unwrap_or_default();
        let err = self.stderr.take().map(|mut c| c.take()).unwrap_or_default();
        assert_eq!(status.code(), Some(0), "flotilla ended with {}; stderr:\n{err}", describe(status));
        assert!(!err.contains("panicked"), "a process panicked:\n{err}");
        let left = processes_mentioning(&marker);
        assert!(left.is_empty(), "left running after quit: {left:?}");
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Killing first: the daemons hold flotilla's stderr pipe open while they live.
        drop(self.reaper.take());
        if !std::thread::panicking() {
            return;
        }
        let err = match self.stderr.take() {
            Some(mut c) => {
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _ = tx.send(c.take());
                });
                rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| "(stderr still open)".into())
            }
            None => String::new(),
        };
        eprintln!(
            "--- console tail ({} lines, {:.1?} after launch, in {}) ---\n{}\n--- flotilla's stderr ---\n{err}",
            self.log.lines.len(),
            self.started.elapsed(),
            self.dir.0.display(),
            self.log.tail(80, self.started)
        );
    }
}

/// Bytes of vmm-core's guest-RAM memfd backed by host memory (its st_blocks), from the fd links
/// in /proc/PID/fd named `/memfd:flotilla-guest-ram` (distinct inodes, summed).
fn guest_ram_allocated(vmm_core: i32) -> u64 {
    let mut by_inode = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{vmm_core}/fd")).expect("/proc/PID/fd").flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        if !target.to_string_lossy().starts_with("/memfd:flotilla-guest-ram") {
            continue;
        }
        if let Ok(m) = std::fs::metadata(e.path()) {
            by_inode.insert(m.ino(), m.blocks() * 512);
        }
    }
    assert!(!by_inode.is_empty(), "vmm-core (pid {vmm_core}) has no guest-RAM memfd open");
    by_inode.values().sum()
}

/// `symbol+0xoff` for a kernel text address, or what else it is.
fn symbolize(map: &SystemMap, pc: u64) -> String {
    if INIT_CODE.contains(&pc) {
        return "(the spinning /sbin/init)".into();
    }
    map.symbolize(pc).unwrap_or_else(|| "(not in kernel text)".into())
}


/// Sends `balloon` to `target` and waits for BALLOON_CHANGE events up to `actual == target`;
/// returns the time from the command to that event and how many events came.
fn balloon_to(q: &mut RawQmp, target: u64) -> (Duration, usize) {
    q.events.retain(|e| e["event"] != "BALLOON_CHANGE");
    let t0 = Instant::now();
    assert_eq!(q.ok("balloon", json!({"value": target})), json!({}));
    let deadline = t0 + BALLOON_WAIT;
    let mut events = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = q.wait_event("BALLOON_CHANGE", left);
        events += 1;
        if e["data"]["actual"].as_u64() == Some(target) {
            return (t0.elapsed(), events);
        }
    }
}

/// The boot facts both boots must show from the console lines from `from` on.
fn assert_booted_from_disk(log: &KernelLog, from: usize) {
    for needle in [
        // The partition table the host wrote, read through blockd.
        " vda: vda1",
        // Both queues the device offers (2 vCPUs, so the driver uses both).
        "virtio_blk virtio0: 2/0/0 default/read/poll queues",
        "EXT4-fs (vda1): mounted filesystem",
        "VFS: Mounted root (ext4 filesystem)",
        RUN_INIT,
    ] {
        assert!(log.find(from, needle).is_some(), "no console line with {needle:?}");
    }
}

/// Lines from `from` on that match the denylist.
fn blamed(log: &KernelLog, from: usize) -> Vec<String> {
    log.lines[from..]
        .iter()
        .filter(|l| DENYLIST.iter().any(|d| l.text.contains(d)))
        .map(|l| l.text.clone())
        .collect()
}

/// The banner as the kernel printed it: the text after the printk time stamp.
fn banner_text(line: &Line) -> &str {
    let at = line.text.find(BANNER).expect("a banner line");
    &line.text[at..]
}

fn kernel() -> PvmKernel {
    pvm_kernel::kernel().unwrap_or_else(|e| panic!("the kvm_pvm test kernel: {e}"))
}

fn root_disk(dir: &TempDir) -> PathBuf {
    let disk = dir.path("root.raw");
    pvm_kernel::root_disk(&disk, 64 * MIB, "vmm-core-linux").unwrap_or_else(|e| panic!("root disk: {e}"));
    disk
}

#[test]
fn linux_on_vmm_core_drivers_balloon_power_button_and_reset() {
    let k = kernel();
    let map = k.system_map().unwrap_or_else(|e| panic!("{e}"));
    let text = map.text().expect("_stext/_etext");
    let banner_addr = map.symbol("linux_banner").expect("linux_banner");
    let dir = TempDir::new("vmm-core-linux");
    let disk = root_disk(&dir);
    let mut m = Machine::start(
        dir,
        &k,
        &k.vmlinux,
        &disk,
        &["-device", "virtio-balloon-pci,id=balloon0", "-mem-prealloc"],
    );

    // 1. The first boot, to init.
    let banner = m.expect_line_by(BANNER, m.started, BOOT);
    eprintln!("PVH vmlinux: the banner reached the console {:.1?} after launch", banner.at - m.started);
    let init = m.expect_line_by(RUN_INIT, m.started, BOOT);
    let first_boot = init.at - m.started;
    eprintln!("PVH vmlinux: `{RUN_INIT}` {first_boot:.1?} after launch ({} console lines)", m.log.lines.len());
    assert!(banner.text.contains(&k.kver), "banner {:?} is not kernel {}", banner.text, k.kver);
    assert_booted_from_disk(&m.log, 0);
    let evbug_bound = "evbug: Connected device: input0 (Power Button";
    assert!(m.log.find(0, evbug_bound).is_some(), "evbug is not bound to the ACPI power button");
    let core = vmm_core_child(m.pid(), QMP_CONNECT).expect("flotilla runs vmm-core");
    let mut q = m.qmp();

    // 3. Every vCPU runs the kernel or the spinning init, at least one the kernel.
    let cpus = q.ok("query-cpus", Value::Null);
    let cpus = cpus.as_array().expect("query-cpus returns a list").clone();
    assert_eq!(cpus.len(), 2, "{cpus:?}");
    let mut in_kernel = None;
    for c in &cpus {
        let pc = c["pc"].as_i64().unwrap_or_else(|| panic!("no pc in {c}")) as u64;
        let idx = c["CPU"].as_i64().unwrap_or_else(|| panic!("no CPU in {c}"));
        eprintln!("query-cpus: CPU {idx} pc {pc:#x} halted {}", c["halted"]);
        if text.contains(&pc) {
            in_kernel.get_or_insert(idx);
        } else {
            assert!(INIT_CODE.contains(&pc), "CPU {idx} at {pc:#x}: neither kernel text {text:x?} nor init {INIT_CODE:x?}");
        }
    }
    let kernel_cpu = in_kernel.unwrap_or_else(|| panic!("no vCPU in kernel text: {cpus:?}"));

    // 4. memsave of linux_banner (a kernel virtual address, through a vCPU in the kernel) is
    // the banner the kernel printed, with its newline and the string's NUL.
    let printed = banner_text(&banner).to_string();
    let want: Vec<u8> = [printed.as_bytes(), b"\n\0"].concat();
    let out = m.dir.path("banner.bin");
    let r = q.ok(
        "memsave",
        json!({"val": banner_addr as i64, "size": want.len(), "filename": out.display().to_string(), "cpu-index": kernel_cpu}),
    );
    assert_eq!(r, json!({}));
    let got = std::fs::read(&out).expect("memsave's file");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want),
        "memsave of linux_banner ({banner_addr:#x}, CPU {kernel_cpu})"
    );

    // 5. The balloon: RAM was preallocated, inflating gives pages back to the host, deflating
    // returns them to the guest.
    assert_eq!(q.ok("query-balloon", Value::Null)["actual"], RAM, "nothing inflated yet");
    let before = guest_ram_allocated(core);
    assert!(before >= RAM - MIB, "-mem-prealloc: only {before} of {RAM} bytes allocated");
    let target = RAM - BALLOON_MIB * MIB;
    let (inflate, events) = balloon_to(&mut q, target);
    assert_eq!(q.ok("query-balloon", Value::Null)["actual"], target);
    let after = guest_ram_allocated(core);
    let freed = before.saturating_sub(after);
    eprintln!(
        "balloon: inflated {BALLOON_MIB} MiB in {inflate:.1?} ({:.1} MiB/s, {events} BALLOON_CHANGE events); \
         memfd allocated {before} -> {after} bytes ({} MiB freed)",
        BALLOON_MIB as f64 / inflate.as_secs_f64(),
        freed / MIB
    );
    assert!(freed >= BALLOON_MIB * MIB * 7 / 8, "only {freed} bytes went back to the host ({before} -> {after})");
    let (deflate, events) = balloon_to(&mut q, RAM);
    assert_eq!(q.ok("query-balloon", Value::Null)["actual"], RAM);
    eprintln!(
        "balloon: deflated {BALLOON_MIB} MiB in {deflate:.1?} ({:.1} MiB/s, {events} events); memfd allocated now {} bytes",
        BALLOON_MIB as f64 / deflate.as_secs_f64(),
        guest_ram_allocated(core)
    );

    // 6. The ACPI power button reaches the input layer, after the command and not before.
    assert!(m.log.find(0, "Code: 116").is_none(), "a power-button event before system_powerdown");
    let sent = Instant::now();
    assert_eq!(q.ok("system_powerdown", Value::Null), json!({}));
    q.wait_event("POWERDOWN", EVENT_WAIT);
    let key = m.expect_line(POWER_KEY_EVENT, EVENT_WAIT);
    eprintln!("power button: evbug saw KEY_POWER {:.1?} after system_powerdown", key.at - sent);

    // 2. Nothing in the first boot's log blames the machine.
    let first_lines = m.log.lines.len();
    let bad = blamed(&m.log, 0);

    // 7. system_reset boots the kernel again, to init.
    let reset = Instant::now();
    assert_eq!(q.ok("system_reset", Value::Null), json!({}));
    q.wait_event("RESET", EVENT_WAIT);
    let banner2 = m.expect_line_by(BANNER, reset, BOOT);
    let from = m.log.lines.len() - 1;
    m.expect_line_by(RUN_INIT, reset, BOOT);
    let second_boot = reset.elapsed();
    eprintln!("system_reset: `{RUN_INIT}` again {second_boot:.1?} after the reset");
    assert_eq!(banner_text(&banner2), printed, "the second boot's banner");
    assert_booted_from_disk(&m.log, from);
    let bad2 = blamed(&m.log, first_lines);
    assert!(
        bad.is_empty() && bad2.is_empty(),
        "Linux blames the machine:\nfirst boot:\n{}\nafter the reset:\n{}",
        bad.join("\n"),
        bad2.join("\n")
    );

    m.quit(&mut q);
}

#[test]
fn linux_bzimage_boots_on_vmm_core() {
    let k = kernel();
    let dir = TempDir::new("vmm-core-linux-bz");
    let disk = root_disk(&dir);
    let mut m = Machine::start(dir, &k, &k.bzimage, &disk, &[]);
    let banner = m.expect_line_by(BANNER, m.started, BZIMAGE_BOOT);
    let reached = banner.at - m.started;
    m.expect_line_by(RUN_INIT, m.started, BZIMAGE_BOOT);
    let boot = m.started.elapsed();
    eprintln!("bzImage: banner {reached:.1?}, `{RUN_INIT}` {boot:.1?} after launch");
    assert!(banner.text.contains(&k.kver), "banner {:?} is not kernel {}", banner.text, k.kver);
    assert_booted_from_disk(&m.log, 0);
    let mut q = m.qmp();
    m.quit(&mut q);
}
