//! The machine description that the `flotilla` launcher builds from a QEMU-style command line and
//! hands to `vmm-core` (as JSON on its command line). It lives in its own crate because both
//! processes need it and daemons never import each other.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where a character device's bytes go, in QEMU's `-serial` / `-chardev` vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ChardevBackend {
    /// The process's own stdin/stdout.
    Stdio,
    /// Output appended to a file; no input.
    File { path: PathBuf },
    /// A listening unix socket (`unix:PATH,server,nowait`); one client at a time.
    UnixServer { path: PathBuf, wait: bool },
    /// A fresh pseudo-terminal; its slave path is logged and reported by query-chardev.
    Pty,
    /// Discard output, no input.
    Null,
}

/// One character device as QEMU names it (`serial0`, `compat_monitor0`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChardevConfig {
    pub id: String,
    pub backend: ChardevBackend,
}

/// Everything vmm-core needs to build and run one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// `-name`; None when not given (query-name then returns `{}`).
    pub name: Option<String>,
    /// `-uuid`, canonical lower-case text; None means the null UUID.
    pub uuid: Option<String>,
    /// Guest RAM in bytes (`-m`).
    pub mem_bytes: u64,
    /// Number of vCPUs (`-smp`).
    pub cpus: u8,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The chardev behind COM1, if any (`-serial`).
    pub serial: Option<ChardevConfig>,
    /// `-S`: stay in `prelaunch` until `cont`.
    pub start_paused: bool,
    /// `-no-shutdown`: a guest power-off leaves the VM in `shutdown` instead of exiting.
    pub no_shutdown: bool,
    /// `-no-reboot`: a guest reset (or triple fault) exits instead of resetting.
    pub no_reboot: bool,
    /// `-mem-prealloc`: allocate all of guest RAM when the machine is built, not when the guest
    /// first touches it (a host short of memory fails at start, not with a SIGBUS later).
    #[serde(default)]
    pub mem_prealloc: bool,
    /// virtio-pci functions backed by vhost-user daemons, in PCI slot order.
    #[serde(default)]
    pub vhost_user_devices: Vec<VhostUserDevice>,
}

/// The virtio device types a vhost-user backend can serve here (virtio 1.x device ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VirtioKind {
    /// virtio-blk, device id 2 (`-device virtio-blk-pci` / `vhost-user-blk-pci`).
    Block,
    /// virtio-balloon, device id 5 (`-device virtio-balloon-pci`, `-balloon virtio`).
    Balloon,
    /// virtio-net, device id 1 (`-device virtio-net-pci,netdev=`), served by netd.
    Net,
}

impl VirtioKind {
    /// The virtio device id (virtio 1.2 section 5).
    pub fn device_id(self) -> u16 {
        match self {
            VirtioKind::Block => 2,
            VirtioKind::Balloon => 5,
            VirtioKind::Net => 1,
        }
    }
}

/// A virtio-pci device whose device model lives in a vhost-user backend process. vmm-core is
/// the frontend: it connects to `socket` (the backend listens), and reconnects whenever the
/// backend goes away; the PCI function exists from the start either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserDevice {
    /// The qdev id (`-device ...,id=`), reported by query-pci; QEMU-style default when not given.
    pub id: String,
    pub kind: VirtioKind,
    /// The backend's listening vhost-user socket.
    pub socket: PathBuf,
    /// Virtqueues offered to the guest (the backend may support more).
    pub num_queues: u16,
    /// Maximum entries per virtqueue.
    pub queue_size: u16,
    /// PCI slot on bus 0 (`addr=`); the first free slot when None.
    pub pci_slot: Option<u8>,
    /// MSI-X table entries (`vectors=`); None: one per queue and one for configuration changes.
    /// With fewer, a driver shares vectors between queues (Linux: config on one, all queues on
    /// another).
    #[serde(default)]
    pub msix_vectors: Option<u16>,
}

/// Image formats blockd opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriveFormat {
    Raw,
    Qcow2,
}

/// `-drive cache=`: how the image file is opened and when writes reach the disk (QEMU's
/// meanings: `none` and `directsync` use O_DIRECT; `writethrough` and `directsync` flush after
/// every write; `unsafe` ignores flushes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    Writeback,
    None,
    Writethrough,
    Directsync,
    Unsafe,
}

/// `-drive werror=` / `rerror=`: what a failed request does (QEMU's BlockdevOnError).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorAction {
    /// Fail the request to the guest.
    Report,
    /// Complete it as if it had succeeded.
    Ignore,
    /// Stop the VM (run state `io-error`); `cont` retries.
    Stop,
    /// Stop on ENOSPC, report anything else.
    Enospc,
}

/// One `-drive` as blockd serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveConfig {
    /// The drive id: query-block's `device` (`virtio0`... for `if=virtio` without `id=`).
    pub id: String,
    pub file: PathBuf,
    pub format: DriveFormat,
    pub readonly: bool,
    pub cache: CacheMode,
    /// QEMU's default is `enospc`.
    pub werror: ErrorAction,
    /// QEMU's default is `report`.
    pub rerror: ErrorAction,
    /// `serial=`: what VIRTIO_BLK_T_GET_ID answers (the drive id when None).
    pub serial: Option<String>,
    /// Where blockd listens for this drive's vhost-user frontend; None for a drive no device
    /// uses (`if=none` without a `-device`), which query-block still lists.
    pub socket: Option<PathBuf>,
    /// Virtqueues blockd serves on that socket.
    pub num_queues: u16,
}

