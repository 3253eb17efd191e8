//! vmm-core's vhost-user frontend: one per virtio-pci function whose device model lives in a
//! backend daemon (blockd, balloond, any vhost-user backend). The data path never enters
//! vmm-core: each queue's kick is the KVM ioeventfd on its notify address, each call fd is the
//! irqfd eventfd of the queue's MSI-X vector.
//!
//! ## Lifecycle
//!
//! A worker thread per device owns the connection ([`worker`]). The transport's requests
//! (FEATURES_OK, DRIVER_OK, config writes, reset) are posted to its [`mailbox`] and never wait
//! on the backend, so a vCPU is never blocked by one; the mailbox coalesces (config writes by
//! the bytes they cover, a stop with the start before it, everything a reset undoes) and is
//! capped, so a guest hammering registers while the backend is slow cannot grow it without
//! limit. On connect the worker sends SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ,
//! REPLY_ACK, CONFIG, BACKEND_REQ, RESET_DEVICE, INFLIGHT_SHMFD where offered; NEED_REPLY on
//! every message once REPLY_ACK is on), GET_QUEUE_NUM, SET_BACKEND_REQ_FD, SET_MEM_TABLE (the
//! guest-RAM memfd regions; the memfd is sealed against shrinking and growing) and GET_CONFIG
//! (cached: device-config reads are answered from the cache, also while no backend is there).
//! At FEATURES_OK: SET_FEATURES (the driver's features plus the vhost-user protocol bit). At
//! DRIVER_OK: each ring is checked whole against guest RAM (descriptor table 16 * size, avail
//! ring 6 + 2 * size, used ring 6 + 8 * size bytes, each inside one region; otherwise
//! DEVICE_NEEDS_RESET and no ring starts); with INFLIGHT_SHMFD, GET_INFLIGHT_FD (num_queues,
//! the device's maximum queue size) the first time, then SET_INFLIGHT_FD; then per enabled
//! queue SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (vmm-core's own virtual addresses),
//! SET_VRING_KICK, SET_VRING_CALL (none for a queue without a vector), SET_VRING_ERR,
//! SET_VRING_ENABLE; and then every started queue's kick eventfd is written and every queue's
//! vector signalled once. A driver stop (bus-master cleared) stops the rings with
//! GET_VRING_BASE and keeps each reply as the ring's base for the next start. A device reset
//! stops the rings, sends RESET_DEVICE when negotiated, and drops the inflight region (the
//! next start gets a new one, as QEMU's vhost-user-blk does); the transport shows the old
//! status until that is done, and a machine reset (`system_reset`, a guest reset) waits for it,
//! at most 5 s, before guest RAM is reloaded and the vCPUs resume. CONFIG_CHANGE_MSG on the
//! backend-request channel re-reads the config, bumps `config_generation`, sets ISR bit 1 and
//! signals the config vector. A signal on a running ring's error eventfd (the backend found
//! the ring broken, e.g. an avail index more than a queue size ahead) sets
//! DEVICE_NEEDS_RESET with a config interrupt.
//!
//! ## Reconnect
//!
//! A backend absent at start or gone later never takes vmm-core down: the PCI function stays,
//! the guest's kicks wait in the ioeventfds, and the worker reconnects: at once when the
//! socket appears (inotify on the socket's directory, then retries 2 ms apart for the moment
//! between bind() and listen()), otherwise every 50 ms doubling to 1 s, sleeping in poll in
//! between (one info line per outage, one when it is back). Measured over the mock backend, a
//! restarted backend has both rings started about 1 ms after it listens (under 20 ms on a
//! loaded machine). A new connection replays everything: the handshake, SET_FEATURES, the
//! driver's config writes (after its GET_CONFIG), SET_INFLIGHT_FD with the region the first
//! backend made (kept across reconnects until a reset), and the rings. Each ring's base is
//! the one a driver stop saved if there is one; else 0 if no backend has had the ring since the
//! reset; else the used ring's idx read from guest memory. A backend with inflight tracking
//! (blockd, balloond on the backend kit) recomputes the position from its region and resubmits
//! exactly what the dead one took and did not complete, in the spec's order, whatever order
//! the dead one completed in. A backend without it runs again what the dead one took but never
//! completed (safe for block rewrites and balloon), and if the dead one completed out of order,
//! a request may complete twice or not at all (QEMU without inflight has the same limit). The
//! kick and vector signal after every start wake both sides: a driver the old backend told not
//! to notify (VRING_USED_F_NO_NOTIFY, or its avail event index) does not kick the new backend,
//! and completions the old one made just before dying may not have been signalled.
//! A new backend that lacks a feature the driver negotiated sets DEVICE_NEEDS_RESET.

