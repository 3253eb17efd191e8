//! The serve loop: one thread per socket; on each, a new `VhostUserDaemon` with a fresh
//! backend for every frontend connection, for ever, so a frontend that reconnects (or a new
//! one after it) is served again with nothing of the last connection left over. Also the
//! workers' exit events ([`ExitEvents`]), which `VhostUserBackend::exit_event` hands out.

use std::convert::Infallible;
use std::io;
use std::sync::{mpsc, Arc};

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

/// A device's own error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a daemon serves on one socket. The kit calls, for every connection: [`Self::backend`],
/// [`Self::attach`], then accepts; [`Self::connected`]; after the frontend is gone the session
/// is dropped, the workers stopped and joined, and [`Self::disconnected`] runs.
pub trait Device: Send + Sync + 'static {
    type Backend: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + Send + Sync + 'static;
    /// Lives while a frontend is connected (e.g. a thread polling the device); dropped when
    /// it goes, before the workers stop.
    type Session;

    /// Names the device in logs and thread names.
    fn label(&self) -> &str;
    /// A fresh backend for the next connection.
    fn backend(&self) -> Result<Self::Backend, BoxError>;
    /// Before accepting: e.g. add the device's own descriptors to the workers' epolls.
    fn attach(
        &self,
        _backend: &Self::Backend,
        _workers: &[Arc<VringEpollHandler<Self::Backend>>],
    ) -> Result<(), BoxError> {
        Ok(())
    }
    /// A frontend is connected.
    fn connected(&self, backend: &Self::Backend) -> Result<Self::Session, BoxError>;
    /// The connection is over and its workers have stopped: forget what belonged to it
    /// (backend-request channel), make what it wrote durable (flush).
    fn disconnected(&self, backend: &Self::Backend);
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{device}: setting up the backend: {source}")]
    Backend { device: String, source: BoxError },
    #[error("{device}: serving a connection: {error}")]
    // Named `error`: vhost_user_backend::Error is no std Error, so it cannot be a `source`.
    Daemon { device: String, error: vhost_user_backend::Error },
    #[error("cannot start a thread: {0}")]
    Thread(#[source] io::Error),
}

/// Serves `listener` for ever: returns only when a connection cannot be set up or accepted.
pub fn serve_forever<D: Device>(device: &D, listener: &mut Listener) -> Result<Infallible, ServeError> {
    let label = device.label().to_string();
    let backend_error = |source| ServeError::Backend { device: label.clone(), source };
    let daemon_error = |error| ServeError::Daemon { device: label.clone(), error };
    loop {
        let backend = device.backend().map_err(backend_error)?;
        let mut daemon =
            VhostUserDaemon::new(label.clone(), backend.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new()))
                .map_err(daemon_error)?;
        device.attach(&backend, &daemon.get_epoll_handlers()).map_err(backend_error)?;
        daemon.start(listener).map_err(daemon_error)?;
        tracing::info!(device = %label, "frontend connected");
        let session = match device.connected(&backend) {
            Ok(s) => s,
            Err(e) => {
                daemon.request_shutdown();
                let _ = daemon.wait();
                return Err(backend_error(e));
            }
        };
        match daemon.wait() {
            Ok(()) => tracing::info!(device = %label, "frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(device = %label, "frontend disconnected"),
            Err(e) => tracing::warn!(device = %label, "connection ended: {e}"),
        }
        drop(session);
        // The daemon's last reference to its handler: dropping it sends every worker its exit
        // event and joins them.
        drop(daemon);
        device.disconnected(&backend);
    }
}

/// The sockets of a daemon, each served by [`serve_forever`] on its own thread.
pub struct Servers {
    failed_tx: mpsc::Sender<ServeError>,
    failed: mpsc::Receiver<ServeError>,
    count: usize,
}

impl Default for Servers {
    fn default() -> Self {
        Self::new()
    }
}

impl Servers {
    pub fn new() -> Servers {
        let (failed_tx, failed) = mpsc::channel();
        Servers { failed_tx, failed, count: 0 }
    }

    /// Serves `listener` with `device` on a new thread `vu-LABEL`.
    pub fn spawn<D: Device>(&mut self, device: Arc<D>, mut listener: Listener) -> Result<(), ServeError> {
        let tx = self.failed_tx.clone();
        std::thread::Builder::new()
            .name(format!("vu-{}", device.label()))
            .spawn(move || {
                let Err(e) = serve_forever(&*device, &mut listener);
                let _ = tx.send(e);
            })
            .map_err(ServeError::Thread)?;
        self.count += 1;
        Ok(())
    }

    /// Waits until one socket's serving fails and returns why; with no socket, for ever
    /// (a daemon serving only D-Bus, until a signal ends it).
    pub fn wait(self) -> ServeError {
        drop(self.failed_tx);
        if self.count > 0 {
            if let Ok(e) = self.failed.recv() {
                return e;
            }
        }
        // No socket (or every serving thread ended without a word, which they do not).
        loop {
            std::thread::park();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("creating the exit event of worker {worker}: {source}")]
pub struct ExitEventError {
    pub worker: usize,
    #[source]
    pub source: io::Error,
}

/// One exit event per worker thread of a connection's backend: `VhostUserBackend::exit_event`
/// hands out [`ExitEvents::get`], and the daemon (or [`ExitEvents::notify_all`]) ends the
/// workers with them.
pub struct ExitEvents(Vec<(EventConsumer, EventNotifier)>);

impl ExitEvents {
    pub fn new(workers: usize) -> Result<ExitEvents, ExitEventError> {
        (0..workers)
            .map(|worker| {
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                    .map_err(|source| ExitEventError { worker, source })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(ExitEvents)
    }

    /// Worker `worker`'s event, for `VhostUserBackend::exit_event`.
    pub fn get(&self, worker: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.0.get(worker)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    /// Tells every worker to exit.
    pub fn notify_all(&self) {
        for (_, notifier) in &self.0 {
            let _ = notifier.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exit_events_reach_their_workers() {
        let ev = ExitEvents::new(2).expect("events");
        let (c0, _) = ev.get(0).expect("worker 0");
        let (c1, _) = ev.get(1).expect("worker 1");
        assert!(ev.get(2).is_none());
        assert!(c0.consume().is_err(), "nothing yet (non-blocking)");
        ev.notify_all();
        assert!(c0.consume().is_ok() && c1.consume().is_ok());
    }

    #[test]
    fn with_no_socket_wait_blocks() {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let e = Servers::new().wait();
            let _ = tx.send(e.to_string());
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }
}
