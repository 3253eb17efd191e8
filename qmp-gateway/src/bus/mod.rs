//! The gateway's D-Bus side: one connection, one task reading everything it receives.
//!
//! That task is the only reader, and handles messages in the order the bus delivered them:
//! method returns complete the calls waiting for them, `NameOwnerChanged` updates the
//! [`daemons::Daemons`] table, and `QmpEvent` signals become event lines broadcast to the
//! sessions. Because an event is broadcast before a later method return completes its call, a
//! session that flushes its events before writing a reply keeps QEMU's order (`STOP` before
//! the `stop` return): see DBUS.md, "Ordering".
//!
//! Calls are sent with `NO_AUTO_START` and each is bounded by a timeout; a daemon that is down
//! is known from `NameOwnerChanged` and never waited for.

pub mod convert;
pub mod daemons;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_schema::dbus::{Interface, INTERFACES};
use serde_json::{Map, Value};
use tokio::sync::{broadcast, oneshot, watch};
use zbus::export::futures_core::Stream;
use zbus::message::{Flags, Type};
use zbus::{Connection, Message, MessageStream};

use crate::reply;
use daemons::Daemons;

use flotilla_schema::dbus::{EVENTS_INTERFACE, EVENT_SIGNAL as EVENT_MEMBER};

const DBUS_NAME: &str = "org.freedesktop.DBus";
const DBUS_PATH: &str = "/org/freedesktop/DBus";

/// How long connecting and the setup calls may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Introspection attempts per new owner, and the pause between them.
const INTROSPECT_TRIES: u32 = 20;
const INTROSPECT_PAUSE: Duration = Duration::from_millis(100);
/// Event lines buffered per slow session before it misses some.
const EVENT_BACKLOG: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to the D-Bus at '{address}': {source}")]
    Connect { address: String, source: zbus::Error },
    #[error("timed out connecting to the D-Bus at '{0}'")]
    ConnectTimeout(String),
    #[error("D-Bus setup call {what} failed: {source}")]
    Setup { what: String, source: CallError },
}

