//! One virtio-pci function: configuration space with the capability chain, BAR 4 (mapped into
//! the PCI MMIO window, moved when the guest moves it, with the queues' ioeventfds), and the
//! dispatch of BAR accesses to COMMON_CFG, ISR, DEVICE_CFG, NOTIFY and the MSI-X table/PBA.

use super::common::{CommonCfg, StatusChange};
use super::msix::MsixTable;
use super::{features, status, DeviceSignals, VirtioDeviceModel};
use crate::devices::bus::{BusDevice, MmioWindow, SharedDevice};
use crate::devices::pci::{class_description, ConfigSpace, PciDevice, PciFunctionInfo, PciRegion};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use vmm_sys_util::eventfd::EventFd;

/// The BAR holding every region (QEMU's modern BAR number).
pub const BAR_INDEX: u8 = 4;
pub const BAR_SIZE: u64 = 0x8000;

/// Region offsets inside the BAR.
pub mod bar {
    pub const COMMON: u64 = 0x0000;
    pub const ISR: u64 = 0x1000;
    pub const DEVICE: u64 = 0x2000;
    pub const NOTIFY: u64 = 0x3000;
    pub const MSIX_TABLE: u64 = 0x4000;
    pub const MSIX_PBA: u64 = 0x5000;
    pub const REGION: u64 = 0x1000;
    pub const NOTIFY_MULTIPLIER: u32 = 4;
}

/// Capability offsets in configuration space.
pub mod cap {
    pub const COMMON: usize = 0x40;
    pub const NOTIFY: usize = 0x50;
    pub const ISR: usize = 0x64;
    pub const DEVICE: usize = 0x74;
    pub const PCI_CFG: usize = 0x84;
    pub const MSIX: usize = 0x98;
    pub const VNDR: u8 = 0x09;
    pub const ID_MSIX: u8 = 0x11;
    pub const TYPE_COMMON: u8 = 1;
    pub const TYPE_NOTIFY: u8 = 2;
    pub const TYPE_ISR: u8 = 3;
    pub const TYPE_DEVICE: u8 = 4;
    pub const TYPE_PCI_CFG: u8 = 5;
}

const COMMAND: usize = 0x04;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
const STATUS_CAP_LIST: u16 = 1 << 4;
const BAR_REG: usize = 0x10 + 4 * BAR_INDEX as usize;
/// BAR low dword flags: memory, 64-bit, not prefetchable.
const BAR_FLAGS_MEM64: u32 = 0b100;
const PCI_CFG_DATA: usize = cap::PCI_CFG + 16;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("device '{id}': {n} queues need {vectors} MSI-X vectors; the table holds at most 2048")]
    TooManyVectors { id: String, n: u16, vectors: usize },
    #[error("device '{id}': {kicks} kick eventfds for {n} queues")]
    KickCount { id: String, kicks: usize, n: u16 },
}

/// Registers KVM ioeventfds (MMIO writes that signal an eventfd without leaving the kernel).
pub trait IoEventRegistrar: Send + Sync {
    fn register(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error>;
    fn unregister(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error>;
}

impl IoEventRegistrar for VmFd {
    // NoDatamatch: any write of any length to the address is a kick (QEMU registers the modern
    // notify address the same way).
    fn register(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        self.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
    }
    fn unregister(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        self.unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
    }
}

/// What a function is, before it is built.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// qdev id, for query-pci.
    pub id: String,
    /// Virtio device id (1 = net, 2 = block, 5 = balloon).
    pub device_id: u16,
    /// Class << 8 | subclass.
    pub class: u16,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Where vmm-core puts the BAR at power-on.
    pub bar_address: u64,
}

/// The function; shared as `Arc<Mutex<_>>` both on the PCI bus and in the MMIO window.
pub struct VirtioPciDevice {
    spec: FunctionSpec,
    cfg: ConfigSpace,
    common: CommonCfg,
    msix: MsixTable,
    signals: Arc<DeviceSignals>,
    model: Box<dyn VirtioDeviceModel>,
    kicks: Vec<EventFd>,
    window: MmioWindow,
    ioevents: Arc<dyn IoEventRegistrar>,
    /// The address the BAR is decoded at, when it is.
    mapped: Option<u64>,
    /// DRIVER_OK and bus-master both on: the model was started.
    running: bool,
    reset_seq: u64,
    /// What status reads while a reset is under way.
    status_during_reset: u8,
    warned_unmapped: bool,
    me: Weak<Mutex<VirtioPciDevice>>,
}

impl VirtioPciDevice {
    /// Builds the function and maps its BAR. `kicks[n]` is queue n's notify eventfd (the model
    /// holds copies); `msix` has `num_queues + 1` vectors unless the device was given its count (a
    /// driver shares fewer).
    pub fn new(
        spec: FunctionSpec,
        window: MmioWindow,
        ioevents: Arc<dyn IoEventRegistrar>,
        msix: MsixTable,
        signals: Arc<DeviceSignals>,
        model: Box<dyn VirtioDeviceModel>,
        kicks: Vec<EventFd>,
    ) -> Result<Arc<Mutex<VirtioPciDevice>>, VirtioPciError> {
        if msix.count() as usize > 2048 || msix.count() == 0 {
            return Err(VirtioPciError::TooManyVectors {
                id: spec.id.clone(),
                n: spec.num_queues,
                vectors: msix.count() as usize,
            });
        }
        if kicks.len() != spec.num_queues as usize {
            return Err(VirtioPciError::KickCount { id: spec.id.clone(), kicks: kicks.len(), n: spec.num_queues });
        }
        let common = CommonCfg::new(spec.num_queues, spec.queue_size, msix.count());
        let dev = Arc::new_cyclic(|me| {
            let mut d = VirtioPciDevice {
                cfg: build_config_space(&spec, msix.count()),
                spec,
                common,
                msix,
                signals,
                model,
                kicks,
                window,
                ioevents,
                mapped: None,
                running: false,
                reset_seq: 0,
                status_during_reset: 0,
                warned_unmapped: false,
                me: me.clone(),
            };
            d.power_on_bar();
            Mutex::new(d)
        });
        crate::devices::bus::lock(&dev).remap();
        Ok(dev)
    }

