//! A fake guest on the frame socket, and a private network namespace for tests that open host
//! sockets.
#![allow(dead_code)]

pub mod frames;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use frames::*;

pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Every wait in these tests ends by then at the latest.
pub const BOUND: Duration = Duration::from_secs(5);

/// The guest's end of the frame socket, with a log of every frame received.
pub struct Guest {
    pub fd: OwnedFd,
    pub received: Vec<Vec<u8>>,
    /// Answer libslirp's "who has GUEST_IP" while waiting, as a guest's stack would.
    pub answer_arp: bool,
}

impl Guest {
    pub fn new(fd: OwnedFd) -> Guest {
        Guest { fd, received: Vec::new(), answer_arp: true }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sends from a live slice.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_NOSIGNAL) };
        assert_eq!(sent, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }

    /// One frame, or None once `deadline` passes (or the socket hangs up).
    pub fn recv(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pollfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: polls one live pollfd.
            let ready = unsafe { libc::poll(&mut pollfd, 1, left.as_millis() as i32) };
            if ready <= 0 {
                return None;
            }
            let mut buf = vec![0u8; 70_000];
            // SAFETY: receives into a live buffer of the length given.
            let got =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if got == 0 {
                return None;
            }
            if got < 0 {
                continue;
            }
            buf.truncate(got as usize);
            if self.answer_arp {
                if let Some(request) = parse_arp(&buf).filter(|a| a.op == 1 && a.tpa == GUEST_IP) {
                    let reply = arp(2, GUEST_MAC, GUEST_IP, request.sha, request.spa);
                    self.send(&ethernet(request.sha, GUEST_MAC, ETH_ARP, &reply));
                }
            }
            self.received.push(buf.clone());
            return Some(buf);
        }
    }

    /// The first frame `pick` accepts, within BOUND; panics naming `what` otherwise.
    pub fn expect<T>(&mut self, what: &str, mut pick: impl FnMut(&[u8]) -> Option<T>) -> T {
        let deadline = Instant::now() + BOUND;
        while let Some(frame) = self.recv(deadline) {
            if let Some(found) = pick(&frame) {
                return found;
            }
        }
        panic!("no {what} within {BOUND:?}; received {} other frames", self.received.len());
    }

    /// ARP for the host and wait for the answer: proves the stack is alive and has handled every
    /// frame sent before (libslirp takes frames in order).
    pub fn arp_round_trip(&mut self) {
        self.send(&arp_request_frame(GUEST_IP, HOST_IP));
        self.expect("ARP reply from 10.0.2.2", |frame| parse_arp(frame).filter(|a| a.op == 2 && a.spa == HOST_IP));
    }
}

const IN_NETNS: &str = "SLIRP_NET_TEST_IN_NETNS";

/// Runs test `name` of this test binary again inside a fresh network namespace (loopback up, no other
/// interface: nothing can leave the machine) and asserts it passed there. Returns true when already
/// inside, where the caller runs the test's body; false outside, where the caller returns.
pub fn in_private_netns(name: &str) -> bool {
    in_private_netns_with_resolver(name, None)
}

/// As [`in_private_netns`], and with `nameserver` the only resolver in /etc/resolv.conf there (a
/// private mount namespace bind-mounts a file over it), so libslirp forwards DNS to it.
pub fn in_private_netns_with_resolver(name: &str, nameserver: Option<Ipv4Addr>) -> bool {
    if std::env::var_os(IN_NETNS).is_some() {
        return true;
    }
    let mut script = "ip link set lo up".to_owned();
    let mut unshare = vec!["--net"];
    let resolv_conf = std::env::temp_dir().join(format!("slirp-net-test-{}-{name}.resolv.conf", std::process::id()));
    if let Some(nameserver) = nameserver {
        std::fs::write(&resolv_conf, format!("nameserver {nameserver}\n")).unwrap();
        unshare.push("--mount");
        script += &format!(" && mount --bind '{}' /etc/resolv.conf", resolv_conf.display());
    }
    script += " && exec \"$0\" \"$@\"";
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("unshare")
        .args(&unshare)
        .args(["sh", "-c", &script])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(IN_NETNS, "1")
        .output()
        .expect("run unshare (util-linux)");
    let _ = std::fs::remove_file(&resolv_conf);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{name} in a private network namespace (needs root or user namespaces): {}\n{stdout}\n{stderr}",
        output.status
    );
    print!("{stdout}");
    false
}
