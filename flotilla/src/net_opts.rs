//! The network part of qemu-system-x86_64's command line: `-netdev tap|user|vhost-user`,
//! `-device virtio-net-pci`'s properties, QEMU 1.1's `-net nic|tap|user|none` (a NIC and its host
//! side joined by `vlan=`), checked as QEMU checks them.
//!
//! Parsing records what was asked ([`NetSet`]); [`NetSet::resolve`] pairs NICs with their host
//! sides and gives NICs their default MACs and names once every option is in. Opening the taps is
//! `tap.rs`'s (before anything starts), spawning netd `device_daemons.rs`'s.

use crate::qemu_opts::{parse_bool, parse_keyvals, ValueError};

/// QEMU's first default MAC address; the next NIC without `mac=` gets the next one.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Most queue pairs a NIC may have (2 * pairs + 1 virtqueues must fit vmm-core's 64).
pub const MAX_QUEUE_PAIRS: u16 = 31;
/// virtio-net-pci's queue size (QEMU's rx/tx_queue_size default).
pub const NET_QUEUE_SIZE: u16 = 256;

/// Where a NIC's frames go on the host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetdevKind {
    /// `-netdev tap`: the launcher opens the tap (or takes `fd=`) and netd inherits it.
    Tap {
        /// `ifname=`; None: the kernel names a new tap (`tap%d`), which needs CAP_NET_ADMIN.
        ifname: Option<String>,
        /// `fd=`: an open tap descriptor the launcher inherited.
        fd: Option<i32>,
        /// `queues=`: tap queues (one descriptor each).
        queues: u16,
        /// `vnet_hdr=`: None is QEMU's default (use it).
        vnet_hdr: Option<bool>,
    },
    /// `-netdev user`: libslirp (in the launcher, see `user_net.rs`), netd on its frames.
    User {
        restrict: bool,
        hostfwd: Vec<String>,
        net: Option<String>,
        /// `host=`, `dhcpstart=`, `dns=`: slirp's addresses, as given (the stack checks them).
        addrs: Vec<(String, String)>,
    },
    /// `-netdev vhost-user,chardev=`: an external backend; vmm-core connects to the chardev's
    /// socket and no netd runs for it.
    VhostUser { chardev: String, queues: u16 },
}

impl NetdevKind {
    /// QEMU's type name (`info network`'s `type=`, the `-net` client's name prefix).
    pub fn type_name(&self) -> &'static str {
        match self {
            NetdevKind::Tap { .. } => "tap",
            NetdevKind::User { .. } => "user",
            NetdevKind::VhostUser { .. } => "vhost-user",
        }
    }

    /// Queue pairs the host side can serve.
    pub fn queues(&self) -> u16 {
        match self {
            NetdevKind::Tap { queues, .. } | NetdevKind::VhostUser { queues, .. } => *queues,
            NetdevKind::User { .. } => 1,
        }
    }
}

/// One `-netdev` (or `-net tap|user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdevSpec {
    pub location: String,
    /// `id=` (`-net`: `name=`, else QEMU's `TYPE.N`).
    pub id: String,
    pub kind: NetdevKind,
    /// `-net ...,vlan=N`: joined to the NIC of the same vlan; None for `-netdev`.
    pub vlan: Option<u32>,
}

/// A virtio-net-pci NIC's own properties (`-device virtio-net-pci` or `-net nic`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NicProps {
    /// `netdev=` (resolved from `vlan=` for `-net nic`).
    pub netdev: Option<String>,
    /// `mac=` / `macaddr=`; the default is given in [`NetSet::resolve`].
    pub mac: Option<[u8; 6]>,
    /// `mq=on`: offer the host side's queue pairs to the guest (VIRTIO_NET_F_MQ).
    pub mq: bool,
    /// `vectors=`: MSI-X table entries.
    pub vectors: Option<u16>,
    /// `-net nic,vlan=`.
    pub vlan: Option<u32>,
    /// `-net nic,name=`: the NIC's net client name.
    pub name: Option<String>,
}

