//! netd's device over a real vhost-user connection: the `vhost` crate's frontend (as vmm-core
//! drives it) on one side, guest RAM in a memfd, and a SOCK_SEQPACKET frame socket as the host
//! side (the slirp-net form, so no tap and no root are needed). netd runs in this process on
//! the kit's serve loop. Checked: the features and config space, transmit (the header
//! stripped, hostile chains dropped while the queue goes on), merged receive buffers (one
//! frame over several buffers, `num_buffers`, published together), the control queue, and
//! set_link (the status bit, CONFIG_CHANGE_MSG, delivery stopped both ways and restored).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netd::backend::NetBackend;
use netd::nic::Nic;
use netd::persist::LinkStore;
use netd::port::Port;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_backend_kit::serve::{self, BoxError};
use virtio_bindings::virtio_net::*;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const WAIT: Duration = Duration::from_secs(10);
const MEM: u64 = 4 << 20;
const QSIZE: u16 = 64;
const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;
/// Data buffers of each queue: queue q's buffer i at DATA + q * 1 MiB + i * 16 KiB.
const DATA: u64 = 0x10_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn ring_base(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}

fn guest() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"netd-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM as usize, Some(FileOffset::new(file, 0)))]).unwrap()
}

/// The driver side of one split ring.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    q: usize,
    next_desc: u16,
    seen_used: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap, q: usize) -> Ring<'a> {
        Ring { mem, q, next_desc: 0, seen_used: 0 }
    }
    fn desc_at(&self) -> u64 {
        ring_base(self.q)
    }
    fn avail_at(&self) -> u64 {
        ring_base(self.q) + 0x1000
    }
    fn used_at(&self) -> u64 {
        ring_base(self.q) + 0x2000
    }
    fn buf(&self, i: u16) -> u64 {
        DATA + self.q as u64 * 0x10_0000 + u64::from(i % QSIZE) * 0x4000
    }
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc_at() + 16 * u64::from(i % QSIZE));
        self.mem.write_obj(addr.to_le(), at).unwrap();
        self.mem.write_obj(len.to_le(), at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags.to_le(), at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next.to_le(), at.unchecked_add(14)).unwrap();
    }
    /// Adds a chain of (addr, len, writable) parts; returns its head.
    fn add(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc % QSIZE;
        for (k, &(addr, len, w)) in parts.iter().enumerate() {
            let i = (self.next_desc + k as u16) % QSIZE;
            let more = k + 1 < parts.len();
            let flags = if w { F_WRITE } else { 0 } | if more { F_NEXT } else { 0 };
            self.desc(i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.next_desc = self.next_desc.wrapping_add(parts.len() as u16);
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail_at() + 2)).unwrap();
        self.mem.write_obj(head, GuestAddress(self.avail_at() + 4 + 2 * u64::from(idx % QSIZE))).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail_at() + 2)).unwrap();
        head
    }
    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_at() + 2)).unwrap()
    }
    /// Waits until `n` more used entries are there; returns them (head, len).
    fn wait_used(&mut self, n: u16) -> Vec<(u16, u32)> {
        let end = Instant::now() + WAIT;
        while self.used_idx().wrapping_sub(self.seen_used) < n {
            assert!(Instant::now() < end, "queue {}: {} used entries, waited for {n}", self.q, self.used_idx().wrapping_sub(self.seen_used));
            std::thread::sleep(Duration::from_millis(2));
        }
        let out = (0..n)
            .map(|k| {
                let slot = u64::from(self.seen_used.wrapping_add(k) % QSIZE);
                let id: u32 = self.mem.read_obj(GuestAddress(self.used_at() + 4 + 8 * slot)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(self.used_at() + 8 + 8 * slot)).unwrap();
                (id as u16, len)
            })
            .collect();
        self.seen_used = self.seen_used.wrapping_add(n);
        out
    }
}

struct TestDevice {
    nic: Arc<Nic>,
}

