//! query-blockstats counters of one drive: what the device layer served (QEMU's BlockBackend
//! accounting: successful requests only) and the highest byte written.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters of the device layer, updated by the I/O threads.
#[derive(Debug, Default)]
pub struct Stats {
    pub rd_bytes: AtomicU64,
    pub wr_bytes: AtomicU64,
    pub rd_operations: AtomicU64,
    pub wr_operations: AtomicU64,
    pub flush_operations: AtomicU64,
    pub rd_total_time_ns: AtomicU64,
    pub wr_total_time_ns: AtomicU64,
    pub flush_total_time_ns: AtomicU64,
    /// The offset after the greatest byte written (0 before any write).
    pub wr_highest_offset: AtomicU64,
}

/// A consistent-enough copy of [`Stats`] for one reply.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub wr_highest_offset: u64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Stats {
    pub fn read(&self, bytes: u64, took: Duration) {
        self.rd_operations.fetch_add(1, Ordering::Relaxed);
        self.rd_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.rd_total_time_ns.fetch_add(ns(took), Ordering::Relaxed);
    }

    pub fn write(&self, offset: u64, bytes: u64, took: Duration) {
        self.wr_operations.fetch_add(1, Ordering::Relaxed);
        self.wr_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.wr_total_time_ns.fetch_add(ns(took), Ordering::Relaxed);
        self.wr_highest_offset.fetch_max(offset.saturating_add(bytes), Ordering::Relaxed);
    }

    pub fn flush(&self, took: Duration) {
        self.flush_operations.fetch_add(1, Ordering::Relaxed);
        self.flush_total_time_ns.fetch_add(ns(took), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            rd_bytes: l(&self.rd_bytes),
            wr_bytes: l(&self.wr_bytes),
            rd_operations: l(&self.rd_operations),
            wr_operations: l(&self.wr_operations),
            flush_operations: l(&self.flush_operations),
            rd_total_time_ns: l(&self.rd_total_time_ns),
            wr_total_time_ns: l(&self.wr_total_time_ns),
            flush_total_time_ns: l(&self.flush_total_time_ns),
            wr_highest_offset: l(&self.wr_highest_offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up() {
        let s = Stats::default();
        s.read(4096, Duration::from_nanos(10));
        s.write(8192, 512, Duration::from_nanos(5));
        s.write(0, 512, Duration::from_nanos(5));
        s.flush(Duration::from_nanos(7));
        let v = s.snapshot();
        assert_eq!((v.rd_operations, v.rd_bytes, v.rd_total_time_ns), (1, 4096, 10));
        assert_eq!((v.wr_operations, v.wr_bytes, v.wr_total_time_ns), (2, 1024, 10));
        assert_eq!((v.flush_operations, v.flush_total_time_ns), (1, 7));
        assert_eq!(v.wr_highest_offset, 8192 + 512);
    }
}