/// A NIC once resolved: what netd and `info network` need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub location: String,
    /// The net client name: the qdev id, `name=`, or QEMU's `virtio-net-pci.N`.
    pub name: String,
    pub netdev: String,
    pub mac: [u8; 6],
    pub queue_pairs: u16,
}

/// Everything the network options asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetSet {
    pub netdevs: Vec<NetdevSpec>,
    /// Notes printed at start (QEMU would act differently, the VM still works).
    pub warnings: Vec<String>,
    /// `-net none` was given.
    pub none: bool,
}

/// `info network`'s MAC spelling.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

/// QEMU's MAC syntax: six pairs of hex digits separated by `:` or `-`.
pub fn parse_mac(v: &str) -> Option<[u8; 6]> {
    let b = v.as_bytes();
    if b.len() != 17 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        let pair = v.get(i * 3..i * 3 + 2)?;
        if !pair.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *m = u8::from_str_radix(pair, 16).ok()?;
        if i < 5 && !matches!(b[i * 3 + 2], b':' | b'-') {
            return None;
        }
    }
    Some(mac)
}

fn checked_mac(v: &str, syntax_error: impl Fn() -> ValueError) -> Result<[u8; 6], ValueError> {
    let mac = parse_mac(v).ok_or_else(syntax_error)?;
    if mac[0] & 1 != 0 {
        // QEMU's words (-net nic); a multicast source address is not a NIC's.
        return Err(ValueError::new("NIC cannot have multicast MAC address (odd 1st byte)"));
    }
    Ok(mac)
}

fn parse_queues(key: &str, v: &str) -> Result<u16, ValueError> {
    let n: u32 = v
        .parse()
        .ok()
        .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ValueError::new(format!("Parameter '{key}' expects a number")))?;
    if n == 0 {
        return Err(ValueError::new(format!("{key}=0: a netdev needs at least one queue")));
    }
    if n > u32::from(MAX_QUEUE_PAIRS) {
        return Err(ValueError::new(format!("{key}={n} is more than flotilla supports ({MAX_QUEUE_PAIRS})")));
    }
    Ok(n as u16)
}

fn parse_vlan(v: &str) -> Result<u32, ValueError> {
    v.parse()
        .ok()
        .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ValueError::new("Parameter 'vlan' expects a number"))
}

/// QEMU's id check (`id_wellformed`).
pub fn check_netdev_id(id: &str) -> Result<(), ValueError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ValueError::with_hint(
            "Parameter 'id' expects an identifier",
            "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
        ))
    }
}

/// A `hostfwd=` rule's syntax, as QEMU's slirp_hostfwd() reads it:
/// `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`. netd applies it; this catches typos
/// before anything starts.
pub fn check_hostfwd(rule: &str) -> Result<(), ValueError> {
    let bad = |why: &str| ValueError::new(format!("Invalid host forwarding rule '{rule}' ({why})"));
    let (proto, rest) = rule.split_once(':').ok_or_else(|| bad("No : separators"))?;
    if !matches!(proto, "" | "tcp" | "udp") {
        return Err(bad("Bad protocol name"));
    }
    let (host, guest) = rest.split_once('-').ok_or_else(|| bad("No - separator"))?;
    let port = |part: &str, what: &str| -> Result<(), ValueError> {
        let (addr, p) = part.rsplit_once(':').ok_or_else(|| bad(&format!("Missing {what} port separator")))?;
        if !addr.is_empty() && addr.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(bad(&format!("Bad {what} address")));
        }
        p.parse::<u16>().ok().filter(|&n| n != 0).map(|_| ()).ok_or_else(|| bad(&format!("Bad {what} port")))
    };
    port(host, "host")?;
    port(guest, "guest")
}

impl NetSet {
    fn id_taken(&self, id: &str) -> bool {
        self.netdevs.iter().any(|n| n.id == id)
    }

    /// The next `TYPE.N` name QEMU gives a `-net` client without `name=`.
    fn legacy_name(&self, ty: &str) -> String {
        let mut n = 0;
        while self.id_taken(&format!("{ty}.{n}")) {
            n += 1;
        }
        format!("{ty}.{n}")
    }

