//! The zbus server glue generated from the schema (feature `dbus`): what a daemon needs to
//! export its `org.flotilla.*1` interface without restating a command, argument or field name.
//!
//! # Shape
//!
//! For every interface of [`crate::dbus::INTERFACES`], `build.rs` generates (into
//! `OUT_DIR/dbus_server.rs`, included here):
//!
//! * a **handler trait**, `VmmCore1Handler`, `Block1Handler`, ...: one method per command of the
//!   interface, named after the command in snake case (`query_status`, `inject_nmi`), taking the
//!   command's generated argument struct (`MemsaveArgs`; nothing for commands without `'data'`)
//!   and returning `impl Future<Output = Result<R, QmpError>> + Send`, where `R` is the
//!   command's generated return type (`StatusInfo`, `Vec<CpuInfo>`) or `()` for `{}`.
//!   Implement the methods with plain `async fn`. Every method has a default answering
//!   CommandNotFound, so a daemon writes only what it implements.
//! * a **zbus interface wrapper**, `VmmCore1<H>`, generic over the handler, made with
//!   `#[zbus::interface(name = "org.flotilla.VmmCore1")]`: one method per command with the
//!   D-Bus name and typed arguments of [`crate::dbus::method`] (`Memsave(x val, x size,
//!   s filename, ax cpu_index)`). It unpacks the arguments into the argument struct (an
//!   optional argument is an array of zero or one element; an enum its wire string; a struct
//!   or `visitor` JSON text), calls the handler, and packs the result (JSON text for structs
//!   and lists of structs, scalars typed). A [`QmpError`] goes out as the D-Bus error
//!   [`crate::dbus::ERROR_NAME`] with the error object as JSON in the message.
//!
//! # Exporting only what a daemon implements
//!
//! `#[zbus::interface]` exports every method of its `impl` block, and an interface has exactly
//! one `impl` block per object path, so methods cannot be composed per command. Instead the
//! daemon wraps the generated wrapper in [`Exported`], naming the commands it implements:
//!
//! ```text
//! let iface = Exported::new(VmmCore1::new(handler), &["query-status", "stop", "cont"])?;
//! ```
//!
//! [`Exported`] implements zbus's `Interface` trait by delegating to the wrapper, except that a
//! call of a method not named answers `org.freedesktop.DBus.Error.UnknownMethod` (as if it did
//! not exist) and introspection leaves such methods out; each exported method carries the
//! annotation [`crate::dbus::COMMAND_ANNOTATION`] naming its QMP command. So what `busctl
//! introspect` shows is exactly what the daemon serves, and the gateway can build
//! `query-commands` from it. (zbus calls its `Interface` trait unstable across minor versions;
//! the workspace pins zbus 6.2.x, and the delegation is the only hand-written implementation.)
//!
//! # Events
//!
//! [`Events`] is the `org.flotilla.Events1` interface (signal `QmpEvent(s event, s data,
//! x seconds, x microseconds)`); serve it at the daemon's object path ([`serve`] does) and send
//! with [`emit_qmp_event`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::check::{ArgError, QmpError};
use crate::dbus::{Interface as DbusInterface, COMMAND_ANNOTATION, EVENTS_INTERFACE};
use crate::table;

pub use zbus;

use zbus::message::{Header, Message};
use zbus::names::{InterfaceName, MemberName};
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::{fdo, BoxDBusError, Connection, ObjectServer, OwnedVariant, Variant};

/// The D-Bus error every generated method fails with: `org.flotilla.Qmp.Error` carrying the
/// QMP error object as JSON ([`crate::dbus::error_message`]), or a zbus error.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.flotilla.Qmp")]
pub enum QmpDbusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The message is the QMP error object as JSON.
    Error(String),
}

impl From<QmpError> for QmpDbusError {
    fn from(e: QmpError) -> Self {
        QmpDbusError::Error(crate::dbus::error_message(&e))
    }
}

impl From<ArgError> for QmpDbusError {
    fn from(e: ArgError) -> Self {
        e.to_qmp().into()
    }
}

/// What a handler method answers by default: QEMU's CommandNotFound.
pub fn not_implemented(command: &str) -> QmpError {
    ArgError::CommandNotFound { name: command.to_string() }.to_qmp()
}

/// Implemented by each generated interface wrapper: which daemon interface it is.
pub trait GeneratedInterface: Interface {
    /// The daemon (`"vmm-core"`), the key of [`crate::dbus::interface`].
    const DAEMON: &'static str;

