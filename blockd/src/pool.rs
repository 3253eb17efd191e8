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
