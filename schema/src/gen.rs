//! The build-time generator: from a parsed [`Schema`] to Rust source text.
//!
//! Used only by `build.rs` (which includes this file and `parse.rs` with `#[path]`). It writes
//! three files, each `include!`d into one module of the library:
//!
//! * `types.rs` (module `types`): a struct per `'type'`, a struct per nested anonymous struct
//!   (named parent + member, e.g. `PciDeviceInfoClassInfo`), an enum per `'enum'`.
//! * `commands.rs` (module `commands`): an argument struct per command with `'data'`
//!   (`MemsaveArgs`), and a unit type per command implementing `crate::commands::Command`.
//! * `table.rs` (module `table`): the schema as static data (`STRUCTS`, `ENUMS`, `COMMANDS`) for
//!   the argument checker, `query-commands` and the D-Bus descriptions.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use super::parse::{Builtin, Member, Schema, TypeExpr};

/// The generated source files.
pub struct Generated {
    pub types: String,
    pub commands: String,
    pub table: String,
}

/// `query-status` → `QueryStatus`, `class_info` → `ClassInfo`, `internal-error` → `InternalError`.
pub fn camel_case(name: &str) -> String {
    let mut out = String::new();
    for part in name.split(['-', '_']).filter(|p| !p.is_empty()) {
        let mut chars = part.chars();
        if let Some(c) = chars.next() {
            out.push(c.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, 'V');
    }
    out
}

/// `thread_id` → `thread_id`, `io-status` → `io_status`, `UUID` → `uuid`, `type` → `type_`.
pub fn snake_case(name: &str) -> String {
    let mut out: String = name.chars().map(|c| if c == '-' { '_' } else { c.to_ascii_lowercase() }).collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    if RUST_KEYWORDS.contains(&out.as_str()) {
        out.push('_');
    }
    out
}

const RUST_KEYWORDS: &[&str] = &[
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate", "do", "dyn", "else",
    "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "macro", "match", "mod",
    "move", "mut", "override", "priv", "pub", "ref", "return", "self", "static", "struct", "super", "trait", "true",
    "try", "type", "typeof", "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// The Rust field name of `m` among `members`: snake case, and where two wire names fold to one
/// (CpuInfo's `pc` and `PC`), the upper-case spelling gets `_upper`.
fn field_name(members: &[Member], m: &Member) -> String {
    let field = snake_case(&m.name);
    let clashes = members.iter().any(|o| o.name != m.name && snake_case(&o.name) == field);
    if clashes && m.name.chars().any(|c| c.is_ascii_uppercase()) {
        format!("{}_upper", field.trim_end_matches('_'))
    } else {
        field
    }
}

/// A member type after resolution: every name is known to be a builtin, struct or enum.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    Builtin(Builtin),
    Struct(String),
    Enum(String),
    List(Box<Ty>),
}

#[derive(Debug)]
struct Field {
    wire: String,
    field: String,
    optional: bool,
    ty: Ty,
    boxed: bool,
}

#[derive(Debug)]
struct Struct {
    name: String,
    /// What the struct is, for its doc comment when the schema has none of its own.
    origin: String,
    doc: Option<String>,
    fields: Vec<Field>,
}

struct Gen<'a> {
    schema: &'a Schema,
    structs: Vec<Struct>,
    /// Every Rust type name taken so far, to catch clashes of generated names.
    taken: HashSet<String>,
}

