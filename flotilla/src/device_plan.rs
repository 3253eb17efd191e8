//! Where each vhost-user device's socket is, and what vmm-core, blockd and balloond are told.
//!
//! Sockets of the daemons the launcher starts live in the instance's 0700 runtime directory:
//! `<rt>/vhost-user/<drive-id>.sock` for each drive a device uses (drive ids are QEMU
//! identifiers, so they are safe file names), `<rt>/vhost-user/balloon.sock` for the balloon.
//! An external backend's socket is the `-chardev socket,path=` the user gave.

use std::path::{Path, PathBuf};

use vm_config::{
    BalloondConfig, BlockdConfig, DriveConfig, DriveFormat, NetBackendConfig, NetdConfig, NicConfig, VhostUserDevice,
};

use crate::devices::{Backend, DeviceSet, DEFAULT_NUM_QUEUES};
use crate::net_opts::{format_mac, NetdevKind};
use crate::tap::NicTap;

/// The runtime directory's subdirectory for vhost-user sockets.
pub const SOCKET_DIR: &str = "vhost-user";
/// blockd's record of the images it switched to, in the runtime directory (removed with it).
pub const BLOCKD_STATE_FILE: &str = "blockd-state.json";
pub const BALLOON_SOCKET: &str = "balloon.sock";
/// balloond's record of the balloon target, in the runtime directory (removed with it).
pub const BALLOOND_STATE_FILE: &str = "balloond-state.json";
/// netd's record of each NIC's link state, in the runtime directory (removed with it).
pub const NETD_STATE_FILE: &str = "netd-state.json";

/// What the launcher hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    /// For MachineConfig.vhost_user_devices, in command-line order.
    pub vhost_user_devices: Vec<VhostUserDevice>,
    /// None when there is no `-drive`.
    pub blockd: Option<BlockdConfig>,
    /// None without a balloon.
    pub balloond: Option<BalloondConfig>,
    /// None without a NIC on a tap or user network.
    pub netd: Option<NetdConfig>,
}

/// The socket blockd serves drive `id` on.
pub fn drive_socket(runtime: &Path, id: &str) -> PathBuf {
    runtime.join(SOCKET_DIR).join(format!("{id}.sock"))
}

/// The socket netd serves NIC `name` on (net client names are QEMU identifiers or
/// `virtio-net-pci.N`: safe file names).
pub fn nic_socket(runtime: &Path, name: &str) -> PathBuf {
    runtime.join(SOCKET_DIR).join(format!("nic-{name}.sock"))
}

/// Builds the plan; `formats` are the drives' formats (`drive_files::check_all`), in
/// `set.drives` order; `taps` the NICs' opened taps (`tap::open_all`).
/// `frames` the user networks' frame sockets (`user_net::start_all`) by NIC name.
pub fn plan(
    set: &DeviceSet,
    formats: &[DriveFormat],
    taps: &[NicTap],
    frames: &[(String, std::os::fd::RawFd)],
    runtime: &Path,
    mem_bytes: u64,
) -> DevicePlan {
    let mut devices = Vec::with_capacity(set.devices.len());
    let mut balloond = None;
    for d in &set.devices {
        let socket = match &d.backend {
            Backend::Drive(id) => drive_socket(runtime, id),
            Backend::External(p) => p.clone(),
            Backend::Balloon => {
                let socket = runtime.join(SOCKET_DIR).join(BALLOON_SOCKET);
                balloond = Some(BalloondConfig {
                    id: d.id.clone(),
                    socket: socket.clone(),
                    mem_bytes,
                    state_file: Some(runtime.join(BALLOOND_STATE_FILE)),
                });
                socket
            }
            Backend::Netd(name) => nic_socket(runtime, name),
        };
        devices.push(VhostUserDevice {
            id: d.id.clone(),
            kind: d.kind,
            socket,
            num_queues: d.num_queues,
            queue_size: d.queue_size,
            pci_slot: d.pci_slot,
            msix_vectors: d.msix_vectors,
        });
    }
    let netd = set.has_netd().then(|| netd_config(set, taps, frames, runtime));
    let blockd = set.has_drives().then(|| BlockdConfig {
        drives: set
            .drives
            .iter()
            .zip(formats.iter().copied().chain(std::iter::repeat(DriveFormat::Raw)))
            .map(|(d, format)| {
                let user = set.devices.iter().find(|x| x.backend == Backend::Drive(d.id.clone()));
                DriveConfig {
                    id: d.id.clone(),
                    file: d.file.clone(),
                    format,
                    readonly: d.readonly,
                    cache: d.cache,
                    werror: d.werror,
                    rerror: d.rerror,
                    serial: user.and_then(|u| u.serial.clone()).or_else(|| d.serial.clone()),
                    socket: user.map(|_| drive_socket(runtime, &d.id)),
                    num_queues: user.map_or(DEFAULT_NUM_QUEUES, |u| u.num_queues),
                }
            })
            .collect(),
        state_file: Some(runtime.join(BLOCKD_STATE_FILE)),
    });
    DevicePlan { vhost_user_devices: devices, blockd, balloond, netd }
}

