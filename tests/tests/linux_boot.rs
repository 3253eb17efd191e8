//! Linux on vmm-core, through the `flotilla` launcher, with the Linux guest kit
//! (`tests/kit/build-linux-kit.sh`: Debian's generic kernel and a busybox initramfs whose /init
//! prints `FLOTILLA-LINUX-READY` and runs a shell on ttyS0).
//!
//! - `linux_boots_on_hardware_kvm` boots it to its shell and asks it what it sees. It needs
//!   hardware KVM (`kvm_intel`/`kvm_amd`). On `kvm_pvm` (the development and CI machines: nested
//!   KVM with software shadow paging, whose instruction emulator cannot get a stock kernel
//!   through boot; see DESIGN.md, "Guests, and how each part is proven") it prints one line,
//!   `skipped: kvm_pvm (...)`, and passes: a Rust test cannot mark itself skipped at run time.
//! - `debian_bzimage_is_accepted_and_loaded_by_vmm_core` runs everywhere: flotilla accepts the
//!   Debian bzImage and initrd, and vmm-core loads them and builds the machine, held in
//!   `prelaunch` with `-S` (no guest instruction runs). It does not show that the kernel runs.
//!
//! The kit needs Debian's mirrors the first time (`apt-get download`); it is cached in
//! `~/.cache/flotilla/kit` (or `FLOTILLA_KIT_DIR`) and its build is bounded by `KIT_TIMEOUT`.

use flotilla_tests::console::Console;
use flotilla_tests::machine::TempDir;
use flotilla_tests::process::{
    alive, binaries, describe, processes_mentioning, signal, vmm_core_child, wait_gone, wait_timeout, Collector, Reaper,
};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Building the kit: downloads (~100 MB of .debs) on a cold cache, seconds when cached.
const KIT_TIMEOUT: Duration = Duration::from_secs(600);
/// Kernel start to /init's marker (QEMU TCG takes ~3 s here; hardware KVM less than that).
const LINUX_BOOT: Duration = Duration::from_secs(120);
const REPLY: Duration = Duration::from_secs(20);

/// The line printed where Linux cannot be booted here.
const SKIP_PVM: &str = "skipped: kvm_pvm (this host's KVM cannot boot a stock Linux kernel; see DESIGN.md)";

/// `FLOTILLA_ASSUME_HARDWARE_KVM=1` runs the Linux boot whatever modules are loaded (for hosts
/// whose KVM module has another name; also, with `FLOTILLA_BIN_DIR` pointing at a `flotilla`
/// that wraps `qemu-system-x86_64 -accel tcg "$@"`, it checks this test itself against QEMU).
const ASSUME_HARDWARE_ENV: &str = "FLOTILLA_ASSUME_HARDWARE_KVM";

/// Which KVM this host has, from the loaded modules.
#[derive(Debug, PartialEq, Eq)]
enum HostKvm {
    /// kvm_intel or kvm_amd: boots stock Linux.
    Hardware,
    /// kvm_pvm: runs the test guest, not a stock kernel. Checked first: where kvm_pvm is
    /// loaded, /dev/kvm may be it even if a hardware module is loaded as well.
    Pvm,
    /// Neither (no KVM at all, or a kind this test does not know).
    Other,
}

fn host_kvm() -> HostKvm {
    if std::env::var_os(ASSUME_HARDWARE_ENV).is_some_and(|v| v == "1") {
        return HostKvm::Hardware;
    }
    let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
    if loaded("kvm_pvm") {
        HostKvm::Pvm
    } else if loaded("kvm_intel") || loaded("kvm_amd") {
        HostKvm::Hardware
    } else {
        HostKvm::Other
    }
}

