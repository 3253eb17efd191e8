//! Image locking as QEMU's file-posix does it, so that blockd, QEMU and qemu-img see each
//! other's locks: open file description (OFD) read locks on single bytes of the image file,
//! byte `PERM_BASE + i` while holding permission `i`, byte `SHARED_BASE + i` while not
//! sharing it (`raw_apply_lock_bytes`); before that, a test for a write lock on the opposite
//! bytes finds another holder of a permission we do not share, or one that does not share a
//! permission we take (`raw_check_lock_bytes`). The permission bits are QEMU 7.2's
//! `BLK_PERM_*` (include/block/block-common.h).
//!
//! A writable image takes consistent read, write and resize and shares neither write nor
//! resize (what QEMU holds on a qcow2 it writes: bytes 100, 101, 103, 201, 203); a read-only
//! one (a backing file, a read-only drive) takes consistent read and shares neither write nor
//! resize either, as QEMU's backing files.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// `RAW_LOCK_PERM_BASE` and `RAW_LOCK_SHARED_BASE` in QEMU's block/file-posix.c.
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// `BLK_PERM_*` bit numbers and the names QEMU's messages use (`bdrv_perm_names`).
const PERMS: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const RESIZE: u32 = 1 << 3;
const ALL: u32 = (1 << PERMS.len()) - 1;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// QEMU: `Failed to get "write" lock` / `Is another process using the image [...]?`
    #[error("Failed to get {}\"{perm}\" lock: is another process using the image [{path}]?", if *shared { "shared " } else { "" })]
    Conflict { perm: &'static str, shared: bool, path: PathBuf },
    #[error("locking {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl From<LockError> for io::Error {
    fn from(e: LockError) -> io::Error {
        match &e {
            LockError::Conflict { .. } => io::Error::new(io::ErrorKind::ResourceBusy, e),
            LockError::Io { source, .. } => io::Error::new(source.kind(), e),
        }
    }
}

/// The lock bytes one image is held with; released when dropped (the descriptor closes).
pub struct ImageLock {
    file: File,
    path: PathBuf,
    perms: u32,
    unshared: u32,
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

impl ImageLock {
    /// Locks `path` for a writer (`writable`) or a reader, failing as QEMU does when another
    /// process holds it in a conflicting way.
    pub fn acquire(path: &Path, writable: bool) -> Result<ImageLock, LockError> {
        let file = File::open(path).map_err(|source| LockError::Io { path: path.into(), source })?;
        let mut l = ImageLock { file, path: path.into(), perms: 0, unshared: 0 };
        let perms = if writable { CONSISTENT_READ | WRITE | RESIZE } else { CONSISTENT_READ };
        l.set(perms, WRITE | RESIZE)?;
        Ok(l)
    }

    /// Takes `perms` and stops sharing `unshared`, releasing the bytes no longer needed; on a
    /// conflict the previous bytes are held again.
    fn set(&mut self, perms: u32, unshared: u32) -> Result<(), LockError> {
        let (old_perms, old_unshared) = (self.perms, self.unshared);
        self.apply(perms, unshared)?;
        if let Err(e) = self.check(perms, unshared) {
            let _ = self.apply(old_perms, old_unshared);
            return Err(e);
        }
        Ok(())
    }

    /// Drops write and resize: what the image held after it becomes a backing file.
    pub fn to_readonly(&mut self) -> Result<(), LockError> {
        self.set(CONSISTENT_READ, WRITE | RESIZE)
    }

    /// Takes write and resize again (a snapshot that failed after [`ImageLock::to_readonly`]).
    pub fn to_writable(&mut self) -> Result<(), LockError> {
        self.set(CONSISTENT_READ | WRITE | RESIZE, WRITE | RESIZE)
    }

    fn fcntl(&self, cmd: i32, fl: &mut libc::flock) -> Result<(), LockError> {
        // SAFETY: an fcntl lock command on a descriptor we own with a valid flock.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, fl as *mut libc::flock) };
        if rc == 0 {
            Ok(())
        } else {
            Err(LockError::Io { path: self.path.clone(), source: io::Error::last_os_error() })
        }
    }

    /// Read-locks the bytes of `perms` and `unshared`, unlocks the others.
    fn apply(&mut self, perms: u32, unshared: u32) -> Result<(), LockError> {
        for i in 0..PERMS.len() as i64 {
            let bit = 1u32 << i;
            for (base, want) in [(PERM_BASE, perms & bit != 0), (SHARED_BASE, unshared & bit != 0)] {
                let mut fl = flock(if want { libc::F_RDLCK } else { libc::F_UNLCK }, base + i);
                self.fcntl(libc::F_OFD_SETLK, &mut fl)?;
            }
        }
        self.perms = perms & ALL;
        self.unshared = unshared & ALL;
        Ok(())
    }

    /// Whether another descriptor holds a byte that conflicts: one not sharing a permission we
    /// take, or one taking a permission we do not share.
    fn check(&self, perms: u32, unshared: u32) -> Result<(), LockError> {
        for (i, name) in PERMS.iter().enumerate() {
            let bit = 1u32 << i;
            for (base, ours, shared) in [(SHARED_BASE, perms, false), (PERM_BASE, unshared, true)] {
                if ours & bit == 0 {
                    continue;
                }
                let mut fl = flock(libc::F_WRLCK, base + i as i64);
                self.fcntl(libc::F_OFD_GETLK, &mut fl)?;
                if fl.l_type != libc::F_UNLCK as libc::c_short {
                    return Err(LockError::Conflict { perm: name, shared, path: self.path.clone() });
                }
            }
        }
        Ok(())
    }
}

/// The locks of a drive's chain: its active image (writable unless the drive is read-only)
/// and every backing file (read-only).
pub struct ChainLocks {
    pub top: ImageLock,
    pub backing: Vec<ImageLock>,
}

impl ChainLocks {
    pub fn acquire(chain: &[PathBuf], writable: bool) -> Result<ChainLocks, LockError> {
        let (top, rest) = chain.split_first().ok_or_else(|| LockError::Io {
            path: PathBuf::new(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no image"),
        })?;
        let top = ImageLock::acquire(top, writable)?;
        let backing = rest.iter().map(|p| ImageLock::acquire(p, false)).collect::<Result<_, _>>()?;
        Ok(ChainLocks { top, backing })
    }
}