/// What netd serves: every NIC on a tap (its descriptors, as netd inherits them) or on user
/// networking (libslirp in netd, with the `-netdev user` options).
fn netd_config(
    set: &DeviceSet,
    taps: &[NicTap],
    frames: &[(String, std::os::fd::RawFd)],
    runtime: &Path,
) -> NetdConfig {
    use std::os::fd::AsRawFd;
    let mut nics = Vec::new();
    for nic in &set.nics {
        if !set.devices.iter().any(|d| d.backend == Backend::Netd(nic.name.clone())) {
            continue;
        }
        let Some(netdev) = set.net.netdev_of(nic) else { continue };
        let backend = match &netdev.kind {
            NetdevKind::Tap { ifname, vnet_hdr, .. } => match taps.iter().find(|t| t.nic == nic.name) {
                Some(t) => NetBackendConfig::Tap {
                    fds: t.queues.fds.iter().map(|f| f.as_raw_fd()).collect(),
                    ifname: Some(t.queues.ifname.clone()),
                    vnet_hdr: t.queues.vnet_hdr,
                },
                // Not opened (plans made in tests): what was asked.
                None => NetBackendConfig::Tap {
                    fds: Vec::new(),
                    ifname: ifname.clone(),
                    vnet_hdr: vnet_hdr.unwrap_or(true),
                },
            },
            NetdevKind::User { restrict, hostfwd, net, .. } => NetBackendConfig::User {
                socket_fd: frames.iter().find(|(n, _)| *n == nic.name).map(|(_, fd)| *fd),
                restrict: *restrict,
                hostfwd: hostfwd.clone(),
                net: net.clone(),
            },
            NetdevKind::VhostUser { .. } => continue,
        };
        nics.push(NicConfig {
            id: nic.name.clone(),
            netdev: nic.netdev.clone(),
            mac: format_mac(&nic.mac),
            socket: nic_socket(runtime, &nic.name),
            queue_pairs: nic.queue_pairs,
            backend,
        });
    }
    NetdConfig { nics, state_file: Some(runtime.join(NETD_STATE_FILE)) }
}

