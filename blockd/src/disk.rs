//! The image behind a drive: a raw file or a qcow2 image (through imago), behind one small
//! synchronous interface that the I/O threads call.
//!
//! raw uses `pread`/`pwrite` on the file; with O_DIRECT (`cache=none`/`directsync`) through
//! buffers aligned to the file's direct-I/O alignment (probed at open), every access direct:
//! a request whose offset or length is not aligned is a read-modify-write of its aligned
//! blocks, serialised against other writes of them ([`ranges`]). qcow2 uses imago's `SyncFormatAccess`
//! (its own current-thread tokio runtime, driven from whichever thread calls it), with the
//! image's backing chain opened as the image names it, and imago's `direct` open option for
//! O_DIRECT.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub mod lock;
pub mod ranges;
use lock::ChainLocks;
use ranges::RangeLocks;

use imago::file::File as ImagoFile;
use imago::format::PreallocateMode;
use imago::qcow2::Qcow2;
use imago::{FormatDriverBuilder, StorageOpenOptions, SyncFormatAccess};

/// Image formats blockd opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The driver name QEMU reports (`drv`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!("unsupported format '{other}' (raw or qcow2)")),
        }
    }
}

impl From<vm_config::DriveFormat> for Format {
    fn from(f: vm_config::DriveFormat) -> Self {
        match f {
            vm_config::DriveFormat::Raw => Format::Raw,
            vm_config::DriveFormat::Qcow2 => Format::Qcow2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening raw image {path}: {source}")]
    Raw {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening qcow2 image {path}: {source}")]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl OpenError {
    pub fn io(&self) -> &io::Error {
        match self {
            OpenError::Raw { source, .. } | OpenError::Qcow2 { source, .. } => source,
        }
    }
}

/// What the request handlers need from a drive. Offsets and lengths are in bytes.
pub trait Disk: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// The range may read back as anything afterwards (the guest asked to discard it).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The range reads back as zeroes afterwards; `unmap` allows freeing its space.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Grows or shrinks the image to `size` bytes.
    fn resize(&self, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
    /// The backing file named in the image, if any.
    fn backing_file(&self) -> Option<String> {
        None
    }
    /// Bytes of the image file (the host file layer's end).
    fn file_len(&self) -> u64 {
        0
    }
    /// For io_uring: the descriptor the disk's bytes are read and written at, and the
    /// alignment (offset, length, buffer) requests need on it. None: not a plain file.
    fn uring_fd(&self) -> Option<(std::os::unix::io::RawFd, usize)> {
        None
    }
    /// With O_DIRECT: the ranges a write to `uring_fd` must hold (shared) so that no
    /// read-modify-write of the same blocks runs meanwhile.
    fn write_ranges(&self) -> Option<Arc<RangeLocks>> {
        None
    }
    /// The image locks held for the drive's chain ([`lock`]); None for a disk opened without.
    fn locks(&self) -> Option<&std::sync::Mutex<ChainLocks>> {
        None
    }
}

/// How an image file is opened (from `-drive cache=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenFlags {
    pub readonly: bool,
    /// O_DIRECT (`cache=none`, `directsync`).
    pub direct: bool,
}

/// Opens `path` as `format`; `readonly` opens the file (and a qcow2's whole chain) read-only.
/// The chain is locked first, as QEMU locks it ([`lock`]): an image another process writes
/// (or reads while refusing writers) is not opened.
pub fn open(path: &Path, format: Format, flags: OpenFlags) -> Result<Box<dyn Disk>, OpenError> {
    let err = |source: io::Error| match format {
        Format::Raw => OpenError::Raw { path: path.into(), source },
        Format::Qcow2 => OpenError::Qcow2 { path: path.into(), source },
    };
    let locks = ChainLocks::acquire(&chain_files(path, format), !flags.readonly).map_err(|e| err(e.into()))?;
    let inner: Box<dyn Disk> = match format {
        Format::Raw => Box::new(RawDisk::open_with(path, flags).map_err(err)?),
        Format::Qcow2 => Box::new(Qcow2Disk::open_with(path, flags).map_err(err)?),
    };
    Ok(Box::new(Locked { inner, locks: std::sync::Mutex::new(locks) }))
}

/// A disk and the locks of its chain, released when it is dropped.
struct Locked {
    inner: Box<dyn Disk>,
    locks: std::sync::Mutex<ChainLocks>,
}

impl Disk for Locked {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn resize(&self, size: u64) -> io::Result<()> {
        self.inner.resize(size)
    }
    fn backing_file(&self) -> Option<String> {
        self.inner.backing_file()
    }
    fn file_len(&self) -> u64 {
        self.inner.file_len()
    }
    fn uring_fd(&self) -> Option<(std::os::unix::io::RawFd, usize)> {
        self.inner.uring_fd()
    }
    fn write_ranges(&self) -> Option<Arc<RangeLocks>> {
        self.inner.write_ranges()
    }
    fn locks(&self) -> Option<&std::sync::Mutex<ChainLocks>> {
        Some(&self.locks)
    }
}

/// A buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain owned memory, used by one thread at a time through &/&mut.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(align), align)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size (at least `align`, a power of two >= 1).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    /// The start of the buffer (for the kernel to read or write through io_uring).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its size in bytes.
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    pub fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised bytes; `len` is clamped to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.layout.size())) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// QEMU file-posix's `page_cache_inconsistent`: once fdatasync failed, Linux has marked the
/// pages it could not write clean (and dropped the error), so a later fdatasync would
/// "succeed" with the data lost. Every later flush fails with the first error instead. With
/// O_DIRECT no page cache holds the data and a retry is honest, as in QEMU.
pub struct StickySync {
    /// The errno of the failed sync; 0 while none failed.
    failed: std::sync::atomic::AtomicI32,
    direct: bool,
    /// Unit tests: the next sync fails with this errno before reaching the file (0: none).
    #[cfg(test)]
    pub inject: std::sync::atomic::AtomicI32,
}