/// Generates the three files, or says why the schema cannot be turned into Rust.
pub fn generate(schema: &Schema) -> Result<Generated, String> {
    let mut g = Gen { schema, structs: Vec::new(), taken: HashSet::new() };
    for e in schema.enums() {
        g.take(&e.name, "enum")?;
    }
    for s in schema.structs() {
        g.take(&s.name, "type")?;
    }
    for s in schema.structs() {
        let origin = format!("The schema's `{}` type.", s.name);
        g.add_struct(&s.name, origin, s.doc.clone(), &s.members)?;
    }
    let schema_structs = g.structs.len();
    let mut args_struct: HashMap<String, String> = HashMap::new();
    for c in schema.commands() {
        if let Some(data) = &c.data {
            let name = format!("{}Args", camel_case(&c.name));
            g.take(&name, "command arguments")?;
            let origin = format!("The arguments of `{}`.", c.name);
            g.add_struct(&name, origin, None, data)?;
            args_struct.insert(c.name.clone(), name);
        }
    }
    g.box_cycles();
    let default_ok = g.default_able();

    let mut types = header("types");
    for e in schema.enums() {
        types.push('\n');
        emit_enum(&mut types, &e.name, e.doc.as_deref(), &e.values);
    }
    let mut commands = header("commands");
    for (i, s) in g.structs.iter().enumerate() {
        let out = if i < schema_structs { &mut types } else { &mut commands };
        out.push('\n');
        emit_struct(out, s, default_ok.contains(&s.name));
    }
    for c in schema.commands() {
        let rust = camel_case(&c.name);
        let args = match args_struct.get(&c.name) {
            Some(a) => a.clone(),
            None => "crate::types::Empty".to_string(),
        };
        let returns = match &c.returns {
            Some(r) => rust_type(&g.resolve(r)?),
            None => "crate::types::Empty".to_string(),
        };
        commands.push('\n');
        let _ = writeln!(commands, "/// The `{}` command.", c.name);
        if let Some(doc) = &c.doc {
            doc_block(&mut commands, "", doc);
        }
        let _ = writeln!(commands, "#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]");
        let _ = writeln!(commands, "pub struct {rust};\n");
        let _ = writeln!(commands, "impl Command for {rust} {{");
        let _ = writeln!(commands, "    const NAME: &'static str = {:?};", c.name);
        let _ = writeln!(commands, "    type Args = {args};");
        let _ = writeln!(commands, "    type Returns = {returns};");
        let _ = writeln!(commands, "}}");
    }

    let table = g.table(&args_struct)?;
    Ok(Generated { types, commands, table })
}

fn header(module: &str) -> String {
    format!(
        "// Generated by schema/build.rs from qapi-schema.json for the `{module}` module. \
         Do not edit.\n"
    )
}

impl<'a> Gen<'a> {
    fn take(&mut self, name: &str, what: &str) -> Result<(), String> {
        if !self.taken.insert(name.to_string()) {
            return Err(format!("the Rust name `{name}` (for a {what}) is already used by another definition"));
        }
        Ok(())
    }

    fn resolve(&self, ty: &TypeExpr) -> Result<Ty, String> {
        match ty {
            TypeExpr::Named { name, pos } => {
                if let Some(b) = Builtin::from_name(name) {
                    Ok(Ty::Builtin(b))
                } else if self.schema.find_struct(name).is_some() {
                    Ok(Ty::Struct(name.clone()))
                } else if self.schema.find_enum(name).is_some() {
                    Ok(Ty::Enum(name.clone()))
                } else {
                    Err(format!("{pos}: unknown type '{name}'"))
                }
            }
            TypeExpr::List { element, .. } => Ok(Ty::List(Box::new(self.resolve(element)?))),
            TypeExpr::Anonymous { pos, .. } => {
                Err(format!("{pos}: an anonymous struct is only allowed as a member's type"))
            }
        }
    }

    /// Adds `name` with `members`; nested anonymous structs become structs of their own, named
    /// after the parent and the member, placed right after the parent.
    fn add_struct(
        &mut self,
        name: &str,
        origin: String,
        doc: Option<String>,
        members: &[Member],
    ) -> Result<(), String> {
        let index = self.structs.len();
        self.structs.push(Struct { name: name.to_string(), origin, doc, fields: Vec::new() });
        let mut fields = Vec::new();
        let mut rust_names: HashSet<String> = HashSet::new();
        for m in members {
            let ty = match &m.ty {
                TypeExpr::Anonymous { members: inner, .. } => {
                    let nested = format!("{name}{}", camel_case(&m.name));
                    self.take(&nested, "nested struct")?;
                    let origin = format!("The `{}` member of `{name}`.", m.name);
                    self.add_struct(&nested, origin, None, inner)?;
                    Ty::Struct(nested)
                }
                other => self.resolve(other)?,
            };
            let field = field_name(members, m);
            if !rust_names.insert(field.clone()) {
                return Err(format!("{}: `{name}` has two members named `{field}` in Rust", m.pos));
            }
            fields.push(Field { wire: m.name.clone(), field, optional: m.optional, ty, boxed: false });
        }
        self.structs[index].fields = fields;
        Ok(())
    }

