//! One VM under test as a child process: started in a process group of its own with its serial
//! console on our pipes, watched line by line with deadlines, and always stopped and reaped,
//! together with everything it started (vmm-core under the flotilla launcher).
//!
//! Nothing is left behind, whatever happens:
//! - the child gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies if the bench dies (and vmm-core
//!   follows its launcher by its own PDEATHSIG);
//! - the bench is a child subreaper (`PR_SET_CHILD_SUBREAPER`, see [`become_subreaper`]), so a
//!   grandchild orphaned by its parent's death is reparented to the bench and reaped here;
//! - [`VmProcess::stop`] (also run on drop) sends SIGTERM, waits a bounded time, SIGKILLs the
//!   whole group while the leader still holds the group id, then reaps the group.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::BenchError;

/// How long a VM gets to exit after SIGTERM before the group is SIGKILLed.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long reaping may take after SIGKILL (tearing down a VM's memory is not instant).
const REAP_LIMIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(2);

/// Makes orphaned descendants of the bench its own children, so that they can be reaped.
pub fn become_subreaper() -> Result<(), BenchError> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(BenchError::Io {
            what: "becoming a child subreaper".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Pins the bench (this thread, so every thread and process started after it) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<(), BenchError> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(BenchError::Setup(format!("--pin-cpu {cpu}: no such CPU")));
    }
    // SAFETY: `cpu` is within the set's size (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid cpu_set_t of the size passed, for the calling thread (0).
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(BenchError::Io {
            what: format!("pinning the bench to CPU {cpu}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub label: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Spec {
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.display().to_string()).chain(self.args.iter().cloned()).collect()
    }
}

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

pub struct VmProcess {
    label: String,
    child: Child,
    pid: i32,
    stdin: Option<ChildStdin>,
    stdout: Receiver<(Instant, String)>,
    stdout_seen: Vec<String>,
    stderr: Lines,
    /// Taken just before fork+exec: time zero of the measurements.
    pub started: Instant,
    stopped: bool,
}

/// How [`VmProcess::stop`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// It exited on SIGTERM within the grace period (no SIGKILL was needed).
    pub graceful: bool,
}

fn lock(l: &Lines) -> std::sync::MutexGuard<'_, Vec<(Instant, String)>> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

fn split_lines(from: impl Read, mut each: impl FnMut(Instant, String) -> bool) {
    for line in BufReader::new(from).split(b'\n') {
        let Ok(line) = line else { return };
        let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
        if !each(Instant::now(), text) {
            return;
        }
    }
}

