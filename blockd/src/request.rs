//! virtio-blk requests: parsing a descriptor chain, checking it, running it against a [`Disk`]
//! and writing the status byte. Nothing a guest puts in a chain can stop the backend: a bad
//! request gets `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for an unknown type), and a chain whose status
//! byte cannot be written at all is completed with length 0 and logged.

use std::io::{Read, Write};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use vm_config::{CacheMode, ErrorAction};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemory};

use crate::disk::{AlignedBuf, Disk};
use crate::policy::{decide, Decision, IoOp};
use crate::pool::{Budget, Charge, BOUNCE_BUDGET};
use crate::stats::Stats;
use std::sync::Arc;

pub const SECTOR_SIZE: u64 = 512;
/// Alignment of the requests' bounce buffers: what an O_DIRECT image needs, so it reads
/// and writes them in place.
const BOUNCE_ALIGN: usize = 4096;
/// Size of the request header (`struct virtio_blk_outhdr`: type, reserved, sector).
pub const HEADER_SIZE: usize = 16;
/// Size of one discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub const SEGMENT_SIZE: usize = 16;
/// `VIRTIO_BLK_ID_BYTES`: the length of a GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Flag in a write-zeroes segment: the device may free the space.
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Limits the device advertises in its config space, and enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most data descriptors in one request (`seg_max`); header and status come on top.
    pub seg_max: u32,
    /// Largest data segment (`size_max`); seg_max × size_max stays within `max_data`.
    pub size_max: u32,
    /// Most bytes of data in one IN/OUT request (bounds the bounce buffer).
    pub max_data: usize,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            seg_max: 126,
            size_max: 256 << 10,
            max_data: 32 << 20,
            max_discard_sectors: (1 << 30) / SECTOR_SIZE as u32,
            max_discard_seg: 1,
            max_write_zeroes_sectors: (1 << 30) / SECTOR_SIZE as u32,
            max_write_zeroes_seg: 1,
        }
    }
}

/// The drive a queue worker serves requests for.
pub struct Drive {
    /// The image. Requests hold it shared while they run; `block_resize` and
    /// `blockdev-snapshot-sync` take it exclusively, so requests in flight drain first and new
    /// ones wait for the switch.
    disk: RwLock<Box<dyn Disk>>,
    pub readonly: bool,
    /// GET_ID's answer, at most 20 bytes.
    pub serial: Vec<u8>,
    pub limits: Limits,
    /// `writethrough`/`directsync` flush after every write; `unsafe` ignores flushes.
    pub cache: CacheMode,
    pub werror: ErrorAction,
    pub rerror: ErrorAction,
    pub stats: Stats,
    /// Bounce-buffer bytes the drive's requests may hold at once.
    pub budget: Arc<Budget>,
}

/// How a chain ended: the status written (None where none could be) and the used length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: Option<u8>,
    pub used_len: u32,
}

/// A request whose I/O on the image failed, and what the drive's policy made of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoFailure {
    pub op: IoOp,
    pub errno: i32,
    pub decision: Decision,
    /// strerror text (BLOCK_IO_ERROR's `reason`).
    pub reason: String,
}

/// What became of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Completed (status written); `failure` when the image failed and the policy reported or
    /// ignored it.
    Done { completion: Completion, failure: Option<IoFailure> },
    /// The image failed and the policy is stop: nothing was written to the chain; the caller
    /// holds it and runs it again on resume.
    Hold(IoFailure),
}

impl Outcome {
    /// The completion, for a chain that was completed.
    pub fn completion(&self) -> Option<Completion> {
        match self {
            Outcome::Done { completion, .. } => Some(*completion),
            Outcome::Hold(_) => None,
        }
    }
}

/// Why a request got an error status; logged at debug level (a guest can produce these at will).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("descriptor chain is malformed: {0}")]
    Chain(String),
    #[error("the drive is read-only")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("range out of bounds: sector {sector}, {len} bytes, capacity {capacity} bytes")]
    OutOfRange { sector: u64, len: u64, capacity: u64 },
    #[error("{} on the image failed: {source}", op.as_str())]
    Io {
        op: IoOp,
        #[source]
        source: std::io::Error,
    },
    #[error("copying from or to guest memory failed: {0}")]
    GuestMemory(#[source] std::io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// One descriptor as seen in the chain.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: vm_memory::GuestAddress,
    len: u32,
    write_only: bool,
}

