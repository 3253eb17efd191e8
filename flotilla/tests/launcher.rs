//! The launcher's process model, against a stand-in vmm-core and qmp-gateway (shell scripts
//! named by FLOTILLA_VMM_CORE and FLOTILLA_QMP_GATEWAY) and the real dbus-daemon: the config
//! and bus handed over, exit codes, signals, -pidfile, -daemonize, the gateway's start after
//! vmm-core's readiness and its restarts, and that nothing is left behind.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vm_config::{ChardevBackend, MachineConfig};

const FAKE: &str = r#"#!/bin/sh
printf '%s\n' "$@" > "$FAKE_DIR/args.tmp" && mv "$FAKE_DIR/args.tmp" "$FAKE_DIR/args"
echo $$ > "$FAKE_DIR/child.pid.tmp" && mv "$FAKE_DIR/child.pid.tmp" "$FAKE_DIR/child.pid"
fd=""; prev=""
for a in "$@"; do [ "$prev" = "--ready-fd" ] && fd="$a"; prev="$a"; done
case "$FAKE_MODE" in
  ready-term) [ -n "$fd" ] && eval "echo ready >&$fd" && eval "exec $fd>&-"
        trap 'echo TERM > "$FAKE_DIR/signal"; exit 0' TERM
        while :; do sleep 0.05; done ;;
  exit3) exit 3 ;;
  mask) grep -E '^Sig(Blk|Ign)' /proc/$$/status > "$FAKE_DIR/mask" ;;
  fail-early) echo "vmm-core: boom" >&2; exit 2 ;;
  selfkill) kill -KILL $$ ;;
  term) trap 'echo TERM > "$FAKE_DIR/signal"; exit 7' TERM
        trap 'echo INT > "$FAKE_DIR/signal"; exit 8' INT
        while :; do sleep 0.05; done ;;
esac
exit 0
"#;

