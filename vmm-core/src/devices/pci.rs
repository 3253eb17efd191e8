//! The PCI root complex: bus 0 with the host bridge at 00:00.0, configuration access through the
//! 0xCF8/0xCFC port pair and through ECAM (MMCONFIG), and the description query-pci reports.
//! virtio-pci devices plug in as further [`PciDevice`]s.

use super::bus::{lock, BusDevice};
use std::sync::{Arc, Mutex};

pub const PCI_CONFIG_SPACE_SIZE: usize = 256;
pub const PCIE_CONFIG_SPACE_SIZE: usize = 4096;
const SLOTS: usize = 32;

/// A PCI function as the root complex sees it.
pub trait PciDevice: Send {
    /// Reads the 32-bit register at `reg` (dword index).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` inside dword `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
    /// What query-pci reports about it.
    fn describe(&self) -> PciFunctionInfo;
    /// Back to the power-on state (machine reset). Functions without state keep the default.
    fn reset(&mut self) {}
}

/// One BAR as query-pci reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciRegion {
    pub bar: u8,
    pub io: bool,
    pub address: u64,
    pub size: u64,
    pub prefetch: bool,
    pub mem_type_64: bool,
}

/// Everything query-pci's PciDeviceInfo needs about one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunctionInfo {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
    /// Class code << 8 | subclass, as QEMU reports `class_info.class`.
    pub class: u16,
    pub class_desc: Option<&'static str>,
    pub vendor: u16,
    pub device: u16,
    pub irq: Option<u8>,
    pub qdev_id: String,
    pub regions: Vec<PciRegion>,
}

/// QEMU's names for the classes it knows (hw/pci/pci.c `pci_class_descriptions`), for the ones
/// this machine can have. QEMU 7.2's query-pci gives no `desc` for virtio-balloon's 0x00ff or
/// virtio-input's 0x0980 (qemu-7.2-qmp/query-pci.txt), so neither has one here.
pub fn class_description(class: u16) -> Option<&'static str> {
    Some(match class {
        0x0100 => "SCSI controller",
        0x0106 => "SATA controller",
        0x0180 => "Storage controller",
        0x0200 => "Ethernet controller",
        0x0300 => "VGA controller",
        0x0380 => "Display controller",
        0x0600 => "Host bridge",
        0x0601 => "ISA bridge",
        0x0604 => "PCI bridge",
        0x0780 => "Communication controller",
        0x0880 => "System peripheral",
        0x0900 => "Keyboard",
        _ => return None,
    })
}

/// A configuration space with a per-byte write mask: the common part of every function.
pub struct ConfigSpace {
    bytes: Vec<u8>,
    writable: Vec<u8>,
}

impl ConfigSpace {
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8) -> Self {
        let mut c = ConfigSpace { bytes: vec![0; PCI_CONFIG_SPACE_SIZE], writable: vec![0; PCI_CONFIG_SPACE_SIZE] };
        c.set_u16(0x00, vendor);
        c.set_u16(0x02, device);
        c.bytes[0x09] = prog_if;
        c.bytes[0x0a] = subclass;
        c.bytes[0x0b] = class;
        // Command register: I/O, memory, bus master, INTx disable are the guest's.
        c.writable[0x04] = 0x07;
        c.writable[0x05] = 0x04;
        // Interrupt line is scratch space for the OS.
        c.writable[0x3c] = 0xff;
        c
    }

    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.bytes[off] = v;
    }

    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn u8_at(&self, off: usize) -> u8 {
        self.bytes[off]
    }

    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes([self.bytes[off], self.bytes[off + 1], self.bytes[off + 2], self.bytes[off + 3]])
    }

    /// Which bits of the `mask.len()` bytes at `off` the guest may change.
    pub fn set_writable(&mut self, off: usize, mask: &[u8]) {
        self.writable[off..off + mask.len()].copy_from_slice(mask);
    }

    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    pub fn read_dword(&self, reg: usize) -> u32 {
        let off = reg * 4;
        match self.bytes.get(off..off + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let off = reg * 4 + offset + i;
            if let (Some(b), Some(mask)) = (self.bytes.get(off).copied(), self.writable.get(off).copied()) {
                self.bytes[off] = (b & !mask) | (v & mask);
            }
        }
    }

    pub fn vendor(&self) -> u16 {
        self.u16_at(0)
    }

    pub fn device(&self) -> u16 {
        self.u16_at(2)
    }

    pub fn class(&self) -> u16 {
        u16::from_le_bytes([self.bytes[0x0a], self.bytes[0x0b]])
    }
}