    /// `-netdev TYPE,id=ID,...`
    pub fn netdev(&mut self, arg: &str) -> Result<(), ValueError> {
        let mut pairs = parse_keyvals(arg, Some("type")).into_iter().peekable();
        let ty = match pairs.peek() {
            Some((k, v)) if k == "type" => v.clone(),
            _ => return Err(ValueError::new("Parameter 'type' is missing")),
        };
        pairs.next();
        let rest: Vec<(String, String)> = pairs.collect();
        let mut id = None;
        let mut others = Vec::new();
        for (k, v) in rest {
            if k == "id" {
                id = Some(v);
            } else {
                others.push((k, v));
            }
        }
        let kind = self.backend(&ty, others, false)?;
        let id = id.ok_or_else(|| ValueError::new("Parameter 'id' is missing"))?;
        check_netdev_id(&id)?;
        if self.id_taken(&id) {
            return Err(ValueError::new(format!("Duplicate ID '{id}' for netdev")));
        }
        self.netdevs.push(NetdevSpec { location: format!("-netdev {arg}"), id, kind, vlan: None });
        Ok(())
    }

    /// QEMU 1.1's `-net nic|tap|user|none[,...]`. A `-net nic` becomes a pending virtio-net-pci
    /// device: returned for the caller (devices.rs) to place in PCI order.
    pub fn net(&mut self, arg: &str) -> Result<Option<NicProps>, ValueError> {
        let mut pairs = parse_keyvals(arg, Some("type")).into_iter().peekable();
        let ty = match pairs.peek() {
            Some((k, v)) if k == "type" => v.clone(),
            _ => return Err(ValueError::new("Parameter 'type' is missing")),
        };
        pairs.next();
        let mut vlan = None;
        let mut name = None;
        let mut others = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "vlan" => vlan = Some(parse_vlan(&v)?),
                "name" => name = Some(v),
                _ => others.push((k, v)),
            }
        }
        match ty.as_str() {
            "none" => {
                if let Some((k, _)) = others.first() {
                    return Err(ValueError::new(format!("Invalid parameter '{k}'")));
                }
                self.none = true;
                Ok(None)
            }
            "nic" => Ok(Some(nic_from_net(others, vlan.unwrap_or(0), name)?)),
            _ => {
                let kind = self.backend(&ty, others, true)?;
                let id = match name {
                    Some(n) => {
                        check_netdev_id(&n)?;
                        if self.id_taken(&n) {
                            return Err(ValueError::new(format!("Duplicate ID '{n}' for net")));
                        }
                        n
                    }
                    None => self.legacy_name(kind.type_name()),
                };
                let vlan = Some(vlan.unwrap_or(0));
                self.netdevs.push(NetdevSpec { location: format!("-net {arg}"), id, kind, vlan });
                Ok(None)
            }
        }
    }

    /// The host side of `-netdev TYPE` / `-net TYPE`, from its keys (id/name/vlan taken out).
    fn backend(&mut self, ty: &str, keys: Vec<(String, String)>, legacy: bool) -> Result<NetdevKind, ValueError> {
        match ty {
            "tap" => self.tap(keys),
            "user" => user(keys),
            "vhost-user" if !legacy => vhost_user(keys),
            "bridge" | "socket" | "stream" | "dgram" | "l2tpv3" | "vde" | "netmap" | "vhost-vdpa" | "af-xdp"
            | "hubport" | "dump" => {
                Err(ValueError::with_hint(format!("network backend '{ty}' is not supported by flotilla"), NET_FORMS))
            }
            _ if legacy => Err(ValueError::new(format!("Parameter 'type' expects a net type ('{ty}' is not)"))),
            _ => Err(ValueError::new(format!("Parameter 'type' does not accept value '{ty}'"))),
        }
    }

    fn tap(&mut self, keys: Vec<(String, String)>) -> Result<NetdevKind, ValueError> {
        let mut ifname = None;
        let mut fd = None;
        let mut queues = None;
        let mut vnet_hdr = None;
        let mut given = Vec::new();
        for (k, v) in keys {
            match k.as_str() {
                "ifname" => ifname = Some(v).filter(|s| !s.is_empty()),
                "script" | "downscript" => {
                    // QEMU runs no script for "no" or an empty value; flotilla runs none at all.
                    if !(v.is_empty() || v == "no") {
                        return Err(ValueError::with_hint(
                            format!("{k}={v}: flotilla runs no network scripts"),
                            format!("set up the tap beforehand and pass {k}=no"),
                        ));
                    }
                }
                "fd" => {
                    let n: i32 = v
                        .parse()
                        .ok()
                        .filter(|&n| n >= 0 && v.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| ValueError::new(format!("Invalid file descriptor number '{v}'")))?;
                    fd = Some(n);
                }
                "queues" => queues = Some(parse_queues("queues", &v)?),
                "vnet_hdr" => vnet_hdr = Some(parse_bool(&k, &v)?),
                "vhost" | "vhostforce" => {
                    if parse_bool(&k, &v)? {
                        // The in-kernel vhost-net data path would bypass netd (and vmm-core
                        // would have to drive /dev/vhost-net itself); the NIC works the same
                        // through netd, so the option is taken as a hint, not refused.
                        let note = format!(
                            "warning: -netdev tap,{k}={v}: flotilla serves the NIC's queues in netd (vhost-user); the kernel's vhost-net is not used"
                        );
                        if !self.warnings.contains(&note) {
                            self.warnings.push(note);
                        }
                    }
                }
                "vhostfd" | "vhostfds" => {
                    return Err(ValueError::new(format!(
                        "{k}= is not supported by flotilla: netd serves the queues, not the kernel's vhost-net"
                    )))
                }
                "fds" | "helper" | "br" | "poll-us" | "sndbuf" => {
                    return Err(ValueError::with_hint(
                        format!("tap option '{k}' is not supported by flotilla"),
                        "flotilla supports -netdev tap,id=ID,ifname=NAME,script=no,downscript=no[,fd=N][,queues=N][,vnet_hdr=on|off][,vhost=off]",
                    ))
                }
                _ => return Err(ValueError::new(format!("Invalid parameter '{k}'"))),
            }
            given.push(k);
        }
        let with_fd = ["ifname", "script", "downscript", "vnet_hdr", "queues"];
        if fd.is_some() && given.iter().any(|k| with_fd.contains(&k.as_str())) {
            // QEMU's words.
            return Err(ValueError::new(
                "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= are invalid with fd=",
            ));
        }
        Ok(NetdevKind::Tap { ifname, fd, queues: queues.unwrap_or(1), vnet_hdr })
    }

    /// Pairs every NIC with its host side and gives it its name and MAC. `nics` are the NICs'
    /// `(location, qdev id, props)` in PCI order.
    pub fn resolve(&self, nics: &[(String, String, NicProps)]) -> Result<Vec<NicSpec>, (String, ValueError)> {
        let mut out: Vec<NicSpec> = Vec::new();
        let mut used: Vec<&str> = Vec::new();
        let mut next_default = 0u8;
        let explicit: Vec<[u8; 6]> = nics.iter().filter_map(|(_, _, p)| p.mac).collect();
        for (location, qdev_id, p) in nics {
            let at = |e: ValueError| (location.clone(), e);
            let netdev = match (&p.netdev, p.vlan) {
                (Some(n), _) => {
                    let Some(nd) = self.netdevs.iter().find(|d| d.id == *n && d.vlan.is_none()) else {
                        return Err(at(ValueError::new(format!(
                            "Property 'virtio-net-pci.netdev' can't find value '{n}'"
                        ))));
                    };
                    nd
                }
                (None, Some(vlan)) => {
                    let mut on_vlan = self.netdevs.iter().filter(|d| d.vlan == Some(vlan));
                    let Some(nd) = on_vlan.next() else {
                        return Err(at(ValueError::with_hint(
                            format!("vlan {vlan} has no host side for this NIC"),
                            format!("add -net tap,vlan={vlan},... or -net user,vlan={vlan}"),
                        )));
                    };
                    if let Some(second) = on_vlan.next() {
                        return Err((
                            second.location.clone(),
                            ValueError::new(format!(
                                "flotilla connects one NIC to one host side: vlan {vlan} already has '{}'",
                                nd.id
                            )),
                        ));
                    }
                    nd
                }
                (None, None) => {
                    return Err(at(ValueError::with_hint(
                        "netdev property not set: a NIC without a host side is not supported by flotilla",
                        "add -netdev tap|user|vhost-user,id=ID and netdev=ID",
                    )))
                }
            };
            if used.contains(&netdev.id.as_str()) {
                let what = if netdev.vlan.is_some() { "vlan" } else { "netdev" };
                return Err(at(ValueError::new(if what == "netdev" {
                    format!("Property 'virtio-net-pci.netdev' can't take value '{}', it's in use", netdev.id)
                } else {
                    format!("flotilla connects one NIC per vlan: vlan {} already has one", netdev.vlan.unwrap_or(0))
                })));
            }
            used.push(&netdev.id);
            let mac = match p.mac {
                Some(m) => m,
                None => loop {
                    let mut m = DEFAULT_MAC;
                    m[5] = m[5].wrapping_add(next_default);
                    next_default = next_default.wrapping_add(1);
                    if !explicit.contains(&m) {
                        break m;
                    }
                },
            };
            let name = match (&p.name, qdev_id.is_empty()) {
                (Some(n), _) => n.clone(),
                (None, false) => qdev_id.clone(),
                (None, true) => {
                    let mut n = 0;
                    while out.iter().any(|x| x.name == format!("virtio-net-pci.{n}")) {
                        n += 1;
                    }
                    format!("virtio-net-pci.{n}")
                }
            };
            if out.iter().any(|x| x.name == name) || self.netdevs.iter().any(|d| d.id == name && d.id != netdev.id) {
                return Err(at(ValueError::new(format!("Duplicate ID '{name}' for net client"))));
            }
            let pairs = netdev.kind.queues();
            out.push(NicSpec {
                location: location.clone(),
                name,
                netdev: netdev.id.clone(),
                mac,
                queue_pairs: if p.mq { pairs } else { 1 },
            });
        }
        Ok(out)
    }

    /// What to tell the user at start about the resolved NICs: the parse-time notes, NICs that
    /// leave queues of their netdev unused, netdevs no NIC uses.
    pub fn resolve_notes(&self, nics: &[NicSpec]) -> Vec<String> {
        let mut notes = self.warnings.clone();
        for n in nics {
            let pairs = self.netdev_of(n).map_or(1, |d| d.kind.queues());
            if pairs > n.queue_pairs {
                notes.push(format!(
                    "warning: {}: netdev '{}' has {pairs} queues; without mq=on the guest uses one",
                    n.location, n.netdev
                ));
            }
        }
        for d in &self.netdevs {
            if !nics.iter().any(|n| n.netdev == d.id) {
                notes.push(format!("warning: {}: no NIC uses '{}'; it is not started", d.location, d.id));
            }
        }
        notes
    }

    /// The netdev a NIC uses.
    pub fn netdev_of(&self, nic: &NicSpec) -> Option<&NetdevSpec> {
        self.netdevs.iter().find(|d| d.id == nic.netdev)
    }
}

