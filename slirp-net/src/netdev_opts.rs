//! `-netdev user,…` option strings, as QEMU spells them, into a [`SlirpConfig`].

use std::net::Ipv4Addr;

use crate::config::{ConfigError, HostFwd, HostFwdError, SlirpConfig};

/// The keys [`parse_netdev_user`] understands.
pub const SUPPORTED_KEYS: &[&str] = &["id", "net", "host", "dhcpstart", "dns", "restrict", "hostfwd", "ipv4", "ipv6"];

/// A parsed `-netdev user` option string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetdevUser {
    /// `id=`, if given (the launcher decides whether it is required).
    pub id: Option<String>,
    pub config: SlirpConfig,
}

/// An option string [`parse_netdev_user`] refuses; each names the key (and value) at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetdevUserError {
    #[error("-netdev user: unsupported option '{key}' (supported: {})", SUPPORTED_KEYS.join(", "))]
    UnknownKey { key: String },
    #[error("-netdev user: option '{key}' given twice")]
    Duplicate { key: String },
    #[error("-netdev user: option '{key}' needs a value ('{key}=…')")]
    MissingValue { key: String },
    #[error("-netdev user: {key}={value}: {reason}")]
    BadValue { key: String, value: String, reason: String },
    #[error("-netdev user: {0}")]
    HostFwd(#[from] HostFwdError),
    #[error("-netdev user: {0}")]
    Config(#[from] ConfigError),
}

/// Parses QEMU's `-netdev user` options: `id=`, `net=ADDR[/BITS|/MASK]`, `host=`, `dhcpstart=`,
/// `dns=`, `restrict=on|off|yes|no` (bare `restrict` is on), `hostfwd=` (repeatable), and
/// `ipv4=on` / `ipv6=off` (the only settings this stack has). A leading `user` (the backend type) is
/// skipped; `,,` is a literal comma as in QEMU's option syntax. As in QEMU, `net=` moves the default
/// host, DHCP start and DNS addresses into the new network, and explicit `host=`/`dhcpstart=`/`dns=`
/// win over that whatever their order.
pub fn parse_netdev_user(opts: &str) -> Result<NetdevUser, NetdevUserError> {
    let mut items = split_options(opts);
    if items.first().is_some_and(|first| first == "user") {
        items.remove(0);
    }
    let mut seen: Vec<String> = Vec::new();
    let mut id = None;
    let mut network = None;
    let (mut host, mut dhcp_start, mut dns) = (None, None, None);
    let mut restrict = false;
    let mut hostfwd = Vec::new();
    for item in items.iter().filter(|item| !item.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (item.as_str(), None),
        };
        if !SUPPORTED_KEYS.contains(&key) {
            return Err(NetdevUserError::UnknownKey { key: key.to_owned() });
        }
        if key != "hostfwd" {
            if seen.iter().any(|earlier| earlier == key) {
                return Err(NetdevUserError::Duplicate { key: key.to_owned() });
            }
            seen.push(key.to_owned());
        }
        // Only QEMU's booleans may stand without a value.
        let value = match (key, value) {
            ("restrict" | "ipv4" | "ipv6", None) => "on",
            (_, Some(value)) => value,
            (_, None) => return Err(NetdevUserError::MissingValue { key: key.to_owned() }),
        };
        let bad = |reason: &str| NetdevUserError::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        match key {
            "id" => id = Some(value.to_owned()),
            "net" => network = Some(parse_network(value).map_err(|reason| bad(&reason))?),
            "host" => host = Some(parse_addr(value).ok_or_else(|| bad("not an IPv4 address"))?),
            "dhcpstart" => dhcp_start = Some(parse_addr(value).ok_or_else(|| bad("not an IPv4 address"))?),
            "dns" => dns = Some(parse_addr(value).ok_or_else(|| bad("not an IPv4 address"))?),
            "restrict" => restrict = parse_bool(value).ok_or_else(|| bad("expected on, off, yes or no"))?,
            "ipv4" => match parse_bool(value) {
                Some(true) => {}
                Some(false) => return Err(bad("this stack always has IPv4")),
                None => return Err(bad("expected on, off, yes or no")),
            },
            "ipv6" => match parse_bool(value) {
                Some(false) => {}
                Some(true) => return Err(bad("IPv6 is not supported by this user network (use ipv6=off)")),
                None => return Err(bad("expected on, off, yes or no")),
            },
            "hostfwd" => hostfwd.push(value.parse::<HostFwd>()?),
            _ => return Err(NetdevUserError::UnknownKey { key: key.to_owned() }),
        }
    }
    let mut config = match network {
        Some((net, netmask)) => SlirpConfig::with_network(net, netmask),
        None => SlirpConfig::default(),
    };
    config.host = host.unwrap_or(config.host);
    config.dhcp_start = dhcp_start.unwrap_or(config.dhcp_start);
    config.dns = dns.unwrap_or(config.dns);
    config.restrict = restrict;
    config.hostfwd = hostfwd;
    config.validate()?;
    Ok(NetdevUser { id, config })
}