    fn find(&self, name: &str) -> Option<&Struct> {
        self.structs.iter().find(|s| s.name == name)
    }

    /// Boxes a struct-typed member whose type contains, directly, the struct itself (BlockStats'
    /// `parent`). Members inside a `Vec` need no box.
    fn box_cycles(&mut self) {
        fn reaches(g: &Gen<'_>, from: &str, target: &str, seen: &mut HashSet<String>) -> bool {
            if from == target {
                return true;
            }
            if !seen.insert(from.to_string()) {
                return false;
            }
            let Some(s) = g.find(from) else { return false };
            s.fields.iter().any(|f| match &f.ty {
                Ty::Struct(n) if !f.boxed => reaches(g, n, target, seen),
                _ => false,
            })
        }
        for i in 0..self.structs.len() {
            for j in 0..self.structs[i].fields.len() {
                let target = self.structs[i].name.clone();
                if let Ty::Struct(n) = &self.structs[i].fields[j].ty {
                    let n = n.clone();
                    if reaches(self, &n, &target, &mut HashSet::new()) {
                        self.structs[i].fields[j].boxed = true;
                    }
                }
            }
        }
    }

    /// The structs for which `#[derive(Default)]` works: no required enum member, directly or
    /// through a required struct member.
    fn default_able(&self) -> HashSet<String> {
        let mut ok: HashSet<String> = self.structs.iter().map(|s| s.name.clone()).collect();
        loop {
            let before = ok.len();
            for s in &self.structs {
                let bad = s.fields.iter().any(|f| {
                    !f.optional
                        && match &f.ty {
                            Ty::Enum(_) => true,
                            Ty::Struct(n) => !ok.contains(n),
                            _ => false,
                        }
                });
                if bad {
                    ok.remove(&s.name);
                }
            }
            if ok.len() == before {
                return ok;
            }
        }
    }

    fn table(&self, args_struct: &HashMap<String, String>) -> Result<String, String> {
        let mut t = header("table");
        t.push('\n');
        t.push_str("/// Every struct: the schema's `'type'`s, their nested anonymous structs, and the\n");
        t.push_str("/// commands' argument structs, in that order.\n");
        t.push_str("pub static STRUCTS: &[StructSpec] = &[\n");
        for s in &self.structs {
            let kind = if self.schema.find_struct(&s.name).is_some() {
                "StructKind::Schema"
            } else if args_struct.values().any(|a| *a == s.name) {
                "StructKind::Arguments"
            } else {
                "StructKind::Nested"
            };
            let _ = writeln!(t, "    StructSpec {{");
            let _ = writeln!(t, "        name: {:?},", s.name);
            let _ = writeln!(t, "        kind: {kind},");
            emit_members(&mut t, "        ", &s.fields);
            let _ = writeln!(t, "    }},");
        }
        t.push_str("];\n\n");
        t.push_str("/// Every enum of the schema.\n");
        t.push_str("pub static ENUMS: &[EnumSpec] = &[\n");
        for e in self.schema.enums() {
            let _ = writeln!(t, "    EnumSpec {{");
            let _ = writeln!(t, "        name: {:?},", e.name);
            let _ = writeln!(t, "        values: &[");
            for (v, _) in &e.values {
                let _ = writeln!(t, "            {v:?},");
            }
            let _ = writeln!(t, "        ],");
            let _ = writeln!(t, "    }},");
        }
        t.push_str("];\n\n");
        t.push_str("/// Every command of the schema, in the schema's order.\n");
        t.push_str("pub static COMMANDS: &[CommandSpec] = &[\n");
        for c in self.schema.commands() {
            let _ = writeln!(t, "    CommandSpec {{");
            let _ = writeln!(t, "        name: {:?},", c.name);
            let _ = writeln!(t, "        rust_name: {:?},", camel_case(&c.name));
            match args_struct.get(&c.name) {
                Some(a) => {
                    let s = self.find(a).expect("argument struct was added");
                    let _ = writeln!(t, "        args_struct: Some({a:?}),");
                    emit_members(&mut t, "        ", &s.fields);
                }
                None => {
                    let _ = writeln!(t, "        args_struct: None,");
                    let _ = writeln!(t, "        members: &[],");
                }
            }
            match &c.returns {
                Some(r) => {
                    let _ = writeln!(t, "        returns: Some({}),", ty_expr(&self.resolve(r)?));
                }
                None => {
                    let _ = writeln!(t, "        returns: None,");
                }
            }
            let _ = writeln!(t, "        gen: {},", c.gen);
            let _ = writeln!(t, "    }},");
        }
        t.push_str("];\n");
        Ok(t)
    }
}

