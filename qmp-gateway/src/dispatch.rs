//! Running a command: the schema check, then the gateway's own commands, or the daemon that
//! owns it over D-Bus, or QEMU's answer for a VM without that daemon.
//!
//! * `query-commands`: the gateway's commands, what live daemons export (introspected), the
//!   answers of absent daemons' commands, and `qmp_capabilities` (listed by QEMU 1.1).
//! * `human-monitor-command`: [`crate::hmp`] over the same dispatch.
//! * `query-chardev`: vmm-core's chardevs plus the gateway's QMP sockets as `compat_monitorN`.
//! * `qom-list`/`qom-get`/`qom-set`: every daemon owns part of the tree; the first that knows
//!   the path answers, `qom-list /` merges them all.
//! * Any other command goes to its daemon's method. A configured daemon that is down answers
//!   at once with an error; every call is bounded by the call timeout.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use flotilla_schema::check::{self, QmpError};
use flotilla_schema::dbus::{self, Interface};
use flotilla_schema::table::{self, CommandSpec};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use zbus::wire::{Structure, Variant};

use crate::bus::{convert, Bus, CallError, DaemonView};
use crate::listen::Monitor;
use crate::session::Backend;
use crate::{fallback, hmp, qerror};

/// The gateway: what sessions run their commands on.
pub struct Gateway {
    bus: Bus,
    monitors: Vec<Arc<Monitor>>,
    call_timeout: Duration,
    /// The NICs, for `info network`.
    nics: Vec<crate::hmp_net::Nic>,
}

/// `qmp_capabilities` is no schema command; QEMU 1.1 listed it in `query-commands`.
const CAPABILITIES: &str = "qmp_capabilities";

impl Gateway {
    pub fn new(bus: Bus, monitors: Vec<Arc<Monitor>>, call_timeout: Duration) -> Self {
        Gateway { bus, monitors, call_timeout, nics: Vec::new() }
    }

    /// The NICs the launcher described (`--nic`).
    pub fn with_nics(mut self, nics: Vec<crate::hmp_net::Nic>) -> Self {
        self.nics = nics;
        self
    }

