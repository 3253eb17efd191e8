//! The per-device thread that owns the vhost-user connection. It keeps the state the driver set
//! up ([`Desired`]) apart from the connection ([`Link`]), so whatever the backend does, the
//! device is in one of two well-defined states:
//!
//! - `Link::Down`: no backend. Driver requests only change `Desired`; kicks wait in the
//!   ioeventfds; a reconnect is tried with backoff (50 ms doubling to 1 s).
//! - `Link::Up`: connected, and the backend holds exactly `Desired` (features acked at
//!   FEATURES_OK, rings started at DRIVER_OK). Each driver request is applied to both.
//!
//! Any failed request, a hang-up on the socket or a broken backend-request channel drops the
//! link to `Down`; a new connection replays `Desired` from the start (handshake, SET_FEATURES,
//! vrings with their bases taken from the used rings). There is no half-configured state: a
//! replay that fails part-way drops the link again and the next attempt starts over.

use super::session::Session;
use super::FrontendSpec;
use crate::virtio_pci::{features, DeviceSignals, QueueConfig};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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

/// The queue of commands and the eventfd that wakes the worker for them.
pub struct Mailbox {
    pub queue: Mutex<VecDeque<Command>>,
    pub wake: EventFd,
}

impl Mailbox {
    pub fn post(&self, c: Command) {
        crate::devices::bus::lock(&self.queue).push_back(c);
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %e, "waking the vhost-user worker");
        }
    }
}

/// What the driver has set up: replayed on every connection.
#[derive(Debug, Default, Clone)]
struct Desired {
    /// Driver features accepted at FEATURES_OK.
    features: Option<u64>,
    /// Rings started at DRIVER_OK (and not stopped since).
    queues: Option<Vec<QueueConfig>>,
    /// The rings were started by the driver and no backend has had them yet: they begin at 0.
    fresh: bool,
    /// Device-config bytes the driver wrote (by offset), sent again to a new backend (e.g. the
    /// balloon's `actual`, which a restarted balloond would not know).
    config_writes: std::collections::BTreeMap<u32, Vec<u8>>,
}

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

enum Link {
    Up(Box<Session>),
    Down { next_try: Instant, delay: Duration, since: Instant, attempts: u32 },
}

impl Link {
    fn down_now() -> Link {
        let now = Instant::now();
        Link::Down { next_try: now, delay: BACKOFF_START, since: now, attempts: 0 }
    }
}

pub struct Worker {
    spec: FrontendSpec,
    mem: GuestMemoryMmap,
    signals: Arc<DeviceSignals>,
    kicks: Vec<EventFd>,
    mailbox: Arc<Mailbox>,
    desired: Desired,
    link: Link,
    /// A connection existed before (a later one is a reconnect).
    ever_connected: bool,
}

impl Worker {
    pub fn new(
        spec: FrontendSpec,
        mem: GuestMemoryMmap,
        signals: Arc<DeviceSignals>,
        kicks: Vec<EventFd>,
        mailbox: Arc<Mailbox>,
    ) -> Self {
        Worker {
            spec,
            mem,
            signals,
            kicks,
            mailbox,
            desired: Desired::default(),
            link: Link::down_now(),
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
                if let Link::Down { next_try, delay, attempts, .. } = &mut self.link {
                    if *attempts == 0 {
                        // Once per outage at info; the retries at debug.
                        tracing::info!(id = %self.spec.id, error = %e, "vhost-user backend unavailable; retrying");
                    } else {
                        tracing::debug!(id = %self.spec.id, error = %e, attempt = *attempts + 1, "reconnect failed");
                    }
                    *attempts += 1;
                    *next_try = Instant::now() + *delay;
                    *delay = (*delay * 2).min(BACKOFF_MAX);
                }
                false
            }
        }
    }

    /// A fresh connection brought to `Desired`.
    fn connect_and_replay(&mut self) -> Result<Session, super::session::SessionError> {
        let mut s = Session::connect(&self.spec.socket, self.spec.num_queues, &self.mem)?;
        let offer = features::guest_offer(s.backend_features);
        let previous = crate::devices::bus::lock(&self.signals.device_features).replace(offer);
        if previous.is_some_and(|p| p != offer) {
            tracing::warn!(id = %self.spec.id, old = ?previous, new = offer, "the backend's features changed");
        }
        if s.has(vhost::vhost_user::VhostUserProtocolFeatures::CONFIG) {
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
                self.signals.needs_reset.store(true, Ordering::SeqCst);
                self.signals.config_changed(None);
                return Ok(s);
            }
            s.set_features(f)?;
        }
        if let Some(q) = &self.desired.queues {
            s.start_queues(q, self.spec.queue_size, !self.desired.fresh, &self.mem, &self.kicks, &self.signals)?;
            self.desired.fresh = false;
        }
        Ok(s)
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
                    Link::Up(s) if s.has(vhost::vhost_user::VhostUserProtocolFeatures::CONFIG) => {
                        s.set_config(offset, &data)
                    }
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
                let r = match &mut self.link {
                    Link::Up(s) => {
                        s.start_queues(&q, self.spec.queue_size, false, &self.mem, &self.kicks, &self.signals)
                    }
                    Link::Down { .. } => Ok(()),
                };
                self.desired.fresh = !matches!(self.link, Link::Up(_));
                self.desired.queues = Some(q);
                if let Err(e @ super::session::SessionError::RingAddress { .. }) = &r {
                    // The driver's mistake, not the backend's: the device needs a reset.
                    tracing::warn!(id = %self.spec.id, error = %e, "cannot start the rings: DEVICE_NEEDS_RESET");
                    self.signals.needs_reset.store(true, Ordering::SeqCst);
                    self.signals.config_changed(None);
                    self.desired.queues = None;
                    return;
                }
                r
            }
            Command::Stop => {
                self.desired.queues = None;
                match &mut self.link {
                    Link::Up(s) => s.stop_queues(),
                    Link::Down { .. } => Ok(()),
                }
            }
            Command::Reset(seq) => {
                self.desired = Desired::default();
                let r = match &mut self.link {
                    Link::Up(s) => s.stop_queues().and_then(|_| s.reset_device()),
                    Link::Down { .. } => Ok(()),
                };
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
            Link::Up(s) if s.has(vhost::vhost_user::VhostUserProtocolFeatures::CONFIG) => s.get_config(len).map(Some),
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

    /// The thread's body: until [`Command::Exit`].
    pub fn run(mut self) {
        loop {
            let mut fds = vec![pollfd(self.mailbox.wake.as_raw_fd(), libc::POLLIN)];
            let timeout_ms = match &self.link {
                Link::Up(s) => {
                    fds.push(pollfd(s.raw_fd(), libc::POLLRDHUP));
                    if let Some(fd) = s.backend_req_fd() {
                        fds.push(pollfd(fd, libc::POLLIN));
                    }
                    -1
                }
                Link::Down { next_try, .. } => {
                    next_try.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32
                }
            };
            // SAFETY: `fds` is a live array of pollfds for descriptors this thread owns.
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
                loop {
                    let next = crate::devices::bus::lock(&self.mailbox.queue).pop_front();
                    match next {
                        Some(Command::Exit) => return,
                        Some(c) => self.apply(c),
                        None => break,
                    }
                }
            }
            if fds.len() > 1 && matches!(self.link, Link::Up(_)) {
                if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                    self.disconnect(&"the socket hung up");
                } else if fds.get(2).is_some_and(|f| f.revents != 0) {
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
