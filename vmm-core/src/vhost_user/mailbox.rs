//! The transport's requests to a device's worker: a queue that vCPU threads post to without
//! ever waiting on the backend, and that stays bounded whatever the guest does while the backend
//! is slow or gone.
//!
//! Bounded by coalescing, then by a cap:
//! - a config write removes the queued config writes (after the last other command) whose bytes
//!   it overwrites: a guest rewriting one field keeps one entry for it;
//! - a stop cancels a start still queued just before it (the backend never saw the rings);
//! - a reset supersedes every queued FEATURES_OK, start, stop and reset (it undoes them; the
//!   older reset numbers complete with it, as completion takes the highest number);
//! - past [`MAILBOX_CAP`] entries anything but a reset or exit is dropped, and the mailbox
//!   records the overflow: the worker then sets DEVICE_NEEDS_RESET (the device can no longer
//!   promise what the driver asked), and the driver's reset clears it.

use super::worker::Command;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// Most commands queued at once, about 1 MiB. Coalesced, one device-config region of 4 KiB
/// holds at most 4096 writes of each width (1, 2, 4) that no later write covers, and the status
/// commands at most a few between two resets, so only a guest writing every offset at every
/// width while the backend does not answer gets here.
pub const MAILBOX_CAP: usize = 16 * 1024;

/// The queue of commands and the eventfd that wakes the worker for them.
pub struct Mailbox {
    queue: Mutex<VecDeque<Command>>,
    pub wake: EventFd,
    overflowed: AtomicBool,
}

impl Mailbox {
    pub fn new(wake: EventFd) -> Self {
        Mailbox { queue: Mutex::new(VecDeque::new()), wake, overflowed: AtomicBool::new(false) }
    }

    /// Queues `c` (coalesced, see the module docs) and wakes the worker. Never blocks on the
    /// backend: the lock is only held by this and [`Mailbox::take`].
    pub fn post(&self, c: Command) {
        let accepted = push_coalesced(&mut crate::devices::bus::lock(&self.queue), c);
        if !accepted && !self.overflowed.swap(true, Ordering::SeqCst) {
            tracing::warn!(cap = MAILBOX_CAP, "vhost-user mailbox full: dropping driver requests, DEVICE_NEEDS_RESET");
        }
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %e, "waking the vhost-user worker");
        }
    }

    /// The oldest queued command.
    pub fn take(&self) -> Option<Command> {
        crate::devices::bus::lock(&self.queue).pop_front()
    }

    /// Whether a request was dropped since the last call.
    pub fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        crate::devices::bus::lock(&self.queue).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends `c` to `q` as [`Mailbox::post`] describes; false when it was dropped.
