//! The `flotilla` launcher end to end, through the real executables: `flotilla` parses QEMU's
//! options and runs `vmm-core --config-json ...`, which boots the freestanding test guest under
//! KVM. What a caller of `qemu-system-x86_64` relies on is checked from outside, as such a
//! caller sees it: the serial console, the exit status, signals, `-pidfile`, `-daemonize`, error
//! messages on stderr with exit code 1, and that nothing is left running or lying around
//! (no vmm-core or dbus-daemon process, no socket file, no pid file, no runtime directory)
//! afterwards. Each test puts the launcher's runtime directory (`XDG_RUNTIME_DIR`) in its
//! scratch directory, so the private bus's dbus-daemon is found by the same marker.
//!
//! The binaries are built next to this test executable (`flotilla_tests::process::binaries`:
//! one `cargo build -p flotilla -p vmm-core` per test process, or `FLOTILLA_BIN_DIR`).
//! Every wait is bounded; a failing test kills what it started (`Reaper`).

use flotilla_tests::console::{field, Console};
use flotilla_tests::guest::guest_elf;
use flotilla_tests::machine::TempDir;
use flotilla_tests::process::{
    alive, binaries, describe, processes_mentioning, signal, vmm_core_child, wait_gone, wait_timeout, Collector, Reaper,
};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(30);
const REPLY: Duration = Duration::from_secs(10);
/// How long the launcher may take to exit after the guest powered off or a signal.
const EXIT: Duration = Duration::from_secs(15);

fn flotilla() -> Command {
    let mut c = Command::new(&binaries().flotilla);
    // The launcher would find vmm-core next to itself anyway; be explicit.
    c.env("FLOTILLA_VMM_CORE", &binaries().vmm_core).env_remove("RUST_LOG");
    c
}

fn elf() -> String {
    guest_elf().display().to_string()
}

/// A VM started through flotilla with COM1 on a unix socket in its scratch directory.
struct Launched {
    reaper: Reaper,
    stderr: Collector,
    sock: PathBuf,
    dir: TempDir,
}

impl Launched {
    /// `flotilla -m 128 -smp 2 -kernel ELF -serial unix:SOCK,server=on,wait=on -display none
    /// EXTRA...`: vmm-core waits for our connection before the guest runs, so no output is lost.
    fn start(tag: &str, extra: &[&str]) -> Launched {
        Launched::start_env(tag, &[], extra)
    }

    /// [`Launched::start`] with extra environment variables for flotilla.
    fn start_env(tag: &str, env: &[(&str, &str)], extra: &[&str]) -> Launched {
        let dir = TempDir::new(tag);
        let sock = dir.path("serial.sock");
        let serial = format!("unix:{},server=on,wait=on", sock.display());
        let mut cmd = flotilla();
        cmd.env("XDG_RUNTIME_DIR", &dir.0).envs(env.iter().copied());
        cmd.args(["-m", "128", "-smp", "2", "-kernel", &elf(), "-serial", &serial, "-display", "none"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning flotilla");
        let stderr = Collector::new(child.stderr.take().expect("stderr"));
        let marker = dir.0.display().to_string();
        Launched { reaper: Reaper::new(child, &marker), stderr, sock, dir }
    }

    fn pid(&self) -> i32 {
        self.reaper.pid()
    }

    fn marker(&self) -> &str {
        &self.reaper.marker
    }

    /// Connects to the serial socket and waits for the boot report's READY.
    fn console(&self) -> Console {
        let mut c = Console::connect(&self.sock, BOOT).unwrap_or_else(|e| panic!("{e}"));
        c.expect("READY", BOOT).unwrap_or_else(|e| panic!("{e}"));
        c
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match wait_timeout(self.reaper.child(), timeout) {
            Some(s) => s,
            None => panic!("flotilla still running after {timeout:?}; stderr so far is not available"),
        }
    }

    /// After flotilla has exited: nothing of the VM may be left.
    fn assert_cleaned_up(&self, vmm_core: Option<i32>) {
        if let Some(pid) = vmm_core {
            assert!(wait_gone(pid, Duration::from_secs(2)), "vmm-core (pid {pid}) outlived flotilla");
        }
        let left = processes_mentioning(self.marker());
        assert!(left.is_empty(), "processes left running: {left:?}");
        assert!(!self.sock.exists(), "serial socket {} was not removed", self.sock.display());
        assert!(!self.dir.path("flotilla").exists(), "the runtime directory was not removed");
    }
}

fn report_line<'a>(history: &'a [String], prefix: &str) -> &'a str {
    history.iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} line in {history:#?}"))
}

