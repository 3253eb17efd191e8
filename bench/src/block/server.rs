//! A vhost-user-blk backend under test as a child process: blockd or qemu-storage-daemon,
//! started on a socket path, waited for, and stopped (SIGTERM, then SIGKILL after a grace
//! period). Its stdout and stderr go to a log file that failures quote.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::error::BlockError;

pub struct Server {
    label: String,
    child: Child,
    log: PathBuf,
    pub argv: Vec<String>,
}

/// The last lines of a log, for an error message.
pub fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

impl Server {
    /// Starts `program args` and waits (up to `timeout`) until `socket` exists; an early exit
    /// is an error quoting the log.
    pub fn start(
        label: &str,
        program: &Path,
        args: &[String],
        socket: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Result<Server, BlockError> {
        let _ = std::fs::remove_file(socket);
        let out = File::create(log).map_err(BlockError::io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(BlockError::io("duplicating the log fd"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory; a
        // backend must not outlive a bench that was killed.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(BlockError::io(format!("starting {label} ({})", program.display())))?;
        let mut argv = vec![program.display().to_string()];
        argv.extend(args.iter().cloned());
        let mut s = Server { label: label.into(), child, log: log.into(), argv };
        let deadline = Instant::now() + timeout;
        // The socket appearing is the only sign of readiness both programs give; poll it.
        loop {
            if socket.exists() {
                return Ok(s);
            }
            if let Some(st) = s.child.try_wait().map_err(BlockError::io(format!("waiting for {label}")))? {
                return Err(BlockError::Backend {
                    what: format!("{label} exited before listening ({st})"),
                    detail: tail(&s.log, 5),
                });
            }
            if Instant::now() > deadline {
                let _ = s.kill();
                return Err(BlockError::Backend {
                    what: format!("{label} did not create {} within {timeout:?}", socket.display()),
                    detail: tail(&s.log, 5),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system, all threads) the process has used so far.
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // Fields after the command name (which may hold spaces) start at state (field 3).
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| ticks / hz as f64)
    }

    fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(drop)
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns how it ended, for the report.
    pub fn stop(mut self, grace: Duration) -> Result<String, BlockError> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: a signal to our own child, which has not been reaped yet (so the pid is ours).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        loop {
            if let Some(st) = self.child.try_wait().map_err(BlockError::io(format!("reaping {}", self.label)))? {
                return Ok(st.to_string());
            }
            if Instant::now() > deadline {
                self.kill().map_err(BlockError::io(format!("killing {}", self.label)))?;
                return Ok(format!("killed after {grace:?} (SIGTERM ignored)"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.kill();
        }
    }
}
