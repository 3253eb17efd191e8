//! Just enough Ethernet/ARP/IPv4/UDP/TCP/DHCP to play a guest: builders and parsers.

use std::net::Ipv4Addr;

pub type Mac = [u8; 6];

pub const GUEST_MAC: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const BROADCAST: Mac = [0xff; 6];
/// libslirp's own MAC for an address of its network: 52:55 and the IPv4 address.
pub fn slirp_mac(addr: Ipv4Addr) -> Mac {
    let o = addr.octets();
    [0x52, 0x55, o[0], o[1], o[2], o[3]]
}

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from(chunk[0]) << 8 };
        sum += u32::from(word);
    }
    sum
}

fn checksum_finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut header = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, protocol, 0, 0];
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header.extend_from_slice(&src.octets());
    header.extend_from_slice(&dst.octets());
    let sum = checksum_finish(checksum_add(0, &header));
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    header.extend_from_slice(payload);
    header
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    checksum_add(0, &pseudo)
}

pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut segment = Vec::with_capacity(len);
    segment.extend_from_slice(&sport.to_be_bytes());
    segment.extend_from_slice(&dport.to_be_bytes());
    segment.extend_from_slice(&(len as u16).to_be_bytes());
    segment.extend_from_slice(&[0, 0]);
    segment.extend_from_slice(payload);
    let sum = checksum_finish(checksum_add(pseudo_header_sum(src, dst, PROTO_UDP, len), &segment));
    segment[6..8].copy_from_slice(&sum.to_be_bytes());
    ipv4(src, dst, PROTO_UDP, &segment)
}

pub struct TcpOut<'a> {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: &'a [u8],
}

pub fn tcp(out: &TcpOut<'_>) -> Vec<u8> {
    let mut segment = Vec::with_capacity(20 + out.payload.len());
    segment.extend_from_slice(&out.sport.to_be_bytes());
    segment.extend_from_slice(&out.dport.to_be_bytes());
    segment.extend_from_slice(&out.seq.to_be_bytes());
    segment.extend_from_slice(&out.ack.to_be_bytes());
    segment.extend_from_slice(&[5 << 4, out.flags]);
    segment.extend_from_slice(&65535u16.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 0]);
    segment.extend_from_slice(out.payload);
    let sum = checksum_finish(checksum_add(pseudo_header_sum(out.src, out.dst, PROTO_TCP, segment.len()), &segment));
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4(out.src, out.dst, PROTO_TCP, &segment)
}

pub fn arp(op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut packet = vec![0, 1, 0x08, 0, 6, 4];
    packet.extend_from_slice(&op.to_be_bytes());
    packet.extend_from_slice(&sha);
    packet.extend_from_slice(&spa.octets());
    packet.extend_from_slice(&tha);
    packet.extend_from_slice(&tpa.octets());
    packet
}

/// An ARP request frame from the guest: who has `target`?
pub fn arp_request_frame(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    ethernet(BROADCAST, GUEST_MAC, ETH_ARP, &arp(1, GUEST_MAC, sender, [0; 6], target))
}

/// A DHCPDISCOVER from `mac`, padded to a full BOOTP message as real clients send it.
pub fn dhcp_discover_frame(mac: Mac, xid: u32) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&xid.to_be_bytes());
    bootp[10] = 0x80; // broadcast flag
    bootp[28..34].copy_from_slice(&mac);
    bootp.extend_from_slice(&[99, 130, 83, 99]); // magic cookie
    bootp.extend_from_slice(&[53, 1, 1]); // DHCPDISCOVER
    bootp.extend_from_slice(&[55, 3, 1, 3, 6]); // ask for mask, router, DNS
    bootp.push(255);
    bootp.resize(548, 0);
    let ip = udp(Ipv4Addr::UNSPECIFIED, 68, Ipv4Addr::BROADCAST, 67, &bootp);
    ethernet(BROADCAST, mac, ETH_IPV4, &ip)
}

pub struct Eth<'a> {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub fn parse_eth(frame: &[u8]) -> Option<Eth<'_>> {
    if frame.len() < 14 {
        return None;
    }
    Some(Eth {
        dst: frame[0..6].try_into().ok()?,
        src: frame[6..12].try_into().ok()?,
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        payload: &frame[14..],
    })
}

pub struct Arp {
    pub op: u16,
    pub sha: Mac,
    pub spa: Ipv4Addr,
    pub tpa: Ipv4Addr,
}

pub fn parse_arp(frame: &[u8]) -> Option<Arp> {
    let eth = parse_eth(frame)?;
    let p = eth.payload;
    if eth.ethertype != ETH_ARP || p.len() < 28 {
        return None;
    }
    Some(Arp {
        op: u16::from_be_bytes([p[6], p[7]]),
        sha: p[8..14].try_into().ok()?,
        spa: Ipv4Addr::new(p[14], p[15], p[16], p[17]),
        tpa: Ipv4Addr::new(p[24], p[25], p[26], p[27]),
    })
}

pub struct Ip<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub payload: &'a [u8],
}

pub fn parse_ipv4(frame: &[u8]) -> Option<Ip<'_>> {
    let eth = parse_eth(frame)?;
    let p = eth.payload;
    if eth.ethertype != ETH_IPV4 || p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(p[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if total < header_len || total > p.len() {
        return None;
    }
    Some(Ip {
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        protocol: p[9],
        payload: &p[header_len..total],
    })
}

#[derive(Debug)]
pub struct Tcp {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: Vec<u8>,
}

pub fn parse_tcp(frame: &[u8]) -> Option<Tcp> {
    let ip = parse_ipv4(frame)?;
    let s = ip.payload;
    if ip.protocol != PROTO_TCP || s.len() < 20 {
        return None;
    }
    let data_offset = usize::from(s[12] >> 4) * 4;
    Some(Tcp {
        src: ip.src,
        sport: u16::from_be_bytes([s[0], s[1]]),
        dst: ip.dst,
        dport: u16::from_be_bytes([s[2], s[3]]),
        seq: u32::from_be_bytes([s[4], s[5], s[6], s[7]]),
        ack: u32::from_be_bytes([s[8], s[9], s[10], s[11]]),
        flags: s[13],
        payload: s.get(data_offset..)?.to_vec(),
    })
}

pub struct Dhcp {
    pub ip_src: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub op: u8,
    pub xid: u32,
    pub yiaddr: Ipv4Addr,
    pub chaddr: Mac,
    /// (code, value) in order.
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Dhcp {
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_slice())
    }
}

pub fn parse_dhcp(frame: &[u8]) -> Option<Dhcp> {
    let ip = parse_ipv4(frame)?;
    let u = ip.payload;
    if ip.protocol != PROTO_UDP || u.len() < 8 + 240 {
        return None;
    }
    let (sport, dport) = (u16::from_be_bytes([u[0], u[1]]), u16::from_be_bytes([u[2], u[3]]));
    let b = &u[8..];
    if b[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let mut options = Vec::new();
    let mut at = 240;
    while at < b.len() {
        match b[at] {
            0 => at += 1,
            255 => break,
            code => {
                let len = usize::from(*b.get(at + 1)?);
                options.push((code, b.get(at + 2..at + 2 + len)?.to_vec()));
                at += 2 + len;
            }
        }
    }
    Some(Dhcp {
        ip_src: ip.src,
        sport,
        dport,
        op: b[0],
        xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        yiaddr: Ipv4Addr::new(b[16], b[17], b[18], b[19]),
        chaddr: b[28..34].try_into().ok()?,
        options,
    })
}
