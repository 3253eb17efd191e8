//! QEMU's user-mode network (`-netdev user`) on libslirp, the library QEMU itself uses: DHCP, DNS
//! forwarding, `hostfwd`, `restrict=on`, no privileges.
//!
//! [`SlirpNet::spawn`] runs one libslirp instance on its own thread and returns a SOCK_SEQPACKET unix
//! socket carrying whole Ethernet frames, one per datagram, with no vnet header: what the guest sends
//! goes in, what libslirp answers comes out. Nothing is shared in memory, so the socket can be handed
//! to another process (netd) across fork/exec. A reader that falls behind loses frames (counted in
//! [`SlirpNetStats`]); libslirp's thread never waits on it.
//!
//! ```no_run
//! use slirp_net::{parse_netdev_user, SlirpNet};
//!
//! // `-netdev user,id=n0,hostfwd=tcp::2222-:22,restrict=on`, the type already stripped or not.
//! let netdev = parse_netdev_user("user,id=n0,hostfwd=tcp::2222-:22,restrict=on")?;
//! let (net, frames) = SlirpNet::spawn(netdev.config)?;
//! // Hand `frames` to netd (clear FD_CLOEXEC if it is exec'd), keep `net` alive while the VM runs;
//! // `net.stats()` counts what was dropped.
//! # drop((net, frames));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The peer should write with MSG_DONTWAIT and drop on EAGAIN too if it must never wait: libslirp's
//! thread reads at most 64 frames per loop round between servicing host sockets.
//!
//! IPv4 only: IPv6 (QEMU's `ipv6=on` default) is off. The embedding process must ignore SIGPIPE, as
//! QEMU does (Rust binaries do by default): libslirp writes to host sockets a peer may have closed.

mod callbacks;
mod config;
mod ffi;
mod netdev_opts;
mod stack;
mod stats;
mod timers;

pub use config::{ConfigError, HostFwd, HostFwdError, HostFwdProtocol, SlirpConfig};
pub use netdev_opts::{parse_netdev_user, NetdevUser, NetdevUserError, SUPPORTED_KEYS};
pub use stack::{SlirpError, SlirpNet};
pub use stats::SlirpNetStats;

/// The linked libslirp's version, e.g. "4.7.0".
pub fn libslirp_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string (or NULL, checked).
    let version = unsafe { ffi::slirp_version_string() };
    if version.is_null() {
        return "unknown".to_owned();
    }
    // SAFETY: non-NULL, static and NUL-terminated per libslirp.h.
    unsafe { std::ffi::CStr::from_ptr(version) }.to_string_lossy().into_owned()
}
