//! The D-Bus face of the schema: which daemon exports which command, as which method, with
//! which argument signatures; and the introspection XML of each daemon's interface.
//!
//! This module is data, not zbus code: the schema crate stays free of zbus so that it builds in
//! seconds and the gateway, the daemons and the tests all read the same description. A daemon
//! implements its interface with `#[zbus::interface(name = "...")]`, one method per
//! [`Method`], named and typed as here (zbus turns `fn query_status` into `QueryStatus` and
//! names arguments after the Rust parameters, which are the [`Arg::name`]s); its test compares
//! what zbus introspects with [`interface_xml`] through [`methods_in_xml`].
//!
//! # Mapping QAPI types to D-Bus signatures
//!
//! | QAPI | D-Bus | notes |
//! |---|---|---|
//! | `str` | `s` | |
//! | `int`, `int64` | `x` | |
//! | `int8`, `int16` / `int32` | `n` / `i` | D-Bus has no signed byte |
//! | `uint8` / `uint16` / `uint32` / `uint64` | `y` / `q` / `u` / `t` | |
//! | `number` | `d` | |
//! | `bool` | `b` | |
//! | an enum | `s` | the value as the wire spells it |
//! | a list of the above | `a` + element | |
//! | a struct, a list of structs, `visitor` | `s` | JSON text of the schema type |
//! | an optional argument | `a` + its signature | zero or one element |
//!
//! Every argument of the seed's commands is a scalar or `visitor`, so every method has real,
//! typed D-Bus arguments (`Memsave(x val, x size, s filename, ax cpu_index)`). Struct-shaped
//! values (all the `query-*` replies) travel as the JSON text of their generated serde type:
//! `BlockStats` is recursive (`parent`), which no D-Bus signature can express; optional members
//! and exact wire names (`UUID`, `io-status`) survive unchanged; and the gateway answers QMP in
//! JSON anyway, so `a{sv}` would mean converting twice, with zvariant derives in this crate.
//! D-Bus has no optional values; an optional argument is an array of zero or one element (the
//! "maybe" idiom), which keeps its name and type visible in `busctl introspect`.
//!
//! # Errors
//!
//! A method that fails answers the D-Bus error [`ERROR_NAME`] whose message is the JSON text of
//! the QMP error object (`{"class": ..., "desc": ..., "data": ...}`), which the gateway passes
//! on unchanged: see [`error_message`] and [`parse_error_message`].
//!
//! # Implementing an interface with zbus 6
//!
//! Checked with zbus 6.2.1 (outside this crate): this introspects exactly as
//! [`introspection_xml`] says, and the error reaches a caller as `org.flotilla.Qmp.Error` with
//! the JSON message.
//!
//! ```text
//! #[derive(Debug, zbus::DBusError)]
//! #[zbus(prefix = "org.flotilla.Qmp")]
//! enum QmpDbusError { #[zbus(error)] ZBus(zbus::Error), Error(String) }
//!
//! #[zbus::interface(name = "org.flotilla.VmmCore1")]
//! impl VmmCoreBus {
//!     async fn memsave(&self, val: i64, size: i64, filename: String, cpu_index: Vec<i64>)
//!         -> Result<(), QmpDbusError> { ... }
//!     #[zbus(out_args("result"))]
//!     async fn query_status(&self) -> Result<String, QmpDbusError> {
//!         Ok(serde_json::to_string(&StatusInfo { .. }).unwrap())
//!     }
//! }
//! // on failure: Err(QmpDbusError::Error(dbus::error_message(&qmp_error)))
//! ```

use std::fmt::Write as _;

use crate::check::QmpError;
use crate::parse::Builtin;
use crate::table::{self, CommandSpec, Ty};

/// The D-Bus error name of every QMP error a daemon returns; the message carries the error.
pub const ERROR_NAME: &str = "org.flotilla.Qmp.Error";

/// The annotation on each method naming the QMP command it implements.
pub const COMMAND_ANNOTATION: &str = "org.flotilla.Qmp.Command";

/// The annotation on a JSON-carrying argument or result naming its schema type.
pub const JSON_TYPE_ANNOTATION: &str = "org.flotilla.Qmp.JsonType";

include!("dbus_interfaces.rs");

/// The interface every daemon serves its QMP events on, at its object path.
pub const EVENTS_INTERFACE: &str = "org.flotilla.Events1";

