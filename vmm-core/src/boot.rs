//! Loading what `-kernel`/`-initrd`/`-append` name into guest RAM: an ELF with a PVH entry note
//! (Linux vmlinux, the test guest), an ELF without one (64-bit entry with a zero page), or a
//! bzImage (64-bit boot protocol). The result says how the boot vCPU must start.

use crate::layout;
use crate::memory::{e820_map, GuestMemory, E820_RAM};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("could not open kernel '{0}'")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    #[error("could not open initrd '{0}'")]
    OpenInitrd(PathBuf, #[source] std::io::Error),
    #[error("'{0}' is not a kernel image this machine can boot (neither an x86-64 ELF nor a bzImage): {1}")]
    NotAKernel(PathBuf, String),
    #[error("initrd '{path}' ({size} bytes) does not fit in guest RAM below the PCI hole above the kernel ({room} bytes free)")]
    InitrdTooLarge { path: PathBuf, size: u64, room: u64 },
    #[error("reading initrd '{0}'")]
    ReadInitrd(PathBuf, #[source] std::io::Error),
    #[error("kernel command line is too long ({0} bytes, at most {max})", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing boot data to guest memory: {0}")]
    Memory(String),
    #[error("no kernel given (use -kernel)")]
    NoKernel,
}

/// How the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, %ebx = hvm_start_info.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit long mode on identity page tables, %rsi = zero page.
    Linux64 { entry: u64, zero_page: u64 },
}

pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    pub rsdp: u64,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_MODLIST: u64 = layout::PVH_START_INFO + 0x100;
const PAGE: u64 = 4096;

fn mem_err<E: std::fmt::Display>(e: E) -> BootError {
    BootError::Memory(e.to_string())
}

/// Loads everything and returns the entry; called at start-up and again on every reset (the
/// guest may have overwritten its image, as QEMU reloads its ROM blobs).
pub fn load(mem: &GuestMemory, spec: &BootSpec) -> Result<BootEntry, BootError> {
    let mut kernel =
        File::open(spec.kernel).map_err(|e| BootError::OpenKernel(spec.kernel.to_path_buf(), e))?;
    let mut magic = [0u8; 4];
    let is_elf = kernel.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC;
    let high = Some(GuestAddress(layout::HIGH_RAM_START));
    let not_kernel = |e: linux_loader::loader::Error| BootError::NotAKernel(spec.kernel.to_path_buf(), e.to_string());
    let loaded = if is_elf {
        Elf::load(mem, None, &mut kernel, high).map_err(not_kernel)?
    } else {
        BzImage::load(mem, None, &mut kernel, high).map_err(not_kernel)?
    };

    let cmdline = write_cmdline(mem, spec.cmdline)?;
    let kernel_end = loaded.kernel_load.raw_value() + loaded.kernel_end;
    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end.max(loaded.kernel_end), spec.mem_size)?),
        None => None,
    };

    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            write_pvh_start_info(mem, spec, cmdline, initrd)?;
            Ok(BootEntry::Pvh { entry: entry.raw_value(), start_info: layout::PVH_START_INFO })
        }
        _ => {
            let hdr = loaded.setup_header;
            write_zero_page(mem, spec, hdr, cmdline, initrd)?;
            // bzImage: the 64-bit entry is 0x200 past the protected-mode code; ELF: e_entry.
            let entry = if is_elf {
                loaded.kernel_load.raw_value()
            } else {
                loaded.kernel_load.raw_value() + 0x200
            };
            Ok(BootEntry::Linux64 { entry, zero_page: layout::ZERO_PAGE_START })
        }
    }
}

/// Writes the NUL-terminated command line; returns its length without the NUL.
fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<usize, BootError> {
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START)).map_err(mem_err)?;
    Ok(cmdline.len())
}

/// The initrd goes at the top of RAM below the PCI hole, page aligned, as bootloaders do.
fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64, mem_size: u64) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(|e| BootError::OpenInitrd(path.to_path_buf(), e))?;
    let size = f.metadata().map_err(|e| BootError::OpenInitrd(path.to_path_buf(), e))?.len();
    let low_end = mem_size.min(layout::PCI_HOLE_START);
    let floor = (kernel_end + PAGE - 1) & !(PAGE - 1);
    let room = low_end.saturating_sub(floor);
    if size > room {
        return Err(BootError::InitrdTooLarge { path: path.to_path_buf(), size, room });
    }
    let addr = (low_end - size) & !(PAGE - 1);
    let mut buf = Vec::with_capacity(size as usize);
    f.read_to_end(&mut buf).map_err(|e| BootError::ReadInitrd(path.to_path_buf(), e))?;
    mem.write_slice(&buf, GuestAddress(addr)).map_err(mem_err)?;
    Ok((addr, buf.len() as u64))
}

fn write_pvh_start_info(
    mem: &GuestMemory,
    spec: &BootSpec,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(spec.mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 })
        .collect();
    let info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: if cmdline_len > 0 { layout::CMDLINE_START } else { 0 },
        rsdp_paddr: spec.rsdp,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        nr_modules: initrd.is_some() as u32,
        modlist_paddr: if initrd.is_some() { PVH_MODLIST } else { 0 },
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(layout::PVH_START_INFO));
    params.set_sections::<hvm_memmap_table_entry>(&map, GuestAddress(layout::PVH_MEMMAP));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry { paddr, size, ..Default::default() };
        params.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(mem_err)
}

fn write_zero_page(
    mem: &GuestMemory,
    spec: &BootSpec,
    hdr: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = hdr {
        params.hdr = h;
    } else {
        // ELF vmlinux without PVH: fill in what the 64-bit entry checks.
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.loadflags |= 0x01; // LOADED_HIGH
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = spec.rsdp;
    let map = e820_map(spec.mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    debug_assert!(map.iter().any(|e| e.kind == E820_RAM));
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(mem_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use std::io::Write;

    fn spec<'a>(kernel: &'a Path, initrd: Option<&'a Path>) -> BootSpec<'a> {
        BootSpec { kernel, initrd, cmdline: "console=ttyS0", mem_size: 32 << 20, rsdp: 0 }
    }

    #[test]
    fn rejects_a_file_that_is_not_a_kernel() {
        let ram = GuestRam::new(32 << 20).expect("ram");
        let dir = std::env::temp_dir().join(format!("flotilla-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let junk = dir.join("junk");
        std::fs::File::create(&junk).and_then(|mut f| f.write_all(&[0x42; 8192])).expect("junk");
        let err = load(&ram.mem, &spec(&junk, None)).expect_err("junk must not boot");
        assert!(matches!(err, BootError::NotAKernel(..)), "{err}");
        let missing = dir.join("missing");
        assert!(matches!(load(&ram.mem, &spec(&missing, None)), Err(BootError::OpenKernel(..))));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn initrd_larger_than_ram_is_refused() {
        let ram = GuestRam::new(32 << 20).expect("ram");
        let dir = std::env::temp_dir().join(format!("flotilla-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let big = dir.join("big");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(64 << 20).expect("len");
        let err = load_initrd(&ram.mem, &big, layout::HIGH_RAM_START, 32 << 20).expect_err("too big");
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn cmdline_limits() {
        let ram = GuestRam::new(32 << 20).expect("ram");
        assert!(write_cmdline(&ram.mem, &"x".repeat(layout::CMDLINE_MAX_SIZE)).is_err());
        assert!(write_cmdline(&ram.mem, "a\0b").is_err());
        assert_eq!(write_cmdline(&ram.mem, "quiet").expect("ok"), 5);
    }
}
