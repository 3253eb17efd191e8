//! The vhost-user side of one connection: features, the virtio-net config space, and the
//! workers. Queues: receive `2i`, transmit `2i + 1` for pair `i`, the control queue last
//! (`2N`). One worker thread per pair (its two rings and its host port, which joins the
//! worker's epoll edge-triggered: readable means "read until EAGAIN") and one for the control
//! queue, as blockd has one per queue. Chains are taken and completed through the kit's
//! tracked rings (inflight region, requests in flight, an impossible available index).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_backend_kit::queue::TrackedRings;
use vhost_backend_kit::serve::{ExitEventError, ExitEvents};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::chain;
use crate::ctrl::{self, Effect};
use crate::features::{self, has};
use crate::nic::{add, lock, Nic};
use crate::rx::{Rx, RxState};
use crate::tx::Tx;

/// Queue size offered to the frontend (it may pick a smaller one).
pub const MAX_QUEUE_SIZE: usize = 256;
/// The most a control command may carry (a MAC table of ~10000 entries).
const MAX_CTRL: usize = 64 << 10;
/// How long GET_VRING_BASE waits for a ring's chains.
const STOP_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    ExitEvent(#[from] ExitEventError),
    #[error("adding host port {pair}'s descriptor to its worker's epoll: {source}")]
    Attach {
        pair: usize,
        #[source]
        source: io::Error,
    },
}

/// One connection's backend; cloned into every worker thread.
#[derive(Clone)]
pub struct NetBackend {
    inner: Arc<Inner>,
}

struct Pair {
    rx: RxState,
    tx_buf: Vec<u8>,
}

struct Inner {
    nic: Arc<Nic>,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    exit: ExitEvents,
    rings: TrackedRings,
    acked: AtomicU64,
    event_idx: AtomicBool,
    /// Pairs the driver uses (VQ_PAIRS_SET); 1 until it says otherwise.
    active_pairs: AtomicU16,
    pairs: Vec<Mutex<Pair>>,
    /// The control ring started: the driver's VQ_PAIRS_SET reaches us.
    ctrl_started: AtomicBool,
    /// Each ring as its start handed it, for stop_vring.
    vrings: Mutex<Vec<Option<VringRwLock>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.rings.close();
    }
}

impl NetBackend {
    pub fn new(nic: Arc<Nic>) -> Result<NetBackend, BackendError> {
        let n = usize::from(nic.queue_pairs);
        Ok(NetBackend {
            inner: Arc::new(Inner {
                exit: ExitEvents::new(n + 1)?,
                rings: TrackedRings::new(2 * n + 1),
                mem: Mutex::new(None),
                acked: AtomicU64::new(0),
                event_idx: AtomicBool::new(false),
                active_pairs: AtomicU16::new(1),
                pairs: (0..n).map(|_| Mutex::new(Pair { rx: RxState::default(), tx_buf: Vec::new() })).collect(),
                vrings: Mutex::new(vec![None; 2 * n + 1]),
                ctrl_started: AtomicBool::new(false),
                nic,
            }),
        })
    }

    pub fn nic(&self) -> &Arc<Nic> {
        &self.inner.nic
    }

    fn pairs(&self) -> usize {
        self.inner.pairs.len()
    }

    fn ctrl_queue(&self) -> usize {
        2 * self.pairs()
    }

    /// The event id of a pair's host port in its worker's epoll (the library's ids go up
    /// to `num_queues`: the rings, then the exit event).
    fn port_event(&self) -> u16 {
        u16::try_from(self.ctrl_queue() + 2).unwrap_or(u16::MAX)
    }

    /// Adds each pair's host port to its worker's epoll (edge-triggered). Once, before the
    /// daemon serves.
    pub fn attach(&self, handlers: &[Arc<VringEpollHandler<NetBackend>>]) -> Result<(), BackendError> {
        for (pair, port) in self.inner.nic.ports.iter().enumerate() {
            let Some(h) = handlers.get(pair) else { continue };
            h.register_listener(port.raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED, u64::from(self.port_event()))
                .map_err(|source| BackendError::Attach { pair, source })?;
        }
        Ok(())
    }

    fn features(&self) -> u64 {
        self.inner.acked.load(Ordering::Acquire)
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        lock(&self.inner.mem).clone()
    }

