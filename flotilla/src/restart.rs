//! A helper process the launcher keeps running for the VM's whole life: started (optionally
//! with a readiness pipe, `--ready-fd FD`, on which it writes `ready`), restarted with the same
//! arguments when it exits, after a delay that doubles from 100 ms up to 5 s (back to 100 ms
//! after a run of 10 s, or after a run in which it said `ready`: a daemon killed while serving
//! is not failing to start, and its guest waits), its stale unix sockets removed before every
//! start and at the end.
//! The QMP gateway, blockd and balloond are each one of these.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;

use crate::bus::{Managed, TERM_GRACE};

/// The restart delay: first, and at most.
pub const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// A process that ran this long before exiting gets the first delay again.
pub const STABLE: Duration = Duration::from_secs(10);

/// The read end of a readiness pipe (non-blocking).
pub struct ReadyPipe(Option<File>);

impl ReadyPipe {
    /// A close-on-exec, non-blocking pipe: the read end, and the write end for the child
    /// (made inheritable in the child only, see [`pass_fd`]).
    pub fn new() -> Result<(ReadyPipe, OwnedFd), Errno> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok((ReadyPipe(Some(File::from(r))), w))
    }

    /// True once the child has said `ready`; the pipe is closed then, or at its EOF.
    pub fn check(&mut self) -> bool {
        let Some(f) = self.0.as_mut() else { return false };
        let mut buf = [0u8; 16];
        match f.read(&mut buf) {
            Ok(n) if n > 0 && buf[..n].starts_with(b"ready") => {
                self.0 = None;
                true
            }
            Ok(_) => {
                // EOF (the child failed or exited before it was ready) or a stray byte.
                self.0 = None;
                false
            }
            Err(_) => false, // EAGAIN: not yet
        }
    }

    pub fn pending(&self) -> bool {
        self.0.is_some()
    }
}

/// Makes `fd` survive the exec of `cmd` (it stays close-on-exec in the launcher).
pub fn pass_fd(cmd: &mut Command, fd: &OwnedFd) {
    pass_raw_fd(cmd, fd.as_raw_fd());
}

/// [`pass_fd`] for a descriptor the caller keeps open until the spawn returns.
pub fn pass_raw_fd(cmd: &mut Command, raw: RawFd) {
    // SAFETY: fcntl is async-signal-safe; `raw` is open in the child since it is open here
    // (fork copies the table; `fd` outlives the spawn call).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Removes those of `paths` that exist and are sockets (never a user's file).
pub fn remove_socket_files(paths: &[PathBuf], what: &str) {
    use std::os::unix::fs::FileTypeExt;
    for s in paths {
        if std::fs::symlink_metadata(s).is_ok_and(|m| m.file_type().is_socket()) {
            if let Err(e) = std::fs::remove_file(s) {
                tracing::warn!("cannot remove the {what} socket {}: {e}", s.display());
            }
        }
    }
}

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{status:?}"),
    }
}