impl VmProcess {
    pub fn spawn(spec: &Spec) -> Result<VmProcess, BenchError> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let bench = std::process::id() as libc::pid_t;
        // SAFETY: the closure makes only async-signal-safe calls (prctl, getppid) and allocates
        // nothing on its success path.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != bench {
                    return Err(std::io::Error::other("the bench exited during the start"));
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| BenchError::Spawn {
            what: format!("{} ({})", spec.label, spec.program.display()),
            source: e,
        })?;
        let pid = child.id() as i32;
        let stdin = child.stdin.take();
        let out = child.stdout.take();
        let err = child.stderr.take();
        // From here on `vm` owns the child: an early return stops and reaps it in drop.
        let (tx, rx) = channel();
        let stderr: Lines = Arc::default();
        let vm = VmProcess {
            label: spec.label.clone(),
            child,
            pid,
            stdin,
            stdout: rx,
            stdout_seen: Vec::new(),
            stderr: stderr.clone(),
            started,
            stopped: false,
        };
        let spawn_reader = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map(drop)
                .map_err(|e| BenchError::Io { what: format!("starting the {name} thread"), source: e })
        };
        if let Some(out) = out {
            spawn_reader("vm-stdout", Box::new(move || split_lines(out, |t, l| tx.send((t, l)).is_ok())))?;
        }
        if let Some(err) = err {
            spawn_reader(
                "vm-stderr",
                Box::new(move || {
                    split_lines(err, |t, l| {
                        lock(&stderr).push((t, l));
                        true
                    })
                }),
            )?;
        }
        Ok(vm)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The last lines of both outputs, for error messages.
    fn tail(&self) -> String {
        fn block<'a>(lines: impl Iterator<Item = &'a str>) -> String {
            let v: Vec<&str> = lines.collect();
            if v.is_empty() {
                " (none)".into()
            } else {
                format!("\n  {}", v.join("\n  "))
            }
        }
        let n = self.stdout_seen.len();
        let out = block(self.stdout_seen[n.saturating_sub(15)..].iter().map(String::as_str));
        let err = lock(&self.stderr);
        let n = err.len();
        let err = block(err[n.saturating_sub(15)..].iter().map(|(_, l)| l.as_str()));
        format!("last serial lines:{out}\nlast stderr lines:{err}")
    }

    /// Waits until `deadline` for a serial line that satisfies `want`; returns when it arrived.
    pub fn expect(
        &mut self,
        what: &str,
        want: impl Fn(&str) -> bool,
        deadline: Instant,
    ) -> Result<Instant, BenchError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok((at, line)) => {
                    let hit = want(&line);
                    self.stdout_seen.push(line);
                    if hit {
                        return Ok(at);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(BenchError::Guest {
                        what: format!("{}: waiting for {what}", self.label),
                        detail: format!(
                            "nothing after {:.1} s since the start\n{}",
                            self.started.elapsed().as_secs_f64(),
                            self.tail()
                        ),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Give the exit status a moment to appear, for the message.
                    let exit_deadline = Instant::now() + Duration::from_millis(500);
                    let mut status = None;
                    while status.is_none() && Instant::now() < exit_deadline {
                        status = self.exited();
                        std::thread::sleep(POLL);
                    }
                    return Err(BenchError::Guest {
                        what: format!("{}: waiting for {what}", self.label),
                        detail: format!(
                            "its output closed ({})\n{}",
                            status.map_or("still running".into(), |s| format!("exit status {s:#x}")),
                            self.tail()
                        ),
                    });
                }
            }
        }
    }

    /// Waits until `deadline` for a stderr line that `parse` accepts (lines already received count).
    pub fn expect_stderr<T>(
        &mut self,
        what: &str,
        parse: impl Fn(&str) -> Option<T>,
        deadline: Instant,
    ) -> Result<T, BenchError> {
        loop {
            if let Some(v) = lock(&self.stderr).iter().find_map(|(_, l)| parse(l)) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Guest {
                    what: format!("{}: waiting for {what} on stderr", self.label),
                    detail: format!("not logged\n{}", self.tail()),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends one line to the guest's serial input.
    pub fn send(&mut self, line: &str) -> Result<(), BenchError> {
        let what = || format!("{}: sending '{line}' to the serial console", self.label);
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(BenchError::Guest { what: what(), detail: "stdin already closed".into() });
        };
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|e| BenchError::Io { what: what(), source: e })
    }

    /// The raw wait status if the leader has exited, without reaping it (so that its pid, which
    /// is also the process group id, stays ours until we have killed the group).
    fn exited(&self) -> Option<i32> {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value for an out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a siginfo_t for the duration of the call.
        let rc = unsafe {
            libc::waitid(libc::P_PID, self.pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
        };
        // SAFETY: waitid filled `info` (si_pid stays 0 when no child has changed state).
        (rc == 0 && unsafe { info.si_pid() } == self.pid).then(|| unsafe { info.si_status() })
    }

    /// Ends the VM: SIGTERM, up to [`TERM_GRACE`] to exit, then SIGKILL to its whole process
    /// group; reaps the leader and any member orphaned to us. Idempotent.
    pub fn stop(&mut self) -> Result<Stopped, BenchError> {
        if self.stopped {
            return Ok(Stopped { graceful: true });
        }
        self.stopped = true;
        self.stdin = None;
        // SAFETY: plain syscalls on our own child's pid / process group, which stay allocated
        // until the leader is reaped below.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + TERM_GRACE;
        let mut graceful = false;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                graceful = true;
                break;
            }
            std::thread::sleep(POLL);
        }
        // SAFETY: as above; the leader is not reaped yet, so the group id is still this VM's.
        unsafe { libc::killpg(self.pid, libc::SIGKILL) };
        let deadline = Instant::now() + REAP_LIMIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                Ok(None) => {
                    return Err(BenchError::Guest {
                        what: format!("{}: stopping it", self.label),
                        detail: format!("pid {} still there {REAP_LIMIT:?} after SIGKILL", self.pid),
                    })
                }
                Err(e) => {
                    return Err(BenchError::Io { what: format!("{}: reaping pid {}", self.label, self.pid), source: e })
                }
            }
        }
        // Members of the group orphaned to us (vmm-core when its launcher died first).
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own process group with a valid status pointer.
            let rc = unsafe { libc::waitpid(-self.pid, &mut status, libc::WNOHANG) };
            if rc < 0 {
                break; // ECHILD: none left
            }
            if rc == 0 {
                if Instant::now() >= deadline {
                    return Err(BenchError::Guest {
                        what: format!("{}: stopping it", self.label),
                        detail: format!("members of process group {} still there after SIGKILL", self.pid),
                    });
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(Stopped { graceful })
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("flotilla-bench: {}", crate::error::chain(&e));
        }
    }
}