impl StickySync {
    pub fn new(direct: bool) -> StickySync {
        StickySync {
            failed: std::sync::atomic::AtomicI32::new(0),
            direct,
            #[cfg(test)]
            inject: std::sync::atomic::AtomicI32::new(0),
        }
    }

    /// Runs `sync` unless an earlier one failed; remembers its failure.
    pub fn run(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let failed = self.failed.load(Ordering::Acquire);
        if failed != 0 {
            return Err(io::Error::from_raw_os_error(failed));
        }
        #[cfg(test)]
        let sync = {
            let errno = self.inject.swap(0, Ordering::AcqRel);
            move || if errno != 0 { Err(io::Error::from_raw_os_error(errno)) } else { sync() }
        };
        let r = sync();
        if let Err(e) = &r {
            if !self.direct {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                self.failed.store(errno, Ordering::Release);
                tracing::error!("fdatasync failed ({e}): every later flush of this image fails");
            }
        }
        r
    }
}

/// A raw image: the file's bytes are the disk's bytes.
pub struct RawDisk {
    file: File,
    /// With O_DIRECT (`file` is then the O_DIRECT descriptor, the only one): the alignment,
    /// and the write ranges a read-modify-write must hold alone.
    direct: Option<(usize, Arc<RangeLocks>)>,
    size: AtomicU64,
    pub sync: StickySync,
}

impl RawDisk {
    pub fn open(path: &Path, readonly: bool) -> io::Result<RawDisk> {
        RawDisk::open_with(path, OpenFlags { readonly, direct: false })
    }

    pub fn open_with(path: &Path, flags: OpenFlags) -> io::Result<RawDisk> {
        if !flags.direct {
            let file = OpenOptions::new().read(true).write(!flags.readonly).open(path)?;
            let size = file.metadata()?.len();
            return Ok(RawDisk { file, direct: None, size: AtomicU64::new(size), sync: StickySync::new(false) });
        }
        // Every access of a direct drive is direct: an unaligned request is a read-modify-write
        // of its aligned blocks on this descriptor, never a buffered write whose page the
        // kernel could write back over a direct write of the same block.
        let file = OpenOptions::new().read(true).write(!flags.readonly).custom_flags(libc::O_DIRECT).open(path)?;
        let size = file.metadata()?.len();
        let align = probe_direct_alignment(&file)?;
        tracing::debug!(path = %path.display(), align, "opened with O_DIRECT");
        Ok(RawDisk {
            file,
            direct: Some((align, Arc::new(RangeLocks::default()))),
            size: AtomicU64::new(size),
            sync: StickySync::new(true),
        })
    }