#[test]
fn boots_the_test_guest_and_guest_poweroff_ends_flotilla_with_0() {
    let t0 = Instant::now();
    let mut vm = Launched::start("launch-poweroff", &[]);
    let mut con = vm.console();
    let booted = t0.elapsed();
    let cpus = report_line(&con.history, "CPUS ").to_string();
    assert_eq!(field(&cpus, "madt"), Some("2"), "{cpus}");
    assert_eq!(field(&cpus, "online"), Some("2"), "{cpus}");
    let mem = report_line(&con.history, "MEM ").to_string();
    let total: u64 = field(&mem, "total").and_then(|v| v.parse().ok()).expect("MEM total");
    // -m 128 less the 384 KiB legacy hole below 1 MiB.
    assert_eq!(total, (128 << 20) - (0x10_0000 - 0x9_fc00), "{mem}");
    con.command("ping", "PONG", REPLY).expect("ping");
    assert_eq!(con.command("cpus", "CPUS", REPLY).expect("cpus"), "CPUS madt=2 online=2");

    let core = vmm_core_child(vm.pid(), Duration::from_secs(5)).expect("flotilla has a vmm-core child");
    assert!(alive(core));
    con.command("poweroff", "POWEROFF", REPLY).expect("poweroff");
    let status = vm.wait_exit(EXIT);
    let stderr = vm.stderr.take();
    assert_eq!(status.code(), Some(0), "flotilla ended with {}; stderr:\n{stderr}", describe(status));
    vm.assert_cleaned_up(Some(core));
    eprintln!("boot to READY through flotilla: {booted:?}; whole test {:?}", t0.elapsed());
}

#[test]
fn sigterm_to_flotilla_ends_both_processes_and_removes_the_socket() {
    let mut vm = Launched::start("launch-sigterm", &[]);
    let mut con = vm.console();
    con.command("ping", "PONG", REPLY).expect("ping");
    let core = vmm_core_child(vm.pid(), Duration::from_secs(5)).expect("vmm-core child");
    assert!(vm.sock.exists());
    signal(vm.pid(), libc::SIGTERM);
    let status = vm.wait_exit(EXIT);
    let stderr = vm.stderr.take();
    // QEMU exits 0 after "terminating on signal"; so does flotilla.
    assert_eq!(status.code(), Some(0), "flotilla ended with {}; stderr:\n{stderr}", describe(status));
    assert!(stderr.contains("terminating on signal"), "stderr:\n{stderr}");
    vm.assert_cleaned_up(Some(core));
}

#[test]
fn no_shutdown_keeps_the_process_after_guest_poweroff() {
    let mut vm = Launched::start("launch-noshutdown", &["-no-shutdown"]);
    let mut con = vm.console();
    let core = vmm_core_child(vm.pid(), Duration::from_secs(5)).expect("vmm-core child");
    con.command("poweroff", "POWEROFF", REPLY).expect("poweroff");
    // The guest prints `ERR poweroff` when it is still running a second after writing S5: no
    // such line means its CPUs stopped, while both processes stay (QEMU: run state shutdown).
    let after = con.drain_for(Duration::from_millis(1500));
    assert!(after.iter().all(|l| !l.starts_with("ERR")), "guest kept running after S5: {after:?}");
    assert!(
        vm.reaper.child().try_wait().expect("try_wait").is_none(),
        "flotilla exited after the guest's poweroff despite -no-shutdown"
    );
    assert!(alive(core), "vmm-core exited despite -no-shutdown");
    assert!(vm.sock.exists());
    signal(vm.pid(), libc::SIGTERM);
    let status = vm.wait_exit(EXIT);
    let stderr = vm.stderr.take();
    assert_eq!(status.code(), Some(0), "flotilla ended with {}; stderr:\n{stderr}", describe(status));
    vm.assert_cleaned_up(Some(core));
}

#[test]
fn pidfile_holds_the_launcher_pid_and_is_removed_on_exit() {
    let pidfile_dir = TempDir::new("launch-pidfile-dir");
    let pidfile = pidfile_dir.path("vm.pid");
    let mut vm = Launched::start("launch-pidfile", &["-pidfile", pidfile.to_str().expect("utf-8")]);
    let mut con = vm.console();
    let text = std::fs::read_to_string(&pidfile).expect("pid file exists while the VM runs");
    assert_eq!(text, format!("{}\n", vm.pid()));
    con.command("poweroff", "POWEROFF", REPLY).expect("poweroff");
    let status = vm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{}; stderr:\n{}", describe(status), vm.stderr.take());
    assert!(!pidfile.exists(), "pid file {} left behind", pidfile.display());
    vm.assert_cleaned_up(None);
}