/// The signal carrying one QMP event: `QmpEvent(s event, s data, x seconds, x microseconds)`.
pub const EVENT_SIGNAL: &str = "QmpEvent";

/// A VM instance name as it appears in bus names: every character outside `[A-Za-z0-9_]`
/// becomes `_`, and a leading digit (or an empty name) gets a `_` prefix.
pub fn bus_instance(instance: &str) -> String {
    let mut s: String = instance.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

/// The well-known bus name of a daemon of an instance: `org.flotilla.<instance>.<Daemon>`,
/// `daemon` being the object name (`VmmCore`, `Block`, `Gateway`...).
pub fn bus_name(instance: &str, daemon: &str) -> String {
    format!("org.flotilla.{}.{daemon}", bus_instance(instance))
}

/// The object path of a daemon: `/org/flotilla/<Daemon>`.
pub fn object_path(daemon: &str) -> String {
    format!("/org/flotilla/{daemon}")
}

impl Interface {
    /// The object name of the daemon, from its interface name without the version:
    /// `org.flotilla.VmmCore1` → `VmmCore`.
    pub fn object_name(&self) -> &'static str {
        self.name.rsplit('.').next().unwrap_or(self.name).trim_end_matches(|c: char| c.is_ascii_digit())
    }
}

/// The interface of a daemon, by daemon name (`"vmm-core"`).
pub fn interface(daemon: &str) -> Option<&'static Interface> {
    INTERFACES.iter().find(|i| i.daemon == daemon)
}

/// The interfaces that implement a command (several for the QOM commands, none for the
/// gateway's own).
pub fn owners(command: &str) -> impl Iterator<Item = &'static Interface> + '_ {
    INTERFACES.iter().filter(move |i| i.commands.contains(&command))
}

/// A method argument or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    /// The argument's name: the QAPI member in snake case (`cpu-index` → `cpu_index`); `result`
    /// for a method's result.
    pub name: String,
    /// The QAPI member name (`cpu-index`), empty for a result.
    pub qapi_name: &'static str,
    /// The D-Bus type signature.
    pub signature: String,
    /// `Some(type)` when the value is the JSON text of that schema type.
    pub json_type: Option<String>,
    /// An optional QAPI argument: an array of zero or one element.
    pub optional: bool,
}

/// A command as a D-Bus method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    /// The D-Bus method name: the command in CamelCase (`inject-nmi` → `InjectNmi`).
    pub name: &'static str,
    pub command: &'static CommandSpec,
    pub in_args: Vec<Arg>,
    /// `None` when the command returns nothing.
    pub out: Option<Arg>,
}

impl Method {
    /// The in-signature: the in-args' signatures concatenated.
    pub fn in_signature(&self) -> String {
        self.in_args.iter().map(|a| a.signature.as_str()).collect()
    }

    /// The out-signature (`""` for a command that returns nothing).
    pub fn out_signature(&self) -> &str {
        self.out.as_ref().map_or("", |a| a.signature.as_str())
    }
}

/// The D-Bus signature of a QAPI type, and whether it is carried as JSON text.
pub fn signature(ty: &Ty) -> (String, bool) {
    match ty {
        Ty::Builtin(b) => match b {
            Builtin::Str => ("s".into(), false),
            Builtin::Int | Builtin::Int64 => ("x".into(), false),
            Builtin::Int8 | Builtin::Int16 => ("n".into(), false),
            Builtin::Int32 => ("i".into(), false),
            Builtin::Uint8 => ("y".into(), false),
            Builtin::Uint16 => ("q".into(), false),
            Builtin::Uint32 => ("u".into(), false),
            Builtin::Uint64 => ("t".into(), false),
            Builtin::Number => ("d".into(), false),
            Builtin::Bool => ("b".into(), false),
            Builtin::Any => ("s".into(), true),
        },
        Ty::Enum(_) => ("s".into(), false),
        Ty::Struct(_) => ("s".into(), true),
        Ty::List(element) => match signature(element) {
            (_, true) => ("s".into(), true),
            (sig, false) => (format!("a{sig}"), false),
        },
    }
}

/// A command as a D-Bus method.
pub fn method(cmd: &'static CommandSpec) -> Method {
    let in_args = cmd
        .members
        .iter()
        .map(|m| {
            let (sig, json) = signature(&m.ty);
            Arg {
                name: m.rust_name.to_string(),
                qapi_name: m.name,
                signature: if m.optional { format!("a{sig}") } else { sig },
                json_type: json.then(|| m.ty.schema_name()),
                optional: m.optional,
            }
        })
        .collect();
    let out = cmd.returns.map(|ty| {
        let (signature, json) = signature(&ty);
        Arg {
            name: "result".to_string(),
            qapi_name: "",
            signature,
            json_type: json.then(|| ty.schema_name()),
            optional: false,
        }
    });
    Method { name: cmd.rust_name, command: cmd, in_args, out }
}