fn emit_members(t: &mut String, indent: &str, fields: &[Field]) {
    if fields.is_empty() {
        let _ = writeln!(t, "{indent}members: &[],");
        return;
    }
    let _ = writeln!(t, "{indent}members: &[");
    for f in fields {
        let _ = writeln!(
            t,
            "{indent}    Member {{ name: {:?}, rust_name: {:?}, ty: {}, optional: {} }},",
            f.wire,
            f.field,
            ty_expr(&f.ty),
            f.optional
        );
    }
    let _ = writeln!(t, "{indent}],");
}

/// The `table::Ty` constant expression for a type.
fn ty_expr(ty: &Ty) -> String {
    match ty {
        Ty::Builtin(b) => format!("Ty::Builtin(Builtin::{b:?})"),
        Ty::Struct(n) => format!("Ty::Struct({n:?})"),
        Ty::Enum(n) => format!("Ty::Enum({n:?})"),
        Ty::List(e) => format!("Ty::List(&{})", ty_expr(e)),
    }
}

fn rust_type(ty: &Ty) -> String {
    match ty {
        Ty::Builtin(b) => match b {
            Builtin::Str => "String",
            Builtin::Int | Builtin::Int64 => "i64",
            Builtin::Int8 => "i8",
            Builtin::Int16 => "i16",
            Builtin::Int32 => "i32",
            Builtin::Uint8 => "u8",
            Builtin::Uint16 => "u16",
            Builtin::Uint32 => "u32",
            Builtin::Uint64 => "u64",
            Builtin::Number => "f64",
            Builtin::Bool => "bool",
            Builtin::Any => "serde_json::Value",
        }
        .to_string(),
        Ty::Struct(n) | Ty::Enum(n) => n.clone(),
        Ty::List(e) => format!("Vec<{}>", rust_type(e)),
    }
}

/// Writes a schema doc block as a rustdoc `text` block, so that its `@names`, `<subtype>`s and
/// quotes are shown as written.
fn doc_block(out: &mut String, indent: &str, doc: &str) {
    let _ = writeln!(out, "{indent}///");
    let _ = writeln!(out, "{indent}/// ```text");
    for line in doc.lines() {
        if line.is_empty() {
            let _ = writeln!(out, "{indent}///");
        } else {
            let _ = writeln!(out, "{indent}/// {line}");
        }
    }
    let _ = writeln!(out, "{indent}/// ```");
}

fn emit_struct(out: &mut String, s: &Struct, default: bool) {
    let _ = writeln!(out, "/// {}", s.origin);
    if let Some(doc) = &s.doc {
        doc_block(out, "", doc);
    }
    let derives = if default {
        "Debug, Clone, PartialEq, Default, Serialize, Deserialize"
    } else {
        "Debug, Clone, PartialEq, Serialize, Deserialize"
    };
    let _ = writeln!(out, "#[derive({derives})]");
    let _ = writeln!(out, "pub struct {} {{", s.name);
    for f in &s.fields {
        let mut ty = rust_type(&f.ty);
        if f.boxed {
            ty = format!("Box<{ty}>");
        }
        let mut attrs: Vec<String> = Vec::new();
        if f.field != f.wire {
            attrs.push(format!("rename = {:?}", f.wire));
        }
        if f.optional {
            ty = format!("Option<{ty}>");
            attrs.push("default".to_string());
            attrs.push("skip_serializing_if = \"Option::is_none\"".to_string());
        }
        // Wrapped as rustfmt would (its `attr_fn_like_width` is 70).
        let line = format!("    #[serde({})]", attrs.join(", "));
        if line.len() > 70 + "    #[serde()]".len() {
            let _ = writeln!(out, "    #[serde(\n        {}\n    )]", attrs.join(",\n        "));
        } else if !attrs.is_empty() {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out, "    pub {}: {ty},", f.field);
    }
    let _ = writeln!(out, "}}");
}