    /// O_DIRECT read of `buf.len()` bytes at `offset` (any alignment), through an aligned
    /// bounce buffer when the request or the buffer is not aligned.
    fn direct_read(&self, align: usize, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_aligned(align, offset, buf.len()) && (buf.as_ptr() as usize).is_multiple_of(align) {
            return read_full(&self.file, buf, offset);
        }
        let (start, end) = widen(align, offset, buf.len());
        let mut bounce = AlignedBuf::new((end - start) as usize, align)?;
        let b = bounce.as_mut_slice((end - start) as usize);
        read_full(&self.file, b, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&b[skip..skip + buf.len()]);
        Ok(())
    }

    /// O_DIRECT write: aligned requests hold their range shared with other aligned writes; an
    /// unaligned one reads its aligned blocks, patches them and writes them back holding the
    /// range alone.
    fn direct_write(&self, align: usize, locks: &Arc<RangeLocks>, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if is_aligned(align, offset, buf.len()) {
            let _range = locks.lock(offset, end, false);
            if (buf.as_ptr() as usize).is_multiple_of(align) {
                return self.file.write_all_at(buf, offset);
            }
            let mut bounce = AlignedBuf::new(buf.len(), align)?;
            bounce.as_mut_slice(buf.len()).copy_from_slice(buf);
            return self.file.write_all_at(bounce.as_mut_slice(buf.len()), offset);
        }
        let (start, wide_end) = widen(align, offset, buf.len());
        let _range = locks.lock(start, wide_end, true);
        let n = (wide_end - start) as usize;
        let mut bounce = AlignedBuf::new(n, align)?;
        let b = bounce.as_mut_slice(n);
        read_full(&self.file, b, start)?;
        let skip = (offset - start) as usize;
        b[skip..skip + buf.len()].copy_from_slice(buf);
        let file_len = self.file.metadata()?.len();
        self.file.write_all_at(b, start)?;
        // The last block of a file whose size is not a multiple of the alignment: the whole
        // block went out, so the file is cut back to where it ended (or where the write did).
        if wide_end > file_len {
            self.file.set_len(file_len.max(end))?;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// The smallest O_DIRECT read size/alignment the file accepts (512 or 4096 here).
fn probe_direct_alignment(file: &File) -> io::Result<usize> {
    let mut buf = AlignedBuf::new(4096, 4096)?;
    for align in [512usize, 4096] {
        match file.read_at(buf.as_mut_slice(align), 0) {
            Ok(_) => return Ok(align),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::Unsupported, "the file system refuses O_DIRECT reads"))
}

/// Reads `buf` at `offset`; bytes past the end of the file read as zero (a file resized to a
/// size that is not a whole number of sectors, as QEMU allows).
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            None => read_full(&self.file, buf, offset),
            Some((align, _)) => self.direct_read(*align, buf, offset),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            None => self.file.write_all_at(buf, offset),
            Some((align, locks)) => self.direct_write(*align, locks, buf, offset),
        }
    }
    fn flush(&self) -> io::Result<()> {
        self.sync.run(|| self.file.sync_data())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            // A discard is a hint: a file system that cannot punch holes just keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zero_buffers(self, offset, len),
            Err(e) => Err(e),
        }
    }
    fn resize(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }
    fn file_len(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn uring_fd(&self) -> Option<(std::os::unix::io::RawFd, usize)> {
        let align = self.direct.as_ref().map(|(a, _)| *a).unwrap_or(SECTOR_ALIGN);
        Some((self.file.as_raw_fd(), align))
    }
    fn write_ranges(&self) -> Option<Arc<RangeLocks>> {
        self.direct.as_ref().map(|(_, l)| l.clone())
    }
}

fn is_aligned(align: usize, offset: u64, len: usize) -> bool {
    offset.is_multiple_of(align as u64) && len.is_multiple_of(align)
}

/// `offset..offset+len` widened to whole `align`-sized blocks.
fn widen(align: usize, offset: u64, len: usize) -> (u64, u64) {
    let a = align as u64;
    let start = offset - offset % a;
    let end = (offset + len as u64).div_ceil(a) * a;
    (start, end)
}

/// Request alignment on a buffered descriptor (virtio-blk sectors).
const SECTOR_ALIGN: usize = 512;