/// Sends `ping` until PONG comes back: a `wait=off` socket drops what the guest said before we
/// connected, and a line sent before the guest listens may be lost.
fn ping_until_pong(con: &mut Console, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match con.command("ping", "PONG", Duration::from_millis(500)) {
            Ok(_) => return,
            Err(e) if Instant::now() >= deadline => panic!("no PONG within {timeout:?}: {e}"),
            Err(_) => {}
        }
    }
}

#[test]
fn daemonize_returns_and_the_vm_keeps_running_until_killed_via_the_pidfile() {
    let dir = TempDir::new("launch-daemon");
    let sock = dir.path("serial.sock");
    let pidfile = dir.path("vm.pid");
    let serial = format!("unix:{},server=on,wait=off", sock.display());
    let marker = dir.0.display().to_string();
    let mut child = flotilla()
        .env("XDG_RUNTIME_DIR", &dir.0)
        .args(["-m", "128", "-smp", "2", "-kernel", &elf(), "-serial", &serial, "-display", "none"])
        .args(["-daemonize", "-pidfile", pidfile.to_str().expect("utf-8")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning flotilla");
    let mut stderr = Collector::new(child.stderr.take().expect("stderr"));
    let caller_pid = child.id() as i32;
    let mut reaper = Reaper::new(child, &marker);
    let status = wait_timeout(reaper.child(), BOOT).expect("-daemonize returns to its caller");
    assert_eq!(status.code(), Some(0), "{}; stderr:\n{}", describe(status), stderr.take());

    let daemon: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file written by the daemon")
        .trim()
        .parse()
        .expect("pid file holds a pid");
    reaper.extra.push(daemon);
    assert_ne!(daemon, caller_pid, "the daemon is a new process");
    assert!(alive(daemon), "daemon {daemon} is not running");
    let core = vmm_core_child(daemon, Duration::from_secs(5)).expect("the daemon supervises vmm-core");

    let mut con = Console::connect(&sock, BOOT).unwrap_or_else(|e| panic!("{e}"));
    ping_until_pong(&mut con, BOOT);
    assert_eq!(con.command("cpus", "CPUS", REPLY).expect("cpus"), "CPUS madt=2 online=2");

    signal(daemon, libc::SIGTERM);
    assert!(wait_gone(daemon, EXIT), "daemon {daemon} survived SIGTERM");
    assert!(wait_gone(core, Duration::from_secs(2)), "vmm-core {core} outlived the daemon");
    assert!(!pidfile.exists(), "pid file left behind");
    assert!(!sock.exists(), "serial socket left behind");
    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "processes left running: {left:?}");
    assert!(!dir.path("flotilla").exists(), "the runtime directory was not removed");
}

#[test]
fn nographic_puts_the_serial_console_on_stdio() {
    let dir = TempDir::new("launch-nographic");
    let marker = dir.0.display().to_string();
    // The marker only has to reach vmm-core's command line (the config JSON): use it as -name.
    let mut child = flotilla()
        .env("XDG_RUNTIME_DIR", &dir.0)
        .args(["-m", "128", "-smp", "2", "-kernel", &elf(), "-nographic", "-name", &marker])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning flotilla");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = Collector::new(child.stderr.take().expect("stderr"));
    let mut reaper = Reaper::new(child, &marker);
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut expect = |rx: &Receiver<String>, prefix: &str| -> String {
        let deadline = Instant::now() + BOOT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(e) => panic!("no '{prefix}' on stdout ({e}); got {seen:#?}"),
            }
        }
    };
    let banner = expect(&rx, "FLOTILLA-GUEST v1");
    assert_eq!(banner, "FLOTILLA-GUEST v1 boot=1");
    expect(&rx, "READY");
    stdin.write_all(b"ping\n").expect("write ping");
    expect(&rx, "PONG");
    stdin.write_all(b"poweroff\n").expect("write poweroff");
    expect(&rx, "POWEROFF");
    let status = wait_timeout(reaper.child(), EXIT).expect("flotilla exits after poweroff");
    assert_eq!(status.code(), Some(0), "{}; stderr:\n{}", describe(status), stderr.take());
    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "processes left running: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Bad input: a clear message on stderr, exit code 1, nothing left running or lying around.
// ---------------------------------------------------------------------------------------------

/// Runs `flotilla ARGS -serial unix:SOCK,server=on,wait=off -display none` and checks that it
/// fails the way QEMU does: exit code 1, stderr naming the problem (every one of `want`), and
/// no vmm-core process or socket file left. Returns stderr.
fn refused(tag: &str, args: &[&str], want: &[&str]) -> String {
    refused_in(TempDir::new(tag), args, want)
}

