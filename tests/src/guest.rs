//! The freestanding test guest (`tests/guest/`, protocol in `tests/guest/PROTOCOL.md`).
//!
//! `build.rs` compiles it with the system's gcc and ld into OUT_DIR; it is a PVH ELF
//! (`XEN_ELFNOTE_PHYS32_ENTRY`) that also boots on `qemu-system-x86_64 -kernel`.

use std::path::PathBuf;

/// Path of the built test guest ELF image.
pub fn guest_elf() -> PathBuf {
    PathBuf::from(env!("FLOTILLA_GUEST_ELF"))
}

#[cfg(test)]
mod tests {
    use super::guest_elf;

    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    struct Phdr {
        kind: u32,
        offset: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn phdrs(elf: &[u8]) -> Vec<Phdr> {
        let phoff = u64_at(elf, 0x20) as usize;
        let phentsize = u16_at(elf, 0x36) as usize;
        let phnum = u16_at(elf, 0x38) as usize;
        (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Phdr {
                    kind: u32_at(elf, p),
                    offset: u64_at(elf, p + 8),
                    paddr: u64_at(elf, p + 0x18),
                    filesz: u64_at(elf, p + 0x20),
                    memsz: u64_at(elf, p + 0x28),
                }
            })
            .collect()
    }

    /// The PVH entry from the first Xen PHYS32_ENTRY note, read as linux-loader does (u32 LE).
    fn pvh_entry(elf: &[u8]) -> Option<u32> {
        for ph in phdrs(elf).iter().filter(|p| p.kind == PT_NOTE) {
            let mut off = ph.offset as usize;
            let end = off + ph.filesz as usize;
            while off + 12 <= end {
                let namesz = u32_at(elf, off) as usize;
                let descsz = u32_at(elf, off + 4) as usize;
                let kind = u32_at(elf, off + 8);
                let name = &elf[off + 12..off + 12 + namesz];
                let desc = off + 12 + namesz.next_multiple_of(4);
                if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
                    return Some(u32_at(elf, desc));
                }
                off = desc + descsz.next_multiple_of(4);
            }
        }
        None
    }

    #[test]
    fn guest_is_a_pvh_elf64_loaded_above_1mib() {
        let path = guest_elf();
        let elf =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(u16_at(&elf, 0x12), 62, "EM_X86_64");
        let entry = pvh_entry(&elf).expect("XEN_ELFNOTE_PHYS32_ENTRY note");
        let loads: Vec<Phdr> = phdrs(&elf)
            .into_iter()
            .filter(|p| p.kind == PT_LOAD)
            .collect();
        assert!(!loads.is_empty());
        for l in &loads {
            // Below 1 MiB the guest keeps its boot counter (0x5000) and AP trampoline (0x8000).
            assert!(
                l.paddr >= 0x10_0000,
                "segment at {:#x} below 1 MiB",
                l.paddr
            );
            assert!(
                l.paddr + l.memsz < 0xc000_0000,
                "segment beyond the RAM below the PCI hole"
            );
        }
        assert!(
            loads
                .iter()
                .any(|l| (l.paddr..l.paddr + l.filesz).contains(&u64::from(entry))),
            "PVH entry {entry:#x} outside the loaded image"
        );
    }
}
