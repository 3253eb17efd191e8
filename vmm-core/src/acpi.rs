//! ACPI tables for the guest: RSDP, XSDT, FADT, FACS, MADT, MCFG and DSDT.
//!
//! [`build`] is pure: it returns the tables as one blob, with every physical address already
//! computed for the place the caller copies it to ([`AcpiTables::base`], which is
//! [`layout::ACPI_START`]). The blob is laid out as
//!
//! ```text
//! base + 0x000  RSDP (rev 2, in the 0xe0000..0xfffff BIOS area an OS scans for "RSD PTR ")
//!               XSDT -> FADT, MADT, MCFG
//!               FADT -> FACS, DSDT (both the 32-bit and the X_ 64-bit fields)
//!               FACS (64-byte aligned)
//!               MADT, MCFG, DSDT
//! ```
//!
//! The machine is a full (not hardware-reduced) ACPI platform: PM1a event/control and GPE0
//! blocks in I/O space, SCI on ISA IRQ 9, a reset register, no PM timer. The power button is a
//! control-method device (`\_SB.PWRB`) raised through GPE0 bit 0 (`\_GPE._E00`), and `\_S5`
//! gives the SLP_TYP the VMM's PM1a_CNT handler treats as "power off".
//!
//! `acpi_tables` provides the RSDP, XSDT, FADT, FACS, MCFG and the AML builder; the MADT's
//! PCAT_COMPAT flag, interrupt source overrides and local APIC NMI entry, and the AML
//! `IRQNoFlags` descriptor, are written here.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Arg, CreateDWordField, Device, EISAName, Else,
    Equal, If, Local, Method, Name, NotEqual, Notify, Or, Package, PackageBuilder, Path,
    ResourceTemplate, Return, Scope, Store, Uuid, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};

use crate::layout;

/// OEM ID in every table header and the RSDP.
pub const OEM_ID: [u8; 6] = *b"FLOTIL";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"FLOTILLA";
const OEM_REVISION: u32 = 1;

/// First GSI of the PCI INTx lines: IOAPIC pins 16..=23.
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Number of IOAPIC pins the PCI INTx lines are spread over.
pub const PCI_INTX_GSI_COUNT: u32 = 8;
/// Number of device slots on the root bus that the `_PRT` describes.
pub const PCI_SLOTS: u8 = 32;

/// The GSI that INTx pin `pin` (0 = INTA .. 3 = INTD) of the device in root-bus slot `slot`
/// is wired to, as the DSDT's `\_SB.PCI0._PRT` says: `16 + (slot + pin) % 8`.
/// The PCI model must raise the same GSI.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % PCI_INTX_GSI_COUNT
}

/// What the tables describe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; their APIC IDs are 0..cpus, the IOAPIC's ID is `cpus`.
    pub cpus: u8,
    /// Devices on the root bus (may be empty). The `_PRT` covers all 32 slots either way;
    /// these are only checked against it.
    pub pci_devices: Vec<AcpiPciSlot>,
}

/// A device on PCI bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiPciSlot {
    /// Device number, 0..32.
    pub slot: u8,
    /// The Interrupt Pin config register's value: 0 = none, 1 = INTA .. 4 = INTD.
    pub irq_pin: u8,
}

/// The tables as one blob, to be copied into guest memory at `base`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest-physical address of the RSDP (== `base`).
    pub rsdp_addr: u64,
    /// Guest-physical address that `bytes[0]` belongs at ([`layout::ACPI_START`]).
    pub base: u64,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI tables for {cpus} vCPUs: need 1 to 254 (APIC IDs 0..cpus, IOAPIC ID = cpus)")]
    CpuCount { cpus: u8 },
    #[error("ACPI _PRT: PCI slot {slot} is out of range (bus 0 has slots 0..32)")]
    PciSlot { slot: u8 },
    #[error("ACPI _PRT: PCI slot {slot} has interrupt pin {pin} (expected 0 = none or 1..=4)")]
    PciPin { slot: u8, pin: u8 },
    #[error("ACPI tables are {size} bytes, the ACPI region holds {capacity}")]
    TooLarge { size: usize, capacity: u64 },
}

// The RSDP must sit on a 16-byte boundary in the BIOS area, and the FACS on a 64-byte boundary;
// offsets inside the blob are aligned, so the base must be too.
const _: () = assert!(layout::ACPI_START.is_multiple_of(64));
const _: () = assert!(layout::ACPI_START >= 0xe_0000 && layout::ACPI_START < 0x10_0000);
// FADT.DSDT and FADT.FIRMWARE_CTRL are 32-bit fields.
const _: () = assert!(layout::ACPI_START + layout::ACPI_SIZE <= u32::MAX as u64);

/// FADT flags (ACPI 6.5, table 5.10).
const FADT_FLAGS: [Flags; 5] = [
    Flags::Wbinvd,
    Flags::ProcC1,
    // Set means "no fixed-feature power button": ours is the control-method device
    // `\_SB.PWRB`.
    Flags::PwrButton,
    // No sleep button at all (no fixed one, and no PNP0C0E device).
    Flags::SlpButton,
    Flags::ResetRegSup,
];
/// IAPC_BOOT_ARCH (ACPI 6.5, table 5.11). Bit 1 ("8042 present") stays clear: the i8042 at
/// 0x60/0x64 is only a reset line, not a keyboard controller, and an OS told one is there probes
/// it and fails ("Can't read CTR"). QEMU likewise sets the bit only when it models an i8042.
/// Resetting through 0xFE on port 0x64 does not depend on this flag.
///
/// Bit 5 ("CMOS RTC not present") is set: there is no MC146818 at 0x70/0x71 (the guest's wall
/// clock comes from kvmclock), so Linux registers no `rtc_cmos` platform device for it, as on
/// QEMU microvm with `rtc=off`.
const IAPC_BOOT_ARCH: u16 = IAPC_BOOT_ARCH_NO_CMOS_RTC;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
/// P_LVL2_LAT > 100 and P_LVL3_LAT > 1000 say "no C2 / no C3".
const P_LVL2_LAT_NONE: u16 = 0x0fff;
const P_LVL3_LAT_NONE: u16 = 0x0fff;

