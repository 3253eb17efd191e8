//! netd: Flotilla's virtio-net device as a vhost-user backend process, on a tap whose
//! descriptors it is handed (it holds no CAP_NET_ADMIN) or on slirp-net's frame socket.
//!
//! - [`features`]: the features offered, the header length and tap offloads they imply.
//! - [`header`]: the virtio-net header of a transmitted frame, checked.
//! - [`tap`], [`port`]: the host side (a tap queue or a frame socket).
//! - [`chain`]: reading and writing descriptor chains, bounded.
//! - [`rx`], [`tx`], [`ctrl`]: the receive, transmit and control queues.
//! - [`nic`]: a NIC's state: link (set_link), config space, config-change notification.
//! - [`persist`]: link states across restarts.
//! - [`backend`]: the `VhostUserBackend` of one connection.
//! - [`dbus`]: `org.flotilla.Net1` (set_link).

pub mod backend;
pub mod chain;
pub mod ctrl;
pub mod dbus;
pub mod features;
pub mod header;
pub mod nic;
pub mod persist;
pub mod port;
pub mod rx;
pub mod tap;
pub mod tx;