/// Longest path a unix socket address holds (sun_path less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Every socket the launcher's daemons listen on (removed before a restart and at the end).
impl DevicePlan {
    /// The first of the daemons' socket paths that is too long to bind, if any.
    pub fn overlong_socket(&self) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        self.blockd_sockets()
            .into_iter()
            .chain(self.balloond_sockets())
            .chain(self.netd_sockets())
            .find(|p| p.as_os_str().as_bytes().len() > MAX_SOCKET_PATH)
    }

    pub fn blockd_sockets(&self) -> Vec<PathBuf> {
        self.blockd.iter().flat_map(|b| b.drives.iter().filter_map(|d| d.socket.clone())).collect()
    }

    pub fn balloond_sockets(&self) -> Vec<PathBuf> {
        self.balloond.iter().map(|b| b.socket.clone()).collect()
    }

    pub fn netd_sockets(&self) -> Vec<PathBuf> {
        self.netd.iter().flat_map(|n| n.nics.iter().map(|c| c.socket.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_config::{CacheMode, ErrorAction, VirtioKind};

    fn set(opts: &[(&str, &str)]) -> DeviceSet {
        let mut s = DeviceSet::default();
        for (o, a) in opts {
            match *o {
                "drive" => s.drive(a),
                "device" => s.device(a),
                "chardev" => s.chardev(a),
                "balloon" => s.balloon(a),
                "netdev" => s.netdev(a),
                "net" => s.legacy_net(a),
                _ => unreachable!(),
            }
            .expect(a);
        }
        s.finish().expect("finish");
        s
    }

    #[test]
    fn sockets_and_configs() {
        let s = set(&[
            ("drive", "file=/i/a.img,if=virtio,format=raw"),
            ("drive", "file=/i/b.qcow2,if=none,id=data,cache=none,werror=stop,rerror=stop,serial=S1"),
            ("drive", "file=/i/c.img,if=none,id=spare,readonly=on"),
            ("device", "virtio-blk-pci,drive=data,id=vblk1,num-queues=4,addr=7,serial=S2"),
            ("chardev", "socket,id=qsd,path=/run/qsd.sock"),
            ("device", "vhost-user-blk-pci,chardev=qsd,id=ext,num-queues=2"),
            ("device", "virtio-balloon-pci,id=balloon0"),
        ]);
        let rt = Path::new("/run/flotilla/vm1-42");
        let p = plan(&s, &[DriveFormat::Raw, DriveFormat::Qcow2, DriveFormat::Raw], &[], &[], rt, 256 << 20);
        let dev = |id: &str, kind, socket: &str, num_queues, queue_size, pci_slot| VhostUserDevice {
            id: id.into(),
            kind,
            socket: socket.into(),
            num_queues,
            queue_size,
            pci_slot,
            msix_vectors: None,
        };
        assert_eq!(
            p.vhost_user_devices,
            [
                dev("", VirtioKind::Block, "/run/flotilla/vm1-42/vhost-user/virtio0.sock", 1, 256, None),
                dev("vblk1", VirtioKind::Block, "/run/flotilla/vm1-42/vhost-user/data.sock", 4, 256, Some(7)),
                dev("ext", VirtioKind::Block, "/run/qsd.sock", 2, 128, None),
                dev("balloon0", VirtioKind::Balloon, "/run/flotilla/vm1-42/vhost-user/balloon.sock", 3, 128, None),
            ]
        );
        let b = p.blockd.as_ref().expect("blockd");
        assert_eq!(b.drives.len(), 3);
        assert_eq!(
            b.drives[0],
            DriveConfig {
                id: "virtio0".into(),
                file: "/i/a.img".into(),
                format: DriveFormat::Raw,
                readonly: false,
                cache: CacheMode::Writeback,
                werror: ErrorAction::Enospc,
                rerror: ErrorAction::Report,
                serial: None,
                socket: Some("/run/flotilla/vm1-42/vhost-user/virtio0.sock".into()),
                num_queues: 1,
            }
        );
        let d = &b.drives[1];
        assert_eq!(
            (d.format, d.cache, d.werror, d.rerror),
            (DriveFormat::Qcow2, CacheMode::None, ErrorAction::Stop, ErrorAction::Stop)
        );
        assert_eq!(d.serial.as_deref(), Some("S2"), "the device's serial wins");
        assert_eq!(d.num_queues, 4, "blockd serves the queues the device offers");
        assert_eq!(b.drives[2].socket, None, "no device uses 'spare'");
        assert!(b.drives[2].readonly);
        assert_eq!(
            p.balloond,
            Some(BalloondConfig {
                id: "balloon0".into(),
                socket: "/run/flotilla/vm1-42/vhost-user/balloon.sock".into(),
                mem_bytes: 256 << 20,
                state_file: Some("/run/flotilla/vm1-42/balloond-state.json".into()),
            })
        );
        assert_eq!(
            p.blockd_sockets(),
            [
                PathBuf::from("/run/flotilla/vm1-42/vhost-user/virtio0.sock"),
                "/run/flotilla/vm1-42/vhost-user/data.sock".into()
            ]
        );
        assert_eq!(p.balloond_sockets(), [PathBuf::from("/run/flotilla/vm1-42/vhost-user/balloon.sock")]);
        assert_eq!(p.overlong_socket(), None);
        let deep = PathBuf::from(format!("/{}", "d".repeat(90)));
        let p2 = plan(&s, &[DriveFormat::Raw, DriveFormat::Qcow2, DriveFormat::Raw], &[], &[], &deep, 1 << 30);
        assert_eq!(p2.overlong_socket(), Some(deep.join("vhost-user/virtio0.sock")));
        // The JSON the daemons get round-trips.
        assert_eq!(BlockdConfig::from_json(&b.to_json()).expect("json"), *b);
    }

    #[test]
    fn nothing_to_start_without_drives_or_balloon() {
        let s = set(&[("chardev", "socket,id=c,path=/x.sock"), ("device", "vhost-user-blk-pci,chardev=c")]);
        let p = plan(&s, &[], &[], &[], Path::new("/rt"), 1 << 30);
        assert_eq!(p.blockd, None);
        assert_eq!(p.balloond, None);
        assert_eq!(p.vhost_user_devices.len(), 1);
        let p = plan(&set(&[("balloon", "none")]), &[], &[], &[], Path::new("/rt"), 1 << 30);
        assert_eq!(p, DevicePlan { vhost_user_devices: vec![], blockd: None, balloond: None, netd: None });
    }
}