/// Zeroes a range by writing zero-filled buffers (the fallback when the file system has no
/// fallocate mode for it).
fn write_zero_buffers(disk: &dyn Disk, mut offset: u64, mut len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; 1 << 20];
    while len > 0 {
        let n = len.min(zeroes.len() as u64) as usize;
        disk.write_at(&zeroes[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// A qcow2 image through imago. `discard_*` and shrinking need `&mut` in imago (they
/// invalidate mappings other requests may hold), hence the lock: I/O takes it shared, those
/// exclusive.
pub struct Qcow2Disk {
    access: RwLock<SyncFormatAccess<ImagoFile>>,
    size: AtomicU64,
    backing: Option<String>,
    path: PathBuf,
    pub sync: StickySync,
    /// Writes that may allocate and have not written their metadata back yet.
    allocating: std::sync::atomic::AtomicUsize,
}

impl Qcow2Disk {
    pub fn open(path: &Path, readonly: bool) -> io::Result<Qcow2Disk> {
        Qcow2Disk::open_with(path, OpenFlags { readonly, direct: false })
    }

    pub fn open_with(path: &Path, flags: OpenFlags) -> io::Result<Qcow2Disk> {
        let opts = StorageOpenOptions::new().filename(path).write(!flags.readonly).direct(flags.direct);
        // The builder opens the backing chain the header names (read-only whatever the top is).
        let qcow2 = Qcow2::<ImagoFile>::builder_path(path)
            .write(!flags.readonly)
            .storage_open_options(opts)
            .open_sync(imago::PermissiveImplicitOpenGate::default())?;
        let backing = qcow2.implicit_backing_file().cloned();
        let access = SyncFormatAccess::new(qcow2)?;
        let size = access.size();
        Ok(Qcow2Disk {
            access: RwLock::new(access),
            size: AtomicU64::new(size),
            backing,
            path: path.into(),
            sync: StickySync::new(flags.direct),
            allocating: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Runs a write that may allocate, counted in `allocating` until its tables are written
    /// back.
    fn allocating_write(&self, f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        self.allocating.fetch_add(1, Ordering::SeqCst);
        let r = f();
        self.allocating.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, SyncFormatAccess<ImagoFile>> {
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, SyncFormatAccess<ImagoFile>> {
        self.access.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Disk for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.shared().read(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let access = self.shared();
        // A write whose whole range is already allocated and writable in place changes no
        // metadata (nothing can unmap it meanwhile: discards take the image exclusively), so
        // it may skip the write-back walk; any other write allocates and writes back.
        let in_place = matches!(
            access.get_mapping_sync(offset, buf.len() as u64),
            Ok((imago::Mapping::Raw { writable: true, .. }, len)) if len >= buf.len() as u64
        );
        if in_place {
            access.write(buf, offset)?;
            // The mapping it found may be one an allocating write still in flight made and
            // has not written back yet: then this write writes back too. No allocating write
            // in flight now means each one before it wrote back its tables.
            if self.allocating.load(Ordering::SeqCst) == 0 {
                return Ok(());
            }
            return write_back_metadata(&access);
        }
        self.allocating_write(|| {
            access.write(buf, offset)?;
            write_back_metadata(&access)
        })
    }
    fn flush(&self) -> io::Result<()> {
        let access = self.shared();
        access.flush()?;
        self.sync.run(|| access.sync())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut access = self.exclusive();
        access.discard_to_any(offset, len)?;
        write_back_metadata(&access)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            let mut access = self.exclusive();
            access.discard_to_zero(offset, len)?;
            write_back_metadata(&access)
        } else {
            let access = self.shared();
            self.allocating_write(|| {
                access.write_zeroes(offset, len)?;
                write_back_metadata(&access)
            })
        }
    }
    fn resize(&self, size: u64) -> io::Result<()> {
        let mut access = self.exclusive();
        // Zero: a grown range must not show a backing file's data through (QEMU's behaviour).
        access.resize(size, PreallocateMode::Zero)?;
        access.flush()?;
        self.size.store(access.size(), Ordering::Release);
        Ok(())
    }
    fn backing_file(&self) -> Option<String> {
        self.backing.clone()
    }
    fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

/// What makes an acknowledged qcow2 write survive a kill of blockd: imago keeps the L2 entries
/// and refcounts of newly allocated clusters in its metadata caches until `flush()`, so before
/// a writing request completes its caches are written back to the image file. `flush()` is
/// `pwrite`s of the dirty tables only (no fdatasync: the page cache outlives the process, and
/// durability against a host crash is the guest's FLUSH), refcount blocks before the L2 tables
/// that point at them (imago orders its caches so), after the data itself was written. A
/// write into clusters already allocated leaves nothing dirty, and the write-back finds no
/// table to write; [`Qcow2Disk::write_at`] skips the walk for it unless an allocating write is in
/// flight.
fn write_back_metadata(access: &SyncFormatAccess<ImagoFile>) -> io::Result<()> {
    access.flush()
}

impl Drop for Qcow2Disk {
    fn drop(&mut self) {
        // imago keeps metadata in caches: write it out before the image is closed.
        if let Err(e) = self.shared().flush() {
            tracing::error!("flushing the qcow2 image on close: {e}");
        }
    }
}

/// Creates a qcow2 image at `path` of `size` bytes whose backing file is `backing` (written
/// into the header as given) in `backing_format`. An existing file is overwritten (the seed:
/// "If the file exists ... the snapshot will be created in the existing file").
pub fn create_qcow2_overlay(path: &Path, size: u64, backing: &str, backing_format: Format) -> io::Result<()> {
    use imago::{FormatCreateBuilder, Storage, StorageCreateOptions};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let file = ImagoFile::create_open(StorageCreateOptions::new().filename(path).size(0).overwrite(true)).await?;
        Qcow2::<ImagoFile>::create_builder(file)
            .size(size)
            .backing(backing.to_string(), backing_format.name().to_string())
            .create()
            .await
    })?;
    // The header must be on disk before the overlay is opened and the switch is made.
    File::open(path)?.sync_all()
}

/// The files of the chain whose top is `top`: `top` first, then each backing file as the
/// qcow2 headers name it (relative names against the directory of the image naming them, as
/// QEMU resolves them). A header that cannot be read ends the walk.
pub fn chain_files(top: &Path, format: Format) -> Vec<PathBuf> {
    let mut chain = vec![top.to_path_buf()];
    let mut format = format;
    // A chain that loops back on itself ends here too.
    while format == Format::Qcow2 && chain.len() < 64 {
        let Some(cur) = chain.last() else { break };
        let Ok(Some((name, next_format))) = qcow2_backing(cur) else { break };
        let next = match cur.parent() {
            Some(dir) if Path::new(&name).is_relative() => dir.join(&name),
            _ => PathBuf::from(&name),
        };
        if chain.iter().any(|c| same_file(c, &next)) {
            break;
        }
        chain.push(next);
        format = next_format;
    }
    chain
}

/// A qcow2 header's backing file name and its format (qcow2 unless the header extension
/// says raw; a format other drivers would probe is treated as raw: nothing further to walk).
fn qcow2_backing(path: &Path) -> io::Result<Option<(String, Format)>> {
    let f = File::open(path)?;
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h[..72], 0)?;
    if &h[0..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let be64 = |h: &[u8], at: usize| u64::from_be_bytes(h[at..at + 8].try_into().unwrap_or_default());
    let be32 = |h: &[u8], at: usize| u32::from_be_bytes(h[at..at + 4].try_into().unwrap_or_default());
    let (off, len, version) = (be64(&h, 8), be32(&h, 16), be32(&h, 4));
    if off == 0 || len == 0 || len > 4096 {
        return Ok(None);
    }
    let mut name = vec![0u8; len as usize];
    f.read_exact_at(&mut name, off)?;
    let name = String::from_utf8_lossy(&name).into_owned();
    // Header extensions (after the 72-byte v2 header or v3's header_length): 0xe2792aca is
    // the backing file format name.
    let ext_start = if version >= 3 {
        f.read_exact_at(&mut h[72..104], 72)?;
        u64::from(be32(&h, 100))
    } else {
        72
    };
    let mut format = Format::Qcow2;
    let mut at = ext_start;
    for _ in 0..64 {
        let mut e = [0u8; 8];
        if f.read_exact_at(&mut e, at).is_err() {
            break;
        }
        let kind = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
        let elen = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
        if kind == 0 || elen > 4096 {
            break;
        }
        if kind == 0xe279_2aca {
            let mut v = vec![0u8; elen as usize];
            f.read_exact_at(&mut v, at + 8)?;
            if v != b"qcow2" {
                format = Format::Raw;
            }
        }
        at += 8 + u64::from(elen).div_ceil(8) * 8;
    }
    Ok(Some((name, format)))
}

/// Whether two paths name one file (the same inode, whatever the links on the way).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}