/// QEMU's `info_str` of a host side: `ifname=tap0,script=no,downscript=no` (or `fd=N`),
/// `net=10.0.2.0,restrict=off`, `vhost-user{q} to CHARDEV` (`{q}`: the queue, filled in by the
/// gateway). `ifname` is the tap's real name when the launcher opened it.
pub fn info_str(kind: &NetdevKind, ifname: Option<&str>) -> String {
    match kind {
        NetdevKind::Tap { fd: Some(fd), .. } => format!("fd={fd}"),
        NetdevKind::Tap { ifname: asked, .. } => {
            let name = ifname.or(asked.as_deref()).unwrap_or_default();
            format!("ifname={name},script=no,downscript=no")
        }
        NetdevKind::User { restrict, net, .. } => {
            let addr = net.as_deref().map_or("10.0.2.0", |n| n.split('/').next().unwrap_or(n));
            format!("net={addr},restrict={}", if *restrict { "on" } else { "off" })
        }
        NetdevKind::VhostUser { chardev, .. } => format!("vhost-user{{q}} to {chardev}"),
    }
}

/// The gateway's `--nic` values (qmp-gateway's `hmp_net::Nic`, for `info network`).
pub fn gateway_nic_args(set: &NetSet, nics: &[NicSpec], taps: &[crate::tap::NicTap]) -> Vec<String> {
    let mut args = Vec::new();
    for n in nics {
        let Some(d) = set.netdev_of(n) else { continue };
        let ifname = taps.iter().find(|t| t.nic == n.name).map(|t| t.queues.ifname.as_str());
        let v = serde_json::json!({
            "name": n.name,
            "model": "virtio-net-pci",
            "macaddr": format_mac(&n.mac),
            "queues": n.queue_pairs,
            "hub": d.vlan,
            "peer": {"name": d.id, "type": d.kind.type_name(), "info": info_str(&d.kind, ifname)},
        });
        args.push("--nic".to_string());
        args.push(v.to_string());
    }
    args
}

