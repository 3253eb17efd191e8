//! One NIC's process-wide state, shared by its connections and the D-Bus side: identity, host
//! ports, the link state (set_link) and the config space it shows, counters, and the thread
//! that tells the frontend about config changes (CONFIG_CHANGE_MSG on the backend-request
//! channel; REPLY_ACK makes the send wait for the frontend, so it runs on its own thread).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::Backend;
use vhost_backend_kit::config_change::ConfigChangeNotifier;
use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;

use crate::features::{HostCaps, TUN_F_CSUM, TUN_F_UFO};
use crate::persist::{LinkStore, PersistError};
use crate::port::Port;

/// `struct virtio_net_config` up to `mtu`: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a MAC address (52:54:00:12:34:56)")]
pub struct MacError(String);

pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(MacError(s.into()));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(MacError(s.into()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| MacError(s.into()))?;
    }
    Ok(mac)
}

/// Running totals since netd started.
#[derive(Debug, Default)]
pub struct Counters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the host dropped: link down, oversize, no room in the guest's buffers.
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Guest frames dropped: link down, bad header, oversize, host side refused.
    pub tx_dropped: AtomicU64,
    /// Chains refused: outside guest RAM, wrong direction, truncated.
    pub bad_chains: AtomicU64,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub struct Nic {
    pub id: String,
    pub netdev: String,
    pub mac: [u8; 6],
    pub queue_pairs: u16,
    /// One per queue pair.
    pub ports: Vec<Port>,
    pub caps: HostCaps,
    link_up: AtomicBool,
    links: Arc<LinkStore>,
    config_change: ConfigChangeNotifier,
    pub counters: Counters,
}

#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("NIC '{id}': {pairs} queue pair(s) but {ports} host port(s)")]
    Ports { id: String, pairs: u16, ports: usize },
    #[error("starting the config-change thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl Nic {
    /// A NIC on `ports` (one per queue pair), its link as `links` recorded it (up when never
    /// set), with its notifier thread.
    pub fn new(
        id: String,
        netdev: String,
        mac: [u8; 6],
        ports: Vec<Port>,
        links: Arc<LinkStore>,
    ) -> Result<Arc<Nic>, NicError> {
        let queue_pairs = u16::try_from(ports.len()).unwrap_or(0);
        if queue_pairs == 0 {
            return Err(NicError::Ports { id, pairs: 0, ports: 0 });
        }
        let vnet_hdr = ports.iter().all(Port::vnet_hdr);
        // QEMU's probe: a tap that takes TUN_F_UFO can carry UFO frames both ways.
        let ufo = vnet_hdr && ports[0].tap().is_some_and(|t| t.set_offload(TUN_F_CSUM | TUN_F_UFO).is_ok());
        for p in &ports {
            if let Some(t) = p.tap() {
                // Nothing offloaded towards the guest until it negotiates.
                let _ = t.set_offload(0);
            }
        }
        let up = links.get(&id).unwrap_or(true);
        if !up {
            tracing::info!(nic = %id, "link down, as recorded before the restart");
        }
        let config_change = ConfigChangeNotifier::new(format!("cfg-{id}")).map_err(NicError::Thread)?;
        Ok(Arc::new(Nic {
            id,
            netdev,
            mac,
            queue_pairs,
            ports,
            caps: HostCaps { vnet_hdr, ufo },
            link_up: AtomicBool::new(up),
            links,
            config_change,
            counters: Counters::default(),
        }))
    }

    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }

    /// Whether `name` names this NIC (its qdev id or its netdev's id, as QEMU's set_link).
    pub fn answers_to(&self, name: &str) -> bool {
        self.id == name || self.netdev == name
    }

    /// set_link: records the state (so a restarted netd keeps it), changes what the guest's
    /// config space shows and tells the frontend; delivery stops or resumes at once (the
    /// queues look at the state for every frame).
    pub fn set_link(&self, up: bool) -> Result<(), PersistError> {
        self.links.set(&self.id, up)?;
        let was = self.link_up.swap(up, Ordering::AcqRel);
        tracing::info!(nic = %self.id, up, changed = was != up, "set_link");
        if was != up {
            self.config_change.request();
        }
        Ok(())
    }

    /// The config space (little-endian `struct virtio_net_config`).
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up() { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c
    }

    /// The current connection's backend-request channel (None when it ends); a change owed
    /// to an earlier connection is dropped: a new driver reads the config space itself.
    pub fn set_backend(&self, backend: Option<Backend>) {
        self.config_change.set_backend(backend);
    }

    /// CONFIG_CHANGE_MSGs sent (and acked) so far.
    pub fn config_changes_sent(&self) -> u64 {
        self.config_change.sent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("52:54:00:12:34:56").unwrap(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        for bad in ["52:54:00:12:34", "52:54:00:12:34:5g", "525:4:00:12:34:56", ""] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn link_state_shows_in_config_and_is_recorded() {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
        // SAFETY: fds[0] handed over once; fds[1] closed below.
        let port = unsafe { Port::frames_from_fd(fds[0]) }.unwrap();
        let links = Arc::new(LinkStore::open(None).unwrap());
        let nic = Nic::new("nic0".into(), "n0".into(), [2, 0, 0, 0, 0, 1], vec![port], links.clone()).unwrap();
        assert!(nic.answers_to("nic0") && nic.answers_to("n0") && !nic.answers_to("nic1"));
        assert!(!nic.caps.vnet_hdr && !nic.caps.ufo);
        let c = nic.config_space();
        assert_eq!((&c[..6], c[6], c[8]), (&[2u8, 0, 0, 0, 0, 1][..], 1, 1));
        nic.set_link(false).unwrap();
        assert_eq!(nic.config_space()[6], 0);
        assert_eq!(links.get("nic0"), Some(false));
        // SAFETY: our descriptor.
        unsafe { libc::close(fds[1]) };
    }

    #[test]
    fn a_restarted_netd_keeps_a_link_the_host_took_down() {
        let dir = std::env::temp_dir().join(format!("netd-nic-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let nic = |links: Arc<LinkStore>| {
            let mut fds = [0; 2];
            // SAFETY: socketpair writes two descriptors into the array.
            assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
            // SAFETY: fds[0] handed over once; fds[1] closed at once (nothing is sent here).
            let port = unsafe { Port::frames_from_fd(fds[0]) }.unwrap();
            // SAFETY: our descriptor.
            unsafe { libc::close(fds[1]) };
            Nic::new("nic0".into(), "n0".into(), [2, 0, 0, 0, 0, 1], vec![port], links).unwrap()
        };
        let first = nic(Arc::new(LinkStore::open(Some(path.clone())).unwrap()));
        first.set_link(false).unwrap();
        drop(first);
        let restarted = nic(Arc::new(LinkStore::open(Some(path.clone())).unwrap()));
        assert!(!restarted.link_up(), "the link stays down across the restart");
        assert_eq!(restarted.config_space()[6], 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
