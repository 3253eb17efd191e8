//! blockd on D-Bus: `org.flotilla.Block1` at `/org/flotilla/Block`, owned as
//! `org.flotilla.<instance>.Block` (schema/DBUS.md), over [`BlockService`]; BLOCK_IO_ERROR as
//! a `QmpEvent` signal; and vmm-core's RESUME signal, on which held requests are retried.
//!
//! The connection runs on a current-thread tokio runtime in its own thread; commands that touch
//! the image (resize, snapshot) run in `spawn_blocking`.

use std::sync::Arc;
use std::time::SystemTime;

use flotilla_schema::check::QmpError;
use flotilla_schema::commands::{BlockPasswdArgs, BlockResizeArgs, BlockdevSnapshotSyncArgs};
use daemon_start::{spawn_bus_thread, within_connect_timeout, BusThread, BusThreadError, Ready};
use flotilla_schema::dbus::{self, EVENTS_INTERFACE, EVENT_SIGNAL};
use flotilla_schema::dbus_server::zbus::{self, Connection, MatchRule, MessageStream};
use flotilla_schema::dbus_server::{emit_qmp_event, serve, Block1, Block1Handler, Exported};
use flotilla_schema::types::{BlockInfo, BlockStats};
use futures_util::StreamExt;

use crate::engine::IoErrorEvent;
use crate::service::{BlockService, EXPORTED};

/// The object name in the bus name and path.
pub const OBJECT: &str = "Block";
struct Handler {
    svc: Arc<BlockService>,
}

impl Handler {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BlockService) -> Result<T, QmpError> + Send + 'static,
    ) -> Result<T, QmpError> {
        let svc = self.svc.clone();
        tokio::task::spawn_blocking(move || f(&svc))
            .await
            .map_err(|e| QmpError::new("GenericError", format!("internal error: {e}")))?
    }
}

impl Block1Handler for Handler {
    async fn query_block(&self) -> Result<Vec<BlockInfo>, QmpError> {
        self.blocking(|s| Ok(s.query_block())).await
    }
    async fn query_blockstats(&self) -> Result<Vec<BlockStats>, QmpError> {
        self.blocking(|s| Ok(s.query_blockstats())).await
    }
    async fn block_passwd(&self, args: BlockPasswdArgs) -> Result<(), QmpError> {
        self.svc.block_passwd(&args)
    }
    async fn block_resize(&self, args: BlockResizeArgs) -> Result<(), QmpError> {
        self.blocking(move |s| s.block_resize(&args)).await
    }
    async fn blockdev_snapshot_sync(&self, args: BlockdevSnapshotSyncArgs) -> Result<(), QmpError> {
        self.blocking(move |s| s.blockdev_snapshot_sync(&args)).await
    }
}

/// The D-Bus side of blockd, running in its own thread for the life of the process.
pub struct DbusServer {
    pub bus_name: String,
    /// Runs until the process ends (blockd exits without closing the bus).
    _thread: BusThread,
}

impl DbusServer {
    /// Connects, serves the interface, takes `org.flotilla.<instance>.Block` and subscribes to
    /// vmm-core's events; returns once the name is owned (or that failed). I/O errors of every
    /// drive are emitted as BLOCK_IO_ERROR from then on.
    pub fn start(svc: Arc<BlockService>, address: &str, instance: &str) -> Result<DbusServer, BusThreadError> {
        let bus_name = dbus::bus_name(instance, OBJECT);
        let core_name = dbus::bus_name(instance, "VmmCore");
        let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel::<IoErrorEvent>();
        for d in &svc.drives {
            let tx = ev_tx.clone();
            d.set_event_sink(Box::new(move |ev| {
                let _ = tx.send(ev);
            }));
        }
        let (addr, name) = (address.to_string(), bus_name.clone());
        let thread = spawn_bus_thread(address, &bus_name, move |ready| run(svc, addr, name, core_name, ready, ev_rx))?;
        tracing::info!(name = %bus_name, "serving org.flotilla.Block1");
        Ok(DbusServer { bus_name, _thread: thread })
    }
}

async fn connect(
    svc: Arc<BlockService>,
    address: &str,
    bus_name: &str,
    core_name: &str,
) -> Result<(Connection, MessageStream), String> {
    let iface = Exported::new(Block1::new(Arc::new(Handler { svc })), EXPORTED).map_err(|e| e.to_string())?;
    let path = dbus::object_path(OBJECT);
    let conn = serve(address, bus_name, &path, iface).await.map_err(|e| e.to_string())?;
    // vmm-core's events, by its well-known name (the bus matches whoever owns it now).
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(core_name)
        .interface(EVENTS_INTERFACE)
        .member(EVENT_SIGNAL)
        .build()
        .map_err(|e| e.to_string())?;
    let stream = MessageStream::for_match_rule(rule, &conn, None).await.map_err(|e| e.to_string())?;
    Ok((conn, stream))
}

async fn run(
    svc: Arc<BlockService>,
    address: String,
    bus_name: String,
    core_name: String,
    ready: Ready,
    mut events: tokio::sync::mpsc::UnboundedReceiver<IoErrorEvent>,
) {
    let (conn, mut core_events) =
        match within_connect_timeout(connect(svc.clone(), &address, &bus_name, &core_name)).await {
            Ok(c) => c,
            Err(e) => return ready.fail(e),
        };
    ready.ok();
    let path = dbus::object_path(OBJECT);
    loop {
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                if let Err(e) = emit_qmp_event(&conn, &path, "BLOCK_IO_ERROR", &ev.data(), SystemTime::now()).await {
                    tracing::warn!("cannot emit BLOCK_IO_ERROR: {e}");
                }
            }
            msg = core_events.next() => {
                let Some(msg) = msg else { break };
                let Ok(msg) = msg else { continue };
                let Ok((event, _data, _s, _us)) = msg.body().deserialize::<(String, String, i64, i64)>() else {
                    continue;
                };
                if event == "RESUME" {
                    tracing::info!("the VM resumed: retrying held requests");
                    svc.resume();
                }
            }
            _ = conn.closed() => {
                tracing::error!("the D-Bus connection closed");
                break;
            }
        }
    }
}