fn emit_enum(out: &mut String, name: &str, doc: Option<&str>, values: &[(String, super::parse::Pos)]) {
    let _ = writeln!(out, "/// The schema's `{name}` enum.");
    if let Some(doc) = doc {
        doc_block(out, "", doc);
    }
    let _ =
        writeln!(out, "#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]");
    let _ = writeln!(out, "pub enum {name} {{");
    for (v, _) in values {
        let _ = writeln!(out, "    #[serde(rename = {v:?})]");
        let _ = writeln!(out, "    {},", camel_case(v));
    }
    let _ = writeln!(out, "}}\n");
    let _ = writeln!(out, "impl {name} {{");
    let _ = writeln!(out, "    /// Every value, in the schema's order.");
    let _ = writeln!(out, "    pub const ALL: [{name}; {}] = [", values.len());
    for (v, _) in values {
        let _ = writeln!(out, "        {name}::{},", camel_case(v));
    }
    let _ = writeln!(out, "    ];\n");
    let _ = writeln!(out, "    /// The value as the wire spells it.");
    let _ = writeln!(out, "    pub fn as_str(self) -> &'static str {{");
    let _ = writeln!(out, "        match self {{");
    for (v, _) in values {
        let _ = writeln!(out, "            {name}::{} => {v:?},", camel_case(v));
    }
    let _ = writeln!(out, "        }}");
    let _ = writeln!(out, "    }}");
    let _ = writeln!(out, "}}\n");
    let _ = writeln!(out, "impl std::fmt::Display for {name} {{");
    let _ = writeln!(out, "    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {{");
    let _ = writeln!(out, "        f.write_str(self.as_str())");
    let _ = writeln!(out, "    }}");
    let _ = writeln!(out, "}}\n");
    let _ = writeln!(out, "impl std::str::FromStr for {name} {{");
    let _ = writeln!(out, "    type Err = ();\n");
    let _ = writeln!(out, "    fn from_str(s: &str) -> Result<Self, ()> {{");
    let _ = writeln!(out, "        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or(())");
    let _ = writeln!(out, "    }}");
    let _ = writeln!(out, "}}");
}

// ---------------------------------------------------------------------------------------------
// The zbus server glue (feature `dbus`)
// ---------------------------------------------------------------------------------------------

/// One D-Bus interface to generate glue for (from `dbus_interfaces.rs`).
pub struct DbusInterface<'a> {
    /// `org.flotilla.VmmCore1`
    pub name: &'a str,
    /// `vmm-core`
    pub daemon: &'a str,
    pub commands: &'a [&'a str],
}

/// `org.flotilla.VmmCore1` → `VmmCore1`: the stem of the generated handler trait and wrapper.
pub fn dbus_stem(interface: &str) -> String {
    interface.rsplit('.').next().unwrap_or(interface).to_string()
}

/// The Rust type a D-Bus argument or result of QAPI type `ty` has in a zbus method, per the
/// mapping of `dbus.rs` (struct-shaped values are JSON text, enums their wire string).
fn dbus_rust_type(ty: &Ty) -> String {
    match ty {
        Ty::Builtin(Builtin::Int8) => "i16".to_string(),
        Ty::Builtin(Builtin::Any) | Ty::Struct(_) | Ty::Enum(_) => "String".to_string(),
        Ty::Builtin(_) => rust_type(ty),
        Ty::List(e) if is_json(e) => "String".to_string(),
        Ty::List(e) => format!("Vec<{}>", dbus_rust_type(e)),
    }
}

/// Whether a value of `ty` travels as JSON text.
fn is_json(ty: &Ty) -> bool {
    match ty {
        Ty::Builtin(Builtin::Any) | Ty::Struct(_) => true,
        Ty::List(e) => is_json(e),
        _ => false,
    }
}

/// The generated type's path for a schema type, from inside `dbus_server`.
fn schema_rust_type(ty: &Ty) -> String {
    match ty {
        Ty::Struct(n) | Ty::Enum(n) => format!("crate::types::{n}"),
        Ty::List(e) => format!("Vec<{}>", schema_rust_type(e)),
        Ty::Builtin(_) => rust_type(ty),
    }
}

