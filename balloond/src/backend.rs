//! The vhost-user side of one connection: features, config space, the three queue workers
//! (one thread each: a long inflate never holds up a deflate the guest waits on), the held
//! stats buffer and the poller that returns it to ask for fresh numbers.

use std::fs::File;
use std::io;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_backend_kit::queue::{Ticket, TrackedRings};
use vhost::vhost_user::Backend;
use vhost_backend_kit::serve::{ExitEventError, ExitEvents};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::device::{lock, Device};
use crate::queues::{self, DEFLATE, INFLATE, NUM_QUEUES, STATS};

/// Queue size offered to the frontend.
pub const MAX_QUEUE_SIZE: usize = 256;

// Feature bits of virtio 1.2 section 5.5.3 (virtio-bindings 0.2.7 has no virtio_balloon).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;

/// The virtio features offered.
pub const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST
    | 1 << VIRTIO_BALLOON_F_STATS_VQ
    | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    ExitEvent(#[from] ExitEventError),
    #[error("starting the stats poller: {0}")]
    Poller(#[source] io::Error),
}

/// One connection's backend; cloned into every worker thread.
#[derive(Clone)]
pub struct BalloonBackend {
    inner: Arc<Inner>,
}

struct Inner {
    device: Arc<Device>,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    exit: ExitEvents,
    /// The stats buffer the guest handed us, held until we want fresh numbers, and its ring.
    /// It stays in flight meanwhile (in the inflight region too: a restarted balloond gets it
    /// back).
    stats_held: Mutex<Option<(VringRwLock, Ticket)>>,
    /// This connection's rings as the kit tracks them (inflight region, requests in flight).
    rings: TrackedRings,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The connection is over: nothing more goes to its rings.
        self.rings.close();
    }
}

impl BalloonBackend {
    pub fn new(device: Arc<Device>) -> Result<BalloonBackend, BackendError> {
        let exit = ExitEvents::new(NUM_QUEUES)?;
        Ok(BalloonBackend {
            inner: Arc::new(Inner {
                device,
                mem: Mutex::new(None),
                exit,
                stats_held: Mutex::new(None),
                rings: TrackedRings::new(NUM_QUEUES),
            }),
        })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.inner.device
    }

    /// Whether a stats buffer is held.
    pub fn holds_stats_buffer(&self) -> bool {
        lock(&self.inner.stats_held).is_some()
    }

    /// Returns the held stats buffer to the guest (used length 0), which asks it for fresh
    /// numbers: it refills the buffer and queues it again. Does nothing while no buffer is held
    /// or the ring is stopped. Returns whether a buffer went back.
    pub fn request_stats(&self) -> io::Result<bool> {
        let mut held = lock(&self.inner.stats_held);
        let Some((vring, ticket)) = held.as_ref() else { return Ok(false) };
        if !vring.get_ref().get_queue().ready() {
            return Ok(false);
        }
        let Some(q) = self.inner.rings.queue(usize::from(STATS)) else { return Ok(false) };
        let added = q.add_used(vring, *ticket, 0);
        if added {
            vring.signal_used_queue()?;
        }
        // Not added: the ring restarted since (the buffer comes back from the region) or
        // the connection is over.
        *held = None;
        Ok(added)
    }

