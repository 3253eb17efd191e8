//! The rings of one vhost-user connection as a backend serves them: every chain is taken with
//! [`TrackedQueue::pop`] and given back with [`TrackedQueue::add_used`], which keep the
//! inflight region (when the frontend handed one over) exactly as the vhost-user spec says,
//! count what is in flight (so GET_VRING_BASE can wait for it), and refuse a ring whose driver
//! published an impossible available index instead of spinning on it.
//!
//! Lock order: a queue's state, then the vring. Taking, recording, the used-ring update and
//! clearing the record happen under the queue's lock, so completions from several threads
//! (an I/O pool and the queue thread) keep the region consistent with the used ring.

use std::collections::VecDeque;
use std::fs::File;
use std::num::Wrapping;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserInflight;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::inflight::{InflightError, QueueRegion, Recovery, Region};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue {0}: the inflight region has no part for it")]
    NoRegionPart(u16),
    #[error("queue {index}: size {size} exceeds the inflight region's {region} entries")]
    RegionTooSmall { index: u16, size: u16, region: u16 },
    #[error("queue {0}: reading the used ring's index: {1:?}")]
    UsedIdx(u16, virtio_queue::Error),
    #[error("queue {0}: kicking itself after recovery: {1}")]
    Kick(u16, #[source] std::io::Error),
    #[error("no queue {0}")]
    NoQueue(u32),
    #[error(transparent)]
    Region(#[from] InflightError),
}

impl From<QueueError> for std::io::Error {
    fn from(e: QueueError) -> std::io::Error {
        let kind = match e {
            QueueError::Region(_) | QueueError::NoRegionPart(_) | QueueError::RegionTooSmall { .. } | QueueError::NoQueue(_) => {
                std::io::ErrorKind::InvalidInput
            }
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// What completing a popped chain needs besides its length: its head, and the ring start it
/// belongs to (a chain taken before the ring restarted is not completed on the new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    head: u16,
    generation: u64,
}

impl Ticket {
    pub fn head(&self) -> u16 {
        self.head
    }
}

/// A chain taken from a ring.
pub struct Taken<M: Deref>
where
    M::Target: GuestMemory,
{
    pub chain: DescriptorChain<M>,
    pub ticket: Ticket,
}

#[derive(Default)]
struct State {
    /// Bumped at every ring start and at close: completions of an earlier one are dropped.
    generation: u64,
    region: Option<QueueRegion>,
    /// The next `counter` to record.
    counter: u64,
    /// Heads to take again before new chains, oldest first.
    resubmit: VecDeque<u16>,
    /// Taken in this generation and not completed.
    in_flight: usize,
    /// The driver published an available index more than a queue size ahead.
    broken: bool,
    /// The connection is over.
    closed: bool,
}

/// One ring of a connection.
pub struct TrackedQueue {
    index: u16,
    state: Mutex<State>,
    idle: Condvar,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes 1 to an eventfd.
fn write_eventfd(fd: &impl AsRawFd) -> std::io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local buffer to a descriptor the caller holds open.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl TrackedQueue {
    pub fn new(index: u16) -> TrackedQueue {
        TrackedQueue { index, state: Mutex::new(State::default()), idle: Condvar::new() }
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// The ring starts (SET_VRING_KICK made it ready): forget what an earlier start took, and
    /// with a region recover as the spec says — `next_avail` is the used ring's idx plus the
    /// entries in flight (overriding SET_VRING_BASE), those entries are taken again first,
    /// oldest first, and the ring's kick is written so they run at once.
    pub fn start(&self, vring: &VringRwLock, region: Option<QueueRegion>) -> Result<(), QueueError> {
        let mut st = lock(&self.state);
        st.generation += 1;
        st.in_flight = 0;
        st.broken = false;
        st.closed = false;
        st.resubmit.clear();
        st.counter = 0;
        st.region = None;
        self.idle.notify_all();
        let Some(region) = region else { return Ok(()) };
        let size = vring.get_ref().get_queue().size();
        if size > region.desc_num() {
            return Err(QueueError::RegionTooSmall { index: self.index, size, region: region.desc_num() });
        }
        let used = vring.queue_used_idx().map_err(|e| QueueError::UsedIdx(self.index, e))?;
        match region.recover(used) {
            Recovery::Fresh => {}
            Recovery::Resume { next_avail, resubmit, next_counter } => {
                tracing::info!(
                    queue = self.index,
                    used,
                    next_avail,
                    resubmit = resubmit.len(),
                    "ring recovered from the inflight region"
                );
                vring.set_queue_next_avail(next_avail);
                vring.set_queue_next_used(used);
                // A head past this ring's size (a region written for a bigger ring, or
                // corrupted) names no descriptor: not resubmitted.
                let (fits, past): (Vec<u16>, Vec<u16>) = resubmit.into_iter().partition(|&h| h < size);
                if !past.is_empty() {
                    tracing::warn!(queue = self.index, heads = ?past, size, "inflight heads past the ring's size ignored");
                }
                st.resubmit = fits.into();
                st.counter = next_counter;
                // "In case of I/O hang after reconnecting": the worker runs once the kick fd
                // joins its epoll, whether or not the driver kicks again.
                if let Some(kick) = vring.get_ref().get_kick() {
                    write_eventfd(kick).map_err(|e| QueueError::Kick(self.index, e))?;
                }
            }
        }
        st.region = Some(region);
        Ok(())
    }

    /// The connection is over: nothing more is taken, and completions still to come are
    /// dropped (their records stay in the region; the next backend resubmits them).
    pub fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        st.generation += 1;
        st.in_flight = 0;
        self.idle.notify_all();
    }

    /// Takes the next chain: one to resubmit first, else a new one from the available ring,
    /// recorded in the region. None when there is none, or the ring is closed or broken.
    pub fn pop<M>(&self, vring: &VringRwLock, mem: M) -> Option<Taken<M>>
    where
        M: Clone + Deref,
        M::Target: GuestMemory,
    {
        let mut st = lock(&self.state);
        if st.closed || st.broken {
            return None;
        }
        let generation = st.generation;
        if let Some(head) = st.resubmit.pop_front() {
            let state = vring.get_ref();
            let q = state.get_queue();
            let chain = DescriptorChain::new(mem, GuestAddress(q.desc_table()), q.size(), head);
            st.in_flight += 1;
            return Some(Taken { chain, ticket: Ticket { head, generation } });
        }
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        if !q.ready() {
            return None;
        }
        let avail = match q.avail_idx(mem.deref(), Ordering::Acquire) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(queue = self.index, "reading the available index: {e:?}");
                return None;
            }
        };
        let ahead = (avail - Wrapping(q.next_avail())).0;
        if ahead > q.size() {
            // rust-vmm vm-virtio#196: served as usual this spins for ever. Stop the ring and
            // tell the frontend (SET_VRING_ERR), which puts the device in NEEDS_RESET.
            st.broken = true;
            tracing::warn!(
                queue = self.index,
                avail = avail.0,
                next_avail = q.next_avail(),
                size = q.size(),
                "available index more than a queue size ahead: ring stopped until restarted"
            );
            match state.signal_err() {
                Ok(true) => {}
                Ok(false) => tracing::warn!(queue = self.index, "the frontend gave no error eventfd"),
                Err(e) => tracing::warn!(queue = self.index, "signalling the ring error: {e}"),
            }
            return None;
        }
        let chain = q.iter(mem).ok()?.next()?;
        let head = chain.head_index();
        if let Some(r) = &st.region {
            let c = st.counter;
            r.record(head, c);
            st.counter = c.wrapping_add(1);
        }
        st.in_flight += 1;
        Some(Taken { chain, ticket: Ticket { head, generation } })
    }

    /// Puts a taken chain in the used ring (one element, one batch) and clears its record, as
    /// the spec orders it: `last_batch_head`, the used idx, `inflight = 0`, the region's
    /// `used_idx`. Returns whether the element was added (the caller then signals the guest
    /// as EVENT_IDX says); false for a chain of an earlier ring start or a closed connection.
    pub fn add_used(&self, vring: &VringRwLock, ticket: Ticket, len: u32) -> bool {
        let mut st = lock(&self.state);
        if st.closed || ticket.generation != st.generation {
            return false;
        }
        if let Some(r) = &st.region {
            r.pre_put(ticket.head);
        }
        let added = match vring.add_used(ticket.head, len) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(queue = self.index, head = ticket.head, "adding a used entry: {e:?}");
                false
            }
        };
        if added {
            if let Some(r) = &st.region {
                r.post_put(ticket.head, vring.get_ref().get_queue().next_used());
            }
        }
        st.in_flight = st.in_flight.saturating_sub(1);
        self.idle.notify_all();
        added
    }

    /// Puts several taken chains in the used ring with one update of its index, so the driver
    /// sees all of them or none: virtio-net's merged receive buffers, whose first buffer
    /// announces how many follow (a driver that found only the first would drop the frame
    /// and take the others for frames of their own). `mem` is the ring's guest memory.
    /// Inflight: every record but the last is cleared before the index moves, the last as
    /// [`Self::add_used`] does (the spec keeps one `last_batch_head`); a backend killed in
    /// between leaves those buffers with neither side, never completes one twice.
    /// With EVENT_IDX, `needs_notification` counts the batch as one element: a caller
    /// decides on interrupts from the used index before and after (see `used_event`).
    /// Returns whether the batch was added; false (nothing added) for chains of an earlier
    /// ring start, a closed connection or a used ring outside `mem`.
    pub fn add_used_batch<M: GuestMemory>(&self, vring: &VringRwLock, mem: &M, items: &[(Ticket, u32)]) -> bool {
        let Some((&(last, last_len), first)) = items.split_last() else { return true };
        let mut st = lock(&self.state);
        if st.closed || items.iter().any(|(t, _)| t.generation != st.generation) {
            return false;
        }
        let start = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            let (size, used, start) = (q.size(), q.used_ring(), q.next_used());
            for (i, (t, len)) in first.iter().enumerate() {
                let slot = start.wrapping_add(i as u16) % size.max(1);
                // struct virtq_used_elem: le32 id, le32 len.
                let mut elem = [0u8; 8];
                elem[..4].copy_from_slice(&u32::from(t.head).to_le_bytes());
                elem[4..].copy_from_slice(&len.to_le_bytes());
                let written = used
                    .checked_add(4 + 8 * u64::from(slot))
                    .is_some_and(|at| mem.write_slice(&elem, GuestAddress(at)).is_ok());
                if t.head >= size || !written {
                    tracing::warn!(queue = self.index, head = t.head, "adding a used entry of a batch failed");
                    return false;
                }
            }
            q.set_next_used(start.wrapping_add(first.len() as u16));
            start
        };
        if let Some(r) = &st.region {
            for (t, _) in first {
                r.clear(t.head);
            }
            r.pre_put(last.head);
        }
        // The last element publishes the index, past the whole batch.
        let added = match vring.add_used(last.head, last_len) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(queue = self.index, head = last.head, "adding a used entry: {e:?}");
                vring.get_mut().get_queue_mut().set_next_used(start);
                false
            }
        };
        if added {
            if let Some(r) = &st.region {
                r.post_put(last.head, vring.get_ref().get_queue().next_used());
            }
        }
        st.in_flight = st.in_flight.saturating_sub(items.len());
        self.idle.notify_all();
        added
    }

    /// Chains taken since the ring started and not completed.
    pub fn in_flight(&self) -> usize {
        lock(&self.state).in_flight
    }

    /// Whether the ring stopped on an impossible available index.
    pub fn is_broken(&self) -> bool {
        lock(&self.state).broken
    }

    /// Waits, at most `timeout`, until every chain taken is completed but the `parked()` ones
    /// the device holds without running (a stopping error policy keeps them in flight, and
    /// recorded, until the VM resumes). Returns whether it got there.
    pub fn wait_idle(&self, timeout: Duration, parked: impl Fn() -> usize) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            // Outside the queue's lock: `parked` may take the device's.
            let parked = parked();
            let st = lock(&self.state);
            if st.in_flight <= parked {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Woken by each completion; a request parked meanwhile wakes nobody: look again soon.
            drop(self.idle.wait_timeout(st, left.min(Duration::from_millis(10))));
        }
    }

    /// Notifications back on; true when more chains wait (as `VringT::enable_notification`),
    /// but false on a broken or closed ring, whose available index is not to be served.
    pub fn enable_notification(&self, vring: &VringRwLock) -> std::io::Result<bool> {
        {
            let st = lock(&self.state);
            if st.broken || st.closed {
                return Ok(false);
            }
        }
        vring.enable_notification().map_err(|e| std::io::Error::other(format!("{e:?}")))
    }

    /// Takes every available chain, handing each to `f`, with notifications off while it does
    /// and until the driver adds nothing more (so a driver adding requests meanwhile need not
    /// kick); `after_batch` runs after each pass.
    pub fn drain<M>(
        &self,
        vring: &VringRwLock,
        mem: M,
        mut f: impl FnMut(Taken<M>),
        mut after_batch: impl FnMut(),
    ) -> std::io::Result<()>
    where
        M: Clone + Deref,
        M::Target: GuestMemory,
    {
        loop {
            vring.disable_notification().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            while let Some(t) = self.pop(vring, mem.clone()) {
                f(t);
            }
            after_batch();
            if !self.enable_notification(vring)? {
                return Ok(());
            }
        }
    }
}