pub mod backend_req;
pub mod mailbox;
#[cfg(test)]
mod mock;
pub mod session;
pub mod socket_watch;
#[cfg(test)]
mod tests;
pub mod worker;

use crate::devices::bus::{lock, MmioWindow};
use crate::irq::{IrqError, SharedIrqRouter};
use crate::virtio_pci::{
    DeviceSignals, FunctionSpec, IoEventRegistrar, MsixTable, QueueConfig, RouterVectors, VirtioDeviceModel,
    VirtioPciDevice, VirtioPciError,
};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vm_config::{VhostUserDevice, VirtioKind};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use mailbox::Mailbox;
use worker::{Command, Worker};

/// What the frontend needs to know about its device.
#[derive(Debug, Clone)]
pub struct FrontendSpec {
    pub id: String,
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Bytes of device configuration to fetch with GET_CONFIG.
    pub config_len: usize,
}

/// The device configuration size vmm-core asks the backend for (QEMU's sizes: virtio-blk's
/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and padding, 60 bytes; the
/// balloon's `num_pages` and `actual`, 8 bytes; virtio-net's whole `struct virtio_net_config`
/// of virtio 1.2, `mac` to `supported_hash_types`, 24 bytes: QEMU sizes it by the features
/// offered, which are not known before the first connection, and a backend pads what it does
/// not have with zeros).
pub fn config_len(kind: VirtioKind) -> usize {
    match kind {
        VirtioKind::Block => 60,
        VirtioKind::Balloon => 8,
        VirtioKind::Net => 24,
    }
}

/// PCI class << 8 | subclass as QEMU gives each kind (virtio-blk: PCI_CLASS_STORAGE_SCSI,
/// virtio-balloon: PCI_CLASS_OTHERS, virtio-net: PCI_CLASS_NETWORK_ETHERNET).
pub fn pci_class(kind: VirtioKind) -> u16 {
    match kind {
        VirtioKind::Block => 0x0100,
        VirtioKind::Balloon => 0x00ff,
        VirtioKind::Net => 0x0200,
    }
}

/// Most MSI-X vectors a function may have: the table's 0x1000-byte page in the BAR holds 256
/// entries of 16 bytes.
pub const MAX_MSIX_VECTORS: u16 = 256;

/// The transport's handle on the worker: posts requests, stops the thread when dropped.
pub struct VhostUserModel {
    id: String,
    mailbox: Arc<Mailbox>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("device '{id}': creating an eventfd: {source}")]
    EventFd {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device '{id}': starting its vhost-user thread: {source}")]
    Thread {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device '{id}': allocating MSI-X vectors: {source}")]
    Vectors {
        id: String,
        #[source]
        source: IrqError,
    },
    #[error(transparent)]
    Transport(#[from] VirtioPciError),
    #[error("device '{id}': {count} MSI-X vectors (need 1..={MAX_MSIX_VECTORS}: the table has 256 entries in its page of the BAR)")]
    VectorCount { id: String, count: u16 },
    #[error("device '{id}': {num_queues} queues of {queue_size} entries (need 1..=64 queues, a power-of-two size up to 32768)")]
    Shape { id: String, num_queues: u16, queue_size: u16 },
}

impl VhostUserModel {
    /// Starts the worker. One connection attempt is made before returning, so a backend that
    /// is already listening is connected (and its features known) before the guest runs.
    pub fn spawn(
        spec: FrontendSpec,
        mem: GuestMemoryMmap,
        signals: Arc<DeviceSignals>,
        kicks: Vec<EventFd>,
    ) -> Result<VhostUserModel, FrontendError> {
        let id = spec.id.clone();
        let wake =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| FrontendError::EventFd { id: id.clone(), source })?;
        let errs = (0..spec.num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| FrontendError::EventFd { id: id.clone(), source })?;
        let mailbox = Arc::new(Mailbox::new(wake));
        let mut w = Worker::new(spec, mem, signals, kicks, errs, mailbox.clone());
        w.try_connect();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-user-{id}"))
            .spawn(move || w.run())
            .map_err(|source| FrontendError::Thread { id: id.clone(), source })?;
        Ok(VhostUserModel { id, mailbox, thread: Some(thread) })
    }
}

impl VirtioDeviceModel for VhostUserModel {
    fn write_config(&mut self, offset: u32, data: &[u8]) {
        self.mailbox.post(Command::WriteConfig { offset, data: data.to_vec() });
    }
    fn features_ok(&mut self, features: u64) {
        self.mailbox.post(Command::FeaturesOk(features));
    }
    fn start(&mut self, queues: Vec<QueueConfig>) {
        self.mailbox.post(Command::Start(queues));
    }
    fn stop(&mut self) {
        self.mailbox.post(Command::Stop);
    }
    fn reset(&mut self, seq: u64) {
        self.mailbox.post(Command::Reset(seq));
    }
}

impl Drop for VhostUserModel {
    fn drop(&mut self) {
        self.mailbox.post(Command::Exit);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(id = %self.id, "the vhost-user thread panicked");
            }
        }
    }
}

