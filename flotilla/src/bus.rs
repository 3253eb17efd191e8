//! The pieces of one VM instance besides vmm-core: its runtime directory, its private
//! `dbus-daemon`, and the helper processes the launcher owns ([`Managed`]: terminated, bounded,
//! when dropped).
//!
//! The runtime directory is `$XDG_RUNTIME_DIR/flotilla/<instance>-<pid>/` when
//! `XDG_RUNTIME_DIR` names a directory, else `/run/flotilla/…` for root, else
//! `/tmp/flotilla-<uid>/…`; mode 0700. It holds the bus configuration and the bus socket
//! (`bus`), and is removed with everything in it when the launcher ends.
//!
//! The bus is a `dbus-daemon` of its own (`--config-file` written here): it listens only on
//! the socket in the runtime directory, authenticates with EXTERNAL (so only this user's
//! processes get in, the socket's directory being 0700 as well) and lets them own any name and
//! talk to anyone. Each process of the instance is given its address (`--dbus-address`).

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Environment variable naming the dbus-daemon binary (default: `dbus-daemon` from PATH).
pub const DBUS_DAEMON_ENV: &str = "FLOTILLA_DBUS_DAEMON";
/// How long dbus-daemon may take to say it listens.
const BUS_START: Duration = Duration::from_secs(10);
/// At most this much of the instance name goes into the runtime directory's name.
pub const NAME_IN_PATH: usize = 24;
/// How long a helper gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot create the runtime directory {}: {err}", .path.display())]
    RuntimeDir { path: PathBuf, err: io::Error },
    #[error("cannot start dbus-daemon '{program}': {err}")]
    Spawn { program: String, err: io::Error },
    #[error("dbus-daemon did not start: {0}")]
    Start(String),
}

/// The instance's directory; removed (with its contents) on drop.
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Where runtime directories go, as the module docs say.
    pub fn base() -> PathBuf {
        if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
            let x = PathBuf::from(x);
            if x.is_dir() {
                return x.join("flotilla");
            }
        }
        if nix::unistd::geteuid().is_root() && Path::new("/run").is_dir() {
            return PathBuf::from("/run/flotilla");
        }
        std::env::temp_dir().join(format!("flotilla-{}", nix::unistd::geteuid()))
    }

    /// Creates `<base>/<instance>-<launcher pid>` (the instance name made file-name safe, and
    /// cut to [`NAME_IN_PATH`] characters: the sockets inside must stay within a unix socket
    /// address's 107 bytes; the pid keeps the directory unique).
    pub fn create(instance: &str) -> Result<RuntimeDir, BusError> {
        let safe: String = instance
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '_' })
            .take(NAME_IN_PATH)
            .collect();
        let base = Self::base();
        let path = base.join(format!("{safe}-{}", std::process::id()));
        let made = fs::DirBuilder::new().recursive(true).mode(0o700).create(&base).and_then(|()| {
            // A directory left by a launcher that was killed with this same pid is stale.
            let _ = fs::remove_dir_all(&path);
            fs::DirBuilder::new().mode(0o700).create(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
        });
        made.map_err(|err| BusError::RuntimeDir { path: path.clone(), err })?;
        Ok(RuntimeDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
        // The per-user base stays only while other instances use it.
        if let Some(base) = self.path.parent() {
            let _ = fs::remove_dir(base);
        }
    }
}

/// A helper process the launcher owns: SIGTERM, then SIGKILL after [`TERM_GRACE`], when
/// dropped or [`Managed::terminate`]d. Started in a process group of its own (a terminal's ^C
/// reaches only vmm-core, which then shuts down in order) and with PR_SET_PDEATHSIG, so it
/// does not outlive a launcher that is killed.
pub struct Managed {
    pub name: &'static str,
    pub child: Child,
    pub started: Instant,
}