fn push_coalesced(q: &mut VecDeque<Command>, c: Command) -> bool {
    match &c {
        Command::WriteConfig { offset, data } => {
            let (start, end) = (u64::from(*offset), u64::from(*offset) + data.len() as u64);
            // Only the trailing run of config writes: nothing else may move across them.
            let run = q.iter().rev().take_while(|e| matches!(e, Command::WriteConfig { .. })).count();
            let first = q.len() - run;
            let mut i = first;
            while i < q.len() {
                let covered = matches!(&q[i], Command::WriteConfig { offset: o, data: d }
                    if u64::from(*o) >= start && u64::from(*o) + d.len() as u64 <= end);
                if covered {
                    q.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        Command::Stop => {
            if matches!(q.back(), Some(Command::Start(_))) {
                q.pop_back();
                return true;
            }
        }
        Command::Reset(_) => {
            q.retain(|e| matches!(e, Command::WriteConfig { .. } | Command::Exit));
            q.push_back(c);
            return true;
        }
        Command::Exit => {
            q.push_back(c);
            return true;
        }
        Command::FeaturesOk(_) | Command::Start(_) => {}
    }
    if q.len() >= MAILBOX_CAP {
        return false;
    }
    q.push_back(c);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio_pci::QueueConfig;

    fn mailbox() -> Mailbox {
        Mailbox::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
    }

    fn drain(m: &Mailbox) -> Vec<Command> {
        std::iter::from_fn(|| m.take()).collect()
    }

    fn q0() -> QueueConfig {
        QueueConfig { index: 0, size: 8, desc: 0, avail: 0x100, used: 0x200, vector: 0 }
    }

    #[test]
    fn a_guest_hammering_config_writes_keeps_one_entry_per_field() {
        let m = mailbox();
        for i in 0..100_000u32 {
            m.post(Command::WriteConfig { offset: 4, data: i.to_le_bytes().to_vec() });
            m.post(Command::WriteConfig { offset: 8, data: vec![i as u8] });
        }
        let got = drain(&m);
        assert_eq!(got.len(), 2, "{got:?}");
        // The last value of each field survives, in the order of their last writes.
        assert!(matches!(&got[0], Command::WriteConfig { offset: 4, data } if data[..] == 99_999u32.to_le_bytes()));
        assert!(matches!(&got[1], Command::WriteConfig { offset: 8, data } if data[..] == [99_999u32 as u8]));
        assert!(!m.take_overflow());
    }

    #[test]
    fn a_wider_write_replaces_the_narrow_ones_it_covers_but_not_across_other_commands() {
        let m = mailbox();
        m.post(Command::WriteConfig { offset: 0, data: vec![1] });
        m.post(Command::FeaturesOk(1));
        m.post(Command::WriteConfig { offset: 4, data: vec![2] });
        m.post(Command::WriteConfig { offset: 2, data: vec![3, 3] });
        m.post(Command::WriteConfig { offset: 4, data: vec![4, 4, 4, 4] });
        let got = drain(&m);
        let shape: Vec<_> = got
            .iter()
            .map(|c| match c {
                Command::WriteConfig { offset, data } => (*offset, data.clone()),
                Command::FeaturesOk(_) => (999, vec![]),
                _ => (1000, vec![]),
            })
            .collect();
        // The write before FEATURES_OK stays before it; [4] is covered by [4,4,4,4]; [3,3] at
        // 2..4 is not.
        assert_eq!(shape, vec![(0, vec![1]), (999, vec![]), (2, vec![3, 3]), (4, vec![4, 4, 4, 4])]);
    }

    #[test]
    fn toggling_the_device_while_the_backend_is_slow_stays_bounded() {
        let m = mailbox();
        m.post(Command::FeaturesOk(1));
        for _ in 0..10_000 {
            m.post(Command::Start(vec![q0()]));
            m.post(Command::Stop);
        }
        m.post(Command::Start(vec![q0()]));
        let got = drain(&m);
        assert!(matches!(got[..], [Command::FeaturesOk(1), Command::Start(_)]), "{got:?}");
        for seq in 1..=10_000 {
            m.post(Command::FeaturesOk(seq));
            m.post(Command::Start(vec![q0()]));
            m.post(Command::Reset(seq));
        }
        let got = drain(&m);
        assert!(matches!(got[..], [Command::Reset(10_000)]), "{got:?}");
    }

    #[test]
    fn past_the_cap_requests_are_dropped_and_the_overflow_reported_but_reset_and_exit_pass() {
        let m = mailbox();
        for i in 0..(MAILBOX_CAP as u32 + 10) {
            m.post(Command::WriteConfig { offset: i * 4, data: vec![1] });
        }
        assert_eq!(m.len(), MAILBOX_CAP);
        assert!(m.take_overflow());
        assert!(!m.take_overflow(), "reported once");
        m.post(Command::Reset(1));
        m.post(Command::Exit);
        let got = drain(&m);
        assert_eq!(got.len(), MAILBOX_CAP + 2);
        assert!(matches!(got[MAILBOX_CAP..], [Command::Reset(1), Command::Exit]));
    }
}