/// MADT flags: PCAT_COMPAT (dual 8259s present; OS must mask them when using the IOAPIC).
const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags: polarity in bits 0-1 (1 = active high), trigger mode in bits 2-3
/// (1 = edge, 3 = level).
const MPS_INTI_EDGE_HIGH: u16 = 0x0005;
const MPS_INTI_LEVEL_HIGH: u16 = 0x000d;
const MPS_INTI_CONFORMS: u16 = 0x0000;

/// Builds every table for `cfg`, placed at [`layout::ACPI_START`].
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    check_config(cfg)?;
    let base = layout::ACPI_START;

    // Tables whose contents do not depend on where they land.
    let dsdt = build_dsdt();
    let madt = build_madt(cfg.cpus);
    let mcfg = to_bytes(&{
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, layout::PCI_ECAM_LAST_BUS);
        mcfg
    });

    // Place everything; each table starts on a 16-byte boundary, the FACS on 64.
    const XSDT_ENTRIES: usize = 3;
    let rsdp_off = 0;
    let xsdt_off = align(rsdp_off + Rsdp::len(), 16);
    let fadt_off = align(xsdt_off + 36 + 8 * XSDT_ENTRIES, 16);
    let facs_off = align(fadt_off + FADT::len(), 64);
    let madt_off = align(facs_off + FACS::len(), 16);
    let mcfg_off = align(madt_off + madt.len(), 16);
    let dsdt_off = align(mcfg_off + mcfg.len(), 16);
    let size = dsdt_off + dsdt.len();
    if size as u64 > layout::ACPI_SIZE {
        return Err(AcpiError::TooLarge {
            size,
            capacity: layout::ACPI_SIZE,
        });
    }
    let addr = |off: usize| base + off as u64;

    let fadt = to_bytes(&build_fadt(addr(facs_off), addr(dsdt_off)));
    let xsdt = to_bytes(&{
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        xsdt.add_entry(addr(fadt_off));
        xsdt.add_entry(addr(madt_off));
        xsdt.add_entry(addr(mcfg_off));
        xsdt
    });
    debug_assert_eq!(xsdt.len(), 36 + 8 * XSDT_ENTRIES);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, addr(xsdt_off)));
    let facs = to_bytes(&FACS::new());

    let mut bytes = vec![0u8; size];
    for (off, table) in [
        (rsdp_off, &rsdp),
        (xsdt_off, &xsdt),
        (fadt_off, &fadt),
        (facs_off, &facs),
        (madt_off, &madt),
        (mcfg_off, &mcfg),
        (dsdt_off, &dsdt),
    ] {
        bytes[off..off + table.len()].copy_from_slice(table);
    }

    Ok(AcpiTables {
        rsdp_addr: addr(rsdp_off),
        base,
        bytes,
    })
}

fn check_config(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.cpus == 0 || cfg.cpus == u8::MAX {
        return Err(AcpiError::CpuCount { cpus: cfg.cpus });
    }
    for dev in &cfg.pci_devices {
        if dev.slot >= PCI_SLOTS {
            return Err(AcpiError::PciSlot { slot: dev.slot });
        }
        if dev.irq_pin > 4 {
            return Err(AcpiError::PciPin {
                slot: dev.slot,
                pin: dev.irq_pin,
            });
        }
    }
    Ok(())
}