    /// The interface's description.
    fn description() -> &'static DbusInterface {
        crate::dbus::interface(Self::DAEMON).expect("generated from INTERFACES")
    }
}

/// Turning D-Bus arguments into argument-struct fields (used by the generated wrappers).
#[doc(hidden)]
pub mod unpack {
    use super::*;

    /// An optional argument: an array of zero or one element.
    pub fn optional<T, U>(
        v: Vec<T>,
        name: &str,
        convert: impl FnOnce(T) -> Result<U, ArgError>,
    ) -> Result<Option<U>, ArgError> {
        if v.len() > 1 {
            return Err(ArgError::InvalidParameterValue { name: name.to_string(), expected: "at most one value" });
        }
        v.into_iter().next().map(convert).transpose()
    }

    /// JSON text of a schema type.
    pub fn json<T: DeserializeOwned>(text: &str, name: &str, expected: &'static str) -> Result<T, ArgError> {
        serde_json::from_str(text).map_err(|_| ArgError::InvalidParameterType { name: name.to_string(), expected })
    }

    /// An enum value by its wire name.
    pub fn enumeration<E: std::str::FromStr>(value: String, name: &str) -> Result<E, ArgError> {
        value.parse().map_err(|_| ArgError::InvalidEnumValue { name: name.to_string(), value })
    }

    /// An integer carried in a wider D-Bus type (`int8` travels as `n`).
    pub fn narrow<F, T: TryFrom<F>>(v: F, name: &str, expected: &'static str) -> Result<T, ArgError> {
        T::try_from(v).map_err(|_| ArgError::InvalidParameterValue { name: name.to_string(), expected })
    }
}

/// Turning handler results into D-Bus values (used by the generated wrappers).
#[doc(hidden)]
pub mod pack {
    use super::*;

    pub fn json<T: Serialize>(value: &T) -> Result<String, QmpDbusError> {
        serde_json::to_string(value)
            .map_err(|e| QmpError::new("GenericError", format!("cannot encode the reply: {e}")).into())
    }
}

/// Error from [`Exported::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("interface {interface} has no command '{command}'")]
pub struct NotInInterface {
    pub interface: &'static str,
    pub command: String,
}

/// A generated interface wrapper exporting only the commands the daemon implements (see the
/// module docs).
pub struct Exported<I> {
    inner: I,
    /// D-Bus method name → QMP command, for the exported commands.
    methods: BTreeMap<&'static str, &'static str>,
}

impl<I: GeneratedInterface> Exported<I> {
    /// Exports `commands` (QMP wire names) of `inner`'s interface; a name the interface does
    /// not have is refused.
    pub fn new(inner: I, commands: &[&str]) -> Result<Self, NotInInterface> {
        let iface = I::description();
        let mut methods = BTreeMap::new();
        for c in commands {
            let spec = iface
                .commands
                .iter()
                .find(|n| **n == *c)
                .and_then(|n| table::command(n))
                .ok_or_else(|| NotInInterface { interface: iface.name, command: c.to_string() })?;
            methods.insert(spec.rust_name, spec.name);
        }
        Ok(Exported { inner, methods })
    }