/// Runs a short command (e.g. `qemu-system-x86_64 -version`) and returns its first stdout line
/// that satisfies `want`, within `timeout`.
pub fn first_line(spec: &Spec, want: impl Fn(&str) -> bool, timeout: Duration) -> Result<String, BenchError> {
    let mut p = VmProcess::spawn(spec)?;
    let deadline = p.started + timeout;
    p.expect("its output", &want, deadline)?;
    let line = p.stdout_seen.last().cloned().unwrap_or_default();
    p.stop()?;
    Ok(line)
}

/// Runs a short command to its end (its stdout closed) within `timeout`; returns its stdout
/// lines.
pub fn output_lines(spec: &Spec, timeout: Duration) -> Result<Vec<String>, BenchError> {
    let mut p = VmProcess::spawn(spec)?;
    let deadline = p.started + timeout;
    loop {
        match p.stdout.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((_, line)) => p.stdout_seen.push(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                return Err(BenchError::Guest {
                    what: format!("running {}", p.label),
                    detail: format!("not done within {timeout:?}\n{}", p.tail()),
                })
            }
        }
    }
    p.stop()?;
    Ok(std::mem::take(&mut p.stdout_seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Spec {
        Spec { label: "sh".into(), program: "/bin/sh".into(), args: vec!["-c".into(), script.into()], env: vec![] }
    }

    #[test]
    fn lines_are_awaited_and_the_child_is_reaped() {
        let mut p = VmProcess::spawn(&sh("echo one; echo two; cat >/dev/null")).unwrap();
        let d = Instant::now() + Duration::from_secs(10);
        let at = p.expect("two", |l| l == "two", d).unwrap();
        assert!(at >= p.started);
        let pid = p.pid();
        assert!(p.stop().unwrap().graceful);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn timeouts_are_errors_that_show_the_output() {
        let mut p = VmProcess::spawn(&sh("echo hello; exec sleep 30")).unwrap();
        let e = p.expect("never", |l| l == "never", Instant::now() + Duration::from_millis(300)).unwrap_err();
        let msg = crate::error::chain(&e);
        assert!(msg.contains("hello"), "{msg}");
        let pid = p.pid();
        drop(p);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn sigterm_ignoring_group_members_are_killed_and_reaped() {
        become_subreaper().unwrap();
        // The shell starts a grandchild that ignores SIGTERM, then waits.
        let mut p =
            VmProcess::spawn(&sh("trap '' TERM; (trap '' TERM; echo $$ child; exec sleep 30) & echo ready; wait"))
                .unwrap();
        let d = Instant::now() + Duration::from_secs(10);
        p.expect("ready", |l| l == "ready", d).unwrap();
        let pid = p.pid();
        let tree = crate::procfs::process_tree(pid);
        assert!(tree.len() >= 2, "{tree:?}");
        // Shorten the test: the leader ignores TERM, so this takes TERM_GRACE.
        let stopped = p.stop().unwrap();
        assert!(!stopped.graceful);
        for q in tree {
            assert!(!std::path::Path::new(&format!("/proc/{q}")).exists(), "pid {q} left behind");
        }
    }

    #[test]
    fn stderr_lines_are_searched() {
        let mut p = VmProcess::spawn(&sh("echo 'x value=7' >&2; exec sleep 30")).unwrap();
        let v = p
            .expect_stderr(
                "value",
                |l| crate::tracelog::field(l, "value")?.parse::<u32>().ok(),
                Instant::now() + Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn pinning_a_thread() {
        // Runs in a test thread of its own, so the pin does not outlive the test.
        pin_to_cpu(0).unwrap();
        assert!(pin_to_cpu(1 << 20).is_err());
    }

    #[test]
    fn output_of_a_short_command() {
        assert_eq!(output_lines(&sh("echo a; echo b"), Duration::from_secs(10)).unwrap(), ["a", "b"]);
        assert!(output_lines(&sh("true"), Duration::from_secs(10)).unwrap().is_empty());
        assert!(output_lines(&sh("exec sleep 30"), Duration::from_millis(200)).is_err());
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let spec = Spec { label: "nothing".into(), program: "/nonexistent/qemu".into(), args: vec![], env: vec![] };
        assert!(matches!(VmProcess::spawn(&spec), Err(BenchError::Spawn { .. })));
    }
}