/// An expression turning the D-Bus value `var` (of [`dbus_rust_type`]) into the Args field's
/// type, as `Result<_, ArgError>`.
fn unpack_expr(ty: &Ty, var: &str, wire: &str) -> String {
    match ty {
        Ty::Builtin(Builtin::Int8) => format!("unpack::narrow::<i16, i8>({var}, {wire:?}, \"int8\")"),
        Ty::Builtin(Builtin::Any) => format!("unpack::json::<serde_json::Value>(&{var}, {wire:?}, \"any\")"),
        Ty::Builtin(_) => format!("Ok::<_, ArgError>({var})"),
        Ty::Enum(n) => format!("unpack::enumeration::<crate::types::{n}>({var}, {wire:?})"),
        Ty::Struct(_) => format!("unpack::json::<{}>(&{var}, {wire:?}, \"object\")", schema_rust_type(ty)),
        Ty::List(_) if is_json(ty) => {
            format!("unpack::json::<{}>(&{var}, {wire:?}, \"array\")", schema_rust_type(ty))
        }
        Ty::List(e) if matches!(**e, Ty::Enum(_) | Ty::Builtin(Builtin::Int8)) => {
            format!("{var}.into_iter().map(|e| {}).collect::<Result<Vec<_>, ArgError>>()", unpack_expr(e, "e", wire))
        }
        Ty::List(_) => format!("Ok::<_, ArgError>({var})"),
    }
}

/// An expression turning the handler's result `var` into the D-Bus value, as
/// `Result<_, QmpDbusError>`.
fn pack_expr(ty: &Ty, var: &str) -> String {
    match ty {
        _ if is_json(ty) => format!("pack::json(&{var})"),
        Ty::Builtin(Builtin::Int8) => format!("Ok(i16::from({var}))"),
        Ty::Enum(_) => format!("Ok({var}.as_str().to_string())"),
        Ty::List(e) if matches!(**e, Ty::Enum(_) | Ty::Builtin(Builtin::Int8)) => {
            format!("{var}.into_iter().map(|e| {}).collect::<Result<Vec<_>, QmpDbusError>>()", pack_expr(e, "e"))
        }
        _ => format!("Ok({var})"),
    }
}