/// Why a call got no reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("the D-Bus connection is closed")]
    Closed,
    #[error("cannot build the message: {0}")]
    Build(#[source] zbus::Error),
    #[error("cannot send the message: {0}")]
    Send(#[source] zbus::Error),
    #[error("{name}: {message}")]
    Error { name: String, message: String },
}

struct Shared {
    conn: Connection,
    instance: String,
    pending: Mutex<HashMap<u32, oneshot::Sender<Message>>>,
    daemons: Mutex<Daemons>,
    events: broadcast::Sender<Arc<str>>,
    closed: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connection to the VM's bus.
#[derive(Clone)]
pub struct Bus {
    shared: Arc<Shared>,
}

/// A daemon as the dispatcher sees it at one moment.
#[derive(Debug, Clone)]
pub struct DaemonView {
    pub iface: &'static Interface,
    pub bus_name: String,
    pub path: String,
    pub owner: Option<String>,
    pub configured: bool,
    /// `Some(false)`: the live daemon does not export the command.
    pub exports: Option<bool>,
}

impl Bus {
    /// Connects, subscribes to the instance's daemons and events, and looks up who is there.
    pub async fn connect(address: &str, instance: &str, declared: &[String]) -> Result<Bus, BusError> {
        let build = zbus::connection::Builder::address(address).build();
        let conn = match tokio::time::timeout(SETUP_TIMEOUT, build).await {
            Err(_) => return Err(BusError::ConnectTimeout(address.to_string())),
            Ok(Err(source)) => return Err(BusError::Connect { address: address.to_string(), source }),
            Ok(Ok(c)) => c,
        };
        // Answer stray calls (Introspect, Ping) on our connection instead of leaving callers hanging.
        let _ = conn.object_server();
        // The stream exists before any match rule, so no message is missed.
        let stream = MessageStream::from(&conn);
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            conn,
            instance: instance.to_string(),
            pending: Mutex::new(HashMap::new()),
            daemons: Mutex::new(Daemons::new(declared)),
            events,
            closed,
        });
        let bus = Bus { shared };
        tokio::spawn(bus.clone().read_loop(stream));

        let setup = |what: &str, source| BusError::Setup { what: what.to_string(), source };
        let prefix = format!("org.flotilla.{instance}");
        let rules = std::iter::once(format!(
            "type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',interface='{DBUS_NAME}',\
             member='NameOwnerChanged',arg0namespace='{prefix}'"
        ))
        .chain(INTERFACES.iter().map(|i| {
            format!(
                "type='signal',sender='{}',path='{}',interface='{EVENTS_INTERFACE}',member='{EVENT_MEMBER}'",
                daemons::bus_name(instance, i),
                daemons::object_path(i)
            )
        }));
        for rule in rules {
            bus.call_bus("AddMatch", &(rule.as_str(),)).await.map_err(|e| setup(&format!("AddMatch {rule}"), e))?;
        }
        // DBUS_NAME_FLAG_DO_NOT_QUEUE; another gateway of the same instance is reported, not fatal.
        let gw = daemons::gateway_bus_name(instance);
        match bus.call_bus("RequestName", &(gw.as_str(), 4u32)).await {
            Ok(reply) => match reply.body().deserialize::<u32>() {
                Ok(1) | Ok(4) => {}
                Ok(code) => tracing::warn!("could not own {gw} (RequestName answered {code}): another gateway?"),
                Err(e) => tracing::warn!("RequestName {gw}: {e}"),
            },
            Err(e) => tracing::warn!("RequestName {gw}: {e}"),
        }
        for (idx, iface) in INTERFACES.iter().enumerate() {
            let generation = lock(&bus.shared.daemons).states[idx].generation;
            let name = daemons::bus_name(instance, iface);
            let owner = match bus.call_bus("GetNameOwner", &(name.as_str(),)).await {
                Ok(reply) => reply.body().deserialize::<String>().ok(),
                Err(CallError::Error { name, .. }) if name.ends_with(".NameHasNoOwner") => None,
                Err(e) => return Err(setup(&format!("GetNameOwner {name}"), e)),
            };
            // A NameOwnerChanged seen meanwhile is newer than this answer.
            let changed = {
                let mut d = lock(&bus.shared.daemons);
                d.states[idx].generation == generation && d.set_owner(idx, owner.clone())
            };
            if changed {
                if let Some(owner) = owner {
                    bus.spawn_introspection(idx, owner);
                }
            }
        }
        Ok(bus)
    }

    /// The instance's name as it appears in bus names.
    pub fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// A new subscription to the event lines.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.shared.events.subscribe()
    }

    /// Resolves when the bus connection is gone.
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Every daemon's state now, indexed like `INTERFACES`, for one command.
    pub fn view(&self, command: &str) -> Vec<DaemonView> {
        let d = lock(&self.shared.daemons);
        INTERFACES
            .iter()
            .zip(&d.states)
            .map(|(iface, s)| DaemonView {
                iface,
                bus_name: daemons::bus_name(&self.shared.instance, iface),
                path: daemons::object_path(iface),
                owner: s.owner.clone(),
                configured: s.configured,
                exports: s.exports(command),
            })
            .collect()
    }

    /// The commands each configured daemon exports (last introspection; kept while a daemon
    /// restarts), and whether each daemon is configured.
    pub fn exported(&self) -> Vec<(&'static Interface, bool, Option<std::collections::BTreeSet<&'static str>>)> {
        let d = lock(&self.shared.daemons);
        INTERFACES.iter().zip(&d.states).map(|(i, s)| (i, s.configured, s.exported.clone())).collect()
    }

    async fn call_bus<B>(&self, member: &str, body: &B) -> Result<Message, CallError>
    where
        B: serde::Serialize + zbus::wire::DynamicType,
    {
        self.call(DBUS_NAME, DBUS_PATH, DBUS_NAME, member, body, SETUP_TIMEOUT).await
    }

    /// Calls a method and waits (at most `timeout`) for its return, which is handed over by the
    /// reading task in bus order.
    pub async fn call<B>(
        &self,
        destination: &str,
        path: &str,
        interface: &str,
        member: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<Message, CallError>
    where
        B: serde::Serialize + zbus::wire::DynamicType,
    {
        let msg = Message::method_call(path, member)
            .destination(destination)
            .interface(interface)
            .with_flags(Flags::NO_AUTO_START)
            .build(body)
            .map_err(CallError::Build)?;
        let serial = msg.primary_header().serial_num().get();
        let (tx, rx) = oneshot::channel();
        if *self.shared.closed.borrow() {
            return Err(CallError::Closed);
        }
        lock(&self.shared.pending).insert(serial, tx);
        let exchange = async {
            self.shared.conn.send(&msg).await.map_err(CallError::Send)?;
            rx.await.map_err(|_| CallError::Closed)
        };
        let reply = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                lock(&self.shared.pending).remove(&serial);
                return Err(e);
            }
            Err(_) => {
                lock(&self.shared.pending).remove(&serial);
                return Err(CallError::Timeout(timeout));
            }
        };
        if reply.message_type() == Type::Error {
            let name = reply.header().error_name().map(|n| n.to_string()).unwrap_or_default();
            let message =
                reply.body().deserialize::<zbus::wire::Structure>().ok().and_then(|s| match s.fields().first() {
                    Some(zbus::wire::Variant::Str(m)) => Some(m.as_str().to_string()),
                    _ => None,
                });
            return Err(CallError::Error { name, message: message.unwrap_or_default() });
        }
        Ok(reply)
    }

    fn spawn_introspection(&self, idx: usize, owner: String) {
        let bus = self.clone();
        tokio::spawn(async move { bus.introspect(idx, owner).await });
    }

    /// Finds out what a daemon's new owner exports.
    async fn introspect(&self, idx: usize, owner: String) {
        let iface = &INTERFACES[idx];
        let path = daemons::object_path(iface);
        for attempt in 0..INTROSPECT_TRIES {
            if lock(&self.shared.daemons).states[idx].owner.as_deref() != Some(&owner) {
                return; // gone or replaced meanwhile
            }
            let res = self
                .call(&owner, &path, "org.freedesktop.DBus.Introspectable", "Introspect", &(), SETUP_TIMEOUT)
                .await
                .and_then(|r| {
                    r.body()
                        .deserialize::<String>()
                        .map_err(|e| CallError::Error { name: "deserialize".into(), message: e.to_string() })
                });
            match res {
                Ok(xml) if xml.contains(&format!("\"{}\"", iface.name)) => {
                    let (exported, mismatched) = daemons::exported_commands(iface, &xml);
                    for m in &mismatched {
                        tracing::warn!(daemon = iface.daemon, "method not served, its signature differs: {m}");
                    }
                    tracing::info!(daemon = iface.daemon, owner = %owner, "exports {} commands", exported.len());
                    let mut d = lock(&self.shared.daemons);
                    let s = &mut d.states[idx];
                    if s.owner.as_deref() == Some(&owner) {
                        s.exported = Some(exported);
                        s.exported_by = Some(owner);
                    }
                    return;
                }
                Ok(_) => tracing::debug!(daemon = iface.daemon, attempt, "{} not exported yet", iface.name),
                Err(e) => tracing::debug!(daemon = iface.daemon, attempt, "introspection failed: {e}"),
            }
            tokio::time::sleep(INTROSPECT_PAUSE).await;
        }
        tracing::warn!(daemon = iface.daemon, "{} does not export {} at {path}", owner, iface.name);
    }

    async fn read_loop(self, mut stream: MessageStream) {
        loop {
            let next = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await;
            match next {
                None => break,
                Some(Err(e)) => {
                    tracing::error!("D-Bus connection failed: {e}");
                    break;
                }
                Some(Ok(msg)) => self.handle(msg),
            }
        }
        self.shared.closed.send_replace(true);
        // Waiting calls fail at once.
        lock(&self.shared.pending).clear();
    }

    fn handle(&self, msg: Message) {
        match msg.message_type() {
            Type::MethodReturn | Type::Error => {
                if let Some(serial) = msg.header().reply_serial() {
                    if let Some(tx) = lock(&self.shared.pending).remove(&serial.get()) {
                        let _ = tx.send(msg);
                    }
                }
            }
            Type::Signal => {
                let h = msg.header();
                let (Some(iface), Some(member)) = (h.interface(), h.member()) else { return };
                match (iface.as_str(), member.as_str()) {
                    (DBUS_NAME, "NameOwnerChanged") if h.sender().is_some_and(|s| s.as_str() == DBUS_NAME) => {
                        self.name_owner_changed(&msg)
                    }
                    (EVENTS_INTERFACE, EVENT_MEMBER) => self.event(&msg),
                    _ => {}
                }
            }
            Type::MethodCall => {}
        }
    }

    fn name_owner_changed(&self, msg: &Message) {
        let Ok((name, _old, new)) = msg.body().deserialize::<(String, String, String)>() else { return };
        let Some(idx) = INTERFACES.iter().position(|i| daemons::bus_name(&self.shared.instance, i) == name) else {
            return;
        };
        let owner = (!new.is_empty()).then_some(new);
        let changed = lock(&self.shared.daemons).set_owner(idx, owner.clone());
        if changed {
            match owner {
                Some(o) => {
                    tracing::info!(daemon = INTERFACES[idx].daemon, owner = %o, "daemon is on the bus");
                    self.spawn_introspection(idx, o);
                }
                // Info, not a warning: every normal end of the VM does this; a crash is reported
                // by the launcher that supervises the daemon.
                None => tracing::info!(daemon = INTERFACES[idx].daemon, "daemon left the bus"),
            }
        }
    }

    fn event(&self, msg: &Message) {
        let h = msg.header();
        let Some(sender) = h.sender() else { return };
        let Some(idx) = lock(&self.shared.daemons).by_owner(sender.as_str()) else { return };
        let iface = &INTERFACES[idx];
        if h.path().map(|p| p.as_str().to_string()) != Some(daemons::object_path(iface)) {
            return;
        }
        let (name, data, seconds, microseconds) = match msg.body().deserialize::<(String, String, i64, i64)>() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(daemon = iface.daemon, "malformed QmpEvent signal: {e}");
                return;
            }
        };
        let data = match serde_json::from_str::<Value>(&data) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                tracing::warn!(daemon = iface.daemon, event = %name, "event data is not a JSON object: {data:?}");
                Value::Object(Map::new())
            }
        };
        tracing::debug!(daemon = iface.daemon, event = %name, "event");
        let _ = self.shared.events.send(reply::event(&name, &data, seconds, microseconds).into());
    }
}
