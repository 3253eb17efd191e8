//! blockd SIGKILLed with writes in flight, over a real vhost-user connection: a frontend
//! written here (the `vhost` crate's, as QEMU's vhost-user-blk does it) asks for the inflight
//! region once, hands it to every blockd, and after the kill restarts blockd and reconnects
//! with the ring base at the used index (what a frontend knows when its backend died) and
//! without kicking. The new blockd must find the requests in flight in the region, run them
//! (it kicks itself) and complete every request exactly once; the image must hold every
//! write. The truth: the used ring as the driver reads it, and the image file's bytes.
//! Without inflight tracking, completions out of order make the restarted backend redo
//! requests already completed (a head twice in the used ring) or never run the others.
//! Also over a real connection: a hostile available index stops the ring (SET_VRING_ERR, no
//! spin) until it is restarted, and GET_VRING_BASE answers only once the ring's requests
//! completed.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const WAIT: Duration = Duration::from_secs(20);
const MEM: u64 = 8 << 20;
const QSIZE: u16 = 64;
/// Three descriptors a request: 21 requests fill the table.
const REQS: u16 = QSIZE / 3;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
/// Bytes each request writes (at sector 256 * i).
const LEN: u64 = 64 << 10;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn scratch(test: &str) -> PathBuf {
    // /var/tmp: a real file system, where fsync costs something (requests stay in flight).
    let d = Path::new("/var/tmp").join(format!("blockd-inflight-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn guest() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name; the new descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"blockd-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM as usize, Some(FileOffset::new(file, 0)))]).unwrap()
}

/// A blockd process, killed when dropped (a failed test leaves none behind).
struct Blockd(Child);

impl Blockd {
    fn id(&self) -> u32 {
        self.0.id()
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Blockd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn blockd(socket: &Path, image: &Path, log: &Path) -> Blockd {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(env!("CARGO_BIN_EXE_blockd"))
        .arg("--socket-path")
        .arg(socket)
        // writethrough: an fdatasync per write, so several are in flight at once and they
        // complete out of order on the I/O pool.
        .arg("--drive")
        .arg(format!("file={},format=raw,cache=writethrough,aio=threads", image.display()))
        .env("BLOCKD_LOG", "info")
        .stderr(File::options().create(true).append(true).open(log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let child = Blockd(child);
    let end = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(Instant::now() < end, "blockd never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn pattern(round: u32, i: u16) -> Vec<u8> {
    (0..LEN).map(|b| (u64::from(round) * 131 + u64::from(i) * 7 + b / 512) as u8 ^ 0x5a).collect()
}

/// The driver side of one split ring in guest RAM.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
}

impl Ring<'_> {
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr.to_le(), at).unwrap();
        self.mem.write_obj(len.to_le(), at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags.to_le(), at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next.to_le(), at.unchecked_add(14)).unwrap();
    }

    fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(AVAIL + 2)).unwrap()
    }

    fn offer(&self, head: u16) {
        let idx = self.avail_idx();
        self.mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % QSIZE))).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used_head(&self, n: u16) -> u16 {
        let id: u32 = self.mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(n % QSIZE))).unwrap();
        id as u16
    }

    /// Request `i` of a round: a write of `data` at sector 128 * i (head 3 * i).
    fn write_request(&self, i: u16, data: &[u8]) {
        let hdr = HDR + 16 * u64::from(i);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
        h[8..16].copy_from_slice(&(u64::from(i) * (LEN / 512)).to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let data_at = DATA + LEN * u64::from(i);
        self.mem.write_slice(data, GuestAddress(data_at)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS + u64::from(i))).unwrap();
        let d = 3 * i;
        self.desc(d, hdr, 16, F_NEXT, d + 1);
        self.desc(d + 1, data_at, LEN as u32, F_NEXT, d + 2);
        self.desc(d + 2, STATUS + u64::from(i), 1, F_WRITE, 0);
    }
}

/// A connection as QEMU's vhost-user-blk makes it: the region asked for once (`region` None)
/// and handed back on every connection.
struct Conn {
    fe: Frontend,
    kick: EventFd,
    call: EventFd,
    err: EventFd,
}

/// When the frontend hands over the ring's call fd.
#[derive(Clone, Copy, PartialEq)]
enum Call {
    /// Before the kick (vmm-core's order).
    First,
    /// Not at all: the caller does, after the ring was kicked and enabled (QEMU 7.2's
    /// vhost_user_blk_start unmasks the guest notifiers after vhost_dev_start).
    Later,
}

