//! Prints the introspection XML of a daemon's interface (all of them without an argument):
//! `cargo run -p flotilla-schema --example dbus-xml -- vmm-core`.

fn main() {
    let which = std::env::args().nth(1);
    for iface in flotilla_schema::dbus::INTERFACES {
        if which.as_deref().is_none_or(|d| d == iface.daemon) {
            print!("{}", flotilla_schema::dbus::introspection_xml(iface));
        }
    }
}
