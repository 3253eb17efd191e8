//! The daemons of one VM instance as the gateway sees them: bus names, object paths, whether
//! each is on the bus now, whether it is configured at all, and which commands it exports.
//!
//! A daemon is *configured* when the launcher said so (`--daemon`), when it is vmm-core (every
//! VM has one), or once it has been seen on the bus; a configured daemon without an owner is
//! *down* (crashed, restarting) and its commands fail at once. A daemon never configured is
//! absent from this VM, and its commands answer as QEMU does without that device.

use std::collections::BTreeSet;

use flotilla_schema::dbus::{self, Interface, INTERFACES};

/// The daemon that every VM has.
pub const CORE_DAEMON: &str = "vmm-core";

/// `org.flotilla.<instance>.<Daemon>` (the schema crate's naming).
pub fn bus_name(instance: &str, iface: &Interface) -> String {
    dbus::bus_name(instance, iface.object_name())
}

/// `/org/flotilla/<Daemon>`.
pub fn object_path(iface: &Interface) -> String {
    dbus::object_path(iface.object_name())
}

/// The gateway's own bus name (held so that the launcher and `busctl` can see it is up).
pub fn gateway_bus_name(instance: &str) -> String {
    dbus::bus_name(instance, "Gateway")
}

/// What the gateway knows about one daemon.
#[derive(Debug, Clone, Default)]
pub struct DaemonState {
    /// The unique name owning the daemon's bus name now.
    pub owner: Option<String>,
    /// Configured in this VM (see the module docs).
    pub configured: bool,
    /// The commands the daemon exports, from the last introspection, and whose they are.
    pub exported: Option<BTreeSet<&'static str>>,
    pub exported_by: Option<String>,
    /// Bumped on every owner change, so that a slower lookup does not undo a newer one.
    pub generation: u64,
}

impl DaemonState {
    /// Whether the daemon is known to export `command` right now: `None` while its owner has
    /// not been introspected yet.
    pub fn exports(&self, command: &str) -> Option<bool> {
        match (&self.exported, &self.exported_by, &self.owner) {
            (Some(set), Some(by), Some(owner)) if by == owner => Some(set.contains(command)),
            _ => None,
        }
    }
}

/// The table, indexed like [`INTERFACES`].
#[derive(Debug, Clone)]
pub struct Daemons {
    pub states: Vec<DaemonState>,
}

impl Daemons {
    pub fn new(declared: &[String]) -> Self {
        let states = INTERFACES
            .iter()
            .map(|i| DaemonState {
                configured: i.daemon == CORE_DAEMON || declared.iter().any(|d| d == i.daemon),
                ..DaemonState::default()
            })
            .collect();
        Daemons { states }
    }

    pub fn index(daemon: &str) -> Option<usize> {
        INTERFACES.iter().position(|i| i.daemon == daemon)
    }

    /// Records a new owner (or none); returns whether it changed.
    pub fn set_owner(&mut self, idx: usize, owner: Option<String>) -> bool {
        let s = &mut self.states[idx];
        if s.owner == owner {
            return false;
        }
        s.generation += 1;
        if owner.is_some() {
            s.configured = true;
        }
        s.owner = owner;
        true
    }

    /// The daemon whose current owner is `unique_name`.
    pub fn by_owner(&self, unique_name: &str) -> Option<usize> {
        self.states.iter().position(|s| s.owner.as_deref() == Some(unique_name))
    }
}

/// The commands an introspection document shows `iface` exporting with the schema's
/// signatures. Methods with other signatures are left out and returned separately, so the
/// gateway never calls a method it would call wrongly.
pub fn exported_commands(iface: &Interface, xml: &str) -> (BTreeSet<&'static str>, Vec<String>) {
    let mut ok = BTreeSet::new();
    let mut mismatched = Vec::new();
    for (name, args) in dbus::methods_in_xml(xml, iface.name) {
        let Some(m) = dbus::methods(iface).into_iter().find(|m| m.name == name) else { continue };
        let in_sig: String = args.iter().filter(|a| a.2 == "in").map(|a| a.1.as_str()).collect();
        let out_sig: String = args.iter().filter(|a| a.2 == "out").map(|a| a.1.as_str()).collect();
        if in_sig == m.in_signature() && out_sig == m.out_signature() {
            ok.insert(m.command.name);
        } else {
            mismatched.push(format!(
                "{name}({in_sig}) -> ({out_sig}), the schema says ({}) -> ({})",
                m.in_signature(),
                m.out_signature()
            ));
        }
    }
    (ok, mismatched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let vmm = dbus::interface("vmm-core").unwrap();
        assert_eq!(bus_name("vm1", vmm), "org.flotilla.vm1.VmmCore");
        assert_eq!(bus_name("lab-guest", vmm), "org.flotilla.lab_guest.VmmCore");
        assert_eq!(object_path(vmm), "/org/flotilla/VmmCore");
        let paths: Vec<String> = INTERFACES.iter().map(object_path).collect();
        assert_eq!(
            paths,
            [
                "/org/flotilla/VmmCore",
                "/org/flotilla/Block",
                "/org/flotilla/Net",
                "/org/flotilla/Display",
                "/org/flotilla/Balloon"
            ]
        );
        assert_eq!(gateway_bus_name("9x"), "org.flotilla._9x.Gateway");
    }

    #[test]
    fn configured_and_owners() {
        let mut d = Daemons::new(&["blockd".to_string()]);
        let core = Daemons::index("vmm-core").unwrap();
        let block = Daemons::index("blockd").unwrap();
        let balloon = Daemons::index("balloond").unwrap();
        assert!(d.states[core].configured && d.states[block].configured && !d.states[balloon].configured);
        assert!(d.set_owner(balloon, Some(":1.7".into())));
        assert!(!d.set_owner(balloon, Some(":1.7".into())));
        assert!(d.states[balloon].configured);
        assert_eq!(d.by_owner(":1.7"), Some(balloon));
        assert!(d.set_owner(balloon, None));
        assert!(d.states[balloon].configured, "seen once, configured for good");
        assert_eq!(d.states[balloon].generation, 2);
    }

    #[test]
    fn exports_follow_the_owner() {
        let mut s = DaemonState { owner: Some(":1.1".into()), ..Default::default() };
        assert_eq!(s.exports("stop"), None);
        s.exported = Some(["stop"].into_iter().collect());
        s.exported_by = Some(":1.1".into());
        assert_eq!(s.exports("stop"), Some(true));
        assert_eq!(s.exports("cont"), Some(false));
        s.owner = Some(":1.2".into());
        assert_eq!(s.exports("stop"), None, "a new owner is not introspected yet");
    }

    #[test]
    fn exported_commands_checks_signatures() {
        let vmm = dbus::interface("vmm-core").unwrap();
        let full = dbus::introspection_xml(vmm);
        let (ok, bad) = exported_commands(vmm, &full);
        assert_eq!(ok.len(), vmm.commands.len());
        assert!(bad.is_empty());
        let wrong = full.replace(
            "<arg name=\"filename\" type=\"s\" direction=\"in\"/>",
            "<arg name=\"filename\" type=\"x\" direction=\"in\"/>",
        );
        let (ok, bad) = exported_commands(vmm, &wrong);
        // memsave and pmemsave both have that argument.
        assert!(!ok.contains("memsave") && !ok.contains("pmemsave") && ok.contains("stop"));
        assert_eq!(bad.len(), 2, "{bad:?}");
        // Another interface's methods are not ours.
        let (ok, _) = exported_commands(dbus::interface("blockd").unwrap(), &full);
        assert!(ok.is_empty());
    }
}
