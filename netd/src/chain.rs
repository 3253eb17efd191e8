//! Reading and writing what a driver put in a descriptor chain, bounded and checked: every
//! descriptor must lie in guest RAM and point the right way, and a chain longer than the
//! caller accepts is refused before anything is copied (a driver can claim 4 GiB a descriptor).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {index} ({len} bytes at {addr:#x}) is outside guest memory")]
    Memory { index: usize, addr: u64, len: u32 },
    #[error("descriptor {index} is device-{found} where a device-{wanted} one belongs")]
    Direction { index: usize, found: &'static str, wanted: &'static str },
    #[error("more than {max} bytes")]
    TooLong { max: usize },
}

fn dir(write: bool) -> &'static str {
    if write {
        "writable"
    } else {
        "readable"
    }
}

/// Copies the chain's bytes (all device-readable) into `out`, replacing what it held; more
/// than `max` bytes, a writable descriptor or one outside guest memory refuse the chain.
pub fn read_all<M>(chain: &DescriptorChain<M>, out: &mut Vec<u8>, max: usize) -> Result<(), ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    out.clear();
    let mem = chain.memory();
    for (index, desc) in chain.clone().enumerate() {
        if desc.is_write_only() {
            return Err(ChainError::Direction { index, found: dir(true), wanted: dir(false) });
        }
        let len = desc.len() as usize;
        let start = out.len();
        if start.saturating_add(len) > max {
            return Err(ChainError::TooLong { max });
        }
        out.resize(start + len, 0);
        if mem.read_slice(&mut out[start..], desc.addr()).is_err() {
            return Err(ChainError::Memory { index, addr: desc.addr().0, len: desc.len() });
        }
    }
    Ok(())
}

/// The readable part (first) and the writable part (after) of a request chain such as the
/// control queue's: the readable bytes, at most `max`, and the writable segments.
pub fn split_request<M>(
    chain: &DescriptorChain<M>,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<Vec<(GuestAddress, usize)>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    out.clear();
    let mem = chain.memory();
    let mut segs = Vec::new();
    for (index, desc) in chain.clone().enumerate() {
        let len = desc.len() as usize;
        if desc.is_write_only() {
            if !mem.check_range(desc.addr(), len, Permissions::Write) {
                return Err(ChainError::Memory { index, addr: desc.addr().0, len: desc.len() });
            }
            segs.push((desc.addr(), len));
            continue;
        }
        if !segs.is_empty() {
            return Err(ChainError::Direction { index, found: dir(false), wanted: dir(true) });
        }
        let start = out.len();
        if start.saturating_add(len) > max {
            return Err(ChainError::TooLong { max });
        }
        out.resize(start + len, 0);
        if mem.read_slice(&mut out[start..], desc.addr()).is_err() {
            return Err(ChainError::Memory { index, addr: desc.addr().0, len: desc.len() });
        }
    }
    Ok(segs)
}

/// The chain's device-writable segments (a receive buffer), each checked to lie in guest
/// memory; a readable descriptor refuses the chain. Segments past `max` bytes in all are cut
/// there (nothing beyond is ever written).
pub fn writable_segments<M>(chain: &DescriptorChain<M>, max: usize) -> Result<Vec<(GuestAddress, usize)>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let mut segs = Vec::new();
    let mut total = 0usize;
    for (index, desc) in chain.clone().enumerate() {
        if !desc.is_write_only() {
            return Err(ChainError::Direction { index, found: dir(false), wanted: dir(true) });
        }
        let len = (desc.len() as usize).min(max - total);
        if !mem.check_range(desc.addr(), desc.len() as usize, Permissions::Write) {
            return Err(ChainError::Memory { index, addr: desc.addr().0, len: desc.len() });
        }
        if len > 0 {
            segs.push((desc.addr(), len));
        }
        total += len;
        if total == max {
            break;
        }
    }
    Ok(segs)
}

/// Writes `data` into `segs` from byte `offset` of the concatenated segments; returns how many
/// bytes went in (less than `data` when the segments end).
pub fn write_at<M: GuestMemory>(mem: &M, segs: &[(GuestAddress, usize)], offset: usize, data: &[u8]) -> usize {
    let mut skip = offset;
    let mut done = 0;
    for &(addr, len) in segs {
        if skip >= len {
            skip -= len;
            continue;
        }
        let room = len - skip;
        let n = room.min(data.len() - done);
        if n == 0 {
            break;
        }
        if mem.write_slice(&data[done..done + n], GuestAddress(addr.0 + skip as u64)).is_err() {
            break;
        }
        done += n;
        skip = 0;
        if done == data.len() {
            break;
        }
    }
    done
}