impl Managed {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> io::Result<Managed> {
        let launcher = std::process::id() as libc::pid_t;
        // SAFETY: the closure only makes async-signal-safe calls (sigprocmask, setpgid, prctl,
        // getppid).
        unsafe {
            cmd.pre_exec(move || {
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                if libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::other("cannot reset the signal mask"));
                }
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != launcher {
                    return Err(io::Error::other("launcher exited during start"));
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        tracing::info!(pid = child.id(), "{name} started");
        Ok(Managed { name, child, started: Instant::now() })
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Whether it is still running (reaps it if not).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; always reaped.
    pub fn terminate(&mut self, grace: Duration) {
        if !self.running() {
            return;
        }
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!("{} did not exit on SIGTERM within {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.terminate(TERM_GRACE);
    }
}

/// The configuration of a private bus listening on `socket`.
pub fn bus_config(socket: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Written by the flotilla launcher for one VM instance. -->
<busconfig>
  <type>flotilla</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
        xml_escape(&socket.display().to_string())
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A running private bus.
pub struct PrivateBus {
    pub address: String,
    pub daemon: Managed,
}

impl PrivateBus {
    /// Writes the configuration into `dir` and starts dbus-daemon on it; returns once it
    /// listens (it prints its address).
    pub fn start(dir: &Path) -> Result<PrivateBus, BusError> {
        let config = dir.join("bus.conf");
        let socket = dir.join("bus");
        fs::write(&config, bus_config(&socket)).map_err(|err| BusError::RuntimeDir { path: config.clone(), err })?;
        let program = std::env::var(DBUS_DAEMON_ENV).ok().filter(|p| !p.is_empty()).unwrap_or("dbus-daemon".into());
        let mut cmd = Command::new(&program);
        cmd.arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile", "--print-address"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut daemon = Managed::spawn("dbus-daemon", &mut cmd).map_err(|err| BusError::Spawn { program, err })?;
        if let Some(err) = daemon.child.stderr.take() {
            let _ = std::thread::Builder::new().name("dbus-stderr".into()).spawn(move || forward_bus_stderr(err));
        }
        let stdout = daemon.child.stdout.take().ok_or_else(|| BusError::Start("no stdout".into()))?;
        let (tx, rx) = mpsc::channel();
        let _ = std::thread::Builder::new().name("dbus-address".into()).spawn(move || {
            let mut line = String::new();
            let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(r);
        });
        let address = match rx.recv_timeout(BUS_START) {
            Ok(Ok(line)) if !line.trim().is_empty() => line.trim().to_string(),
            Ok(Ok(_)) => return Err(BusError::Start("it exited without printing its address".into())),
            Ok(Err(e)) => return Err(BusError::Start(format!("reading its address: {e}"))),
            Err(_) => return Err(BusError::Start(format!("no address within {BUS_START:?}"))),
        };
        tracing::info!(%address, "private D-Bus daemon listening");
        Ok(PrivateBus { address, daemon })
    }
}

/// dbus-daemon's stderr to ours, less its complaint about the fd limit (it tries to raise it,
/// which an unprivileged or sandboxed process may not).
fn forward_bus_stderr(from: impl Read) {
    for line in BufReader::new(from).lines() {
        let Ok(line) = line else { return };
        if line.contains("Failed to set fd limit") {
            continue;
        }
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_listens_on_the_socket_only() {
        let c = bus_config(Path::new("/run/flotilla/vm1-5/bus"));
        assert!(c.contains("<listen>unix:path=/run/flotilla/vm1-5/bus</listen>"), "{c}");
        assert_eq!(c.matches("<listen>").count(), 1);
        assert!(c.contains("<auth>EXTERNAL</auth>"));
        assert!(bus_config(Path::new("/tmp/a&b/bus")).contains("unix:path=/tmp/a&amp;b/bus"));
    }

    #[test]
    fn private_bus_starts_and_everything_goes_away() {
        let dir = RuntimeDir::create("unit test/ö").expect("runtime dir");
        let path = dir.path().to_path_buf();
        assert!(path.file_name().unwrap().to_str().unwrap().starts_with("unit_test__-"), "{}", path.display());
        let long = RuntimeDir::create(&"x".repeat(200)).expect("long name");
        let name = long.path().file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(name, format!("{}-{}", "x".repeat(NAME_IN_PATH), std::process::id()));
        drop(long);
        assert_eq!(fs::metadata(&path).expect("dir").permissions().mode() & 0o777, 0o700);
        let mut bus = PrivateBus::start(&path).expect("dbus-daemon");
        assert!(bus.address.starts_with(&format!("unix:path={}/bus", path.display())), "{}", bus.address);
        assert!(path.join("bus").exists());
        let pid = bus.daemon.child.id() as i32;
        bus.daemon.terminate(TERM_GRACE);
        assert!(!bus.daemon.running());
        assert!(std::fs::read_to_string(format!("/proc/{pid}/stat")).is_err(), "dbus-daemon {pid} reaped");
        drop(dir);
        assert!(!path.exists());
    }
}
