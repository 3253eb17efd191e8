//! Host memory of one VM: `/proc/PID/smaps_rollup` of each of its processes, and the bytes
//! allocated to the memfds they hold open (Flotilla's guest RAM). Parsing is kept apart from
//! reading /proc so that it can be tested on fixed text.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use serde_json::{json, Value};

use crate::error::BenchError;
use crate::procfs;

/// The `smaps_rollup` figures the balloon report uses, in KiB (smaps' "kB").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rollup {
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Anonymous pages: QEMU's guest RAM (it frees it with madvise(DONTNEED)).
    pub anonymous_kib: u64,
    /// Proportional share of shared memory (shmem/memfd) pages: Flotilla's guest RAM.
    pub pss_shmem_kib: u64,
    pub swap_kib: u64,
}

impl Rollup {
    pub fn plus(self, o: Rollup) -> Rollup {
        Rollup {
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
            anonymous_kib: self.anonymous_kib + o.anonymous_kib,
            pss_shmem_kib: self.pss_shmem_kib + o.pss_shmem_kib,
            swap_kib: self.swap_kib + o.swap_kib,
        }
    }
}

/// Parses `/proc/PID/smaps_rollup`: one mapping-like header line (`... [rollup]`), then
/// `Key:   <n> kB` lines. Unknown keys are skipped; a known key without `<n> kB`, or a file
/// without `Rss`, is an error naming the line.
pub fn parse_rollup(text: &str) -> Result<Rollup, String> {
    let mut r = Rollup::default();
    let mut saw_rss = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.ends_with("[rollup]") {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("line {}: neither the [rollup] header nor 'Key: value': {line:?}", i + 1));
        };
        let slot = match key.trim() {
            "Rss" => {
                saw_rss = true;
                &mut r.rss_kib
            }
            "Pss" => &mut r.pss_kib,
            "Anonymous" => &mut r.anonymous_kib,
            "Pss_Shmem" => &mut r.pss_shmem_kib,
            "Swap" => &mut r.swap_kib,
            _ => continue,
        };
        let mut w = value.split_whitespace();
        *slot = match (w.next().map(str::parse::<u64>), w.next(), w.next()) {
            (Some(Ok(n)), Some("kB"), None) => n,
            _ => return Err(format!("line {}: expected '<n> kB': {line:?}", i + 1)),
        };
    }
    if !saw_rss {
        return Err("no Rss line".into());
    }
    Ok(r)
}

/// One process's share of a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessMem {
    pub pid: i32,
    pub comm: String,
    pub rollup: Rollup,
}

/// A VM's host memory at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub processes: Vec<ProcessMem>,
    /// Sum over the processes (RSS counts a page shared by two processes twice; PSS does not).
    pub total: Rollup,
    /// Bytes allocated (st_blocks * 512) to the distinct memfds the processes hold open.
    pub memfd_bytes: u64,
}

impl Snapshot {
    pub fn to_json(&self) -> Value {
        json!({
            "rss_kib": self.total.rss_kib,
            "pss_kib": self.total.pss_kib,
            "anonymous_kib": self.total.anonymous_kib,
            "pss_shmem_kib": self.total.pss_shmem_kib,
            "swap_kib": self.total.swap_kib,
            "memfd_allocated_bytes": self.memfd_bytes,
            "processes": self.processes.iter().map(|p| json!({
                "pid": p.pid,
                "comm": p.comm,
                "rss_kib": p.rollup.rss_kib,
                "pss_kib": p.rollup.pss_kib,
                "anonymous_kib": p.rollup.anonymous_kib,
                "pss_shmem_kib": p.rollup.pss_shmem_kib,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Sums allocated bytes per distinct file: `(device, inode, allocated bytes)` as seen through
/// each process's fds; a memfd open in two processes (vmm-core and balloond) counts once.
pub fn distinct_allocated(files: &[(u64, u64, u64)]) -> u64 {
    let by_file: BTreeMap<(u64, u64), u64> = files.iter().map(|&(dev, ino, bytes)| ((dev, ino), bytes)).collect();
    by_file.values().sum()
}

/// `(dev, inode, allocated bytes)` of every memfd `pid` holds open. A process that exits while
/// we look simply contributes nothing.
fn memfds_of(pid: i32) -> Vec<(u64, u64, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:")))
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| (m.dev(), m.ino(), m.blocks() * 512))
        .collect()
}

/// The memory of `root` (the VMM process the bench started) and all its descendants now.
pub fn snapshot(root: i32) -> Result<Snapshot, BenchError> {
    let mut s = Snapshot::default();
    let mut files = Vec::new();
    for pid in procfs::process_tree(root) {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // Gone meanwhile (a helper that exited): nothing of it to count.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // Kernel threads and zombies read empty; the root must not.
            Err(e) => return Err(BenchError::Io { what: format!("reading {path}"), source: e }),
        };
        if text.trim().is_empty() {
            continue;
        }
        let rollup = parse_rollup(&text)
            .map_err(|detail| BenchError::GuestRam { what: format!("pid {pid} ({path})"), detail })?;
        let comm = procfs::comm_and_ppid(pid).map(|c| c.0).unwrap_or_else(|| "?".into());
        files.extend(memfds_of(pid));
        s.total = s.total.plus(rollup);
        s.processes.push(ProcessMem { pid, comm, rollup });
    }
    if s.processes.is_empty() {
        return Err(BenchError::GuestRam {
            what: format!("pid {root}"),
            detail: "no process of the VM could be read in /proc".into(),
        });
    }
    s.memfd_bytes = distinct_allocated(&files);
    Ok(s)
}