/// Generates `dbus_server.rs`: per interface a handler trait (`VmmCore1Handler`) and a zbus
/// interface wrapper generic over it (`VmmCore1<H>`), plus `INTERFACE_STEMS`.
pub fn generate_dbus_server(schema: &Schema, interfaces: &[DbusInterface<'_>]) -> Result<String, String> {
    let g = Gen { schema, structs: Vec::new(), taken: HashSet::new() };
    let mut o = header("dbus_server");
    for iface in interfaces {
        let stem = dbus_stem(iface.name);
        let handler = format!("{stem}Handler");
        let mut cmds = Vec::new();
        for name in iface.commands {
            let c = schema
                .commands()
                .find(|c| c.name == *name)
                .ok_or_else(|| format!("interface {} names unknown command {name}", iface.name))?;
            cmds.push(c);
        }

        // The handler trait.
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "/// What a `{}` daemon implements for `{}`: one method per command, taking the",
            iface.daemon, iface.name
        );
        let _ =
            writeln!(o, "/// command's generated argument struct and answering its generated return type (`()` for");
        let _ =
            writeln!(o, "/// `{{}}`) or a [`QmpError`]. Every method has a default that answers CommandNotFound; the");
        let _ =
            writeln!(o, "/// daemon overrides what it implements and names those commands to [`Exported::new`], which");
        let _ = writeln!(o, "/// hides the others from callers and from introspection.");
        let _ = writeln!(o, "pub trait {handler}: Send + Sync + 'static {{");
        for c in &cmds {
            let method = snake_case(&c.name);
            let ret = match &c.returns {
                Some(r) => schema_rust_type(&g.resolve(r)?),
                None => "()".to_string(),
            };
            let _ = writeln!(o, "    /// `{}`", c.name);
            if c.data.is_some() {
                let args = format!("crate::commands::{}Args", camel_case(&c.name));
                let _ = writeln!(
                    o,
                    "    fn {method}(&self, args: {args}) -> impl Future<Output = Result<{ret}, QmpError>> + Send {{"
                );
                let _ = writeln!(o, "        let _ = args;");
            } else {
                let _ =
                    writeln!(o, "    fn {method}(&self) -> impl Future<Output = Result<{ret}, QmpError>> + Send {{");
            }
            let _ = writeln!(o, "        std::future::ready(Err(not_implemented({:?})))", c.name);
            let _ = writeln!(o, "    }}");
        }
        let _ = writeln!(o, "}}");

        // The wrapper.
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "/// `{}` on the bus, every method of it, each unpacking its D-Bus arguments into the",
            iface.name
        );
        let _ = writeln!(o, "/// command's argument struct, calling [`{handler}`] and packing the result. Serve it");
        let _ = writeln!(o, "/// wrapped in [`Exported`], which exports only the commands the daemon implements.");
        let _ = writeln!(o, "pub struct {stem}<H> {{");
        let _ = writeln!(o, "    handler: Arc<H>,");
        let _ = writeln!(o, "}}");
        let _ = writeln!(o);
        let _ = writeln!(o, "impl<H: {handler}> {stem}<H> {{");
        let _ = writeln!(o, "    pub fn new(handler: Arc<H>) -> Self {{");
        let _ = writeln!(o, "        {stem} {{ handler }}");
        let _ = writeln!(o, "    }}");
        let _ = writeln!(o);
        let _ = writeln!(o, "    pub fn handler(&self) -> &Arc<H> {{");
        let _ = writeln!(o, "        &self.handler");
        let _ = writeln!(o, "    }}");
        let _ = writeln!(o, "}}");
        let _ = writeln!(o);
        let _ = writeln!(o, "impl<H: {handler}> GeneratedInterface for {stem}<H> {{");
        let _ = writeln!(o, "    const DAEMON: &'static str = {:?};", iface.daemon);
        let _ = writeln!(o, "}}");
        let _ = writeln!(o);
        let _ = writeln!(o, "#[zbus::interface(name = {:?})]", iface.name);
        let _ = writeln!(o, "impl<H: {handler}> {stem}<H> {{");
        for c in &cmds {
            let method = snake_case(&c.name);
            let dbus_name = camel_case(&c.name);
            let mut params = Vec::new();
            let mut fields = Vec::new();
            if let Some(data) = &c.data {
                for m in data {
                    let ty = g.resolve(&m.ty)?;
                    let field = field_name(data, m);
                    let mut dty = dbus_rust_type(&ty);
                    // A value that needs no conversion is moved as it is.
                    let identity = |var: &str| format!("Ok::<_, ArgError>({var})");
                    let field_init = if m.optional {
                        dty = format!("Vec<{dty}>");
                        let convert = unpack_expr(&ty, "v", &m.name);
                        let convert =
                            if convert == identity("v") { "Ok".to_string() } else { format!("|v| {convert}") };
                        format!("{field}: unpack::optional({field}, {:?}, {convert})?", m.name)
                    } else {
                        let convert = unpack_expr(&ty, &field, &m.name);
                        if convert == identity(&field) {
                            field.clone()
                        } else {
                            format!("{field}: {convert}?")
                        }
                    };
                    params.push(format!("{field}: {dty}"));
                    fields.push(field_init);
                }
            }
            let returns = match &c.returns {
                Some(r) => Some(g.resolve(r)?),
                None => None,
            };
            match &returns {
                Some(_) => {
                    let _ = writeln!(o, "    #[zbus(name = {dbus_name:?}, out_args(\"result\"))]");
                }
                None => {
                    let _ = writeln!(o, "    #[zbus(name = {dbus_name:?})]");
                }
            }
            let out = returns.as_ref().map_or("()".to_string(), dbus_rust_type);
            let mut sig = vec!["&self".to_string()];
            sig.extend(params);
            let _ = writeln!(o, "    async fn {method}({}) -> Result<{out}, QmpDbusError> {{", sig.join(", "));
            let call = if c.data.is_some() {
                let args = format!("crate::commands::{}Args", camel_case(&c.name));
                let _ = writeln!(o, "        let args = {args} {{");
                for f in &fields {
                    let _ = writeln!(o, "            {f},");
                }
                let _ = writeln!(o, "        }};");
                format!("self.handler.{method}(args).await?")
            } else {
                format!("self.handler.{method}().await?")
            };
            match &returns {
                Some(ty) => {
                    let _ = writeln!(o, "        let result = {call};");
                    let _ = writeln!(o, "        {}", pack_expr(ty, "result"));
                }
                None => {
                    let _ = writeln!(o, "        {call};");
                    let _ = writeln!(o, "        Ok(())");
                }
            }
            let _ = writeln!(o, "    }}");
        }
        let _ = writeln!(o, "}}");
    }
    Ok(o)
}