/// Everything a vhost-user function needs from the machine.
pub struct MachineParts<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub irq: &'a SharedIrqRouter,
    pub window: &'a MmioWindow,
    pub ioevents: Arc<dyn IoEventRegistrar>,
}

/// Builds the virtio-pci function for `dev` with its frontend, its BAR at `bar_address`.
pub fn build_function(
    dev: &VhostUserDevice,
    bar_address: u64,
    m: &MachineParts<'_>,
) -> Result<Arc<Mutex<VirtioPciDevice>>, FrontendError> {
    let id = dev.id.clone();
    if dev.num_queues == 0
        || dev.num_queues > 64
        || dev.queue_size == 0
        || !dev.queue_size.is_power_of_two()
        || dev.queue_size > 32768
    {
        return Err(FrontendError::Shape { id, num_queues: dev.num_queues, queue_size: dev.queue_size });
    }
    // One vector per queue and one for configuration changes, as QEMU sizes it, unless the
    // device was given its count (`vectors=`); a driver shares what there is.
    let count = dev.msix_vectors.unwrap_or(dev.num_queues + 1);
    if count == 0 || count > MAX_MSIX_VECTORS {
        return Err(FrontendError::VectorCount { id, count });
    }
    let mut vectors = Vec::with_capacity(count as usize);
    for _ in 0..count {
        match lock(m.irq).allocate_msi() {
            Ok(v) => vectors.push(v),
            Err(source) => {
                for v in vectors {
                    let _ = lock(m.irq).release(v.gsi);
                }
                return Err(FrontendError::Vectors { id, source });
            }
        }
    }
    let eventfd = |source| FrontendError::EventFd { id: id.clone(), source };
    let signal_fds = vectors.iter().map(|v| v.eventfd.try_clone()).collect::<Result<Vec<_>, _>>().map_err(eventfd)?;
    let signals = Arc::new(DeviceSignals::new(signal_fds));
    let msix = MsixTable::new(Box::new(RouterVectors::new(m.irq.clone(), vectors)));
    let kicks = (0..dev.num_queues)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK))
        .collect::<Result<Vec<_>, _>>()
        .map_err(eventfd)?;
    let worker_kicks = kicks.iter().map(|k| k.try_clone()).collect::<Result<Vec<_>, _>>().map_err(eventfd)?;
    let spec = FrontendSpec {
        id: id.clone(),
        socket: dev.socket.clone(),
        num_queues: dev.num_queues,
        queue_size: dev.queue_size,
        config_len: config_len(dev.kind),
    };
    let model = VhostUserModel::spawn(spec, m.mem.clone(), signals.clone(), worker_kicks)?;
    let fspec = FunctionSpec {
        id,
        device_id: dev.kind.device_id(),
        class: pci_class(dev.kind),
        num_queues: dev.num_queues,
        queue_size: dev.queue_size,
        bar_address,
    };
    Ok(VirtioPciDevice::new(fspec, m.window.clone(), m.ioevents.clone(), msix, signals, Box::new(model), kicks)?)
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    #[test]
    fn a_nic_is_an_ethernet_controller_with_the_whole_net_config() {
        assert_eq!(pci_class(VirtioKind::Net), 0x0200);
        assert_eq!(crate::devices::pci::class_description(pci_class(VirtioKind::Net)), Some("Ethernet controller"));
        // mac[6] status max_virtqueue_pairs mtu speed[4] duplex rss_max_key_size
        // rss_max_indirection_table_length[2] supported_hash_types[4]
        assert_eq!(config_len(VirtioKind::Net), 6 + 2 + 2 + 2 + 4 + 1 + 1 + 2 + 4);
        assert_eq!(VirtioKind::Net.device_id(), 1);
    }

    #[test]
    fn vector_counts_outside_the_table_are_refused_by_name() {
        let e = FrontendError::VectorCount { id: "nic0".into(), count: 300 };
        assert_eq!(
            e.to_string(),
            "device 'nic0': 300 MSI-X vectors (need 1..=256: the table has 256 entries in its page of the BAR)"
        );
    }
}
