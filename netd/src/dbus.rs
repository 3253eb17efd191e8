//! netd on D-Bus: `org.flotilla.Net1` at `/org/flotilla/Net`, owned as
//! `org.flotilla.<instance>.Net` (schema/DBUS.md), exporting `set_link`. The QOM commands are
//! left to the daemons that have a QOM tree to show, as blockd and balloond leave theirs.

use std::sync::Arc;
use std::time::Duration;

use daemon_start::{spawn_bus_thread, within_connect_timeout, BusThread, BusThreadError, Ready};
use flotilla_schema::check::QmpError;
use flotilla_schema::commands::SetLinkArgs;
use flotilla_schema::dbus;
use flotilla_schema::dbus_server::{serve, Exported, Net1, Net1Handler};
use serde_json::json;

use crate::nic::Nic;

/// The object name in the bus name and path.
pub const OBJECT: &str = "Net";
/// The commands netd implements.
pub const EXPORTED: &[&str] = &["set_link"];
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// QEMU's answer for a name that is no NIC and no netdev (errors/set_link-unknown-device.txt;
/// the data is QEMU 1.1's DeviceNotFound's).
pub fn device_not_found(name: &str) -> QmpError {
    QmpError { class: "DeviceNotFound".into(), desc: format!("Device '{name}' not found"), data: Some(json!({ "device": name })) }
}

/// set_link over every NIC netd serves: `name` is a NIC's qdev id or its netdev's id.
pub fn set_link(nics: &[Arc<Nic>], name: &str, up: bool) -> Result<(), QmpError> {
    let nic = nics.iter().find(|n| n.answers_to(name)).ok_or_else(|| device_not_found(name))?;
    nic.set_link(up).map_err(|e| {
        tracing::error!(nic = %nic.id, "{e}");
        QmpError::new("GenericError", format!("cannot record the link state: {e}"))
    })
}

struct Handler {
    nics: Vec<Arc<Nic>>,
}

impl Net1Handler for Handler {
    async fn set_link(&self, args: SetLinkArgs) -> Result<(), QmpError> {
        let nics = self.nics.clone();
        // The state file is fsynced: off the bus thread.
        tokio::task::spawn_blocking(move || set_link(&nics, &args.name, args.up))
            .await
            .map_err(|e| QmpError::new("GenericError", format!("internal error: {e}")))?
    }
}

/// The D-Bus side of netd, on its own thread; closes the connection when dropped.
pub struct DbusServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<BusThread>,
    pub bus_name: String,
}

impl DbusServer {
    /// Connects, serves the interface and takes `org.flotilla.<instance>.Net`; returns once the
    /// name is owned (or that failed).
    pub fn start(nics: Vec<Arc<Nic>>, address: &str, instance: &str) -> Result<DbusServer, BusThreadError> {
        let bus_name = dbus::bus_name(instance, OBJECT);
        let path = dbus::object_path(OBJECT);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, name) = (address.to_string(), bus_name.clone());
        let thread = spawn_bus_thread(address, &bus_name, move |ready| run(nics, addr, name, path, ready, stop_rx))?;
        tracing::info!(name = %bus_name, "serving org.flotilla.Net1");
        Ok(DbusServer { stop: Some(stop_tx), thread: Some(thread), bus_name })
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
    nics: Vec<Arc<Nic>>,
    address: String,
    bus_name: String,
    path: String,
    ready: Ready,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let iface = match Exported::new(Net1::new(Arc::new(Handler { nics })), EXPORTED) {
        Ok(i) => i,
        Err(e) => return ready.fail(e.to_string()),
    };
    let conn = match within_connect_timeout(serve(&address, &bus_name, &path, iface)).await {
        Ok(c) => c,
        Err(e) => return ready.fail(e),
    };
    ready.ok();
    tokio::select! {
        _ = &mut stop => {}
        _ = conn.closed() => tracing::warn!("the D-Bus connection closed"),
    }
    if tokio::time::timeout(Duration::from_secs(2), conn.graceful_shutdown()).await.is_err() {
        tracing::warn!("D-Bus calls still in flight at exit");
    }
}
