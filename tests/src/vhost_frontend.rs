//! Playing a virtio-pci guest driver from the test, through vmm-core's host-side API: config
//! space through ECAM, BAR accesses through the MMIO bus ([`vmm_core::Vm::mmio_read`]), split
//! virtqueues laid out in guest RAM ([`vmm_core::Vm::guest_memory`]). Also a tiny vhost-user
//! backend that sends CONFIG_CHANGE_MSG on demand.

use crate::machine::{guest_config, TempDir};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_config::{MachineConfig, VhostUserDevice, VirtioKind};
use vm_memory::{Bytes, GuestAddress};
use vmm_core::Vm;

pub const ECAM: u64 = 0xe000_0000;

/// The test guest's machine (1 vCPU, 128 MiB), paused, with one vhost-user function of `kind`
/// (one queue of 128 entries) on `socket`, in PCI slot `slot`.
pub fn machine_with_vhost_user(dir: &TempDir, socket: &Path, kind: VirtioKind, slot: u8) -> Vm {
    let cfg = MachineConfig {
        serial: None,
        start_paused: true,
        vhost_user_devices: vec![VhostUserDevice {
            id: "vblk0".into(),
            kind,
            socket: socket.to_path_buf(),
            num_queues: 1,
            queue_size: 128,
            pci_slot: Some(slot),
            msix_vectors: None,
        }],
        ..guest_config(dir, 1, 128)
    };
    Vm::new(cfg).unwrap_or_else(|e| panic!("building the machine: {e}"))
}

/// An enabled driver's device brought up as the tests use it: VERSION_1 only, queue 0 (128
/// entries at `rings`) on vector 0, config vector 1, DRIVER_OK.
pub fn start_queue0(d: &Driver, rings: u64) -> Queue {
    let st = d.negotiate(VERSION_1);
    assert_ne!(st & FEATURES_OK, 0, "FEATURES_OK refused ({st:#x})");
    let q = d.setup_queue(0, 128, rings, 0);
    d.common_write(common::MSIX, 1, 2);
    d.driver_ok();
    q
}

/// Device status bits, feature bits and COMMON_CFG offsets: vmm-core's own definitions.
pub use vmm_core::virtio_pci::common::off as common;
pub use vmm_core::virtio_pci::features::VERSION_1;
pub use vmm_core::virtio_pci::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};

/// Where the driver found each region, as absolute guest-physical addresses.
#[derive(Debug, Clone, Copy)]
pub struct Regions {
    pub common: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub isr: u64,
    pub device: u64,
    pub msix_table: u64,
    pub msix_pba: u64,
    pub msix_cap: u64,
}

/// A virtio-pci function at bus 0 `slot`, driven from the host.
pub struct Driver {
    pub vm: Vm,
    pub slot: u8,
    pub r: Regions,
}

impl Driver {
    fn cfg_addr(slot: u8, off: u64) -> u64 {
        ECAM | (u64::from(slot) << 15) | off
    }

    pub fn cfg_read32(vm: &Vm, slot: u8, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(vm.mmio_read(Self::cfg_addr(slot, off), &mut b), "ECAM is mapped");
        u32::from_le_bytes(b)
    }

    pub fn cfg_write(&self, off: u64, data: &[u8]) {
        assert!(self.vm.mmio_write(Self::cfg_addr(self.slot, off), data));
    }

    /// Finds the function's regions by walking its capability list, as a driver does.
    pub fn probe(vm: &Vm, slot: u8) -> Driver {
        let id = Self::cfg_read32(vm, slot, 0);
        assert_eq!(id & 0xffff, 0x1af4, "slot {slot}: not a virtio function ({id:#x})");
        let bar = |i: u32| -> u64 {
            let lo = Self::cfg_read32(vm, slot, 0x10 + 4 * u64::from(i));
            assert_eq!(lo & 0x7, 0x4, "BAR {i} is 64-bit memory");
            let hi = Self::cfg_read32(vm, slot, 0x14 + 4 * u64::from(i));
            (u64::from(hi) << 32) | u64::from(lo & !0xf)
        };
        let mut r = Regions {
            common: 0,
            notify: 0,
            notify_mult: 0,
            isr: 0,
            device: 0,
            msix_table: 0,
            msix_pba: 0,
            msix_cap: 0,
        };
        let mut at = u64::from(Self::cfg_read32(vm, slot, 0x34) & 0xfc);
        let mut n = 0;
        while at != 0 {
            n += 1;
            assert!(n < 32, "capability list loops");
            let head = Self::cfg_read32(vm, slot, at);
            match head & 0xff {
                0x09 => {
                    let kind = head >> 24;
                    let b = Self::cfg_read32(vm, slot, at + 4) & 0xff;
                    let off = u64::from(Self::cfg_read32(vm, slot, at + 8));
                    if kind == 5 {
                        // PCI_CFG: no region of its own.
                    } else {
                        let base = bar(b) + off;
                        match kind {
                            1 => r.common = base,
                            2 => {
                                r.notify = base;
                                r.notify_mult = Self::cfg_read32(vm, slot, at + 16);
                            }
                            3 => r.isr = base,
                            4 => r.device = base,
                            _ => {}
                        }
                    }
                }
                0x11 => {
                    r.msix_cap = at;
                    let t = Self::cfg_read32(vm, slot, at + 4);
                    let p = Self::cfg_read32(vm, slot, at + 8);
                    r.msix_table = bar(t & 7) + u64::from(t & !7);
                    r.msix_pba = bar(p & 7) + u64::from(p & !7);
                }
                _ => {}
            }
            at = u64::from(head >> 8 & 0xfc);
        }
        assert!(r.common != 0 && r.notify != 0 && r.isr != 0 && r.device != 0 && r.msix_table != 0, "{r:?}");
        Driver { vm: vm.clone(), slot, r }
    }

