//! The per-device thread that owns the vhost-user connection. It keeps the state the driver set
//! up ([`Desired`]) apart from the connection ([`Link`]), so whatever the backend does, the
//! device is in one of two well-defined states:
//!
//! - `Link::Down`: no backend. Driver requests only change `Desired`; kicks wait in the
//!   ioeventfds; a reconnect is tried when the socket appears (inotify) and otherwise with
//!   backoff (50 ms doubling to 1 s).
//! - `Link::Up`: connected, and the backend holds exactly `Desired` (features acked at
//!   FEATURES_OK, rings started at DRIVER_OK). Each driver request is applied to both.
//!
//! Any failed request, a hang-up on the socket or a broken backend-request channel drops the
//! link to `Down`; a new connection replays `Desired` from the start (handshake, SET_FEATURES,
//! the kept inflight region, vrings at their bases, see `Worker::base_for`). There is no
//! half-configured state: a replay that fails part-way drops the link again and the next
//! attempt starts over.

use super::mailbox::Mailbox;
use super::session::{ring_hva, used_idx, Inflight, RingStart, Session, SessionError};
use super::socket_watch::SocketWatch;
use super::FrontendSpec;
use crate::virtio_pci::{features, DeviceSignals, QueueConfig, NO_VECTOR};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Requests from the transport (vCPU threads), in order.
#[derive(Debug)]
pub enum Command {
    WriteConfig { offset: u32, data: Vec<u8> },
    FeaturesOk(u64),
    Start(Vec<QueueConfig>),
    Stop,
    Reset(u64),
    Exit,
}

