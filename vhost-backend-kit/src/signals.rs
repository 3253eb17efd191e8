//! Exit signals: SIGTERM, SIGINT and SIGHUP end a backend daemon, whatever its other threads
//! are doing.
//!
//! What went wrong before (blockd under `run-vm | tee log`, then Ctrl-C): the signals were
//! blocked in every thread and one thread took them, but that thread logged first. With stderr
//! a full pipe, another thread was blocked in `write(2)` holding std's stderr lock, so the
//! signal thread waited on that futex for ever; with the pipe's reader gone, tracing-subscriber
//! reported the failed write with `eprintln!`, which panicked and ended the signal thread.
//! Either way nothing took SIGTERM any more and only SIGKILL ended the process.
//!
//! So here: the signals are blocked in every thread ([`ExitSignals::install`] runs before any
//! other thread starts) and taken by one waiter thread that neither logs nor takes a lock the
//! daemon uses. On the first signal the daemon's cleanup ([`ExitSignals::on_exit`], e.g. flush
//! the images) runs on its own thread under a deadline; a second signal ends the process at
//! once (status 128 + signal); the end is `_exit(2)`, which runs no atexit handler and takes no
//! lock (`std::process::exit` flushes stdout and runs libc's exit handlers first).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The signals that end a daemon.
pub const EXIT_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
/// How long the cleanup may take by default before the process ends without it.
pub const CLEANUP_DEADLINE: Duration = Duration::from_secs(10);
/// The exit status when the cleanup did not finish within its deadline (or panicked).
pub const STATUS_CLEANUP_FAILED: i32 = 1;
/// How long the exit waits, after the cleanup, for its log line (stderr may be a full pipe).
const LOG_GRACE: Duration = Duration::from_millis(200);
/// How often the waiter looks for the cleanup's end while it waits for a second signal.
const TICK: Duration = Duration::from_millis(10);

type Cleanup = Box<dyn FnOnce(i32) -> i32 + Send>;

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("blocking the exit signals: {0}")]
    Mask(#[source] std::io::Error),
    #[error("starting the signal thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The exit-signal waiter of this process; clones share it.
#[derive(Clone)]
pub struct ExitSignals {
    cleanup: Arc<Mutex<Option<Cleanup>>>,
}

impl ExitSignals {
    /// Blocks [`EXIT_SIGNALS`] in the calling thread, and so in every thread started after it
    /// (call it first thing in `main`), and starts the thread that waits for them. `deadline`
    /// bounds the cleanup.
    pub fn install(deadline: Duration) -> Result<ExitSignals, SignalError> {
        let set = exit_set();
        // SAFETY: a valid, initialised set; the old mask is not asked for.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(SignalError::Mask(std::io::Error::from_raw_os_error(rc)));
        }
        let cleanup: Arc<Mutex<Option<Cleanup>>> = Arc::new(Mutex::new(None));
        let shared = cleanup.clone();
        std::thread::Builder::new()
            .name("exit-signals".into())
            .spawn(move || wait_and_exit(&set, &shared, deadline))
            .map_err(SignalError::Thread)?;
        Ok(ExitSignals { cleanup })
    }

    /// Sets what runs on the first exit signal (replacing what was set before): it gets the
    /// signal and returns the exit status. Without one the process exits 0. It should do its
    /// essential work (flushing) before it logs: a log line may block on a full stderr pipe
    /// until the deadline.
    pub fn on_exit(&self, cleanup: impl FnOnce(i32) -> i32 + Send + 'static) {
        *self.cleanup.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(cleanup));
    }
}

fn exit_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset adds valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in EXIT_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Takes one of `set` (blocked in every thread), waiting at most `timeout` (for ever: `None`).
fn take_signal(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<i32> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let sig = match deadline {
            // SAFETY: a valid set; no siginfo is asked for.
            None => unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) },
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                let ts = libc::timespec {
                    tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
                    tv_nsec: libc::c_long::from(left.subsec_nanos()),
                };
                // SAFETY: a valid set and timespec; no siginfo is asked for.
                unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) }
            }
        };
        if sig > 0 {
            return Some(sig);
        }
        // EAGAIN: the timeout passed; EINTR (another signal's handler ran): wait on.
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
            return None;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
    }
}

/// Ends the process now with `status`.
fn exit_now(status: i32) -> ! {
    // SAFETY: _exit ends the process at once; it has no preconditions. No destructor, atexit
    // handler or stdio flush runs: nothing here may wait on a lock another thread holds.
    unsafe { libc::_exit(status) }
}

enum Step {
    /// The cleanup returned this status.
    Done(i32),
    /// And its log line is written.
    Logged,
}

/// The waiter thread: never logs, takes no lock but the cleanup slot's (held only to set it).
fn wait_and_exit(set: &libc::sigset_t, cleanup: &Mutex<Option<Cleanup>>, deadline: Duration) -> ! {
    let Some(first) = take_signal(set, None) else { exit_now(STATUS_CLEANUP_FAILED) };
    let cleanup = cleanup.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (tx, rx) = mpsc::channel::<Step>();
    let spawned = std::thread::Builder::new().name("exit-cleanup".into()).spawn(move || {
        let status = match cleanup {
            Some(f) => catch_unwind(AssertUnwindSafe(|| f(first))).unwrap_or(STATUS_CLEANUP_FAILED),
            None => 0,
        };
        let _ = tx.send(Step::Done(status));
        tracing::info!(signal = first, status, "exit signal: cleaned up, exiting");
        let _ = tx.send(Step::Logged);
    });
    if spawned.is_err() {
        // No thread for the cleanup: not doing it beats hanging in it.
        exit_now(STATUS_CLEANUP_FAILED);
    }
    let mut status = None;
    let mut until = Instant::now() + deadline;
    loop {
        match rx.try_recv() {
            Ok(Step::Done(s)) => {
                status = Some(s);
                until = Instant::now() + LOG_GRACE;
                continue;
            }
            Ok(Step::Logged) | Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Some(second) = take_signal(set, Some(left.min(TICK))) {
            exit_now(128 + second);
        }
    }
    exit_now(status.unwrap_or(STATUS_CLEANUP_FAILED))
}