    pub fn signals(&self) -> &Arc<DeviceSignals> {
        &self.signals
    }

    /// Where the BAR is decoded now.
    pub fn bar_address(&self) -> Option<u64> {
        self.mapped
    }

    fn power_on_bar(&mut self) {
        let a = self.spec.bar_address;
        self.cfg.set_u32(BAR_REG, (a as u32 & !0xf) | BAR_FLAGS_MEM64);
        self.cfg.set_u32(BAR_REG + 4, (a >> 32) as u32);
        // Firmware would enable decoding of an assigned BAR; bus mastering is the driver's.
        self.cfg.set_u16(COMMAND, CMD_MEMORY);
        self.msix.set_bus_master(false);
    }

    fn command(&self) -> u16 {
        self.cfg.u16_at(COMMAND)
    }

    fn bar_register(&self) -> u64 {
        (u64::from(self.cfg.u32_at(BAR_REG + 4)) << 32) | u64::from(self.cfg.u32_at(BAR_REG) & !0xf)
    }

    /// Maps or moves the BAR (and the notify ioeventfds) to where the registers say, if
    /// decoding is on and the address lies in the window.
    fn remap(&mut self) {
        let addr = self.bar_register();
        let wanted = (self.command() & CMD_MEMORY != 0 && self.window.contains(addr, BAR_SIZE)).then_some(addr);
        if wanted == self.mapped {
            return;
        }
        if let Some(old) = self.mapped.take() {
            self.window.remove(old);
            for (q, fd) in self.kicks.iter().enumerate() {
                if let Err(e) = self.ioevents.unregister(fd, notify_address(old, q)) {
                    tracing::warn!(id = %self.spec.id, queue = q, error = %e, "unregistering a notify ioeventfd");
                }
            }
        }
        let Some(addr) = wanted else {
            if self.command() & CMD_MEMORY != 0 && !self.warned_unmapped && addr != 0 {
                // Sizing writes pass through here too; only a settled address outside the
                // window deserves a word, once.
                tracing::debug!(id = %self.spec.id, addr = format_args!("{addr:#x}"), "BAR outside the PCI window: not decoded");
            }
            return;
        };
        let Some(me) = self.me.upgrade() else { return };
        let shared: SharedDevice = me;
        if let Err(e) = self.window.insert(addr, BAR_SIZE, shared) {
            if !self.warned_unmapped {
                tracing::warn!(id = %self.spec.id, error = %e, "BAR overlaps another: not decoded");
                self.warned_unmapped = true;
            }
            return;
        }
        for (q, fd) in self.kicks.iter().enumerate() {
            if let Err(e) = self.ioevents.register(fd, notify_address(addr, q)) {
                // The userspace notify handler still kicks; only the fast path is lost.
                tracing::warn!(id = %self.spec.id, queue = q, error = %e, "registering a notify ioeventfd");
            }
        }
        self.mapped = Some(addr);
        tracing::debug!(id = %self.spec.id, addr = format_args!("{addr:#x}"), "BAR mapped");
    }

    fn offered_features(&self) -> u64 {
        crate::devices::bus::lock(&self.signals.device_features).unwrap_or(features::VERSION_1)
    }

