//! The frontend against the mock backend ([`super::mock`]): what it sends, in which order, at a
//! start, a stop, a reset and a reconnect, and what it does to the device's signals.

use super::mock::{MockBackend, MockConfig, Msg};
use super::session::ring_hva;
use super::{FrontendSpec, VhostUserModel};
use crate::devices::bus::lock;
use crate::memory::GuestRam;
use crate::virtio_pci::{DeviceSignals, QueueConfig, VirtioDeviceModel};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const NQ: u16 = 2;
const MAX: u16 = 256;
const WAIT: Duration = Duration::from_secs(5);

struct Rig {
    dir: PathBuf,
    sock: PathBuf,
    ram: GuestRam,
    signals: Arc<DeviceSignals>,
    kicks: Vec<EventFd>,
    model: Option<VhostUserModel>,
    tag: String,
}

fn rig(tag: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("vmm-core-vu-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let sock = dir.join("be.sock");
    let ram = GuestRam::new(32 << 20).expect("ram");
    let vectors = (0..=NQ).map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")).collect();
    let signals = Arc::new(DeviceSignals::new(vectors));
    signals.config_vector.store(NQ, Ordering::SeqCst);
    let kicks: Vec<EventFd> = (0..NQ).map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")).collect();
    Rig { dir, sock, ram, signals, kicks, model: None, tag: tag.to_string() }
}

/// Queue `i`: 64 entries at 1 MiB + i * 64 KiB, vector i.
fn queue(i: u16) -> QueueConfig {
    let base = (1 << 20) + u64::from(i) * 0x10000;
    QueueConfig { index: i, size: 64, desc: base, avail: base + 0x1000, used: base + 0x2000, vector: i }
}

impl Rig {
    fn spawn(&mut self) {
        let spec = FrontendSpec {
            id: self.tag.clone(),
            socket: self.sock.clone(),
            num_queues: NQ,
            queue_size: MAX,
            config_len: 8,
        };
        let kicks = self.kicks.iter().map(|k| k.try_clone().expect("dup")).collect();
        self.model = Some(VhostUserModel::spawn(spec, self.ram.mem.clone(), self.signals.clone(), kicks).expect("spawn"));
    }
    fn model(&mut self) -> &mut VhostUserModel {
        self.model.as_mut().expect("spawned")
    }
    /// FEATURES_OK and DRIVER_OK with both queues.
    fn go_live(&mut self) {
        self.model().features_ok(super::mock::VERSION_1 | super::mock::EVENT_IDX);
        self.model().start(vec![queue(0), queue(1)]);
    }
    /// A device reset as the transport makes it, waited for.
    fn reset(&mut self, seq: u64) {
        self.signals.resets_requested.store(seq, Ordering::SeqCst);
        self.model().reset(seq);
        assert!(self.signals.wait_reset(WAIT), "reset {seq} did not complete");
    }
    fn set_used_idx(&self, q: u16, idx: u16) {
        self.ram.mem.write_obj(idx, GuestAddress(queue(q).used + 2)).expect("used idx");
    }
    /// Reads (and clears) each eventfd; true for those that were signalled.
    fn fired(fds: &[EventFd]) -> Vec<bool> {
        fds.iter().map(|f| f.read().is_ok()).collect()
    }
    fn clear_signals(&self) {
        Self::fired(&self.kicks);
        Self::fired(&self.signals.vectors);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.model.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rings_started(m: &[Msg], n: usize) -> bool {
    m.iter().filter(|m| matches!(m, Msg::Enable(_, true))).count() >= n
}

fn position(m: &[Msg], pred: impl Fn(&Msg) -> bool) -> usize {
    m.iter().position(pred).unwrap_or(usize::MAX)
}

fn bases(m: &[Msg]) -> Vec<(u32, u32)> {
    m.iter().filter_map(|m| if let Msg::Base(q, b) = m { Some((*q, *b)) } else { None }).collect()
}

#[test]
fn inflight_region_is_fetched_once_and_handed_to_every_backend_before_its_rings() {
    let mut r = rig("inflight");
    let be = MockBackend::start(&r.sock, MockConfig { inflight: true, ..Default::default() });
    r.spawn();
    r.go_live();
    let m = be.wait_for("rings", |m| rings_started(m, 2));
    assert_eq!(m.iter().filter(|m| matches!(m, Msg::GetInflight(..))).count(), 1);
    assert!(m.contains(&Msg::GetInflight(NQ, MAX)), "asked for every queue at the maximum size: {m:?}");
    let set = position(&m, |m| matches!(m, Msg::SetInflight(..)));
    assert!(set < position(&m, |m| matches!(m, Msg::Num(..))), "SET_INFLIGHT_FD before the rings: {m:?}");
    let first = lock(&be.state).inflight_inodes.clone();
    assert_eq!(first.len(), 1);
    assert!(matches!(m[set], Msg::SetInflight(NQ, MAX, size, ino) if size > 0 && ino == first[0]));
    be.kill();

    // A new backend: no GET, the same region handed back before any ring message.
    let be = MockBackend::start(&r.sock, MockConfig { inflight: true, ..Default::default() });
    let m = be.wait_for("rings after reconnect", |m| rings_started(m, 2));
    assert!(!m.iter().any(|m| matches!(m, Msg::GetInflight(..))), "{m:?}");
    let set = position(&m, |m| matches!(m, Msg::SetInflight(_, _, _, ino) if *ino == first[0]));
    assert!(set < position(&m, |m| matches!(m, Msg::Num(..))), "the kept region, before the rings: {m:?}");

    // A driver stop and start on the same connection: SET again, no GET.
    r.model().stop();
    r.model().start(vec![queue(0), queue(1)]);
    let m = be.wait_for("restart", |m| rings_started(m, 4));
    assert_eq!(m.iter().filter(|m| matches!(m, Msg::SetInflight(..))).count(), 2);
    assert!(!m.iter().any(|m| matches!(m, Msg::GetInflight(..))));

    // A reset discards it: the next start gets a fresh one.
    r.reset(1);
    r.go_live();
    let m = be.wait_for("start after reset", |m| rings_started(m, 6));
    assert_eq!(m.iter().filter(|m| matches!(m, Msg::GetInflight(..))).count(), 1, "{m:?}");
    let inodes = lock(&be.state).inflight_inodes.clone();
    assert_eq!(inodes.len(), 1);
    assert_ne!(inodes[0], first[0], "a new region after the reset");
}

#[test]
fn a_backend_without_inflight_is_never_asked_for_it() {
    let mut r = rig("noinflight");
    let be = MockBackend::start(&r.sock, MockConfig::default());
    r.spawn();
    r.go_live();
    let m = be.wait_for("rings", |m| rings_started(m, 2));
    assert!(!m.iter().any(|m| matches!(m, Msg::GetInflight(..) | Msg::SetInflight(..))), "{m:?}");
    let proto = m.iter().find_map(|m| if let Msg::SetProtocol(p) = m { Some(*p) } else { None });
    let inflight = vhost::vhost_user::VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
    assert_eq!(proto.map(|p| p & inflight), Some(0));
}

#[test]
fn every_start_and_restart_kicks_each_queue_and_signals_each_vector() {
    let mut r = rig("rekick");
    let be = MockBackend::start(&r.sock, MockConfig::default());
    r.spawn();
    r.clear_signals();
    r.go_live();
    be.wait_for("rings", |m| rings_started(m, 2));
    // The worker kicks after the last ring message; give it a moment past the mock's log.
    let deadline = Instant::now() + WAIT;
    let mut kicks = vec![false; NQ as usize];
    while kicks.iter().any(|k| !k) && Instant::now() < deadline {
        for (k, f) in kicks.iter_mut().zip(Rig::fired(&r.kicks)) {
            *k |= f;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(kicks, vec![true, true], "each started queue kicked");
    assert_eq!(Rig::fired(&r.signals.vectors)[..2], [true, true], "each queue's vector signalled");
    be.kill();
    r.clear_signals();

    let be = MockBackend::start(&r.sock, MockConfig::default());
    be.wait_for("rings after reconnect", |m| rings_started(m, 2));
    let deadline = Instant::now() + WAIT;
    let mut kicks = vec![false; NQ as usize];
    while kicks.iter().any(|k| !k) && Instant::now() < deadline {
        for (k, f) in kicks.iter_mut().zip(Rig::fired(&r.kicks)) {
            *k |= f;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(kicks, vec![true, true], "kicked again for the new backend");
    assert_eq!(Rig::fired(&r.signals.vectors)[..2], [true, true], "and the driver woken");
}

#[test]
fn ring_bases_survive_a_driver_stop_follow_the_used_ring_after_a_crash_and_restart_at_0_after_a_reset() {
    let mut r = rig("bases");
    let get_base = [(0, 42), (1, 17)].into_iter().collect();
    let be = MockBackend::start(&r.sock, MockConfig { get_base, ..Default::default() });
    r.spawn();
    r.set_used_idx(0, 7);
    r.set_used_idx(1, 9);
    r.go_live();
    let m = be.wait_for("rings", |m| rings_started(m, 2));
    assert_eq!(bases(&m), vec![(0, 0), (1, 0)], "a fresh start is at 0");

    // Stop and start without a reset: where the backend said it stopped.
    r.model().stop();
    r.model().start(vec![queue(0), queue(1)]);
    let m = be.wait_for("restart", |m| rings_started(m, 4));
    assert_eq!(bases(&m)[2..], [(0, 42), (1, 17)], "{m:?}");
    be.kill();

    // The backend dies: the next one starts at the used ring's idx.
    let be = MockBackend::start(&r.sock, MockConfig::default());
    let m = be.wait_for("rings after reconnect", |m| rings_started(m, 2));
    assert_eq!(bases(&m), vec![(0, 7), (1, 9)]);

    // A stop while the backend is gone: no reply to keep, so the used idx again.
    be.kill();
    r.model().stop();
    r.set_used_idx(0, 8);
    r.model().start(vec![queue(0), queue(1)]);
    let be = MockBackend::start(&r.sock, MockConfig::default());
    let m = be.wait_for("rings after reconnect", |m| rings_started(m, 2));
    assert_eq!(bases(&m), vec![(0, 8), (1, 9)]);

    // After a reset, 0.
    r.reset(1);
    r.go_live();
    let m = be.wait_for("start after reset", |m| rings_started(m, 4));
    assert_eq!(bases(&m)[2..], [(0, 0), (1, 0)], "{m:?}");
}

#[test]
fn a_reset_completes_only_after_the_backend_stopped_the_rings_and_reset_the_device() {
    let mut r = rig("resetwait");
    let cfg = MockConfig { stop_delay: Duration::from_millis(150), ..Default::default() };
    let be = MockBackend::start(&r.sock, cfg);
    r.spawn();
    r.go_live();
    be.wait_for("rings", |m| rings_started(m, 2));
    r.signals.resets_requested.store(1, Ordering::SeqCst);
    let t = Instant::now();
    r.model().reset(1);
    assert!(r.signals.reset_pending(), "posting never waits on the backend");
    assert!(r.signals.wait_reset(WAIT));
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(300), "two rings at 150 ms each, waited {waited:?}");
    let m = be.msgs();
    let n = m.len();
    assert!(matches!(m[n - 3..], [Msg::GetBase(0), Msg::GetBase(1), Msg::ResetDevice]), "{m:?}");
}

#[test]
fn a_reset_wait_is_bounded_when_the_backend_hangs() {
    let mut r = rig("resethang");
    let cfg = MockConfig { stop_delay: Duration::from_secs(2), ..Default::default() };
    let be = MockBackend::start(&r.sock, cfg);
    r.spawn();
    r.go_live();
    be.wait_for("rings", |m| rings_started(m, 2));
    r.signals.resets_requested.store(1, Ordering::SeqCst);
    r.model().reset(1);
    let t = Instant::now();
    assert!(!r.signals.wait_reset(Duration::from_millis(200)), "still stopping");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(1), "{waited:?}");
    be.kill();
    assert!(r.signals.wait_reset(WAIT), "done once the backend is gone");
}

#[test]
fn ring_extents_must_lie_inside_one_ram_region() {
    let ram = GuestRam::new(32 << 20).expect("ram");
    let end = 32u64 << 20;
    let ok = QueueConfig { index: 0, size: 256, desc: 0, avail: 0x1000, used: 0x2000, vector: 0 };
    assert!(ring_hva(&ok, &ram.mem).is_ok());
    // Each part ending exactly at the end of RAM is fine; one byte more is not.
    let fits = QueueConfig { desc: end - 16 * 256, avail: end - (6 + 2 * 256), used: end - (6 + 8 * 256), ..ok };
    assert!(ring_hva(&fits, &ram.mem).is_ok());
    for bad in [
        QueueConfig { desc: end - 16 * 256 + 1, ..ok },
        QueueConfig { avail: end - (6 + 2 * 256) + 1, ..ok },
        QueueConfig { used: end - (6 + 8 * 256) + 1, ..ok },
        QueueConfig { used: end, ..ok },
        QueueConfig { desc: u64::MAX - 8, ..ok },
    ] {
        assert!(ring_hva(&bad, &ram.mem).is_err(), "{bad:?}");
    }
}

#[test]
fn a_ring_running_past_guest_ram_sets_needs_reset_and_starts_nothing() {
    let mut r = rig("extent");
    let be = MockBackend::start(&r.sock, MockConfig::default());
    r.spawn();
    r.clear_signals();
    r.model().features_ok(super::mock::VERSION_1);
    let end = 32u64 << 20;
    // The start of the used ring is in RAM, its end is not.
    let bad = QueueConfig { used: end - 16, ..queue(1) };
    r.model().start(vec![queue(0), bad]);
    let deadline = Instant::now() + WAIT;
    while !r.signals.needs_reset.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(r.signals.needs_reset.load(Ordering::SeqCst));
    assert!(Rig::fired(&r.signals.vectors)[NQ as usize], "config interrupt");
    std::thread::sleep(Duration::from_millis(50));
    let m = be.msgs();
    assert!(!m.iter().any(|m| matches!(m, Msg::Num(..) | Msg::Base(..) | Msg::Enable(..))), "{m:?}");
}

#[test]
fn a_ring_error_from_the_backend_sets_needs_reset_with_a_config_interrupt() {
    let mut r = rig("vringerr");
    let be = MockBackend::start(&r.sock, MockConfig::default());
    r.spawn();
    r.go_live();
    let m = be.wait_for("rings", |m| rings_started(m, 2));
    assert!(m.contains(&Msg::Err(0)) && m.contains(&Msg::Err(1)), "each ring has an error fd: {m:?}");
    assert!(position(&m, |m| *m == Msg::Err(1)) < position(&m, |m| *m == Msg::Enable(1, true)));
    std::thread::sleep(Duration::from_millis(20));
    r.clear_signals();
    assert!(!r.signals.needs_reset.load(Ordering::SeqCst));
    let err = lock(&be.state).err_fds.remove(&1).expect("queue 1's error fd");
    // SAFETY: writing 8 bytes from a live u64 to an eventfd the mock owns.
    let n = unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&err), (&1u64 as *const u64).cast(), 8) };
    assert_eq!(n, 8);
    let deadline = Instant::now() + WAIT;
    while !r.signals.needs_reset.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(r.signals.needs_reset.load(Ordering::SeqCst));
    assert!(Rig::fired(&r.signals.vectors)[NQ as usize], "config interrupt");
    assert_eq!(r.signals.isr.load(Ordering::SeqCst) & 2, 2);
}

#[test]
fn a_restarted_backend_is_picked_up_within_20_ms_of_listening() {
    let mut r = rig("fast");
    let mut be = Some(MockBackend::start(&r.sock, MockConfig::default()));
    r.spawn();
    r.go_live();
    let mut took = Vec::new();
    for _ in 0..5 {
        let old = be.take().expect("a backend");
        old.wait_for("rings", |m| rings_started(m, 2));
        old.kill();
        // The launcher restarts a dead backend about 100 ms later.
        std::thread::sleep(Duration::from_millis(100));
        let new = MockBackend::start(&r.sock, MockConfig::default());
        new.wait_for("rings", |m| rings_started(m, 2));
        let at = new.time_of(|m| matches!(m, Msg::Enable(1, true))).expect("enable");
        took.push(at.duration_since(new.listening_at));
        be = Some(new);
    }
    eprintln!("listening -> both rings started on the new backend: {took:?}");
    // The median says what the design gives; the worst allows for a loaded test machine.
    let mut sorted = took.clone();
    sorted.sort();
    assert!(sorted[2] < Duration::from_millis(20), "{took:?}");
    assert!(sorted[4] < Duration::from_millis(100), "{took:?}");
    drop(be);
    // No backend for a while: the worker sleeps (a busy retry loop would burn a core).
    let before = thread_cpu_ticks("vhost-user-fast");
    std::thread::sleep(Duration::from_millis(1000));
    let used = thread_cpu_ticks("vhost-user-fast") - before;
    assert!(used <= 2, "the worker used {used} clock ticks in 1 s without a backend");
}

/// utime + stime, in clock ticks, of this process's thread named `name`.
fn thread_cpu_ticks(name: &str) -> u64 {
    for t in std::fs::read_dir("/proc/self/task").expect("tasks").flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(t.path().join("stat")).expect("stat");
            // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')').expect("comm end") + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            return f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
        }
    }
    panic!("no thread named {name}");
}

#[test]
fn a_flood_of_config_writes_while_the_backend_is_slow_stays_bounded() {
    let mut r = rig("flood");
    let cfg = MockConfig { stop_delay: Duration::from_millis(300), ..Default::default() };
    let be = MockBackend::start(&r.sock, cfg);
    r.spawn();
    r.go_live();
    be.wait_for("rings", |m| rings_started(m, 2));
    // The worker is busy stopping the rings for 600 ms; the guest hammers two fields.
    r.model().stop();
    for i in 0..200_000u32 {
        r.model().write_config(0, &i.to_le_bytes());
        r.model().write_config(4, &[i as u8]);
    }
    let m = be.wait_for("the last values", |m| {
        m.contains(&Msg::SetConfig(0, 199_999u32.to_le_bytes().to_vec())) && m.contains(&Msg::SetConfig(4, vec![199_999u32 as u8]))
    });
    let writes = m.iter().filter(|m| matches!(m, Msg::SetConfig(..))).count();
    assert!(writes < 1000, "{writes} config writes reached the backend");
    assert!(!r.signals.needs_reset.load(Ordering::SeqCst));
}
