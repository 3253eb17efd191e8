//! The virtual services libslirp answers by itself (DHCP, ARP), bad input, a reader that falls
//! behind, stopping, and the socket crossing into another process. None of these open a host socket.

mod common;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::frames::*;
use common::*;
use slirp_net::{SlirpConfig, SlirpNet};

fn spawn_default() -> (SlirpNet, Guest) {
    let (net, fd) = SlirpNet::spawn(SlirpConfig::default()).unwrap();
    (net, Guest::new(fd))
}

#[test]
fn dhcp_discover_gets_an_offer_of_the_first_address() {
    let (net, mut guest) = spawn_default();
    let xid = 0x1234_5678;
    guest.send(&dhcp_discover_frame(GUEST_MAC, xid));
    let offer = guest.expect("DHCPOFFER", |frame| parse_dhcp(frame).filter(|d| d.xid == xid));
    assert_eq!(offer.op, 2, "BOOTREPLY");
    assert_eq!((offer.sport, offer.dport), (67, 68));
    assert_eq!(offer.ip_src, HOST_IP);
    assert_eq!(offer.chaddr, GUEST_MAC);
    assert_eq!(offer.yiaddr, GUEST_IP);
    assert_eq!(offer.option(53), Some(&[2u8][..]), "DHCP message type OFFER");
    assert_eq!(offer.option(54), Some(&HOST_IP.octets()[..]), "server identifier");
    assert_eq!(offer.option(1), Some(&[255u8, 255, 255, 0][..]), "subnet mask");
    assert_eq!(offer.option(3), Some(&HOST_IP.octets()[..]), "router");
    assert_eq!(offer.option(6), Some(&[10u8, 0, 2, 3][..]), "DNS server");
    let eth = parse_eth(guest.received.last().unwrap()).unwrap();
    assert_eq!(eth.src, slirp_mac(HOST_IP));
    assert_eq!(net.stats().frames_from_guest, 1);
}

#[test]
fn dhcp_follows_a_configured_network() {
    let config = slirp_net::parse_netdev_user("net=192.168.50.0/24,dhcpstart=192.168.50.100").unwrap().config;
    let (_net, fd) = SlirpNet::spawn(config).unwrap();
    let mut guest = Guest::new(fd);
    guest.send(&dhcp_discover_frame(GUEST_MAC, 7));
    let offer = guest.expect("DHCPOFFER", |frame| parse_dhcp(frame).filter(|d| d.xid == 7));
    assert_eq!(offer.yiaddr, Ipv4Addr::new(192, 168, 50, 100));
    assert_eq!(offer.ip_src, Ipv4Addr::new(192, 168, 50, 2));
    assert_eq!(offer.option(6), Some(&[192u8, 168, 50, 3][..]));
}

#[test]
fn dhcp_still_answers_under_restrict() {
    let (_net, fd) = SlirpNet::spawn(slirp_net::parse_netdev_user("restrict=on").unwrap().config).unwrap();
    let mut guest = Guest::new(fd);
    guest.send(&dhcp_discover_frame(GUEST_MAC, 11));
    let offer = guest.expect("DHCPOFFER", |frame| parse_dhcp(frame).filter(|d| d.xid == 11));
    assert_eq!(offer.yiaddr, GUEST_IP);
}

#[test]
fn arp_for_the_host_and_the_dns_server_is_answered() {
    let (_net, mut guest) = spawn_default();
    for target in [HOST_IP, Ipv4Addr::new(10, 0, 2, 3)] {
        guest.send(&arp_request_frame(GUEST_IP, target));
        let reply = guest.expect("ARP reply", |frame| parse_arp(frame).filter(|a| a.op == 2 && a.spa == target));
        assert_eq!(reply.sha, slirp_mac(target));
        assert_eq!(reply.tpa, GUEST_IP);
    }
}

#[test]
fn garbage_frames_do_not_stop_the_stack() {
    let (net, mut guest) = spawn_default();
    let mut garbage: Vec<Vec<u8>> = vec![
        vec![0xff],
        vec![0u8; 13],
        ethernet(BROADCAST, GUEST_MAC, ETH_IPV4, &[]),
        ethernet(BROADCAST, GUEST_MAC, ETH_ARP, &[0, 1, 8, 0]),
        // IPv4 claiming 1500 bytes in a 20-byte packet, and a header length of 60 in 20 bytes.
        ethernet(
            BROADCAST,
            GUEST_MAC,
            ETH_IPV4,
            &[0x45, 0, 0x05, 0xdc, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2],
        ),
        ethernet(BROADCAST, GUEST_MAC, ETH_IPV4, &[0x4f, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2]),
        // A UDP datagram to the DHCP port too short to be BOOTP.
        ethernet(BROADCAST, GUEST_MAC, ETH_IPV4, &udp(GUEST_IP, 68, Ipv4Addr::BROADCAST, 67, &[1, 2, 3])),
        // A TCP header with a data offset past the segment.
        ethernet(slirp_mac(HOST_IP), GUEST_MAC, ETH_IPV4, &{
            let mut packet = tcp(&TcpOut {
                src: GUEST_IP,
                sport: 1000,
                dst: HOST_IP,
                dport: 80,
                seq: 1,
                ack: 0,
                flags: TCP_SYN,
                payload: &[],
            });
            packet[20 + 12] = 0xf0;
            packet
        }),
        vec![0xa5; 9000],
        vec![0u8; 65_553],
    ];
    // Pseudo-random frames with an IPv4 ethertype, fixed seed.
    let mut state: u32 = 0x2545_f491;
    for len in [20usize, 34, 60, 200, 1514] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        garbage.push(ethernet(slirp_mac(HOST_IP), GUEST_MAC, ETH_IPV4, &bytes));
    }
    for frame in &garbage {
        guest.send(frame);
    }
    guest.arp_round_trip();
    assert!(net.is_running());
    assert_eq!(net.stats().frames_from_guest, garbage.len() as u64 + 1);
}

