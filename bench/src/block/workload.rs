//! The workloads, named as fio names them, and the offsets they visit. Every side (the bench
//! frontend against blockd and qemu-storage-daemon, fio on the host) runs the same block size,
//! pattern and queue depth.

use super::request::Op;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Random,
    Sequential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub key: &'static str,
    pub op: Op,
    pub pattern: Pattern,
    pub bs: u32,
    pub qd: u16,
}

impl Workload {
    /// fio's `--rw=` for this workload.
    pub fn fio_rw(&self) -> &'static str {
        match (self.pattern, self.op) {
            (Pattern::Random, Op::Read) => "randread",
            (Pattern::Random, Op::Write) => "randwrite",
            (Pattern::Sequential, Op::Read) => "read",
            (Pattern::Sequential, Op::Write) => "write",
        }
    }
}

/// Queue depth of the 1 MiB sequential workloads: 8 requests of 1 MiB keep 8 MiB in flight,
/// enough to reach the disk's sequential rate (fio on the host: 3.6 GB/s).
pub const SEQ_QD: u16 = 8;

pub const WORKLOADS: [Workload; 6] = [
    Workload { key: "randread-4k-qd1", op: Op::Read, pattern: Pattern::Random, bs: 4096, qd: 1 },
    Workload { key: "randread-4k-qd32", op: Op::Read, pattern: Pattern::Random, bs: 4096, qd: 32 },
    Workload { key: "randwrite-4k-qd1", op: Op::Write, pattern: Pattern::Random, bs: 4096, qd: 1 },
    Workload { key: "randwrite-4k-qd32", op: Op::Write, pattern: Pattern::Random, bs: 4096, qd: 32 },
    Workload { key: "seqread-1m-qd8", op: Op::Read, pattern: Pattern::Sequential, bs: 1 << 20, qd: SEQ_QD },
    Workload { key: "seqwrite-1m-qd8", op: Op::Write, pattern: Pattern::Sequential, bs: 1 << 20, qd: SEQ_QD },
];

pub fn by_key(key: &str) -> Option<Workload> {
    WORKLOADS.iter().copied().find(|w| w.key == key)
}

/// xorshift64*: fast, no dependency, and good enough to spread offsets uniformly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The byte offsets a workload visits in an image of `size` bytes: random block-aligned
/// offsets, or consecutive blocks wrapping at the end (as fio's `read`/`write` do).
#[derive(Debug, Clone)]
pub struct Offsets {
    pattern: Pattern,
    bs: u64,
    blocks: u64,
    next_block: u64,
    rng: Rng,
}

impl Offsets {
    /// `None` when not even one block fits.
    pub fn new(w: &Workload, size: u64, seed: u64) -> Option<Offsets> {
        let bs = u64::from(w.bs);
        let blocks = size / bs;
        (blocks > 0).then(|| Offsets { pattern: w.pattern, bs, blocks, next_block: 0, rng: Rng::new(seed) })
    }

    pub fn next_offset(&mut self) -> u64 {
        let block = match self.pattern {
            // The modulo bias is below 2^-40 for any image this bench uses.
            Pattern::Random => self.rng.next_u64() % self.blocks,
            Pattern::Sequential => {
                let b = self.next_block;
                self.next_block = (b + 1) % self.blocks;
                b
            }
        };
        block * self.bs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_have_unique_keys_and_fio_names() {
        for w in WORKLOADS {
            assert_eq!(by_key(w.key), Some(w));
        }
        assert_eq!(by_key("nope"), None);
        assert_eq!(WORKLOADS[1].fio_rw(), "randread");
        assert_eq!(WORKLOADS[3].fio_rw(), "randwrite");
        assert_eq!(WORKLOADS[4].fio_rw(), "read");
        assert_eq!(WORKLOADS[5].fio_rw(), "write");
    }

    #[test]
    fn random_offsets_are_aligned_in_range_and_spread() {
        let w = WORKLOADS[0];
        let size = 64 << 20;
        let mut o = Offsets::new(&w, size, 42).unwrap();
        let mut seen = std::collections::HashSet::new();
        let mut buckets = [0u32; 8];
        for _ in 0..16384 {
            let off = o.next_offset();
            assert_eq!(off % 4096, 0);
            assert!(off + 4096 <= size);
            seen.insert(off);
            buckets[(off * 8 / size) as usize] += 1;
        }
        // 16384 draws from 16384 blocks: about 63 % distinct; each eighth gets about 2048.
        assert!(seen.len() > 9000, "{}", seen.len());
        assert!(buckets.iter().all(|&b| (1700..2400).contains(&b)), "{buckets:?}");
    }

    #[test]
    fn sequential_offsets_wrap_at_the_end() {
        let w = WORKLOADS[4];
        let mut o = Offsets::new(&w, (3 << 20) + 5, 1).unwrap();
        let v: Vec<u64> = (0..5).map(|_| o.next_offset()).collect();
        assert_eq!(v, [0, 1 << 20, 2 << 20, 0, 1 << 20]);
        assert!(Offsets::new(&w, 4096, 1).is_none());
    }

    #[test]
    fn rng_fill_covers_odd_lengths() {
        let mut a = [0u8; 13];
        Rng::new(7).fill(&mut a);
        assert!(a.iter().filter(|&&b| b != 0).count() > 8);
        let mut b = [0u8; 13];
        Rng::new(7).fill(&mut b);
        assert_eq!(a, b);
    }
}