fn connect(socket: &Path, mem: &GuestMemoryMmap, region: &mut Option<(VhostUserInflight, File)>, base: u16) -> Conn {
    connect_with(socket, mem, region, base, Call::First)
}

fn connect_with(
    socket: &Path,
    mem: &GuestMemoryMmap,
    region: &mut Option<(VhostUserInflight, File)>,
    base: u16,
    order: Call,
) -> Conn {
    let mut fe = Frontend::connect(socket, 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD), "blockd offers INFLIGHT_SHMFD: {pf:?}");
    fe.set_protocol_features(
        VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG,
    )
    .unwrap();
    // No EVENT_IDX: the test polls the used ring.
    let want = offered & !(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    fe.set_features(want | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()).unwrap();
    if region.is_none() {
        *region = Some(fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE)).unwrap());
    }
    let (info, file) = region.as_ref().unwrap();
    fe.set_inflight_fd(info, file.as_raw_fd()).unwrap();
    let r = mem.find_region(GuestAddress(0)).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(r).unwrap()]).unwrap();
    let host = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as u64;
    let (kick, call, err) =
        (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host(DESC),
            used_ring_addr: host(USED),
            avail_ring_addr: host(AVAIL),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, base).unwrap();
    if order == Call::First {
        fe.set_vring_call(0, &call).unwrap();
    }
    fe.set_vring_err(0, &err).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    Conn { fe, kick, call, err }
}

/// desc[head].inflight of the region's only queue.
fn recorded(file: &File, head: u16) -> bool {
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, 16 + 16 * u64::from(head)).unwrap();
    b[0] == 1
}

