//! CONFIG_CHANGE_MSG on the backend-request channel, sent from a thread of its own: with
//! REPLY_ACK the send waits for the frontend's ack, which must hold up neither the D-Bus side
//! (a QMP command that changed the config space) nor a vhost-user worker.
//!
//! One notifier per device, for the life of the process: [`ConfigChangeNotifier::request`]
//! marks a change owed; the thread sends one whenever one is owed and a channel exists,
//! folding requests made meanwhile into one. A new channel (or none) drops a change owed to
//! an earlier connection: a new driver reads the config space itself.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// The backend-request channel of the current connection and whether a change is owed to it.
#[derive(Default)]
struct State {
    backend: Option<Backend>,
    pending: bool,
    /// Config changes sent (and acked, with REPLY_ACK).
    sent: u64,
    stop: bool,
}

type Shared = (Mutex<State>, Condvar);

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends CONFIG_CHANGE_MSG to the frontend when asked; its thread stops when this is dropped.
pub struct ConfigChangeNotifier {
    shared: Arc<Shared>,
}

impl ConfigChangeNotifier {
    /// Starts the notifier thread, named `thread_name`.
    pub fn new(thread_name: String) -> std::io::Result<ConfigChangeNotifier> {
        let shared: Arc<Shared> = Arc::default();
        let s = shared.clone();
        std::thread::Builder::new().name(thread_name).spawn(move || notifier(&s))?;
        Ok(ConfigChangeNotifier { shared })
    }

    /// The config space changed: the frontend is owed a CONFIG_CHANGE_MSG. Does not wait.
    pub fn request(&self) {
        let (m, cv) = &*self.shared;
        lock(m).pending = true;
        cv.notify_all();
    }

    /// The current connection's backend-request channel (None when it ends); a change owed
    /// to an earlier connection is dropped.
    pub fn set_backend(&self, backend: Option<Backend>) {
        let mut s = lock(&self.shared.0);
        s.backend = backend;
        s.pending = false;
    }

    /// CONFIG_CHANGE_MSGs sent (and acked, with REPLY_ACK) so far.
    pub fn sent(&self) -> u64 {
        lock(&self.shared.0).sent
    }
}

impl Drop for ConfigChangeNotifier {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        lock(m).stop = true;
        cv.notify_all();
    }
}

fn notifier(shared: &Shared) {
    let (m, cv) = shared;
    loop {
        let backend = {
            let mut s = lock(m);
            loop {
                if s.stop {
                    return;
                }
                if s.pending && s.backend.is_some() {
                    break;
                }
                s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.pending = false;
            s.backend.clone()
        };
        let Some(backend) = backend else { continue };
        match backend.handle_config_change() {
            Ok(_) => {
                lock(m).sent += 1;
                tracing::debug!("config change sent to the frontend");
            }
            Err(e) => tracing::warn!("cannot send CONFIG_CHANGE_MSG to the frontend: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use vhost::vhost_user::message::BackendReq;

    use super::*;

    const CONFIG_CHANGE: u32 = BackendReq::CONFIG_CHANGE_MSG as u32;

    /// One message: its request; the payload is skipped.
    fn read_request(s: &mut UnixStream) -> u32 {
        let mut hdr = [0u8; 12];
        s.read_exact(&mut hdr).unwrap();
        let size = u32::from_le_bytes(hdr[8..].try_into().unwrap());
        s.read_exact(&mut vec![0u8; size as usize]).unwrap();
        u32::from_le_bytes(hdr[..4].try_into().unwrap())
    }

    fn wait_sent(n: &ConfigChangeNotifier, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while n.sent() < want {
            assert!(Instant::now() < deadline, "sent {} of {want}", n.sent());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn sends_one_message_per_request_on_the_current_channel() {
        let n = ConfigChangeNotifier::new("cfg-test".into()).unwrap();
        // Owed while no channel exists, then a new connection (the change is dropped).
        n.request();
        let (ours, mut frontend) = UnixStream::pair().unwrap();
        frontend.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        n.set_backend(Some(Backend::from_stream(ours)));
        n.request();
        assert_eq!(read_request(&mut frontend), CONFIG_CHANGE);
        wait_sent(&n, 1);
        n.request();
        assert_eq!(read_request(&mut frontend), CONFIG_CHANGE);
        wait_sent(&n, 2);
        // The channel given up: the frontend sees its end, and nothing else came before it.
        n.set_backend(None);
        assert_eq!(frontend.read(&mut [0u8; 1]).unwrap(), 0);
        drop(n);
    }

    /// The frontend's ack of a CONFIG_CHANGE_MSG sent with REPLY_ACK (version 1, REPLY flag).
    fn ack(s: &mut UnixStream) {
        let mut msg = Vec::new();
        for word in [CONFIG_CHANGE, 0x1 | 0x4, 8] {
            msg.extend_from_slice(&word.to_le_bytes());
        }
        msg.extend_from_slice(&0u64.to_le_bytes());
        s.write_all(&msg).unwrap();
    }

    fn channel(reply_ack: bool) -> (Backend, UnixStream) {
        let (ours, frontend) = UnixStream::pair().unwrap();
        frontend.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let backend = Backend::from_stream(ours);
        backend.set_reply_ack_flag(reply_ack);
        (backend, frontend)
    }

    #[test]
    fn a_change_owed_to_an_earlier_connection_is_dropped_while_the_send_waits_for_its_ack() {
        let n = ConfigChangeNotifier::new("cfg-test-ack".into()).unwrap();
        let (first, mut first_fe) = channel(true);
        n.set_backend(Some(first));
        n.request();
        assert_eq!(read_request(&mut first_fe), CONFIG_CHANGE);
        // The thread waits for the ack: a request now is owed to the first connection...
        n.request();
        assert_eq!(n.sent(), 0);
        // ...which a new one replaces before the ack comes.
        let (second, mut second_fe) = channel(true);
        n.set_backend(Some(second));
        ack(&mut first_fe);
        wait_sent(&n, 1);
        // Had the owed change survived, the thread would now be waiting for the second
        // frontend's ack and hold its channel open; instead it ends with the channel given up.
        n.set_backend(None);
        assert_eq!(second_fe.read(&mut [0u8; 1]).unwrap(), 0);
        assert_eq!(n.sent(), 1);
    }
}
