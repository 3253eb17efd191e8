//! Running the real `flotilla` and `vmm-core` executables from integration tests, and watching
//! the processes they leave (or must not leave) behind.
//!
//! Finding the binaries: `env!("CARGO_BIN_EXE_flotilla")` only exists for tests of the crate
//! that owns the binary, and `cargo test -p flotilla-tests` does not build other packages'
//! binaries. So [`binaries`] runs `cargo build -p flotilla -p vmm-core` once per test process
//! (same profile as the test executable, output next to it: a test runs from
//! `<target>/<profile>/deps/`, the binaries land in `<target>/<profile>/`). Cargo is up to date
//! after the first time, so this costs a fraction of a second. `FLOTILLA_BIN_DIR` names a
//! directory holding both binaries instead (no build is run then).

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Environment variable: a directory with prebuilt `flotilla` and `vmm-core` (skips the build).
pub const BIN_DIR_ENV: &str = "FLOTILLA_BIN_DIR";

/// Paths of the executables under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub flotilla: PathBuf,
    pub vmm_core: PathBuf,
    pub qmp_gateway: PathBuf,
    pub blockd: PathBuf,
    pub balloond: PathBuf,
}

/// The packages (each with a binary of the same name) that [`binaries`] builds.
const PACKAGES: [&str; 5] = ["flotilla", "vmm-core", "qmp-gateway", "blockd", "balloond"];

/// The directory the binaries of this test executable's profile are built into.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a directory");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// `flotilla`, `vmm-core`, `qmp-gateway`, `blockd` and `balloond`, built (once per test
/// process, in one cargo call) if needed; see the module docs. With `FLOTILLA_BIN_DIR`, `flotilla` and
/// `vmm-core` must be there; the others only for the tests that run them.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| {
        let dir = match std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                let dir = profile_dir();
                build_binaries(&dir);
                dir
            }
        };
        let b = Binaries {
            flotilla: dir.join("flotilla"),
            vmm_core: dir.join("vmm-core"),
            qmp_gateway: dir.join("qmp-gateway"),
            blockd: dir.join("blockd"),
            balloond: dir.join("balloond"),
        };
        for p in [&b.flotilla, &b.vmm_core] {
            assert!(p.is_file(), "{} is missing (built into {}?)", p.display(), dir.display());
        }
        b
    })
}

fn build_binaries(profile_dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace).args(["build", "--quiet"]);
    for p in PACKAGES {
        cmd.args(["-p", p]);
    }
    cmd.arg("--manifest-path").arg(workspace.join("Cargo.toml"));
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    // Build into the same target directory as this test (it may be CARGO_TARGET_DIR, or the
    // test may have been built with --target, which adds a triple level).
    if let Some(target_dir) = profile_dir.parent() {
        let triple = target_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if triple.contains('-') && target_dir.parent().is_some_and(|p| p.join("CACHEDIR.TAG").exists()) {
            cmd.arg("--target").arg(triple).arg("--target-dir").arg(target_dir.parent().expect("parent"));
        } else {
            cmd.arg("--target-dir").arg(target_dir);
        }
    }
    let started = Instant::now();
    let out =
        cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run cargo to build {PACKAGES:?}: {e}"));
    assert!(
        out.status.success(),
        "cargo build of {PACKAGES:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let took = started.elapsed();
    if took > Duration::from_secs(5) {
        eprintln!("flotilla-tests: built {PACKAGES:?} in {took:.1?}");
    }
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A human-readable exit status ("exit 1", "signal 15").
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{status:?}"),
    }
}

/// One line of /proc/PID/stat, split after the command name (which may hold spaces).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// Whether `pid` is a live process (present in /proc and not a zombie).
pub fn alive(pid: i32) -> bool {
    match stat_fields(pid) {
        Some(f) => f.first().is_some_and(|s| s != "Z" && s != "X"),
        None => false,
    }
}

/// Waits up to `timeout` for `pid` to be gone (or a zombie); true if it went.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Live children of `pid` (by the parent pid in /proc/*/stat).
pub fn children(pid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| stat_fields(p).is_some_and(|f| f.get(1).and_then(|pp| pp.parse().ok()) == Some(pid)))
        .filter(|&p| alive(p))
        .collect()
}

