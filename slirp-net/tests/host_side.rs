//! hostfwd and restrict: tests that open host sockets, each run inside a private network namespace
//! (common::in_private_netns) so nothing leaves the machine.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::frames::*;
use common::*;
use slirp_net::{parse_netdev_user, SlirpError, SlirpNet};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn hostfwd_carries_a_host_connection_to_the_guest_and_back() {
    if !in_private_netns("hostfwd_carries_a_host_connection_to_the_guest_and_back") {
        return;
    }
    let port = free_port();
    let config = parse_netdev_user(&format!("id=n0,hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:22")).unwrap().config;
    let (_net, fd) = SlirpNet::spawn(config).unwrap();
    let mut guest = Guest::new(fd);
    let host_side = std::thread::spawn(move || {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect_timeout(&addr, BOUND).unwrap();
        stream.set_read_timeout(Some(BOUND)).unwrap();
        stream.write_all(b"ping").unwrap();
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).unwrap();
        reply
    });
    let syn = guest.expect("TCP SYN to 10.0.2.15:22", |frame| {
        parse_tcp(frame).filter(|t| t.dst == GUEST_IP && t.dport == 22 && t.flags & TCP_SYN != 0)
    });
    assert_eq!(syn.flags & (TCP_SYN | TCP_ACK), TCP_SYN, "a bare SYN: {syn:?}");
    assert_eq!(syn.src, HOST_IP, "the host's connection comes from the host's address in the guest network");
    // Play the guest's sshd: accept, read "ping", answer "pong".
    let guest_isn = 0x1000_0000u32;
    let segment = |seq: u32, ack: u32, flags: u8, payload: &[u8]| {
        let out = TcpOut { src: GUEST_IP, sport: 22, dst: syn.src, dport: syn.sport, seq, ack, flags, payload };
        ethernet(slirp_mac(HOST_IP), GUEST_MAC, ETH_IPV4, &tcp(&out))
    };
    guest.send(&segment(guest_isn, syn.seq.wrapping_add(1), TCP_SYN | TCP_ACK, &[]));
    let data = guest
        .expect("the host's \"ping\"", |frame| parse_tcp(frame).filter(|t| t.dport == 22 && !t.payload.is_empty()));
    assert_eq!(data.payload, b"ping");
    assert_eq!(data.seq, syn.seq.wrapping_add(1));
    let after_ping = data.seq.wrapping_add(4);
    guest.send(&segment(guest_isn.wrapping_add(1), after_ping, TCP_ACK | TCP_PSH, b"pong"));
    assert_eq!(&host_side.join().unwrap(), b"pong");
}

#[test]
fn hostfwd_on_a_port_in_use_fails_naming_the_rule() {
    if !in_private_netns("hostfwd_on_a_port_in_use_fails_naming_the_rule") {
        return;
    }
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = parse_netdev_user(&format!("hostfwd=tcp:127.0.0.1:{port}-:22")).unwrap().config;
    let Err(error) = SlirpNet::spawn(config) else { panic!("hostfwd on a taken port started") };
    assert!(matches!(error, SlirpError::HostFwd { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&format!("'tcp:127.0.0.1:{port}-:22'")), "{message}");
}

/// A guest SYN from 10.0.2.15:sport to `dst:dport`, through the gateway.
fn guest_syn(dst: Ipv4Addr, dport: u16, sport: u16) -> Vec<u8> {
    let out = TcpOut { src: GUEST_IP, sport, dst, dport, seq: 0x2000_0000, ack: 0, flags: TCP_SYN, payload: &[] };
    ethernet(slirp_mac(HOST_IP), GUEST_MAC, ETH_IPV4, &tcp(&out))
}

/// The first TCP frame back to `sport`, within BOUND.
fn answer_to(guest: &mut Guest, sport: u16) -> Tcp {
    guest.expect("a TCP answer", |frame| parse_tcp(frame).filter(|t| t.dst == GUEST_IP && t.dport == sport))
}

/// Control for the test below: without restrict, a guest SYN to the host's address reaches a host
/// listener on loopback, and the guest gets a SYN-ACK.
#[test]
fn unrestricted_guest_reaches_a_host_service() {
    if !in_private_netns("unrestricted_guest_reaches_a_host_service") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_net, fd) = SlirpNet::spawn(parse_netdev_user("restrict=off").unwrap().config).unwrap();
    let mut guest = Guest::new(fd);
    guest.arp_round_trip();
    guest.send(&guest_syn(HOST_IP, port, 40_000));
    let answer = answer_to(&mut guest, 40_000);
    assert_eq!(answer.flags & (TCP_SYN | TCP_ACK), TCP_SYN | TCP_ACK, "{answer:?}");
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        match listener.accept() {
            Ok(_) => break,
            Err(error) if error.kind() == ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(error) => panic!("the host service saw no connection: {error}"),
        }
    }
}