fn align(off: usize, to: usize) -> usize {
    off.next_multiple_of(to)
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// A System I/O generic address of `bytes` bytes at `port`.
fn io_gas(port: u16, bytes: u8, access: AccessSize) -> GAS {
    GAS::new(GasSpace::SystemIo, bytes * 8, 0, access, u64::from(port))
}

fn build_fadt(facs_addr: u64, dsdt_addr: u64) -> FADT {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for flag in FADT_FLAGS {
        f = f.flag(flag);
    }
    // The FACS only through the 32-bit field: ACPI 6.5 (5.2.9) says X_FIRMWARE_CTRL must be zero
    // when FIRMWARE_CTRL is set, and ACPICA installs (and Linux lists) the FACS once per
    // non-zero field. QEMU does the same. The DSDT is in both fields (X_DSDT wins, no duplicate).
    f.firmware_ctrl = (facs_addr as u32).into();
    f.x_firmware_ctrl = 0.into();
    f.dsdt = (dsdt_addr as u32).into();
    f.x_dsdt = dsdt_addr.into();

    f.sci_int = (layout::SCI_IRQ as u16).into();
    // SMI_CMD = 0: the hardware is always in ACPI mode (PM1_CNT.SCI_EN reads 1).
    f.smi_cmd = 0.into();
    f.pm1a_evt_blk = u32::from(layout::PM1A_EVT_BLK).into();
    f.pm1a_cnt_blk = u32::from(layout::PM1A_CNT_BLK).into();
    f.pm_tmr_blk = 0.into();
    f.gpe0_blk = u32::from(layout::GPE0_BLK).into();
    f.pm1_evt_len = layout::PM1_EVT_LEN;
    f.pm1_cnt_len = layout::PM1_CNT_LEN;
    f.pm_tmr_len = 0;
    f.gpe0_blk_len = layout::GPE0_BLK_LEN;
    f.p_lvl2_lat = P_LVL2_LAT_NONE.into();
    f.p_lvl3_lat = P_LVL3_LAT_NONE.into();
    f.iapc_boot_arch = IAPC_BOOT_ARCH.into();

    // PM1 status/enable and PM1 control are 16-bit registers; GPE registers are byte-wide.
    f.x_pm1a_evt_blk = io_gas(
        layout::PM1A_EVT_BLK,
        layout::PM1_EVT_LEN,
        AccessSize::WordAccess,
    );
    f.x_pm1a_cnt_blk = io_gas(
        layout::PM1A_CNT_BLK,
        layout::PM1_CNT_LEN,
        AccessSize::WordAccess,
    );
    f.x_gpe0_blk = io_gas(
        layout::GPE0_BLK,
        layout::GPE0_BLK_LEN,
        AccessSize::ByteAccess,
    );

    f.reset_reg = io_gas(layout::RESET_PORT, 1, AccessSize::ByteAccess);
    f.reset_value = layout::RESET_VALUE;
    f.finalize()
}

/// MADT structure types (ACPI 6.5, table 5.21) that `acpi_tables` has no builder for.
const MADT_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LAPIC_NMI: u8 = 4;

fn madt_int_src_override(source: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut e = vec![MADT_INT_SRC_OVERRIDE, 10, 0 /* bus: ISA */, source];
    e.extend_from_slice(&gsi.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    e
}

fn madt_lapic_nmi(processor_uid: u8, flags: u16, lint: u8) -> Vec<u8> {
    let mut e = vec![MADT_LAPIC_NMI, 6, processor_uid];
    e.extend_from_slice(&flags.to_le_bytes());
    e.push(lint);
    e
}

/// The MADT, on the generic `Sdt` (the crate's `MADT` cannot set PCAT_COMPAT).
fn build_madt(cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, layout::LAPIC_ADDR as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..cpus {
        madt.append_slice(&to_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&to_bytes(&IoApic::new(cpus, layout::IOAPIC_ADDR as u32, 0)));
    // The PIT's IRQ0 arrives on IOAPIC pin 2.
    madt.append_slice(&madt_int_src_override(0, 2, MPS_INTI_EDGE_HIGH));
    // The SCI is level-triggered, active-high.
    madt.append_slice(&madt_int_src_override(
        layout::SCI_IRQ as u8,
        layout::SCI_IRQ,
        MPS_INTI_LEVEL_HIGH,
    ));
    // NMI arrives on LINT1 of every local APIC.
    madt.append_slice(&madt_lapic_nmi(0xff, MPS_INTI_CONFORMS, 1));
    madt.as_slice().to_vec()
}

/// `IRQNoFlags() {irq}`: the small IRQ descriptor without its information byte (edge,
/// active-high, exclusive). The AML builder only has the extended `Interrupt` descriptor.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22); // small item 0x4 (IRQ), length 2
        sink.word(1 << self.0);
    }
}

/// The PCI Host Bridge `_OSC` UUID (PCI Firmware Specification 3.3, 4.5.1).
pub const PCI_HOST_BRIDGE_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
/// The `_OSC` control bits the platform grants (PCI Firmware 3.3, table 4-5): PCIe native
/// hot-plug (0), SHPC hot-plug (1), PME (2), AER (3), PCIe capability structure (4). The
/// platform keeps none of these for itself (no firmware-first error handling, no ACPI hot-plug),
/// so the OS gets whichever of them it asks for; later bits (LTR, DPC, ...) are not granted.
/// QEMU q35 grants the same 0x1F when its ACPI PCI hot-plug is off.
pub const OSC_GRANTED_CONTROL: u8 = 0x1f;
/// `_OSC` status bits in the first capabilities DWORD (CDW1).
pub const OSC_CDW1_UNRECOGNIZED_UUID: u8 = 1 << 2;
pub const OSC_CDW1_UNRECOGNIZED_REVISION: u8 = 1 << 3;
pub const OSC_CDW1_CAPABILITIES_MASKED: u8 = 1 << 4;

/// Appends `\_SB.PCI0._OSC` (as QEMU's q35 DSDT has it) to `sink`:
///
/// ```text
/// Method (_OSC, 4, NotSerialized) {
///     CreateDWordField (Arg3, 0, CDW1)
///     If (Arg0 == ToUUID ("33db4d5b-1ff7-401c-9657-7441c03dd766")) {
///         CreateDWordField (Arg3, 8, CDW3)
///         Local0 = CDW3 & 0x1F                     // what we grant of what was asked
///         If (Arg1 != 1) { CDW1 |= 0x08 }          // unrecognized revision
///         If (CDW3 != Local0) { CDW1 |= 0x10 }     // capabilities masked
///         CDW3 = Local0
///     } Else { CDW1 |= 0x04 }                      // unrecognized UUID
///     Return (Arg3)
/// }
/// ```
///
/// Without it Linux logs "_OSC: platform retains control of PCIe features (AE_NOT_FOUND)" for
/// every PCIe root bridge.
fn pci0_osc(sink: &mut dyn AmlSink) {
    let cdw1 = Path::new("CDW1");
    let cdw3 = Path::new("CDW3");
    let uuid = Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let ctrl = Local(0);
    let create_cdw1 = CreateDWordField::new(&cdw1, &Arg(3), &aml::ZERO);
    let create_cdw3 = CreateDWordField::new(&cdw3, &Arg(3), &8u8);
    let load_ctrl = Store::new(&ctrl, &cdw3);
    let mask_ctrl = aml::And::new(&ctrl, &ctrl, &OSC_GRANTED_CONTROL);
    let set_bad_rev = Or::new(&cdw1, &cdw1, &OSC_CDW1_UNRECOGNIZED_REVISION);
    let rev_not_1 = NotEqual::new(&Arg(1), &aml::ONE);
    let if_bad_rev = If::new(&rev_not_1, vec![&set_bad_rev]);
    let set_masked = Or::new(&cdw1, &cdw1, &OSC_CDW1_CAPABILITIES_MASKED);
    let masked = NotEqual::new(&cdw3, &ctrl);
    let if_masked = If::new(&masked, vec![&set_masked]);
    let store_ctrl = Store::new(&cdw3, &ctrl);
    let is_pci = Equal::new(&Arg(0), &uuid);
    let if_pci = If::new(
        &is_pci,
        vec![&create_cdw3, &load_ctrl, &mask_ctrl, &if_bad_rev, &if_masked, &store_ctrl],
    );
    let set_bad_uuid = Or::new(&cdw1, &cdw1, &OSC_CDW1_UNRECOGNIZED_UUID);
    let else_bad_uuid = Else::new(vec![&set_bad_uuid]);
    let ret = Return::new(&Arg(3));
    Method::new(
        "_OSC".into(),
        4,
        false,
        vec![&create_cdw1, &if_pci, &else_bad_uuid, &ret],
    )
    .to_aml_bytes(sink);
}

/// [`pci0_osc`] as an [`Aml`] object, to sit among `PCI0`'s children.
struct Pci0Osc;

impl Aml for Pci0Osc {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        pci0_osc(sink);
    }
}

