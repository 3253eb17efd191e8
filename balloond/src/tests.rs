//! Unit tests over descriptor chains built with virtio-queue's mock in a memfd-backed guest
//! memory laid out as vmm-core lays out RAM (regions of one memfd, a hole between them), so
//! that hole punching is measured on a real file: the drop of its allocated blocks.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BalloonBackend, FEATURES};
use crate::config::PAGE_SIZE;
use crate::device::{CounterValues, Device, Event};
use crate::queues::{self, read_pfns, PfnChainError, DEFLATE, INFLATE, MAX_PFN_BYTES, STATS};
use crate::reclaim::{allocated_bytes, discard_pfns};
use crate::stats::{encode, S_MAJFLT, S_MEMFREE, S_MEMTOT, S_MINFLT, S_SWAP_IN, S_SWAP_OUT};

const MIB: u64 = 1 << 20;
/// Region A: GPA [0, 4 MiB) at file offset 0.
const A_END: u64 = 4 * MIB;
/// Region B: GPA [8 MiB, 12 MiB) at file offset 4 MiB; [4 MiB, 8 MiB) is a hole.
const B_START: u64 = 8 * MIB;
const B_END: u64 = 12 * MIB;
/// Region C: GPA 16 MiB, 1.5 pages, at file offset 8 MiB: its second page is not whole.
const C_START: u64 = 16 * MIB;
const C_LEN: u64 = PAGE_SIZE + PAGE_SIZE / 2;
const FILE_LEN: u64 = 8 * MIB + 2 * PAGE_SIZE;
/// Where the tests put PFN lists and stats buffers (region A, below the pages ballooned).
const LIST: u64 = MIB;
const LIST2: u64 = MIB + 0x4_0000;
/// Pages that get ballooned: [2 MiB, 4 MiB) in A, all of B.
const A_PAGES: u64 = 2 * MIB;

const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;

struct Guest {
    mem: GuestMemoryMmap,
    file: File,
}