    /// The exported commands, by QMP wire name, sorted.
    pub fn commands(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.methods.values().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn inner(&self) -> &I {
        &self.inner
    }

    /// The introspection of `inner` without the methods not exported, with a command
    /// annotation on those that are.
    fn filter_introspection(&self, xml: &str) -> String {
        let mut out = String::with_capacity(xml.len());
        let mut skipping = false;
        let mut current: Option<(&'static str, usize)> = None;
        for line in xml.lines() {
            let t = line.trim_start();
            let indent = line.len() - t.len();
            if let Some(rest) = t.strip_prefix("<method name=\"") {
                let name = rest.split('"').next().unwrap_or_default();
                match self.methods.get(name) {
                    Some(cmd) => current = Some((cmd, indent)),
                    None => skipping = true,
                }
            }
            if t.starts_with("</method>") {
                if skipping {
                    skipping = false;
                    continue;
                }
                if let Some((cmd, indent)) = current.take() {
                    let _ = writeln!(
                        out,
                        "{:indent$}<annotation name=\"{COMMAND_ANNOTATION}\" value=\"{cmd}\"/>",
                        "",
                        indent = indent + 2
                    );
                }
            }
            if !skipping {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

#[zbus::export::async_trait::async_trait]
impl<I: GeneratedInterface> Interface for Exported<I> {
    fn name() -> InterfaceName<'static> {
        I::name()
    }

    fn spawn_tasks_for_methods(&self) -> bool {
        self.inner.spawn_tasks_for_methods()
    }

    async fn get(
        &self,
        property_name: &str,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<Result<OwnedVariant, BoxDBusError>> {
        self.inner.get(property_name, server, connection, header, emitter).await
    }

    async fn get_all(
        &self,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> fdo::Result<std::collections::HashMap<String, OwnedVariant>> {
        self.inner.get_all(server, connection, header, emitter).await
    }

    fn set<'call>(
        &'call self,
        property_name: &'call str,
        value: &'call Variant<'_>,
        server: &'call ObjectServer,
        connection: &'call Connection,
        header: Option<&'call Header<'_>>,
        emitter: &'call SignalEmitter<'_>,
    ) -> DispatchResult<'call> {
        self.inner.set(property_name, value, server, connection, header, emitter)
    }

    async fn set_mut(
        &mut self,
        property_name: &str,
        value: &Variant<'_>,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<Result<(), BoxDBusError>> {
        self.inner.set_mut(property_name, value, server, connection, header, emitter).await
    }

    fn call<'call>(
        &'call self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult<'call> {
        if !self.methods.contains_key(name.as_str()) {
            return DispatchResult::NotFound;
        }
        self.inner.call(server, connection, msg, name)
    }

    fn call_mut<'call>(
        &'call mut self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult<'call> {
        if !self.methods.contains_key(name.as_str()) {
            return DispatchResult::NotFound;
        }
        self.inner.call_mut(server, connection, msg, name)
    }

    fn introspect_to_writer(&self, writer: &mut dyn std::fmt::Write, level: usize) {
        let mut xml = String::new();
        self.inner.introspect_to_writer(&mut xml, level);
        let _ = writer.write_str(&self.filter_introspection(&xml));
    }
}

/// `org.flotilla.Events1`: the QMP events a daemon emits, as the signal
/// `QmpEvent(s event, s data, x seconds, x microseconds)` (`data` a JSON object text).
pub struct Events;

#[zbus::interface(name = "org.flotilla.Events1")]
impl Events {
    /// A QMP event: its name (`STOP`), its `data` as JSON object text (`{}` when it has none),
    /// and when it happened (seconds and microseconds since the epoch).
    #[zbus(signal, name = "QmpEvent")]
    pub async fn qmp_event(
        emitter: &SignalEmitter<'_>,
        event: &str,
        data: &str,
        seconds: i64,
        microseconds: i64,
    ) -> zbus::Result<()>;
}

const _: () = assert!(matches!(EVENTS_INTERFACE.as_bytes(), b"org.flotilla.Events1"));

/// A timestamp as QMP's `{seconds, microseconds}`.
pub fn qmp_timestamp(t: SystemTime) -> (i64, i64) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, i64::from(d.subsec_micros()))
}

/// Emits `QmpEvent` from the object at `path`.
pub async fn emit_qmp_event(
    conn: &Connection,
    path: &str,
    event: &str,
    data: &serde_json::Value,
    at: SystemTime,
) -> zbus::Result<()> {
    let emitter = SignalEmitter::new(conn, path)?;
    let (seconds, microseconds) = qmp_timestamp(at);
    let data = if data.is_null() { "{}".to_string() } else { data.to_string() };
    Events::qmp_event(&emitter, event, &data, seconds, microseconds).await
}

/// Connects to the bus at `address`, serves `iface` and [`Events`] at `path`, then takes the
/// well-known name `bus_name` (objects first, so whoever sees the name finds them).
pub async fn serve<I: GeneratedInterface>(
    address: &str,
    bus_name: &str,
    path: &str,
    iface: Exported<I>,
) -> zbus::Result<Connection> {
    zbus::connection::Builder::address(address)
        .serve_at(path, iface)
        .serve_at(path, Events)
        .name(bus_name)
        .build()
        .await
}

/// The generated handler traits and wrappers.
#[allow(clippy::all, unused_imports, unused_variables)]
mod generated {
    use super::*;
    include!(concat!(env!("OUT_DIR"), "/dbus_server.rs"));
}

pub use generated::*;
