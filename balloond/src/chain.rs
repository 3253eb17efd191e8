//! Reading what a driver put in a descriptor chain: the device-readable bytes, concatenated
//! in chain order (a PFN or a stat may straddle two descriptors, as QEMU's `iov_to_buf`
//! allows), bounded, with what did not fit or did not belong counted for the caller to judge.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory, Permissions};

/// The device-readable contents of one chain.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChainBytes {
    /// The readable bytes, at most the `max` given to [`read_readable`].
    pub bytes: Vec<u8>,
    /// Device-writable descriptors found (a balloon driver never sends one).
    pub writable: usize,
    /// Readable bytes the chain holds in all, read or not (saturating).
    pub readable_len: u64,
}

impl ChainBytes {
    /// Whether readable data was left unread for want of room.
    pub fn truncated(&self) -> bool {
        self.readable_len > self.bytes.len() as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor {index} ({len} bytes at {addr:#x}) is outside guest memory")]
    Memory {
        index: usize,
        addr: u64,
        len: u32,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Reads up to `max` readable bytes of `chain`. Writable descriptors are skipped and counted;
/// readable data past `max` is counted, not read. A readable descriptor pointing outside guest
/// memory fails the whole chain.
pub fn read_readable<M>(chain: &DescriptorChain<M>, max: usize) -> Result<ChainBytes, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let mut out = ChainBytes::default();
    for (index, desc) in chain.clone().enumerate() {
        if desc.is_write_only() {
            out.writable += 1;
            continue;
        }
        out.readable_len = out.readable_len.saturating_add(u64::from(desc.len()));
        let room = max.saturating_sub(out.bytes.len());
        let take = room.min(desc.len() as usize);
        let start = out.bytes.len();
        out.bytes.resize(start + take, 0);
        let memory_error = |source| ChainError::Memory { index, addr: desc.addr().0, len: desc.len(), source };
        if let Some(dst) = out.bytes.get_mut(start..) {
            mem.read_slice(dst, desc.addr()).map_err(memory_error)?;
        }
        // A descriptor past `max` still has to lie in guest memory: a chain is refused whole
        // or taken whole.
        if take < desc.len() as usize && !mem.check_range(desc.addr(), desc.len() as usize, Permissions::Read) {
            return Err(memory_error(vm_memory::GuestMemoryError::InvalidGuestAddress(desc.addr())));
        }
    }
    Ok(out)
}
