//! The timers libslirp asks for (`timer_new*`, `timer_mod`, `timer_free`), kept on the stack's
//! thread and fired by its poll loop. Handles given to libslirp are small integers, never pointers
//! into this table, so a stale handle can only miss.

use std::collections::BTreeMap;

use libc::c_void;

use crate::ffi::{SlirpTimerCb, SlirpTimerId};

/// What firing a timer means.
#[derive(Clone, Copy)]
pub(crate) enum TimerAction {
    /// Made by `timer_new`: call libslirp's callback.
    Callback { cb: SlirpTimerCb, cb_opaque: *mut c_void },
    /// Made by `timer_new_opaque` (config version 4): `slirp_handle_timer(id, cb_opaque)`.
    Handle { id: SlirpTimerId, cb_opaque: *mut c_void },
}

struct Timer {
    action: TimerAction,
    /// Due time on the stack's clock, in ms; `None` while disarmed.
    due_ms: Option<i64>,
}

#[derive(Default)]
pub(crate) struct TimerTable {
    timers: BTreeMap<usize, Timer>,
    next_handle: usize,
}

impl TimerTable {
    /// A disarmed timer; the returned handle is never 0 (libslirp reads NULL as failure).
    pub(crate) fn create(&mut self, action: TimerAction) -> usize {
        self.next_handle += 1;
        self.timers.insert(self.next_handle, Timer { action, due_ms: None });
        self.next_handle
    }

    pub(crate) fn arm(&mut self, handle: usize, due_ms: i64) {
        if let Some(timer) = self.timers.get_mut(&handle) {
            timer.due_ms = Some(due_ms);
        }
    }

    pub(crate) fn remove(&mut self, handle: usize) {
        self.timers.remove(&handle);
    }

    /// Milliseconds from `now_ms` to the earliest armed timer (0 if one is overdue).
    pub(crate) fn next_due_in(&self, now_ms: i64) -> Option<i64> {
        self.timers.values().filter_map(|timer| timer.due_ms).min().map(|due| (due - now_ms).max(0))
    }

    /// Disarms the timers due by `now_ms` and returns their handles; the caller looks each up again
    /// with [`TimerTable::action`] right before firing it, since an earlier one may free it.
    pub(crate) fn take_due(&mut self, now_ms: i64) -> Vec<usize> {
        let mut due = Vec::new();
        for (handle, timer) in self.timers.iter_mut() {
            if timer.due_ms.is_some_and(|at| at <= now_ms) {
                timer.due_ms = None;
                due.push(*handle);
            }
        }
        due
    }

    pub(crate) fn action(&self, handle: usize) -> Option<TimerAction> {
        self.timers.get(&handle).map(|timer| timer.action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn never(_opaque: *mut c_void) {}

    #[test]
    fn due_timers_fire_once_and_freed_ones_never() {
        let mut table = TimerTable::default();
        let action = TimerAction::Callback { cb: never, cb_opaque: std::ptr::null_mut() };
        let first = table.create(action);
        let second = table.create(action);
        assert_ne!(first, 0);
        assert_eq!(table.next_due_in(0), None);
        table.arm(first, 100);
        table.arm(second, 50);
        assert_eq!(table.next_due_in(20), Some(30));
        assert_eq!(table.take_due(60), vec![second]);
        assert_eq!(table.take_due(60), Vec::<usize>::new());
        table.remove(first);
        assert!(table.action(first).is_none());
        assert_eq!(table.take_due(1000), Vec::<usize>::new());
    }
}