/// What the driver has set up: replayed on every connection.
#[derive(Debug, Default, Clone)]
struct Desired {
    /// Driver features accepted at FEATURES_OK.
    features: Option<u64>,
    /// Rings started at DRIVER_OK (and not stopped since).
    queues: Option<Vec<QueueConfig>>,
    /// A backend was handed these rings since the device was reset: a start is no longer at 0.
    ran: bool,
    /// Each ring's next avail index as GET_VRING_BASE reported it at the last driver stop, for
    /// the next start (cleared once a backend has the rings again).
    saved_bases: BTreeMap<u16, u16>,
    /// Device-config bytes the driver wrote (by offset), sent again to a new backend (e.g. the
    /// balloon's `actual`, which a restarted balloond would not know).
    config_writes: BTreeMap<u32, Vec<u8>>,
}

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After the socket appears: retries this far apart, this many times (bind() creates the file a
/// moment before listen() accepts connections).
const APPEAR_RETRY: Duration = Duration::from_millis(2);
const APPEAR_TRIES: u8 = 25;

enum Link {
    Up(Box<Session>),
    Down {
        next_try: Instant,
        delay: Duration,
        since: Instant,
        attempts: u32,
        /// Quick retries left since the socket appeared.
        quick: u8,
    },
}

impl Link {
    fn down_now() -> Link {
        let now = Instant::now();
        Link::Down { next_try: now, delay: BACKOFF_START, since: now, attempts: 0, quick: 0 }
    }
}

pub struct Worker {
    spec: FrontendSpec,
    mem: GuestMemoryMmap,
    signals: Arc<DeviceSignals>,
    kicks: Vec<EventFd>,
    /// One SET_VRING_ERR eventfd per queue: the backend signals a ring it cannot go on with.
    errs: Vec<EventFd>,
    mailbox: Arc<Mailbox>,
    desired: Desired,
    link: Link,
    /// The inflight region (GET_INFLIGHT_FD, once per device until a reset), handed to every
    /// connection before its rings start.
    inflight: Option<Inflight>,
    watch: Option<SocketWatch>,
    /// A connection existed before (a later one is a reconnect).
    ever_connected: bool,
}

impl Worker {
    pub fn new(
        spec: FrontendSpec,
        mem: GuestMemoryMmap,
        signals: Arc<DeviceSignals>,
        kicks: Vec<EventFd>,
        errs: Vec<EventFd>,
        mailbox: Arc<Mailbox>,
    ) -> Self {
        let watch = match SocketWatch::new(&spec.socket) {
            Ok(w) => Some(w),
            Err(e) => {
                // Reconnects still happen, at the backoff's pace.
                tracing::warn!(id = %spec.id, error = %e, "cannot watch the backend socket's directory");
                None
            }
        };
        Worker {
            spec,
            mem,
            signals,
            kicks,
            errs,
            mailbox,
            desired: Desired::default(),
            link: Link::down_now(),
            inflight: None,
            watch,
            ever_connected: false,
        }
    }

    /// One connection attempt (used once, synchronously, before the thread starts, so a backend
    /// that is already listening is connected before the guest runs).
    pub fn try_connect(&mut self) -> bool {
        if matches!(self.link, Link::Up(_)) {
            return true;
        }
        match self.connect_and_replay() {
            Ok(session) => {
                let Link::Down { since, attempts, .. } = self.link else { return true };
                if self.ever_connected {
                    tracing::info!(
                        id = %self.spec.id,
                        after_ms = since.elapsed().as_millis() as u64,
                        attempts = attempts + 1,
                        "vhost-user backend reconnected; device state replayed"
                    );
                } else {
                    tracing::info!(id = %self.spec.id, socket = %self.spec.socket.display(), "vhost-user backend connected");
                }
                self.ever_connected = true;
                self.link = Link::Up(Box::new(session));
                true
            }
            Err(e) => {
                if let Link::Down { next_try, delay, attempts, quick, .. } = &mut self.link {
                    if *attempts == 0 {
                        // Once per outage at info; the retries at debug.
                        tracing::info!(id = %self.spec.id, error = %e, "vhost-user backend unavailable; retrying");
                    } else {
                        tracing::debug!(id = %self.spec.id, error = %e, attempt = *attempts + 1, "reconnect failed");
                    }
                    *attempts += 1;
                    if *quick > 0 {
                        *quick -= 1;
                        *next_try = Instant::now() + APPEAR_RETRY;
                    } else {
                        *next_try = Instant::now() + *delay;
                        *delay = (*delay * 2).min(BACKOFF_MAX);
                    }
                }
                false
            }
        }
    }

    /// A fresh connection brought to `Desired`.
    fn connect_and_replay(&mut self) -> Result<Session, SessionError> {
        let mut s = Session::connect(&self.spec.socket, self.spec.num_queues, &self.mem)?;
        let offer = features::guest_offer(s.backend_features);
        let previous = crate::devices::bus::lock(&self.signals.device_features).replace(offer);
        if previous.is_some_and(|p| p != offer) {
            tracing::warn!(id = %self.spec.id, old = ?previous, new = offer, "the backend's features changed");
        }
        if s.has(VhostUserProtocolFeatures::CONFIG) {
            match s.get_config(self.spec.config_len) {
                Ok(bytes) => {
                    let old = crate::devices::bus::lock(&self.signals.config).clone();
                    if !old.is_empty() && old != bytes {
                        // The configuration changed while no backend was there (e.g. a resize).
                        self.signals.config_changed(Some(bytes));
                    } else {
                        *crate::devices::bus::lock(&self.signals.config) = bytes;
                    }
                }
                Err(e) => tracing::warn!(id = %self.spec.id, error = %e, "GET_CONFIG; keeping the cached config"),
            }
            for (offset, data) in &self.desired.config_writes {
                s.set_config(*offset, data)?;
                let mut cfg = crate::devices::bus::lock(&self.signals.config);
                if let Some(b) = cfg.get_mut(*offset as usize..*offset as usize + data.len()) {
                    b.copy_from_slice(data);
                }
            }
        }
        if let Some(f) = self.desired.features {
            if f & !offer != 0 {
                // The new backend cannot do what the driver negotiated: the driver must reset.
                tracing::warn!(id = %self.spec.id, acked = f, offer, "backend lost negotiated features: DEVICE_NEEDS_RESET");
                self.needs_reset();
                return Ok(s);
            }
            s.set_features(f)?;
        }
        self.start_rings(&mut s)?;
        Ok(s)
    }

    /// DEVICE_NEEDS_RESET, announced with a config interrupt (virtio 1.2 2.1.2).
    fn needs_reset(&self) {
        self.signals.needs_reset.store(true, Ordering::SeqCst);
        self.signals.config_changed(None);
    }

    /// Where queue `q` starts: the base saved at the last driver stop; else 0 for rings no
    /// backend had since the reset; else (the backend that had them is gone) the used ring's
    /// idx. A backend with inflight tracking recomputes it from its region anyway.
    fn base_for(&self, q: &QueueConfig) -> Result<u16, SessionError> {
        if let Some(b) = self.desired.saved_bases.get(&q.index) {
            return Ok(*b);
        }
        if !self.desired.ran {
            return Ok(0);
        }
        used_idx(q, &self.mem)
    }

    /// Hands the desired rings (if any) to the backend of `s`: the inflight region first, then
    /// each ring at its base; then kicks every started queue and signals every queue's vector
    /// once, so neither a driver that suppressed notifications (NO_NOTIFY, an event index) nor
    /// a backend that came back waits for a notification that was sent to the old one.
    fn start_rings(&mut self, s: &mut Session) -> Result<(), SessionError> {
        let Some(queues) = self.desired.queues.clone() else { return Ok(()) };
        let checked = queues
            .iter()
            .map(|q| ring_hva(q, &self.mem).and_then(|_| Ok(RingStart { queue: *q, base: self.base_for(q)? })))
            .collect::<Result<Vec<_>, _>>();
        let rings = match checked {
            Ok(r) => r,
            Err(e) => {
                // The driver's mistake, not the backend's: the device needs a reset.
                tracing::warn!(id = %self.spec.id, error = %e, "cannot start the rings: DEVICE_NEEDS_RESET");
                self.desired.queues = None;
                self.needs_reset();
                return Ok(());
            }
        };
        if s.has(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.inflight.is_none() {
                self.inflight = s.get_inflight(self.spec.num_queues, self.spec.queue_size)?;
            }
            if let Some(i) = &self.inflight {
                s.set_inflight(i)?;
            }
        }
        // From the first ring message on, the backend may take requests: bases saved at a stop
        // no longer describe the ring.
        self.desired.ran = true;
        self.desired.saved_bases.clear();
        s.start_queues(&rings, self.spec.queue_size, &self.mem, &self.kicks, &self.errs, &self.signals)?;
        for r in &rings {
            if let Some(k) = self.kicks.get(r.queue.index as usize) {
                if let Err(e) = k.write(1) {
                    tracing::warn!(id = %self.spec.id, queue = r.queue.index, error = %e, "kick after start");
                }
            }
            if r.queue.vector != NO_VECTOR {
                self.signals.signal_vector(r.queue.vector);
            }
        }
        Ok(())
    }

    fn disconnect(&mut self, why: &dyn std::fmt::Display) {
        if matches!(self.link, Link::Up(_)) {
            tracing::info!(id = %self.spec.id, reason = %why, "vhost-user backend gone; the device waits and reconnects");
            self.link = Link::down_now();
        }
    }

    /// Applies one driver request to `Desired` and, when connected, to the backend.
    fn apply(&mut self, c: Command) {
        let result = match c {
            Command::WriteConfig { offset, data } => {
                let r = match &mut self.link {
                    Link::Up(s) if s.has(VhostUserProtocolFeatures::CONFIG) => s.set_config(offset, &data),
                    _ => Ok(()),
                };
                self.desired.config_writes.insert(offset, data);
                r
            }
            Command::FeaturesOk(f) => {
                self.desired.features = Some(f);
                match &mut self.link {
                    Link::Up(s) => s.set_features(f),
                    Link::Down { .. } => Ok(()),
                }
            }
            Command::Start(q) => {
                self.desired.queues = Some(q);
                let link = std::mem::replace(&mut self.link, Link::down_now());
                match link {
                    Link::Up(mut s) => {
                        let r = self.start_rings(&mut s);
                        self.link = Link::Up(s);
                        r
                    }
                    down => {
                        self.link = down;
                        Ok(())
                    }
                }
            }
            Command::Stop => {
                self.desired.queues = None;
                match &mut self.link {
                    Link::Up(s) => s.stop_queues().map(|bases| self.desired.saved_bases.extend(bases)),
                    Link::Down { .. } => Ok(()),
                }
            }
            Command::Reset(seq) => {
                self.desired = Desired::default();
                // QEMU frees the inflight region at a reset too: the next start gets a new one.
                self.inflight = None;
                let r = match &mut self.link {
                    Link::Up(s) => s.stop_queues().and_then(|_| s.reset_device()),
                    Link::Down { .. } => Ok(()),
                };
                // An error the old rings signalled is no longer the device's.
                for e in &self.errs {
                    let _ = e.read();
                }
                // Stopped or not (a failed request drops the link, which stops everything).
                self.signals.complete_reset(seq);
                r
            }
            Command::Exit => return,
        };
        if let Err(e) = result {
            self.disconnect(&e);
        }
    }

    fn refresh_config(&mut self) {
        let len = self.spec.config_len;
        let result = match &mut self.link {
            Link::Up(s) if s.has(VhostUserProtocolFeatures::CONFIG) => s.get_config(len).map(Some),
            _ => Ok(None),
        };
        match result {
            Ok(bytes) => {
                tracing::debug!(id = %self.spec.id, "configuration change from the backend");
                self.signals.config_changed(bytes);
            }
            Err(e) => self.disconnect(&e),
        }
    }

    /// A backend signalled a ring's error eventfd (SET_VRING_ERR): e.g. the driver published an
    /// avail index the ring cannot have. Only rings the driver runs count.
    fn ring_error(&mut self, queue: usize) {
        let _ = self.errs[queue].read();
        let running = self.desired.queues.as_ref().is_some_and(|q| q.iter().any(|q| q.index as usize == queue));
        if running && !self.signals.needs_reset.load(Ordering::SeqCst) {
            tracing::warn!(id = %self.spec.id, queue, "the backend reported a ring error: DEVICE_NEEDS_RESET");
            self.needs_reset();
        }
    }

    /// The thread's body: until [`Command::Exit`].
    pub fn run(mut self) {
        loop {
            // The socket is only worth watching while there is no connection.
            if let Some(w) = self.watch.as_mut() {
                if matches!(self.link, Link::Up(_)) {
                    w.disarm();
                } else {
                    w.rearm();
                }
            }
            // Fixed slots: wake, watch, error fds, then the connection's two.
            let mut fds = vec![pollfd(self.mailbox.wake.as_raw_fd(), libc::POLLIN)];
            fds.push(pollfd(self.watch.as_ref().map_or(-1, |w| w.raw_fd()), libc::POLLIN));
            fds.extend(self.errs.iter().map(|e| pollfd(e.as_raw_fd(), libc::POLLIN)));
            let conn = fds.len();
            let timeout_ms = match &self.link {
                Link::Up(s) => {
                    fds.push(pollfd(s.raw_fd(), libc::POLLRDHUP));
                    fds.push(pollfd(s.backend_req_fd().unwrap_or(-1), libc::POLLIN));
                    -1
                }
                Link::Down { next_try, .. } => {
                    // Round up: a timeout of 0 ms before the try is due would spin.
                    let left = next_try.saturating_duration_since(Instant::now());
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            // SAFETY: `fds` is a live array of pollfds for descriptors this thread owns (poll
            // skips the negative ones).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(id = %self.spec.id, error = %e, "poll");
                    std::thread::sleep(BACKOFF_START);
                }
                continue;
            }
            if fds[0].revents != 0 {
                let _ = self.mailbox.wake.read();
                while let Some(c) = self.mailbox.take() {
                    if matches!(c, Command::Exit) {
                        return;
                    }
                    self.apply(c);
                }
                if self.mailbox.take_overflow() {
                    self.needs_reset();
                }
            }
            if fds[1].revents != 0 {
                let appeared = self.watch.as_mut().is_some_and(|w| w.drain());
                if appeared {
                    if let Link::Down { next_try, quick, .. } = &mut self.link {
                        *next_try = Instant::now();
                        *quick = APPEAR_TRIES;
                    }
                }
            }
            for q in 0..self.errs.len() {
                if fds[2 + q].revents != 0 {
                    self.ring_error(q);
                }
            }
            if fds.len() > conn && matches!(self.link, Link::Up(_)) {
                if fds[conn].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                    self.disconnect(&"the socket hung up");
                } else if fds[conn + 1].revents != 0 {
                    let r = match &mut self.link {
                        Link::Up(s) => s.handle_backend_request(),
                        Link::Down { .. } => Ok(false),
                    };
                    match r {
                        Ok(true) => self.refresh_config(),
                        Ok(false) => {}
                        Err(e) => self.disconnect(&e),
                    }
                }
            }
            if let Link::Down { next_try, .. } = &self.link {
                if Instant::now() >= *next_try {
                    self.try_connect();
                }
            }
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}