    /// A schema-checked command other than `human-monitor-command`.
    async fn dispatch(&self, cmd: &'static CommandSpec, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match cmd.name {
            "query-commands" => Ok(self.query_commands()),
            "query-chardev" => self.query_chardev().await,
            "qom-list" | "qom-get" | "qom-set" => self.qom(cmd, args).await,
            _ => self.single(cmd, args).await,
        }
    }

    fn query_commands(&self) -> Value {
        let mut served: BTreeSet<&str> = dbus::GATEWAY_COMMANDS.into_iter().collect();
        for (iface, configured, exported) in self.bus.exported() {
            match exported {
                Some(set) => served.extend(set),
                None if !configured => served
                    .extend(iface.commands.iter().filter(|c| fallback::without_daemon(c, &without_args()).is_some())),
                None => {} // configured, never introspected yet (still starting)
            }
        }
        let mut list: Vec<Value> =
            table::COMMANDS.iter().filter(|c| served.contains(c.name)).map(|c| json!({"name": c.name})).collect();
        list.push(json!({"name": CAPABILITIES}));
        Value::Array(list)
    }

    async fn query_chardev(&self) -> Result<Value, QmpError> {
        let cmd = table::command("query-chardev").expect("in the schema");
        let mut list = match self.single(cmd, &Map::new()).await? {
            Value::Array(l) => l,
            other => return Err(qerror::daemon_protocol("vmm-core", "query-chardev", format!("not a list: {other}"))),
        };
        list.extend(self.monitors.iter().map(|m| json!({"label": m.label(), "filename": m.filename()})));
        Ok(Value::Array(list))
    }

    /// A command with one owner.
    async fn single(&self, cmd: &'static CommandSpec, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let Some(idx) = dbus::INTERFACES.iter().position(|i| i.commands.contains(&cmd.name)) else {
            return Err(qerror::command_not_found(cmd.name));
        };
        let view = self.bus.view(cmd.name).swap_remove(idx);
        if view.owner.is_none() {
            if view.configured {
                return Err(qerror::daemon_unavailable(view.iface.daemon));
            }
            return fallback::without_daemon(cmd.name, args)
                .unwrap_or_else(|| Err(qerror::command_not_found(cmd.name)));
        }
        if view.exports == Some(false) {
            return Err(qerror::command_not_found(cmd.name));
        }
        self.call(&view, cmd, args).await
    }

    /// The QOM commands: routed by path over every daemon that has a QOM tree.
    async fn qom(&self, cmd: &'static CommandSpec, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let path = args.get("path").and_then(Value::as_str).unwrap_or_default().to_string();
        let views = self.bus.view(cmd.name);
        let down = views.iter().find(|v| v.configured && v.owner.is_none()).map(|v| v.iface.daemon);
        let live: Vec<&DaemonView> = views.iter().filter(|v| v.owner.is_some() && v.exports != Some(false)).collect();
        if cmd.name == "qom-list" && path == "/" {
            let mut merged: Vec<Value> = Vec::new();
            let mut first_err = None;
            let mut any_ok = false;
            for v in &live {
                match self.call(v, cmd, args).await {
                    Ok(Value::Array(items)) => {
                        any_ok = true;
                        for item in items {
                            if !merged.iter().any(|m| m["name"] == item["name"]) {
                                merged.push(item);
                            }
                        }
                    }
                    Ok(other) => tracing::warn!(daemon = v.iface.daemon, "qom-list / answered a non-list: {other}"),
                    Err(e) if e.class == "CommandNotFound" => {}
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if any_ok {
                return Ok(Value::Array(merged));
            }
            return Err(first_err.unwrap_or_else(|| match down {
                Some(d) => qerror::daemon_unavailable(d),
                None => qerror::command_not_found(cmd.name),
            }));
        }
        let mut not_found = None;
        for v in &live {
            match self.call(v, cmd, args).await {
                Err(e) if e.class == "DeviceNotFound" => {
                    not_found.get_or_insert(e);
                }
                // Not introspected yet, and it turns out not to have QOM: ask the next one.
                Err(e) if e.class == "CommandNotFound" => {}
                other => return other,
            }
        }
        if let Some(d) = down {
            return Err(qerror::daemon_unavailable(d));
        }
        Err(not_found.unwrap_or_else(|| qerror::device_not_found(&path, format!("Device '{path}' not found"))))
    }

    /// Calls a command's method on a daemon and converts the answer.
    async fn call(
        &self,
        view: &DaemonView,
        cmd: &'static CommandSpec,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let daemon = view.iface.daemon;
        let method = dbus::method(cmd);
        let body = convert::encode_arguments(&method, args)
            .map_err(|e| qerror::generic(format!("Cannot pass the arguments of '{}' to {daemon}: {e}", cmd.name)))?;
        let (bus_name, path, iface, t) = (&view.bus_name, &view.path, view.iface.name, self.call_timeout);
        let result = match &body {
            None => self.bus.call(bus_name, path, iface, method.name, &(), t).await,
            Some(s) => self.bus.call(bus_name, path, iface, method.name, s, t).await,
        };
        let reply = result.map_err(|e| call_error(view.iface, cmd.name, e, t))?;
        if method.out.is_none() {
            return Ok(json!({}));
        }
        let body = reply.body();
        let signature = body.signature().to_string_no_parens();
        let fields = match body.deserialize::<Structure>() {
            Ok(s) => s.into_fields(),
            Err(_) if signature.is_empty() => Vec::<Variant>::new(),
            Err(e) => return Err(qerror::daemon_protocol(daemon, cmd.name, e)),
        };
        convert::decode_result(&method, &signature, &fields).map_err(|e| qerror::daemon_protocol(daemon, cmd.name, e))
    }
}

fn without_args() -> Map<String, Value> {
    Map::new()
}

/// A failed call as the client sees it.
fn call_error(iface: &Interface, command: &str, e: CallError, timeout: Duration) -> QmpError {
    let daemon = iface.daemon;
    match e {
        CallError::Error { name, message } => {
            if let Some(q) = dbus::parse_error_message(&name, &message) {
                return q;
            }
            match name.strip_prefix("org.freedesktop.DBus.Error.").unwrap_or_default() {
                "ServiceUnknown" | "NameHasNoOwner" | "NoReply" | "Disconnected" => qerror::daemon_unavailable(daemon),
                "UnknownMethod" | "UnknownInterface" | "UnknownObject" => qerror::command_not_found(command),
                _ if name == dbus::ERROR_NAME => {
                    qerror::daemon_protocol(daemon, command, format!("unreadable error message {message:?}"))
                }
                _ => qerror::generic(format!("{daemon}: {command}: {name}: {message}")),
            }
        }
        CallError::Timeout(_) => qerror::daemon_timeout(daemon, command, timeout.as_secs_f64()),
        CallError::Closed => qerror::daemon_unavailable(daemon),
        CallError::Build(e) | CallError::Send(e) => qerror::generic(format!("{daemon}: {command}: {e}")),
    }
}

impl hmp::Qmp for Gateway {
    async fn qmp(&self, name: &str, args: Value) -> Result<Value, QmpError> {
        let args = match args {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let cmd = check::check_command(name, Some(&Value::Object(args.clone()))).map_err(|e| e.to_qmp())?;
        self.dispatch(cmd, &args).await
    }

    fn nics(&self) -> &[crate::hmp_net::Nic] {
        &self.nics
    }
}

impl Backend for Gateway {
    async fn execute(&self, name: &str, arguments: Option<Map<String, Value>>) -> Result<Value, QmpError> {
        let args = arguments.unwrap_or_default();
        let cmd = check::check_command(name, Some(&Value::Object(args.clone()))).map_err(|e| e.to_qmp())?;
        if cmd.name == "human-monitor-command" {
            let line = args.get("command-line").and_then(Value::as_str).unwrap_or_default();
            let cpu = args.get("cpu-index").and_then(Value::as_i64);
            return hmp::run(self, line, cpu).await.map(Value::String);
        }
        self.dispatch(cmd, &args).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.bus.subscribe()
    }
}