#[test]
fn an_oversize_datagram_is_dropped_and_counted() {
    let (net, mut guest) = spawn_default();
    guest.send(&vec![0u8; 70_000]);
    guest.arp_round_trip();
    assert_eq!(net.stats().dropped_oversize, 1);
    assert_eq!(net.stats().frames_from_guest, 1);
}

#[test]
fn a_reader_that_falls_behind_loses_frames_and_the_stack_goes_on() {
    let (net, mut guest) = spawn_default();
    // Each request draws a reply; none is read until all are sent, so the socket fills.
    const REQUESTS: u64 = 20_000;
    let request = arp_request_frame(GUEST_IP, HOST_IP);
    for _ in 0..REQUESTS {
        guest.send(&request);
    }
    let deadline = Instant::now() + BOUND;
    // Every request read and every reply sent or dropped (the counters move just after each).
    let settled = |s: slirp_net::SlirpNetStats| {
        s.frames_from_guest == REQUESTS && s.frames_to_guest + s.dropped_socket_full == REQUESTS
    };
    while !settled(net.stats()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = net.stats();
    assert_eq!(stats.frames_from_guest, REQUESTS, "{stats:?}");
    assert!(stats.dropped_socket_full > 0, "{stats:?}");
    assert_eq!(stats.frames_to_guest + stats.dropped_socket_full, REQUESTS, "{stats:?}");
    // What was queued is all there, then the stack still answers.
    guest.answer_arp = false;
    let mut queued = 0;
    while guest.recv(Instant::now() + Duration::from_millis(200)).is_some() {
        queued += 1;
    }
    assert_eq!(queued, stats.frames_to_guest);
    guest.arp_round_trip();
    eprintln!("queued {queued} replies before the socket filled; dropped {}", stats.dropped_socket_full);
}

#[test]
fn dropping_the_handle_hangs_up_the_socket() {
    let (net, mut guest) = spawn_default();
    guest.arp_round_trip();
    drop(net);
    assert!(guest.recv(Instant::now() + BOUND).is_none());
    let mut pollfd = libc::pollfd { fd: guest.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: polls one live pollfd.
    assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 0) }, 1);
    assert_ne!(pollfd.revents & libc::POLLHUP, 0);
}

#[test]
fn closing_the_socket_ends_the_thread() {
    let (net, guest) = spawn_default();
    assert!(net.is_running());
    drop(guest);
    let deadline = Instant::now() + BOUND;
    while net.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!net.is_running());
}

const CHILD_FD_ENV: &str = "SLIRP_NET_TEST_CHILD_FD";

/// The other half of `the_socket_works_from_another_process`: a no-op unless run as that child.
#[test]
fn child_process_side() {
    let Some(fd) = std::env::var_os(CHILD_FD_ENV) else { return };
    let fd: i32 = fd.to_str().unwrap().parse().unwrap();
    // SAFETY: the parent placed the socket at this fd for us alone.
    let mut guest = Guest::new(unsafe { OwnedFd::from_raw_fd(fd) });
    guest.send(&dhcp_discover_frame(GUEST_MAC, 99));
    let offer = guest.expect("DHCPOFFER in the child", |frame| parse_dhcp(frame).filter(|d| d.xid == 99));
    assert_eq!(offer.yiaddr, GUEST_IP);
    println!("child got the offer");
}

#[test]
fn the_socket_works_from_another_process() {
    let (net, fd) = SlirpNet::spawn(SlirpConfig::default()).unwrap();
    let raw = fd.as_raw_fd();
    let mut child = Command::new(std::env::current_exe().unwrap());
    child.args(["--exact", "child_process_side", "--nocapture", "--test-threads=1"]).env(CHILD_FD_ENV, "3");
    // SAFETY: dup2 is async-signal-safe; fd 3 comes out without FD_CLOEXEC, so it survives exec.
    unsafe {
        child.pre_exec(move || if libc::dup2(raw, 3) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let output = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains("child got the offer"), "{stdout}");
    drop(fd);
    assert!(net.stats().frames_from_guest >= 1);
}
