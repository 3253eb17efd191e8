//! The user-mode network's addresses, restriction and port forwards, with QEMU's defaults and checks
//! (`net/slirp.c`'s `net_slirp_init` and `slirp_hostfwd`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// What `-netdev user` configures. `Default` is QEMU's: 10.0.2.0/24, host 10.0.2.2, DHCP from
/// 10.0.2.15, DNS 10.0.2.3, unrestricted, no forwards. IPv6 is off (QEMU's default is on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlirpConfig {
    /// The guest network's address (`net=`), host bits clear.
    pub net: Ipv4Addr,
    /// Its mask (`net=ADDR/BITS` or `net=ADDR/MASK`).
    pub netmask: Ipv4Addr,
    /// The host's (gateway's) address inside the guest network (`host=`).
    pub host: Ipv4Addr,
    /// The first address the DHCP server hands out (`dhcpstart=`).
    pub dhcp_start: Ipv4Addr,
    /// The virtual DNS server that forwards to the host's resolvers (`dns=`).
    pub dns: Ipv4Addr,
    /// `restrict=on`: the guest reaches only the virtual services and what `hostfwd` forwards in.
    pub restrict: bool,
    /// `hostfwd=` rules, in order.
    pub hostfwd: Vec<HostFwd>,
}

impl Default for SlirpConfig {
    fn default() -> Self {
        SlirpConfig::with_network(Ipv4Addr::new(10, 0, 2, 0), Ipv4Addr::new(255, 255, 255, 0))
    }
}

impl SlirpConfig {
    /// A network at `net`/`netmask` with the host, DHCP start and DNS addresses QEMU derives
    /// from it: `.2.2`, `.2.15` and `.2.3` under the mask's host bits (10.0.2.2 in a /24 of 10.0.2.0).
    pub fn with_network(net: Ipv4Addr, netmask: Ipv4Addr) -> Self {
        let net_bits = u32::from(net) & u32::from(netmask);
        let in_net = |low: u32| Ipv4Addr::from(net_bits | (low & !u32::from(netmask)));
        SlirpConfig {
            net: Ipv4Addr::from(net_bits),
            netmask,
            host: in_net(0x0202),
            dhcp_start: in_net(0x020f),
            dns: in_net(0x0203),
            restrict: false,
            hostfwd: Vec::new(),
        }
    }

    /// QEMU's consistency checks: host, DNS and DHCP start lie in the network and differ.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mask = u32::from(self.netmask);
        let inside = |addr: Ipv4Addr| u32::from(addr) & mask == u32::from(self.net);
        if u32::from(self.net) & !mask != 0 {
            return Err(ConfigError::HostBitsSet { net: self.net, netmask: self.netmask });
        }
        for (role, addr) in [("host", self.host), ("dns", self.dns), ("dhcpstart", self.dhcp_start)] {
            if !inside(addr) {
                return Err(ConfigError::OutsideNetwork { role, addr, net: self.net, netmask: self.netmask });
            }
        }
        if self.dns == self.host {
            return Err(ConfigError::Clash { first: "dns", second: "host", addr: self.dns });
        }
        if self.dhcp_start == self.host {
            return Err(ConfigError::Clash { first: "dhcpstart", second: "host", addr: self.dhcp_start });
        }
        if self.dhcp_start == self.dns {
            return Err(ConfigError::Clash { first: "dhcpstart", second: "dns", addr: self.dhcp_start });
        }
        Ok(())
    }
}

/// An inconsistent [`SlirpConfig`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("network {net} has bits set outside its mask {netmask}")]
    HostBitsSet { net: Ipv4Addr, netmask: Ipv4Addr },
    #[error("{role} address {addr} does not belong to network {net}/{netmask}")]
    OutsideNetwork { role: &'static str, addr: Ipv4Addr, net: Ipv4Addr, netmask: Ipv4Addr },
    #[error("{first} address {addr} must differ from the {second} address")]
    Clash { first: &'static str, second: &'static str, addr: Ipv4Addr },
}

/// The transport a forward carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostFwdProtocol {
    Tcp,
    Udp,
}

/// One `hostfwd=[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport` rule: connections (or
/// datagrams) to `host_addr:host_port` on the host reach `guest_addr:guest_port` in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFwd {
    pub protocol: HostFwdProtocol,
    /// Empty in the rule: every host address (0.0.0.0), as QEMU.
    pub host_addr: Ipv4Addr,
    /// 0 lets the kernel pick, as QEMU allows.
    pub host_port: u16,
    /// Empty in the rule: the DHCP start address (the first guest's lease), as QEMU.
    pub guest_addr: Option<Ipv4Addr>,
    pub guest_port: u16,
}

/// A `hostfwd=` rule that does not parse; names the rule and the part at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid hostfwd rule '{rule}': {problem} (expected [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport)")]
pub struct HostFwdError {
    pub rule: String,
    pub problem: String,
}