impl Drive {
    /// A drive with QEMU's defaults: cache=writeback, werror=enospc, rerror=report.
    pub fn new(disk: Box<dyn Disk>, readonly: bool, serial: Vec<u8>, limits: Limits) -> Drive {
        Drive {
            disk: RwLock::new(disk),
            readonly,
            serial,
            limits,
            cache: CacheMode::Writeback,
            werror: ErrorAction::Enospc,
            rerror: ErrorAction::Report,
            stats: Stats::default(),
            budget: Budget::new(BOUNCE_BUDGET),
        }
    }

    /// The image, shared (requests in flight hold it too).
    pub fn disk(&self) -> RwLockReadGuard<'_, Box<dyn Disk>> {
        self.disk.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The image, exclusively: waits until the requests in flight are done, and holds new
    /// ones off until dropped.
    pub fn disk_exclusive(&self) -> RwLockWriteGuard<'_, Box<dyn Disk>> {
        self.disk.write().unwrap_or_else(|p| p.into_inner())
    }

    fn policy(&self, op: IoOp) -> ErrorAction {
        match op {
            IoOp::Read => self.rerror,
            IoOp::Write => self.werror,
        }
    }

    /// Serves one chain: runs the request and writes its status byte, or, when the image
    /// fails and the policy says stop, leaves the chain untouched for the caller to hold.
    pub fn process<M>(&self, chain: DescriptorChain<M>) -> Outcome
    where
        M: std::ops::Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        let mem = chain.memory();
        // Walk the whole chain (virtio-queue bounds it by the queue or indirect table size) for
        // its real last descriptor; keep only as many as a valid request can have.
        let keep = self.limits.seg_max as usize + 3;
        let mut descs: Vec<Desc> = Vec::with_capacity(8);
        let mut last = None;
        let mut count = 0usize;
        for d in chain.clone() {
            let d = Desc { addr: d.addr(), len: d.len(), write_only: d.is_write_only() };
            if descs.len() < keep {
                descs.push(d);
            }
            last = Some(d);
            count += 1;
        }

        // The status byte is the last byte of the last descriptor, which must be device-writable.
        let skipped = Outcome::Done { completion: Completion { status: None, used_len: 0 }, failure: None };
        let Some(last) = last else {
            tracing::warn!("empty descriptor chain, skipped");
            return skipped;
        };
        if !last.write_only || last.len == 0 {
            tracing::warn!("descriptor chain without a writable status byte, skipped");
            return skipped;
        }
        let Some(status_addr) = last.addr.checked_add(u64::from(last.len) - 1) else {
            tracing::warn!("status descriptor wraps the address space, skipped");
            return skipped;
        };

        let result = if count > self.limits.seg_max as usize + 2 {
            Err(RequestError::Chain(format!("{count} descriptors, more than seg_max {} + 2", self.limits.seg_max)))
        } else {
            self.run(&chain, &descs)
        };
        let mut failure = None;
        let (status, data_written) = match result {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(RequestError::Io { op, source }) => {
                let errno = source.raw_os_error().unwrap_or(libc::EIO);
                let decision = decide(self.policy(op), errno);
                tracing::debug!(op = op.as_str(), errno, ?decision, "request failed on the image: {source}");
                let reason = strip_os_error(&std::io::Error::from_raw_os_error(errno).to_string());
                let f = IoFailure { op, errno, decision, reason };
                match decision {
                    Decision::Stop => return Outcome::Hold(f),
                    Decision::Ignore => {
                        failure = Some(f);
                        (VIRTIO_BLK_S_OK as u8, 0)
                    }
                    Decision::Report => {
                        failure = Some(f);
                        (VIRTIO_BLK_S_IOERR as u8, 0)
                    }
                }
            }
            Err(e) => {
                tracing::debug!("request failed: {e}");
                (e.status(), 0)
            }
        };
        if let Err(e) = mem.write_obj(status, status_addr) {
            tracing::warn!("writing the status byte: {e}; chain completed without status");
            return Outcome::Done { completion: Completion { status: None, used_len: 0 }, failure };
        }
        Outcome::Done { completion: Completion { status: Some(status), used_len: data_written + 1 }, failure }
    }

    /// Flushes after a write where the cache mode asks for it (writethrough, directsync).
    fn write_through(&self, disk: &dyn Disk) -> Result<(), RequestError> {
        if matches!(self.cache, CacheMode::Writethrough | CacheMode::Directsync) {
            disk.flush().map_err(|source| RequestError::Io { op: IoOp::Write, source })?;
        }
        Ok(())
    }

    /// Runs the request; returns how many data bytes were written into the chain.
    fn run<M>(&self, chain: &DescriptorChain<M>, descs: &[Desc]) -> Result<u32, RequestError>
    where
        M: std::ops::Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        let mem = chain.memory();
        let io_read = |source| RequestError::Io { op: IoOp::Read, source };
        let io_write = |source| RequestError::Io { op: IoOp::Write, source };
        // Device-readable descriptors first, then device-writable ones.
        if let Some(i) = descs.iter().position(|d| d.write_only) {
            if descs[i..].iter().any(|d| !d.write_only) {
                return Err(RequestError::Chain("a readable descriptor follows a writable one".into()));
            }
        }
        let chain_err = |e: virtio_queue::Error| RequestError::Chain(e.to_string());
        let mut reader = chain.clone().reader(mem).map_err(chain_err)?;
        let mut writer = chain.clone().writer(mem).map_err(chain_err)?;
        // The last writable byte is the status: the data area is everything before it.
        let writable = writer.available_bytes();
        let data_writable = writable.checked_sub(1).ok_or_else(|| RequestError::Chain("no status byte".into()))?;
        let mut _status = writer.split_at(data_writable).map_err(chain_err)?;

        if reader.available_bytes() < HEADER_SIZE {
            return Err(RequestError::Chain(format!("header shorter than {HEADER_SIZE} bytes")));
        }
        let mut header = [0u8; HEADER_SIZE];
        reader.read_exact(&mut header).map_err(RequestError::GuestMemory)?;
        let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let readable = reader.available_bytes();
        // The bounce buffer's bytes are taken before the image: a request waiting for them
        // holds nothing a resize or snapshot waits for.
        let _charge = match req_type {
            VIRTIO_BLK_T_IN => self.bounce_charge(sector, data_writable),
            VIRTIO_BLK_T_OUT => self.bounce_charge(sector, readable),
            _ => None,
        };
        let disk = self.disk();
        let disk: &dyn Disk = &**disk;

        match req_type {
            VIRTIO_BLK_T_IN => {
                if readable != 0 {
                    return Err(RequestError::Chain("read request with device-readable data".into()));
                }
                let len = self.check_data(disk, sector, data_writable)?;
                let mut bounce = AlignedBuf::new(len, BOUNCE_ALIGN).map_err(io_read)?;
                let buf = bounce.as_mut_slice(len);
                let t = Instant::now();
                disk.read_at(buf, sector * SECTOR_SIZE).map_err(io_read)?;
                self.stats.read(len as u64, t.elapsed());
                writer.write_all(buf).map_err(RequestError::GuestMemory)?;
                Ok(len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if data_writable != 0 {
                    return Err(RequestError::Chain("write request with device-writable data".into()));
                }
                if self.readonly {
                    return Err(RequestError::ReadOnly);
                }
                let len = self.check_data(disk, sector, readable)?;
                let mut bounce = AlignedBuf::new(len, BOUNCE_ALIGN).map_err(io_write)?;
                let buf = bounce.as_mut_slice(len);
                reader.read_exact(buf).map_err(RequestError::GuestMemory)?;
                let t = Instant::now();
                disk.write_at(buf, sector * SECTOR_SIZE).map_err(io_write)?;
                self.write_through(disk)?;
                self.stats.write(sector * SECTOR_SIZE, len as u64, t.elapsed());
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if readable != 0 || data_writable != 0 {
                    return Err(RequestError::Chain("flush request with data".into()));
                }
                // cache=unsafe ignores flushes (QEMU's cache.no-flush).
                if !self.readonly && self.cache != CacheMode::Unsafe {
                    let t = Instant::now();
                    disk.flush().map_err(io_write)?;
                    self.stats.flush(t.elapsed());
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if readable != 0 || data_writable < ID_BYTES {
                    return Err(RequestError::Chain(format!("GET_ID needs {ID_BYTES} writable bytes")));
                }
                let mut id = [0u8; ID_BYTES];
                let n = self.serial.len().min(ID_BYTES);
                id[..n].copy_from_slice(&self.serial[..n]);
                writer.write_all(&id).map_err(RequestError::GuestMemory)?;
                Ok(ID_BYTES as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if data_writable != 0 {
                    return Err(RequestError::Chain("discard/write-zeroes with device-writable data".into()));
                }
                if self.readonly {
                    return Err(RequestError::ReadOnly);
                }
                let discard = req_type == VIRTIO_BLK_T_DISCARD;
                let (max_seg, max_sectors) = if discard {
                    (self.limits.max_discard_seg, self.limits.max_discard_sectors)
                } else {
                    (self.limits.max_write_zeroes_seg, self.limits.max_write_zeroes_sectors)
                };
                if readable == 0 || readable % SEGMENT_SIZE != 0 || readable / SEGMENT_SIZE > max_seg as usize {
                    return Err(RequestError::Chain(format!("{readable} bytes of segments (max {max_seg} segments)")));
                }
                for _ in 0..readable / SEGMENT_SIZE {
                    let mut seg = [0u8; SEGMENT_SIZE];
                    reader.read_exact(&mut seg).map_err(RequestError::GuestMemory)?;
                    let seg_sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                    let num_sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                    if num_sectors > max_sectors {
                        return Err(RequestError::Chain(format!("{num_sectors} sectors > {max_sectors}")));
                    }
                    let len = u64::from(num_sectors) * SECTOR_SIZE;
                    self.check_range(disk, seg_sector, len)?;
                    let offset = seg_sector * SECTOR_SIZE;
                    if discard {
                        if flags != 0 {
                            return Err(RequestError::Unsupported(req_type));
                        }
                        disk.discard(offset, len).map_err(io_write)?;
                    } else {
                        if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
                            return Err(RequestError::Unsupported(req_type));
                        }
                        let unmap = flags & WRITE_ZEROES_FLAG_UNMAP != 0;
                        let t = Instant::now();
                        disk.write_zeroes(offset, len, unmap).map_err(io_write)?;
                        self.stats.write(offset, len, t.elapsed());
                    }
                }
                self.write_through(disk)?;
                Ok(0)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The budget share of an IN/OUT request of `len` bytes at `sector`: its buffer, and for
    /// a request not aligned to 4 KiB the aligned copy an O_DIRECT image makes of it. None
    /// for a length the request checks refuse anyway.
    fn bounce_charge(&self, sector: u64, len: usize) -> Option<Charge> {
        if len > self.limits.max_data {
            return None;
        }
        let a = BOUNCE_ALIGN as u64;
        let unaligned = !(sector.wrapping_mul(SECTOR_SIZE)).is_multiple_of(a) || !(len as u64).is_multiple_of(a);
        let bytes = if unaligned { 2 * len + 2 * BOUNCE_ALIGN } else { len };
        Some(self.budget.charge(bytes))
    }

    /// Checks an IN/OUT data length: whole sectors, within the limits and the disk.
    fn check_data(&self, disk: &dyn Disk, sector: u64, len: usize) -> Result<usize, RequestError> {
        if !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Chain(format!("data length {len} is not a multiple of {SECTOR_SIZE}")));
        }
        if len > self.limits.max_data {
            return Err(RequestError::Chain(format!("data length {len} over {} bytes", self.limits.max_data)));
        }
        self.check_range(disk, sector, len as u64)?;
        Ok(len)
    }

    fn check_range(&self, disk: &dyn Disk, sector: u64, len: u64) -> Result<(), RequestError> {
        // The capacity the guest sees: whole sectors, rounded up as QEMU does.
        let capacity = disk.size().div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let end = sector.checked_mul(SECTOR_SIZE).and_then(|o| o.checked_add(len));
        match end {
            Some(end) if end <= capacity => Ok(()),
            _ => Err(RequestError::OutOfRange { sector, len, capacity }),
        }
    }
}

/// "No space left on device (os error 28)" -> "No space left on device" (strerror's text).
fn strip_os_error(s: &str) -> String {
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// A plain IN or OUT request, laid out as drivers make them (header alone in a readable
/// descriptor, data descriptors all in one direction, a 1-byte status descriptor), checked
/// against the drive: what the io_uring path runs. Anything else goes through
/// [`Drive::process`], which knows every odd and hostile case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastIo {
    pub write: bool,
    pub offset: u64,
    pub len: usize,
    /// The data descriptors (guest address, length), in order.
    pub segs: Vec<(vm_memory::GuestAddress, u32)>,
    pub status: vm_memory::GuestAddress,
}

impl Drive {
    /// The request as a [`FastIo`] when it is a plain IN/OUT one this drive can run as is,
    /// with data aligned to `align`; None for everything else.
    pub fn fast_plan<M>(&self, chain: &DescriptorChain<M>, disk: &dyn Disk, align: usize) -> Option<FastIo>
    where
        M: std::ops::Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        let mem = chain.memory();
        let max = self.limits.seg_max as usize + 2;
        let mut descs = Vec::with_capacity(4);
        for d in chain.clone() {
            if descs.len() == max {
                return None;
            }
            descs.push((d.addr(), d.len(), d.is_write_only()));
        }
        let (&(haddr, hlen, hw), rest) = descs.split_first()?;
        let (&(saddr, slen, sw), data) = rest.split_last()?;
        if hw || hlen as usize != HEADER_SIZE || !sw || slen != 1 || data.is_empty() {
            return None;
        }
        let mut header = [0u8; HEADER_SIZE];
        mem.read_slice(&mut header, haddr).ok()?;
        let req_type = u32::from_le_bytes(header[0..4].try_into().ok()?);
        let sector = u64::from_le_bytes(header[8..16].try_into().ok()?);
        let write = match req_type {
            VIRTIO_BLK_T_IN => false,
            VIRTIO_BLK_T_OUT if !self.readonly => true,
            _ => return None,
        };
        let mut len = 0usize;
        for &(addr, l, w) in data {
            // Device-writable data for reads, readable for writes, all inside guest RAM.
            if w == write || !mem.check_range(addr, l as usize, vm_memory::Permissions::ReadWrite) {
                return None;
            }
            len += l as usize;
        }
        if !mem.check_range(saddr, 1, vm_memory::Permissions::ReadWrite)
            || !len.is_multiple_of(align)
            || len > self.limits.max_data
        {
            return None;
        }
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        if !offset.is_multiple_of(align as u64) || self.check_range(disk, sector, len as u64).is_err() {
            return None;
        }
        let segs = data.iter().map(|&(a, l, _)| (a, l)).collect();
        Some(FastIo { write, offset, len, segs, status: saddr })
    }

    /// After a fast request's transfer: counts it (the caller times it).
    pub fn account(&self, io: &FastIo, took: std::time::Duration) {
        if io.write {
            self.stats.write(io.offset, io.len as u64, took);
        } else {
            self.stats.read(io.len as u64, took);
        }
    }

    /// What the policy makes of a failed fast request (as [`Drive::process`] does).
    pub fn failure(&self, write: bool, error: &std::io::Error) -> IoFailure {
        let op = if write { IoOp::Write } else { IoOp::Read };
        let errno = error.raw_os_error().unwrap_or(libc::EIO);
        let decision = decide(self.policy(op), errno);
        IoFailure { op, errno, decision, reason: strip_os_error(&std::io::Error::from_raw_os_error(errno).to_string()) }
    }
}