#[test]
fn sigkill_with_writes_in_flight_each_completed_once_after_restart() {
    let dir = scratch("kill");
    let (socket, image, log) = (dir.join("blk.sock"), dir.join("disk.raw"), dir.join("blockd.log"));
    File::create(&image).unwrap().set_len(u64::from(REQS) * LEN).unwrap();
    let mem = guest();
    let ring = Ring { mem: &mem };
    let mut region = None;
    let mut caught = 0;
    let mut out_of_order = false;
    // Each round: all requests offered and kicked, blockd killed as soon as the first
    // completes, a new blockd finishes the rest.
    for round in 0..6u32 {
        let first = ring.used_idx();
        let base_avail = ring.avail_idx();
        assert_eq!(first, base_avail, "round {round} starts with nothing outstanding");
        let mut child = blockd(&socket, &image, &log);
        let c = connect(&socket, &mem, &mut region, first);
        let datas: Vec<Vec<u8>> = (0..REQS).map(|i| pattern(round, i)).collect();
        for i in 0..REQS {
            ring.write_request(i, &datas[usize::from(i)]);
            ring.offer(3 * i);
        }
        c.kick.write(1).unwrap();
        let end = Instant::now() + WAIT;
        while ring.used_idx() == first {
            assert!(Instant::now() < end, "round {round}: nothing completed; blockd log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            std::hint::spin_loop();
        }
        child.kill();
        let file = region.as_ref().unwrap().1.try_clone().unwrap();
        let file = &file;
        let done_at_kill = ring.used_idx().wrapping_sub(first);
        let in_flight = (0..REQS).filter(|&i| recorded(file, 3 * i)).count();
        if done_at_kill < REQS && in_flight > 0 {
            caught += 1;
        }
        // A new blockd; the frontend knows only the used index. It does not kick.
        let mut child = blockd(&socket, &image, &log);
        let c2 = connect(&socket, &mem, &mut region, ring.used_idx());
        let end = Instant::now() + WAIT;
        while ring.used_idx().wrapping_sub(first) < REQS {
            assert!(
                Instant::now() < end,
                "round {round}: {} of {REQS} completed after the restart ({done_at_kill} before the kill, {in_flight} recorded in flight); blockd log:\n{}",
                ring.used_idx().wrapping_sub(first),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Settle: a request done twice would show up as more used entries.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ring.used_idx().wrapping_sub(first), REQS, "round {round}: extra completions");
        let mut heads: Vec<u16> = (0..REQS).map(|n| ring.used_head(first.wrapping_add(n))).collect();
        out_of_order |= heads.windows(2).any(|w| w[0] > w[1]);
        heads.sort_unstable();
        assert_eq!(heads, (0..REQS).map(|i| 3 * i).collect::<Vec<_>>(), "round {round}: each request once");
        for i in 0..REQS {
            let st: u8 = mem.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
            assert_eq!(st, 0, "round {round}: request {i} status");
        }
        assert!((0..REQS).all(|i| !recorded(file, 3 * i)), "round {round}: nothing left recorded");
        assert_eq!(c2.err.read().ok(), None, "no ring error");
        drop((c, c2));
        child.kill();
        // The image holds every write of the round.
        let img = File::open(&image).unwrap();
        for i in 0..REQS {
            let mut got = vec![0u8; LEN as usize];
            img.read_exact_at(&mut got, u64::from(i) * LEN).unwrap();
            assert!(got == datas[usize::from(i)], "round {round}: request {i}'s data not on the host");
        }
    }
    assert!(caught >= 1, "no round caught requests in flight at the kill: the test proved nothing");
    eprintln!("rounds with requests in flight at the kill: {caught}/6; completions out of order: {out_of_order}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Waits at most `bound` for the call eventfd to be written.
fn signalled(call: &EventFd, bound: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(bound.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: polls one descriptor this test owns, with a local pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1 && call.read().is_ok()
}

/// QEMU's order on a reconnect: the rings are kicked and enabled before their call fds come
/// (the CI hang of the raw QEMU restart test: a request resubmitted from the inflight region
/// completed in that window, its interrupt went nowhere, and Linux waited for it for ever).
/// Completions made before the call fd arrived are signalled once it does, as libvhost-user
/// does ("in case of I/O hang after reconnecting").
#[test]
fn completions_before_the_call_fd_are_signalled_when_it_comes() {
    let dir = scratch("late-call");
    let (socket, image, log) = (dir.join("blk.sock"), dir.join("disk.raw"), dir.join("blockd.log"));
    File::create(&image).unwrap().set_len(u64::from(REQS) * LEN).unwrap();
    let mem = guest();
    let ring = Ring { mem: &mem };
    let mut region = None;
    let mut caught = 0;
    for round in 0..6u32 {
        let first = ring.used_idx();
        let mut child = blockd(&socket, &image, &log);
        let c = connect(&socket, &mem, &mut region, first);
        for i in 0..REQS {
            ring.write_request(i, &pattern(round, i));
            ring.offer(3 * i);
        }
        c.kick.write(1).unwrap();
        let end = Instant::now() + WAIT;
        while ring.used_idx() == first {
            assert!(Instant::now() < end, "round {round}: nothing completed");
            std::hint::spin_loop();
        }
        child.kill();
        let left = REQS - ring.used_idx().wrapping_sub(first);
        // The new blockd runs the requests left (resubmitted, or taken anew) with no call fd.
        let mut child = blockd(&socket, &image, &log);
        let c2 = connect_with(&socket, &mem, &mut region, ring.used_idx(), Call::Later);
        let end = Instant::now() + WAIT;
        while ring.used_idx().wrapping_sub(first) < REQS {
            assert!(Instant::now() < end, "round {round}: the restarted ring does not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Nothing more to complete: only the call fd's arrival can signal now.
        c2.fe.set_vring_call(0, &c2.call).unwrap();
        assert!(
            signalled(&c2.call, Duration::from_secs(5)),
            "round {round}: {left} requests completed before the call fd came and the guest was never signalled"
        );
        if left > 0 {
            caught += 1;
        }
        drop((c, c2));
        child.kill();
        if caught >= 2 {
            break;
        }
    }
    assert!(caught >= 1, "no kill left requests for the restarted blockd: the test proved nothing");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// rust-vmm vm-virtio#196: a driver that publishes an available index more than a queue size
/// ahead made blockd's queue worker spin for ever. Now the ring stops with one SET_VRING_ERR
/// signal, blockd keeps answering the frontend, and the ring works again once restarted.
#[test]
fn hostile_available_index_stops_the_ring_and_signals_the_error() {
    let dir = scratch("hostile");
    let (socket, image, log) = (dir.join("blk.sock"), dir.join("disk.raw"), dir.join("blockd.log"));
    File::create(&image).unwrap().set_len(u64::from(REQS) * LEN).unwrap();
    let mem = guest();
    let ring = Ring { mem: &mem };
    let mut region = None;
    let mut child = blockd(&socket, &image, &log);
    let mut c = connect(&socket, &mem, &mut region, 0);
    // A real request first, then an index QSIZE + 5 past it.
    ring.write_request(0, &pattern(9, 0));
    ring.offer(0);
    mem.write_obj(1 + QSIZE + 5, GuestAddress(AVAIL + 2)).unwrap();
    c.kick.write(1).unwrap();
    let end = Instant::now() + WAIT;
    let mut errs = 0;
    while errs == 0 {
        assert!(Instant::now() < end, "no SET_VRING_ERR signal; blockd log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        errs += c.err.read().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(5));
    }
    // Kicked again and again: no second error, nothing taken.
    for _ in 0..20 {
        c.kick.write(1).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.err.read().ok(), None, "one error signal only");
    assert_eq!(ring.used_idx(), 0, "nothing served from the hostile ring");
    // blockd is not stuck in a loop: it uses next to no CPU over half a second (a spinning
    // worker would use most of it, even on a loaded machine).
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let f: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        // utime and stime: fields 14 and 15, the 12th and 13th after the command.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = cpu();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: sysconf has no memory effects.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    let used_ms = (cpu() - before) * 1000 / hz;
    assert!(used_ms < 100, "blockd used {used_ms} ms of CPU in 500 ms: spinning");
    // The frontend resets the ring (GET_VRING_BASE), the driver starts over sanely, the ring
    // restarts and serves.
    let base = c.fe.get_vring_base(0).unwrap();
    assert!(base <= 1, "base {base}");
    mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    ring.offer(0);
    c = connect_again(c, &mem, 0);
    c.kick.write(1).unwrap();
    let end = Instant::now() + WAIT;
    while ring.used_idx() != 1 {
        assert!(Instant::now() < end, "the restarted ring does not serve; blockd log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(5));
    }
    let st: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(st, 0);
    drop(c);
    child.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The ring set up again on the same connection after GET_VRING_BASE stopped it.
fn connect_again(c: Conn, mem: &GuestMemoryMmap, base: u16) -> Conn {
    let Conn { mut fe, .. } = c;
    let host = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as u64;
    let (kick, call, err) =
        (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host(DESC),
            used_ring_addr: host(USED),
            avail_ring_addr: host(AVAIL),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_err(0, &err).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    Conn { fe, kick, call, err }
}

/// GET_VRING_BASE stops the ring: blockd answers only once the ring's requests completed, so
/// a frontend that stopped its rings knows nothing writes guest RAM any more.
#[test]
fn get_vring_base_waits_for_the_rings_requests() {
    let dir = scratch("stop");
    let (socket, image, log) = (dir.join("blk.sock"), dir.join("disk.raw"), dir.join("blockd.log"));
    File::create(&image).unwrap().set_len(u64::from(REQS) * LEN).unwrap();
    let mem = guest();
    let ring = Ring { mem: &mem };
    let mut region = None;
    let mut child = blockd(&socket, &image, &log);
    let mut c = connect(&socket, &mem, &mut region, 0);
    let mut caught = 0;
    for round in 0..4u32 {
        let first = ring.used_idx();
        for i in 0..REQS {
            ring.write_request(i, &pattern(round, i));
            ring.offer(3 * i);
        }
        c.kick.write(1).unwrap();
        // Stop as soon as blockd took something (writethrough: most are still running).
        let end = Instant::now() + WAIT;
        while ring.used_idx() == first && !(0..REQS).any(|i| recorded(&region.as_ref().unwrap().1, 3 * i)) {
            assert!(Instant::now() < end, "blockd took nothing");
            std::hint::spin_loop();
        }
        let running = REQS - ring.used_idx().wrapping_sub(first);
        let base = c.fe.get_vring_base(0).unwrap();
        // When the answer comes, every request blockd took is in the used ring.
        let done = ring.used_idx();
        assert_eq!(u32::from(done), base, "round {round}: the base is the used index: nothing taken is left running");
        if running > 1 && done.wrapping_sub(first) > 0 {
            caught += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ring.used_idx(), done, "round {round}: a completion after GET_VRING_BASE answered");
        // Serve the rest (if blockd stopped before taking all) on the restarted ring.
        c = connect_again(c, &mem, base as u16);
        c.kick.write(1).unwrap();
        let end = Instant::now() + WAIT;
        while ring.used_idx().wrapping_sub(first) < REQS {
            assert!(Instant::now() < end, "round {round}: the restarted ring does not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(caught >= 1, "GET_VRING_BASE never came with requests running: the test proved nothing");
    drop(c);
    child.kill();
    std::fs::remove_dir_all(&dir).unwrap();
}