fn refused_in(dir: TempDir, args: &[&str], want: &[&str]) -> String {
    refused_env(dir, &[], args, want)
}

/// [`refused_in`] with extra environment variables for flotilla.
fn refused_env(dir: TempDir, env: &[(&str, &str)], args: &[&str], want: &[&str]) -> String {
    let sock = dir.path("serial.sock");
    let serial = format!("unix:{},server=on,wait=off", sock.display());
    let marker = dir.0.display().to_string();
    let mut child = flotilla()
        .env("XDG_RUNTIME_DIR", &dir.0)
        .envs(env.iter().copied())
        .args(args)
        .args(["-serial", &serial, "-display", "none", "-name", &marker])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning flotilla");
    let mut stderr = Collector::new(child.stderr.take().expect("stderr"));
    let mut stdout = Collector::new(child.stdout.take().expect("stdout"));
    let pid = child.id() as i32;
    let mut reaper = Reaper::new(child, &marker);
    let status = wait_timeout(reaper.child(), BOOT).unwrap_or_else(|| {
        panic!(
            "flotilla {args:?} still running after {BOOT:?} (children: {:?})",
            flotilla_tests::process::children(pid)
        )
    });
    let err = stderr.take();
    let out = stdout.take();
    assert_eq!(status.code(), Some(1), "flotilla {args:?}: {}, want exit 1; stderr:\n{err}", describe(status));
    let first = err.lines().next().unwrap_or("");
    assert!(
        ["flotilla: ", "vmm-core: ", "blockd: ", "balloond: "].iter().any(|p| first.starts_with(p)),
        "flotilla {args:?}: the message should say who failed; stderr:\n{err}"
    );
    for w in want {
        assert!(err.contains(w), "flotilla {args:?}: stderr lacks {w:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "flotilla {args:?} panicked:\n{err}");
    assert!(out.is_empty(), "flotilla {args:?} wrote to stdout: {out:?}");
    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "flotilla {args:?} left processes running: {left:?}");
    assert!(!sock.exists(), "flotilla {args:?} left the socket {}", sock.display());
    assert!(!dir.path("flotilla").exists(), "flotilla {args:?} left its runtime directory");
    err
}

#[test]
fn refuses_a_kernel_that_is_a_text_file() {
    let dir = TempDir::new("bad-kernel-text");
    let k = dir.path("hostname");
    std::fs::write(&k, "flotilla-host\n").expect("write");
    let k = k.display().to_string();
    refused_in(dir, &["-kernel", &k], &["is not a kernel image", &k]);
}

#[test]
fn refuses_a_kernel_of_random_bytes() {
    let dir = TempDir::new("bad-kernel-random");
    let k = dir.path("random.bin");
    // Reproducible "random" bytes (xorshift), 64 KiB.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&k, bytes).expect("write");
    let k = k.display().to_string();
    refused_in(dir, &["-kernel", &k], &["is not a kernel image", &k]);
}

#[test]
fn refuses_a_missing_kernel_file() {
    let dir = TempDir::new("bad-kernel-missing");
    let k = dir.path("no-such-vmlinuz").display().to_string();
    refused_in(dir, &["-kernel", &k], &["could not open kernel file", &k, "No such file"]);
}

#[test]
fn refuses_an_initrd_larger_than_guest_ram() {
    let dir = TempDir::new("bad-initrd");
    let initrd = dir.path("big.img");
    // Sparse: 512 MiB that take no disk space.
    std::fs::File::create(&initrd).and_then(|f| f.set_len(512 << 20)).expect("sparse initrd");
    let initrd = initrd.display().to_string();
    refused_in(
        dir,
        &["-m", "64", "-kernel", &elf(), "-initrd", &initrd],
        &["initrd", &initrd, "does not fit in guest RAM"],
    );
}

#[test]
fn refuses_more_memory_than_the_host_has() {
    refused(
        "bad-mem-host",
        &["-m", "100T", "-kernel", &elf()],
        &["cannot set up", "MiB of guest RAM", "the host has only"],
    );
}

#[test]
fn refuses_zero_cpus() {
    refused("bad-smp", &["-smp", "0", "-kernel", &elf()], &["-smp 0:", "must be greater than zero"]);
}

#[test]
fn refuses_an_unknown_option() {
    refused("bad-option", &["-kernel", &elf(), "-frobnicate"], &["-frobnicate: invalid option"]);
}

#[test]
fn refuses_a_malformed_memory_size() {
    refused("bad-mem-syntax", &["-m", "12X", "-kernel", &elf()], &["-m 12X:", "Parameter 'size'"]);
}

/// The cleanup checks above look for processes whose command line mentions the test's scratch
/// directory; this makes sure that finds a running vmm-core at all (so "none left" means
/// something).
#[test]
fn leftover_check_finds_a_running_vmm_core() {
    let vm = Launched::start("launch-marker", &["-S"]);
    let _con = Console::connect(&vm.sock, BOOT).unwrap_or_else(|e| panic!("{e}"));
    let core = vmm_core_child(vm.pid(), BOOT).expect("vmm-core child");
    let found = processes_mentioning(vm.marker());
    assert!(found.iter().any(|(p, _)| *p == core), "vmm-core {core} not found by marker: {found:?}");
    assert!(found.iter().any(|(p, _)| *p == vm.pid()), "flotilla not found by marker: {found:?}");
    assert!(found.iter().any(|(_, c)| c.contains("dbus-daemon")), "the private bus not found by marker: {found:?}");
    assert!(vm.dir.0.is_dir());
}

// ---------------------------------------------------------------------------------------------
// -drive and -device: blockd (and balloond) started, supervised and cleaned up by the launcher.
// ---------------------------------------------------------------------------------------------

/// The arguments of `pid`, split as the kernel keeps them.
fn argv(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut v: Vec<String> = raw.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    if v.last().is_some_and(|a| a.is_empty()) {
        v.pop();
    }
    v
}

/// The child of `flotilla_pid` running `name` (by its executable's file name), other than
/// `not`, waiting up to `timeout`.
fn daemon_child(flotilla_pid: i32, name: &str, not: Option<i32>, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = flotilla_tests::process::children(flotilla_pid).into_iter().find(|&c| {
            Some(c) != not
                && std::fs::read_link(format!("/proc/{c}/exe"))
                    .ok()
                    .is_some_and(|e| e.file_name().is_some_and(|n| n.to_string_lossy() == name))
        });
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn is_socket(p: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Waits (bounded) until `p` is a listening socket again.
fn wait_socket(p: &std::path::Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if is_socket(p) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The value after `flag` in `args`.
fn arg_after<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args.get(i + 1).map(String::as_str).unwrap_or_else(|| panic!("{flag} without a value in {args:?}"))
}

#[test]
fn drive_starts_blockd_which_is_restarted_after_sigkill_and_cleaned_up() {
    let t0 = Instant::now();
    let img_dir = TempDir::new("launch-drive-img");
    let img = img_dir.path("disk.img");
    std::fs::File::create(&img).and_then(|f| f.set_len(8 << 20)).expect("raw image");
    let drive = format!("file={},if=virtio", img.display());
    let blockd_bin = binaries().blockd.display().to_string();
    let mut vm = Launched::start_env("launch-drive", &[("FLOTILLA_BLOCKD", &blockd_bin)], &["-drive", &drive]);
    let mut con = vm.console();
    con.command("ping", "PONG", REPLY).expect("ping");
    let booted = t0.elapsed();

    let flotilla_pid = vm.pid();
    let blockd =
        daemon_child(flotilla_pid, "blockd", None, Duration::from_secs(5)).expect("flotilla has a blockd child");
    let args = argv(blockd);
    assert_eq!(args[0], blockd_bin, "{args:?}");
    assert_eq!(args[1], "--config-json", "{args:?}");
    let cfg = vm_config::BlockdConfig::from_json(&args[2]).expect("blockd's --config-json is a BlockdConfig");
    let instance = format!("vm{flotilla_pid}");
    let runtime = vm.dir.path("flotilla").join(format!("{instance}-{flotilla_pid}"));
    let socket = runtime.join("vhost-user").join("virtio0.sock");
    assert_eq!(
        cfg,
        vm_config::BlockdConfig {
            drives: vec![vm_config::DriveConfig {
                id: "virtio0".into(),
                file: img.clone(),
                format: vm_config::DriveFormat::Raw,
                readonly: false,
                cache: vm_config::CacheMode::Writeback,
                werror: vm_config::ErrorAction::Enospc,
                rerror: vm_config::ErrorAction::Report,
                serial: None,
                socket: Some(socket.clone()),
                num_queues: 1,
            }],
            state_file: Some(runtime.join("blockd-state.json")),
        }
    );
    assert!(arg_after(&args, "--dbus-address").starts_with(&format!("unix:path={}/bus", runtime.display())));
    assert_eq!(arg_after(&args, "--instance"), instance);
    let fd: i32 = arg_after(&args, "--ready-fd").parse().expect("--ready-fd N");
    assert!(fd > 2);
    assert_eq!(args.len(), 9, "{args:?}");
    assert!(is_socket(&socket), "blockd's vhost-user socket {} is missing", socket.display());

    // vmm-core is told about the same socket.
    let core = vmm_core_child(flotilla_pid, Duration::from_secs(5)).expect("vmm-core child");
    let machine = vm_config::MachineConfig::from_json(arg_after(&argv(core), "--config-json")).expect("machine json");
    assert_eq!(
        machine.vhost_user_devices,
        [vm_config::VhostUserDevice {
            id: String::new(),
            kind: vm_config::VirtioKind::Block,
            socket: socket.clone(),
            num_queues: 1,
            queue_size: 256,
            pci_slot: None,
            msix_vectors: None,
        }]
    );

    // SIGKILL: a new blockd with the same arguments (but its own --ready-fd), the socket back,
    // and the guest never stops answering.
    let killed_at = Instant::now();
    signal(blockd, libc::SIGKILL);
    let again = daemon_child(flotilla_pid, "blockd", Some(blockd), Duration::from_secs(10))
        .unwrap_or_else(|| panic!("blockd was not restarted; stderr:\n{}", vm.stderr.take()));
    assert_ne!(again, blockd);
    assert!(wait_socket(&socket, Duration::from_secs(10)), "the socket did not come back");
    let restarted = killed_at.elapsed();
    let new_args = argv(again);
    assert_eq!(new_args[..7], args[..7], "restarted with the same arguments");
    con.command("ping", "PONG", REPLY).expect("the guest answers after blockd's restart");
    assert!(alive(core), "vmm-core survived blockd's death");

    con.command("poweroff", "POWEROFF", REPLY).expect("poweroff");
    let status = vm.wait_exit(EXIT);
    let stderr = vm.stderr.take();
    assert_eq!(status.code(), Some(0), "flotilla ended with {}; stderr:\n{stderr}", describe(status));
    assert!(
        stderr.contains(&format!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.",
            img.display()
        )),
        "QEMU's probing warning is missing; stderr:\n{stderr}"
    );
    assert!(stderr.contains(&format!("blockd (pid {blockd}) exited (signal 9)")), "stderr:\n{stderr}");
    assert!(wait_gone(again, Duration::from_secs(2)), "blockd {again} outlived flotilla");
    assert!(!socket.exists(), "the vhost-user socket was not removed");
    vm.assert_cleaned_up(Some(core));
    assert!(img.exists(), "the image is the user's: never removed");
    eprintln!(
        "boot to READY with blockd: {booted:?}; blockd back {restarted:?} after SIGKILL; whole test {:?}",
        t0.elapsed()
    );
}

#[test]
fn bad_drive_input_exits_1_and_leaves_nothing() {
    let dir = TempDir::new("bad-drive-cache");
    let img = dir.path("d.img");
    std::fs::write(&img, vec![0u8; 65536]).expect("image");
    let d = format!("file={},if=virtio,cache=foo", img.display());
    refused_in(dir, &["-kernel", &elf(), "-drive", &d], &[&format!("-drive {d}: invalid cache option")]);

    let dir = TempDir::new("bad-drive-missing");
    let gone = dir.path("nope.img").display().to_string();
    let d = format!("file={gone},if=virtio,format=raw");
    refused_in(
        dir,
        &["-kernel", &elf(), "-drive", &d],
        &[&format!("-drive {d}: Could not open '{gone}': No such file or directory")],
    );

    let dir = TempDir::new("bad-drive-ide");
    let img = dir.path("d.img");
    std::fs::write(&img, vec![0u8; 65536]).expect("image");
    let d = format!("file={}", img.display());
    refused_in(dir, &["-kernel", &elf(), "-drive", &d], &["if=ide (QEMU's default) is not supported by flotilla"]);

    refused(
        "bad-device-drive",
        &["-kernel", &elf(), "-device", "virtio-blk-pci,drive=nope"],
        &["-device virtio-blk-pci,drive=nope: Property 'virtio-blk-device.drive' can't find value 'nope'"],
    );
}

#[test]
fn a_blockd_that_fails_to_start_fails_the_launch_and_leaves_nothing() {
    let dir = TempDir::new("bad-blockd");
    let img = dir.path("d.img");
    std::fs::write(&img, vec![0u8; 65536]).expect("image");
    let fake = dir.path("blockd");
    std::fs::write(&fake, "#!/bin/sh\necho 'blockd: cannot open the image' >&2\nexit 1\n").expect("fake blockd");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let fake = fake.display().to_string();
    let d = format!("file={},if=virtio,format=raw", img.display());
    let err = refused_env(
        dir,
        &[("FLOTILLA_BLOCKD", &fake)],
        &["-kernel", &elf(), "-drive", &d],
        &["blockd: cannot open the image", "flotilla: blockd exited before it was ready (exit status 1)"],
    );
    assert!(!err.contains("vmm-core"), "vmm-core must not have been started:\n{err}");
}

/// `-device virtio-balloon-pci` (next to a drive): balloond runs beside blockd with the
/// guest's RAM size, its socket exists while the VM runs, a SIGKILLed balloond comes back.
#[test]
fn balloon_device_starts_balloond_with_the_guest_ram_size() {
    let balloond_bin = binaries().balloond.display().to_string();
    let img_dir = TempDir::new("launch-balloon-img");
    let img = img_dir.path("disk.img");
    std::fs::File::create(&img).and_then(|f| f.set_len(8 << 20)).expect("raw image");
    let drive = format!("file={},if=virtio,format=raw", img.display());
    let mut vm = Launched::start_env(
        "launch-balloon",
        &[("FLOTILLA_BALLOOND", &balloond_bin)],
        &["-drive", &drive, "-device", "virtio-balloon-pci,id=balloon0"],
    );
    let mut con = vm.console();
    con.command("ping", "PONG", REPLY).expect("ping");
    let flotilla_pid = vm.pid();
    let pid = daemon_child(flotilla_pid, "balloond", None, Duration::from_secs(5)).expect("a balloond child");
    let args = argv(pid);
    let cfg = vm_config::BalloondConfig::from_json(arg_after(&args, "--config-json")).expect("BalloondConfig");
    let runtime = vm.dir.path("flotilla").join(format!("vm{flotilla_pid}-{flotilla_pid}"));
    let socket = runtime.join("vhost-user").join("balloon.sock");
    assert_eq!(
        cfg,
        vm_config::BalloondConfig {
            id: "balloon0".into(),
            socket: socket.clone(),
            mem_bytes: 128 << 20,
            state_file: Some(runtime.join("balloond-state.json")),
        }
    );
    assert!(is_socket(&socket));
    assert!(daemon_child(flotilla_pid, "blockd", None, Duration::from_secs(5)).is_some(), "blockd runs too");
    signal(pid, libc::SIGKILL);
    let again = daemon_child(flotilla_pid, "balloond", Some(pid), Duration::from_secs(10)).expect("balloond restarted");
    assert!(wait_socket(&socket, Duration::from_secs(10)));
    con.command("ping", "PONG", REPLY).expect("ping after balloond's restart");
    con.command("poweroff", "POWEROFF", REPLY).expect("poweroff");
    let status = vm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{}; stderr:\n{}", describe(status), vm.stderr.take());
    assert!(wait_gone(again, Duration::from_secs(2)));
    assert!(!socket.exists());
    vm.assert_cleaned_up(None);
}

#[test]
fn with_qmp_the_gateway_is_told_about_blockd_and_query_block_reaches_it() {
    use flotilla_tests::qmp::{QmpVm, VmOptions};
    let img_dir = TempDir::new("launch-drive-qmp-img");
    let img = img_dir.path("disk.img");
    std::fs::File::create(&img).and_then(|f| f.set_len(8 << 20)).expect("raw image");
    let drive = format!("file={},if=none,id=data,format=raw", img.display());
    let mut vm = QmpVm::start(
        "launch-drive-qmp",
        &VmOptions {
            name: "drive-qmp",
            qmp: &[true],
            extra: &["-drive", &drive, "-device", "virtio-blk-pci,drive=data,id=vblk0"],
        },
    );
    let mut con = vm.console_ready();
    con.command("ping", "PONG", REPLY).expect("ping");
    let core = vm.vmm_core();
    let gw = vm.gateway(None, BOOT).expect("a qmp-gateway child");
    let args = argv(gw);
    let daemons: Vec<&str> = args.windows(2).filter(|w| w[0] == "--daemon").map(|w| w[1].as_str()).collect();
    assert_eq!(daemons, ["blockd"], "gateway args: {args:?}");
    let mut q = vm.raw(0);
    assert!(q.cmd(r#"{"execute": "qmp_capabilities"}"#).get("return").is_some());
    let r = q.cmd(r#"{"execute": "query-block"}"#);
    let list = r.get("return").and_then(|v| v.as_array()).unwrap_or_else(|| panic!("query-block: {r}"));
    assert!(list.iter().any(|b| b["device"] == "data"), "query-block does not list the drive: {r}");
    assert_eq!(vm.gateway(None, Duration::from_millis(1)), Some(gw), "the gateway was not restarted");
    let socket = vm.dir.path("flotilla").join(format!("drive-qmp-{}", vm.pid())).join("vhost-user").join("data.sock");
    assert!(is_socket(&socket), "{} is missing while the VM runs", socket.display());
    assert!(q.cmd(r#"{"execute": "quit"}"#).get("return").is_some());
    drop(con);
    vm.assert_exits_0_and_cleaned_up(core);
    assert!(!socket.exists(), "{} is left after quit", socket.display());
}

#[test]
fn daemonize_with_a_drive_releases_the_callers_stderr() {
    let dir = TempDir::new("launch-daemon-drive");
    let sock = dir.path("serial.sock");
    let pidfile = dir.path("vm.pid");
    let img = dir.path("disk.img");
    std::fs::File::create(&img).and_then(|f| f.set_len(1 << 20)).expect("raw image");
    let serial = format!("unix:{},server=on,wait=off", sock.display());
    let drive = format!("file={},if=virtio,format=raw", img.display());
    let marker = dir.0.display().to_string();
    let mut child = flotilla()
        .env("XDG_RUNTIME_DIR", &dir.0)
        .args(["-m", "128", "-kernel", &elf(), "-serial", &serial, "-display", "none", "-drive", &drive])
        .args(["-daemonize", "-pidfile", pidfile.to_str().expect("utf-8")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning flotilla");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut reaper = Reaper::new(child, &marker);
    let status = wait_timeout(reaper.child(), BOOT).expect("-daemonize returns to its caller");
    assert_eq!(status.code(), Some(0), "{}", describe(status));
    let daemon: i32 = std::fs::read_to_string(&pidfile).expect("pid file").trim().parse().expect("a pid");
    reaper.extra.push(daemon);
    let blockd = daemon_child(daemon, "blockd", None, Duration::from_secs(5)).expect("the daemon runs blockd");
    // A caller reading our stderr to its end (`$(flotilla -daemonize ... 2>&1)`) must not wait
    // for the VM: neither blockd nor anything else may hold it open.
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        let _ = tx.send(s);
    });
    let err = rx.recv_timeout(Duration::from_secs(5)).expect("the caller's stderr reaches EOF while the VM runs");
    assert!(!err.contains("panicked"), "{err}");
    assert!(alive(blockd));
    signal(daemon, libc::SIGTERM);
    assert!(wait_gone(daemon, EXIT), "daemon {daemon} survived SIGTERM");
    assert!(wait_gone(blockd, Duration::from_secs(2)), "blockd outlived the daemon");
    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "processes left running: {left:?}");
    assert!(!dir.path("flotilla").exists(), "the runtime directory was not removed");
}

#[test]
fn an_external_vhost_user_blk_backend_starts_no_daemon_and_keeps_its_socket() {
    let ext = TempDir::new("launch-ext-backend");
    let path = ext.path("qsd.sock");
    // Stands in for qemu-storage-daemon: the launcher only checks that the socket is there.
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let chardev = format!("socket,id=qsd0,path={}", path.display());
    let mut vm =
        Launched::start("launch-ext", &["-chardev", &chardev, "-device", "vhost-user-blk-pci,chardev=qsd0,id=ext0"]);
    let mut con = vm.console();
    con.command("ping", "PONG", REPLY).expect("ping");
    let core = vmm_core_child(vm.pid(), Duration::from_secs(5)).expect("vmm-core child");
    let machine = vm_config::MachineConfig::from_json(arg_after(&argv(core), "--config-json")).expect("machine json");
    assert_eq!(
        machine.vhost_user_devices,
        [vm_config::VhostUserDevice {
            id: "ext0".into(),
            kind: vm_config::VirtioKind::Block,
            socket: path.clone(),
            num_queues: 1,
            queue_size: 128,
            pci_slot: None,
            msix_vectors: None,
        }]
    );
    assert_eq!(daemon_child(vm.pid(), "blockd", None, Duration::from_millis(200)), None, "no blockd for it");
    con.command("poweroff", "POWEROFF", REPLY).expect("poweroff");
    let status = vm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{}; stderr:\n{}", describe(status), vm.stderr.take());
    vm.assert_cleaned_up(Some(core));
    assert!(is_socket(&path), "the external backend's socket is not the launcher's to remove");

    let dir = TempDir::new("bad-ext-backend");
    let gone = dir.path("none.sock").display().to_string();
    let chardev = format!("socket,id=c,path={gone}");
    refused_in(
        dir,
        &["-kernel", &elf(), "-chardev", &chardev, "-device", "vhost-user-blk-pci,chardev=c"],
        &[&format!("-chardev {chardev}: Failed to connect to '{gone}': No such file or directory")],
    );
}