/// 00:00.0, the host bridge. Identified as QEMU's q35 MCH (8086:29c0) so guests and tools that
/// know QEMU recognise it; it has no BARs.
pub struct HostBridge {
    cfg: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        let mut cfg = ConfigSpace::new(0x8086, 0x29c0, 0x06, 0x00, 0x00);
        // Subsystem as QEMU sets it (Red Hat / QEMU).
        cfg.set_u16(0x2c, 0x1af4);
        cfg.set_u16(0x2e, 0x1100);
        HostBridge { cfg }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.cfg.read_dword(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.cfg.write(reg, offset, data);
    }

    fn describe(&self) -> PciFunctionInfo {
        let class = self.cfg.class();
        PciFunctionInfo {
            bus: 0,
            slot: 0,
            function: 0,
            class,
            class_desc: class_description(class),
            vendor: self.cfg.vendor(),
            device: self.cfg.device(),
            irq: None,
            qdev_id: String::new(),
            regions: Vec::new(),
        }
    }
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Bus 0's slots (function 0 only for now).
#[derive(Default)]
pub struct PciBus {
    slots: Vec<Option<SharedPciDevice>>,
}

impl PciBus {
    pub fn new() -> Self {
        let mut bus = PciBus { slots: vec![None; SLOTS] };
        bus.slots[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        bus
    }

    /// Puts a device in the first free slot; returns the slot.
    pub fn add(&mut self, dev: SharedPciDevice) -> Option<u8> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(dev);
        Some(slot as u8)
    }

    /// Puts a device in `slot`; false when the slot is taken or does not exist.
    pub fn add_at(&mut self, slot: u8, dev: SharedPciDevice) -> bool {
        match self.slots.get_mut(slot as usize) {
            Some(s @ None) => {
                *s = Some(dev);
                true
            }
            _ => false,
        }
    }

    /// Whether `slot` exists and is empty.
    pub fn is_free(&self, slot: u8) -> bool {
        matches!(self.slots.get(slot as usize), Some(None))
    }

    /// The first free slot, if any.
    pub fn free_slot(&self) -> Option<u8> {
        self.slots.iter().position(Option::is_none).map(|s| s as u8)
    }

    /// Machine reset: every function back to its power-on state.
    pub fn reset(&self) {
        for d in self.slots.iter().flatten() {
            lock(d).reset();
        }
    }

    fn function(&self, bus: u8, slot: u8, func: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(slot as usize)?.as_ref()
    }

    pub fn read(&self, bus: u8, slot: u8, func: u8, reg: usize) -> u32 {
        match self.function(bus, slot, func) {
            Some(d) => lock(d).config_read(reg),
            None => 0xffff_ffff,
        }
    }

    pub fn write(&self, bus: u8, slot: u8, func: u8, reg: usize, offset: usize, data: &[u8]) {
        if let Some(d) = self.function(bus, slot, func) {
            lock(d).config_write(reg, offset, data);
        }
    }

    pub fn describe(&self) -> Vec<PciFunctionInfo> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, d)| {
                let mut info = lock(d.as_ref()?).describe();
                info.slot = slot as u8;
                Some(info)
            })
            .collect()
    }
}

pub type SharedPciBus = Arc<Mutex<PciBus>>;

/// The legacy configuration mechanism #1: address at 0xCF8, data at 0xCFC..0xCFF.
pub struct PciConfigIo {
    bus: SharedPciBus,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: SharedPciBus) -> Self {
        PciConfigIo { bus, address: 0 }
    }

    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = ((self.address >> 16) & 0xff) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let func = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        Some((bus, slot, func, reg))
    }
}