    /// Starts a thread that calls [`Self::request_stats`] every `interval` until the returned
    /// poller is dropped.
    pub fn spawn_stats_poller(&self, interval: Duration) -> Result<StatsPoller, BackendError> {
        let (tx, rx) = mpsc::channel::<()>();
        let backend = self.clone();
        let thread = std::thread::Builder::new()
            .name("stats-poller".into())
            .spawn(move || loop {
                match rx.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = backend.request_stats() {
                            tracing::warn!("cannot return the stats buffer: {e}");
                        }
                    }
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            })
            .map_err(BackendError::Poller)?;
        Ok(StatsPoller { stop: Some(tx), thread: Some(thread) })
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        lock(&self.inner.mem).clone()
    }

    /// Pops and handles every available chain of `queue`; returns whether any was completed.
    fn process_queue(&self, queue: u16, vring: &VringRwLock) -> io::Result<bool> {
        let Some(mem) = self.memory() else { return Ok(false) };
        let mem = mem.memory();
        let Some(q) = self.inner.rings.queue(usize::from(queue)) else { return Ok(false) };
        let dev = &self.inner.device;
        // The stats ring is popped under the held-buffer lock, so that popping a buffer and
        // holding it is one step for `stop_vring` and `request_stats` (same lock order: held
        // buffer, then ring).
        let mut held = (queue == STATS).then(|| lock(&self.inner.stats_held));
        let mut used_any = false;
        // Through the kit: chains to resubmit first, each recorded, and a ring whose driver
        // claims more than a queue size of chains stopped (SET_VRING_ERR) rather than served.
        while let Some(taken) = q.pop(vring, mem.clone()) {
            let (chain, ticket) = (taken.chain, taken.ticket);
            match (queue, held.as_mut()) {
                (INFLATE, _) => queues::inflate(dev, &chain),
                (DEFLATE, _) => queues::deflate(dev, &chain),
                (_, Some(held)) => {
                    queues::stats(dev, &chain);
                    // Keep this buffer; a driver that sends another while we hold one gets the
                    // old one back (QEMU does the same).
                    if let Some((_, old)) = held.replace((vring.clone(), ticket)) {
                        used_any |= q.add_used(vring, old, 0);
                    }
                    continue;
                }
                (_, None) => {}
            }
            used_any |= q.add_used(vring, ticket, 0);
        }
        Ok(used_any)
    }
}

/// Returns the stats buffer periodically; stops when dropped.
pub struct StatsPoller {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for StatsPoller {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VhostUserBackend for BalloonBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        tracing::info!(
            features = format_args!("{features:#x}"),
            stats_vq = features & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0,
            must_tell_host = features & (1 << VIRTIO_BALLOON_F_MUST_TELL_HOST) != 0,
            "frontend acked features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_inflight_fd(&self, inflight: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        Ok(self.inner.rings.get_inflight_fd(inflight)?)
    }

    fn set_inflight_fd(&self, inflight: &VhostUserInflight, file: File) -> io::Result<()> {
        Ok(self.inner.rings.set_inflight_fd(inflight, file)?)
    }

    fn start_vring(&self, queue_index: u32, vring: &VringRwLock) -> io::Result<()> {
        Ok(self.inner.rings.start_vring(queue_index, vring)?)
    }

    fn set_event_idx(&self, _enabled: bool) {
        // EVENT_IDX is not offered: the balloon's queues carry a few buffers a second at most.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.inner.device.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.inner.device.write_config(offset, buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *lock(&self.inner.mem) = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        tracing::info!("backend-request channel set: config changes go to the frontend");
        self.inner.device.set_backend(Some(backend));
    }

    fn reset_device(&self) {
        // The driver starts over: the buffer we held belongs to a ring that is gone.
        lock(&self.inner.stats_held).take();
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE on the stats ring while we hold its buffer: step the ring's next
        // index back over it, so the base the frontend keeps has the buffer still available
        // and we pop it again when the ring restarts (vhost-user's in-flight resubmission).
        // It is the last chain we popped: a newer one replaces (and returns) it. With an
        // inflight region the buffer is also recorded there, and the restart resubmits it
        // from there (recovery's next_avail overrides this base).
        if queue_index == u32::from(STATS) {
            if let Some((vring, _)) = lock(&self.inner.stats_held).take() {
                let next = vring.queue_next_avail();
                vring.set_queue_next_avail(next.wrapping_sub(1));
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..NUM_QUEUES).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.inner.exit.get(thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // vhost-user-backend numbers events and passes vrings per worker thread; with one
        // queue per thread (`queues_per_thread`) the thread index is the queue, and its vring
        // is the thread's first.
        let queue = u16::try_from(thread).ok().filter(|&q| usize::from(q) < NUM_QUEUES);
        let (Some(queue), Some(vring)) = (queue, vrings.get(usize::from(device_event))) else {
            return Err(io::Error::other(format!("event {device_event} of worker {thread}: no such queue")));
        };
        if self.process_queue(queue, vring)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}