/// Prints a skip line past the test harness's output capture, so it shows in a plain
/// `cargo test` run.
fn say_skipped(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

struct Kit {
    kernel: PathBuf,
    initrd: PathBuf,
    kver: String,
}

/// Runs `tests/kit/build-linux-kit.sh` (bounded) and reads its KERNEL=/INITRD=/KVER= lines.
fn build_kit() -> Kit {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kit/build-linux-kit.sh");
    let started = Instant::now();
    let mut child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout can end apt-get and friends with it.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let mut out = Collector::new(child.stdout.take().expect("stdout"));
    let mut err = Collector::new(child.stderr.take().expect("stderr"));
    let Some(status) = wait_timeout(&mut child, KIT_TIMEOUT) else {
        // SAFETY: kill(2) on the process group we created above.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        panic!("{} did not finish within {KIT_TIMEOUT:?}:\n{}", script.display(), err.take());
    };
    let (out, err) = (out.take(), err.take());
    assert!(status.success(), "{} failed ({}):\n{err}", script.display(), describe(status));
    let get = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{} printed no {key} line:\n{out}", script.display()))
    };
    let kit = Kit { kernel: get("KERNEL=").into(), initrd: get("INITRD=").into(), kver: get("KVER=") };
    assert!(kit.kernel.is_file() && kit.initrd.is_file(), "kit files missing: {out}");
    eprintln!("linux kit {} ready in {:.1?}", kit.kver, started.elapsed());
    kit
}

/// The last number on a console reply such as `NPROC=2`.
fn value(line: &str) -> u64 {
    line.rsplit('=').next().and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no number in {line:?}"))
}

