//! The schema as static data, generated at build time: every struct, enum and command with its
//! members and their types. The argument checker, `query-commands` and the D-Bus descriptions
//! read it; nothing restates a name by hand.

pub use crate::parse::Builtin;

/// A member's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Builtin(Builtin),
    /// A struct, by its Rust name (an entry of [`STRUCTS`]).
    Struct(&'static str),
    /// An enum (an entry of [`ENUMS`]).
    Enum(&'static str),
    List(&'static Ty),
}

impl Ty {
    /// The type as the schema writes it (`'str'`, `'BlockInfo'`, `['ChardevInfo']`); nested
    /// anonymous structs show their generated name.
    pub fn schema_name(&self) -> String {
        match self {
            Ty::Builtin(b) => b.name().to_string(),
            Ty::Struct(n) | Ty::Enum(n) => n.to_string(),
            Ty::List(e) => format!("[{}]", e.schema_name()),
        }
    }
}

/// A member of a struct or of a command's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// The wire name (no `*`).
    pub name: &'static str,
    /// The field's name in the generated struct.
    pub rust_name: &'static str,
    pub ty: Ty,
    pub optional: bool,
}

/// Where a struct comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StructKind {
    /// A `'type'` of the schema.
    Schema,
    /// A nested anonymous struct of a `'type'`, named after its parent and member.
    Nested,
    /// A command's `'data'` (`MemsaveArgs`).
    Arguments,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructSpec {
    pub name: &'static str,
    pub kind: StructKind,
    pub members: &'static [Member],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnumSpec {
    pub name: &'static str,
    pub values: &'static [&'static str],
}

/// A command: what `query-commands` lists, what the checker checks, what D-Bus exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// The wire name (`"query-status"`).
    pub name: &'static str,
    /// CamelCase (`"QueryStatus"`): the unit type in [`crate::commands`] and the D-Bus method.
    pub rust_name: &'static str,
    /// The argument struct in [`crate::commands`], if the command has `'data'`.
    pub args_struct: Option<&'static str>,
    /// The arguments, in the schema's order (empty without `'data'`).
    pub members: &'static [Member],
    /// `None`: the command returns `{}`.
    pub returns: Option<Ty>,
    /// `false` for `'gen': 'no'` (QEMU hand-writes the marshaller: `qom-get`, `qom-set`).
    pub gen: bool,
}

/// Looks a command up by its wire name.
pub fn command(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Looks a struct up by its Rust name.
pub fn struct_spec(name: &str) -> Option<&'static StructSpec> {
    STRUCTS.iter().find(|s| s.name == name)
}

/// Looks an enum up by name.
pub fn enum_spec(name: &str) -> Option<&'static EnumSpec> {
    ENUMS.iter().find(|e| e.name == name)
}

include!(concat!(env!("OUT_DIR"), "/table.rs"));