    fn rx_pass(&self, pair: usize, vring: &VringRwLock) -> io::Result<()> {
        // Pairs the driver does not use keep their frames with the host (a multiqueue tap
        // steers none to a detached queue). Which pairs: VQ_PAIRS_SET when the control queue
        // is ours; when the frontend keeps it (QEMU's virtio-net), the rings it enabled.
        let ctrl_is_ours = self.inner.ctrl_started.load(Ordering::Acquire);
        if ctrl_is_ours && pair >= usize::from(self.inner.active_pairs.load(Ordering::Acquire)) {
            return Ok(());
        }
        if !vring.get_ref().is_enabled() {
            return Ok(());
        }
        let (Some(mem), Some(q), Some(port)) =
            (self.memory(), self.inner.rings.queue(2 * pair), self.inner.nic.ports.get(pair))
        else {
            return Ok(());
        };
        if !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        let f = self.features();
        let rx = Rx {
            nic: &self.inner.nic,
            port,
            queue: q,
            vring,
            mem: mem.memory(),
            hdr_len: features::header_len(f),
            mergeable: has(f, VIRTIO_NET_F_MRG_RXBUF),
            event_idx: self.inner.event_idx.load(Ordering::Acquire),
        };
        let mut p = lock(&self.inner.pairs[pair]);
        rx.pass(&mut p.rx)
    }

    fn tx_pass(&self, pair: usize, vring: &VringRwLock) -> io::Result<()> {
        let (Some(mem), Some(q), Some(port)) =
            (self.memory(), self.inner.rings.queue(2 * pair + 1), self.inner.nic.ports.get(pair))
        else {
            return Ok(());
        };
        let f = self.features();
        let tx = Tx {
            nic: &self.inner.nic,
            port,
            queue: q,
            vring,
            mem: mem.memory(),
            features: f,
            hdr_len: features::header_len(f),
            event_idx: self.inner.event_idx.load(Ordering::Acquire),
        };
        let mut p = lock(&self.inner.pairs[pair]);
        tx.pass(&mut p.tx_buf)
    }