impl serve::Device for TestDevice {
    type Backend = NetBackend;
    type Session = ();
    fn label(&self) -> &str {
        "test-nic"
    }
    fn backend(&self) -> Result<NetBackend, BoxError> {
        Ok(NetBackend::new(self.nic.clone())?)
    }
    fn attach(
        &self,
        backend: &NetBackend,
        workers: &[Arc<vhost_user_backend::VringEpollHandler<NetBackend>>],
    ) -> Result<(), BoxError> {
        Ok(backend.attach(workers)?)
    }
    fn connected(&self, _: &NetBackend) -> Result<(), BoxError> {
        Ok(())
    }
    fn disconnected(&self, _: &NetBackend) {
        self.nic.set_backend(None);
    }
}

struct Rig {
    nic: Arc<Nic>,
    host: OwnedFd,
    fe: Frontend,
    kicks: Vec<EventFd>,
    _calls: Vec<EventFd>,
    backend_req: UnixStream,
    offered: u64,
    _dir: PathBuf,
}

fn rig(test: &str) -> (Rig, GuestMemoryMmap) {
    let dir = std::env::temp_dir().join(format!("netd-frontend-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("net.sock");
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0);
    // SAFETY: fds[0] goes to netd, fds[1] stays here as the host side; one owner each.
    let (port, host) = unsafe { (Port::frames_from_fd(fds[0]).unwrap(), OwnedFd::from_raw_fd(fds[1])) };
    let links = Arc::new(LinkStore::open(Some(dir.join("state.json"))).unwrap());
    let nic = Nic::new("nic0".into(), "n0".into(), [0x52, 0x54, 0, 0x12, 0x34, 0x56], vec![port], links).unwrap();
    let mut listener = Listener::new(&socket, true).unwrap();
    let dev = TestDevice { nic: nic.clone() };
    std::thread::spawn(move || {
        let _ = serve::serve_forever(&dev, &mut listener);
    });
    let mem = guest();
    let mut fe = Frontend::connect(&socket, 3).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ));
    fe.set_protocol_features(
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ,
    )
    .unwrap();
    // No EVENT_IDX: every completion interrupts (the test polls the used rings anyway).
    let want = offered & !(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    fe.set_features(want | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()).unwrap();
    let (req_ours, req_theirs) = UnixStream::pair().unwrap();
    fe.set_backend_request_fd(&req_theirs).unwrap();
    let r = mem.find_region(GuestAddress(0)).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(r).unwrap()]).unwrap();
    let host_addr = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as u64;
    let (mut kicks, mut calls) = (Vec::new(), Vec::new());
    for q in 0..3 {
        let (kick, call) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
        fe.set_vring_num(q, QSIZE).unwrap();
        fe.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host_addr(ring_base(q)),
                avail_ring_addr: host_addr(ring_base(q) + 0x1000),
                used_ring_addr: host_addr(ring_base(q) + 0x2000),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(q, 0).unwrap();
        fe.set_vring_call(q, &call).unwrap();
        fe.set_vring_kick(q, &kick).unwrap();
        fe.set_vring_enable(q, true).unwrap();
        kicks.push(kick);
        calls.push(call);
    }
    let rig = Rig { nic, host, fe, kicks, _calls: calls, backend_req: req_ours, offered, _dir: dir };
    (rig, mem)
}