/// A stand-in qmp-gateway: records its arguments and pid per start; `crash` in FAKE_GW makes
/// the first run exit at once with status 3.
const FAKE_GW: &str = r#"#!/bin/sh
n=$(ls "$FAKE_DIR" | grep -c '^gw-args-')
printf '%s\n' "$@" > "$FAKE_DIR/gw.tmp" && mv "$FAKE_DIR/gw.tmp" "$FAKE_DIR/gw-args-$n"
echo $$ > "$FAKE_DIR/gw.tmp" && mv "$FAKE_DIR/gw.tmp" "$FAKE_DIR/gw-pid-$n"
if [ "$FAKE_GW" = crash ] && [ "$n" = 0 ]; then exit 3; fi
trap 'echo TERM > "$FAKE_DIR/gw-signal-$n"; exit 0' TERM
while :; do sleep 0.05; done
"#;

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("flotilla-launcher-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        use std::os::unix::fs::PermissionsExt;
        for (name, text) in [("vmm-core", FAKE), ("qmp-gateway", FAKE_GW)] {
            let fake = dir.join(name);
            std::fs::write(&fake, text).expect("fake");
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        // The instance's runtime directory (and so its bus) goes under here.
        std::fs::create_dir_all(dir.join("run")).expect("run dir");
        Fixture { dir }
    }
    fn path(&self, n: &str) -> PathBuf {
        self.dir.join(n)
    }
    fn cmd(&self, mode: &str, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        c.args(args)
            .env("FLOTILLA_VMM_CORE", self.path("vmm-core"))
            .env("FLOTILLA_QMP_GATEWAY", self.path("qmp-gateway"))
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .env("FAKE_DIR", &self.dir)
            .env("FAKE_MODE", mode)
            .stdin(Stdio::null());
        c
    }
    fn run(&self, mode: &str, args: &[&str]) -> Output {
        self.cmd(mode, args).output().expect("run flotilla")
    }
    fn wait_file(&self, n: &str) -> String {
        // Complete lines only: a pid file may be caught between creation and write.
        wait_for(&format!("{n} to appear"), || std::fs::read_to_string(self.path(n)).ok().filter(|s| s.ends_with('\n')))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn hands_the_machine_to_vmm_core_as_json_and_returns_its_exit_code() {
    let f = Fixture::new("json");
    let o = f.run("exit3", &["-name", "vm1", "-m", "256", "-smp", "2", "-serial", "file:/tmp/x.log", "-S"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let args = f.wait_file("args");
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(args[0], "--config-json");
    assert_eq!(args.len(), 8, "{args:?}");
    // The private bus lives in the instance's runtime directory, named after -name.
    let run = f.path("run").join("flotilla");
    assert_eq!(args[2], "--dbus-address");
    assert!(args[3].starts_with(&format!("unix:path={}/vm1-", run.display())), "{args:?}");
    assert_eq!(&args[4..6], ["--instance", "vm1"]);
    assert_eq!(args[6], "--ready-fd");
    assert!(args[7].parse::<i32>().is_ok_and(|fd| fd > 2), "{args:?}");
    assert!(!run.exists(), "runtime directory removed: {:?}", std::fs::read_dir(&run).map(|d| d.count()));
    let cfg = MachineConfig::from_json(args[1]).expect("valid MachineConfig JSON");
    assert_eq!(cfg.name.as_deref(), Some("vm1"));
    assert_eq!(cfg.mem_bytes, 256 << 20);
    assert_eq!(cfg.cpus, 2);
    assert!(cfg.start_paused);
    assert_eq!(cfg.serial.expect("serial").backend, ChardevBackend::File { path: "/tmp/x.log".into() });

    assert_eq!(f.run("exit0", &[]).status.code(), Some(0));
}

#[test]
fn command_line_errors_exit_1_in_qemu_style() {
    let f = Fixture::new("errors");
    for (args, msg) in [
        (&["-foo"][..], "flotilla: -foo: invalid option\n"),
        (&["-m", "12X"], "flotilla: -m 12X: Parameter 'size' expects a non-negative number below 2^64\n"),
        (&["-smp", "0"], "flotilla: -smp 0: Invalid CPU topology: CPU topology parameters must be greater than zero\n"),
        (&["-monitor", "stdio"], "flotilla: -monitor: option not supported yet\n"),
        (&["-mon", "chardev=c"], "flotilla: -mon: option not supported yet\n"),
        (&["-qmp", "unix:/tmp/q,server"], "flotilla: -qmp unix:/tmp/q,server: -qmp sockets that wait"),
        (&["-accel", "tcg"], "flotilla: -accel tcg: accelerator 'tcg' is not supported by flotilla (only kvm)\n"),
        (
            &["-kernel", "/nonexistent/vmlinuz"],
            "flotilla: could not open kernel file '/nonexistent/vmlinuz': No such file or directory (os error 2)\n",
        ),
    ] {
        let o = f.run("exit0", args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).starts_with(msg), "{args:?}: {}", stderr(&o));
        assert!(!f.path("args").exists(), "{args:?} must not start vmm-core");
    }
    let o = f.cmd("exit0", &[]).env("FLOTILLA_VMM_CORE", f.path("nope")).output().expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot find vmm-core at"), "{}", stderr(&o));
    let qmp = ["-qmp", "tcp::4444,server,nowait"];
    let o = f.cmd("exit0", &qmp).env("FLOTILLA_QMP_GATEWAY", f.path("nope")).output().expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot find qmp-gateway at"), "{}", stderr(&o));
    let o = f.cmd("exit0", &[]).env("FLOTILLA_DBUS_DAEMON", f.path("nope")).output().expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("flotilla: cannot start dbus-daemon"), "{}", stderr(&o));
    assert!(!f.path("args").exists(), "no vmm-core without a bus");
}

#[test]
fn version_and_help_exit_0() {
    let f = Fixture::new("version");
    let o = f.run("exit3", &["-version"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("QEMU emulator version "));
    let o = f.run("exit3", &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("-serial dev"));
    let o = f.run("exit3", &["-machine", "help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("q35"));
}

#[test]
fn sigterm_is_forwarded_and_pidfile_lives_as_long_as_the_launcher() {
    let f = Fixture::new("term");
    let pidfile = f.path("vm.pid");
    let mut child = f.cmd("term", &["-pidfile", pidfile.to_str().expect("utf8")]).spawn().expect("spawn");
    f.wait_file("child.pid");
    let pid = f.wait_file("vm.pid");
    assert_eq!(pid.trim(), child.id().to_string(), "pid file holds the launcher's pid");
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(7), "exit code of vmm-core's TERM handler");
    assert_eq!(std::fs::read_to_string(f.path("signal")).expect("signal file").trim(), "TERM");
    assert!(!pidfile.exists(), "pid file removed on exit");

    std::fs::remove_file(f.path("child.pid")).expect("remove child.pid");
    let mut child = f.cmd("term", &[]).spawn().expect("spawn");
    f.wait_file("child.pid");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().expect("wait").code(), Some(8));
}

#[test]
fn vmm_core_starts_with_no_blocked_signals() {
    let f = Fixture::new("mask");
    assert_eq!(f.run("mask", &[]).status.code(), Some(0));
    let mask = f.wait_file("mask");
    assert!(mask.contains("SigBlk:\t0000000000000000"), "{mask}");
}

#[test]
fn dies_by_the_signal_that_killed_vmm_core() {
    use std::os::unix::process::ExitStatusExt;
    let f = Fixture::new("selfkill");
    let o = f.run("selfkill", &[]);
    assert_eq!(o.status.signal(), Some(libc::SIGKILL), "{:?}", o.status);
}

#[test]
fn daemonize_returns_once_started_and_the_daemon_supervises() {
    let f = Fixture::new("daemon");
    let pidfile = f.path("d.pid");
    let start = Instant::now();
    let o = f.run("term", &["-daemonize", "-pidfile", pidfile.to_str().expect("utf8"), "-serial", "null"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(start.elapsed() < Duration::from_secs(5));
    let vmm: i32 = f.wait_file("child.pid").trim().parse().expect("pid");
    let daemon: i32 = f.wait_file("d.pid").trim().parse().expect("pid");
    assert!(alive(vmm) && alive(daemon));
    // SAFETY: getsid on a pid we know.
    let sid = unsafe { libc::getsid(daemon) };
    // SAFETY: as above.
    assert_ne!(sid, unsafe { libc::getsid(0) }, "the daemon has its own session");
    // SAFETY: kill(2) of the daemon we started.
    unsafe { libc::kill(daemon, libc::SIGTERM) };
    wait_for("daemon and vmm-core to exit", || (!alive(vmm) && !alive(daemon)).then_some(()));
    assert_eq!(std::fs::read_to_string(f.path("signal")).expect("signal").trim(), "TERM");
    wait_for("pid file removal", || (!pidfile.exists()).then_some(()));
}

#[test]
fn daemonize_reports_an_early_failure() {
    let f = Fixture::new("daemonfail");
    let o = f.run("fail-early", &["-daemonize"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("vmm-core: boom"), "{}", stderr(&o));
    let o = f.run("exit0", &["-daemonize", "-serial", "stdio"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "flotilla: -serial stdio: cannot use stdio with -daemonize\n");
    let o = f.run("term", &["-daemonize", "-pidfile", "/nonexistent/dir/x.pid"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot create PID file"), "{}", stderr(&o));
}

/// Live processes whose command line mentions `marker`.
fn processes_mentioning(marker: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(marker) {
            out.push((pid, cmd));
        }
    }
    out
}

#[test]
fn the_gateway_starts_once_vmm_core_is_ready_and_everything_ends_with_it() {
    let f = Fixture::new("gateway");
    let sock = f.path("qmp.sock");
    let qmp_unix = format!("unix:{},server,nowait", sock.display());
    let mut child = f
        .cmd("ready-term", &["-name", "gw/vm", "-qmp", &qmp_unix, "-qmp", "tcp::4444,server=on,wait=off"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let vmm: i32 = f.wait_file("child.pid").trim().parse().expect("pid");
    let gw_pid: i32 = f.wait_file("gw-pid-0").trim().parse().expect("pid");
    let core_args = f.wait_file("args");
    let address = core_args.lines().nth(3).expect("address").to_string();
    let gw = f.wait_file("gw-args-0");
    let gw: Vec<&str> = gw.lines().collect();
    assert_eq!(
        gw,
        [
            "--dbus-address",
            address.as_str(),
            "--instance",
            "gw/vm",
            "--qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
            "--qmp",
            "tcp:127.0.0.1:4444,server=on,wait=off",
        ]
    );
    // The bus really runs: dbus-daemon with its config in the runtime directory.
    let run = f.path("run").join("flotilla");
    let bus = processes_mentioning(&run.display().to_string());
    assert!(bus.iter().any(|(_, c)| c.starts_with("dbus-daemon") || c.contains("/dbus-daemon")), "{bus:?}");
    // A stale socket file the gateway would bind is the launcher's to clean at the end.
    std::os::unix::net::UnixListener::bind(&sock).expect("stand-in socket");

    // SAFETY: kill(2) of the launcher we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(f.path("signal")).expect("vmm-core got TERM").trim(), "TERM");
    assert!(!alive(vmm) && !alive(gw_pid));
    assert_eq!(std::fs::read_to_string(f.path("gw-signal-0")).expect("gateway got TERM").trim(), "TERM");
    assert!(!sock.exists(), "QMP socket removed");
    assert!(!run.exists(), "runtime directory removed");
    let left = processes_mentioning(&f.dir.display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");
}

#[test]
fn a_crashed_gateway_is_restarted() {
    let f = Fixture::new("gwcrash");
    let mut child = f
        .cmd("ready-term", &["-qmp", "tcp::4445,server,nowait"])
        .env("FAKE_GW", "crash")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let first: i32 = f.wait_file("gw-pid-0").trim().parse().expect("pid");
    let t0 = Instant::now();
    let second: i32 = f.wait_file("gw-pid-1").trim().parse().expect("restarted");
    assert_ne!(first, second);
    assert!(t0.elapsed() < Duration::from_secs(3), "restarted after the first back-off delay");
    assert!(alive(second));
    // The instance name defaults to vm<launcher pid>.
    let args = f.wait_file("gw-args-1");
    assert_eq!(args.lines().nth(3), Some(format!("vm{}", child.id()).as_str()));
    // Killed outright, it is restarted too.
    // SAFETY: kill(2) of the stand-in gateway.
    unsafe { libc::kill(second, libc::SIGKILL) };
    let third: i32 = f.wait_file("gw-pid-2").trim().parse().expect("restarted again");
    assert!(alive(third));
    // SAFETY: kill(2) of the launcher we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert!(err.contains("qmp-gateway (pid") && err.contains("exited (exit status 3)"), "{err}");
    assert!(!alive(third));
    let left = processes_mentioning(&f.dir.display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");
}

#[test]
fn no_gateway_without_qmp_and_no_gateway_before_ready() {
    let f = Fixture::new("nogw");
    // `term` never says ready: with -qmp the gateway must not start.
    let mut child = f.cmd("term", &["-qmp", "tcp::4446,server,nowait"]).spawn().expect("spawn");
    f.wait_file("child.pid");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!f.path("gw-pid-0").exists(), "gateway started before vmm-core was ready");
    // SAFETY: kill(2) of the launcher we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().expect("wait").code(), Some(7));
    // Ready, but no -qmp: no gateway.
    std::fs::remove_file(f.path("child.pid")).expect("rm");
    let mut child = f.cmd("ready-term", &[]).spawn().expect("spawn");
    f.wait_file("child.pid");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!f.path("gw-pid-0").exists(), "gateway started without -qmp");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}
