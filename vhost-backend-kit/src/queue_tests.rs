//! Inflight tracking over a driver played with virtio-queue's mock split ring, one state of
//! the spec at a time: a backend is "killed" at each point between taking a request and
//! completing it (its rings dropped, nothing more written), and a brand-new backend (new
//! rings, the region re-mapped from the file the frontend kept) must resubmit exactly the
//! requests the driver has not seen completed, oldest first, and continue from the right
//! available index. The truth compared against is the driver's side: the used ring.

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserInflight;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::{TrackedRings, Ticket};
use crate::inflight::{queue_region_size, QueueRegion, Region};

const SIZE: u16 = 8;
/// The used ring, away from the mock's: virtio-queue 0.18's mock places its used ring at the
/// available ring's start plus its entry count in bytes, inside the available ring.
const USED: u64 = 0x4000;

type Mem = GuestMemoryMmap<()>;

fn eventfd() -> File {
    // SAFETY: eventfd with valid flags; the new descriptor is owned by the File.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// The eventfd's count, reset to 0 (0 when nobody wrote it).
fn take_count(f: &File) -> u64 {
    let mut b = [0u8; 8];
    match (&*f).read(&mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        Ok(n) => panic!("short eventfd read {n}"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

/// The frontend and the guest driver: guest RAM with one split ring of SIZE entries, every
/// descriptor a one-buffer chain, and the inflight file the frontend keeps across backends.
struct Frontend {
    mem: &'static Mem,
    /// The descriptor table and available ring. The mock zeroes the rings' headers when made:
    /// one per test, over memory leaked for it.
    mock: MockSplitQueue<'static, Mem>,
    atomic: GuestMemoryAtomic<Mem>,
    inflight: VhostUserInflight,
    file: File,
    kick: File,
    err: File,
}

/// One backend process: its rings, and its view of the ring's state.
struct Backend {
    rings: TrackedRings,
    vring: VringRwLock,
}

impl Frontend {
    fn new() -> Frontend {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mem: &'static Mem = Box::leak(Box::new(mem));
        let mock = MockSplitQueue::create(mem, GuestAddress(0), SIZE);
        let rings = TrackedRings::new(1);
        // GET_INFLIGHT_FD, once, as QEMU and vmm-core do.
        let (inflight, file) = rings.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, SIZE)).unwrap();
        let f = Frontend { mem, mock, atomic, inflight, file, kick: eventfd(), err: eventfd() };
        let m = f.mock();
        for i in 0..SIZE {
            let d = SplitDescriptor::new(0x8_0000 + u64::from(i) * 0x100, 0x100, VRING_DESC_F_WRITE as u16, 0);
            m.desc_table().store(i, RawDescriptor::from(d)).unwrap();
        }
        f
    }

    fn mock(&self) -> &MockSplitQueue<'static, Mem> {
        &self.mock
    }

    /// The driver makes `head` available.
    fn offer(&self, head: u16) {
        let m = self.mock();
        let idx = m.avail().idx().load();
        m.avail().ring().ref_at(usize::from(idx % SIZE)).unwrap().store(head);
        m.avail().idx().store(idx.wrapping_add(1));
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mock().avail().idx().store(idx);
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED + 2)).unwrap())
    }

    /// Heads the device put in the used ring, in order.
    fn used_heads(&self) -> Vec<u16> {
        (0..self.used_idx())
            .map(|i| {
                let id: u32 = self.mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(i % SIZE))).unwrap();
                u32::from_le(id) as u16
            })
            .collect()
    }

    /// A backend connects: SET_INFLIGHT_FD with the kept file, the ring's setup (the base is
    /// what the frontend believes; recovery may override it), then the ring starts.
    fn connect(&self, base: u16) -> Backend {
        self.connect_with(base, Some(&self.inflight))
    }

    fn connect_with(&self, base: u16, inflight: Option<&VhostUserInflight>) -> Backend {
        let rings = TrackedRings::new(1);
        if let Some(msg) = inflight {
            rings.set_inflight_fd(msg, self.file.try_clone().unwrap()).unwrap();
        }
        let vring = VringRwLock::new(self.atomic.clone(), SIZE).unwrap();
        let m = self.mock();
        vring.set_queue_size(SIZE);
        vring.set_queue_info(m.desc_table_addr().0, m.avail_addr().0, USED).unwrap();
        vring.set_queue_next_used(self.used_idx());
        vring.set_queue_next_avail(base);
        vring.set_kick(Some(self.kick.try_clone().unwrap()));
        vring.set_err(Some(self.err.try_clone().unwrap()));
        rings.start_vring(0, &vring).unwrap();
        vring.set_queue_ready(true);
        Backend { rings, vring }
    }

    /// A second mapping of the region, to look at what a backend left there.
    fn region(&self) -> QueueRegion {
        QueueRegion::new(Arc::new(Region::open(&self.file, &self.inflight).unwrap()), 0).unwrap()
    }
}

