//! The vhost-user side: features, the virtio-blk config space, and the queue workers (one
//! thread per queue) that pop chains, hand them to [`Drive::process`] and complete them.
//! Chains are taken and completed through the kit's tracked rings: inflight tracking when the
//! frontend hands over a region, GET_VRING_BASE waiting for the ring's requests, and a ring
//! with an impossible available index stopped instead of spun on.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_backend_kit::queue::TrackedRings;
use vhost::vhost_user::Backend;
use vhost_backend_kit::serve::{ExitEventError, ExitEvents};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::engine::{DriveRuntime, Request};
use crate::request::SECTOR_SIZE;

/// Queue size offered to the frontend (it may pick a smaller one).
pub const MAX_QUEUE_SIZE: usize = 256;
/// Length of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: usize = 60;
/// How long GET_VRING_BASE waits for the ring's requests before answering anyway.
const STOP_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    ExitEvent(#[from] ExitEventError),
    #[error("adding the io_uring completion eventfd to worker {0}'s epoll: {1}")]
    AttachCompletions(usize, #[source] io::Error),
}

/// One drive's backend. Cloned into every worker thread; per-connection state lives here and
/// a new one is made for every connection.
#[derive(Clone)]
pub struct BlockBackend {
    inner: Arc<Inner>,
}

struct Inner {
    drive: Arc<DriveRuntime>,
    num_queues: usize,
    event_idx: Mutex<bool>,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    exit: ExitEvents,
    /// Requests completed on each queue in this connection.
    served: Arc<Vec<AtomicU64>>,
    /// This connection's rings as the kit tracks them (inflight region, requests in flight).
    rings: TrackedRings,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The connection is over: completions still to come must not touch its rings (a new
        // connection may be using them); the inflight region keeps their records.
        self.rings.close();
    }
}

impl BlockBackend {
    pub fn new(drive: Arc<DriveRuntime>, num_queues: usize) -> Result<BlockBackend, BackendError> {
        let exit = ExitEvents::new(num_queues)?;
        Ok(BlockBackend {
            inner: Arc::new(Inner {
                drive,
                num_queues,
                event_idx: Mutex::new(false),
                mem: Mutex::new(None),
                exit,
                served: Arc::new((0..num_queues).map(|_| AtomicU64::new(0)).collect()),
                rings: TrackedRings::new(num_queues),
            }),
        })
    }

    /// The event id of the drive's io_uring completion eventfd in every worker's epoll (ids up
    /// to `num_queues` are the library's: queues and the exit event).
    fn completion_event(&self) -> u16 {
        // `num_queues` is at most 64 (checked when parsed), so this fits.
        u16::try_from(self.inner.num_queues + 1).unwrap_or(u16::MAX)
    }

    /// Has every queue worker of this connection reap the drive's io_uring completions
    /// itself: the request is then submitted and completed on the thread that popped it, with
    /// no wake-up of another thread in between. Call it once the daemon is made, before it
    /// starts serving.
    pub fn attach(&self, handlers: &[Arc<VringEpollHandler<BlockBackend>>]) -> Result<(), BackendError> {
        let Some(fd) = self.inner.drive.completion_fd() else { return Ok(()) };
        for (i, h) in handlers.iter().enumerate() {
            h.register_listener(fd, EventSet::IN, u64::from(self.completion_event()))
                .map_err(|e| BackendError::AttachCompletions(i, e))?;
        }
        Ok(())
    }

    /// Requests completed on each queue so far in this connection.
    pub fn served(&self) -> Vec<u64> {
        self.inner.served.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// The virtio-blk config space (little-endian `struct virtio_blk_config`).
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let d = &self.inner.drive.drive;
        let mut c = [0u8; CONFIG_LEN];
        // capacity: whole sectors, a partial last one rounded up (as QEMU does).
        let capacity = d.disk().size().div_ceil(SECTOR_SIZE);
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        c[8..12].copy_from_slice(&d.limits.size_max.to_le_bytes()); // size_max
        c[12..16].copy_from_slice(&d.limits.seg_max.to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&(self.inner.num_queues as u16).to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&d.limits.max_discard_sectors.to_le_bytes());
        c[40..44].copy_from_slice(&d.limits.max_discard_seg.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&d.limits.max_write_zeroes_sectors.to_le_bytes());
        c[52..56].copy_from_slice(&d.limits.max_write_zeroes_seg.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Takes every available chain (resubmitted ones first) and hands it to the drive's I/O
    /// pool or io_uring, which complete it (used ring + interrupt) when its I/O is done: the
    /// queue depth the guest offers is kept. Notifications stay off while chains come, so a
    /// frontend adding requests meanwhile need not kick for them.
    fn process_queue(&self, queue: usize, vring: &VringRwLock, event_idx: bool) -> io::Result<()> {
        let mem = self.inner.mem.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(mem) = mem else { return Ok(()) };
        let Some(tracked) = self.inner.rings.queue(queue) else {
            return Err(io::Error::other(format!("no queue {queue}")));
        };
        let drive = &self.inner.drive;
        tracked.drain(
            vring,
            mem.memory(),
            |taken| {
                drive.submit(Request {
                    chain: taken.chain,
                    vring: vring.clone(),
                    queue: tracked.clone(),
                    ticket: taken.ticket,
                    event_idx,
                    served: Some((self.inner.served.clone(), queue)),
                })
            },
            || drive.flush_submissions(),
        )
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inner.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.drive.drive.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        tracing::info!(
            features = format_args!("{features:#x}"),
            event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            "frontend acked features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
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

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend stops the ring to know nothing writes guest RAM through it any more:
        // wait for its requests, but those a stopping error policy holds (they stay in
        // flight, and in the inflight region, until the VM resumes).
        let Some(q) = self.inner.rings.queue(queue_index as usize) else { return Ok(()) };
        let drive = &self.inner.drive;
        if !q.wait_idle(STOP_WAIT, || drive.held_on(q)) {
            tracing::warn!(
                device = %drive.id,
                queue = queue_index,
                in_flight = q.in_flight(),
                "ring stopped with requests still running after {STOP_WAIT:?}"
            );
        }
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        // Where CONFIG_CHANGE_MSG goes after a block_resize.
        self.inner.drive.set_backend_req(Some(backend));
    }

    fn set_event_idx(&self, enabled: bool) {
        *self.inner.event_idx.lock().unwrap_or_else(|p| p.into_inner()) = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Bytes past our struct (fields of newer spec revisions) read as zero.
        let config = self.config_space();
        (offset..offset.saturating_add(size)).map(|i| config.get(i as usize).copied().unwrap_or(0)).collect()
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Only `wce` is writable in virtio-blk, and we do not offer CONFIG_WCE.
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.inner.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.num_queues).map(|i| 1u64 << i).collect()
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
        // One queue per worker thread (see `queues_per_thread`): the thread index is the queue.
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        if device_event == self.completion_event() {
            self.inner.drive.reap_completions();
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!("event for unknown queue {device_event}")));
        };
        let event_idx = *self.inner.event_idx.lock().unwrap_or_else(|p| p.into_inner());
        self.process_queue(thread, vring, event_idx)
    }
}
