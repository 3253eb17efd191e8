//! The vhost-user side: features, the virtio-blk config space, and the queue workers (one
//! thread per queue) that pop chains, hand them to [`Drive::process`] and complete them.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_backend_kit::serve::{ExitEventError, ExitEvents};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::engine::{DriveRuntime, Request};
use crate::request::SECTOR_SIZE;

/// Queue size offered to the frontend (it may pick a smaller one).
pub const MAX_QUEUE_SIZE: usize = 256;
/// Length of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: usize = 60;

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

    /// Pops every available chain and hands it to the drive's I/O pool, which completes it
    /// (used ring + interrupt) when its I/O is done: the queue depth the guest offers is kept.
    fn process_queue(&self, queue: usize, vring: &VringRwLock, event_idx: bool) {
        let mem = self.inner.mem.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(mem) = mem else { return };
        let mem = mem.memory();
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            self.inner.drive.submit(Request {
                chain,
                vring: vring.clone(),
                event_idx,
                served: Some((self.inner.served.clone(), queue)),
            });
        }
        self.inner.drive.flush_submissions();
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
        // Take chains until the frontend adds nothing more while notifications are off (with
        // EVENT_IDX: avail_event not advanced; without: VRING_USED_F_NO_NOTIFY set), so a
        // frontend that adds requests while a batch is being submitted need not kick for them.
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            self.process_queue(thread, vring, event_idx);
            if !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }
}
