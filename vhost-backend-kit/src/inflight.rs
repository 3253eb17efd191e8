//! Inflight tracking (vhost-user spec, "Inflight I/O tracking", split rings): the shared
//! region a frontend keeps across backend restarts, laid out exactly as QEMU's libvhost-user
//! lays it out (so QEMU's vhost-user-blk frontend and ours interoperate), and the spec's
//! algorithm over one queue's part of it: record at pop, clear at completion, recover after a
//! reconnect.
//!
//! Per queue, `ALIGN_UP(16 * queue_size + 2, 64)` bytes:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```
//!
//! The region is shared with the frontend and outlives this process: every field is read and
//! written through atomics at its natural alignment, in the order the spec gives, so a
//! process killed between any two stores leaves a state the next backend recovers from.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;

/// Each queue's part of the region starts on this boundary (libvhost-user's
/// `INFLIGHT_ALIGNMENT`).
const ALIGNMENT: u64 = 64;
/// `version` of a region in use; 0 means never initialised.
pub const VERSION: u16 = 1;
/// Bytes of one `DescStateSplit`.
const DESC_STATE_SIZE: u64 = 16;
/// Bytes before `desc[0]`: features, version, desc_num, last_batch_head, used_idx.
const HEADER_SIZE: usize = 16;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
/// Within a `DescStateSplit`.
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_COUNTER: usize = 8;
/// The largest split ring virtio allows.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of one queue's part of the region: libvhost-user's `vu_inflight_queue_size`,
/// `ALIGN_UP(sizeof(DescStateSplit) * queue_size + sizeof(uint16_t), 64)`. That always leaves
/// room for the 16-byte header (the rounding adds at least 14 bytes past `16 * queue_size + 2`).
pub fn queue_region_size(queue_size: u16) -> u64 {
    (DESC_STATE_SIZE * u64::from(queue_size) + 2).div_ceil(ALIGNMENT) * ALIGNMENT
}

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region for {num_queues} queues of {queue_size} entries: an impossible geometry")]
    Geometry { num_queues: u16, queue_size: u16 },
    #[error("inflight region of {claimed} bytes at offset {offset}: {num_queues} queues of {queue_size} entries need {needed}")]
    Size { claimed: u64, offset: u64, num_queues: u16, queue_size: u16, needed: u64 },
    #[error("inflight region offset {0} is not page aligned")]
    Offset(u64),
    #[error("inflight file holds {file} bytes, fewer than offset {offset} + size {size}")]
    ShortFile { file: u64, offset: u64, size: u64 },
    #[error("creating the inflight memfd: {0}")]
    Create(#[source] std::io::Error),
    #[error("sizing the inflight memfd to {1} bytes: {0}")]
    Truncate(#[source] std::io::Error, u64),
    #[error("reading the inflight file's size: {0}")]
    Stat(#[source] std::io::Error),
    #[error("mapping the inflight region ({1} bytes): {0}")]
    Map(#[source] std::io::Error, u64),
}

/// A mapped inflight region: `num_queues` parts of [`queue_region_size`] bytes each.
pub struct Region {
    base: NonNull<u8>,
    /// Bytes mapped at `base`.
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access to it goes
// through atomics (QueueRegion), so sharing it between threads is sound.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("len", &self.len).field("num_queues", &self.num_queues).field("queue_size", &self.queue_size).finish()
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<u64, InflightError> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::Geometry { num_queues, queue_size });
    }
    Ok(queue_region_size(queue_size) * u64::from(num_queues))
}

impl Region {
    /// GET_INFLIGHT_FD: a new zeroed memfd sized for the frontend's queues, mapped here, and
    /// the reply (size, offset 0) with the file to send. Sealed against shrinking and growing
    /// so neither side can pull the memory from under the other.
    pub fn create(request: &VhostUserInflight) -> Result<(Region, VhostUserInflight, File), InflightError> {
        let size = check_geometry(request.num_queues, request.queue_size)?;
        // SAFETY: memfd_create with a NUL-terminated name; the new descriptor is owned by the
        // File made from it just below.
        let fd = unsafe { libc::memfd_create(c"vhost-inflight".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(InflightError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        // A new file reads as zeroes: the region starts zeroed (version 0: never used).
        file.set_len(size).map_err(|e| InflightError::Truncate(e, size))?;
        // SAFETY: fcntl on a descriptor we own; failing to seal only loses a protection.
        let sealed = unsafe {
            libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL)
        };
        if sealed < 0 {
            tracing::warn!("sealing the inflight memfd: {}", std::io::Error::last_os_error());
        }
        let region = Region::map(&file, 0, size, request.num_queues, request.queue_size)?;
        let reply = VhostUserInflight::new(size, 0, request.num_queues, request.queue_size);
        Ok((region, reply, file))
    }

    /// SET_INFLIGHT_FD: maps the region the frontend hands back (made by this or an earlier
    /// backend) after checking that what the message claims fits both its geometry and the
    /// file. Sets every queue's `desc_num` to the message's queue size, as libvhost-user does.
    pub fn open(file: &File, msg: &VhostUserInflight) -> Result<Region, InflightError> {
        let needed = check_geometry(msg.num_queues, msg.queue_size)?;
        if msg.mmap_size < needed {
            return Err(InflightError::Size {
                claimed: msg.mmap_size,
                offset: msg.mmap_offset,
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
                needed,
            });
        }
        // SAFETY: sysconf has no memory effects.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if !msg.mmap_offset.is_multiple_of(page) {
            return Err(InflightError::Offset(msg.mmap_offset));
        }
        let file_len = file.metadata().map_err(InflightError::Stat)?.len();
        if msg.mmap_offset.checked_add(needed).is_none_or(|end| end > file_len) {
            return Err(InflightError::ShortFile { file: file_len, offset: msg.mmap_offset, size: needed });
        }
        let region = Region::map(file, msg.mmap_offset, needed, msg.num_queues, msg.queue_size)?;
        for q in 0..msg.num_queues {
            if let Some(part) = region.queue_part(q) {
                part.u16_at(OFF_DESC_NUM).store(msg.queue_size, Ordering::Relaxed);
            }
        }
        Ok(region)
    }

    fn map(file: &File, offset: u64, size: u64, num_queues: u16, queue_size: u16) -> Result<Region, InflightError> {
        let len = usize::try_from(size).map_err(|_| InflightError::Map(std::io::ErrorKind::InvalidInput.into(), size))?;
        let off = libc::off_t::try_from(offset).map_err(|_| InflightError::Offset(offset))?;
        // SAFETY: a new shared mapping of a file we hold, at a page-aligned offset checked to
        // lie within it; nothing else in this process refers to the new address range.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), off)
        };
        if p == libc::MAP_FAILED {
            return Err(InflightError::Map(std::io::Error::last_os_error(), size));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or(InflightError::Map(std::io::ErrorKind::Other.into(), size))?;
        Ok(Region { base, len, num_queues, queue_size })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Entries per queue (the frontend's queue size).
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue_part(&self, index: u16) -> Option<QueuePart<'_>> {
        if index >= self.num_queues {
            return None;
        }
        let off = usize::try_from(queue_region_size(self.queue_size) * u64::from(index)).ok()?;
        Some(QueuePart { region: self, off })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it outlives
        // the Region (QueueRegion holds an Arc of it).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Atomic views of one queue's fields inside a borrowed region.
struct QueuePart<'a> {
    region: &'a Region,
    off: usize,
}

impl QueuePart<'_> {
    fn ptr(&self, at: usize, size: usize) -> *mut u8 {
        let at = self.off + at;
        // Offsets come from this module's constants and indexes bounded by desc_num.
        assert!(at + size <= self.region.len, "inflight field past the region");
        // SAFETY: within the mapping (checked just above).
        unsafe { self.region.base.as_ptr().add(at) }
    }

    fn u8_at(&self, at: usize) -> &AtomicU8 {
        // SAFETY: in bounds (ptr checks), shared memory that lives as long as the region,
        // accessed only atomically by this process.
        unsafe { AtomicU8::from_ptr(self.ptr(at, 1)) }
    }

    fn u16_at(&self, at: usize) -> &AtomicU16 {
        let p = self.ptr(at, 2);
        debug_assert!((p as usize).is_multiple_of(2));
        // SAFETY: in bounds, 2-aligned (page-aligned mapping, 64-aligned queue parts, even
        // field offsets), lives as long as the region, accessed only atomically here.
        unsafe { AtomicU16::from_ptr(p.cast()) }
    }

    fn u64_at(&self, at: usize) -> &AtomicU64 {
        let p = self.ptr(at, 8);
        debug_assert!((p as usize).is_multiple_of(8));
        // SAFETY: in bounds, 8-aligned (as above, counters at 16 * i + 24), lives as long as
        // the region, accessed only atomically here.
        unsafe { AtomicU64::from_ptr(p.cast()) }
    }
}

/// One queue's part of a region, owning a reference to the whole mapping.
#[derive(Clone, Debug)]
pub struct QueueRegion {
    region: Arc<Region>,
    index: u16,
}

impl QueueRegion {
    /// Queue `index`'s part of `region`, if it has one.
    pub fn new(region: Arc<Region>, index: u16) -> Option<QueueRegion> {
        (index < region.num_queues).then_some(QueueRegion { region, index })
    }

    fn part(&self) -> QueuePart<'_> {
        // `new` checked the index.
        QueuePart { region: &self.region, off: (queue_region_size(self.region.queue_size) * u64::from(self.index)) as usize }
    }

    fn desc_off(head: u16) -> usize {
        HEADER_SIZE + usize::from(head) * DESC_STATE_SIZE as usize
    }

    /// Entries this queue's part records (`desc_num`; the frontend's queue size).
    pub fn desc_num(&self) -> u16 {
        // Bounded by what was mapped: a frontend cannot make us index past it.
        self.part().u16_at(OFF_DESC_NUM).load(Ordering::Acquire).min(self.region.queue_size)
    }

    pub fn version(&self) -> u16 {
        self.part().u16_at(OFF_VERSION).load(Ordering::Acquire)
    }

    pub fn used_idx(&self) -> u16 {
        self.part().u16_at(OFF_USED_IDX).load(Ordering::Acquire)
    }

    pub fn last_batch_head(&self) -> u16 {
        self.part().u16_at(OFF_LAST_BATCH_HEAD).load(Ordering::Acquire)
    }

    /// Whether `desc[head].inflight` is set (false for a head past `desc_num`).
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.desc_num() && self.part().u8_at(Self::desc_off(head) + DESC_OFF_INFLIGHT).load(Ordering::Acquire) != 0
    }

    pub fn counter(&self, head: u16) -> u64 {
        if head >= self.desc_num() {
            return 0;
        }
        self.part().u64_at(Self::desc_off(head) + DESC_OFF_COUNTER).load(Ordering::Acquire)
    }

    fn set_inflight(&self, head: u16, on: bool) {
        if head < self.desc_num() {
            self.part().u8_at(Self::desc_off(head) + DESC_OFF_INFLIGHT).store(u8::from(on), Ordering::Release);
        }
    }

    /// At pop (spec: "the back-end records the descriptor"): `counter` first, then `inflight`,
    /// so a recorded entry always has its order.
    pub fn record(&self, head: u16, counter: u64) {
        if head >= self.desc_num() {
            return;
        }
        self.part().u64_at(Self::desc_off(head) + DESC_OFF_COUNTER).store(counter, Ordering::Release);
        self.set_inflight(head, true);
    }

    /// A chain completed as part of a batch whose used idx is not yet published, cleared
    /// before it is ([`crate::queue::TrackedQueue::add_used_batch`]): a backend killed in
    /// between loses it (the driver never gets it back) instead of completing it twice.
    pub fn clear(&self, head: u16) {
        self.set_inflight(head, false);
    }

    /// Before the used ring's idx is published: the batch's head (one element per batch).
    pub fn pre_put(&self, head: u16) {
        self.part().u16_at(OFF_LAST_BATCH_HEAD).store(head, Ordering::Release);
        // The used ring's idx is stored after this (Release in virtio-queue); keep it after.
        fence(Ordering::SeqCst);
    }

    /// After the used ring's idx is published: the entry is no longer in flight, then the
    /// region's `used_idx` follows the ring's.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        self.set_inflight(head, false);
        fence(Ordering::SeqCst);
        self.part().u16_at(OFF_USED_IDX).store(used_idx, Ordering::Release);
    }

    /// Recovery when a ring starts (libvhost-user's `vu_check_queue_inflights`), given the
    /// used ring's idx. A never-used part (version 0) is initialised and has nothing to
    /// recover.
    pub fn recover(&self, ring_used_idx: u16) -> Recovery {
        let part = self.part();
        if self.version() == 0 {
            part.u16_at(OFF_VERSION).store(VERSION, Ordering::Release);
            return Recovery::Fresh;
        }
        if self.used_idx() != ring_used_idx {
            // Killed after publishing the used idx and before the region caught up: the last
            // batch's head was completed.
            self.set_inflight(self.last_batch_head(), false);
            fence(Ordering::SeqCst);
            part.u16_at(OFF_USED_IDX).store(ring_used_idx, Ordering::Release);
        }
        let mut resubmit: Vec<(u64, u16)> =
            (0..self.desc_num()).filter(|&h| self.is_inflight(h)).map(|h| (self.counter(h), h)).collect();
        // In the order they were taken: the spec resubmits by ascending counter.
        resubmit.sort_unstable();
        let next_counter = resubmit.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        // inuse <= desc_num <= 32768: fits u16 arithmetic modulo 2^16 as the ring's indexes.
        let inuse = resubmit.len() as u16;
        Recovery::Resume {
            next_avail: ring_used_idx.wrapping_add(inuse),
            resubmit: resubmit.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        }
    }
}

/// What a ring starts from, as the region says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// A new region: keep the frontend's ring base; counters start at 0.
    Fresh,
    /// A used region: `next_avail` (the used ring's idx plus what is in flight) overrides the
    /// frontend's base; `resubmit` are the heads in flight, oldest first.
    Resume { next_avail: u16, resubmit: Vec<u16>, next_counter: u64 },
}