#[test]
fn linux_boots_on_hardware_kvm() {
    match host_kvm() {
        HostKvm::Hardware => {}
        HostKvm::Pvm => return say_skipped(SKIP_PVM),
        HostKvm::Other => {
            return say_skipped("skipped: no hardware KVM (neither kvm_intel nor kvm_amd is loaded; see DESIGN.md)")
        }
    }
    let kit = build_kit();
    let dir = TempDir::new("linux-boot");
    let sock = dir.path("serial.sock");
    let serial = format!("unix:{},server=on,wait=on", sock.display());
    let marker = dir.0.display().to_string();
    let started = Instant::now();
    let mut child = Command::new(&binaries().flotilla)
        .env("FLOTILLA_VMM_CORE", &binaries().vmm_core)
        .args(["-m", "512", "-smp", "2", "-name", &marker])
        .arg("-kernel")
        .arg(&kit.kernel)
        .arg("-initrd")
        .arg(&kit.initrd)
        .args(["-append", "console=ttyS0 panic=-1", "-serial", &serial, "-display", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning flotilla");
    let mut stderr = Collector::new(child.stderr.take().expect("stderr"));
    let mut reaper = Reaper::new(child, &marker);
    // On failure: end the VM first, then show what flotilla/vmm-core said on stderr.
    let mut fail = |what: String| -> ! {
        let _ = reaper.child().kill();
        let _ = reaper.child().wait();
        panic!("{what}\nflotilla's stderr:\n{}", stderr.take());
    };
    let mut con = match Console::connect(&sock, Duration::from_secs(30)) {
        Ok(c) => c,
        Err(e) => fail(e.to_string()),
    };
    if let Err(e) = con.expect("FLOTILLA-LINUX-READY", LINUX_BOOT) {
        fail(format!("Linux did not reach /init: {e}"));
    }
    let boot_time = started.elapsed();
    // The shell starts after the marker and busybox's line editor may drop what was typed
    // before it: ask until it answers (each answer line starts with the word asked for; the
    // echo of the typed line does not).
    let deadline = Instant::now() + REPLY;
    let nproc = loop {
        match con.command("echo NPROC=$(grep -c ^processor /proc/cpuinfo)", "NPROC=", Duration::from_secs(2)) {
            Ok(l) => break value(&l),
            Err(e) if Instant::now() >= deadline => fail(format!("the guest shell does not answer: {e}")),
            Err(_) => {}
        }
    };
    // The kernel saw our machine: both vCPUs (MADT + INIT/SIPI), the RAM from the e820 map.
    assert_eq!(nproc, 2, "guest sees {nproc} CPUs; console:\n{:#?}", con.history);
    let mem_kb = value(
        &con.command("echo MEMKB=$(awk '/^MemTotal/ {print $2}' /proc/meminfo)", "MEMKB=", REPLY).expect("meminfo"),
    );
    assert!((400_000..=524_288).contains(&mem_kb), "MemTotal {mem_kb} kB for -m 512");
    let kver = con.command("echo KVER=$(uname -r)", "KVER=", REPLY).expect("uname");
    assert_eq!(kver, format!("KVER={}", kit.kver));
    let cmdline = con.command("echo CMDLINE=$(cat /proc/cmdline)", "CMDLINE=", REPLY).expect("cmdline");
    assert!(cmdline.contains("console=ttyS0 panic=-1"), "{cmdline}");
    // ACPI power-off (S5 from the DSDT's \_S5) ends the VM: flotilla exits 0.
    con.send("poweroff -f").expect("poweroff");
    let status = wait_timeout(reaper.child(), Duration::from_secs(30)).expect("flotilla exits after poweroff");
    assert_eq!(status.code(), Some(0), "{}; stderr:\n{}", describe(status), stderr.take());
    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(!sock.exists());
    eprintln!("Linux {} reached /init in {boot_time:.1?} ({})", kit.kver, binaries().flotilla.display());
}

/// What this proves, on any KVM (kvm_pvm included): the launcher accepts Debian's bzImage and
/// initrd (its pre-flight checks), and vmm-core's bzImage loader takes the real kernel: setup
/// header parsed, kernel, initrd and command line placed in 512 MiB of guest RAM, boot
/// registers set, the machine built (vmm-core logs `machine built`, which comes after loading)
/// and then held in `prelaunch` by `-S`, alive for 2 s, then ended cleanly by SIGTERM. A loader
/// error would end vmm-core at once with exit code 1 (as `launcher.rs` shows for non-kernels).
/// It does NOT show that the kernel boots: with `-S` no guest instruction runs.
#[test]
fn debian_bzimage_is_accepted_and_loaded_by_vmm_core() {
    let kit = build_kit();
    let dir = TempDir::new("linux-load");
    let sock = dir.path("serial.sock");
    let serial = format!("unix:{},server=on,wait=off", sock.display());
    let marker = dir.0.display().to_string();
    let mut child = Command::new(&binaries().flotilla)
        .env("FLOTILLA_VMM_CORE", &binaries().vmm_core)
        .env("RUST_LOG", "vmm_core=info")
        .env("NO_COLOR", "1")
        .args(["-m", "512", "-smp", "2", "-name", &marker, "-S"])
        .arg("-kernel")
        .arg(&kit.kernel)
        .arg("-initrd")
        .arg(&kit.initrd)
        .args(["-append", "console=ttyS0 panic=-1", "-serial", &serial, "-display", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning flotilla");
    let mut stderr = Collector::new(child.stderr.take().expect("stderr"));
    let pid = child.id() as i32;
    let mut reaper = Reaper::new(child, &marker);
    let core = vmm_core_child(pid, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    if let Some(status) = reaper.child().try_wait().expect("try_wait") {
        panic!("flotilla ended within 2 s ({}):\n{}", describe(status), stderr.take());
    }
    let core = core.expect("flotilla runs vmm-core");
    assert!(alive(core), "vmm-core {core} ended");
    assert!(sock.exists(), "the machine's serial socket exists while it runs");
    signal(pid, libc::SIGTERM);
    let status = wait_timeout(reaper.child(), Duration::from_secs(15)).expect("flotilla exits on SIGTERM");
    let err = stderr.take();
    assert_eq!(status.code(), Some(0), "{}; stderr:\n{err}", describe(status));
    assert!(err.contains("machine built"), "vmm-core never finished building the machine; stderr:\n{err}");
    for bad in ["error", "ERROR", "panicked", "not a kernel image"] {
        assert!(!err.contains(bad), "stderr mentions {bad:?}:\n{err}");
    }
    assert!(wait_gone(core, Duration::from_secs(2)), "vmm-core outlived flotilla");
    assert!(processes_mentioning(&marker).is_empty());
    assert!(!sock.exists(), "socket left behind");
}
