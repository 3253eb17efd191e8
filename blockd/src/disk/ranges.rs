//! Byte-range locks over an O_DIRECT image: a read-modify-write of a block must not interleave
//! with another write of that block, or one of the two is lost (QEMU's serialising requests).
//! Aligned writes share ranges with each other; a read-modify-write holds its aligned range
//! alone. Reads take nothing: a read-modify-write puts back the bytes it did not change.

use std::sync::{Arc, Condvar, Mutex};

struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

#[derive(Default)]
struct State {
    held: Vec<Held>,
    next_id: u64,
}

#[derive(Default)]
pub struct RangeLocks {
    state: Mutex<State>,
    cv: Condvar,
}

/// A held range; released on drop.
pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    id: u64,
}

impl RangeLocks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conflicts(st: &State, start: u64, end: u64, exclusive: bool) -> bool {
        st.held.iter().any(|h| h.start < end && start < h.end && (exclusive || h.exclusive))
    }

    fn take(self: &Arc<Self>, st: &mut State, start: u64, end: u64, exclusive: bool) -> RangeGuard {
        st.next_id += 1;
        let id = st.next_id;
        st.held.push(Held { id, start, end, exclusive });
        RangeGuard { locks: self.clone(), id }
    }

    /// Waits until `start..end` can be held (alone when `exclusive`), then holds it.
    pub fn lock(self: &Arc<Self>, start: u64, end: u64, exclusive: bool) -> RangeGuard {
        let mut st = self.state();
        while Self::conflicts(&st, start, end, exclusive) {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        self.take(&mut st, start, end, exclusive)
    }

    /// Holds `start..end` if that needs no waiting (for threads that must not block).
    pub fn try_lock(self: &Arc<Self>, start: u64, end: u64, exclusive: bool) -> Option<RangeGuard> {
        let mut st = self.state();
        (!Self::conflicts(&st, start, end, exclusive)).then(|| self.take(&mut st, start, end, exclusive))
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut st = self.locks.state();
        st.held.retain(|h| h.id != self.id);
        drop(st);
        self.locks.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_overlaps_only() {
        let l = Arc::new(RangeLocks::default());
        let a = l.lock(0, 4096, false);
        let b = l.try_lock(0, 4096, false).expect("shared with shared");
        assert!(l.try_lock(2048, 8192, true).is_none(), "exclusive waits for overlapping writes");
        let c = l.try_lock(4096, 8192, true).expect("no overlap");
        assert!(l.try_lock(4095, 4097, false).is_none(), "shared waits for an overlapping exclusive");
        drop((a, b));
        let t = {
            let l = l.clone();
            std::thread::spawn(move || drop(l.lock(0, 8192, true)))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_finished(), "blocked by c");
        drop(c);
        t.join().unwrap();
    }
}