impl Rig {
    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }
    fn host_send(&self, frame: &[u8]) {
        // SAFETY: send(2) from a local buffer on our descriptor.
        let n = unsafe { libc::send(self.host.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize);
    }
    /// The next frame the host side receives, or None within `wait`.
    fn host_recv(&self, wait: Duration) -> Option<Vec<u8>> {
        let mut pfd = libc::pollfd { fd: self.host.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one descriptor we own with a local pollfd.
        if unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as i32) } != 1 {
            return None;
        }
        let mut buf = vec![0u8; 70000];
        // SAFETY: recv(2) into a local buffer, at most its length.
        let n = unsafe { libc::recv(self.host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        assert!(n >= 0);
        buf.truncate(n as usize);
        Some(buf)
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A transmit chain: the 12-byte header (flags) then the frame, in two descriptors.
fn tx_chain(ring: &mut Ring, hdr_flags: u8, payload: &[u8]) -> u16 {
    let i = ring.next_desc;
    let at = ring.buf(i);
    let mut hdr = [0u8; 12];
    hdr[0] = hdr_flags;
    ring.mem.write_slice(&hdr, GuestAddress(at)).unwrap();
    ring.mem.write_slice(payload, GuestAddress(at + 12)).unwrap();
    ring.add(&[(at, 12, false), (at + 12, payload.len() as u32, false)])
}

#[test]
fn features_config_and_transmit_with_hostile_chains() {
    let (rig, mem) = rig("tx");
    let has = |b: u32| rig.offered & (1 << b) != 0;
    assert!(has(VIRTIO_NET_F_MRG_RXBUF) && has(VIRTIO_NET_F_STATUS) && has(VIRTIO_NET_F_MAC) && has(VIRTIO_NET_F_CTRL_VQ));
    for b in [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MQ] {
        assert!(!has(b), "feature {b} offered on a frame socket with one pair");
    }
    let mut fe = rig.fe;
    let (_, cfg) = fe.get_config(0, 10, VhostUserConfigFlags::WRITABLE, &[0u8; 10]).unwrap();
    assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56], "mac");
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP as u16, "status");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "max_virtqueue_pairs");
    let rig = Rig { fe, ..rig };

    let mut tx = Ring::new(&mem, TX);
    let good = frame(60, 1);
    let h = tx_chain(&mut tx, 0, &good);
    rig.kick(TX);
    assert_eq!(rig.host_recv(WAIT).as_deref(), Some(&good[..]), "the frame without its header");
    assert_eq!(tx.wait_used(1), vec![(h, 0)]);

    // Hostile chains, each dropped and completed; none reaches the host side.
    let beyond = tx.add(&[(MEM - 8, 64, false)]); // past guest RAM
    let short = tx.add(&[(tx.buf(40), 8, false)]); // shorter than the header
    let huge_at = tx.buf(41);
    let huge = tx.add(&[(huge_at, 12, false), (huge_at + 12, 65_551, false)]); // over the maximum frame
    let csum = tx_chain(&mut tx, VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, &frame(60, 2)); // CSUM not negotiated
    let writable = tx.add(&[(tx.buf(44), 72, true)]); // wrong direction
    let last = frame(100, 3);
    let ok = tx_chain(&mut tx, 0, &last);
    rig.kick(TX);
    let used = tx.wait_used(6);
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), vec![beyond, short, huge, csum, writable, ok]);
    assert_eq!(rig.host_recv(WAIT).as_deref(), Some(&last[..]), "only the good frame after the bad ones");
    assert_eq!(rig.host_recv(Duration::from_millis(200)), None);
    let c = &rig.nic.counters;
    assert_eq!(c.tx_dropped.load(std::sync::atomic::Ordering::Relaxed), 5);
    assert!(c.bad_chains.load(std::sync::atomic::Ordering::Relaxed) >= 4);
}

#[test]
fn a_frame_spreads_over_merged_buffers_published_at_once() {
    let (rig, mem) = rig("rx");
    let mut rx = Ring::new(&mem, RX);
    // Eight 1 KiB buffers: a 3000-byte frame (plus the 12-byte header) takes three.
    let heads: Vec<u16> = (0..8).map(|i| rx.add(&[(rx.buf(i), 1024, true)])).collect();
    rig.kick(RX);
    let f = frame(3000, 7);
    rig.host_send(&f);
    let used = rx.wait_used(3);
    assert_eq!(used, vec![(heads[0], 1024), (heads[1], 1024), (heads[2], 3012 - 2048)]);
    let mut got = vec![0u8; 3012];
    for (k, (_, len)) in used.iter().enumerate() {
        mem.read_slice(&mut got[k * 1024..k * 1024 + *len as usize], GuestAddress(rx.buf(k as u16))).unwrap();
    }
    assert_eq!(&got[..10], &[0u8; 10], "a plain header: no offload claimed");
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[12..], &f[..]);
    // A small frame takes one buffer, num_buffers 1.
    rig.host_send(&frame(60, 9));
    let used = rx.wait_used(1);
    assert_eq!(used, vec![(heads[3], 72)]);
    let n: u16 = mem.read_obj(GuestAddress(rx.buf(3) + 10)).unwrap();
    assert_eq!(n, 1);
    // A frame bigger than the buffers left waits for more; the guest adds them and kicks.
    rig.host_send(&frame(5000, 11)); // needs 5 of the 4 left
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rx.used_idx(), 4, "nothing published while the frame does not fit");
    let more: Vec<u16> = (8..9).map(|i| rx.add(&[(rx.buf(i), 1024, true)])).collect();
    rig.kick(RX);
    let used = rx.wait_used(5);
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), vec![heads[4], heads[5], heads[6], heads[7], more[0]]);
    assert_eq!(used.iter().map(|u| u.1).sum::<u32>(), 5012);
    // A hostile buffer (outside RAM) drops the frame, not the device.
    rx.add(&[(MEM + 4096, 1024, true)]);
    rig.host_send(&frame(100, 13));
    let used = rx.wait_used(1);
    assert_eq!(used[0].1, 0, "the bad buffer comes back empty");
    rx.add(&[(rx.buf(14), 1024, true)]);
    rig.kick(RX);
    rig.host_send(&frame(100, 14));
    assert_eq!(rx.wait_used(1)[0].1, 112, "delivery goes on");
}