/// `pop` needs a memory handle; the tests' is the atomic's guard.
fn pop(fe: &Frontend, be: &Backend) -> Option<Ticket> {
    be.rings.queue(0).unwrap().pop(&be.vring, fe.atomic.memory()).map(|t| {
        assert_eq!(t.chain.head_index(), t.ticket.head());
        t.ticket
    })
}

fn complete(be: &Backend, t: Ticket) {
    assert!(be.rings.queue(0).unwrap().add_used(&be.vring, t, 1));
}

fn heads(ts: &[Ticket]) -> Vec<u16> {
    ts.iter().map(|t| t.head()).collect()
}

fn pop_all(fe: &Frontend, be: &Backend) -> Vec<Ticket> {
    std::iter::from_fn(|| pop(fe, be)).collect()
}

#[test]
fn region_layout_matches_libvhost_user() {
    // ALIGN_UP(16 * n + 2, 64)
    assert_eq!(queue_region_size(1), 64);
    assert_eq!(queue_region_size(4), 128);
    assert_eq!(queue_region_size(128), 2112);
    assert_eq!(queue_region_size(256), 4160);
    assert_eq!(queue_region_size(1024), 16448);
    let rings = TrackedRings::new(2);
    let (reply, file) = rings.get_inflight_fd(&VhostUserInflight::new(0, 0, 2, 256)).unwrap();
    assert_eq!((reply.mmap_size, reply.mmap_offset, reply.num_queues, reply.queue_size), (2 * 4160, 0, 2, 256));
    assert_eq!(file.metadata().unwrap().len(), 2 * 4160);
    // Fresh: zeroed, and sealed against resizing.
    assert!(file.set_len(1).is_err());
    let mut bytes = Vec::new();
    (&file).read_to_end(&mut bytes).unwrap();
    assert!(bytes.iter().all(|&b| b == 0));
}

#[test]
fn fresh_region_keeps_the_frontends_base_and_records_in_order() {
    let fe = Frontend::new();
    for h in [3, 1, 4] {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let r = fe.region();
    assert_eq!(r.version(), 1, "version initialised");
    assert_eq!(take_count(&fe.kick), 0, "nothing to recover: no self-kick");
    let ts = pop_all(&fe, &be);
    assert_eq!(heads(&ts), [3, 1, 4]);
    assert_eq!([r.counter(3), r.counter(1), r.counter(4)], [0, 1, 2]);
    assert!(r.is_inflight(3) && r.is_inflight(1) && r.is_inflight(4) && !r.is_inflight(0));
    // In order.
    for t in &ts {
        complete(&be, *t);
    }
    assert_eq!(fe.used_heads(), [3, 1, 4]);
    assert_eq!(r.used_idx(), 3);
    assert_eq!(r.last_batch_head(), 4);
    assert!((0..SIZE).all(|h| !r.is_inflight(h)));
    assert_eq!(be.rings.queue(0).unwrap().in_flight(), 0);
}

#[test]
fn out_of_order_completion_then_kill_resubmits_the_rest_oldest_first() {
    let fe = Frontend::new();
    for h in 0..6 {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let ts = pop_all(&fe, &be);
    assert_eq!(ts.len(), 6);
    // Out of order: 4, 1, 5 done; 0, 2, 3 in flight at the kill.
    for i in [4, 1, 5] {
        complete(&be, ts[i]);
    }
    drop(be);
    assert_eq!(fe.used_heads(), [4, 1, 5]);
    // The frontend's base would be the used idx (3) or anything: recovery decides.
    let be = fe.connect(3);
    assert_eq!(take_count(&fe.kick), 1, "the new backend kicked itself");
    assert_eq!(be.vring.queue_next_avail(), 6, "next_avail = used idx 3 + 3 in flight");
    let again = pop_all(&fe, &be);
    assert_eq!(heads(&again), [0, 2, 3]);
    for t in again {
        complete(&be, t);
    }
    let mut all = fe.used_heads();
    assert_eq!(all.len(), 6, "each request completed exactly once: {all:?}");
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2, 3, 4, 5]);
}

