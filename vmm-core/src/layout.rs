//! The machine's physical layout: every fixed address and port in one place, shared by the
//! memory map (e820), the ACPI tables, the device bus and the boot loader.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00  RAM (boot structures live here)
//! 0x0009_fc00 .. 0x0010_0000  reserved (EBDA, VGA hole, BIOS area; ACPI tables at 0xe0000)
//! 0x0010_0000 .. min(ram, 3G) RAM (kernel, initrd at the top)
//! 0xc000_0000 .. 0xe000_0000  32-bit PCI MMIO window (BARs)
//! 0xe000_0000 .. 0xf000_0000  PCI ECAM (MMCONFIG), 256 buses
//! 0xfec0_0000                 IOAPIC
//! 0xfee0_0000                 local APICs
//! 0x1_0000_0000 ..            RAM above 3G, if any
//! ```

/// Start of the reserved area below 1 MiB (EBDA and up).
pub const EBDA_START: u64 = 0x9_fc00;
/// First byte of high RAM (kernel load area).
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Where the PCI hole starts; RAM below 4 GiB stops here.
pub const PCI_HOLE_START: u64 = 0xc000_0000;
pub const PCI_HOLE_SIZE: u64 = (1 << 32) - PCI_HOLE_START;
/// 32-bit BAR window handed to PCI devices.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// ECAM: bus << 20 | dev << 15 | fn << 12 | reg.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
pub const PCI_ECAM_LAST_BUS: u8 = 0xff;
/// RAM above the hole starts at 4 GiB.
pub const RAM_ABOVE_4G_START: u64 = 1 << 32;

pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Boot structures (all below 640 KiB).
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MEMMAP: u64 = 0x7000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// ACPI tables live in the reserved BIOS area, where an OS also scans for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_SIZE: u64 = 0x2_0000;

/// Legacy I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const I8042_CMD_PORT: u16 = 0x64;
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
/// The ACPI reset register (FADT RESET_REG), PIIX/ICH style.
pub const RESET_PORT: u16 = 0xcf9;
pub const RESET_VALUE: u8 = 0x06;

/// ACPI fixed hardware (PM1a blocks, GPE0), as I/O ports.
pub const PM1A_EVT_BLK: u16 = 0x600;
pub const PM1_EVT_LEN: u8 = 4;
pub const PM1A_CNT_BLK: u16 = 0x604;
pub const PM1_CNT_LEN: u8 = 2;
pub const GPE0_BLK: u16 = 0x620;
pub const GPE0_BLK_LEN: u8 = 4;
/// SCI on ISA IRQ 9, level-triggered active-high (MADT interrupt source override).
pub const SCI_IRQ: u32 = 9;
/// GPE0 bit that the power button raises; the DSDT's `\_GPE._E00` notifies `\_SB.PWRB`.
pub const GPE_POWER_BUTTON: u16 = 1 << 0;
/// SLP_TYP value of `\_S5` in the DSDT; written to PM1a_CNT with SLP_EN to power off.
pub const SLP_TYP_S5: u16 = 5;
pub const SLP_EN: u16 = 1 << 13;

/// The test guest's boot-time marker port (firecracker's boot timer idea): the guest writes
/// a byte here once, the VMM logs the time since process start.
pub const BOOT_MARKER_PORT: u16 = 0x80;

// The regions must not overlap; checked at compile time.
const _: () = {
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_ADDR);
    assert!(ACPI_START + ACPI_SIZE <= HIGH_RAM_START);
    assert!(PML4_START > BOOT_STACK_POINTER);
};
