//! virtio-blk requests (virtio 1.x, 5.2.6) as the bench lays them out in its memory: each of
//! the `qd` request slots owns a fixed run of descriptors, a 16-byte header, a status byte
//! and a data buffer. A chain is header (device-readable), the data in segments of at most
//! `seg` bytes (device-writable for a read), status (device-writable).

use super::ring::{Descriptor, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// What the bench writes into a status byte before submitting: no device writes it.
pub const STATUS_UNSET: u8 = 0xa5;
pub const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// The 16-byte request header: type, reserved, sector.
pub fn header(op: Op, sector: u64) -> [u8; 16] {
    let t = match op {
        Op::Read => VIRTIO_BLK_T_IN,
        Op::Write => VIRTIO_BLK_T_OUT,
    };
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&t.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    b
}

/// Where each slot's pieces lie. Headers (16 bytes) and status bytes share one 32-byte cell
/// per slot in the metadata area; data buffers are `data_stride` apart, page aligned, so an
/// O_DIRECT backend can use them without a bounce buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPlan {
    pub qd: u16,
    pub descs_per_slot: u16,
    pub hdr_base: u64,
    pub data_base: u64,
    pub data_stride: u64,
    pub seg: u32,
}

impl SlotPlan {
    /// A plan for `qd` requests of up to `max_len` bytes in segments of `seg`; `None` when the
    /// descriptors would not fit a queue of `queue_size` or the numbers make no sense.
    pub fn new(qd: u16, max_len: u64, seg: u32, queue_size: u16, hdr_base: u64, data_base: u64) -> Option<SlotPlan> {
        if qd == 0 || seg == 0 || max_len == 0 || !data_base.is_multiple_of(4096) {
            return None;
        }
        let segs = max_len.div_ceil(u64::from(seg));
        let descs = u16::try_from(2 + segs).ok()?;
        if u32::from(qd) * u32::from(descs) > u32::from(queue_size) {
            return None;
        }
        let data_stride = max_len.div_ceil(4096) * 4096;
        Some(SlotPlan { qd, descs_per_slot: descs, hdr_base, data_base, data_stride, seg })
    }

    pub fn head(&self, slot: u16) -> u16 {
        slot * self.descs_per_slot
    }

    /// The slot whose chain starts at descriptor `head` (what a used element names).
    pub fn slot_of(&self, head: u32) -> Option<u16> {
        let d = u32::from(self.descs_per_slot);
        (head.is_multiple_of(d) && head / d < u32::from(self.qd)).then(|| (head / d) as u16)
    }

    pub fn header_addr(&self, slot: u16) -> u64 {
        self.hdr_base + 32 * u64::from(slot)
    }

    pub fn status_addr(&self, slot: u16) -> u64 {
        self.header_addr(slot) + 16
    }

    pub fn data_addr(&self, slot: u16) -> u64 {
        self.data_base + self.data_stride * u64::from(slot)
    }

    /// The end of the last data buffer: how much memory the plan needs.
    pub fn end(&self) -> u64 {
        self.data_addr(self.qd)
    }

    /// The chain of `slot` for an `op` of `len` bytes, with its descriptor indices.
    pub fn chain(&self, slot: u16, op: Op, len: u32) -> Vec<(u16, Descriptor)> {
        let first = self.head(slot);
        let mut out = Vec::with_capacity(usize::from(self.descs_per_slot));
        let mut idx = first;
        let mut push = |addr: u64, len: u32, flags: u16, last: bool| {
            let flags = if last { flags } else { flags | VRING_DESC_F_NEXT };
            let next = if last { 0 } else { idx + 1 };
            out.push((idx, Descriptor { addr, len, flags, next }));
            idx += 1;
        };
        push(self.header_addr(slot), 16, 0, false);
        let data_flags = match op {
            Op::Read => VRING_DESC_F_WRITE,
            Op::Write => 0,
        };
        let mut off = 0u32;
        while off < len {
            let n = self.seg.min(len - off);
            push(self.data_addr(slot) + u64::from(off), n, data_flags, false);
            off += n;
        }
        push(self.status_addr(slot), 1, VRING_DESC_F_WRITE, true);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_type_reserved_sector_le() {
        let h = header(Op::Write, 0x0102_0304_0506_0708);
        assert_eq!(&h[0..4], &[1, 0, 0, 0]);
        assert_eq!(&h[4..8], &[0, 0, 0, 0]);
        assert_eq!(&h[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&header(Op::Read, 0)[0..4], &[0, 0, 0, 0]);
    }

    #[test]
    fn a_4k_read_is_three_descriptors() {
        let p = SlotPlan::new(32, 4096, 256 << 10, 256, 0x4000, 1 << 20).unwrap();
        assert_eq!(p.descs_per_slot, 3);
        let c = p.chain(2, Op::Read, 4096);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0], (6, Descriptor { addr: 0x4000 + 64, len: 16, flags: VRING_DESC_F_NEXT, next: 7 }));
        assert_eq!(
            c[1],
            (
                7,
                Descriptor {
                    addr: (1 << 20) + 2 * 4096,
                    len: 4096,
                    flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                    next: 8
                }
            )
        );
        assert_eq!(c[2], (8, Descriptor { addr: 0x4000 + 64 + 16, len: 1, flags: VRING_DESC_F_WRITE, next: 0 }));
        assert_eq!(p.slot_of(6), Some(2));
        assert_eq!(p.slot_of(7), None);
        assert_eq!(p.slot_of(96), None);
        assert_eq!(p.end(), (1 << 20) + 32 * 4096);
    }

    #[test]
    fn a_1m_write_is_split_in_segments() {
        let p = SlotPlan::new(8, 1 << 20, 256 << 10, 256, 0x4000, 1 << 20).unwrap();
        assert_eq!(p.descs_per_slot, 6);
        let c = p.chain(1, Op::Write, 1 << 20);
        assert_eq!(c.len(), 6);
        assert_eq!(c[0].0, 6);
        for (k, (i, d)) in c[1..5].iter().enumerate() {
            assert_eq!(*i, 7 + k as u16);
            assert_eq!(d.addr, (1 << 20) + (1 << 20) + (k as u64) * (256 << 10));
            assert_eq!((d.len, d.flags, d.next), (256 << 10, VRING_DESC_F_NEXT, i + 1));
        }
        assert_eq!(c[5].1.flags, VRING_DESC_F_WRITE);
        // a shorter request in the same plan uses fewer descriptors
        assert_eq!(p.chain(0, Op::Write, 300 << 10).len(), 4);
    }

    #[test]
    fn plans_that_do_not_fit_are_refused() {
        assert!(SlotPlan::new(32, 1 << 20, 256 << 10, 128, 0, 4096).is_none()); // 192 descriptors
        assert!(SlotPlan::new(0, 4096, 4096, 256, 0, 4096).is_none());
        assert!(SlotPlan::new(1, 4096, 0, 256, 0, 4096).is_none());
        assert!(SlotPlan::new(1, 4096, 4096, 256, 0, 100).is_none());
    }
}