    fn ctrl_pass(&self, vring: &VringRwLock) -> io::Result<()> {
        let (Some(mem), Some(q)) = (self.memory(), self.inner.rings.queue(self.ctrl_queue())) else { return Ok(()) };
        let mem = mem.memory();
        let features = self.features();
        let mut buf = Vec::new();
        let mut used = false;
        q.drain(
            vring,
            mem.clone(),
            |taken| {
                let len = match chain::split_request(&taken.chain, &mut buf, MAX_CTRL) {
                    Ok(segs) if !segs.is_empty() => {
                        let (ack, effect) = ctrl::handle(&buf, features, self.inner.nic.queue_pairs);
                        tracing::debug!(class = buf.first(), cmd = buf.get(1), ack, "control command");
                        if let Effect::SetPairs(n) = effect {
                            self.set_active_pairs(n);
                        }
                        u32::try_from(chain::write_at(&*mem, &segs, 0, &[ack])).unwrap_or(0)
                    }
                    Ok(_) => {
                        add(&self.inner.nic.counters.bad_chains, 1);
                        tracing::debug!("control command without room for its ack");
                        0
                    }
                    Err(e) => {
                        add(&self.inner.nic.counters.bad_chains, 1);
                        tracing::debug!("control command refused: {e}");
                        0
                    }
                };
                used |= q.add_used(vring, taken.ticket, len);
            },
            || {},
        )?;
        let event_idx = self.inner.event_idx.load(Ordering::Acquire);
        if used && (!event_idx || vring.needs_notification().unwrap_or(true)) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// VQ_PAIRS_SET: the pairs the driver uses from now on; a multiqueue tap steers frames to
    /// the attached queues only.
    fn set_active_pairs(&self, n: u16) {
        let old = self.inner.active_pairs.swap(n, Ordering::AcqRel);
        tracing::info!(nic = %self.inner.nic.id, pairs = n, was = old, "queue pairs in use");
        if self.inner.nic.ports.len() > 1 {
            for (i, port) in self.inner.nic.ports.iter().enumerate() {
                if let Some(t) = port.tap() {
                    if let Err(e) = t.set_queue_attached(i < usize::from(n)) {
                        tracing::debug!(queue = i, "TUNSETQUEUE: {e}");
                    }
                }
            }
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.pairs() + 1
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        features::offered(self.inner.nic.caps, self.inner.nic.queue_pairs) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, f: u64) {
        self.inner.acked.store(f, Ordering::Release);
        let hdr_len = features::header_len(f);
        let offloads = features::tun_offloads(f);
        tracing::info!(
            nic = %self.inner.nic.id,
            features = format_args!("{f:#x}"),
            hdr_len,
            tun_offloads = format_args!("{offloads:#x}"),
            "frontend acked features"
        );
        for port in &self.inner.nic.ports {
            if let Some(t) = port.tap().filter(|t| t.vnet_hdr) {
                if let Err(e) = t.set_vnet_hdr_len(hdr_len) {
                    tracing::error!(nic = %self.inner.nic.id, "TUNSETVNETHDRSZ {hdr_len}: {e}");
                }
                if let Err(e) = t.set_offload(offloads) {
                    tracing::error!(nic = %self.inner.nic.id, "TUNSETOFFLOAD {offloads:#x}: {e}");
                }
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_inflight_fd(&self, inflight: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        Ok(self.inner.rings.get_inflight_fd(inflight)?)
    }

    fn set_inflight_fd(&self, inflight: &VhostUserInflight, file: File) -> io::Result<()> {
        Ok(self.inner.rings.set_inflight_fd(inflight, file)?)
    }

    fn start_vring(&self, queue_index: u32, vring: &VringRwLock) -> io::Result<()> {
        let i = queue_index as usize;
        if i < self.ctrl_queue() && i.is_multiple_of(2) {
            lock(&self.inner.pairs[i / 2]).rx.ring_started();
        }
        if i == self.ctrl_queue() {
            self.inner.ctrl_started.store(true, Ordering::Release);
        }
        if let Some(slot) = lock(&self.inner.vrings).get_mut(i) {
            *slot = Some(vring.clone());
        }
        Ok(self.inner.rings.start_vring(queue_index, vring)?)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let i = queue_index as usize;
        let Some(q) = self.inner.rings.queue(i) else { return Ok(()) };
        if i < self.ctrl_queue() && i.is_multiple_of(2) {
            // The worker is between passes once we hold its lock; its held buffers go back.
            let mut p = lock(&self.inner.pairs[i / 2]);
            let held = p.rx.held();
            if held > 0 {
                if let Some(v) = self.vring_of(i) {
                    p.rx.ring_stopped(&v);
                }
            }
            drop(p);
            // Those chains are no longer in flight as far as the kit knows once stepped back;
            // wait for none but them.
            if !q.wait_idle(STOP_WAIT, || held) {
                tracing::warn!(queue = i, in_flight = q.in_flight(), "receive ring stopped with chains in flight");
            }
            return Ok(());
        }
        if !q.wait_idle(STOP_WAIT, || 0) {
            tracing::warn!(queue = i, in_flight = q.in_flight(), "ring stopped with chains in flight");
        }
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.inner.nic.config_space();
        (offset..offset.saturating_add(size)).map(|i| c.get(i as usize).copied().unwrap_or(0)).collect()
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // virtio-net's config space is read-only for the driver (no legacy MAC writes).
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *lock(&self.inner.mem) = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        tracing::info!(nic = %self.inner.nic.id, "backend-request channel set: link changes go to the frontend");
        self.inner.nic.set_backend(Some(backend));
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let mut v: Vec<u64> = (0..self.pairs()).map(|i| 0b11u64 << (2 * i)).collect();
        v.push(1u64 << self.ctrl_queue());
        v
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.inner.exit.get(thread_index)
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[VringRwLock], thread: usize) -> io::Result<()> {
        if !evset.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        if thread == self.pairs() {
            // The control queue's worker: its one ring.
            return match vrings.first() {
                Some(v) => self.ctrl_pass(v),
                None => Ok(()),
            };
        }
        let pair = thread;
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Err(io::Error::other(format!("worker {thread} has no queue pair")));
        };
        match device_event {
            0 => self.rx_pass(pair, rx),
            1 => self.tx_pass(pair, tx),
            e if e == self.port_event() => self.rx_pass(pair, rx),
            e => Err(io::Error::other(format!("event {e} of worker {thread}: unknown"))),
        }
    }
}

impl NetBackend {
    /// The vring of queue `i`, as its last start handed it.
    fn vring_of(&self, i: usize) -> Option<VringRwLock> {
        lock(&self.inner.vrings).get(i).cloned().flatten()
    }
}
