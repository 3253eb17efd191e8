//! `info network`: the VM's NICs and their host sides, laid out as QEMU 7.2's
//! hmp_info_network() / net_hub_info() print them. QEMU 1.1's QMP has no command that lists the
//! network, so the launcher hands the gateway each NIC (`--nic JSON`, see [`Nic`]); the text of
//! each client (`info_str` in QEMU) is the launcher's, the layout is here:
//!
//! ```text
//! nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56
//!  \ net0: index=0,type=tap,ifname=tap0,script=no,downscript=no
//! ```
//!
//! one pair per queue (`index=` the queue), and for QEMU 1.1's `-net ...,vlan=N` the NIC and its
//! host side as ports of hub N (the NIC's port first on the command line, as `-net nic -net
//! user` has it; QEMU lists a hub's newest port first, and the newest hub first).

use serde::{Deserialize, Serialize};

/// One NIC, as `--nic` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Its net client name (qdev id, or QEMU's `virtio-net-pci.N`).
    pub name: String,
    pub model: String,
    pub macaddr: String,
    /// Queue pairs: one client line (pair) per queue.
    #[serde(default = "one")]
    pub queues: u16,
    /// `-net ...,vlan=N`: both are ports of hub N.
    #[serde(default)]
    pub hub: Option<u32>,
    pub peer: Peer,
}

/// A NIC's host side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub name: String,
    /// QEMU's driver name: `tap`, `user`, `vhost-user`.
    #[serde(rename = "type")]
    pub kind: String,
    /// QEMU's `info_str`; `{q}` stands for the queue index (vhost-user's `vhost-user{q} to CHR`).
    pub info: String,
}

fn one() -> u16 {
    1
}

/// Parses one `--nic` value.
pub fn parse_nic(json: &str) -> Result<Nic, String> {
    serde_json::from_str(json).map_err(|e| format!("--nic: not a NIC description ({e}): {json}"))
}

fn client(name: &str, index: u16, kind: &str, info: &str) -> String {
    format!("{name}: index={index},type={kind},{}\n", info.replace("{q}", &index.to_string()))
}

/// `info network`'s text (`\n` line ends; the caller makes them `\r\n`).
pub fn info_network(nics: &[Nic]) -> String {
    let mut out = String::new();
    // Hubs, newest first; each hub's ports newest first (peer port 1, then NIC port 0).
    let mut hubs: Vec<u32> = Vec::new();
    for n in nics {
        if let Some(h) = n.hub {
            if !hubs.contains(&h) {
                hubs.push(h);
            }
        }
    }
    for h in hubs.iter().rev() {
        out.push_str(&format!("hub {h}\n"));
        let on_hub: Vec<&Nic> = nics.iter().filter(|n| n.hub == Some(*h)).collect();
        let mut port = 2 * on_hub.len();
        for n in on_hub.iter().rev() {
            port -= 1;
            out.push_str(&format!(" \\ hub{h}port{port}: {}", client(&n.peer.name, 0, &n.peer.kind, &n.peer.info)));
            port -= 1;
            let nic_info = format!("model={},macaddr={}", n.model, n.macaddr);
            out.push_str(&format!(" \\ hub{h}port{port}: {}", client(&n.name, 0, "nic", &nic_info)));
        }
    }
    for n in nics.iter().filter(|n| n.hub.is_none()) {
        let nic_info = format!("model={},macaddr={}", n.model, n.macaddr);
        for q in 0..n.queues.max(1) {
            out.push_str(&client(&n.name, q, "nic", &nic_info));
            out.push_str(" \\ ");
            out.push_str(&client(&n.peer.name, q, &n.peer.kind, &n.peer.info));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(json: &str) -> Nic {
        parse_nic(json).unwrap()
    }

    #[test]
    fn a_nic_and_its_netdev() {
        let n = nic(r#"{"name":"nic0","model":"virtio-net-pci","macaddr":"52:54:00:12:34:56",
            "peer":{"name":"net0","type":"user","info":"net=10.0.2.0,restrict=on"}}"#);
        assert_eq!(
            info_network(&[n]),
            "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\n \\ net0: index=0,type=user,net=10.0.2.0,restrict=on\n"
        );
    }

    #[test]
    fn one_line_pair_per_queue() {
        let tap = nic(r#"{"name":"nic0","model":"virtio-net-pci","macaddr":"52:54:00:12:34:56","queues":2,
            "peer":{"name":"n0","type":"tap","info":"ifname=tap0,script=no,downscript=no"}}"#);
        let vu = nic(r#"{"name":"virtio-net-pci.1","model":"virtio-net-pci","macaddr":"52:54:00:12:34:57","queues":2,
            "peer":{"name":"v0","type":"vhost-user","info":"vhost-user{q} to chr0"}}"#);
        assert_eq!(
            info_network(&[tap, vu]),
            "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\n \
             \\ n0: index=0,type=tap,ifname=tap0,script=no,downscript=no\n\
             nic0: index=1,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\n \
             \\ n0: index=1,type=tap,ifname=tap0,script=no,downscript=no\n\
             virtio-net-pci.1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57\n \
             \\ v0: index=0,type=vhost-user,vhost-user0 to chr0\n\
             virtio-net-pci.1: index=1,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57\n \
             \\ v0: index=1,type=vhost-user,vhost-user1 to chr0\n"
        );
    }

    #[test]
    fn qemu_1_1_vlans_are_hubs() {
        let a = nic(r#"{"name":"virtio-net-pci.0","model":"virtio-net-pci","macaddr":"52:54:00:12:34:56","hub":0,
            "peer":{"name":"user.0","type":"user","info":"net=10.0.2.0,restrict=off"}}"#);
        let b = nic(r#"{"name":"virtio-net-pci.1","model":"virtio-net-pci","macaddr":"52:54:00:12:34:57","hub":1,
            "peer":{"name":"tap.0","type":"tap","info":"ifname=tap0,script=no,downscript=no"}}"#);
        assert_eq!(
            info_network(&[a, b]),
            "hub 1\n \
             \\ hub1port1: tap.0: index=0,type=tap,ifname=tap0,script=no,downscript=no\n \
             \\ hub1port0: virtio-net-pci.1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57\n\
             hub 0\n \
             \\ hub0port1: user.0: index=0,type=user,net=10.0.2.0,restrict=off\n \
             \\ hub0port0: virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\n"
        );
    }

    #[test]
    fn no_nics_print_nothing_and_bad_json_is_refused() {
        assert_eq!(info_network(&[]), "");
        assert!(parse_nic("{\"name\":\"x\"}").unwrap_err().starts_with("--nic: not a NIC description"));
    }
}
