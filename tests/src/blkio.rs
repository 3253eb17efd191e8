//! Slowing a process's disk I/O down with a cgroup v1 `blkio` throttle, so that a daemon doing
//! O_DIRECT I/O (blockd with `cache=none`) holds its requests for milliseconds: a SIGKILL then
//! lands while requests are really in flight in the daemon, not only queued in the guest.
//!
//! Direct I/O is throttled at bio submission (cgroup v1 does not throttle buffered writeback), and
//! io_uring's workers are threads of the process, in its cgroup. Processes started later by a
//! throttled process (a restarted blockd under the launcher) inherit the cgroup. Needs root and a
//! mounted v1 `blkio` hierarchy; [`Throttle::new`] says why it cannot when it cannot.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where the v1 blkio hierarchy is mounted on the hosts these tests run on.
const BLKIO_ROOT: &str = "/sys/fs/cgroup/blkio";

#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    #[error("no cgroup v1 blkio hierarchy at {BLKIO_ROOT} (cgroup2-only host?)")]
    NoBlkio,
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ThrottleError {
    let path = path.to_path_buf();
    move |source| ThrottleError::Io { what, path, source }
}

/// Limits for the disk holding a file.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub read_bps: u64,
    pub write_bps: u64,
    pub read_iops: u64,
    pub write_iops: u64,
}

/// A blkio cgroup with throttle rules on one disk; its processes are moved back to the root
/// cgroup and the cgroup removed on drop.
pub struct Throttle {
    dir: PathBuf,
    /// The disk's `major:minor`.
    pub device: String,
}

/// The whole disk under the filesystem holding `path` (rules on a partition do not apply).
fn disk_of(path: &Path) -> Result<String, ThrottleError> {
    let dev = std::fs::metadata(path).map_err(io("stat", path))?.dev();
    // glibc's gnu_dev_major / gnu_dev_minor encoding.
    let major = ((dev & 0x0000_0000_000f_ff00) >> 8) | ((dev & 0xffff_f000_0000_0000) >> 32);
    let minor = (dev & 0x0000_0000_0000_00ff) | ((dev & 0x0000_0fff_fff0_0000) >> 12);
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        let parent = sys.join("..").join("dev");
        let d = std::fs::read_to_string(&parent).map_err(io("reading", &parent))?;
        return Ok(d.trim().to_string());
    }
    Ok(format!("{major}:{minor}"))
}

impl Throttle {
    /// A new cgroup throttling the disk that holds `file`.
    pub fn new(tag: &str, file: &Path, limits: Limits) -> Result<Throttle, ThrottleError> {
        let root = Path::new(BLKIO_ROOT);
        if !root.join("blkio.throttle.write_bps_device").exists() {
            return Err(ThrottleError::NoBlkio);
        }
        let device = disk_of(file)?;
        let dir = root.join(format!("flotilla-{tag}-{}", std::process::id()));
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(io("creating the cgroup", &dir))?;
        }
        let t = Throttle { dir, device };
        for (name, v) in [
            ("blkio.throttle.read_bps_device", limits.read_bps),
            ("blkio.throttle.write_bps_device", limits.write_bps),
            ("blkio.throttle.read_iops_device", limits.read_iops),
            ("blkio.throttle.write_iops_device", limits.write_iops),
        ] {
            let p = t.dir.join(name);
            std::fs::write(&p, format!("{} {v}", t.device)).map_err(io("writing", &p))?;
        }
        Ok(t)
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), ThrottleError> {
        let p = self.dir.join("cgroup.procs");
        std::fs::write(&p, pid.to_string()).map_err(io("writing", &p))
    }

    /// Moves the calling thread (not its whole process) into the cgroup until the guard is
    /// dropped: processes it starts meanwhile are born in the cgroup (a cgroup v1 child inherits
    /// its forking thread's), while the process's other threads stay out.
    pub fn enter_thread(&self) -> Result<ThreadInCgroup, ThrottleError> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let p = self.dir.join("tasks");
        std::fs::write(&p, tid.to_string()).map_err(io("writing", &p))?;
        Ok(ThreadInCgroup { tid })
    }

    /// Bytes the cgroup has written to the disk so far (`blkio.throttle.io_service_bytes`).
    pub fn written(&self) -> u64 {
        let p = self.dir.join("blkio.throttle.io_service_bytes");
        let text = std::fs::read_to_string(p).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(self.device.as_str()) && w.next() == Some("Write"))
                    .then(|| w.next().and_then(|n| n.parse::<u64>().ok()))
                    .flatten()
            })
            .sum()
    }
}

/// The calling thread's stay in a [`Throttle`]'s cgroup; dropping it moves the thread back to
/// the root cgroup.
pub struct ThreadInCgroup {
    tid: i32,
}

impl Drop for ThreadInCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(Path::new(BLKIO_ROOT).join("tasks"), self.tid.to_string());
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        let root = Path::new(BLKIO_ROOT).join("cgroup.procs");
        for pid in procs.lines() {
            let _ = std::fs::write(&root, pid);
        }
        // Removable once empty; a process still exiting may hold it for a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