    pub fn read(&self, addr: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.vm.mmio_read(addr, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    pub fn write(&self, addr: u64, v: u64, len: usize) {
        assert!(self.vm.mmio_write(addr, &v.to_le_bytes()[..len]), "nothing mapped at {addr:#x}");
    }

    pub fn common_read(&self, off: u64, len: usize) -> u64 {
        self.read(self.r.common + off, len)
    }

    pub fn common_write(&self, off: u64, v: u64, len: usize) {
        self.write(self.r.common + off, v, len)
    }

    pub fn status(&self) -> u8 {
        self.common_read(common::STATUS, 1) as u8
    }

    pub fn device_features(&self) -> u64 {
        self.common_write(common::DFSELECT, 0, 4);
        let lo = self.common_read(common::DF, 4);
        self.common_write(common::DFSELECT, 1, 4);
        let hi = self.common_read(common::DF, 4);
        hi << 32 | lo
    }

    /// Memory decoding and bus mastering on; MSI-X on with every vector masked (signals then
    /// show in the PBA, which is how the tests see the backend's calls).
    pub fn enable(&self) {
        self.cfg_write(0x04, &[0x06, 0x00]);
        self.cfg_write(self.r.msix_cap + 3, &[0x80]);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
    pub fn negotiate(&self, features: u64) -> u8 {
        self.common_write(common::STATUS, 0, 1);
        wait_until("status 0 after reset", || self.status() == 0);
        self.common_write(common::STATUS, u64::from(ACKNOWLEDGE), 1);
        self.common_write(common::STATUS, u64::from(ACKNOWLEDGE | DRIVER), 1);
        self.common_write(common::GFSELECT, 0, 4);
        self.common_write(common::GF, features & 0xffff_ffff, 4);
        self.common_write(common::GFSELECT, 1, 4);
        self.common_write(common::GF, features >> 32, 4);
        self.common_write(common::STATUS, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK), 1);
        self.status()
    }

    /// Configures queue `q` of `size` entries with its rings at `base` in guest RAM (zeroed),
    /// vector `vector`, and enables it.
    pub fn setup_queue(&self, q: u16, size: u16, base: u64, vector: u16) -> Queue {
        let mem = &self.vm.guest_memory().mem;
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        let total = used + 6 + 8 * u64::from(size) - base;
        mem.write_slice(&vec![0u8; total as usize], GuestAddress(base)).expect("zeroing the rings");
        self.common_write(common::Q_SELECT, u64::from(q), 2);
        self.common_write(common::Q_SIZE, u64::from(size), 2);
        self.common_write(common::Q_MSIX, u64::from(vector), 2);
        assert_eq!(self.common_read(common::Q_MSIX, 2), u64::from(vector), "vector taken");
        self.common_write(common::Q_DESCLO, desc, 8);
        self.common_write(common::Q_AVAILLO, avail, 8);
        self.common_write(common::Q_USEDLO, used, 8);
        let noff = self.common_read(common::Q_NOFF, 2);
        self.common_write(common::Q_ENABLE, 1, 2);
        Queue {
            vm: self.vm.clone(),
            size,
            desc,
            avail,
            used,
            notify: self.r.notify + noff * u64::from(self.r.notify_mult),
            index: q,
            next_avail: 0,
            next_desc: 0,
        }
    }

    pub fn driver_ok(&self) {
        let s = self.status();
        self.common_write(common::STATUS, u64::from(s | DRIVER_OK), 1);
    }

    /// Whether MSI-X vector `v` has a held (pending) message.
    pub fn pending(&self, v: u16) -> bool {
        let word = self.read(self.r.msix_pba + u64::from(v / 32) * 4, 4);
        word & (1 << (v % 32)) != 0
    }

    pub fn config_read(&self, off: u64, len: usize) -> u64 {
        self.read(self.r.device + off, len)
    }
}

/// A split virtqueue the test fills.
pub struct Queue {
    vm: Vm,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub notify: u64,
    pub index: u16,
    next_avail: u16,
    next_desc: u16,
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

impl Queue {
    /// Places a chain of (address, length, device-writable) buffers and publishes it (without a
    /// kick); returns its head.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let mem = &self.vm.guest_memory().mem;
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let at = self.desc + 16 * u64::from(d);
            mem.write_obj(addr, GuestAddress(at)).expect("desc addr");
            mem.write_obj(len, GuestAddress(at + 8)).expect("desc len");
            mem.write_obj(flags, GuestAddress(at + 12)).expect("desc flags");
            mem.write_obj(self.next_desc, GuestAddress(at + 14)).expect("desc next");
        }
        let slot = self.avail + 4 + 2 * u64::from(self.next_avail % self.size);
        mem.write_obj(head, GuestAddress(slot)).expect("avail ring");
        self.next_avail = self.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.next_avail, GuestAddress(self.avail + 2)).expect("avail idx");
        head
    }