    fn shown_status(&self) -> u8 {
        // Until the model has stopped the rings, the old status shows, so a driver waiting for
        // 0 does not reuse ring memory too early. A driver that goes on writing status without
        // waiting sees its own writes (the model still handles everything in order).
        if self.status_during_reset != 0 && self.signals.reset_pending() {
            return self.status_during_reset;
        }
        let mut s = self.common.status();
        if self.signals.needs_reset.load(Ordering::SeqCst) && s != 0 {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn bus_master(&self) -> bool {
        self.command() & CMD_BUS_MASTER != 0
    }

    /// Starts or stops the model when DRIVER_OK && bus-master changes.
    fn update_running(&mut self) {
        let want = self.common.status() & status::DRIVER_OK != 0 && self.bus_master();
        if want && !self.running {
            self.model.start(self.common.enabled_queues());
        } else if !want && self.running {
            self.model.stop();
        }
        self.running = want;
    }

    /// Resets the device; `shown` is the status the driver saw before.
    fn device_reset(&mut self, shown: u8) {
        self.status_during_reset = shown;
        self.reset_seq += 1;
        self.signals.resets_requested.store(self.reset_seq, Ordering::SeqCst);
        self.running = false;
        self.model.reset(self.reset_seq);
        self.common.reset();
        self.signals.isr.store(0, Ordering::SeqCst);
        self.signals.needs_reset.store(false, Ordering::SeqCst);
        self.signals.config_vector.store(super::NO_VECTOR, Ordering::SeqCst);
        self.msix.clear_pending();
    }

    fn common_write(&mut self, offset: u64, value: u32) {
        let offered = self.offered_features();
        let shown = self.shown_status();
        if offset == super::common::off::STATUS {
            self.status_during_reset = 0;
        }
        for change in self.common.write(offset, value, offered) {
            match change {
                StatusChange::Reset => {
                    // `common` is already reset; the rest of the device follows.
                    self.device_reset(shown);
                }
                StatusChange::FeaturesOk(f) => self.model.features_ok(f),
                StatusChange::DriverOk | StatusChange::DriverOkCleared => self.update_running(),
            }
        }
        self.signals.config_vector.store(self.common.msix_config(), Ordering::SeqCst);
    }

    /// A 1/2/4-byte read inside the BAR.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        let region = offset & !(bar::REGION - 1);
        let off = offset - region;
        let value: u32 = match region {
            bar::COMMON => match off {
                super::common::off::STATUS => self.shown_status().into(),
                _ => self.common.read(off, self.offered_features(), self.signals.generation.load(Ordering::SeqCst)),
            },
            bar::ISR if off == 0 => self.signals.isr.swap(0, Ordering::SeqCst).into(),
            bar::DEVICE => {
                let cfg = crate::devices::bus::lock(&self.signals.config);
                match cfg.get(off as usize..off as usize + data.len()) {
                    Some(b) => data.copy_from_slice(b),
                    None => data.fill(0xff),
                }
                return;
            }
            bar::MSIX_TABLE => self.msix.read_table(off),
            bar::MSIX_PBA => self.msix.read_pba(off),
            _ => 0,
        };
        put_le(value, data);
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let region = offset & !(bar::REGION - 1);
        let off = offset - region;
        let value = get_le(data);
        match region {
            bar::COMMON => self.common_write(off, value),
            bar::DEVICE => {
                {
                    let mut cfg = crate::devices::bus::lock(&self.signals.config);
                    if let Some(b) = cfg.get_mut(off as usize..off as usize + data.len()) {
                        b.copy_from_slice(data);
                    }
                }
                self.model.write_config(off as u32, data);
            }
            bar::NOTIFY => {
                // A kick that reached userspace (no ioeventfd at this address, or an access
                // from the host side): signal the same eventfd the backend waits on.
                let q = (off / u64::from(bar::NOTIFY_MULTIPLIER)) as usize;
                if let Some(fd) = self.kicks.get(q) {
                    if let Err(e) = fd.write(1) {
                        tracing::warn!(id = %self.spec.id, queue = q, error = %e, "kick");
                    }
                }
            }
            bar::MSIX_TABLE => self.msix.write_table(off, value),
            _ => {}
        }
    }

    fn pci_cfg_access(&mut self, write: Option<&[u8]>) {
        let c = cap::PCI_CFG;
        let bar = self.cfg.u8_at(c + 4);
        let offset = u64::from(self.cfg.u32_at(c + 8));
        let len = self.cfg.u32_at(c + 12) as usize;
        if bar != BAR_INDEX || !matches!(len, 1 | 2 | 4) || offset + len as u64 > BAR_SIZE {
            return;
        }
        match write {
            Some(bytes) => {
                let mut buf = [0u8; 4];
                buf[..bytes.len().min(4)].copy_from_slice(&bytes[..bytes.len().min(4)]);
                self.bar_write(offset, &buf[..len]);
            }
            None => {
                let mut buf = [0u8; 4];
                self.bar_read(offset, &mut buf[..len]);
                self.cfg.set_u32(PCI_CFG_DATA, u32::from_le_bytes(buf));
            }
        }
    }
}

fn notify_address(base: u64, queue: usize) -> u64 {
    base + bar::NOTIFY + queue as u64 * u64::from(bar::NOTIFY_MULTIPLIER)
}

fn put_le(value: u32, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = value.checked_shr(8 * i as u32).unwrap_or(0) as u8;
    }
}

fn get_le(data: &[u8]) -> u32 {
    data.iter().take(4).enumerate().fold(0, |acc, (i, &b)| acc | u32::from(b) << (8 * i))
}

/// Configuration space: identity, BAR 4, and the capability chain.
fn build_config_space(spec: &FunctionSpec, vectors: u16) -> ConfigSpace {
    let mut c = ConfigSpace::new(0x1af4, 0x1040 + spec.device_id, (spec.class >> 8) as u8, spec.class as u8, 0);
    c.set_u8(0x08, 1); // revision 1: modern
    c.set_u16(0x06, STATUS_CAP_LIST);
    c.set_u16(0x2c, 0x1af4);
    c.set_u16(0x2e, 0x1100);
    c.set_u8(0x34, cap::COMMON as u8);
    // BAR 4: the low dword keeps its flag bits and the size's low bits; the high dword is free.
    let mask = !(BAR_SIZE as u32 - 1) & !0xf;
    c.set_writable(BAR_REG, &mask.to_le_bytes());
    c.set_writable(BAR_REG + 4, &[0xff; 4]);
    let vcap = |c: &mut ConfigSpace, at: usize, next: usize, len: u8, kind: u8, offset: u64, size: u32| {
        c.set_u8(at, cap::VNDR);
        c.set_u8(at + 1, next as u8);
        c.set_u8(at + 2, len);
        c.set_u8(at + 3, kind);
        c.set_u8(at + 4, BAR_INDEX);
        c.set_u32(at + 8, offset as u32);
        c.set_u32(at + 12, size);
    };
    let region = bar::REGION as u32;
    vcap(&mut c, cap::COMMON, cap::NOTIFY, 16, cap::TYPE_COMMON, bar::COMMON, region);
    vcap(&mut c, cap::NOTIFY, cap::ISR, 20, cap::TYPE_NOTIFY, bar::NOTIFY, region);
    c.set_u32(cap::NOTIFY + 16, bar::NOTIFY_MULTIPLIER);
    vcap(&mut c, cap::ISR, cap::DEVICE, 16, cap::TYPE_ISR, bar::ISR, region);
    vcap(&mut c, cap::DEVICE, cap::PCI_CFG, 16, cap::TYPE_DEVICE, bar::DEVICE, region);
    vcap(&mut c, cap::PCI_CFG, cap::MSIX, 20, cap::TYPE_PCI_CFG, 0, 0);
    // The PCI_CFG window: bar, offset, length and data are the driver's.
    c.set_u8(cap::PCI_CFG + 4, 0);
    c.set_writable(cap::PCI_CFG + 4, &[0xff]);
    c.set_writable(cap::PCI_CFG + 8, &[0xff; 8]);
    c.set_writable(PCI_CFG_DATA, &[0xff; 4]);
    // MSI-X: table at BAR 4 + 0x4000, PBA at + 0x5000; enable and function mask writable.
    c.set_u8(cap::MSIX, cap::ID_MSIX);
    c.set_u8(cap::MSIX + 1, 0);
    c.set_u16(cap::MSIX + 2, vectors.saturating_sub(1) & 0x7ff);
    c.set_u32(cap::MSIX + 4, bar::MSIX_TABLE as u32 | u32::from(BAR_INDEX));
    c.set_u32(cap::MSIX + 8, bar::MSIX_PBA as u32 | u32::from(BAR_INDEX));
    c.set_writable(cap::MSIX + 3, &[0xc0]);
    c
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        if reg * 4 == PCI_CFG_DATA {
            self.pci_cfg_access(None);
        }
        self.cfg.read_dword(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let start = reg * 4 + offset;
        let end = start + data.len();
        let touches = |at: usize, len: usize| start < at + len && at < end;
        let old_cmd = self.command();
        self.cfg.write(reg, offset, data);
        if touches(PCI_CFG_DATA, 4) {
            // The write went into the data field; carry it out on the BAR.
            let d = self.cfg.u32_at(PCI_CFG_DATA).to_le_bytes();
            self.pci_cfg_access(Some(&d));
            return;
        }
        if touches(cap::MSIX + 2, 2) {
            let ctrl = self.cfg.u16_at(cap::MSIX + 2);
            self.msix.set_control(ctrl);
        }
        if touches(COMMAND, 2) {
            let cmd = self.command();
            if (cmd ^ old_cmd) & CMD_BUS_MASTER != 0 {
                self.msix.set_bus_master(cmd & CMD_BUS_MASTER != 0);
                if cmd & CMD_BUS_MASTER == 0 && self.common.status() & status::DRIVER_OK != 0 {
                    // QEMU: a device that may no longer master the bus stops, DRIVER_OK goes.
                    self.common.clear_driver_ok();
                }
                self.update_running();
            }
        }
        if touches(COMMAND, 2) || touches(BAR_REG, 8) {
            self.remap();
        }
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
            qdev_id: self.spec.id.clone(),
            regions: vec![PciRegion {
                bar: BAR_INDEX,
                io: false,
                // QEMU reports an undecoded BAR as all ones (PCI_BAR_UNMAPPED).
                address: self.mapped.unwrap_or(u64::MAX),
                size: BAR_SIZE,
                prefetch: false,
                mem_type_64: true,
            }],
        }
    }

