//! The virtio-pci *modern* transport (virtio 1.2 section 4.1) with MSI-X, as QEMU's
//! `disable-legacy=on` virtio-pci presents it, for devices whose model lives elsewhere (a
//! vhost-user backend, see [`crate::vhost_user`]). The transport owns what the guest sees on the
//! PCI side: configuration space with the virtio capabilities, one BAR, the common configuration
//! state machine, ISR, MSI-X table and PBA. Everything else goes through [`VirtioDeviceModel`].
//!
//! ## The function
//!
//! Vendor 0x1af4, device 0x1040 + virtio device id, revision 1, subsystem 0x1af4:0x1100 (QEMU's
//! defaults for a modern-only function), class per device (virtio-blk 0x0100, balloon 0x00ff,
//! virtio-net 0x0200).
//! Interrupt pin 0: there is no INTx; the driver must use MSI-X (Linux and the test guest do).
//!
//! ## BAR 4 (64-bit memory, not prefetchable, 32 KiB), assigned by vmm-core
//!
//! | offset  | size   | region                                               |
//! |---------|--------|------------------------------------------------------|
//! | 0x0000  | 0x1000 | COMMON_CFG                                           |
//! | 0x1000  | 0x1000 | ISR (byte 0; a read returns and clears it)           |
//! | 0x2000  | 0x1000 | DEVICE_CFG (the backend's config space, cached)      |
//! | 0x3000  | 0x1000 | NOTIFY: queue n at n * 4 (notify_off_multiplier 4)   |
//! | 0x4000  | 0x1000 | MSI-X table (16 bytes per vector; num_queues + 1, or `vectors=`) |
//! | 0x5000  | 0x1000 | MSI-X PBA                                            |
//!
//! The offsets of COMMON/ISR/DEVICE/NOTIFY are QEMU's; QEMU puts the MSI-X table in BAR 1, this
//! transport keeps it in the same BAR. vmm-core places each BAR in the 32-bit PCI window
//! ([`crate::layout::PCI_MMIO32_START`]) and enables memory decoding at power-on, as firmware
//! would. The guest may size it (all-ones writes) and move it: the MMIO range and the per-queue
//! KVM ioeventfds move with it. A BAR that is not entirely inside the 32-bit window (above 4 GiB,
//! or half-written) is not decoded until it is again (a documented refusal, logged once).
//!
//! ## Capabilities (config space offsets)
//!
//! 0x40 COMMON_CFG, 0x50 NOTIFY, 0x64 ISR, 0x74 DEVICE_CFG, 0x84 PCI_CFG (the window into the
//! BAR through config space), 0x98 MSI-X.
//!
//! ## Corner cases, as QEMU's virtio-pci handles them
//!
//! - `queue_select` beyond `num_queues` selects nothing: its fields read 0, writes are dropped.
//! - `queue_size` takes a power of two from 1 to the maximum; other values are ignored.
//! - `queue_enable` takes only 1; a queue's fields are frozen while it is enabled.
//! - `*_msix_vector` writes of a vector the table does not have read back 0xffff (NO_VECTOR).
//! - `FEATURES_OK` is refused (reads back clear) when the driver's features are not a subset of
//!   the offer or lack VERSION_1.
//! - Writing 0 to `device_status` resets the device; status reads back its old value until the
//!   model has stopped the rings, then 0 (virtio 1.2 4.1.4.3.2: the driver waits for 0).
//! - Clearing bus-master while DRIVER_OK stops the device and clears DRIVER_OK (QEMU does the
//!   same); MSI-X messages are held pending while bus-master is off.
//! - Reading `device_feature` before any backend was ever connected gives only VERSION_1 (the
//!   backend's features are unknown): a driver that initialises then gets a minimal device.

pub mod common;
mod device;
mod msix;

pub use common::{CommonCfg, QueueState, StatusChange};
pub use device::{bar, cap, FunctionSpec, IoEventRegistrar, VirtioPciDevice, VirtioPciError, BAR_INDEX, BAR_SIZE};
pub use msix::{MsiVectors, MsixTable, RouterVectors};

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Feature bits the transport itself knows.
pub mod features {
    pub const VERSION_1: u64 = 1 << 32;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// vhost-user's own bit (VHOST_USER_F_PROTOCOL_FEATURES); never shown to the guest.
    pub const VHOST_USER_PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const IN_ORDER: u64 = 1 << 35;
    pub const ORDER_PLATFORM: u64 = 1 << 36;
    /// Device-specific bits (0..=23) and the reserved range 50..=127 are the device's own.
    pub const DEVICE_SPECIFIC: u64 = (1 << 24) - 1;

    /// What the guest is offered of `backend` features: the device-specific bits, and of the
    /// transport bits only those this transport honours (no packed ring, ACCESS_PLATFORM,
    /// NOTIFICATION_DATA, RING_RESET, SR-IOV, admin queues; never the vhost-user protocol bit).
    pub fn guest_offer(backend: u64) -> u64 {
        let transport = VERSION_1 | RING_INDIRECT_DESC | RING_EVENT_IDX | IN_ORDER | ORDER_PLATFORM;
        backend & (DEVICE_SPECIFIC | transport)
    }
}

