//! The driver's side of one split virtqueue (virtio 1.x, 2.7), laid out by the bench in its own
//! "guest" memory: the descriptor table, the available ring the bench fills, and the used ring
//! the backend fills. No EVENT_IDX (so no `used_event`/`avail_event` words are read or written)
//! and no indirect descriptors: the bench negotiates neither, for every backend alike.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Descriptor flags (virtio 1.x, 2.7.5).
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Used-ring flag: the device asks not to be kicked (2.7.10; without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Where the three parts of a queue of `size` entries lie, from `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// First byte after the used ring.
    pub end: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    /// The descriptor table at `base` (16-byte aligned), the available ring right after it
    /// (2-byte alignment), the used ring after that at a 4-byte boundary: the alignments
    /// of virtio 1.x 2.7 (legacy's page alignment is not needed with VERSION_1).
    /// `size` must be a power of two up to 32768.
    pub fn new(base: u64, size: u16) -> Option<Layout> {
        if size == 0 || !size.is_power_of_two() || size > 32768 || !base.is_multiple_of(16) {
            return None;
        }
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        // flags, idx, ring[n], used_event
        let used = align_up(avail + 4 + 2 * n + 2, 4);
        // flags, idx, ring[n] of {id: u32, len: u32}, avail_event
        let end = used + 4 + 8 * n + 2;
        Some(Layout { size, desc, avail, used, end })
    }
}

/// One descriptor as it lies in memory (little endian, 16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A used element as the backend wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// The driver's state of a queue: its next available index (published with
/// [`DriverRing::publish`]) and the next used index it has not consumed.
pub struct DriverRing {
    layout: Layout,
    next_avail: u16,
    last_used: u16,
}

impl DriverRing {
    /// Zeroes the queue's memory (flags 0: the bench wants a call for every used buffer).
    pub fn new(mem: &GuestMemoryMmap, layout: Layout) -> Result<DriverRing, GuestMemoryError> {
        let len = (layout.end - layout.desc) as usize;
        mem.write_slice(&vec![0u8; len], GuestAddress(layout.desc))?;
        Ok(DriverRing { layout, next_avail: 0, last_used: 0 })
    }

    pub fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, d: Descriptor) -> Result<(), GuestMemoryError> {
        let at = self.layout.desc + 16 * u64::from(index % self.layout.size);
        mem.write_slice(&d.to_bytes(), GuestAddress(at))
    }

    /// Puts a chain's head in the next available slot; the backend sees it after
    /// [`DriverRing::publish`].
    pub fn push(&mut self, mem: &GuestMemoryMmap, head: u16) -> Result<(), GuestMemoryError> {
        let slot = u64::from(self.next_avail % self.layout.size);
        mem.write_obj(head.to_le(), GuestAddress(self.layout.avail + 4 + 2 * slot))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Makes every pushed head visible: the ring entries before the index (release).
    pub fn publish(&self, mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
        fence(Ordering::Release);
        mem.store(self.next_avail.to_le(), GuestAddress(self.layout.avail + 2), Ordering::Release)
    }

    /// Whether the backend wants a kick now. The full fence orders our index store before the
    /// flag load, as the spec requires, or a backend that re-enables notifications could miss
    /// both the index and the kick.
    pub fn needs_kick(&self, mem: &GuestMemoryMmap) -> Result<bool, GuestMemoryError> {
        fence(Ordering::SeqCst);
        let flags: u16 = mem.load(GuestAddress(self.layout.used), Ordering::Acquire)?;
        Ok(u16::from_le(flags) & VRING_USED_F_NO_NOTIFY == 0)
    }

    /// The next used element, if the backend has returned one we have not consumed.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<Used>, GuestMemoryError> {
        let idx: u16 = mem.load(GuestAddress(self.layout.used + 2), Ordering::Acquire)?;
        if u16::from_le(idx) == self.last_used {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % self.layout.size);
        let at = self.layout.used + 4 + 8 * slot;
        let id: u32 = mem.read_obj(GuestAddress(at))?;
        let len: u32 = mem.read_obj(GuestAddress(at + 4))?;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(Used { id: u32::from_le(id), len: u32::from_le(len) }))
    }

    /// Heads published but not yet used (the queue depth the backend sees).
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap()
    }

    #[test]
    fn layout_follows_the_spec_alignment() {
        let l = Layout::new(0, 256).unwrap();
        assert_eq!((l.desc, l.avail), (0, 4096));
        // avail: 4 + 512 + 2 = 518 bytes -> 4614, rounded up to 4616.
        assert_eq!(l.used, 4616);
        assert_eq!(l.end, 4616 + 4 + 2048 + 2);
        let l = Layout::new(0x1000, 4).unwrap();
        assert_eq!((l.desc, l.avail, l.used), (0x1000, 0x1040, 0x1040 + 16));
        assert_eq!(l.used % 4, 0);
        for bad in [(0, 0), (0, 3), (0, 100), (8, 16)] {
            assert_eq!(Layout::new(bad.0, bad.1), None, "{bad:?}");
        }
    }

    #[test]
    fn descriptor_bytes_are_little_endian() {
        let d = Descriptor { addr: 0x1122_3344_5566_7788, len: 0x0400, flags: VRING_DESC_F_NEXT, next: 7 };
        let b = d.to_bytes();
        assert_eq!(&b[0..8], &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[8..12], &[0x00, 0x04, 0, 0]);
        assert_eq!(&b[12..16], &[1, 0, 7, 0]);
    }

    /// The device's side, written by hand as a backend would, to check the driver reads what
    /// the spec says it should.
    fn device_use(mem: &GuestMemoryMmap, l: Layout, used_idx: u16, id: u32, len: u32) {
        let slot = u64::from(used_idx % l.size);
        mem.write_obj(id, GuestAddress(l.used + 4 + 8 * slot)).unwrap();
        mem.write_obj(len, GuestAddress(l.used + 8 + 8 * slot)).unwrap();
        mem.write_obj(used_idx.wrapping_add(1), GuestAddress(l.used + 2)).unwrap();
    }

    #[test]
    fn push_publish_and_pop_round_trip_with_wrapping_indices() {
        let m = mem();
        let l = Layout::new(0, 4).unwrap();
        let mut r = DriverRing::new(&m, l).unwrap();
        r.write_desc(&m, 5, Descriptor { addr: 1, len: 2, flags: 0, next: 0 }).unwrap();
        // index 5 wraps to entry 1 of a 4-entry table
        let raw: [u8; 16] = m.read_obj(GuestAddress(l.desc + 16)).unwrap();
        assert_eq!(raw, Descriptor { addr: 1, len: 2, flags: 0, next: 0 }.to_bytes());

        let mut used_idx = 0u16;
        for round in 0..10u16 {
            r.push(&m, round % 4).unwrap();
            r.push(&m, (round + 1) % 4).unwrap();
            // not visible before publish
            let idx: u16 = m.read_obj(GuestAddress(l.avail + 2)).unwrap();
            assert_eq!(idx, round.wrapping_mul(2));
            r.publish(&m).unwrap();
            let idx: u16 = m.read_obj(GuestAddress(l.avail + 2)).unwrap();
            assert_eq!(idx, round * 2 + 2);
            let e: u16 = m.read_obj(GuestAddress(l.avail + 4 + 2 * u64::from((round * 2) % 4))).unwrap();
            assert_eq!(e, round % 4);
            assert_eq!(r.in_flight(), 2);
            assert_eq!(r.pop_used(&m).unwrap(), None);
            device_use(&m, l, used_idx, u32::from(round), 17);
            used_idx += 1;
            device_use(&m, l, used_idx, 99, 1);
            used_idx += 1;
            assert_eq!(r.pop_used(&m).unwrap(), Some(Used { id: u32::from(round), len: 17 }));
            assert_eq!(r.pop_used(&m).unwrap(), Some(Used { id: 99, len: 1 }));
            assert_eq!(r.pop_used(&m).unwrap(), None);
            assert_eq!(r.in_flight(), 0);
        }
    }

    #[test]
    fn kick_follows_the_no_notify_flag() {
        let m = mem();
        let l = Layout::new(0, 8).unwrap();
        let r = DriverRing::new(&m, l).unwrap();
        assert!(r.needs_kick(&m).unwrap());
        m.write_obj(VRING_USED_F_NO_NOTIFY, GuestAddress(l.used)).unwrap();
        assert!(!r.needs_kick(&m).unwrap());
    }
}
