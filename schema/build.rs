//! Generates the Rust types, command types and static command table from `qapi-schema.json`
//! into `OUT_DIR` (see `src/gen.rs`), and with the `dbus` feature the zbus server glue.

#[path = "src/parse.rs"]
#[allow(dead_code)]
mod parse;

#[path = "src/gen.rs"]
#[allow(dead_code)]
mod gen;

#[path = "src/dbus_interfaces.rs"]
#[allow(dead_code)]
mod dbus_interfaces;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let path = manifest.join("qapi-schema.json");
    println!("cargo:rerun-if-changed=qapi-schema.json");
    println!("cargo:rerun-if-changed=src/parse.rs");
    println!("cargo:rerun-if-changed=src/gen.rs");
    println!("cargo:rerun-if-changed=src/dbus_interfaces.rs");

    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let schema = parse::parse(&text).unwrap_or_else(|e| panic!("{}:{e}", path.display()));
    let generated = gen::generate(&schema).unwrap_or_else(|e| panic!("{}: generating Rust: {e}", path.display()));
    for (name, text) in
        [("types.rs", &generated.types), ("commands.rs", &generated.commands), ("table.rs", &generated.table)]
    {
        let file = out.join(name);
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    }
    // The zbus server glue only with the `dbus` feature (it needs zbus to compile).
    if std::env::var_os("CARGO_FEATURE_DBUS").is_some() {
        let interfaces: Vec<gen::DbusInterface<'_>> = dbus_interfaces::INTERFACES
            .iter()
            .map(|i| gen::DbusInterface { name: i.name, daemon: i.daemon, commands: i.commands })
            .collect();
        let text = gen::generate_dbus_server(&schema, &interfaces)
            .unwrap_or_else(|e| panic!("{}: generating the D-Bus glue: {e}", path.display()));
        let file = out.join("dbus_server.rs");
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    }
}
