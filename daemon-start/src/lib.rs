//! How a daemon comes up on the bus and tells the launcher (schema/DBUS.md, "Processes and
//! their arguments"), shared by vmm-core and every backend daemon: the D-Bus side runs on its own
//! thread with a current-thread tokio runtime, reports once its name is owned (or why not)
//! within a deadline, and `--ready-fd` gets `ready\n` once the whole daemon is serving.

use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

/// How long connecting to the bus, serving the objects and taking the name may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BusThreadError {
    #[error("cannot start the D-Bus thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot connect to D-Bus at {address} as {name}: {reason}")]
    Connect { address: String, name: String, reason: String },
}

/// The bus thread's one report of how its start went.
pub struct Ready(mpsc::Sender<Result<(), String>>);

impl Ready {
    /// The name is owned: [`spawn_bus_thread`] returns.
    pub fn ok(self) {
        let _ = self.0.send(Ok(()));
    }

    /// Starting failed: [`spawn_bus_thread`] returns this reason as an error.
    pub fn fail(self, reason: impl Into<String>) {
        let _ = self.0.send(Err(reason.into()));
    }
}

/// A running bus thread.
pub struct BusThread {
    /// Fires when the thread's runtime has been dropped (every connection closed).
    done: mpsc::Receiver<()>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl BusThread {
    /// Waits up to `timeout` for the thread to finish (after its body returned, e.g. on a stop
    /// signal the body watches); false if it did not.
    pub fn join_within(mut self, timeout: Duration) -> bool {
        if self.done.recv_timeout(timeout).is_err() {
            return false;
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        true
    }
}

/// Runs `body` on a new thread named `dbus` in a current-thread tokio runtime and waits, at
/// most [`CONNECT_TIMEOUT`] and a second, for its [`Ready`] report. `address` and `bus_name`
/// only label the error.
pub fn spawn_bus_thread<F, Fut>(address: &str, bus_name: &str, body: F) -> Result<BusThread, BusThreadError>
where
    F: FnOnce(Ready) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("dbus".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => {
                    rt.block_on(body(Ready(ready_tx)));
                    drop(rt);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start the tokio runtime: {e}")));
                }
            }
            let _ = done_tx.send(());
        })
        .map_err(BusThreadError::Thread)?;
    let connect_error =
        |reason: String| BusThreadError::Connect { address: address.to_string(), name: bus_name.to_string(), reason };
    match ready_rx.recv_timeout(CONNECT_TIMEOUT + Duration::from_secs(1)) {
        Ok(Ok(())) => Ok(BusThread { done: done_rx, handle: Some(handle) }),
        Ok(Err(reason)) => Err(connect_error(reason)),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(connect_error("timed out".into())),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(connect_error("the D-Bus thread ended without reporting".into()))
        }
    }
}

/// `fut` (connecting, serving, subscribing) bounded by [`CONNECT_TIMEOUT`], its error as text
/// for [`Ready::fail`].
pub async fn within_connect_timeout<T, E: std::fmt::Display>(
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// Writes `ready\n` to the launcher's pipe `fd` and closes it; a failure is only reported back
/// (the launcher then sees the pipe close without `ready` and says so).
pub fn report_ready(fd: i32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: the launcher passed this descriptor for this process alone and nothing else in
    // the process uses or closes it, so taking ownership (and closing it on drop) is sound.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(b"ready\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn a_reported_start_returns_and_the_thread_joins() {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let t = spawn_bus_thread("unix:path=/x", "org.flotilla.t.X", |ready| async move {
            ready.ok();
            let _ = stop_rx.await;
        })
        .expect("started");
        let _ = stop_tx.send(());
        assert!(t.join_within(Duration::from_secs(5)));
    }

    #[test]
    fn a_failed_start_is_an_error_with_the_reason() {
        let e = spawn_bus_thread("unix:path=/x", "org.flotilla.t.X", |ready| async move { ready.fail("no bus") })
            .err()
            .expect("fails");
        assert_eq!(e.to_string(), "cannot connect to D-Bus at unix:path=/x as org.flotilla.t.X: no bus");
    }

    #[test]
    fn a_body_that_never_reports_is_an_error_too() {
        let e = spawn_bus_thread("a", "n", |ready| async move { drop(ready) }).err().expect("fails");
        assert!(e.to_string().ends_with(": the D-Bus thread ended without reporting"), "{e}");
    }

    #[test]
    fn timeouts_and_errors_become_text() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let r: Result<(), String> = rt.block_on(within_connect_timeout(async { Err::<(), _>("refused") }));
        assert_eq!(r, Err("refused".to_string()));
        assert_eq!(rt.block_on(within_connect_timeout(async { Ok::<_, String>(7) })), Ok(7));
    }

    #[test]
    fn ready_goes_down_the_pipe_and_closes_it() {
        let (r, w) = std::os::unix::net::UnixStream::pair().expect("pair");
        report_ready(w.into_raw_fd()).expect("written");
        let mut got = String::new();
        std::io::Read::read_to_string(&mut &r, &mut got).expect("read to EOF");
        assert_eq!(got, "ready\n");
    }
}