impl FromStr for HostFwd {
    type Err = HostFwdError;

    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        let fail = |problem: String| HostFwdError { rule: rule.to_owned(), problem };
        let (protocol, rest) = rule.split_once(':').ok_or_else(|| fail("missing ':' after the protocol".to_owned()))?;
        let protocol = match protocol {
            "" | "tcp" => HostFwdProtocol::Tcp,
            "udp" => HostFwdProtocol::Udp,
            other => return Err(fail(format!("protocol '{other}' is neither tcp nor udp"))),
        };
        let (host_addr, rest) =
            rest.split_once(':').ok_or_else(|| fail("missing ':' after the host address".to_owned()))?;
        let host_addr = match host_addr {
            "" => Ipv4Addr::UNSPECIFIED,
            text => text.parse().map_err(|_| fail(format!("host address '{text}' is not an IPv4 address")))?,
        };
        let (host_port, guest) =
            rest.split_once('-').ok_or_else(|| fail("missing '-' between the host and the guest side".to_owned()))?;
        let host_port = parse_port(host_port, 0)
            .ok_or_else(|| fail(format!("host port '{host_port}' is not a number in 0-65535")))?;
        let (guest_addr, guest_port) =
            guest.split_once(':').ok_or_else(|| fail("missing ':' between the guest address and port".to_owned()))?;
        let guest_addr = match guest_addr {
            "" => None,
            text => Some(text.parse().map_err(|_| fail(format!("guest address '{text}' is not an IPv4 address")))?),
        };
        let guest_port = parse_port(guest_port, 1)
            .ok_or_else(|| fail(format!("guest port '{guest_port}' is not a number in 1-65535")))?;
        Ok(HostFwd { protocol, host_addr, host_port, guest_addr, guest_port })
    }
}

fn parse_port(text: &str, min: u16) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|port| *port >= min)
}

impl fmt::Display for HostFwd {
    /// QEMU's spelling, the empty fields kept empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            HostFwdProtocol::Tcp => "tcp",
            HostFwdProtocol::Udp => "udp",
        };
        write!(f, "{protocol}:")?;
        if !self.host_addr.is_unspecified() {
            write!(f, "{}", self.host_addr)?;
        }
        write!(f, ":{}-", self.host_port)?;
        if let Some(guest) = self.guest_addr {
            write!(f, "{guest}")?;
        }
        write!(f, ":{}", self.guest_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qemus() {
        let config = SlirpConfig::default();
        assert_eq!(config.net, Ipv4Addr::new(10, 0, 2, 0));
        assert_eq!(config.netmask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(config.host, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(config.dhcp_start, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(config.dns, Ipv4Addr::new(10, 0, 2, 3));
        assert!(!config.restrict);
        config.validate().unwrap();
    }

    #[test]
    fn a_wider_network_places_the_services_as_qemu() {
        let config = SlirpConfig::with_network(Ipv4Addr::new(192, 168, 7, 9), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(config.net, Ipv4Addr::new(192, 168, 0, 0));
        assert_eq!(config.host, Ipv4Addr::new(192, 168, 2, 2));
        assert_eq!(config.dhcp_start, Ipv4Addr::new(192, 168, 2, 15));
        assert_eq!(config.dns, Ipv4Addr::new(192, 168, 2, 3));
    }

    #[test]
    fn validate_names_the_address_at_fault() {
        let mut config = SlirpConfig { dns: Ipv4Addr::new(10, 0, 3, 3), ..SlirpConfig::default() };
        assert!(config.validate().unwrap_err().to_string().starts_with("dns address 10.0.3.3 does not belong"));
        config.dns = config.host;
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "dns address 10.0.2.2 must differ from the host address"
        );
    }

    #[test]
    fn hostfwd_full_and_short_forms() {
        let full: HostFwd = "tcp:127.0.0.1:2222-10.0.2.15:22".parse().unwrap();
        assert_eq!(
            full,
            HostFwd {
                protocol: HostFwdProtocol::Tcp,
                host_addr: Ipv4Addr::LOCALHOST,
                host_port: 2222,
                guest_addr: Some(Ipv4Addr::new(10, 0, 2, 15)),
                guest_port: 22,
            }
        );
        let short: HostFwd = "tcp::2222-:22".parse().unwrap();
        assert_eq!(short.host_addr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(short.guest_addr, None);
        assert_eq!(short.to_string(), "tcp::2222-:22");
        let udp: HostFwd = "udp::5353-10.0.2.15:53".parse().unwrap();
        assert_eq!(udp.protocol, HostFwdProtocol::Udp);
        let no_protocol: HostFwd = "::80-:8080".parse().unwrap();
        assert_eq!(no_protocol.protocol, HostFwdProtocol::Tcp);
        assert_eq!(full.to_string(), "tcp:127.0.0.1:2222-10.0.2.15:22");
    }

    #[test]
    fn hostfwd_errors_name_the_bad_part() {
        let problem = |rule: &str| rule.parse::<HostFwd>().unwrap_err().problem;
        assert_eq!(problem("sctp::1-:2"), "protocol 'sctp' is neither tcp nor udp");
        assert_eq!(problem("tcp"), "missing ':' after the protocol");
        assert_eq!(problem("tcp:127.0.0.1"), "missing ':' after the host address");
        assert_eq!(problem("tcp:2222-:22"), "host address '2222-' is not an IPv4 address");
        assert_eq!(problem("tcp:localhost:2222-:22"), "host address 'localhost' is not an IPv4 address");
        assert_eq!(problem("tcp::2222:22"), "missing '-' between the host and the guest side");
        assert_eq!(problem("tcp::70000-:22"), "host port '70000' is not a number in 0-65535");
        assert_eq!(problem("tcp::-1-:22"), "host port '' is not a number in 0-65535");
        assert_eq!(problem("tcp::2222-22"), "missing ':' between the guest address and port");
        assert_eq!(problem("tcp::2222-10.0.2:22"), "guest address '10.0.2' is not an IPv4 address");
        assert_eq!(problem("tcp::2222-:0"), "guest port '0' is not a number in 1-65535");
        assert_eq!(problem("tcp::2222-:ssh"), "guest port 'ssh' is not a number in 1-65535");
        let message = "tcp::2222-:ssh".parse::<HostFwd>().unwrap_err().to_string();
        assert!(message.starts_with("invalid hostfwd rule 'tcp::2222-:ssh': guest port 'ssh'"), "{message}");
    }
}