impl BusDevice for PciConfigIo {
    // Mapped at 0xCF8 with length 8: offsets 0..4 address, 4..8 data.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset < 4 {
            self.address
        } else {
            match self.target() {
                Some((b, s, f, r)) => lock(&self.bus).read(b, s, f, r),
                None => 0xffff_ffff,
            }
        };
        let shift = (offset as usize % 4) * 8;
        for (i, d) in data.iter_mut().enumerate() {
            *d = value.checked_shr((shift + i * 8) as u32).unwrap_or(0) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            // Only whole-dword writes change the address (byte writes to 0xCF9 are the reset
            // register, which sits on its own device).
            if offset == 0 && data.len() == 4 {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            return;
        }
        if let Some((b, s, f, r)) = self.target() {
            lock(&self.bus).write(b, s, f, r, (offset - 4) as usize, data);
        }
    }
}

/// ECAM: one 4 KiB configuration page per function, bus << 20 | slot << 15 | func << 12.
pub struct PciEcam {
    bus: SharedPciBus,
}

impl PciEcam {
    pub fn new(bus: SharedPciBus) -> Self {
        PciEcam { bus }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, usize) {
        let bus = ((offset >> 20) & 0xff) as u8;
        let slot = ((offset >> 15) & 0x1f) as u8;
        let func = ((offset >> 12) & 0x7) as u8;
        let reg = ((offset & 0xfff) >> 2) as usize;
        (bus, slot, func, reg, (offset & 3) as usize)
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, s, f, reg, byte) = Self::decode(offset);
        let value = if reg < PCI_CONFIG_SPACE_SIZE / 4 {
            lock(&self.bus).read(b, s, f, reg)
        } else if lock(&self.bus).read(b, s, f, 0) == 0xffff_ffff {
            0xffff_ffff
        } else {
            // No extended capabilities: an empty extended space reads as zero.
            0
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = value.checked_shr(((byte + i) * 8) as u32).unwrap_or(0) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, s, f, reg, byte) = Self::decode(offset);
        if reg < PCI_CONFIG_SPACE_SIZE / 4 && byte + data.len() <= 4 {
            lock(&self.bus).write(b, s, f, reg, byte, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cf8(bus: u8, slot: u8, reg: u32) -> [u8; 4] {
        (0x8000_0000u32 | (bus as u32) << 16 | (slot as u32) << 11 | reg).to_le_bytes()
    }

    #[test]
    fn host_bridge_through_cf8_and_ecam_agree() {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let mut io = PciConfigIo::new(bus.clone());
        let mut ecam = PciEcam::new(bus);
        io.write(0, &cf8(0, 0, 0));
        let mut id = [0u8; 4];
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x29c0_8086);
        let mut id2 = [0u8; 4];
        ecam.read(0, &mut id2);
        assert_eq!(id, id2);
        // 16-bit read of the device id at 0xCFE.
        let mut dev = [0u8; 2];
        io.read(6, &mut dev);
        assert_eq!(u16::from_le_bytes(dev), 0x29c0);
        // Empty slot and other buses read all ones.
        io.write(0, &cf8(0, 5, 0));
        io.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0xffff_ffff);
        ecam.read(1 << 20, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0xffff_ffff);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let mut ecam = PciEcam::new(bus.clone());
        ecam.write(0, &[0, 0, 0, 0]);
        ecam.write(4, &[0xff, 0xff]);
        let mut v = [0u8; 4];
        ecam.read(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x29c0_8086);
        ecam.read(4, &mut v);
        assert_eq!(u16::from_le_bytes([v[0], v[1]]), 0x0407);
        let info = lock(&bus).describe();
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].class, 0x0600);
        assert_eq!(info[0].class_desc, Some("Host bridge"));
        assert_eq!(class_description(0x0100), Some("SCSI controller"));
        assert_eq!(class_description(0x00ff), None, "as QEMU 7.2 reports virtio-balloon");
    }
}