fn memfd() -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the new descriptor is owned by the File.
    let fd = unsafe { libc::memfd_create(c"balloond-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(FILE_LEN).unwrap();
    f
}

fn guest() -> Guest {
    let file = memfd();
    let fo = |off| Some(FileOffset::new(file.try_clone().unwrap(), off));
    let mem = GuestMemoryMmap::from_ranges_with_files([
        (GuestAddress(0), A_END as usize, fo(0)),
        (GuestAddress(B_START), (B_END - B_START) as usize, fo(4 * MIB)),
        (GuestAddress(C_START), C_LEN as usize, fo(8 * MIB)),
    ])
    .unwrap();
    // Touch the rings and lists (so the tests' own writes there allocate nothing later) and
    // the pages that may be ballooned, so they are allocated in the memfd.
    mem.write_slice(&vec![0u8; A_PAGES as usize], GuestAddress(0)).unwrap();
    let fill = vec![0xabu8; (A_END - A_PAGES) as usize];
    mem.write_slice(&fill, GuestAddress(A_PAGES)).unwrap();
    mem.write_slice(&fill, GuestAddress(B_START)).unwrap();
    mem.write_slice(&[0xab; C_LEN as usize], GuestAddress(C_START)).unwrap();
    Guest { mem, file }
}

impl Guest {
    fn allocated(&self) -> u64 {
        allocated_bytes(&self.file).unwrap()
    }

    fn page_is(&self, gpa: u64, byte: u8) -> bool {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        self.mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf.iter().all(|&b| b == byte)
    }

    /// Writes `pfns` as le32 at `at`, returns the byte length.
    fn pfn_list(&self, at: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }

    /// Runs `f` on a chain of `(addr, len, flags)` descriptors.
    fn with_chain<T>(
        &self,
        descs: &[(u64, u32, u16)],
        f: impl FnOnce(&virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> T,
    ) -> T {
        let vq = MockSplitQueue::new(&self.mem, 16);
        let raw: Vec<RawDescriptor> =
            descs.iter().map(|&(a, l, fl)| RawDescriptor::from(SplitDescriptor::new(a, l, fl, 0))).collect();
        let chain = vq.build_desc_chain(&raw).unwrap();
        f(&chain)
    }
}

fn device() -> Arc<Device> {
    Device::new(B_END).unwrap()
}

fn pfn(gpa: u64) -> u32 {
    (gpa / PAGE_SIZE) as u32
}

fn counters(d: &Device) -> CounterValues {
    d.counters.values()
}

#[test]
fn inflate_punches_the_memfd_and_the_blocks_drop() {
    let g = guest();
    let dev = device();
    // 256 pages of A (listed backwards, one twice) and 128 of B: contiguous runs, unordered.
    let mut pfns: Vec<u32> = (pfn(A_PAGES)..pfn(A_PAGES) + 256).rev().collect();
    pfns.push(pfn(A_PAGES) + 7);
    pfns.extend(pfn(B_START)..pfn(B_START) + 128);
    let len = g.pfn_list(LIST, &pfns);
    let before = g.allocated();
    g.with_chain(&[(LIST, len, R)], |c| queues::inflate(&dev, c));
    let after = g.allocated();
    assert_eq!(before - after, 384 * PAGE_SIZE, "st_blocks drop: {before} -> {after}");
    assert_eq!(counters(&dev), CounterValues { freed: 384, ..Default::default() });
    // Freed pages read as zero; their neighbours are untouched.
    assert!(g.page_is(A_PAGES, 0) && g.page_is(A_PAGES + 255 * PAGE_SIZE, 0));
    assert!(g.page_is(A_PAGES + 256 * PAGE_SIZE, 0xab));
    assert!(g.page_is(B_START + 127 * PAGE_SIZE, 0) && g.page_is(B_START + 128 * PAGE_SIZE, 0xab));
    // A freed page the guest touches again comes back (deflate needs nothing from us).
    // (Reading a punched page of a shared memfd mapping allocates it again, so measure
    // around a page not read above.)
    let before_touch = g.allocated();
    g.mem.write_obj(0x5au8, GuestAddress(B_START + 5 * PAGE_SIZE)).unwrap();
    assert_eq!(g.allocated(), before_touch + PAGE_SIZE);
}

#[test]
fn runs_are_batched_per_region() {
    let g = guest();
    // One run crossing from A's last pages into the hole and nothing else: one punch for A.
    let pfns: Vec<u32> = (pfn(A_END) - 4..pfn(A_END) + 4).collect();
    let out = discard_pfns(&g.mem, &pfns);
    assert_eq!((out.freed, out.refused, out.punches), (4, 4, 1));
    assert_eq!(out.first_refused, Some(u64::from(pfn(A_END))));
    // 1000 scattered-but-contiguous PFNs in B: one call.
    let mut pfns: Vec<u32> = (pfn(B_START)..pfn(B_START) + 1000).collect();
    pfns.reverse();
    let out = discard_pfns(&g.mem, &pfns);
    assert_eq!((out.freed, out.punches), (1000, 1));
}

#[test]
fn hostile_pfns_are_refused_and_nothing_else_is_freed() {
    let g = guest();
    let dev = device();
    let pfns = [
        0xffff_ffff,      // 16 TiB: outside guest RAM
        pfn(B_END),       // just past the last region
        pfn(A_END),       // in the hole between A and B
        pfn(B_START) - 1, // the hole's last page
        pfn(C_START) + 1, // C's second page is only half inside C
        pfn(A_PAGES) + 3, // a good one
        pfn(C_START),     // C's first page is whole: good
    ];
    let len = g.pfn_list(LIST, &pfns);
    let before = g.allocated();
    g.with_chain(&[(LIST, len, R)], |c| queues::inflate(&dev, c));
    assert_eq!(before - g.allocated(), 2 * PAGE_SIZE);
    assert_eq!(counters(&dev), CounterValues { freed: 2, refused: 5, ..Default::default() });
    assert!(g.page_is(A_PAGES + 3 * PAGE_SIZE, 0));
    assert!(g.page_is(A_PAGES + 2 * PAGE_SIZE, 0xab) && g.page_is(A_PAGES + 4 * PAGE_SIZE, 0xab));
}

#[test]
fn malformed_inflate_chains_free_nothing() {
    let g = guest();
    let dev = device();
    let len = g.pfn_list(LIST, &[pfn(A_PAGES), pfn(A_PAGES) + 1]);
    let before = g.allocated();
    // A device-writable descriptor where the PFN list should be readable.
    g.with_chain(&[(LIST, len, W)], |c| queues::inflate(&dev, c));
    // Readable PFNs followed by a writable descriptor: refused whole.
    g.with_chain(&[(LIST, len, R), (LIST2, 4, W)], |c| queues::inflate(&dev, c));
    // A descriptor outside guest memory (in the hole), after a good one.
    g.with_chain(&[(LIST, len, R), (A_END + 16, 8, R)], |c| queues::inflate(&dev, c));
    // A descriptor running off the end of region A.
    g.with_chain(&[(A_END - 4, 8, R)], |c| queues::inflate(&dev, c));
    // More PFN data than accepted (inside guest memory).
    g.with_chain(&[(LIST, len, R), (A_PAGES, MAX_PFN_BYTES as u32, R)], |c| queues::inflate(&dev, c));
    assert_eq!(g.allocated(), before);
    assert_eq!(counters(&dev), CounterValues { chains_refused: 5, ..Default::default() });
    // The same list, well formed: freed.
    g.with_chain(&[(LIST, len, R)], |c| queues::inflate(&dev, c));
    assert_eq!(before - g.allocated(), 2 * PAGE_SIZE);
}

#[test]
fn pfn_lists_span_descriptors_and_trailing_bytes_are_ignored() {
    let g = guest();
    let pfns = [pfn(A_PAGES), pfn(A_PAGES) + 1, pfn(A_PAGES) + 2];
    g.pfn_list(LIST, &pfns);
    // 12 bytes as 6 + 6 (a PFN split across descriptors), then 2 stray bytes.
    g.mem.write_slice(&[0xee, 0xee], GuestAddress(LIST2)).unwrap();
    let got = g.with_chain(&[(LIST, 6, R), (LIST + 6, 6, R), (LIST2, 2, R)], |c| read_pfns(c).unwrap());
    assert_eq!(got.pfns, pfns);
    assert_eq!(got.trailing, 2);
    // Empty chain data.
    let got = g.with_chain(&[(LIST, 0, R)], |c| read_pfns(c).unwrap());
    assert!(got.pfns.is_empty());
    // Errors name the problem.
    let e = g.with_chain(&[(LIST, 8, W)], |c| read_pfns(c).unwrap_err());
    assert!(matches!(e, PfnChainError::Writable(1)), "{e}");
    let e = g.with_chain(&[(LIST, MAX_PFN_BYTES as u32 + 4, R)], |c| read_pfns(c).unwrap_err());
    assert!(matches!(e, PfnChainError::TooLong(n) if n == MAX_PFN_BYTES as u64 + 4), "{e}");
}

#[test]
fn deflate_counts_and_frees_nothing() {
    let g = guest();
    let dev = device();
    let len = g.pfn_list(LIST, &[pfn(A_PAGES), pfn(A_PAGES) + 1, 0xffff_ffff]);
    let before = g.allocated();
    g.with_chain(&[(LIST, len, R)], |c| queues::deflate(&dev, c));
    g.with_chain(&[(LIST, len, W)], |c| queues::deflate(&dev, c));
    assert_eq!(g.allocated(), before);
    assert_eq!(counters(&dev), CounterValues { deflated: 3, chains_refused: 1, ..Default::default() });
    assert!(g.page_is(A_PAGES, 0xab));
}

#[test]
fn stats_buffers_short_garbage_and_mixed() {
    let g = guest();
    let dev = device();
    assert_eq!(dev.info().free_mem, None, "no stats before the guest sends some");
    let buf = encode(&[(S_SWAP_IN, 1), (S_SWAP_OUT, 2), (S_MAJFLT, 3), (S_MINFLT, 4), (S_MEMFREE, 5 << 20)]);
    g.mem.write_slice(&buf, GuestAddress(LIST)).unwrap();
    // Split over two readable descriptors with a writable one between (ignored).
    g.with_chain(&[(LIST, 15, R), (LIST2, 64, W), (LIST + 15, buf.len() as u32 - 15, R)], |c| queues::stats(&dev, c));
    let info = dev.info();
    assert_eq!(
        (info.mem_swapped_in, info.mem_swapped_out, info.major_page_faults, info.minor_page_faults),
        (Some(1), Some(2), Some(3), Some(4))
    );
    assert_eq!((info.free_mem, info.total_mem), (Some(5 << 20), None), "MEMTOT was not sent");
    // A short buffer (half an entry): no numbers, the old ones replaced.
    g.with_chain(&[(LIST, 5, R)], |c| queues::stats(&dev, c));
    assert_eq!(dev.info().free_mem, None);
    // Garbage: unknown tags skipped, huge values clamp to i64::MAX.
    let mut buf = encode(&[(0x7777, 1), (S_MEMTOT, u64::MAX)]);
    buf.extend_from_slice(&[1, 2, 3]);
    g.mem.write_slice(&buf, GuestAddress(LIST)).unwrap();
    g.with_chain(&[(LIST, buf.len() as u32, R)], |c| queues::stats(&dev, c));
    assert_eq!(dev.info().total_mem, Some(i64::MAX));
    // A buffer outside guest memory: ignored, nothing crashes, old numbers stay.
    g.with_chain(&[(A_END + 8, 10, R)], |c| queues::stats(&dev, c));
    assert_eq!(dev.info().total_mem, Some(i64::MAX));
    // Far more than a stats buffer needs: only the first part is read.
    let big = encode(&[(S_MEMTOT, 42); 200]);
    g.mem.write_slice(&big, GuestAddress(LIST)).unwrap();
    g.with_chain(&[(LIST, big.len() as u32, R)], |c| queues::stats(&dev, c));
    assert_eq!(dev.info().total_mem, Some(42));
    assert_eq!(counters(&dev).stats_buffers, 5);
}

/// A backend whose three vrings live in the test guest's memory, driven as the worker
/// threads drive it.
struct Rings {
    g: &'static Guest,
    mocks: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    backend: BalloonBackend,
    vrings: Vec<VringRwLock>,
    events: Arc<Mutex<Vec<Event>>>,
}

const QSIZE: u16 = 16;
/// Ring q at GPA q * 64 KiB (each well inside a page-aligned 64 KiB slot below LIST).
fn ring_base(q: u16) -> GuestAddress {
    GuestAddress(0x1_0000 * (u64::from(q) + 1))
}

impl Rings {
    fn new() -> Rings {
        // Leaked so the mock rings (which borrow the memory) can live beside it.
        let g: &'static Guest = Box::leak(Box::new(guest()));
        let dev = device();
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let ev = events.clone();
        dev.set_event_sink(Some(Box::new(move |e| ev.lock().unwrap().push(e))));
        let backend = BalloonBackend::new(dev).unwrap();
        let atomic = GuestMemoryAtomic::new(g.mem.clone());
        backend.update_memory(atomic.clone()).unwrap();
        let mocks: Vec<_> = (0..3u16).map(|q| MockSplitQueue::create(&g.mem, ring_base(q), QSIZE)).collect();
        let vrings = mocks
            .iter()
            .map(|mock| {
                let v = VringRwLock::new(atomic.clone(), QSIZE).unwrap();
                v.set_queue_size(QSIZE);
                v.set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, mock.used_addr().0).unwrap();
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        Rings { g, mocks, backend, vrings, events }
    }

    fn mock(&self, q: u16) -> &MockSplitQueue<'static, GuestMemoryMmap> {
        &self.mocks[usize::from(q)]
    }

    /// Makes one single-descriptor chain available at table slot `slot` of queue `q`.
    fn offer(&self, q: u16, slot: u16, addr: u64, len: u32, flags: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
        self.mock(q).add_desc_chains(&[d], slot).unwrap();
    }

    fn kick(&self, q: u16) {
        // As vhost-user-backend calls it: per worker thread, event 0, that thread's vrings.
        let q = usize::from(q);
        self.backend.handle_event(0, EventSet::IN, &self.vrings[q..=q], q).unwrap();
    }

    fn used_idx(&self, q: u16) -> u16 {
        self.mock(q).used().idx().load()
    }

    /// The `i`th used element of queue q: (descriptor id, len).
    fn used_elem(&self, q: u16, i: u16) -> (u32, u32) {
        let e = self.mock(q).used().ring().ref_at(usize::from(i)).unwrap().load();
        (e.id(), e.len())
    }
}

#[test]
fn inflate_and_deflate_queues_complete_every_buffer() {
    let r = Rings::new();
    let len = r.g.pfn_list(LIST, &[pfn(A_PAGES), pfn(A_PAGES) + 1]);
    let bad = r.g.pfn_list(LIST2, &[0xdead_beef]);
    let before = r.g.allocated();
    r.offer(INFLATE, 0, LIST, len, R);
    r.offer(INFLATE, 1, LIST2, bad, R);
    r.offer(INFLATE, 2, LIST, len, W); // malformed: still completed
    r.kick(INFLATE);
    assert_eq!(r.used_idx(INFLATE), 3, "every buffer is completed, good or not");
    assert_eq!(r.used_elem(INFLATE, 0), (0, 0));
    assert_eq!(r.used_elem(INFLATE, 2), (2, 0));
    assert_eq!(before - r.g.allocated(), 2 * PAGE_SIZE);
    // Deflate afterwards: completed, nothing changes on the host.
    r.offer(DEFLATE, 0, LIST, len, R);
    r.kick(DEFLATE);
    assert_eq!(r.used_idx(DEFLATE), 1);
    let c = r.backend.device().counters.values();
    assert_eq!((c.freed, c.refused, c.chains_refused, c.deflated), (2, 1, 1, 2));
    // The queue keeps working after the hostile buffers.
    r.offer(INFLATE, 3, LIST, len, R);
    r.kick(INFLATE);
    assert_eq!(r.used_idx(INFLATE), 4);
}

#[test]
fn the_stats_buffer_is_held_then_returned_to_ask_for_fresh_numbers() {
    let r = Rings::new();
    let stats = encode(&[(S_MEMFREE, 100 << 20), (S_MEMTOT, 200 << 20)]);
    r.g.mem.write_slice(&stats, GuestAddress(LIST)).unwrap();
    r.offer(STATS, 0, LIST, stats.len() as u32, R);
    r.kick(STATS);
    // Parsed and held: nothing used yet.
    assert_eq!(r.used_idx(STATS), 0);
    assert!(r.backend.holds_stats_buffer());
    assert_eq!(r.backend.device().info().total_mem, Some(200 << 20));
    // Asking for fresh numbers returns it, once.
    assert!(r.backend.request_stats().unwrap());
    assert_eq!((r.used_idx(STATS), r.used_elem(STATS, 0)), (1, (0, 0)));
    assert!(!r.backend.request_stats().unwrap(), "nothing held any more");
    // The guest refills it; a second buffer while one is held sends the first back.
    r.offer(STATS, 1, LIST, stats.len() as u32, R);
    r.kick(STATS);
    r.offer(STATS, 2, LIST, stats.len() as u32, R);
    r.kick(STATS);
    assert_eq!((r.used_idx(STATS), r.used_elem(STATS, 1)), (2, (1, 0)));
    // GET_VRING_BASE while a buffer is held: the ring's next index steps back over it so it
    // is popped again after the ring restarts.
    let next = r.vrings[usize::from(STATS)].queue_next_avail();
    r.backend.stop_vring(u32::from(STATS)).unwrap();
    assert_eq!(r.vrings[usize::from(STATS)].queue_next_avail(), next - 1);
    assert!(!r.backend.holds_stats_buffer());
    r.kick(STATS);
    assert!(r.backend.holds_stats_buffer(), "the same buffer, popped again");
    assert_eq!(r.used_idx(STATS), 2);
    // A stopped ring gets nothing back.
    r.vrings[usize::from(STATS)].set_queue_ready(false);
    assert!(!r.backend.request_stats().unwrap());
}

/// A balloond killed while it holds the stats buffer: with the inflight region the frontend
/// kept, a new backend (a new process: new rings, the region handed back) recovers the
/// buffer from the region, parses it again and holds it, and returns it when it wants fresh
/// numbers. (Without a region, only a frontend that restarts the ring at its used index gets
/// it back, by the available ring being read again.)
#[test]
fn a_restarted_backend_gets_the_held_stats_buffer_back_from_the_inflight_region() {
    use vhost::vhost_user::message::VhostUserInflight;
    let r = Rings::new();
    let (msg, file) = r.backend.get_inflight_fd(&VhostUserInflight::new(0, 0, 3, QSIZE)).unwrap();
    r.backend.set_inflight_fd(&msg, file.try_clone().unwrap()).unwrap();
    for (q, v) in r.vrings.iter().enumerate() {
        r.backend.start_vring(q as u32, v).unwrap();
    }
    let stats = encode(&[(S_MEMFREE, 100 << 20), (S_MEMTOT, 300 << 20)]);
    r.g.mem.write_slice(&stats, GuestAddress(LIST)).unwrap();
    r.offer(STATS, 5, LIST, stats.len() as u32, R);
    r.kick(STATS);
    assert!(r.backend.holds_stats_buffer());
    assert_eq!(r.used_idx(STATS), 0);
    // Killed: nothing more from this backend.
    let Rings { g, mocks, backend, vrings, events: _ } = r;
    drop((backend, vrings));
    let dev = device();
    let b = BalloonBackend::new(dev.clone()).unwrap();
    b.update_memory(GuestMemoryAtomic::new(g.mem.clone())).unwrap();
    b.set_inflight_fd(&msg, file).unwrap();
    let mock = &mocks[usize::from(STATS)];
    let v = VringRwLock::new(GuestMemoryAtomic::new(g.mem.clone()), QSIZE).unwrap();
    v.set_queue_size(QSIZE);
    v.set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, mock.used_addr().0).unwrap();
    // The frontend's base: the used index (it never learnt the buffer was taken).
    v.set_queue_next_avail(0);
    v.set_queue_next_used(0);
    b.start_vring(u32::from(STATS), &v).unwrap();
    v.set_queue_ready(true);
    v.set_enabled(true);
    assert_eq!(v.queue_next_avail(), 1, "recovery: used 0 + 1 in flight");
    b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), usize::from(STATS)).unwrap();
    assert!(b.holds_stats_buffer(), "the buffer, resubmitted from the region");
    assert_eq!(dev.info().total_mem, Some(300 << 20), "and parsed again by the new backend");
    assert!(b.request_stats().unwrap());
    let e = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!((mock.used().idx().load(), e.id(), e.len()), (1, 5, 0));
}