#[test]
fn resubmission_follows_the_counter_not_the_head_or_slot() {
    let fe = Frontend::new();
    for h in [6, 2, 7, 0] {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let ts = pop_all(&fe, &be);
    drop(be);
    // A second backend completes nothing and is killed too: counters carry on after the max.
    let be = fe.connect(0);
    assert_eq!(heads(&pop_all(&fe, &be)), [6, 2, 7, 0]);
    fe.offer(5);
    let t5 = pop(&fe, &be).unwrap();
    assert_eq!(t5.head(), 5);
    let r = fe.region();
    assert_eq!(r.counter(5), 4, "counter continues after the largest recovered (3)");
    drop(be);
    let be = fe.connect(0);
    assert_eq!(heads(&pop_all(&fe, &be)), [6, 2, 7, 0, 5]);
    drop(ts);
}

#[test]
fn killed_between_pop_and_record_takes_the_chain_again() {
    let fe = Frontend::new();
    for h in [2, 5] {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let t = pop(&fe, &be).unwrap();
    assert_eq!(t.head(), 2);
    // The next chain leaves the available ring but the process dies before recording it.
    let raw = be.vring.get_mut().get_queue_mut().pop_descriptor_chain(fe.atomic.memory()).unwrap();
    assert_eq!(raw.head_index(), 5);
    assert_eq!(be.vring.queue_next_avail(), 2);
    drop(be);
    let be = fe.connect(2);
    assert_eq!(be.vring.queue_next_avail(), 1, "used 0 + 1 recorded: head 5 is taken again from the ring");
    assert_eq!(heads(&pop_all(&fe, &be)), [2, 5]);
}

#[test]
fn killed_after_last_batch_head_before_used_idx_resubmits() {
    let fe = Frontend::new();
    for h in [1, 3] {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let ts = pop_all(&fe, &be);
    complete(&be, ts[0]);
    // Completing head 3: last_batch_head written, then killed before the used idx moved.
    fe.region().pre_put(3);
    drop(be);
    assert_eq!(fe.used_heads(), [1]);
    let be = fe.connect(1);
    assert_eq!(heads(&pop_all(&fe, &be)), [3]);
    assert_eq!(be.vring.queue_next_avail(), 2);
}

#[test]
fn killed_after_used_idx_before_clearing_inflight_does_not_resubmit() {
    let fe = Frontend::new();
    for h in [1, 3, 6] {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let ts = pop_all(&fe, &be);
    complete(&be, ts[0]);
    // Head 6 (out of order): last_batch_head, the used ring published, then killed before
    // inflight = 0 and before the region's used_idx followed.
    let r = fe.region();
    r.pre_put(6);
    be.vring.add_used(6, 1).unwrap();
    drop(be);
    assert_eq!(fe.used_heads(), [1, 6]);
    assert!(r.is_inflight(6));
    assert_eq!(r.used_idx(), 1);
    let be = fe.connect(2);
    assert!(!r.is_inflight(6), "the used_idx mismatch cleared the last batch's head");
    assert_eq!(r.used_idx(), 2);
    assert_eq!(be.vring.queue_next_avail(), 3);
    assert_eq!(heads(&pop_all(&fe, &be)), [3], "head 6 is not done twice");
}

#[test]
fn killed_after_clearing_inflight_before_used_idx_recovers_the_same() {
    let fe = Frontend::new();
    fe.offer(4);
    fe.offer(0);
    let be = fe.connect(0);
    let ts = pop_all(&fe, &be);
    let r = fe.region();
    r.pre_put(4);
    be.vring.add_used(4, 1).unwrap();
    // inflight = 0 written, the region's used_idx not yet.
    r.post_put(4, 0);
    drop(be);
    let be = fe.connect(0);
    assert_eq!(r.used_idx(), 1);
    assert_eq!(heads(&pop_all(&fe, &be)), [0]);
    drop(ts);
}

#[test]
fn a_head_whose_avail_slot_was_reused_is_rebuilt_from_the_descriptor_table() {
    let fe = Frontend::new();
    // Fill the ring: heads 0..8 in slots 0..8.
    for h in 0..SIZE {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let ts = pop_all(&fe, &be);
    // All but head 0 complete; the driver reuses those descriptors: avail idx 8.. wraps onto
    // slot 0, which held head 0, now head 1.
    for t in &ts[1..] {
        complete(&be, *t);
    }
    for h in 1..SIZE {
        fe.offer(h);
    }
    drop(be);
    let be = fe.connect(SIZE - 1);
    assert_eq!(be.vring.queue_next_avail(), SIZE, "used 7 + 1 in flight");
    let again = pop_all(&fe, &be);
    assert_eq!(heads(&again), [0, 1, 2, 3, 4, 5, 6, 7], "head 0 first (from the region), then the new ones");
}

#[test]
fn without_a_region_nothing_is_recorded_and_the_base_stands() {
    let fe = Frontend::new();
    for h in [1, 2] {
        fe.offer(h);
    }
    let be = fe.connect_with(0, None);
    let ts = pop_all(&fe, &be);
    assert_eq!(heads(&ts), [1, 2]);
    let r = fe.region();
    assert_eq!(r.version(), 0, "the region was never handed over: untouched");
    complete(&be, ts[1]);
    drop(be);
    let be = fe.connect_with(1, None);
    assert_eq!(be.vring.queue_next_avail(), 1);
    assert_eq!(take_count(&fe.kick), 0);
    assert_eq!(heads(&pop_all(&fe, &be)), [2]);
}

#[test]
fn bad_set_inflight_fd_is_an_error_not_a_crash() {
    let fe = Frontend::new();
    let rings = TrackedRings::new(1);
    let good = fe.inflight;
    let bad = [
        VhostUserInflight::new(good.mmap_size - 1, 0, 1, SIZE),
        // Larger than the file.
        VhostUserInflight::new(good.mmap_size, 0, 2, SIZE),
        VhostUserInflight::new(good.mmap_size, 4096, 1, SIZE),
        VhostUserInflight::new(good.mmap_size, 1, 1, SIZE),
        VhostUserInflight::new(good.mmap_size, 0, 0, SIZE),
        VhostUserInflight::new(good.mmap_size, 0, 1, 0),
        VhostUserInflight::new(u64::MAX, u64::MAX - 4095, 1, SIZE),
    ];
    for msg in bad {
        let e = rings.set_inflight_fd(&msg, fe.file.try_clone().unwrap());
        assert!(e.is_err(), "{:?} accepted", (msg.mmap_size, msg.mmap_offset, msg.num_queues, msg.queue_size));
        assert_eq!(std::io::Error::from(e.unwrap_err()).kind(), std::io::ErrorKind::InvalidInput);
    }
    assert!(!rings.has_region());
    // A queue bigger than the region's: refused when the ring starts.
    let small = TrackedRings::new(1);
    let (msg, file) = small.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 4)).unwrap();
    small.set_inflight_fd(&msg, file).unwrap();
    let vring = VringRwLock::new(fe.atomic.clone(), SIZE).unwrap();
    let m = fe.mock();
    vring.set_queue_size(SIZE);
    vring.set_queue_info(m.desc_table_addr().0, m.avail_addr().0, USED).unwrap();
    assert!(small.start_vring(0, &vring).is_err());
    // A queue the region has no part for.
    let two = TrackedRings::new(2);
    two.set_inflight_fd(&msg, small_file(&small)).unwrap();
    assert!(two.start_vring(1, &vring).is_err());
    assert!(two.start_vring(7, &vring).is_err());
}

fn small_file(rings: &TrackedRings) -> File {
    rings.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 4)).unwrap().1
}

#[test]
fn hostile_avail_index_stops_the_ring_once_and_signals_the_error() {
    let fe = Frontend::new();
    fe.offer(1);
    let be = fe.connect(0);
    let q = be.rings.queue(0).unwrap();
    let t = pop(&fe, &be).unwrap();
    // The driver claims SIZE + 2 more chains than the ring can hold.
    fe.set_avail_idx(1 + SIZE + 1);
    // Served on a thread, so a spin fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let (q2, vring, atomic) = (q.clone(), be.vring.clone(), fe.atomic.clone());
    std::thread::spawn(move || {
        let mut taken = 0;
        let r = q2.drain(&vring, atomic.memory(), |_| taken += 1, || {});
        let _ = tx.send((r.is_ok(), taken));
    });
    let (ok, mut taken) = rx.recv_timeout(Duration::from_secs(5)).expect("the worker spins on the hostile index");
    assert!(ok);
    assert_eq!(taken, 0);
    assert!(q.is_broken());
    assert_eq!(take_count(&fe.err), 1, "SET_VRING_ERR eventfd written once");
    // Kicks keep coming: still nothing taken, no second error.
    for _ in 0..3 {
        q.drain(&be.vring, fe.atomic.memory(), |_| taken += 1, || {}).unwrap();
    }
    assert_eq!(taken, 0);
    assert_eq!(take_count(&fe.err), 0);
    // What was taken before still completes.
    complete(&be, t);
    assert_eq!(fe.used_heads(), [1]);
    // The frontend resets the device: the driver starts over, the ring restarts and works.
    fe.set_avail_idx(1);
    let be2 = fe.connect(1);
    fe.offer(2);
    assert_eq!(heads(&pop_all(&fe, &be2)), [2]);
    drop(be);
}

#[test]
fn wait_idle_is_bounded_and_ignores_parked_requests() {
    let fe = Frontend::new();
    for h in [1, 2, 3] {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let q = be.rings.queue(0).unwrap().clone();
    let ts = pop_all(&fe, &be);
    assert_eq!(q.in_flight(), 3);
    let started = Instant::now();
    assert!(!q.wait_idle(Duration::from_millis(50), || 0));
    assert!(started.elapsed() < Duration::from_secs(2));
    // One parked by the device (werror=stop), one completed now, one by another thread
    // while we wait.
    complete(&be, ts[1]);
    let vring = be.vring.clone();
    let (q2, t2) = (q.clone(), ts[2]);
    let th = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        assert!(q2.add_used(&vring, t2, 1));
    });
    assert!(!q.wait_idle(Duration::from_millis(1), || 1), "one still running");
    assert!(q.wait_idle(Duration::from_secs(5), || 1));
    th.join().unwrap();
    assert_eq!(q.in_flight(), 1, "the parked request is still in flight");
    assert!(fe.region().is_inflight(1), "and still recorded: a new backend resubmits it");
    drop(be);
    let be = fe.connect(0);
    assert_eq!(heads(&pop_all(&fe, &be)), [1]);
}

