//! The stats queue's buffer (virtio 1.2 section 5.5.6.3): an array of packed
//! `struct virtio_balloon_stat { le16 tag; le64 val; }`. Parsed as QEMU does: whole entries
//! only, unknown tags ignored, a trailing partial entry ignored; a tag given twice keeps the
//! last value.

use std::collections::BTreeMap;

/// The tags of virtio 1.2 (and Linux's `VIRTIO_BALLOON_S_*`).
pub const S_SWAP_IN: u16 = 0;
pub const S_SWAP_OUT: u16 = 1;
pub const S_MAJFLT: u16 = 2;
pub const S_MINFLT: u16 = 3;
pub const S_MEMFREE: u16 = 4;
pub const S_MEMTOT: u16 = 5;
pub const S_AVAIL: u16 = 6;
pub const S_CACHES: u16 = 7;
pub const S_HTLB_PGALLOC: u16 = 8;
pub const S_HTLB_PGFAIL: u16 = 9;
/// Tags at or above this are not known (QEMU's VIRTIO_BALLOON_S_NR).
pub const S_NR: u16 = 10;

/// Bytes of one entry.
pub const STAT_LEN: usize = 10;
/// The most of a stats buffer we read: far more than the known tags fill.
pub const MAX_STATS_BYTES: usize = 64 * STAT_LEN;

/// What one stats buffer said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Known tags and their values.
    pub values: BTreeMap<u16, u64>,
    /// Entries with unknown tags, skipped.
    pub unknown: usize,
    /// Bytes after the last whole entry, skipped.
    pub trailing: usize,
}

impl GuestStats {
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(&tag).copied()
    }
}

pub fn parse(bytes: &[u8]) -> GuestStats {
    let mut stats = GuestStats { trailing: bytes.len() % STAT_LEN, ..Default::default() };
    for entry in bytes.chunks_exact(STAT_LEN) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut val = [0u8; 8];
        val.copy_from_slice(&entry[2..]);
        if tag < S_NR {
            stats.values.insert(tag, u64::from_le_bytes(val));
        } else {
            stats.unknown += 1;
        }
    }
    stats
}

/// Encodes entries as a driver does (for tests and tools).
pub fn encode(entries: &[(u16, u64)]) -> Vec<u8> {
    entries.iter().flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_entries() {
        let s = parse(&encode(&[(S_MEMFREE, 1 << 30), (S_MEMTOT, 2 << 30), (S_MAJFLT, 7)]));
        assert_eq!(s.get(S_MEMFREE), Some(1 << 30));
        assert_eq!(s.get(S_MEMTOT), Some(2 << 30));
        assert_eq!(s.get(S_MAJFLT), Some(7));
        assert_eq!(s.get(S_SWAP_IN), None);
        assert_eq!((s.unknown, s.trailing), (0, 0));
    }

    #[test]
    fn short_and_garbage_buffers() {
        // Empty, shorter than one entry.
        assert_eq!(parse(&[]), GuestStats::default());
        let s = parse(&[1, 2, 3]);
        assert!(s.values.is_empty());
        assert_eq!(s.trailing, 3);
        // A whole entry then half of one: the half is skipped.
        let mut b = encode(&[(S_SWAP_OUT, 5)]);
        b.extend_from_slice(&[4, 0, 9, 9]);
        let s = parse(&b);
        assert_eq!(s.values.len(), 1);
        assert_eq!((s.get(S_SWAP_OUT), s.trailing), (Some(5), 4));
        // Unknown tags (garbage) are skipped; a repeated tag keeps the last value.
        let s = parse(&encode(&[(0xffff, 1), (S_NR, 2), (S_MINFLT, 3), (S_MINFLT, 4)]));
        assert_eq!(s.values.len(), 1);
        assert_eq!((s.get(S_MINFLT), s.unknown), (Some(4), 2));
        // All-ones bytes: tag 0xffff, skipped.
        let s = parse(&[0xff; 40]);
        assert!(s.values.is_empty());
        assert_eq!(s.unknown, 4);
    }
}