/// The methods of an interface, in the order of its command list.
pub fn methods(iface: &Interface) -> Vec<Method> {
    iface.commands.iter().map(|c| method(table::command(c).expect("interfaces name schema commands"))).collect()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The `<interface>` element for one daemon, indented for a `<node>`.
pub fn interface_xml(iface: &Interface) -> String {
    let mut x = String::new();
    let _ = writeln!(x, "  <interface name=\"{}\">", iface.name);
    for m in methods(iface) {
        let _ = writeln!(x, "    <method name=\"{}\">", m.name);
        let args = m.in_args.iter().map(|a| (a, "in")).chain(m.out.iter().map(|a| (a, "out")));
        for (a, dir) in args {
            match &a.json_type {
                None => {
                    let _ =
                        writeln!(x, "      <arg name=\"{}\" type=\"{}\" direction=\"{dir}\"/>", a.name, a.signature);
                }
                Some(t) => {
                    let _ = writeln!(x, "      <arg name=\"{}\" type=\"{}\" direction=\"{dir}\">", a.name, a.signature);
                    let _ = writeln!(
                        x,
                        "        <annotation name=\"{JSON_TYPE_ANNOTATION}\" value=\"{}\"/>",
                        xml_escape(t)
                    );
                    let _ = writeln!(x, "      </arg>");
                }
            }
        }
        let _ =
            writeln!(x, "      <annotation name=\"{COMMAND_ANNOTATION}\" value=\"{}\"/>", xml_escape(m.command.name));
        let _ = writeln!(x, "    </method>");
    }
    let _ = writeln!(x, "  </interface>");
    x
}

/// A complete introspection document for one daemon's object.
pub fn introspection_xml(iface: &Interface) -> String {
    let mut x = String::from(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
    );
    x.push_str(&interface_xml(iface));
    x.push_str("</node>\n");
    x
}

/// A method read back from introspection XML: its name, and per argument (name, signature,
/// direction).
pub type XmlMethod = (String, Vec<(String, String, String)>);

/// The methods of `interface` in an introspection document, each as
/// `(name, [(arg name or "", signature, direction)])`, sorted by method name, ignoring
/// annotations and out-argument names (zbus leaves those unnamed). For comparing what a daemon's zbus object introspects
/// with [`methods`]: `methods_in_xml(&zbus_xml, name) == methods_in_xml(&introspection_xml(i), name)`.
pub fn methods_in_xml(xml: &str, interface: &str) -> Vec<XmlMethod> {
    let mut out = Vec::new();
    let mut in_iface = false;
    for tag in xml.split('<').skip(1) {
        let tag = tag.split('>').next().unwrap_or_default();
        let attr = |name: &str| -> Option<String> {
            let key = format!("{name}=\"");
            let start = tag.find(&key)? + key.len();
            let end = tag[start..].find('"')? + start;
            Some(tag[start..end].to_string())
        };
        if tag.starts_with("interface ") {
            in_iface = attr("name").as_deref() == Some(interface);
        } else if tag.starts_with("/interface") {
            in_iface = false;
        } else if in_iface && tag.starts_with("method ") {
            out.push((attr("name").unwrap_or_default(), Vec::new()));
        } else if in_iface && tag.starts_with("arg ") {
            if let Some((_, args)) = out.last_mut() {
                let dir = attr("direction").unwrap_or_else(|| "in".to_string());
                let name = if dir == "out" { String::new() } else { attr("name").unwrap_or_default() };
                args.push((name, attr("type").unwrap_or_default(), dir));
            }
        }
    }
    out.sort();
    out
}

/// The message of a [`ERROR_NAME`] D-Bus error carrying `err`.
pub fn error_message(err: &QmpError) -> String {
    serde_json::to_string(err).expect("a QmpError serializes")
}

/// The QMP error carried by a D-Bus error, if it is one of ours.
pub fn parse_error_message(name: &str, message: &str) -> Option<QmpError> {
    if name != ERROR_NAME {
        return None;
    }
    serde_json::from_str(message).ok()
}