/// What the help and errors list.
pub const NET_FORMS: &str = "flotilla supports -netdev tap|user|vhost-user and -net nic|tap|user|none";

fn user(keys: Vec<(String, String)>) -> Result<NetdevKind, ValueError> {
    let mut restrict = false;
    let mut hostfwd = Vec::new();
    let mut net = None;
    let mut addrs = Vec::new();
    for (k, v) in keys {
        match k.as_str() {
            "restrict" => restrict = parse_bool(&k, &v)?,
            "host" | "dhcpstart" | "dns" => {
                if v.parse::<std::net::Ipv4Addr>().is_err() {
                    return Err(ValueError::new(format!("Parameter '{k}' expects an IPv4 address ('{v}')")));
                }
                addrs.push((k, v));
            }
            "hostfwd" => {
                check_hostfwd(&v)?;
                hostfwd.push(v);
            }
            "net" => {
                let (addr, bits) = v.split_once('/').unwrap_or((v.as_str(), ""));
                let ok = addr.parse::<std::net::Ipv4Addr>().is_ok()
                    && (bits.is_empty()
                        || bits.parse::<u8>().is_ok_and(|b| b <= 32)
                        || bits.parse::<std::net::Ipv4Addr>().is_ok());
                if !ok {
                    return Err(ValueError::new(format!("Parameter 'net' expects an IPv4 network ('{v}')")));
                }
                net = Some(v);
            }
            "ipv4" => {
                if !parse_bool(&k, &v)? {
                    return Err(ValueError::new("ipv4=off is not supported by flotilla (user networking is IPv4)"));
                }
            }
            "ipv6" => {
                if parse_bool(&k, &v)? {
                    return Err(ValueError::new("ipv6=on is not supported by flotilla (user networking is IPv4 only)"));
                }
            }
            "hostname" | "domainname" | "dnssearch" | "tftp" | "tftp-server-name"
            | "bootfile" | "smb" | "smbserver" | "guestfwd" | "ipv6-net" | "ipv6-host" | "ipv6-dns" | "ipv6-prefix"
            | "ipv6-prefixlen" => {
                return Err(ValueError::with_hint(
                    format!("user option '{k}' is not supported by flotilla"),
                    "flotilla supports -netdev user,id=ID[,net=ADDR/BITS][,host=][,dhcpstart=][,dns=][,restrict=on|off][,hostfwd=RULE]...",
                ))
            }
            _ => return Err(ValueError::new(format!("Invalid parameter '{k}'"))),
        }
    }
    // The network's own checks (host bits, QEMU's derived addresses), as the stack will make them.
    crate::user_net::slirp_config(restrict, &hostfwd, net.as_deref(), &addrs)?;
    Ok(NetdevKind::User { restrict, hostfwd, net, addrs })
}