#[test]
fn control_queue_and_set_link() {
    let (rig, mem) = rig("ctrl");
    let mut ctrl = Ring::new(&mem, CTRL);
    let cmd = |ring: &mut Ring, i: u16, req: &[u8]| -> u16 {
        let at = ring.buf(i);
        ring.mem.write_slice(req, GuestAddress(at)).unwrap();
        ring.mem.write_obj(0xffu8, GuestAddress(at + 0x1000)).unwrap();
        ring.add(&[(at, req.len() as u32, false), (at + 0x1000, 1, true)])
    };
    cmd(&mut ctrl, 0, &[VIRTIO_NET_CTRL_RX as u8, 0, 1]); // promiscuous on: acked
    cmd(&mut ctrl, 1, &[VIRTIO_NET_CTRL_MQ as u8, 0, 2, 0]); // 2 pairs: MQ not negotiated
    cmd(&mut ctrl, 2, &[0x7f, 0]); // unknown class
    rig.kick(CTRL);
    let used = ctrl.wait_used(3);
    assert!(used.iter().all(|u| u.1 == 1), "each acked with one byte: {used:?}");
    let ack = |i: u16| -> u8 { mem.read_obj(GuestAddress(ctrl.buf(i) + 0x1000)).unwrap() };
    assert_eq!((ack(0), ack(1), ack(2)), (0, 1, 1));

    // set_link down: the status bit, a CONFIG_CHANGE_MSG, and no delivery either way.
    rig.nic.set_link(false).unwrap();
    let mut hdr = [0u8; 12];
    let mut req = rig.backend_req.try_clone().unwrap();
    req.set_read_timeout(Some(WAIT)).unwrap();
    req.read_exact(&mut hdr).expect("a backend request");
    assert_eq!(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]), 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    let mut fe = rig.fe;
    let (_, cfg) = fe.get_config(0, 10, VhostUserConfigFlags::WRITABLE, &[0u8; 10]).unwrap();
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 0, "LINK_UP cleared");
    let rig = Rig { fe, ..rig };
    let mut rx = Ring::new(&mem, RX);
    let mut tx = Ring::new(&mem, TX);
    rx.add(&[(rx.buf(0), 2048, true)]);
    rig.kick(RX);
    rig.host_send(&frame(80, 1));
    tx_chain(&mut tx, 0, &frame(80, 2));
    rig.kick(TX);
    tx.wait_used(1);
    assert_eq!(rig.host_recv(Duration::from_millis(300)), None, "nothing sent with the link down");
    assert_eq!(rx.used_idx(), 0, "nothing received with the link down");

    // Up again: both ways flow.
    rig.nic.set_link(true).unwrap();
    req.read_exact(&mut hdr).expect("a second backend request");
    let back = frame(90, 3);
    rig.host_send(&back);
    assert_eq!(rx.wait_used(1)[0].1, 102);
    let out = frame(70, 4);
    tx_chain(&mut tx, 0, &out);
    rig.kick(TX);
    assert_eq!(rig.host_recv(WAIT).as_deref(), Some(&out[..]));
    assert_eq!(rig.nic.config_changes_sent(), 2);
}