/// QEMU's option list: items split at ',', with ",," standing for a literal comma.
fn split_options(opts: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = opts.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                current.push(',');
            }
            ',' => items.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    items.push(current);
    items
}

fn parse_addr(text: &str) -> Option<Ipv4Addr> {
    text.parse().ok()
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "on" | "yes" => Some(true),
        "off" | "no" => Some(false),
        _ => None,
    }
}

/// `ADDR/BITS`, `ADDR/MASK`, or a bare `ADDR` whose mask QEMU infers from its class.
fn parse_network(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let (addr, mask) = match text.split_once('/') {
        Some((addr, mask)) => (addr, Some(mask)),
        None => (text, None),
    };
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("network address '{addr}' is not an IPv4 address"))?;
    let mask = match mask {
        None => classful_mask(addr),
        Some(bits) if !bits.is_empty() && bits.bytes().all(|b| b.is_ascii_digit()) => match bits.parse::<u32>() {
            Ok(bits @ 4..=32) => Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0)),
            _ => return Err(format!("prefix length '{bits}' is not in 4-32")),
        },
        Some(mask) => {
            mask.parse().map_err(|_| format!("netmask '{mask}' is neither a prefix length nor an address"))?
        }
    };
    Ok((addr, mask))
}

/// QEMU's guess at a network's mask when `net=` gives none.
fn classful_mask(addr: Ipv4Addr) -> Ipv4Addr {
    let addr = u32::from(addr);
    let mask = if addr & 0x8000_0000 == 0 {
        0xff00_0000
    } else if addr & 0xfff0_0000 == 0xac10_0000 {
        0xfff0_0000
    } else if addr & 0xc000_0000 == 0x8000_0000 || addr & 0xffff_0000 == 0xc0a8_0000 {
        // Class B, and 192.168.0.0/16.
        0xffff_0000
    } else if addr & 0xffff_0000 == 0xc612_0000 {
        0xfffe_0000
    } else if addr & 0xe000_0000 == 0xe000_0000 {
        0xffff_ff00
    } else {
        0xffff_fff0
    };
    Ipv4Addr::from(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostFwdProtocol;

    #[test]
    fn empty_options_give_qemus_defaults() {
        let parsed = parse_netdev_user("user").unwrap();
        assert_eq!(parsed, NetdevUser { id: None, config: SlirpConfig::default() });
        assert_eq!(parse_netdev_user("").unwrap().config, SlirpConfig::default());
    }

    #[test]
    fn every_supported_key() {
        let parsed = parse_netdev_user(
            "user,id=net0,net=192.168.76.0/24,host=192.168.76.1,dhcpstart=192.168.76.50,dns=192.168.76.53,\
             restrict=yes,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:6000-192.168.76.50:60,ipv4=on,ipv6=off",
        )
        .unwrap();
        assert_eq!(parsed.id.as_deref(), Some("net0"));
        let config = parsed.config;
        assert_eq!(config.net, Ipv4Addr::new(192, 168, 76, 0));
        assert_eq!(config.netmask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(config.host, Ipv4Addr::new(192, 168, 76, 1));
        assert_eq!(config.dhcp_start, Ipv4Addr::new(192, 168, 76, 50));
        assert_eq!(config.dns, Ipv4Addr::new(192, 168, 76, 53));
        assert!(config.restrict);
        assert_eq!(config.hostfwd.len(), 2);
        assert_eq!(config.hostfwd[0].to_string(), "tcp::2222-:22");
        assert_eq!(config.hostfwd[1].protocol, HostFwdProtocol::Udp);
    }

    #[test]
    fn net_moves_the_default_services_and_explicit_ones_win_in_any_order() {
        let config = parse_netdev_user("host=10.9.0.1,net=10.9.0.0/255.255.0.0").unwrap().config;
        assert_eq!(config.netmask, Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(config.host, Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(config.dhcp_start, Ipv4Addr::new(10, 9, 2, 15));
        assert_eq!(config.dns, Ipv4Addr::new(10, 9, 2, 3));
        // A bare class-A address takes a /8, as in QEMU.
        assert_eq!(parse_netdev_user("net=10.0.0.0").unwrap().config.netmask, Ipv4Addr::new(255, 0, 0, 0));
    }

    #[test]
    fn restrict_spellings() {
        for (opts, expected) in [
            ("restrict=on", true),
            ("restrict=yes", true),
            ("restrict", true),
            ("restrict=off", false),
            ("restrict=no", false),
        ] {
            assert_eq!(parse_netdev_user(opts).unwrap().config.restrict, expected, "{opts}");
        }
        assert_eq!(
            parse_netdev_user("restrict=maybe").unwrap_err().to_string(),
            "-netdev user: restrict=maybe: expected on, off, yes or no"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let error = parse_netdev_user("id=n,smb=/srv").unwrap_err();
        assert_eq!(error, NetdevUserError::UnknownKey { key: "smb".to_owned() });
        assert!(error.to_string().starts_with("-netdev user: unsupported option 'smb' (supported: id, net,"));
        assert_eq!(
            parse_netdev_user("dns=10.0.2.3,dns=10.0.2.4").unwrap_err().to_string(),
            "-netdev user: option 'dns' given twice"
        );
        assert_eq!(
            parse_netdev_user("host").unwrap_err().to_string(),
            "-netdev user: option 'host' needs a value ('host=…')"
        );
        assert_eq!(
            parse_netdev_user("net=10.0.2.0/40").unwrap_err().to_string(),
            "-netdev user: net=10.0.2.0/40: prefix length '40' is not in 4-32"
        );
        assert_eq!(
            parse_netdev_user("host=10.0.2.300").unwrap_err().to_string(),
            "-netdev user: host=10.0.2.300: not an IPv4 address"
        );
        assert!(parse_netdev_user("ipv6=on").unwrap_err().to_string().contains("IPv6 is not supported"));
        let hostfwd = parse_netdev_user("hostfwd=tcp::22").unwrap_err().to_string();
        assert!(hostfwd.starts_with("-netdev user: invalid hostfwd rule 'tcp::22': missing '-'"), "{hostfwd}");
        let outside = parse_netdev_user("net=10.1.0.0/16,dhcpstart=10.0.2.15").unwrap_err().to_string();
        assert_eq!(
            outside,
            "-netdev user: dhcpstart address 10.0.2.15 does not belong to network 10.1.0.0/255.255.0.0"
        );
    }

    #[test]
    fn doubled_commas_are_literal() {
        assert_eq!(parse_netdev_user("id=a,,b").unwrap().id.as_deref(), Some("a,b"));
    }
}