fn vhost_user(keys: Vec<(String, String)>) -> Result<NetdevKind, ValueError> {
    let mut chardev = None;
    let mut queues = 1;
    for (k, v) in keys {
        match k.as_str() {
            "chardev" => chardev = Some(v),
            "queues" => queues = parse_queues("queues", &v)?,
            "vhostforce" => {
                parse_bool(&k, &v)?;
            }
            _ => return Err(ValueError::new(format!("Invalid parameter '{k}'"))),
        }
    }
    let chardev = chardev.ok_or_else(|| ValueError::new("Parameter 'chardev' is missing"))?;
    Ok(NetdevKind::VhostUser { chardev, queues })
}

/// `-net nic[,macaddr=][,model=virtio][,addr=][,vectors=]` (vlan and name taken out). Returns
/// the NIC's properties; `addr=` is returned through `NicProps` by the caller's own parse.
fn nic_from_net(keys: Vec<(String, String)>, vlan: u32, name: Option<String>) -> Result<NicProps, ValueError> {
    let mut p = NicProps { netdev: None, mac: None, mq: false, vectors: None, vlan: Some(vlan), name };
    let mut model = None;
    for (k, v) in keys {
        match k.as_str() {
            "macaddr" => p.mac = Some(checked_mac(&v, || ValueError::new("invalid syntax for ethernet address"))?),
            "model" => model = Some(v),
            "vectors" => p.vectors = Some(parse_vectors(&v)?),
            "netdev" => {
                p.netdev = Some(v);
                p.vlan = None;
            }
            // addr= is handled by devices.rs, which owns PCI slots.
            "addr" => {}
            _ => return Err(ValueError::new(format!("Invalid parameter '{k}'"))),
        }
    }
    if let Some(n) = &p.name {
        check_netdev_id(n)?;
    }
    match model.as_deref() {
        Some("virtio" | "virtio-net-pci") => Ok(p),
        Some("?" | "help") => Err(ValueError::new("Supported NIC models: virtio")),
        // QEMU's pc default is e1000.
        Some(m) => Err(ValueError::with_hint(
            format!("NIC model '{m}' is not supported by flotilla"),
            "use -net nic,model=virtio",
        )),
        None => Err(ValueError::with_hint(
            "NIC model 'e1000' (QEMU's default) is not supported by flotilla",
            "use -net nic,model=virtio",
        )),
    }
}