#[test]
fn stats_poller_returns_the_buffer_periodically() {
    let r = Rings::new();
    let stats = encode(&[(S_MEMFREE, 1)]);
    r.g.mem.write_slice(&stats, GuestAddress(LIST)).unwrap();
    r.offer(STATS, 0, LIST, stats.len() as u32, R);
    r.kick(STATS);
    let poller = r.backend.spawn_stats_poller(std::time::Duration::from_millis(20)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while r.used_idx(STATS) == 0 {
        assert!(std::time::Instant::now() < deadline, "the poller never returned the buffer");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(poller);
    assert_eq!(r.used_idx(STATS), 1);
}

#[test]
fn config_space_and_balloon_change_events() {
    let r = Rings::new();
    let dev = r.backend.device().clone();
    assert_eq!(r.backend.get_config(0, 8), vec![0; 8]);
    // 12 MiB guest, target 8 MiB -> 1024 pages.
    assert_eq!(dev.set_target((8 * MIB) as i64), Ok(1024));
    assert_eq!(r.backend.get_config(0, 4), 1024u32.to_le_bytes().to_vec());
    // The driver reports 1000 pages: BALLOON_CHANGE with actual = RAM - balloon.
    r.backend.set_config(4, &1000u32.to_le_bytes()).unwrap();
    // The same value again: no event.
    r.backend.set_config(4, &1000u32.to_le_bytes()).unwrap();
    // A write over num_pages does not change it.
    r.backend.set_config(0, &[0xff; 4]).unwrap();
    assert_eq!(r.backend.get_config(0, 8)[..4], 1024u32.to_le_bytes());
    r.backend.set_config(4, &0u32.to_le_bytes()).unwrap();
    let events = r.events.lock().unwrap();
    let got: Vec<(&str, serde_json::Value)> = events.iter().map(|(n, d, _)| (*n, d.clone())).collect();
    assert_eq!(
        got,
        vec![
            ("BALLOON_CHANGE", serde_json::json!({ "actual": B_END - 1000 * PAGE_SIZE })),
            ("BALLOON_CHANGE", serde_json::json!({ "actual": B_END })),
        ]
    );
    assert_eq!(dev.info().actual, B_END as i64);
}

#[test]
fn features_and_protocol_features() {
    use vhost::vhost_user::message::{VhostUserProtocolFeatures as P, VhostUserVirtioFeatures};
    let r = Rings::new();
    let f = r.backend.features();
    for bit in [0, 1, 2, 32] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & !(FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()), 0);
    assert_eq!(r.backend.protocol_features(), P::CONFIG | P::BACKEND_REQ | P::REPLY_ACK | P::MQ | P::INFLIGHT_SHMFD);
    assert_eq!(r.backend.num_queues(), 3);
}