#[test]
fn restricted_guest_reaches_neither_the_host_nor_the_outside() {
    if !in_private_netns("restricted_guest_reaches_neither_the_host_nor_the_outside") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (net, fd) = SlirpNet::spawn(parse_netdev_user("restrict=on").unwrap().config).unwrap();
    let mut guest = Guest::new(fd);
    guest.arp_round_trip();
    // The host's own service (what the control test reaches), then TEST-NET-1, which never routes.
    guest.send(&guest_syn(HOST_IP, port, 40_001));
    guest.send(&guest_syn(Ipv4Addr::new(192, 0, 2, 1), 80, 40_002));
    // libslirp refuses each with a reset; the ARP round trip after them is the later event that
    // shows every answer they would draw has had its chance to arrive.
    for sport in [40_001, 40_002] {
        let answer = answer_to(&mut guest, sport);
        assert_eq!(answer.flags & TCP_SYN, 0, "no SYN-ACK: {answer:?}");
        assert_ne!(answer.flags & TCP_RST, 0, "a reset: {answer:?}");
    }
    guest.arp_round_trip();
    let syn_acks = guest
        .received
        .iter()
        .filter_map(|frame| parse_tcp(frame))
        .filter(|t| t.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK)
        .count();
    assert_eq!(syn_acks, 0);
    match listener.accept() {
        Err(error) if error.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the host service was reached despite restrict=on: {other:?}"),
    }
    assert!(net.is_running());
}

#[test]
fn dns_to_the_virtual_server_is_forwarded_to_the_hosts_resolver() {
    if !in_private_netns_with_resolver(
        "dns_to_the_virtual_server_is_forwarded_to_the_hosts_resolver",
        Some(Ipv4Addr::LOCALHOST),
    ) {
        return;
    }
    // The host's "resolver": whatever arrives on 127.0.0.1:53 is answered with a fixed payload.
    let resolver = UdpSocket::bind("127.0.0.1:53").unwrap();
    resolver.set_read_timeout(Some(BOUND)).unwrap();
    let (_net, fd) = SlirpNet::spawn(parse_netdev_user("").unwrap().config).unwrap();
    let mut guest = Guest::new(fd);
    let dns = Ipv4Addr::new(10, 0, 2, 3);
    let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
    guest.send(&ethernet(slirp_mac(dns), GUEST_MAC, ETH_IPV4, &udp(GUEST_IP, 5353, dns, 53, query)));
    let mut buf = [0u8; 512];
    let (len, from) = resolver.recv_from(&mut buf).expect("the query reaches the host's resolver");
    assert_eq!(&buf[..len], query);
    resolver.send_to(b"answer", from).unwrap();
    let (src, sport, payload) = guest.expect("the DNS answer", |frame| {
        let ip = parse_ipv4(frame).filter(|ip| ip.protocol == PROTO_UDP && ip.dst == GUEST_IP)?;
        let u = ip.payload;
        let dport = u16::from_be_bytes([u[2], u[3]]);
        (dport == 5353).then(|| (ip.src, u16::from_be_bytes([u[0], u[1]]), u[8..].to_vec()))
    });
    assert_eq!((src, sport), (dns, 53), "the answer comes from the virtual DNS server");
    assert_eq!(payload, b"answer");
}

#[test]
fn udp_hostfwd_delivers_a_host_datagram_to_the_guest() {
    if !in_private_netns("udp_hostfwd_delivers_a_host_datagram_to_the_guest") {
        return;
    }
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = parse_netdev_user(&format!("hostfwd=udp:127.0.0.1:{port}-:5000")).unwrap().config;
    let (_net, fd) = SlirpNet::spawn(config).unwrap();
    let mut guest = Guest::new(fd);
    guest.arp_round_trip();
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    host.send_to(b"datagram", ("127.0.0.1", port)).unwrap();
    let payload = guest.expect("the forwarded datagram", |frame| {
        let ip = parse_ipv4(frame).filter(|ip| ip.protocol == PROTO_UDP && ip.dst == GUEST_IP)?;
        let u = ip.payload;
        (u16::from_be_bytes([u[2], u[3]]) == 5000).then(|| u[8..].to_vec())
    });
    assert_eq!(payload, b"datagram");
}
