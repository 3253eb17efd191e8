//! balloond on D-Bus: `org.flotilla.Balloon1` at `/org/flotilla/Balloon`, owned as
//! `org.flotilla.<instance>.Balloon` (schema/DBUS.md), exporting `balloon` and `query-balloon`,
//! and BALLOON_CHANGE as a `QmpEvent` signal on `org.flotilla.Events1`.
//!
//! The connection runs on a single-threaded tokio runtime in its own thread. The device hands
//! events to a channel from whatever thread notices them (a SET_CONFIG from the frontend); a
//! task emits them in order.

use std::sync::Arc;
use std::time::Duration;

use flotilla_schema::check::QmpError;
use flotilla_schema::commands::BalloonArgs;
use daemon_start::{spawn_bus_thread, within_connect_timeout, BusThread, BusThreadError, Ready};
use flotilla_schema::dbus;
use flotilla_schema::dbus_server::{emit_qmp_event, serve, Balloon1, Balloon1Handler, Exported};
use flotilla_schema::types::BalloonInfo;
use serde_json::json;

use crate::config::TargetError;
use crate::device::{Device, Event};

/// The object name in the bus name and path.
pub const OBJECT: &str = "Balloon";
/// The commands balloond implements (its interface less the QOM commands).
pub const EXPORTED: &[&str] = &["balloon", "query-balloon"];
/// How long the bus thread may take to close when balloond ends.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The QMP error for a refused target: QEMU's `QERR_INVALID_PARAMETER_VALUE, "target",
/// "a size"`. The text is QEMU 7.2's (shared/qemu-7.2-qmp/errors/balloon-zero.txt); the class
/// and data are the macro's in QEMU 1.1 (7.2 sends every such error as GenericError).
pub fn target_error(e: TargetError) -> QmpError {
    match e {
        TargetError::NotPositive => QmpError {
            class: "InvalidParameterValue".into(),
            desc: "Parameter 'target' expects a size".into(),
            data: Some(json!({ "name": "target", "expected": "a size" })),
        },
    }
}

/// The handler behind the generated `Balloon1` wrapper.
pub struct Handler {
    device: Arc<Device>,
}

impl Handler {
    pub fn new(device: Arc<Device>) -> Handler {
        Handler { device }
    }
}

impl Balloon1Handler for Handler {
    async fn balloon(&self, args: BalloonArgs) -> Result<(), QmpError> {
        // A balloon device exists as long as this daemon runs (the gateway answers
        // DeviceNotActive when it does not); the request stands until the guest acts on it.
        self.device.set_target(args.value).map(|_| ()).map_err(target_error)
    }

    async fn query_balloon(&self) -> Result<BalloonInfo, QmpError> {
        Ok(self.device.info())
    }
}

/// The D-Bus side of balloond, running in its own thread; closes the connection when dropped.
pub struct DbusServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<BusThread>,
    bus_name: String,
}

impl DbusServer {
    /// Connects to the bus at `address`, serves the interface and takes
    /// `org.flotilla.<instance>.Balloon`; returns once the name is owned (or failed). From
    /// then on the device's events go out as signals.
    pub fn start(device: Arc<Device>, address: &str, instance: &str) -> Result<DbusServer, BusThreadError> {
        let bus_name = dbus::bus_name(instance, OBJECT);
        let path = dbus::object_path(OBJECT);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, name) = (address.to_string(), bus_name.clone());
        let thread = spawn_bus_thread(address, &bus_name, move |ready| run(device, addr, name, path, ready, stop_rx))?;
        tracing::info!(name = %bus_name, "serving org.flotilla.Balloon1");
        Ok(DbusServer { stop: Some(stop_tx), thread: Some(thread), bus_name })
    }

    pub fn bus_name(&self) -> &str {
        &self.bus_name
    }
}

impl Drop for DbusServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            if !t.join_within(CLOSE_TIMEOUT) {
                tracing::warn!("the D-Bus thread did not end within {CLOSE_TIMEOUT:?}");
            }
        }
    }
}

async fn run(
    device: Arc<Device>,
    address: String,
    bus_name: String,
    path: String,
    ready: Ready,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let iface = match Exported::new(Balloon1::new(Arc::new(Handler::new(device.clone()))), EXPORTED) {
        Ok(i) => i,
        Err(e) => return ready.fail(e.to_string()),
    };
    let conn = match within_connect_timeout(serve(&address, &bus_name, &path, iface)).await {
        Ok(c) => c,
        Err(e) => return ready.fail(e),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    device.set_event_sink(Some(Box::new(move |ev| {
        let _ = tx.send(ev);
    })));
    ready.ok();
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some((name, data, at)) = ev else { break };
                if let Err(e) = emit_qmp_event(&conn, &path, name, &data, at).await {
                    tracing::warn!(event = name, error = %e, "cannot emit QmpEvent");
                }
            }
            _ = &mut stop => break,
            _ = conn.closed() => {
                tracing::warn!("the D-Bus connection closed");
                break;
            }
        }
    }
    device.set_event_sink(None);
    if tokio::time::timeout(Duration::from_secs(2), conn.graceful_shutdown()).await.is_err() {
        tracing::warn!("D-Bus calls still in flight at exit");
    }
}