/// The rings of one connection with the inflight region the frontend handed over, if any:
/// what a backend's GET_INFLIGHT_FD, SET_INFLIGHT_FD and `start_vring` hooks call.
pub struct TrackedRings {
    queues: Vec<Arc<TrackedQueue>>,
    region: Mutex<Option<Arc<Region>>>,
}

impl TrackedRings {
    pub fn new(num_queues: usize) -> TrackedRings {
        TrackedRings {
            queues: (0..num_queues).map(|i| Arc::new(TrackedQueue::new(u16::try_from(i).unwrap_or(u16::MAX)))).collect(),
            region: Mutex::new(None),
        }
    }

    pub fn queue(&self, index: usize) -> Option<&Arc<TrackedQueue>> {
        self.queues.get(index)
    }

    pub fn queues(&self) -> &[Arc<TrackedQueue>] {
        &self.queues
    }

    /// Whether the frontend handed over a region (SET_INFLIGHT_FD).
    pub fn has_region(&self) -> bool {
        self.region.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// GET_INFLIGHT_FD: a new zeroed region for the frontend to keep. Not used here until the
    /// frontend hands it back with SET_INFLIGHT_FD (as libvhost-user).
    pub fn get_inflight_fd(&self, request: &VhostUserInflight) -> Result<(VhostUserInflight, File), QueueError> {
        let (_region, reply, file) = Region::create(request)?;
        tracing::info!(
            num_queues = request.num_queues,
            queue_size = request.queue_size,
            size = reply.mmap_size,
            "inflight region created"
        );
        Ok((reply, file))
    }

    /// SET_INFLIGHT_FD: the region to track in from now on (its rings start after this).
    pub fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> Result<(), QueueError> {
        let region = Region::open(&file, msg)?;
        tracing::info!(num_queues = msg.num_queues, queue_size = msg.queue_size, "inflight region set");
        *self.region.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
        Ok(())
    }

    /// A ring starts: recover it from the region, if there is one.
    pub fn start_vring(&self, index: u32, vring: &VringRwLock) -> Result<(), QueueError> {
        let q = self.queues.get(index as usize).ok_or(QueueError::NoQueue(index))?;
        let region = self.region.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let part = match region {
            Some(r) => Some(QueueRegion::new(r, q.index()).ok_or(QueueError::NoRegionPart(q.index()))?),
            None => None,
        };
        q.start(vring, part)
    }

    /// The connection is over (see [`TrackedQueue::close`]).
    pub fn close(&self) {
        for q in &self.queues {
            q.close();
        }
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