/// Everything blockd serves for one VM (`blockd --config-json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockdConfig {
    pub drives: Vec<DriveConfig>,
    /// Where blockd records the image each drive was switched to (blockdev-snapshot-sync), so
    /// that a blockd restarted with this same config goes on with the overlay, not the image
    /// the VM started with. The launcher puts it in the instance's runtime directory.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

/// What balloond serves for one VM (`balloond --config-json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloondConfig {
    /// The qdev id of the balloon device.
    pub id: String,
    /// Where balloond listens for the frontend.
    pub socket: PathBuf,
    /// Guest RAM size in bytes: `actual` and the `balloon` target are computed against it.
    pub mem_bytes: u64,
    /// Where balloond records the target the host set and the size the guest reported, so that
    /// a balloond restarted with this same config gets them back. The launcher puts it in the
    /// instance's runtime directory.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

/// Where one NIC's frames go on the host side (`-netdev tap` / `-netdev user`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum NetBackendConfig {
    /// A tap device. The launcher opens it (TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
    /// plus IFF_MULTI_QUEUE for more than one queue pair) and netd inherits the descriptors.
    Tap {
        /// Inherited tap descriptors, one per queue pair, in queue-pair order.
        fds: Vec<i32>,
        /// The interface name (`ifname=`), for logs and query answers; None when unknown.
        ifname: Option<String>,
        /// The descriptors were opened with IFF_VNET_HDR, so netd may offer the guest checksum
        /// and segmentation offloads and pass the virtio-net header through.
        vnet_hdr: bool,
    },
    /// User-mode networking: slirp-net runs libslirp on the other end of a frame socket.
    User {
        /// Inherited SOCK_SEQPACKET (or datagram) socket: one whole Ethernet frame per message,
        /// no virtio-net header, both ways. None: netd has no host side (frames are dropped).
        socket_fd: Option<i32>,
        /// `restrict=on`: the guest is isolated from the host and the outside.
        restrict: bool,
        /// `hostfwd=` rules, as QEMU spells them (`tcp::2222-:22`), in command-line order.
        hostfwd: Vec<String>,
        /// `net=` (`10.0.2.0/24`); None for slirp's default.
        net: Option<String>,
    },
}

/// One virtio-net NIC that netd serves (`-netdev ...,id=NETDEV -device virtio-net-pci,netdev=NETDEV,id=ID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    /// The NIC's qdev id (`-device ...,id=`); set_link accepts it or `netdev`.
    pub id: String,
    /// The `-netdev` id.
    pub netdev: String,
    /// The NIC's MAC address, `52:54:00:12:34:56` form.
    pub mac: String,
    /// Where netd listens for this NIC's vhost-user frontend (vmm-core).
    pub socket: PathBuf,
    /// Receive/transmit queue pairs (`queues=`); above 1 netd offers VIRTIO_NET_F_MQ and the
    /// frontend should expose `2 * queue_pairs + 1` virtqueues (the last is the control queue).
    pub queue_pairs: u16,
    pub backend: NetBackendConfig,
}

/// Everything netd serves for one VM (`netd --config-json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetdConfig {
    pub nics: Vec<NicConfig>,
    /// Where netd records each NIC's link state (set_link), so that a netd restarted with this
    /// same config keeps a link the host took down. The launcher puts it in the instance's
    /// runtime directory.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

pub const NULL_UUID: &str = "00000000-0000-0000-0000-000000000000";

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            name: None,
            uuid: None,
            // QEMU's default -m is 128 MiB.
            mem_bytes: 128 << 20,
            cpus: 1,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            serial: None,
            start_paused: false,
            no_shutdown: false,
            no_reboot: false,
            mem_prealloc: false,
            vhost_user_devices: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("machine config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

macro_rules! json_io {
    ($t:ty) => {
        impl $t {
            pub fn to_json(&self) -> String {
                // Serialising plain data with string keys cannot fail.
                serde_json::to_string(self).unwrap_or_default()
            }

            pub fn from_json(s: &str) -> Result<Self, ConfigError> {
                Ok(serde_json::from_str(s)?)
            }
        }
    };
}
json_io!(BlockdConfig);
json_io!(BalloondConfig);
json_io!(NetdConfig);

impl MachineConfig {
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(s)?)
    }

    pub fn uuid_or_null(&self) -> &str {
        self.uuid.as_deref().unwrap_or(NULL_UUID)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let cfg = MachineConfig {
            name: Some("vm1".into()),
            serial: Some(ChardevConfig {
                id: "serial0".into(),
                backend: ChardevBackend::UnixServer { path: "/tmp/s".into(), wait: false },
            }),
            ..Default::default()
        };
        let back = MachineConfig::from_json(&cfg.to_json()).expect("parse");
        assert_eq!(back, cfg);
    }

    #[test]
    fn rejects_garbage() {
        assert!(MachineConfig::from_json("{\"name\": 3").is_err());
    }
}
