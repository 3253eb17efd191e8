//! Guest RAM: one shared memfd (so vhost-user backends can map it from SET_MEM_TABLE), split
//! around the PCI hole, and the e820 map that describes it to the guest.

use crate::layout;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

pub type GuestMemory = GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM size {0} bytes is too small (at least 16 MiB)")]
    TooSmall(u64),
    #[error("cannot set up {requested} MiB of guest RAM: the host has only {host} MiB of memory and swap")]
    HostTooSmall { requested: u64, host: u64 },
    #[error("creating the guest RAM memfd")]
    Memfd(#[source] nix::Error),
    #[error("sizing the guest RAM memfd to {1} bytes")]
    Truncate(#[source] std::io::Error, u64),
    #[error("sealing the guest RAM memfd against shrinking and growing")]
    Seal(#[source] nix::Error),
    #[error("mapping guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("preallocating {1} bytes of guest RAM (-mem-prealloc)")]
    Prealloc(#[source] std::io::Error, u64),
}

/// One e820 entry (type 1 = RAM, 2 = reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Guest RAM and the file behind it.
pub struct GuestRam {
    pub mem: GuestMemory,
    pub memfd: Arc<File>,
    pub size: u64,
}

/// Guest-physical ranges of RAM for `size` bytes: below the PCI hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= layout::PCI_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, layout::PCI_HOLE_START),
            (layout::RAM_ABOVE_4G_START, size - layout::PCI_HOLE_START),
        ]
    }
}

/// The e820 map the guest sees: low RAM, the reserved BIOS area (where the ACPI tables are),
/// RAM from 1 MiB, the ECAM window (reserved; the MCFG points at it), and RAM above 4 GiB. The
/// rest of the PCI hole is left out.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: layout::EBDA_START, kind: E820_RAM },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIGH_RAM_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(size) {
        let (start, len) = if start == 0 {
            (layout::HIGH_RAM_START, len - layout::HIGH_RAM_START)
        } else {
            (start, len)
        };
        map.push(E820Entry { addr: start, size: len, kind: E820_RAM });
    }
    // The ECAM window, reserved as QEMU q35 (and firmware on real boards) does: Linux checks the
    // MCFG's region against the e820 map early, and without this says "not using ECAM (... not
    // reserved)" until the ACPI motherboard resources are parsed.
    map.push(E820Entry { addr: layout::PCI_ECAM_START, size: layout::PCI_ECAM_SIZE, kind: E820_RESERVED });
    map.sort_by_key(|e| e.addr);
    map
}

/// What the host can back: physical memory plus swap. A memfd is allocated lazily, so without
/// this check an impossible `-m` would only fail when the guest touches the memory (SIGBUS).
fn host_capacity_bytes() -> Option<u64> {
    let info = nix::sys::sysinfo::sysinfo().ok()?;
    Some(info.ram_total() + info.swap_total())
}

