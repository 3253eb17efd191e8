//! SIGKILLing a supervised device daemon (blockd, balloond under the `flotilla` launcher) again
//! and again while the guest works, on a thread, each kill only once the daemon serves: the
//! frontend has connected and given it guest RAM (its memory map shows vmm-core's guest-RAM
//! memfd), then a random delay. Records when each kill happened and how long the launcher and
//! vmm-core took to have a new daemon serving again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::process::{alive, daemon_child, signal, wait_gone};

/// The name vmm-core gives its guest-RAM memfd (vmm-core/src/memory.rs).
const GUEST_RAM_MEMFD: &str = "memfd:flotilla-guest-ram";

/// How a [`Killer`] kills.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Executable name prefix of the daemon (`blockd`, `balloond`).
    pub exe: &'static str,
    /// Random delay after the daemon serves, before the kill: from `min` to `max`.
    pub min: Duration,
    pub max: Duration,
    /// Stop after this many kills.
    pub max_kills: usize,
    /// A daemon not serving this long after the previous kill fails the run.
    pub restart_timeout: Duration,
    pub seed: u64,
}

/// One kill.
#[derive(Debug, Clone)]
pub struct Kill {
    pub pid: i32,
    /// When the signal was sent.
    pub at: Instant,
    /// How long the daemon had been serving when it was killed.
    pub served: Duration,
}

/// What a finished [`Killer`] did.
#[derive(Debug, Default)]
pub struct Report {
    pub kills: Vec<Kill>,
    /// Per kill that was followed by a new daemon: SIGKILL to the new one serving.
    pub back_in: Vec<Duration>,
    /// Why it stopped early, if it did (a daemon not restarted, one surviving SIGKILL).
    pub failure: Option<String>,
}

impl Report {
    pub fn max_back(&self) -> Duration {
        self.back_in.iter().copied().max().unwrap_or_default()
    }

    pub fn median_back(&self) -> Duration {
        let mut v = self.back_in.clone();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
}

/// A thread that kills the daemon until stopped or done; see the module docs.
pub struct Killer {
    stop: Arc<AtomicBool>,
    kills: Arc<AtomicUsize>,
    handle: Option<JoinHandle<Report>>,
}

/// Whether `pid` has guest RAM mapped: its frontend connected and sent SET_MEM_TABLE.
pub fn serving(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains(GUEST_RAM_MEMFD))
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

impl Killer {
    /// Starts killing the `plan.exe` child of the launcher `parent`.
    pub fn start(parent: i32, plan: Plan) -> Killer {
        let stop = Arc::new(AtomicBool::new(false));
        let kills = Arc::new(AtomicUsize::new(0));
        let (s, k) = (stop.clone(), kills.clone());
        let handle = std::thread::Builder::new()
            .name(format!("kill-{}", plan.exe))
            .spawn(move || run(parent, plan, &s, &k))
            .expect("spawning the killer thread");
        Killer { stop, kills, handle: Some(handle) }
    }

    /// Kills so far.
    pub fn kills(&self) -> usize {
        self.kills.load(Ordering::SeqCst)
    }

    /// Whether it has stopped on its own (done, or failed).
    pub fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stops it (a kill already decided on still happens) and returns what it did.
    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Sleeps up to `d`; false if told to stop meanwhile.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2).min(end.saturating_duration_since(Instant::now())));
    }
    !stop.load(Ordering::SeqCst)
}

fn run(parent: i32, plan: Plan, stop: &AtomicBool, count: &AtomicUsize) -> Report {
    let mut report = Report::default();
    let mut rng = plan.seed | 1;
    let mut last: Option<(i32, Instant)> = None;
    while report.kills.len() < plan.max_kills && !stop.load(Ordering::SeqCst) {
        // The daemon serving (a new one after a kill).
        let since = last.map(|(_, t)| t).unwrap_or_else(Instant::now);
        let pid = loop {
            if stop.load(Ordering::SeqCst) {
                return report;
            }
            if let Some(p) = daemon_child(parent, plan.exe, last.map(|(p, _)| p)).filter(|&p| serving(p)) {
                break p;
            }
            if since.elapsed() > plan.restart_timeout {
                report.failure =
                    Some(format!("no {} serving {:?} after the last kill", plan.exe, plan.restart_timeout));
                return report;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let up = Instant::now();
        if let Some((_, t)) = last {
            report.back_in.push(up - t);
        }
        let span = plan.max.saturating_sub(plan.min).as_micros().max(1) as u64;
        let delay = plan.min + Duration::from_micros(xorshift(&mut rng) % span);
        if !nap(delay, stop) {
            return report;
        }
        if !alive(pid) {
            report.failure = Some(format!("{} {pid} died on its own", plan.exe));
            return report;
        }
        signal(pid, libc::SIGKILL);
        let at = Instant::now();
        report.kills.push(Kill { pid, at, served: at - up });
        count.fetch_add(1, Ordering::SeqCst);
        if !wait_gone(pid, Duration::from_secs(5)) {
            report.failure = Some(format!("{} {pid} survived SIGKILL", plan.exe));
            return report;
        }
        last = Some((pid, at));
    }
    report
}