/// `vectors=`: the MSI-X table's size. QEMU takes 0 for "no MSI-X" (INTx); Flotilla's functions
/// have no INTx, and a driver needs two vectors at least (configuration, queues).
pub fn parse_vectors(v: &str) -> Result<u16, ValueError> {
    let n: u32 = v
        .parse()
        .ok()
        .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ValueError::new("Parameter 'vectors' expects uint32_t"))?;
    if n < 2 {
        return Err(ValueError::new(format!(
            "vectors={n} is not supported by flotilla: its virtio-pci functions have no INTx, so a driver needs at least 2 MSI-X vectors"
        )));
    }
    if n > 256 {
        return Err(ValueError::new(format!("vectors={n} is more than flotilla supports (256)")));
    }
    Ok(n as u16)
}

/// `-device virtio-net-pci`'s own keys; true when `k` was one.
pub fn nic_device_key(p: &mut NicProps, k: &str, v: &str) -> Result<bool, ValueError> {
    match k {
        "netdev" => p.netdev = Some(v.to_string()),
        "mac" => {
            p.mac = Some(checked_mac(v, || {
                ValueError::new(format!("Property 'virtio-net-pci.mac' doesn't take value '{v}'"))
            })?)
        }
        "mq" => p.mq = parse_bool(k, v)?,
        "vectors" => p.vectors = Some(parse_vectors(v)?),
        // No option ROM and no firmware boot order here: accepted, nothing to do.
        "romfile" | "bootindex" => {}
        _ => return Ok(false),
    }
    Ok(true)
}
