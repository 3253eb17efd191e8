//! A small thread pool for blocking image I/O: each request runs on its own thread up to a
//! bound, so the queue depth the guest offers reaches the host (the kernel, the file system,
//! the device) instead of being served one request at a time per queue.
//!
//! Threads start on demand (none while a drive is idle) and exit after a while without work.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle I/O thread waits for work before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(10);

struct State {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    max_threads: usize,
    name: String,
}

pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    pub fn new(name: &str, max_threads: usize) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State { jobs: VecDeque::new(), threads: 0, idle: 0, closing: false }),
                cv: Condvar::new(),
                max_threads: max_threads.max(1),
                name: name.to_string(),
            }),
        }
    }

    /// Runs `job` on a pool thread.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.jobs.push_back(Box::new(job));
        if st.idle >= st.jobs.len() || st.threads >= self.shared.max_threads {
            self.shared.cv.notify_one();
            return;
        }
        st.threads += 1;
        let shared = self.shared.clone();
        let spawned =
            std::thread::Builder::new().name(format!("{}-io", self.shared.name)).spawn(move || worker(shared));
        if let Err(e) = spawned {
            // The job stays queued for the threads that exist (there is at least one unless
            // this was the first; then it runs when a later spawn succeeds).
            st.threads -= 1;
            tracing::error!("cannot start an I/O thread: {e}");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).closing = true;
        self.shared.cv.notify_all();
    }
}

fn worker(shared: Arc<Shared>) {
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            job();
            st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        if st.closing {
            break;
        }
        st.idle += 1;
        let (guard, timeout) = shared.cv.wait_timeout(st, IDLE_EXIT).unwrap_or_else(|p| p.into_inner());
        st = guard;
        st.idle -= 1;
        if timeout.timed_out() && st.jobs.is_empty() {
            break;
        }
    }
    st.threads -= 1;
}

/// Bytes of bounce buffers a drive may hold at once: requests wait for their share, never
/// fail for it (QEMU bounds its bounce memory the same way, by waiting).
pub const BOUNCE_BUDGET: usize = 64 << 20;

/// A per-drive budget of bounce-buffer bytes.
pub struct Budget {
    state: Mutex<BudgetState>,
    cv: Condvar,
    capacity: usize,
}

struct BudgetState {
    used: usize,
    /// The most ever held at once (for tests and logs).
    peak: usize,
}

/// Bytes taken from a [`Budget`]; given back on drop.
pub struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(capacity: usize) -> Arc<Budget> {
        Arc::new(Budget {
            state: Mutex::new(BudgetState { used: 0, peak: 0 }),
            cv: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(self: &Arc<Self>, st: &mut BudgetState, bytes: usize) -> Charge {
        st.used += bytes;
        st.peak = st.peak.max(st.used);
        Charge { budget: self.clone(), bytes }
    }

    /// Waits until `bytes` (at most the whole budget: a request larger than it waits for
    /// all of it) are free, and takes them. Only on threads that may block.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        let bytes = bytes.min(self.capacity);
        let mut st = self.state();
        while st.used + bytes > self.capacity {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        self.take(&mut st, bytes)
    }

    /// Takes `bytes` if they are free now (for threads that must not block).
    pub fn try_charge(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        let bytes = bytes.min(self.capacity);
        let mut st = self.state();
        (st.used + bytes <= self.capacity).then(|| self.take(&mut st, bytes))
    }

    /// The most bytes held at once so far.
    pub fn peak(&self) -> usize {
        self.state().peak
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        self.budget.state().used -= self.bytes;
        self.budget.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn runs_jobs_concurrently_up_to_the_bound() {
        let pool = Pool::new("t", 4);
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let (tx, rx) = channel();
        for i in 0..4 {
            let (b, tx) = (barrier.clone(), tx.clone());
            // All four must be running at once to pass the barrier.
            pool.spawn(move || {
                b.wait();
                tx.send(i).unwrap();
            });
        }
        let mut got: Vec<i32> = (0..4).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 2, 3]);
        // More jobs than threads still all run.
        for i in 0..20 {
            let tx = tx.clone();
            pool.spawn(move || tx.send(i).unwrap());
        }
        let got: Vec<i32> = (0..20).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        assert_eq!(got.len(), 20);
        assert!(pool.shared.state.lock().unwrap().threads <= 4);
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn charges_wait_for_room_and_never_exceed_it() {
        let b = Budget::new(100);
        let a = b.charge(60);
        assert!(b.try_charge(50).is_none());
        let c = b.try_charge(40).expect("fits");
        let t = {
            let b = b.clone();
            std::thread::spawn(move || drop(b.charge(1000)))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "a charge larger than the budget waits for all of it");
        drop((a, c));
        t.join().unwrap();
        assert_eq!(b.peak(), 100);
    }
}
