//! The drive behind a socket: a raw file or a qcow2 image (through imago), behind one small
//! synchronous interface that the queue workers call.
//!
//! raw uses plain `pread`/`pwrite` on the file (page cache; `cache=none`/O_DIRECT is a later
//! step). qcow2 uses imago's `SyncFormatAccess` (its own current-thread tokio runtime, driven
//! from whichever worker thread calls it), with the image's backing chain opened as the image
//! names it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::SyncFormatAccess;

/// Image formats blockd opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
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
}

/// Opens `path` as `format`; `readonly` opens the file (and a qcow2's whole chain) read-only.
pub fn open(path: &Path, format: Format, readonly: bool) -> Result<Box<dyn Disk>, OpenError> {
    match format {
        Format::Raw => RawDisk::open(path, readonly)
            .map(|d| Box::new(d) as Box<dyn Disk>)
            .map_err(|source| OpenError::Raw { path: path.into(), source }),
        Format::Qcow2 => Qcow2Disk::open(path, readonly)
            .map(|d| Box::new(d) as Box<dyn Disk>)
            .map_err(|source| OpenError::Qcow2 { path: path.into(), source }),
    }
}

/// A raw image: the file's bytes are the disk's bytes.
pub struct RawDisk {
    file: File,
    size: u64,
}

impl RawDisk {
    pub fn open(path: &Path, readonly: bool) -> io::Result<RawDisk> {
        let file = OpenOptions::new().read(true).write(!readonly).open(path)?;
        let size = file.metadata()?.len();
        Ok(RawDisk { file, size })
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

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
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
}

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

/// A qcow2 image through imago. `discard_*` need `&mut` in imago (they invalidate mappings
/// other requests may hold), hence the lock: I/O takes it shared, discards exclusive.
pub struct Qcow2Disk {
    access: RwLock<SyncFormatAccess<ImagoFile>>,
    size: u64,
}

impl Qcow2Disk {
    pub fn open(path: &Path, readonly: bool) -> io::Result<Qcow2Disk> {
        let mut qcow2 = Qcow2::<ImagoFile>::open_path_sync(path, !readonly)?;
        qcow2.open_implicit_dependencies_sync()?;
        let access = SyncFormatAccess::new(qcow2)?;
        let size = access.size();
        Ok(Qcow2Disk { access: RwLock::new(access), size })
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, SyncFormatAccess<ImagoFile>> {
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl Disk for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
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
        self.access.write().unwrap_or_else(|p| p.into_inner()).discard_to_any(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            self.access.write().unwrap_or_else(|p| p.into_inner()).discard_to_zero(offset, len)
        } else {
            self.shared().write_zeroes(offset, len)
        }
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
