//! The image file every side reads and writes: raw, on a real disk (never tmpfs, where
//! O_DIRECT and the disk's speed are both missing), filled with random data so that reads hit
//! allocated blocks, then flushed and evicted from the page cache.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::error::BlockError;
use super::workload::Rng;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Refuses a directory on tmpfs/ramfs; returns the filesystem type number.
pub fn check_dir(dir: &Path) -> Result<i64, BlockError> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| BlockError::Setup(format!("{}: a NUL in the path", dir.display())))?;
    // SAFETY: statfs writes into the zeroed struct we own and reads the NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above; both pointers are valid for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(BlockError::Io {
            what: format!("statfs {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    let t = st.f_type as i64;
    if t == TMPFS_MAGIC || t == RAMFS_MAGIC {
        return Err(BlockError::Setup(format!(
            "{} is on tmpfs/ramfs: the image must be on a real disk (pass --dir)",
            dir.display()
        )));
    }
    Ok(t)
}

/// Writes `size` bytes of random data to `path`, syncs it and drops it from the page cache.
pub fn create(path: &Path, size: u64, seed: u64) -> Result<(), BlockError> {
    let mut f = File::create(path).map_err(BlockError::io(format!("creating {}", path.display())))?;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).map_err(BlockError::io(format!("writing {}", path.display())))?;
        left -= n as u64;
    }
    drop_cache(path)?;
    // O_DIRECT must work here, for every side alike.
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(BlockError::io(format!("opening {} with O_DIRECT", path.display())))?;
    Ok(())
}

/// Flushes the file and evicts its pages from the page cache, so no side starts with the
/// image cached (matters only for a side that does not use O_DIRECT).
pub fn drop_cache(path: &Path) -> Result<(), BlockError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(BlockError::io(format!("opening {}", path.display())))?;
    f.sync_all().map_err(BlockError::io(format!("fsync {}", path.display())))?;
    // SAFETY: an advice call on an fd we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(BlockError::Io {
            what: "posix_fadvise(DONTNEED)".into(),
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// The mount (device, type) a path lies on, from /proc/mounts: the longest matching prefix.
pub fn mount_of(path: &Path) -> Option<(String, String, String)> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let p = path.canonicalize().ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.to_string(), f.get(1)?.to_string(), f.get(2)?.to_string()))
        })
        .filter(|(_, mp, _)| p.starts_with(mp))
        .max_by_key(|(_, mp, _)| mp.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_is_refused_and_a_disk_directory_is_not() {
        if Path::new("/dev/shm").is_dir() {
            assert!(matches!(check_dir(Path::new("/dev/shm")), Err(BlockError::Setup(_))));
        }
        assert!(check_dir(Path::new(env!("CARGO_MANIFEST_DIR"))).is_ok());
    }

    #[test]
    fn image_is_random_and_sized() {
        let dir = std::env::temp_dir().join(format!("flotilla-bench-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("i.raw");
        let r = create(&p, (4 << 20) + 4096, 3);
        let data = std::fs::read(&p);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(BlockError::Io { what, .. }) = &r {
            // a temp dir without O_DIRECT (tmpfs) is not what this test is about
            if what.contains("O_DIRECT") {
                return;
            }
        }
        r.unwrap();
        let data = data.unwrap();
        assert_eq!(data.len(), (4 << 20) + 4096);
        let zero_pages = data.chunks(4096).filter(|c| c.iter().all(|&b| b == 0)).count();
        assert_eq!(zero_pages, 0);
    }
}