#[test]
fn completions_after_close_or_restart_are_dropped() {
    let fe = Frontend::new();
    for h in [1, 2] {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let ts = pop_all(&fe, &be);
    // The ring restarts on the same connection (stop/start): what was taken before is
    // resubmitted from the region, and the old completion must not land twice.
    be.rings.start_vring(0, &be.vring).unwrap();
    assert!(!be.rings.queue(0).unwrap().add_used(&be.vring, ts[0], 1));
    let again = pop_all(&fe, &be);
    assert_eq!(heads(&again), [1, 2]);
    complete(&be, again[0]);
    be.rings.close();
    assert!(!be.rings.queue(0).unwrap().add_used(&be.vring, again[1], 1));
    assert!(pop(&fe, &be).is_none());
    assert_eq!(fe.used_heads(), [1]);
}

#[test]
fn completions_from_many_threads_keep_region_and_ring_consistent() {
    let fe = Frontend::new();
    let be = Arc::new(fe.connect(0));
    let mut done = 0u32;
    for round in 0..50u16 {
        for h in 0..SIZE {
            fe.offer(h);
        }
        let ts = pop_all(&fe, &be);
        assert_eq!(ts.len(), usize::from(SIZE), "round {round}");
        let threads: Vec<_> = ts
            .into_iter()
            .map(|t| {
                let be = be.clone();
                std::thread::spawn(move || complete(&be, t))
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        done += u32::from(SIZE);
        let r = fe.region();
        assert_eq!(r.used_idx(), fe.used_idx());
        assert_eq!(u32::from(fe.used_idx()), done % 65536);
        assert!((0..SIZE).all(|h| !r.is_inflight(h)));
    }
}

#[test]
fn a_batch_moves_the_used_index_once_and_clears_its_records() {
    let fe = Frontend::new();
    for h in 0..5 {
        fe.offer(h);
    }
    let be = fe.connect(0);
    let ts = pop_all(&fe, &be);
    let q = be.rings.queue(0).unwrap();
    complete(&be, ts[4]);
    assert_eq!(fe.used_idx(), 1);
    // Three chains of one frame, in taking order, then the used index: 1 -> 4 in one step.
    let batch = [(ts[0], 100), (ts[1], 200), (ts[2], 50)];
    assert!(q.add_used_batch(&be.vring, &*fe.atomic.memory(), &batch));
    assert_eq!(fe.used_idx(), 4);
    assert_eq!(fe.used_heads(), [4, 0, 1, 2]);
    let len = |slot: u64| -> u32 { u32::from_le(fe.mem.read_obj(GuestAddress(USED + 8 + 8 * slot)).unwrap()) };
    assert_eq!((len(1), len(2), len(3)), (100, 200, 50));
    assert_eq!(q.in_flight(), 1, "only head 3 left");
    let r = fe.region();
    assert!((0..3).all(|h| !r.is_inflight(h)) && r.is_inflight(3));
    // Killed now: the new backend resubmits head 3 alone.
    drop(be);
    let be = fe.connect(4);
    let again = pop_all(&fe, &be);
    assert_eq!(heads(&again), [3]);
    // A ticket of an earlier ring start refuses the whole batch: nothing added.
    be.rings.start_vring(0, &be.vring).unwrap();
    assert!(!be.rings.queue(0).unwrap().add_used_batch(&be.vring, &*fe.atomic.memory(), &[(again[0], 1)]));
    assert_eq!(fe.used_idx(), 4);
}