/// Copies a child's stderr to ours (which is /dev/null once a daemonized launcher detached).
pub fn forward_stderr(mut from: ChildStderr) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let _ = io::stderr().write_all(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// One supervised helper process.
pub struct Restartable {
    pub name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    /// Its unix sockets: stale ones are removed before each start, all at the end.
    sockets: Vec<PathBuf>,
    /// Whether it takes `--ready-fd FD`.
    with_ready_fd: bool,
    /// Descriptors it inherits at every start, under the same numbers (netd's taps); the
    /// caller keeps them open for the process's whole supervised life.
    inherit: Vec<RawFd>,
    /// Whether its stderr goes through a pipe and a thread (a daemonizing launcher's children
    /// must not hold the caller's stderr open).
    pipe_stderr: bool,
    proc: Option<Managed>,
    ready: Option<ReadyPipe>,
    /// When to start it (again); `None` while it runs or before its first start.
    next_start: Option<Instant>,
    backoff: Duration,
    starts: u32,
    /// It said `ready` since its last start.
    served: bool,
}

impl Restartable {
    pub fn new(name: &'static str, program: &Path, args: Vec<String>, sockets: Vec<PathBuf>) -> Restartable {
        Restartable {
            name,
            program: program.to_path_buf(),
            args,
            sockets,
            with_ready_fd: false,
            inherit: Vec::new(),
            pipe_stderr: false,
            proc: None,
            ready: None,
            next_start: None,
            backoff: BACKOFF.0,
            starts: 0,
            served: false,
        }
    }

    /// Passes `--ready-fd FD` and watches the pipe.
    pub fn with_ready_fd(mut self) -> Self {
        self.with_ready_fd = true;
        self
    }

    /// Passes these descriptors at every start (see the field).
    pub fn inherit_fds(mut self, fds: Vec<RawFd>) -> Self {
        self.inherit = fds;
        self
    }

    pub fn pipe_stderr(mut self, on: bool) -> Self {
        self.pipe_stderr = on;
        self
    }

    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    pub fn next_start(&self) -> Option<Instant> {
        self.next_start
    }

    /// Whether a readiness report is awaited.
    pub fn ready_pending(&self) -> bool {
        self.ready.as_ref().is_some_and(ReadyPipe::pending)
    }

    fn remove_sockets(&self) {
        remove_socket_files(&self.sockets, self.name);
    }

    /// Starts it now; on failure nothing runs and the error is returned.
    pub fn spawn(&mut self) -> io::Result<()> {
        self.remove_sockets();
        self.starts += 1;
        self.served = false;
        self.next_start = None;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null());
        for &fd in &self.inherit {
            pass_raw_fd(&mut cmd, fd);
        }
        let pipe = if self.with_ready_fd {
            let (r, w) = ReadyPipe::new().map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            cmd.arg("--ready-fd").arg(w.as_raw_fd().to_string());
            pass_fd(&mut cmd, &w);
            Some((r, w))
        } else {
            None
        };
        if self.pipe_stderr {
            cmd.stderr(Stdio::piped());
        }
        tracing::debug!(program = %self.program.display(), args = ?self.args, "starting {}", self.name);
        let mut p = Managed::spawn(self.name, &mut cmd)?;
        // The write end is the child's now; ours closes, so its exit reads as EOF.
        self.ready = pipe.map(|(r, _w)| r);
        if let Some(err) = p.child.stderr.take() {
            let name = self.name;
            if let Err(e) =
                std::thread::Builder::new().name(format!("{name}-stderr")).spawn(move || forward_stderr(err))
            {
                tracing::warn!("cannot forward {name}'s stderr: {e}");
            }
        }
        self.proc = Some(p);
        Ok(())
    }

    /// Starts it, or plans another try at once if it cannot be started (restarts).
    pub fn start(&mut self) {
        if let Err(e) = self.spawn() {
            eprintln!("flotilla: cannot start {} '{}': {e}", self.name, self.program.display());
            self.schedule(Duration::ZERO);
        }
    }

    /// Plans the next start after a run of `ran`.
    fn schedule(&mut self, ran: Duration) {
        if ran >= STABLE || self.served {
            self.backoff = BACKOFF.0;
        }
        self.next_start = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF.1);
    }

    /// Its exit status if it has exited (reaped then), without planning a restart.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.proc.as_mut().and_then(|p| p.child.try_wait().ok().flatten())?;
        self.proc = None;
        Some(status)
    }

    /// Checks its readiness pipe; true when it has just said `ready`.
    pub fn check_ready(&mut self) -> bool {
        let became = self.ready.as_mut().is_some_and(ReadyPipe::check);
        if self.ready.as_ref().is_some_and(|r| !r.pending()) {
            self.ready = None;
        }
        if became {
            self.served = true;
            tracing::info!(pid = ?self.pid(), "{} is ready", self.name);
        }
        became
    }

    /// Notices an exit (and plans the restart), and restarts when it is time.
    pub fn poll(&mut self) {
        self.check_ready();
        if let Some(p) = self.proc.as_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                let ran = p.started.elapsed();
                eprintln!(
                    "flotilla: {} (pid {}) exited ({}) after {ran:.1?}; restarting it",
                    self.name,
                    p.child.id(),
                    describe(status)
                );
                self.proc = None;
                self.ready = None;
                self.schedule(ran);
            }
        }
        if self.next_start.is_some_and(|t| Instant::now() >= t) {
            self.start();
        }
    }

    /// Ends it (SIGTERM, SIGKILL after the grace period) and removes its sockets.
    pub fn stop(&mut self) {
        self.next_start = None;
        self.ready = None;
        if let Some(mut p) = self.proc.take() {
            p.terminate(TERM_GRACE);
        }
        self.remove_sockets();
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Restartable {
        Restartable::new("test-helper", Path::new("/bin/sh"), vec!["-c".into(), script.into(), "sh".into()], vec![])
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn ready_fd_is_passed_and_read() {
        // $1 is "--ready-fd", $2 the fd (dash takes single-digit fds only in `>&N`).
        let mut r = sh("echo ready > /proc/self/fd/$2; exec sleep 30").with_ready_fd();
        r.spawn().expect("spawn");
        assert!(r.args.len() == 3, "the fd is added per start, not stored");
        wait_until("ready", || r.check_ready());
        assert!(!r.ready_pending());
        r.stop();
        assert_eq!(r.pid(), None);
    }

    #[test]
    fn exit_before_ready_reads_as_eof_and_is_reported() {
        let mut r = sh("exit 3").with_ready_fd();
        r.spawn().expect("spawn");
        let mut status = None;
        wait_until("exit", || {
            status = r.exited();
            status.is_some()
        });
        assert_eq!(status.and_then(|s| s.code()), Some(3));
        assert!(!r.check_ready(), "EOF is not ready");
        assert!(!r.ready_pending());
    }

    #[test]
    fn restarted_with_backoff_and_sockets_removed() {
        let dir = std::env::temp_dir().join(format!("flotilla-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("x.sock");
        let mut r = Restartable::new(
            "test-helper",
            Path::new("/bin/sh"),
            vec!["-c".into(), "exit 0".into()],
            vec![sock.clone(), dir.join("not-a-socket")],
        );
        std::fs::write(dir.join("not-a-socket"), b"user data").expect("file");
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        r.spawn().expect("spawn");
        assert!(!sock.exists(), "a stale socket is removed before a start");
        let t0 = Instant::now();
        wait_until("two restarts", || {
            r.poll();
            r.starts() >= 3
        });
        // 100 ms, then 200 ms.
        assert!(t0.elapsed() >= Duration::from_millis(300), "{:?}", t0.elapsed());
        assert!(r.backoff >= Duration::from_millis(400));
        r.stop();
        assert!(dir.join("not-a-socket").exists(), "only sockets are removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_daemon_that_was_ready_is_restarted_after_the_first_delay() {
        let mut r = sh("echo ready > /proc/self/fd/$2; exit 0").with_ready_fd();
        r.spawn().expect("spawn");
        let t0 = Instant::now();
        wait_until("three restarts", || {
            r.poll();
            r.starts() >= 4
        });
        // 100 ms each time, not 100 + 200 + 400.
        assert!(t0.elapsed() < Duration::from_millis(650), "{:?}", t0.elapsed());
        assert_eq!(r.backoff, BACKOFF.0 * 2);
        r.stop();
    }
}
