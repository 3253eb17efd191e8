//! What each virtqueue's buffers mean and what the device does with them:
//! inflate (0) — PFNs the guest gives up: hole-punched ([`crate::reclaim`]);
//! deflate (1) — PFNs it takes back: nothing to do, they fault back in (with MUST_TELL_HOST
//! the guest waits for this buffer's completion before reusing them);
//! stats (2) — the guest's memory statistics ([`crate::stats`]).
//!
//! Everything here comes from the guest: every refusal is logged at a bounded rate and
//! counted, nothing is freed that was not asked for properly, and the queue goes on.

use std::ops::Deref;
use std::time::Duration;

use vhost_backend_kit::ratelimit::RateLimit;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

use crate::chain::{self, ChainError};
use crate::device::{add, Device};
use crate::reclaim;
use crate::stats::{self, MAX_STATS_BYTES};

pub const INFLATE: u16 = 0;
pub const DEFLATE: u16 = 1;
pub const STATS: u16 = 2;
pub const NUM_QUEUES: usize = 3;

/// The most PFN data one chain may carry: 1 MiB, 256 Ki PFNs, 1 GiB of guest RAM (Linux sends
/// at most 256 PFNs a buffer). A longer chain is refused whole.
pub const MAX_PFN_BYTES: usize = 1 << 20;

/// Log lines about guest mistakes: 10 per 10 s.
static GUEST_ERRORS: RateLimit = RateLimit::new(10, Duration::from_secs(10));

#[derive(Debug, thiserror::Error)]
pub enum PfnChainError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("{0} device-writable descriptor(s) in a PFN list")]
    Writable(usize),
    #[error("{0} bytes of PFNs, more than the {MAX_PFN_BYTES} accepted")]
    TooLong(u64),
}

/// A chain's PFN list.
#[derive(Debug, PartialEq, Eq)]
pub struct Pfns {
    pub pfns: Vec<u32>,
    /// Bytes after the last whole le32 (skipped).
    pub trailing: usize,
}

/// Reads the le32 PFNs of an inflate or deflate chain. Device-writable descriptors, data
/// outside guest memory or more than [`MAX_PFN_BYTES`] refuse the whole chain.
pub fn read_pfns<M>(chain: &DescriptorChain<M>) -> Result<Pfns, PfnChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    let data = chain::read_readable(chain, MAX_PFN_BYTES)?;
    if data.writable > 0 {
        return Err(PfnChainError::Writable(data.writable));
    }
    if data.truncated() {
        return Err(PfnChainError::TooLong(data.readable_len));
    }
    let pfns = data.bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(Pfns { pfns, trailing: data.bytes.len() % 4 })
}

/// Logs a guest error if the rate limit allows.
macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if let Some(held_back) = GUEST_ERRORS.check() {
            tracing::warn!(held_back, $($arg)*);
        }
    };
}

fn trailing_note(queue: &str, trailing: usize) {
    if trailing > 0 {
        guest_warn!(queue, trailing, "PFN list length not a multiple of 4: trailing bytes ignored");
    }
}

/// An inflate buffer: hole-punch the pages it names, within the memory of its chain.
pub fn inflate<M>(dev: &Device, chain: &DescriptorChain<M>)
where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    let pfns = match read_pfns(chain) {
        Ok(p) => p,
        Err(e) => {
            add(&dev.counters.chains_refused, 1);
            guest_warn!(error = %e, "inflate buffer refused, nothing freed");
            return;
        }
    };
    trailing_note("inflate", pfns.trailing);
    let out = reclaim::discard_pfns(chain.memory(), &pfns.pfns);
    add(&dev.counters.freed, out.freed);
    add(&dev.counters.refused, out.refused);
    add(&dev.counters.punch_failed, out.failed);
    if out.refused > 0 {
        guest_warn!(
            refused = out.refused,
            first_pfn = format_args!("{:#x}", out.first_refused.unwrap_or_default()),
            "inflate: PFNs outside guest RAM refused, not freed"
        );
    }
    if let Some((gpa, e)) = &out.first_error {
        // Not the guest's doing, but per buffer: rate-limited too.
        guest_warn!(pages = out.failed, gpa = format_args!("{gpa:#x}"), error = %e, "inflate: hole punch failed");
    }
    tracing::debug!(pfns = pfns.pfns.len(), freed = out.freed, punches = out.punches, "inflate buffer");
}

/// A deflate buffer: the pages come back by themselves when touched; count them.
pub fn deflate<M>(dev: &Device, chain: &DescriptorChain<M>)
where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    match read_pfns(chain) {
        Ok(p) => {
            trailing_note("deflate", p.trailing);
            add(&dev.counters.deflated, p.pfns.len() as u64);
            tracing::debug!(pfns = p.pfns.len(), "deflate buffer");
        }
        Err(e) => {
            add(&dev.counters.chains_refused, 1);
            guest_warn!(error = %e, "deflate buffer refused");
        }
    }
}

/// A stats buffer: parse and keep what it says. Writable descriptors are ignored (QEMU reads
/// only the readable part); data past [`MAX_STATS_BYTES`] is not read; a buffer outside guest
/// memory is dropped. The caller keeps the buffer either way, to return it when it wants
/// fresh numbers.
pub fn stats<M>(dev: &Device, chain: &DescriptorChain<M>)
where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    add(&dev.counters.stats_buffers, 1);
    match chain::read_readable(chain, MAX_STATS_BYTES) {
        Ok(data) => {
            if data.writable > 0 || data.truncated() {
                guest_warn!(writable = data.writable, len = data.readable_len, "stats buffer: extra parts ignored");
            }
            let s = stats::parse(&data.bytes);
            if s.trailing > 0 || s.unknown > 0 {
                tracing::debug!(trailing = s.trailing, unknown = s.unknown, "stats buffer: parts skipped");
            }
            dev.store_stats(s);
        }
        Err(e) => guest_warn!(error = %e, "stats buffer unreadable"),
    }
}