    /// Writes the notify address as a driver does.
    pub fn kick(&self) {
        assert!(self.vm.mmio_write(self.notify, &self.index.to_le_bytes()), "notify not mapped");
    }

    pub fn used_idx(&self) -> u16 {
        self.vm.guest_memory().mem.read_obj(GuestAddress(self.used + 2)).expect("used idx")
    }

    pub fn published(&self) -> u16 {
        self.next_avail
    }

    /// Waits (bounded) until the used idx reaches `n`.
    pub fn wait_used(&self, n: u16, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let u = self.used_idx();
            if u.wrapping_sub(n) < 0x8000 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("used idx {u}, waited for {n}"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Polls `f` for up to 10 s.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// virtio-blk request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;

/// A virtio-blk request laid out at `at` in guest RAM: header (16 bytes), data, status byte.
/// Returns the buffers for [`Queue::add`] and the status byte's address.
pub fn blk_request(vm: &Vm, at: u64, kind: u32, sector: u64, data: &[u8]) -> (Vec<(u64, u32, bool)>, u64) {
    let mem = &vm.guest_memory().mem;
    mem.write_obj(kind, GuestAddress(at)).expect("type");
    mem.write_obj(0u32, GuestAddress(at + 4)).expect("reserved");
    mem.write_obj(sector, GuestAddress(at + 8)).expect("sector");
    let data_at = at + 16;
    mem.write_slice(data, GuestAddress(data_at)).expect("data");
    let status = data_at + data.len() as u64;
    mem.write_obj(0xffu8, GuestAddress(status)).expect("status");
    let bufs = vec![(at, 16, false), (data_at, data.len() as u32, kind == VIRTIO_BLK_T_IN), (status, 1, true)];
    (bufs, status)
}

pub mod config_backend {
    //! A vhost-user backend with one queue and a config space the test changes, announcing each
    //! change with CONFIG_CHANGE_MSG (the patched vhost crate's `Backend::handle_config_change`).

    use super::*;
    use std::path::Path;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::{Backend, Listener, VhostUserFrontendReqHandler};
    use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

    #[derive(Clone)]
    pub struct ConfigBackend {
        pub config: Arc<Mutex<Vec<u8>>>,
        pub channel: Arc<Mutex<Option<Backend>>>,
        exit: Arc<(EventConsumer, EventNotifier)>,
    }

    impl ConfigBackend {
        pub fn new(config: Vec<u8>) -> ConfigBackend {
            let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK).expect("exit event");
            ConfigBackend { config: Arc::new(Mutex::new(config)), channel: Default::default(), exit: Arc::new(exit) }
        }

        /// Changes the config and tells the frontend; Err when no channel is set up yet.
        pub fn change(&self, config: Vec<u8>) -> Result<(), String> {
            *self.config.lock().expect("config") = config;
            let ch = self.channel.lock().expect("channel");
            let b = ch.as_ref().ok_or("no backend-request channel yet")?;
            b.handle_config_change().map(|_| ()).map_err(|e| e.to_string())
        }
    }

    impl VhostUserBackend for ConfigBackend {
        type Bitmap = ();
        type Vring = VringRwLock;

        fn num_queues(&self) -> usize {
            1
        }
        fn max_queue_size(&self) -> usize {
            256
        }
        fn features(&self) -> u64 {
            VERSION_1 | vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
        }
        fn set_event_idx(&self, _enabled: bool) {}
        fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
            let c = self.config.lock().expect("config");
            (offset..offset + size).map(|i| c.get(i as usize).copied().unwrap_or(0)).collect()
        }
        fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
            let mut c = self.config.lock().expect("config");
            for (i, b) in buf.iter().enumerate() {
                if let Some(x) = c.get_mut(offset as usize + i) {
                    *x = *b;
                }
            }
            Ok(())
        }
        fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
            Ok(())
        }
        fn set_backend_req_fd(&self, backend: Backend) {
            *self.channel.lock().expect("channel") = Some(backend);
        }
        fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
            Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
        }
        fn handle_event(
            &self,
            _ev: u16,
            _set: EventSet,
            _vrings: &[VringRwLock],
            _thread: usize,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Serves one frontend connection on `path` on a thread.
    pub fn serve(path: &Path, backend: ConfigBackend) -> std::thread::JoinHandle<()> {
        let mut listener = Listener::new(path, true).expect("listening");
        std::thread::spawn(move || {
            let mut d =
                VhostUserDaemon::new("config-backend".into(), backend, GuestMemoryAtomic::new(GuestMemoryMmap::new()))
                    .expect("daemon");
            if d.start(&mut listener).is_ok() {
                let _ = d.wait();
            }
        })
    }
}