    fn reset(&mut self) {
        self.device_reset(self.shown_status());
        self.msix.reset();
        let msix_ctrl = self.msix.control();
        self.cfg.set_u16(cap::MSIX + 2, msix_ctrl);
        for (at, len) in [(cap::PCI_CFG + 4, 1), (cap::PCI_CFG + 8, 12)] {
            for i in 0..len {
                self.cfg.set_u8(at + i, 0);
            }
        }
        self.cfg.set_u8(0x3c, 0);
        self.power_on_bar();
        self.remap();
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data.len() {
            1 | 2 | 4 => self.bar_read(offset, data),
            // 64-bit accesses are two 32-bit ones (the spec allows either half alone).
            8 => {
                let (lo, hi) = data.split_at_mut(4);
                self.bar_read(offset, lo);
                self.bar_read(offset + 4, hi);
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match data.len() {
            1 | 2 | 4 => self.bar_write(offset, data),
            8 => {
                self.bar_write(offset, &data[..4]);
                self.bar_write(offset + 4, &data[4..]);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::off;
    use super::super::msix::tests::FakeVectors;
    use super::super::QueueConfig;
    use super::*;
    use crate::devices::bus::lock;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Config(u32, Vec<u8>),
        FeaturesOk(u64),
        Start(Vec<QueueConfig>),
        Stop,
        Reset(u64),
    }

    struct Mock(Arc<Mutex<Vec<Call>>>, Arc<DeviceSignals>, bool);
    impl VirtioDeviceModel for Mock {
        fn write_config(&mut self, offset: u32, data: &[u8]) {
            lock(&self.0).push(Call::Config(offset, data.to_vec()));
        }
        fn features_ok(&mut self, f: u64) {
            lock(&self.0).push(Call::FeaturesOk(f));
        }
        fn start(&mut self, q: Vec<QueueConfig>) {
            lock(&self.0).push(Call::Start(q));
        }
        fn stop(&mut self) {
            lock(&self.0).push(Call::Stop);
        }
        fn reset(&mut self, seq: u64) {
            lock(&self.0).push(Call::Reset(seq));
            // The second flag says whether the mock completes resets at once.
            if self.2 {
                self.1.complete_reset(seq);
            }
        }
    }

    #[derive(Default)]
    struct Registrar(Mutex<Vec<(bool, u64)>>);
    impl IoEventRegistrar for Registrar {
        fn register(&self, _fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
            lock(&self.0).push((true, addr));
            Ok(())
        }
        fn unregister(&self, _fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
            lock(&self.0).push((false, addr));
            Ok(())
        }
    }

    const BASE: u64 = 0xc000_0000;
    const BACKEND: u64 = features::VERSION_1 | features::VHOST_USER_PROTOCOL_FEATURES | 1 << 34 | 1 << 9 | 1 << 28;

    struct Rig {
        dev: Arc<Mutex<VirtioPciDevice>>,
        calls: Arc<Mutex<Vec<Call>>>,
        ioev: Arc<Registrar>,
        vec_rec: Arc<Mutex<super::super::msix::tests::Record>>,
        signals: Arc<DeviceSignals>,
        kicks: Vec<EventFd>,
        window: MmioWindow,
    }

    fn rig(complete_resets: bool) -> Rig {
        let nq = 2;
        let (fake, vec_rec) = FakeVectors::new(nq + 1);
        let vfds = (0..=nq).map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")).collect();
        let signals = Arc::new(DeviceSignals::new(vfds));
        *lock(&signals.device_features) = Some(features::guest_offer(BACKEND));
        *lock(&signals.config) = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let calls = Arc::new(Mutex::new(Vec::new()));
        let kicks: Vec<EventFd> = (0..nq).map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")).collect();
        let ours = kicks.iter().map(|k| k.try_clone().expect("dup")).collect();
        let ioev = Arc::new(Registrar::default());
        let window = MmioWindow::new(BASE, 0x2000_0000);
        let spec = FunctionSpec {
            id: "vblk0".into(),
            device_id: 2,
            class: 0x0100,
            num_queues: nq,
            queue_size: 128,
            bar_address: BASE,
        };
        let dev = VirtioPciDevice::new(
            spec,
            window.clone(),
            ioev.clone(),
            MsixTable::new(Box::new(fake)),
            signals.clone(),
            Box::new(Mock(calls.clone(), signals.clone(), complete_resets)),
            kicks,
        )
        .expect("device");
        Rig { dev, calls, ioev, vec_rec, signals, kicks: ours, window }
    }

    impl Rig {
        fn cfg32(&self, at: usize) -> u32 {
            let v = lock(&self.dev).config_read(at / 4);
            v >> (8 * (at % 4))
        }
        fn cfg_write(&self, at: usize, data: &[u8]) {
            lock(&self.dev).config_write(at / 4, at % 4, data);
        }
        fn r(&self, addr: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            let mut w = self.window.clone();
            w.read(addr - BASE, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn w(&self, addr: u64, v: u64, len: usize) {
            let mut w = self.window.clone();
            w.write(addr - BASE, &v.to_le_bytes()[..len]);
        }
        fn common(&self, o: u64, v: u64, len: usize) {
            self.w(BASE + o, v, len)
        }
        fn calls(&self) -> Vec<Call> {
            std::mem::take(&mut *lock(&self.calls))
        }
    }

    #[test]
    fn a_guest_walking_the_capability_list_finds_every_region() {
        let r = rig(true);
        assert_eq!(r.cfg32(0), 0x1042_1af4);
        assert_eq!(r.cfg32(8) & 0xff, 1, "revision 1");
        assert_eq!(r.cfg32(8) >> 8, 0x01_0000, "class 01 subclass 00");
        assert_eq!(r.cfg32(0x2c), 0x1100_1af4);
        assert_eq!(r.cfg32(4) >> 16 & STATUS_CAP_LIST as u32, STATUS_CAP_LIST as u32);
        assert_eq!(r.cfg32(0x3c) >> 8 & 0xff, 0, "no INTx pin");
        let mut at = (r.cfg32(0x34) & 0xfc) as usize;
        let mut found = Vec::new();
        let mut guard = 0;
        while at != 0 {
            guard += 1;
            assert!(guard < 16, "capability list loops");
            let head = r.cfg32(at);
            let (id, next) = (head & 0xff, (head >> 8 & 0xfc) as usize);
            if id == u32::from(cap::VNDR) {
                let (len, kind) = (head >> 16 & 0xff, head >> 24);
                let bar = r.cfg32(at + 4) & 0xff;
                let (offset, length) = (r.cfg32(at + 8), r.cfg32(at + 12));
                found.push((kind, bar, offset, length, len));
                if kind == u32::from(cap::TYPE_NOTIFY) {
                    assert_eq!(r.cfg32(at + 16), 4, "notify_off_multiplier");
                }
            } else {
                assert_eq!(id, u32::from(cap::ID_MSIX));
                assert_eq!(head >> 16, 2, "3 vectors, off");
                assert_eq!(r.cfg32(at + 4), 0x4004, "table at BAR 4 + 0x4000");
                assert_eq!(r.cfg32(at + 8), 0x5004, "PBA at BAR 4 + 0x5000");
                found.push((0x11, 0, 0, 0, 12));
            }
            at = next;
        }
        assert_eq!(
            found,
            vec![
                (1, 4, 0x0000, 0x1000, 16),
                (2, 4, 0x3000, 0x1000, 20),
                (3, 4, 0x1000, 0x1000, 16),
                (4, 4, 0x2000, 0x1000, 16),
                (5, 0, 0, 0, 20),
                (0x11, 0, 0, 0, 12),
            ]
        );
    }

    #[test]
    fn bar_sizing_and_moving_take_the_ioeventfds_along() {
        let r = rig(true);
        assert_eq!(lock(&r.ioev.0).clone(), vec![(true, BASE + 0x3000), (true, BASE + 0x3004)]);
        assert_eq!(r.cfg32(BAR_REG), BASE as u32 | 4);
        assert_eq!(r.cfg32(BAR_REG + 4), 0);
        // Sizing (decoding off, as drivers do).
        r.cfg_write(COMMAND, &[0, 0]);
        assert_eq!(lock(&r.dev).bar_address(), None);
        r.cfg_write(BAR_REG, &[0xff; 4]);
        r.cfg_write(BAR_REG + 4, &[0xff; 4]);
        assert_eq!(r.cfg32(BAR_REG), 0xffff_8004, "32 KiB, 64-bit memory");
        assert_eq!(r.cfg32(BAR_REG + 4), 0xffff_ffff);
        // Other BARs are not implemented.
        r.cfg_write(0x10, &[0xff; 4]);
        assert_eq!(r.cfg32(0x10), 0);
        // Moved and decoding on again.
        let new = BASE + 0x10_0000;
        r.cfg_write(BAR_REG, &(new as u32).to_le_bytes());
        r.cfg_write(BAR_REG + 4, &[0; 4]);
        r.cfg_write(COMMAND, &[CMD_MEMORY as u8 | CMD_BUS_MASTER as u8, 0]);
        assert_eq!(lock(&r.dev).bar_address(), Some(new));
        assert_eq!(
            lock(&r.ioev.0).clone()[2..],
            [(false, BASE + 0x3000), (false, BASE + 0x3004), (true, new + 0x3000), (true, new + 0x3004)]
        );
        assert_eq!(r.r(new + off::NUMQ, 2), 2, "common cfg answers at the new address");
        assert_eq!(r.r(BASE + off::NUMQ, 2), 0xffff, "and no longer at the old one");
        // Above 4 GiB: refused (not decoded), back inside: decoded.
        r.cfg_write(BAR_REG + 4, &[1, 0, 0, 0]);
        assert_eq!(lock(&r.dev).bar_address(), None);
        r.cfg_write(BAR_REG + 4, &[0; 4]);
        assert_eq!(lock(&r.dev).bar_address(), Some(new));
        let info = lock(&r.dev).describe();
        assert_eq!(
            (info.class, info.class_desc, info.device, info.qdev_id.as_str()),
            (0x0100, Some("SCSI controller"), 0x1042, "vblk0")
        );
        assert_eq!(info.regions[0].address, new);
        assert!(info.regions[0].mem_type_64 && !info.regions[0].prefetch);
        // Machine reset: back where vmm-core put it.
        lock(&r.dev).reset();
        assert_eq!(lock(&r.dev).bar_address(), Some(BASE));
        assert_eq!(r.cfg32(COMMAND) & 0xffff, u32::from(CMD_MEMORY));
    }

    fn init_driver(r: &Rig, feats: u64) {
        r.common(off::STATUS, 1, 1);
        r.common(off::STATUS, 3, 1);
        r.common(off::GFSELECT, 0, 4);
        r.common(off::GF, feats & 0xffff_ffff, 4);
        r.common(off::GFSELECT, 1, 4);
        r.common(off::GF, feats >> 32, 4);
        r.common(off::STATUS, 0xb, 1);
    }

    #[test]
    fn features_are_masked_and_the_driver_lifecycle_reaches_the_model() {
        let r = rig(true);
        r.cfg_write(COMMAND, &[(CMD_MEMORY | CMD_BUS_MASTER) as u8, 0]);
        r.common(off::DFSELECT, 0, 4);
        let lo = r.r(BASE + off::DF, 4);
        r.common(off::DFSELECT, 1, 4);
        let hi = r.r(BASE + off::DF, 4);
        let offered = hi << 32 | lo;
        assert_eq!(offered, features::VERSION_1 | 1 << 9 | 1 << 28, "no protocol bit, no packed ring");
        init_driver(&r, features::VERSION_1 | 1 << 9);
        assert_eq!(r.r(BASE + off::STATUS, 1), 0xb);
        r.common(off::Q_SELECT, 1, 2);
        r.common(off::Q_SIZE, 64, 2);
        r.common(off::Q_MSIX, 1, 2);
        // A 64-bit write of the descriptor address is two 32-bit ones.
        r.common(off::Q_DESCLO, 0x1_0000_4000, 8);
        r.common(off::Q_AVAILLO, 0x5000, 4);
        r.common(off::Q_USEDLO, 0x6000, 4);
        r.common(off::Q_ENABLE, 1, 2);
        r.common(off::MSIX, 0, 2);
        r.common(off::STATUS, 0xf, 1);
        assert_eq!(
            r.calls(),
            vec![
                Call::FeaturesOk(features::VERSION_1 | 1 << 9),
                Call::Start(vec![QueueConfig {
                    index: 1,
                    size: 64,
                    desc: 0x1_0000_4000,
                    avail: 0x5000,
                    used: 0x6000,
                    vector: 1
                }]),
            ]
        );
        assert_eq!(r.signals.config_vector.load(Ordering::SeqCst), 0);
        // Bus master off stops the device and takes DRIVER_OK away.
        r.cfg_write(COMMAND, &[CMD_MEMORY as u8, 0]);
        assert_eq!(r.calls(), vec![Call::Stop]);
        assert_eq!(r.r(BASE + off::STATUS, 1), 0xb);
        // Reset: the model is told, status reads 0 (the mock completes at once).
        r.common(off::STATUS, 0, 1);
        assert_eq!(r.calls(), vec![Call::Reset(1)]);
        assert_eq!(r.r(BASE + off::STATUS, 1), 0);
        r.common(off::Q_SELECT, 1, 2);
        assert_eq!(r.r(BASE + off::Q_ENABLE, 2), 0);
        assert_eq!(r.r(BASE + off::MSIX, 2), 0xffff);
    }

    #[test]
    fn driver_ok_waits_for_bus_master_and_status_waits_for_the_reset() {
        let r = rig(false);
        init_driver(&r, features::VERSION_1);
        r.common(off::Q_ENABLE, 1, 2);
        r.common(off::STATUS, 0xf, 1);
        assert_eq!(r.calls(), vec![Call::FeaturesOk(features::VERSION_1)], "no bus master: not started");
        r.cfg_write(COMMAND, &[(CMD_MEMORY | CMD_BUS_MASTER) as u8, 0]);
        assert!(matches!(r.calls().as_slice(), [Call::Start(q)] if q.len() == 1 && q[0].size == 128));
        r.common(off::STATUS, 0, 1);
        assert_eq!(r.calls(), vec![Call::Reset(1)]);
        assert_eq!(r.r(BASE + off::STATUS, 1), 0xf, "the rings are not stopped yet");
        r.signals.complete_reset(1);
        assert_eq!(r.r(BASE + off::STATUS, 1), 0);
        // A driver that resets a device showing 0 and goes on at once sees its own writes,
        // even while the model is still resetting.
        r.common(off::STATUS, 0, 1);
        r.common(off::STATUS, 0, 1);
        r.common(off::STATUS, 1, 1);
        assert!(r.signals.reset_pending());
        assert_eq!(r.r(BASE + off::STATUS, 1), 1);
    }

    #[test]
    fn config_reads_come_from_the_cache_and_changes_bump_the_generation() {
        let r = rig(true);
        r.cfg_write(COMMAND, &[(CMD_MEMORY | CMD_BUS_MASTER) as u8, 0]);
        assert_eq!(r.r(BASE + 0x2000, 4), 0x0403_0201);
        assert_eq!(r.r(BASE + 0x2006, 2), 0x0807);
        assert_eq!(r.r(BASE + 0x2007, 2), 0xffff, "past the end");
        r.w(BASE + 0x2004, 0xaa, 1);
        assert_eq!(r.calls(), vec![Call::Config(4, vec![0xaa])]);
        assert_eq!(r.r(BASE + 0x2004, 1), 0xaa);
        let g0 = r.r(BASE + off::CFGGENERATION, 1);
        // Config vector 2; enable MSI-X and unmask vector 2.
        r.common(off::MSIX, 2, 2);
        r.cfg_write(cap::MSIX + 2, &(0x8000u16).to_le_bytes());
        r.w(BASE + 0x4000 + 2 * 16 + 12, 0, 4);
        r.signals.config_changed(Some(vec![9; 8]));
        assert_eq!(r.r(BASE + off::CFGGENERATION, 1), (g0 + 1) & 0xff);
        assert_eq!(r.r(BASE + 0x2000, 1), 9);
        assert_eq!(r.signals.vectors[2].read().expect("config vector signalled"), 1);
        assert_eq!(r.r(BASE + 0x1000, 1), 2, "ISR bit 1");
        assert_eq!(r.r(BASE + 0x1000, 1), 0, "read clears");
    }

    #[test]
    fn msix_through_the_bar_and_pci_cfg_window() {
        let r = rig(true);
        r.cfg_write(COMMAND, &[(CMD_MEMORY | CMD_BUS_MASTER) as u8, 0]);
        r.w(BASE + 0x4010, 0xfee0_1000, 4);
        r.w(BASE + 0x4018, 0x45, 4);
        assert_eq!(lock(&r.vec_rec).messages.last(), Some(&(1, 0xfee0_1000, 0, 0x45)));
        assert_eq!(r.r(BASE + 0x401c, 4), 1, "masked at reset");
        r.cfg_write(cap::MSIX + 3, &[0x80]);
        assert_eq!(r.cfg32(cap::MSIX) >> 16, 0x8002);
        r.w(BASE + 0x401c, 0, 4);
        assert_eq!(lock(&r.vec_rec).masked, vec![true, false, true]);
        lock(&r.vec_rec).pending[0] = true;
        assert_eq!(r.r(BASE + 0x5000, 4), 1);
        // PCI_CFG: read num_queues through config space.
        r.cfg_write(cap::PCI_CFG + 4, &[4]);
        r.cfg_write(cap::PCI_CFG + 8, &(off::NUMQ as u32).to_le_bytes());
        r.cfg_write(cap::PCI_CFG + 12, &2u32.to_le_bytes());
        assert_eq!(r.cfg32(PCI_CFG_DATA) & 0xffff, 2);
        // ... and write queue_select through it.
        r.cfg_write(cap::PCI_CFG + 8, &(off::Q_SELECT as u32).to_le_bytes());
        r.cfg_write(PCI_CFG_DATA, &1u16.to_le_bytes());
        assert_eq!(r.r(BASE + off::Q_SELECT, 2), 1);
        // A kick through the MMIO path signals the queue's eventfd.
        r.w(BASE + 0x3004, 1, 2);
        assert_eq!(r.kicks[1].read().expect("kicked"), 1);
        assert!(r.kicks[0].read().is_err(), "queue 0 untouched");
        // Machine reset clears the table and the control bits.
        lock(&r.dev).reset();
        assert_eq!(r.cfg32(cap::MSIX) >> 16, 2);
        assert_eq!(r.r(BASE + 0x4010, 4), 0);
        assert_eq!(lock(&r.vec_rec).pending, vec![false; 3]);
        assert!(matches!(r.calls().last(), Some(Call::Reset(_))));
    }
}
