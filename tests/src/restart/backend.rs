//! The vhost-user-blk backend under test as a child process that is SIGKILLed and started again
//! on the same socket path: blockd (`--socket-path S --drive file=IMG,format=F`) or
//! qemu-storage-daemon (`--export type=vhost-user-blk`). Every start appends to one log file.
//! Readiness is the socket appearing (it is removed before each start): the only sign both
//! programs give, so both are timed the same way.

use super::RigError;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blockd,
    Qsd,
}

impl Kind {
    pub fn key(self) -> &'static str {
        match self {
            Kind::Blockd => "blockd",
            Kind::Qsd => "qsd",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: Kind,
    pub program: PathBuf,
    pub image: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Queues the backend exports (qemu-storage-daemon; blockd offers its own number).
    pub num_queues: u32,
    /// blockd's `cache=` (None: its default, writeback); `none` makes its I/O O_DIRECT, which a
    /// blkio throttle can slow down.
    pub cache: Option<String>,
}

impl Spec {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        match self.kind {
            Kind::Blockd => {
                cmd.arg("--socket-path")
                    .arg(&self.socket)
                    .arg("--drive")
                    .arg(format!(
                        "file={},format={}{}",
                        self.image.display(),
                        self.format,
                        self.cache.as_ref().map(|c| format!(",cache={c}")).unwrap_or_default()
                    ))
                    .env("BLOCKD_LOG", "info");
            }
            Kind::Qsd => {
                cmd.arg("--blockdev")
                    .arg(format!("driver=file,node-name=file0,filename={}", self.image.display()))
                    .arg("--blockdev")
                    .arg(format!("driver={},node-name=fmt0,file=file0", self.format))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp0,node-name=fmt0,addr.type=unix,addr.path={},writable=on,num-queues={}",
                        self.socket.display(),
                        self.num_queues
                    ));
            }
        }
        cmd
    }
}

/// A running backend; dropping it kills it.
pub struct Backend {
    pub spec: Spec,
    child: Child,
    /// Starts so far (1 after [`Backend::start`]).
    pub starts: u32,
}

const READY: Duration = Duration::from_secs(20);

impl Backend {
    pub fn start(spec: Spec) -> Result<Backend, RigError> {
        let child = spawn(&spec, 1)?;
        Ok(Backend { spec, child, starts: 1 })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL, reaped (bounded).
    pub fn kill(&mut self) -> Result<(), RigError> {
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait().map_err(RigError::io("reaping the backend"))? {
                Some(_) => return Ok(()),
                None if Instant::now() >= deadline => {
                    return Err(RigError::Process {
                        what: format!("{} pid {} did not die of SIGKILL within 10 s", self.spec.kind.key(), self.pid()),
                        detail: String::new(),
                    })
                }
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// SIGKILL, then a new process on the same socket; returns once it listens.
    pub fn kill_and_restart(&mut self) -> Result<(), RigError> {
        self.kill()?;
        self.starts += 1;
        self.child = spawn(&self.spec, self.starts)?;
        Ok(())
    }

    /// SIGTERM and up to `grace` for a clean exit; whether it exited 0.
    pub fn stop(&mut self, grace: Duration) -> Result<bool, RigError> {
        // SAFETY: a signal to our own child, not reaped yet (so the pid is still ours).
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        match crate::process::wait_timeout(&mut self.child, grace) {
            Some(s) => Ok(s.success()),
            None => {
                self.kill()?;
                Ok(false)
            }
        }
    }

    /// The whole log (every start).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.spec.log).unwrap_or_default()
    }

    /// The log's last `n` lines.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let v: Vec<&str> = log.lines().collect();
        v[v.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(spec: &Spec, start: u32) -> Result<Child, RigError> {
    let _ = std::fs::remove_file(&spec.socket);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(RigError::io(format!("opening {}", spec.log.display())))?;
    let _ = writeln!(log, "=== flotilla restart rig: start {start} of {}", spec.kind.key());
    let err: File = log.try_clone().map_err(RigError::io("duplicating the log fd"))?;
    let mut cmd = spec.command();
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory: a backend
    // must not outlive a test or bench that died.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(RigError::io(format!("starting {}", spec.program.display())))?;
    wait_listening(&mut child, spec).inspect_err(|_| {
        let _ = child.kill();
        let _ = child.wait();
    })?;
    Ok(child)
}

fn wait_listening(child: &mut Child, spec: &Spec) -> Result<(), RigError> {
    let deadline = Instant::now() + READY;
    loop {
        if spec.socket.exists() {
            return Ok(());
        }
        let detail = || tail(&spec.log, 10);
        if let Some(st) = child.try_wait().map_err(RigError::io("waiting for the backend"))? {
            return Err(RigError::Process {
                what: format!("{} exited before listening ({st})", spec.kind.key()),
                detail: detail(),
            });
        }
        if Instant::now() >= deadline {
            return Err(RigError::Process {
                what: format!("{} did not create {} within {READY:?}", spec.kind.key(), spec.socket.display()),
                detail: detail(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}
