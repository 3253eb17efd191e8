//! `-netdev user`'s host side: libslirp (slirp-net) on a thread of the launcher, one instance
//! per NIC, and the frame socket netd inherits (NetBackendConfig::User's `socket_fd`). The
//! stack lives in the launcher so that a restarted netd finds the guest's connections, DHCP
//! lease and forwarded ports where it left them.
//!
//! Started after the launcher daemonizes (a fork keeps no threads); the option string was
//! checked when it was parsed ([`slirp_config`]).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use slirp_net::{parse_netdev_user, SlirpConfig, SlirpNet};

use crate::devices::{Backend, DeviceSet};
use crate::net_opts::NetdevKind;
use crate::qemu_opts::ValueError;

/// QEMU's `-netdev user` keys this launcher passes on, back in QEMU's spelling, as slirp-net
/// parses them.
fn option_string(restrict: bool, hostfwd: &[String], net: Option<&str>, addrs: &[(String, String)]) -> String {
    let mut s = format!("restrict={}", if restrict { "on" } else { "off" });
    if let Some(n) = net {
        s.push_str(&format!(",net={n}"));
    }
    for (k, v) in addrs {
        s.push_str(&format!(",{k}={v}"));
    }
    for h in hostfwd {
        s.push_str(&format!(",hostfwd={}", h.replace(',', ",,")));
    }
    s
}

/// The stack's configuration for these options (QEMU's checks: the network, the forwards).
pub fn slirp_config(
    restrict: bool,
    hostfwd: &[String],
    net: Option<&str>,
    addrs: &[(String, String)],
) -> Result<SlirpConfig, ValueError> {
    parse_netdev_user(&option_string(restrict, hostfwd, net, addrs)).map(|u| u.config).map_err(|e| {
        let text = e.to_string();
        ValueError::new(text.strip_prefix("-netdev user: ").unwrap_or(&text).to_string())
    })
}

/// One NIC's running user network.
pub struct UserNet {
    pub nic: String,
    /// Kept alive while the VM runs; dropping it stops libslirp.
    _stack: SlirpNet,
    frames: OwnedFd,
}

impl UserNet {
    /// The frame socket's number, as netd inherits it.
    pub fn fd(&self) -> RawFd {
        self.frames.as_raw_fd()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{location}: {source}")]
pub struct UserNetError {
    pub location: String,
    #[source]
    pub source: slirp_net::SlirpError,
}

/// Starts the user network of every NIC netd serves on one.
pub fn start_all(set: &DeviceSet) -> Result<Vec<UserNet>, UserNetError> {
    let mut out = Vec::new();
    for nic in &set.nics {
        if !set.devices.iter().any(|d| d.backend == Backend::Netd(nic.name.clone())) {
            continue;
        }
        let Some(d) = set.net.netdev_of(nic) else { continue };
        let NetdevKind::User { restrict, hostfwd, net, addrs } = &d.kind else { continue };
        let at = |source| UserNetError { location: d.location.clone(), source };
        // Checked at parse time; a failure here is the same error, reported the same way.
        let config = slirp_config(*restrict, hostfwd, net.as_deref(), addrs).map_err(|e| {
            at(slirp_net::SlirpError::Os { what: "parse the options", source: std::io::Error::other(e.message) })
        })?;
        let (stack, frames) = SlirpNet::spawn(config).map_err(at)?;
        tracing::info!(nic = %nic.name, netdev = %d.id, fd = frames.as_raw_fd(), "user network started");
        out.push(UserNet { nic: nic.name.clone(), _stack: stack, frames });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_reach_slirp_net_in_qemu_spelling() {
        assert_eq!(
            option_string(true, &["tcp::2222-:22".into()], Some("10.0.3.0/24"), &[("dns".into(), "10.0.3.53".into())]),
            "restrict=on,net=10.0.3.0/24,dns=10.0.3.53,hostfwd=tcp::2222-:22"
        );
        let c = slirp_config(false, &[], Some("10.0.3.0/24"), &[]).expect("config");
        assert_eq!(c.host, std::net::Ipv4Addr::new(10, 0, 3, 2), "QEMU's host address in the network");
        let c = slirp_config(false, &[], None, &[("host".into(), "10.0.2.9".into())]).expect("config");
        assert_eq!(c.host, std::net::Ipv4Addr::new(10, 0, 2, 9));
        let e = slirp_config(false, &[], None, &[("dns".into(), "192.168.1.1".into())]).expect_err("outside");
        assert!(e.message.contains("dns"), "{}", e.message);
        let e = slirp_config(false, &[], Some("10.0.3.0/40"), &[]).expect_err("no such mask");
        assert!(!e.message.starts_with("-netdev user"), "{}", e.message);
    }
}