/// The value of a vector field that names no vector.
pub const NO_VECTOR: u16 = 0xffff;

/// One virtqueue as the driver configured it, handed to the model at DRIVER_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// MSI-X vector for used-buffer notifications, or [`NO_VECTOR`].
    pub vector: u16,
}

/// What the transport and the device model share without locks on the device: the model's
/// worker thread raises config interrupts and completes resets through it.
pub struct DeviceSignals {
    /// ISR status: bit 0 queue interrupt, bit 1 configuration change. A read clears it.
    pub isr: AtomicU8,
    /// `config_generation`: bumped whenever the device configuration changes.
    pub generation: AtomicU8,
    /// The driver's `config_msix_vector`.
    pub config_vector: AtomicU16,
    /// The device cannot go on with what the driver negotiated (DEVICE_NEEDS_RESET).
    pub needs_reset: AtomicBool,
    /// Resets the transport asked for / the model finished (status reads 0 once equal).
    pub resets_requested: AtomicU64,
    pub resets_done: AtomicU64,
    /// Woken at every completed reset, for [`DeviceSignals::wait_reset`].
    reset_lock: Mutex<()>,
    reset_done: Condvar,
    /// The device configuration as the backend last reported it (reads never wait on it).
    pub config: Mutex<Vec<u8>>,
    /// Features the backend offers (as offered to the guest), once known.
    pub device_features: Mutex<Option<u64>>,
    /// One eventfd per MSI-X vector (the irqfd behind it): a signal raises the vector.
    pub vectors: Vec<EventFd>,
}

impl DeviceSignals {
    pub fn new(vectors: Vec<EventFd>) -> Self {
        DeviceSignals {
            isr: AtomicU8::new(0),
            generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            needs_reset: AtomicBool::new(false),
            resets_requested: AtomicU64::new(0),
            resets_done: AtomicU64::new(0),
            reset_lock: Mutex::new(()),
            reset_done: Condvar::new(),
            config: Mutex::new(Vec::new()),
            device_features: Mutex::new(None),
            vectors,
        }
    }

    /// A configuration change: new bytes (if any), generation bumped, ISR bit 1, and the config
    /// vector signalled (when the driver assigned one).
    pub fn config_changed(&self, new_config: Option<Vec<u8>>) {
        if let Some(bytes) = new_config {
            *crate::devices::bus::lock(&self.config) = bytes;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.isr.fetch_or(2, Ordering::SeqCst);
        self.signal_vector(self.config_vector.load(Ordering::SeqCst));
    }

    /// Raises MSI-X vector `v` (nothing for NO_VECTOR or a vector the table does not have).
    pub fn signal_vector(&self, v: u16) {
        if let Some(fd) = self.vectors.get(v as usize) {
            if let Err(e) = fd.write(1) {
                tracing::warn!(vector = v, error = %e, "signalling an MSI-X vector");
            }
        }
    }

    /// A duplicate of vector `v`'s eventfd, to hand to a backend as a call fd.
    pub fn vector_fd(&self, v: u16) -> Option<EventFd> {
        self.vectors.get(v as usize).and_then(|fd| fd.try_clone().ok())
    }

    pub fn reset_pending(&self) -> bool {
        self.resets_requested.load(Ordering::SeqCst) != self.resets_done.load(Ordering::SeqCst)
    }

    /// The model finished the reset with sequence number `seq`.
    pub fn complete_reset(&self, seq: u64) {
        // Under the lock, so a waiter between its check and its wait cannot miss the wake-up.
        let _g = crate::devices::bus::lock(&self.reset_lock);
        self.resets_done.fetch_max(seq, Ordering::SeqCst);
        self.reset_done.notify_all();
    }

    /// Waits until every requested reset is complete (the model stopped the rings), at most
    /// `timeout`; false when it is still pending then.
    pub fn wait_reset(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = crate::devices::bus::lock(&self.reset_lock);
        while self.reset_pending() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = match self.reset_done.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

/// The device model behind the transport: the frontend of a vhost-user backend in the machine,
/// a mock in unit tests. Calls come from vCPU threads with the device locked, so none may
/// block on a backend: they hand work to the model's own thread.
pub trait VirtioDeviceModel: Send {
    /// The driver wrote device configuration bytes (the cache in [`DeviceSignals`] is already
    /// updated by the transport).
    fn write_config(&mut self, offset: u32, data: &[u8]);
    /// FEATURES_OK with these (validated) driver features.
    fn features_ok(&mut self, features: u64);
    /// The device goes live (DRIVER_OK with bus-master on): start these enabled queues. Each
    /// kick eventfd is `kicks[index]`, already registered as the notify address's ioeventfd.
    fn start(&mut self, queues: Vec<QueueConfig>);
    /// Stop the rings but keep the negotiated features (bus-master cleared).
    fn stop(&mut self);
    /// Device reset number `seq`: stop the rings, forget the negotiation, then call
    /// [`DeviceSignals::complete_reset`] with `seq`.
    fn reset(&mut self, seq: u64);
}
