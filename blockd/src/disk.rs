//! The image behind a drive: a raw file or a qcow2 image (through imago), behind one small
//! synchronous interface that the I/O threads call.
//!
//! raw uses `pread`/`pwrite` on the file; with O_DIRECT (`cache=none`/`directsync`) through
//! buffers aligned to the file's direct-I/O alignment (probed at open), and a second,
//! buffered descriptor for the rare request whose offset or length is not aligned (the kernel
//! keeps the page cache coherent around direct I/O). qcow2 uses imago's `SyncFormatAccess`
//! (its own current-thread tokio runtime, driven from whichever thread calls it), with the
//! image's backing chain opened as the image names it, and imago's `direct` open option for
//! O_DIRECT.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

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
}

/// How an image file is opened (from `-drive cache=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenFlags {
    pub readonly: bool,
    /// O_DIRECT (`cache=none`, `directsync`).
    pub direct: bool,
}

/// Opens `path` as `format`; `readonly` opens the file (and a qcow2's whole chain) read-only.
pub fn open(path: &Path, format: Format, flags: OpenFlags) -> Result<Box<dyn Disk>, OpenError> {
    match format {
        Format::Raw => RawDisk::open_with(path, flags)
            .map(|d| Box::new(d) as Box<dyn Disk>)
            .map_err(|source| OpenError::Raw { path: path.into(), source }),
        Format::Qcow2 => Qcow2Disk::open_with(path, flags)
            .map(|d| Box::new(d) as Box<dyn Disk>)
            .map_err(|source| OpenError::Qcow2 { path: path.into(), source }),
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

/// A raw image: the file's bytes are the disk's bytes.
pub struct RawDisk {
    file: File,
    /// With O_DIRECT: a buffered descriptor for unaligned requests, and the alignment.
    direct: Option<(File, usize)>,
    size: AtomicU64,
}

impl RawDisk {
    pub fn open(path: &Path, readonly: bool) -> io::Result<RawDisk> {
        RawDisk::open_with(path, OpenFlags { readonly, direct: false })
    }

    pub fn open_with(path: &Path, flags: OpenFlags) -> io::Result<RawDisk> {
        let buffered = OpenOptions::new().read(true).write(!flags.readonly).open(path)?;
        let size = buffered.metadata()?.len();
        if !flags.direct {
            return Ok(RawDisk { file: buffered, direct: None, size: AtomicU64::new(size) });
        }
        let direct = OpenOptions::new().read(true).write(!flags.readonly).custom_flags(libc::O_DIRECT).open(path)?;
        let align = probe_direct_alignment(&direct)?;
        tracing::debug!(path = %path.display(), align, "opened with O_DIRECT");
        Ok(RawDisk { file: direct, direct: Some((buffered, align)), size: AtomicU64::new(size) })
    }

    /// The descriptor and, with O_DIRECT, whether a bounce buffer is needed.
    fn pick(&self, offset: u64, len: usize) -> (&File, Option<usize>) {
        match &self.direct {
            None => (&self.file, None),
            Some((buffered, align)) => {
                if offset.is_multiple_of(*align as u64) && len.is_multiple_of(*align) {
                    (&self.file, Some(*align))
                } else {
                    (buffered, None)
                }
            }
        }
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
        match self.pick(offset, buf.len()) {
            (f, None) => read_full(f, buf, offset),
            (f, Some(align)) => {
                let mut bounce = AlignedBuf::new(buf.len(), align)?;
                let b = bounce.as_mut_slice(buf.len());
                read_full(f, b, offset)?;
                buf.copy_from_slice(b);
                Ok(())
            }
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.pick(offset, buf.len()) {
            (f, None) => f.write_all_at(buf, offset),
            (f, Some(align)) => {
                let mut bounce = AlignedBuf::new(buf.len(), align)?;
                let b = bounce.as_mut_slice(buf.len());
                b.copy_from_slice(buf);
                f.write_all_at(b, offset)
            }
        }
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
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
        let align = self.direct.as_ref().map(|(_, a)| *a).unwrap_or(SECTOR_ALIGN);
        Some((self.file.as_raw_fd(), align))
    }
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
        Ok(Qcow2Disk { access: RwLock::new(access), size: AtomicU64::new(size), backing, path: path.into() })
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
        self.shared().write(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        let access = self.shared();
        access.flush()?;
        access.sync()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.exclusive().discard_to_any(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            self.exclusive().discard_to_zero(offset, len)
        } else {
            self.shared().write_zeroes(offset, len)
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