/// The child of `parent` whose executable's file name starts with `exe`, other than `not` (a
/// daemon the launcher runs, e.g. the one it started after `not` died).
pub fn daemon_child(parent: i32, exe: &str, not: Option<i32>) -> Option<i32> {
    children(parent).into_iter().find(|&c| {
        Some(c) != not
            && std::fs::read_link(format!("/proc/{c}/exe"))
                .ok()
                .and_then(|e| e.file_name().map(|n| n.to_string_lossy().starts_with(exe)))
                .unwrap_or(false)
    })
}

/// [`daemon_child`], waiting up to `timeout` for one to exist.
pub fn wait_daemon_child(parent: i32, exe: &str, not: Option<i32>, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = daemon_child(parent, exe, not);
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The command line of `pid`, arguments joined by spaces.
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(raw.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect::<Vec<_>>().join(" "))
}

/// Live processes whose command line mentions `marker` (a test's scratch directory, which is in
/// every path of its VM and so in the JSON config vmm-core gets on its command line).
pub fn processes_mentioning(marker: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| p != me && alive(p))
        .filter_map(|p| cmdline(p).filter(|c| c.contains(marker)).map(|c| (p, c)))
        .collect()
}

/// The vmm-core child of a flotilla process, waiting up to `timeout` for it to appear.
pub fn vmm_core_child(flotilla_pid: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = children(flotilla_pid).into_iter().find(|&c| {
            std::fs::read_link(format!("/proc/{c}/exe"))
                .ok()
                .and_then(|e| e.file_name().map(|n| n.to_string_lossy().starts_with("vmm-core")))
                .unwrap_or(false)
        });
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a plain pid and signal number has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

/// Reads a child's pipe to the end on a thread; `take()` returns what it got.
pub struct Collector(Option<std::thread::JoinHandle<String>>);

impl Collector {
    pub fn new(mut from: impl Read + Send + 'static) -> Collector {
        Collector(Some(std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = from.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })))
    }

    /// Everything read (blocks until the pipe's writers are all gone).
    pub fn take(&mut self) -> String {
        self.0.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }
}

/// A process a test started, killed (with everything mentioning `marker`) if the test ends
/// early: a failing test must not leave VMs running.
pub struct Reaper {
    pub child: Option<Child>,
    pub marker: String,
    /// Extra pids to kill on drop (e.g. a daemon found through its pid file).
    pub extra: Vec<i32>,
}

impl Reaper {
    pub fn new(child: Child, marker: &str) -> Reaper {
        Reaper { child: Some(child), marker: marker.to_string(), extra: Vec::new() }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already taken")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("child already taken").id() as i32
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let mut pids = self.extra.clone();
        pids.extend(processes_mentioning(&self.marker).into_iter().map(|(p, _)| p));
        for p in pids {
            if alive(p) {
                // SAFETY: as in `signal`.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
}

/// Starts `cmd` (a Flotilla daemon) with `--ready-fd N` appended and its stderr collected, and
/// waits up to `timeout` for the `ready` line the launcher waits for; kills it and panics with
/// its log if it does not come.
pub fn spawn_ready(cmd: &mut Command, marker: &str, timeout: Duration) -> (Reaper, Collector) {
    use std::os::fd::AsRawFd;
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let child = cmd
        .args(["--ready-fd", &w.as_raw_fd().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    drop(w);
    let mut reaper = Reaper::new(child, marker);
    let mut log = Collector::new(reaper.child().stderr.take().expect("stderr"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // One line, not EOF: a child spawned meanwhile by another test may hold the write end.
        let mut s = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(std::fs::File::from(r)), &mut s);
        let _ = tx.send(s);
    });
    match rx.recv_timeout(timeout) {
        Ok(s) if s == "ready\n" => (reaper, log),
        other => {
            let _ = reaper.child().kill();
            panic!("{cmd:?} did not report ready ({other:?}):\n{}", log.take());
        }
    }
}
