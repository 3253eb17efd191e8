//! Flotilla's QMP contract, generated from QEMU 1.1's QAPI schema (`qapi-schema.json`, vendored
//! byte for byte from `shared/seed/`).
//!
//! * [`parse`] — the QAPI schema parser (also run by `build.rs`).
//! * [`types`] — a serde struct per `'type'` (wire names exactly as the schema spells them), a
//!   struct per nested anonymous struct, an enum per `'enum'`.
//! * [`commands`] — per command an argument struct (`MemsaveArgs`) and a unit type implementing
//!   [`commands::Command`] (name, argument type, return type).
//! * [`table`] — the schema as static data: [`table::COMMANDS`], [`table::STRUCTS`],
//!   [`table::ENUMS`].
//! * [`check`] — the argument checker, answering with QEMU's error classes and texts.
//! * [`dbus`] — D-Bus method names, signatures and introspection XML per daemon interface.
//! * `dbus_server` (feature `dbus`) — the zbus server glue generated from the schema: a handler
//!   trait and an interface wrapper per daemon interface, the `QmpEvent` signal.

pub mod check;
pub mod commands;
pub mod dbus;
#[cfg(feature = "dbus")]
pub mod dbus_server;
pub mod parse;
pub mod table;
pub mod types;

/// The schema text the crate was generated from.
pub const SCHEMA_TEXT: &str = include_str!("../qapi-schema.json");

/// SHA-256 of [`SCHEMA_TEXT`], the seed as vendored (checked by the tests).
pub const SCHEMA_SHA256: &str = "e8af8b408506d1d514c40f86621bf284244a6a276e22d0b4466966bbcae68bf0";

/// Parses [`SCHEMA_TEXT`] at run time (the generated modules already hold everything the
/// daemons need; this is for tools and tests).
pub fn schema() -> parse::Schema {
    parse::parse(SCHEMA_TEXT).expect("the vendored schema parsed at build time")
}