fn build_dsdt() -> Vec<u8> {
    // \_SB.PCI0: the PCIe host bridge. No _ADR: a device has a _HID or an _ADR, not both
    // (iasl warns on QEMU's PCI0, which has both). `Name` serialises at once, so the resource
    // templates can be temporaries.
    let pci0_crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![
            &AddressSpace::<u16>::new_bus_number(0, u16::from(layout::PCI_ECAM_LAST_BUS)),
            &IO::new(layout::PCI_CONFIG_ADDRESS, layout::PCI_CONFIG_ADDRESS, 1, 8),
            &AddressSpace::<u16>::new_io(0x0000, layout::PCI_CONFIG_ADDRESS - 1, None),
            &AddressSpace::<u16>::new_io(layout::PCI_CONFIG_ADDRESS + 8, 0xffff, None),
            &AddressSpace::<u32>::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                layout::PCI_MMIO32_START as u32,
                (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32,
                None,
            ),
        ]),
    );
    let mut prt = PackageBuilder::new();
    for slot in 0..PCI_SLOTS {
        for pin in 0..4u8 {
            let addr = (u32::from(slot) << 16) | 0xffff;
            let gsi = pci_intx_gsi(slot, pin);
            prt.add_element(&Package::new(vec![&addr, &pin, &aml::ZERO, &gsi]));
        }
    }
    let pci0_prt = Name::new("_PRT".into(), &prt);
    let pci0_hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let pci0_cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let pci0_seg = Name::new("_SEG".into(), &aml::ZERO);
    let pci0_uid = Name::new("_UID".into(), &aml::ZERO);
    let pci0_bbn = Name::new("_BBN".into(), &aml::ZERO);
    let pci0_cba = Name::new("_CBA".into(), &layout::PCI_ECAM_START);
    let pci0 = Device::new(
        "PCI0".into(),
        vec![
            &pci0_hid, &pci0_cid, &pci0_seg, &pci0_uid, &pci0_bbn, &pci0_cba, &pci0_crs, &pci0_prt,
            &Pci0Osc,
        ],
    );

    // \_SB.MBRD: motherboard resources. Linux trusts the MCFG only if the ECAM is reserved,
    // in the e820 map or here ("MMCONFIG ... reserved in ACPI motherboard resources").
    let mbrd_hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let mbrd_uid = Name::new("_UID".into(), &aml::ZERO);
    let mbrd_crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
            false,
            layout::PCI_ECAM_START as u32,
            layout::PCI_ECAM_SIZE as u32,
        )]),
    );
    let mbrd = Device::new("MBRD".into(), vec![&mbrd_hid, &mbrd_uid, &mbrd_crs]);

    // \_SB.PWRB: the control-method power button.
    let pwrb_hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let pwrb_uid = Name::new("_UID".into(), &aml::ZERO);
    let pwrb = Device::new("PWRB".into(), vec![&pwrb_hid, &pwrb_uid]);

    // \_SB.COM1: the 16550 UART.
    let com1_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com1_uid = Name::new("_UID".into(), &aml::ONE);
    let com1_crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![
            &IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8),
            &IrqNoFlags(layout::COM1_IRQ as u8),
        ]),
    );
    let com1 = Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let sb = Scope::new("_SB_".into(), vec![&pci0, &mbrd, &pwrb, &com1]);

    // GPE0 bit 0 (layout::GPE_POWER_BUTTON) is the power button.
    const _: () = assert!(layout::GPE_POWER_BUTTON == 1 << 0);
    let pwrb_path = Path::new("\\_SB_.PWRB");
    let notify_pwrb = Notify::new(&pwrb_path, &0x80u8);
    let e00 = Method::new("_E00".into(), 0, false, vec![&notify_pwrb]);
    let gpe = Scope::new("_GPE".into(), vec![&e00]);

    let s5_typ = layout::SLP_TYP_S5;
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&s5_typ, &s5_typ, &aml::ZERO, &aml::ZERO]),
    );

    // `_SB_`, `_GPE` and `_S5_` are written without the root prefix: at the DSDT's top level
    // they name the same objects, and it is how iasl writes them back.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for obj in [&sb as &dyn Aml, &gpe, &s5] {
        dsdt.append_slice(&to_bytes(obj));
    }
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path as FsPath, PathBuf};
    use std::process::Command;

    fn cfg(cpus: u8) -> AcpiConfig {
        AcpiConfig {
            cpus,
            pci_devices: vec![],
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// The tables, found by walking RSDP -> XSDT -> FADT -> FACS/DSDT as an OS would, with
    /// every pointer and checksum checked on the way.
    struct Parsed<'a> {
        rsdp: &'a [u8],
        xsdt: &'a [u8],
        fadt: &'a [u8],
        facs: &'a [u8],
        madt: &'a [u8],
        mcfg: &'a [u8],
        dsdt: &'a [u8],
    }

    /// The table at guest-physical `addr`, whose checksum must be right.
    fn table_at<'a>(t: &'a AcpiTables, addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        assert!(
            addr >= t.base,
            "{} at {addr:#x} is below the blob",
            sig.escape_ascii()
        );
        let off = (addr - t.base) as usize;
        assert!(
            off + 36 <= t.bytes.len(),
            "{} at {addr:#x} is past the blob",
            sig.escape_ascii()
        );
        assert_eq!(&t.bytes[off..off + 4], sig);
        let len = u32_at(&t.bytes, off + 4) as usize;
        assert!(
            off + len <= t.bytes.len(),
            "{} overruns the blob",
            sig.escape_ascii()
        );
        let table = &t.bytes[off..off + len];
        assert_eq!(sum(table), 0, "{} checksum", sig.escape_ascii());
        assert_eq!(&table[10..16], &OEM_ID);
        assert_eq!(&table[16..24], &OEM_TABLE_ID);
        table
    }

    fn parse(t: &AcpiTables) -> Parsed<'_> {
        assert_eq!(t.base, layout::ACPI_START);
        assert!(t.bytes.len() as u64 <= layout::ACPI_SIZE);
        assert_eq!(t.rsdp_addr % 16, 0);
        assert!((0xe_0000..0x10_0000).contains(&t.rsdp_addr));

        let off = (t.rsdp_addr - t.base) as usize;
        let rsdp = &t.bytes[off..off + 36];
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(&rsdp[9..15], &OEM_ID);
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");

        let xsdt = table_at(t, u64_at(rsdp, 24), b"XSDT");
        assert_eq!((xsdt.len() - 36) % 8, 0);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(entries.len(), 3);
        let fadt = table_at(t, entries[0], b"FACP");
        let madt = table_at(t, entries[1], b"APIC");
        let mcfg = table_at(t, entries[2], b"MCFG");

        let facs_addr = u64::from(u32_at(fadt, 36));
        assert_eq!(
            u64_at(fadt, 132),
            0,
            "X_FIRMWARE_CTRL must be 0 when FIRMWARE_CTRL is set"
        );
        assert_eq!(facs_addr % 64, 0, "FACS alignment");
        let facs_off = (facs_addr - t.base) as usize;
        let facs = &t.bytes[facs_off..facs_off + 64];
        assert_eq!(&facs[0..4], b"FACS");
        assert_eq!(u32_at(facs, 4), 64);

        let dsdt_addr = u64_at(fadt, 140);
        assert_eq!(u64::from(u32_at(fadt, 40)), dsdt_addr, "DSDT == X_DSDT");
        let dsdt = table_at(t, dsdt_addr, b"DSDT");

        Parsed {
            rsdp,
            xsdt,
            fadt,
            facs,
            madt,
            mcfg,
            dsdt,
        }
    }

    /// Tables do not overlap one another.
    #[test]
    fn tables_are_disjoint_and_aligned() {
        let t = build(&cfg(4)).unwrap();
        let p = parse(&t);
        let mut spans: Vec<(usize, usize)> =
            [p.rsdp, p.xsdt, p.fadt, p.facs, p.madt, p.mcfg, p.dsdt]
                .iter()
                .map(|s| {
                    let off = s.as_ptr() as usize - t.bytes.as_ptr() as usize;
                    assert_eq!(off % 16, 0);
                    (off, off + s.len())
                })
                .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{w:?} overlap");
        }
    }

    #[test]
    fn checksums_and_pointers_resolve() {
        for cpus in [1, 2, 8, 64, 254] {
            let t = build(&cfg(cpus)).unwrap();
            parse(&t);
        }
    }

    #[test]
    fn fadt_fields() {
        let t = build(&cfg(2)).unwrap();
        let f = parse(&t).fadt;
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "FADT major revision");
        assert_eq!(u16_at(f, 46), layout::SCI_IRQ as u16, "SCI_INT");
        assert_eq!(u32_at(f, 48), 0, "SMI_CMD");
        assert_eq!(u32_at(f, 56), u32::from(layout::PM1A_EVT_BLK));
        assert_eq!(u32_at(f, 60), 0, "PM1b_EVT_BLK");
        assert_eq!(u32_at(f, 64), u32::from(layout::PM1A_CNT_BLK));
        assert_eq!(u32_at(f, 68), 0, "PM1b_CNT_BLK");
        assert_eq!(u32_at(f, 72), 0, "PM2_CNT_BLK");
        assert_eq!(u32_at(f, 76), 0, "PM_TMR_BLK");
        assert_eq!(u32_at(f, 80), u32::from(layout::GPE0_BLK));
        assert_eq!(u32_at(f, 84), 0, "GPE1_BLK");
        assert_eq!(f[88], layout::PM1_EVT_LEN);
        assert_eq!(f[89], layout::PM1_CNT_LEN);
        assert_eq!(f[90], 0, "PM2_CNT_LEN");
        assert_eq!(f[91], 0, "PM_TMR_LEN");
        assert_eq!(f[92], layout::GPE0_BLK_LEN);
        assert_eq!(f[93], 0, "GPE1_BLK_LEN");
        assert_eq!(f[108], 0, "CENTURY");
        assert_eq!(
            u16_at(f, 109),
            IAPC_BOOT_ARCH_NO_CMOS_RTC,
            "IAPC_BOOT_ARCH: no 8042, no CMOS RTC, nothing else"
        );

        let flags = u32_at(f, 112);
        const PWR_BUTTON: u32 = 1 << 4;
        const SLP_BUTTON: u32 = 1 << 5;
        const RESET_REG_SUP: u32 = 1 << 10;
        const HW_REDUCED_ACPI: u32 = 1 << 20;
        assert_eq!(flags & PWR_BUTTON, PWR_BUTTON);
        assert_eq!(flags & SLP_BUTTON, SLP_BUTTON);
        assert_eq!(flags & RESET_REG_SUP, RESET_REG_SUP);
        assert_eq!(flags & HW_REDUCED_ACPI, 0);

        // RESET_REG: SystemIO, 8 bits at RESET_PORT; RESET_VALUE.
        let gas = |off: usize| (f[off], f[off + 1], f[off + 2], u64_at(f, off + 4));
        assert_eq!(gas(116), (1, 8, 0, u64::from(layout::RESET_PORT)));
        assert_eq!(f[128], layout::RESET_VALUE);
        // X_PM1a_EVT_BLK, X_PM1a_CNT_BLK, X_GPE0_BLK: SystemIO, lengths in bits.
        let pm1_evt_bits = 8 * layout::PM1_EVT_LEN;
        let pm1_cnt_bits = 8 * layout::PM1_CNT_LEN;
        let gpe0_bits = 8 * layout::GPE0_BLK_LEN;
        assert_eq!(
            gas(148),
            (1, pm1_evt_bits, 0, u64::from(layout::PM1A_EVT_BLK))
        );
        assert_eq!(gas(160).3, 0, "X_PM1b_EVT_BLK");
        assert_eq!(
            gas(172),
            (1, pm1_cnt_bits, 0, u64::from(layout::PM1A_CNT_BLK))
        );
        assert_eq!(gas(184).3, 0, "X_PM1b_CNT_BLK");
        assert_eq!(gas(196).3, 0, "X_PM2_CNT_BLK");
        assert_eq!(gas(208).3, 0, "X_PM_TMR_BLK");
        assert_eq!(gas(220), (1, gpe0_bits, 0, u64::from(layout::GPE0_BLK)));
        assert_eq!(gas(232).3, 0, "X_GPE1_BLK");
    }

    #[test]
    fn madt_entries() {
        for cpus in [1u8, 3, 16, 254] {
            let t = build(&cfg(cpus)).unwrap();
            let m = parse(&t).madt;
            assert_eq!(u32_at(m, 36), layout::LAPIC_ADDR as u32);
            assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");
            let mut lapics = vec![];
            let mut ioapics = vec![];
            let mut isos = vec![];
            let mut nmis = vec![];
            let mut off = 44;
            while off < m.len() {
                let (ty, len) = (m[off], m[off + 1] as usize);
                assert!(len >= 2 && off + len <= m.len());
                let e = &m[off..off + len];
                match ty {
                    0 => {
                        assert_eq!(len, 8);
                        lapics.push((e[2], e[3], u32_at(e, 4)));
                    }
                    1 => {
                        assert_eq!(len, 12);
                        ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
                    }
                    2 => {
                        assert_eq!(len, 10);
                        isos.push((e[2], e[3], u32_at(e, 4), u16_at(e, 8)));
                    }
                    4 => {
                        assert_eq!(len, 6);
                        nmis.push((e[2], u16_at(e, 3), e[5]));
                    }
                    _ => panic!("unexpected MADT entry type {ty}"),
                }
                off += len;
            }
            assert_eq!(off, m.len());
            let want: Vec<_> = (0..cpus).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, want, "one enabled LAPIC per CPU, APIC ID = index");
            assert_eq!(ioapics, vec![(cpus, layout::IOAPIC_ADDR as u32, 0)]);
            assert_eq!(
                isos,
                vec![(0, 0, 2, 0x0005), (0, 9, layout::SCI_IRQ, 0x000d)],
                "IRQ0 -> GSI2 edge; SCI level, active high"
            );
            assert_eq!(nmis, vec![(0xff, 0, 1)], "NMI on LINT1 of all CPUs");
        }
    }

    #[test]
    fn mcfg_entry() {
        let t = build(&cfg(1)).unwrap();
        let m = parse(&t).mcfg;
        assert_eq!(m.len(), 36 + 8 + 16);
        assert_eq!(u64_at(m, 44), layout::PCI_ECAM_START);
        assert_eq!(u16_at(m, 52), 0, "segment");
        assert_eq!((m[54], m[55]), (0, layout::PCI_ECAM_LAST_BUS));
    }

    #[test]
    fn dsdt_names() {
        let t = build(&cfg(1)).unwrap();
        let d = parse(&t).dsdt;
        for name in [
            &b"PCI0"[..],
            b"_PRT",
            b"PWRB",
            b"_E00",
            b"_S5_",
            b"COM1",
            b"_CBA",
        ] {
            assert!(
                d.windows(name.len()).any(|w| w == name),
                "{}",
                name.escape_ascii()
            );
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        assert_eq!(build(&cfg(0)), Err(AcpiError::CpuCount { cpus: 0 }));
        assert_eq!(build(&cfg(255)), Err(AcpiError::CpuCount { cpus: 255 }));
        let mut c = cfg(1);
        c.pci_devices.push(AcpiPciSlot {
            slot: 32,
            irq_pin: 1,
        });
        assert_eq!(build(&c), Err(AcpiError::PciSlot { slot: 32 }));
        c.pci_devices[0] = AcpiPciSlot {
            slot: 3,
            irq_pin: 5,
        };
        assert_eq!(build(&c), Err(AcpiError::PciPin { slot: 3, pin: 5 }));
        c.pci_devices[0] = AcpiPciSlot {
            slot: 3,
            irq_pin: 1,
        };
        assert!(build(&c).is_ok());
    }

    #[test]
    fn pci_intx_gsi_range() {
        for slot in 0..PCI_SLOTS {
            for pin in 0..4 {
                assert!((16..24).contains(&pci_intx_gsi(slot, pin)));
            }
        }
        assert_eq!(pci_intx_gsi(0, 0), 16);
        assert_eq!(pci_intx_gsi(1, 3), 20);
        assert_eq!(pci_intx_gsi(7, 1), 16);
    }

    /// The `_OSC` capabilities buffer as acpiexec's debugger takes a buffer argument.
    fn acpiexec_buffer(bytes: &[u8]) -> String {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
        format!("({})", hex.join(" "))
    }

    /// Evaluates `\_SB.PCI0._OSC` with acpiexec (acpica-tools, as iasl) on `dsdt` and returns
    /// the buffer it gives back as three DWORDs.
    fn run_osc(dir: &FsPath, uuid: &[u8; 16], revision: u8, cdw: [u32; 3]) -> [u32; 3] {
        let caps: Vec<u8> = cdw.iter().flat_map(|d| d.to_le_bytes()).collect();
        let cmd = format!(
            "Execute \\_SB.PCI0._OSC {} {revision} 3 {}",
            acpiexec_buffer(uuid),
            acpiexec_buffer(&caps)
        );
        let out = match Command::new("timeout")
            .args(["20", "acpiexec", "-b", &cmd, "dsdt.aml"])
            .current_dir(dir)
            .output()
        {
            Ok(out) => out,
            Err(e) => panic!("running acpiexec (acpica-tools): {e}"),
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "acpiexec failed ({}):\n{text}", out.status);
        // "  [Buffer] Length 0C =     0000: 11 00 00 00 1F 00 00 00 1F 00 00 00  // ...."
        let line = text
            .lines()
            .find(|l| l.contains("[Buffer] Length 0C"))
            .unwrap_or_else(|| panic!("_OSC returned no 12-byte buffer:\n{text}"));
        let hex = line.split("0000:").nth(1).unwrap().split("//").next().unwrap();
        let bytes: Vec<u8> = hex
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        assert_eq!(bytes.len(), 12, "{line}");
        [0, 1, 2].map(|i| u32_at(&bytes, 4 * i))
    }

    /// `\_SB.PCI0._OSC` behaves as the PCI Firmware spec (and QEMU's q35) says: it grants the
    /// control bits asked for out of 0x1F, flags masked capabilities and an unknown revision in
    /// CDW1 and leaves the support DWORD alone; an unknown UUID only sets "unrecognized UUID".
    #[test]
    fn pci0_osc_grants_what_it_can() {
        let t = build(&cfg(2)).unwrap();
        let dir = scratch_dir();
        std::fs::write(dir.join("dsdt.aml"), parse(&t).dsdt).unwrap();
        // The UUID's buffer form: the first three fields little-endian.
        let pci: [u8; 16] = [
            0x5b, 0x4d, 0xdb, 0x33, 0xf7, 0x1f, 0x1c, 0x40, 0x96, 0x57, 0x74, 0x41, 0xc0, 0x3d,
            0xd7, 0x66,
        ];
        let query = 1;
        // What Linux 6.12 asks: PCIe capability, PME, AER (granted as asked).
        assert_eq!(run_osc(&dir, &pci, 1, [query, 0x1f, 0x1d]), [query, 0x1f, 0x1d]);
        assert_eq!(run_osc(&dir, &pci, 1, [0, 0x1f, 0x14]), [0, 0x1f, 0x14]);
        // LTR (bit 5) and DPC (bit 7) are not ours to give: masked, and CDW1 says so.
        assert_eq!(
            run_osc(&dir, &pci, 1, [query, 0x1f, 0xbf]),
            [query | u32::from(OSC_CDW1_CAPABILITIES_MASKED), 0x1f, 0x1f]
        );
        assert_eq!(
            run_osc(&dir, &pci, 2, [0, 0x1f, 0x04]),
            [u32::from(OSC_CDW1_UNRECOGNIZED_REVISION), 0x1f, 0x04]
        );
        let mut other = pci;
        other[0] ^= 0xff;
        assert_eq!(
            run_osc(&dir, &other, 1, [query, 0x1f, 0x1d]),
            [query | u32::from(OSC_CDW1_UNRECOGNIZED_UUID), 0x1f, 0x1d]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    fn scratch_dir() -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("flotilla-acpi-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs iasl in `dir`; returns its stdout+stderr. Fails (not skips) without iasl.
    fn iasl(dir: &FsPath, args: &[&str]) -> String {
        let out = match Command::new("iasl").args(args).current_dir(dir).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "iasl not found: install acpica-tools (apt-get install acpica-tools) to run \
                 the ACPI table checks"
            ),
            Err(e) => panic!("running iasl: {e}"),
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "iasl {args:?} failed ({}):\n{text}",
            out.status
        );
        text
    }

    /// What in iasl's output reports a problem: error/warning/remark lines, and a compile
    /// summary that counts any.
    fn complaints(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| {
                let lower = l.trim_start().to_ascii_lowercase();
                let summary = lower.contains(" errors, ");
                (summary && !lower.contains(" 0 errors, 0 warnings, 0 remarks"))
                    || (!summary
                        && (lower.starts_with("error")
                            || lower.starts_with("warning")
                            || lower.starts_with("remark")
                            || lower.contains("invalid")
                            || lower.contains("incorrect")
                            || lower.contains("does not contain a valid")))
            })
            .collect()
    }

    /// The byte ranges iasl rewrites when it compiles a table: the checksum and the
    /// creator ID/revision (it puts its own there). The FACS has no such header.
    fn compiler_owned(name: &str, i: usize) -> bool {
        name != "facs" && (i == 9 || (28..36).contains(&i))
    }

    /// Every table disassembles with iasl without complaint, the disassembly compiles back
    /// without errors, warnings or remarks, and the result is our table byte for byte (bar
    /// the checksum and creator fields iasl writes itself). So iasl reads every field the way
    /// we meant it, and the AML's structure (package lengths, resource templates) is what its
    /// own compiler emits.
    #[test]
    fn iasl_disassembles_and_recompiles() {
        let t = build(&cfg(4)).unwrap();
        let p = parse(&t);
        let dir = scratch_dir();
        let tables = [
            ("xsdt", p.xsdt),
            ("facp", p.fadt),
            ("facs", p.facs),
            ("apic", p.madt),
            ("mcfg", p.mcfg),
            ("dsdt", p.dsdt),
        ];
        for (name, bytes) in tables {
            let dat = format!("{name}.dat");
            std::fs::write(dir.join(&dat), bytes).unwrap();
            let out = iasl(&dir, &["-d", &dat]);
            let bad = complaints(&out);
            assert!(bad.is_empty(), "iasl -d {dat}: {bad:?}\n{out}");
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            // The disassembler notes what it finds wrong in the listing itself
            // ("/* Incorrect checksum, should be .. */", "****" markers).
            let flagged: Vec<&str> = dsl
                .lines()
                .filter(|l| l.contains("****") || l.to_ascii_lowercase().contains("incorrect"))
                .collect();
            assert!(flagged.is_empty(), "iasl flagged {dat}: {flagged:?}");

            let out = iasl(&dir, &["-p", &format!("{name}-re"), &format!("{name}.dsl")]);
            let bad = complaints(&out);
            assert!(bad.is_empty(), "iasl {name}.dsl: {bad:?}\n{out}");
            let re = std::fs::read(dir.join(format!("{name}-re.aml"))).unwrap();
            assert_eq!(re.len(), bytes.len(), "{name}: recompiled length differs");
            let diff: Vec<usize> = (0..re.len())
                .filter(|&i| re[i] != bytes[i] && !compiler_owned(name, i))
                .collect();
            assert!(
                diff.is_empty(),
                "{name}: recompiled table differs at offsets {diff:?}\n{dsl}"
            );

            if name == "dsdt" {
                for want in [
                    "PNP0A08", "PNP0A03", "PNP0C0C", "PNP0501", "_E00", "_PRT", "_S5",
                    "Method (_OSC, 4, NotSerialized)",
                    "ToUUID (\"33db4d5b-1ff7-401c-9657-7441c03dd766\")",
                ] {
                    assert!(dsl.contains(want), "DSDT disassembly lacks {want}:\n{dsl}");
                }
                assert!(dsl.contains("Notify (\\_SB.PWRB, 0x80)"), "{dsl}");
                assert!(dsl.contains("_S5_: S5 System State"), "{dsl}");
            }
        }

        // iasl (20200925 at least) will not disassemble a lone RSDP, not even one it compiled
        // from its own template. Have it compile ours from source instead: it computes both
        // checksums itself, so equal bytes mean ours are right.
        let rsdp_asl = format!(
            "[0008] Signature : \"RSD PTR \"\n\
             [0001] Checksum : 00\n\
             [0006] Oem ID : \"{}\"\n\
             [0001] Revision : 02\n\
             [0004] RSDT Address : 00000000\n\
             [0004] Length : 00000024\n\
             [0008] XSDT Address : {:016X}\n\
             [0001] Extended Checksum : 00\n\
             [0003] Reserved : 000000\n",
            OEM_ID.escape_ascii(),
            u64_at(p.rsdp, 24),
        );
        std::fs::write(dir.join("rsdp.asl"), rsdp_asl).unwrap();
        let out = iasl(&dir, &["rsdp.asl"]);
        let bad = complaints(&out);
        assert!(bad.is_empty(), "iasl rsdp.asl: {bad:?}\n{out}");
        assert_eq!(std::fs::read(dir.join("rsdp.aml")).unwrap(), p.rsdp);

        std::fs::remove_dir_all(&dir).ok();
    }
}
