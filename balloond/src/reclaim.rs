//! Giving inflated pages back to the host.
//!
//! Each PFN (4 KiB units) is translated through the memory table the frontend sent with
//! SET_MEM_TABLE — every region is a mapping of a file (the guest-RAM memfd) at an offset —
//! and the page is hole-punched in that file: `fallocate(PUNCH_HOLE | KEEP_SIZE)` at the
//! region's file offset plus the page's offset in the region. The PFNs of a buffer are sorted
//! and contiguous runs within one region go out as one call.
//!
//! Why `fallocate` on the file rather than `madvise(MADV_REMOVE)` on our mapping: it acts on
//! the shared memory object itself, so the pages leave every mapping at once (vmm-core's, ours
//! and KVM's, through the kernel's MMU notifiers) whatever we mapped; it needs no address in
//! our process; and it reports an unsupported file (EOPNOTSUPP) as a plain error. For a shared
//! file mapping MADV_REMOVE ends in the same `vfs_fallocate` call. The file keeps its size, so
//! a page the guest touches again faults in as a fresh zero page: deflate needs no work here.
//!
//! Refused, with nothing freed: a PFN hitting no region (outside guest RAM, in a hole between
//! regions), a page that does not lie whole in its region, a region with no file.

use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{PAGE_SHIFT, PAGE_SIZE};

/// What one batch of PFNs came to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Pages hole-punched.
    pub freed: u64,
    /// Pages refused (no region, not whole in a region, no file behind the region).
    pub refused: u64,
    /// The first refused PFN, for the log.
    pub first_refused: Option<u64>,
    /// Pages whose punch failed.
    pub failed: u64,
    /// The first failure: guest address and error.
    pub first_error: Option<(u64, io::Error)>,
    /// fallocate calls made.
    pub punches: u64,
}

impl Outcome {
    fn refuse(&mut self, gpa: u64) {
        self.refused += 1;
        self.first_refused.get_or_insert(gpa >> PAGE_SHIFT);
    }
}

/// Hole-punches the pages `pfns` name. Duplicates count once.
pub fn discard_pfns<M: GuestMemoryBackend + ?Sized>(mem: &M, pfns: &[u32]) -> Outcome {
    let mut sorted = pfns.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Outcome::default();
    let mut rest = sorted.as_slice();
    while let Some(&first) = rest.first() {
        // The run of consecutive PFNs starting at `first`.
        let run = rest.iter().enumerate().take_while(|&(i, &p)| u64::from(p) == u64::from(first) + i as u64).count();
        discard_run(mem, u64::from(first) << PAGE_SHIFT, run as u64, &mut out);
        rest = rest.get(run..).unwrap_or_default();
    }
    out
}

/// Punches `pages` pages from `gpa`, split at region boundaries.
fn discard_run<M: GuestMemoryBackend + ?Sized>(mem: &M, mut gpa: u64, mut pages: u64, out: &mut Outcome) {
    while pages > 0 {
        let whole_pages = mem.find_region(GuestAddress(gpa)).map(|r| {
            let in_region = gpa - r.start_addr().0;
            (r, in_region, (r.len() - in_region) / PAGE_SIZE)
        });
        let Some((region, in_region, room)) = whole_pages.filter(|&(_, _, room)| room > 0) else {
            out.refuse(gpa);
            gpa += PAGE_SIZE;
            pages -= 1;
            continue;
        };
        let n = pages.min(room);
        match region.file_offset() {
            None => {
                out.refused += n;
                out.first_refused.get_or_insert(gpa >> PAGE_SHIFT);
            }
            Some(fo) => {
                out.punches += 1;
                match punch_hole(fo, in_region, n * PAGE_SIZE) {
                    Ok(()) => out.freed += n,
                    Err(e) => {
                        out.failed += n;
                        out.first_error.get_or_insert((gpa, e));
                    }
                }
            }
        }
        gpa += n * PAGE_SIZE;
        pages -= n;
    }
}

/// Deallocates `len` bytes at `offset` into the region mapped from `fo`.
fn punch_hole(fo: &FileOffset, offset: u64, len: u64) -> io::Result<()> {
    let too_far = || io::Error::new(io::ErrorKind::InvalidInput, "file offset out of range");
    let at = fo.start().checked_add(offset).and_then(|o| libc::off_t::try_from(o).ok()).ok_or_else(too_far)?;
    let len = libc::off_t::try_from(len).map_err(|_| too_far())?;
    // SAFETY: fallocate on a descriptor we own (the region keeps the file open); it touches no
    // memory of ours.
    let r = unsafe {
        libc::fallocate(fo.file().as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, at, len)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes the file really has allocated (`st_blocks * 512`): what hole punching lowers.
pub fn allocated_bytes(file: &std::fs::File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}