impl GuestRam {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < (16 << 20) {
            return Err(MemoryError::TooSmall(size));
        }
        if let Some(host) = host_capacity_bytes() {
            if size > host {
                return Err(MemoryError::HostTooSmall { requested: size >> 20, host: host >> 20 });
            }
        }
        let fd = nix::sys::memfd::memfd_create(
            c"flotilla-guest-ram",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(MemoryError::Memfd)?;
        let file = Arc::new(File::from(fd));
        file.set_len(size).map_err(|e| MemoryError::Truncate(e, size))?;
        // Every backend maps this file: a size change by anyone holding it (a backend, or a
        // bug here) would SIGBUS the others. Hole punching (a balloon's freed pages) stays
        // allowed: only F_SEAL_WRITE would forbid it.
        let seals = nix::fcntl::SealFlag::F_SEAL_SHRINK | nix::fcntl::SealFlag::F_SEAL_GROW;
        nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_ADD_SEALS(seals)).map_err(MemoryError::Seal)?;
        let mut offset = 0u64;
        let regions: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(start, len)| {
                let r = (
                    GuestAddress(start),
                    len as usize,
                    Some(FileOffset::from_arc(file.clone(), offset)),
                );
                offset += len;
                r
            })
            .collect();
        let mem = GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
        Ok(GuestRam { mem, memfd: file, size })
    }

    /// Allocates every page of the memfd now (`-mem-prealloc`), as QEMU's preallocation does for
    /// its RAM backend: a host short of memory fails here with ENOSPC/ENOMEM instead of the VM
    /// dying of SIGBUS when the guest first touches a page. Pages a balloon later frees are
    /// punched out of the file and come back on demand, as without it.
    pub fn preallocate(&self) -> Result<(), MemoryError> {
        let len = i64::try_from(self.size).map_err(|_| {
            MemoryError::Prealloc(std::io::Error::from_raw_os_error(libc::EFBIG), self.size)
        })?;
        // Mode 0 inside the file's size: the size seals allow it (only growing is refused).
        // SAFETY: fallocate(2) on a live fd we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.memfd.as_raw_fd(), 0, 0, len) };
        if rc != 0 {
            return Err(MemoryError::Prealloc(std::io::Error::last_os_error(), self.size));
        }
        Ok(())
    }

    /// Bytes of the memfd backed by host memory now (st_blocks is in 512-byte units).
    pub fn allocated_bytes(&self) -> Result<u64, std::io::Error> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.memfd.metadata()?.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_ram_skips_the_pci_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, 0xc000_0000), (1 << 32, 1 << 30)]);
        let e = e820_map(4 << 30);
        let ram: u64 = e.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (4 << 30) - (layout::HIGH_RAM_START - layout::EBDA_START));
    }

    #[test]
    fn e820_reserves_the_ecam_window_in_order() {
        for size in [256 << 20, 4 << 30] {
            let e = e820_map(size);
            assert!(e.contains(&E820Entry {
                addr: layout::PCI_ECAM_START,
                size: layout::PCI_ECAM_SIZE,
                kind: E820_RESERVED
            }));
            for w in e.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{e:?}: unsorted or overlapping");
            }
        }
    }

    #[test]
    fn refuses_more_than_the_host_has() {
        assert!(matches!(GuestRam::new(1 << 50), Err(MemoryError::HostTooSmall { .. })));
        assert!(matches!(GuestRam::new(1 << 20), Err(MemoryError::TooSmall(_))));
    }

    #[test]
    fn maps_a_memfd() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(32 << 20).expect("ram");
        ram.mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).expect("write");
        let v: u32 = ram.mem.read_obj(GuestAddress(0x1000)).expect("read");
        assert_eq!(v, 0xdead_beef);
        assert_eq!(ram.memfd.metadata().expect("stat").len(), 32 << 20);
    }

    #[test]
    fn preallocation_backs_every_page_and_holes_can_still_be_punched() {
        let ram = GuestRam::new(32 << 20).expect("ram");
        assert!(ram.allocated_bytes().expect("stat") < 1 << 20, "a fresh memfd is allocated lazily");
        ram.preallocate().expect("prealloc");
        assert_eq!(ram.allocated_bytes().expect("stat"), 32 << 20);
        assert_eq!(ram.memfd.metadata().expect("stat").len(), 32 << 20, "the size is unchanged");
        // What balloond does with inflated pages: they leave the allocation.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a live fd with a range inside the file.
        let rc = unsafe { libc::fallocate(ram.memfd.as_raw_fd(), punch, 0x10_0000, 0x40_0000) };
        assert_eq!(rc, 0, "punching a hole: {}", std::io::Error::last_os_error());
        assert_eq!(ram.allocated_bytes().expect("stat"), (32 << 20) - 0x40_0000);
    }

    #[test]
    fn the_memfd_is_sealed_against_size_changes_but_holes_can_be_punched() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(32 << 20).expect("ram");
        let seals = nix::fcntl::fcntl(ram.memfd.as_raw_fd(), nix::fcntl::FcntlArg::F_GET_SEALS).expect("seals");
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        assert_eq!(seals & want, want);
        assert!(ram.memfd.set_len(16 << 20).is_err(), "shrink refused");
        assert!(ram.memfd.set_len(64 << 20).is_err(), "grow refused");
        assert_eq!(ram.memfd.metadata().expect("stat").len(), 32 << 20);
        // What balloond does with a freed page: punch it out; it reads back as zeros.
        ram.mem.write_obj(0x5a5a_5a5au32, GuestAddress(0x20_0000)).expect("write");
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a live fd with a range inside the file.
        let rc = unsafe { libc::fallocate(ram.memfd.as_raw_fd(), punch, 0x20_0000, 0x1000) };
        assert_eq!(rc, 0, "punching a hole: {}", std::io::Error::last_os_error());
        let v: u32 = ram.mem.read_obj(GuestAddress(0x20_0000)).expect("read");
        assert_eq!(v, 0);
        assert_eq!(ram.memfd.metadata().expect("stat").len(), 32 << 20);
    }
}
