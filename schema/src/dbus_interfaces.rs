// The daemon interfaces: plain data with no dependencies, `include!`d by `dbus.rs` and by
// `build.rs` (which generates the zbus server glue of the `dbus` feature from it).

/// One daemon's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    /// The daemon (its binary and systemd unit stem).
    pub daemon: &'static str,
    /// The D-Bus interface name.
    pub name: &'static str,
    /// The QMP commands it implements, by wire name.
    pub commands: &'static [&'static str],
}

/// `qom-list`, `qom-get` and `qom-set` are exported by every daemon: each answers for its own
/// part of the QOM tree, and the gateway routes by path and merges `qom-list /`.
pub const QOM_COMMANDS: [&str; 3] = ["qom-list", "qom-get", "qom-set"];

/// Commands the gateway answers itself, from this crate's table and the other daemons:
/// `query-commands` from [`table::COMMANDS`], `human-monitor-command` by running its HMP subset
/// over the daemons' methods.
pub const GATEWAY_COMMANDS: [&str; 2] = ["query-commands", "human-monitor-command"];

/// Every daemon interface. Each command of the schema is in exactly one of them, or in
/// [`GATEWAY_COMMANDS`]; the [`QOM_COMMANDS`] are in all.
pub static INTERFACES: &[Interface] = &[
    Interface {
        daemon: "vmm-core",
        name: "org.flotilla.VmmCore1",
        commands: &[
            "query-name",
            "query-version",
            "query-kvm",
            "query-status",
            "query-uuid",
            "query-chardev",
            "query-migrate",
            "query-cpus",
            "query-pci",
            "quit",
            "stop",
            "system_reset",
            "system_powerdown",
            "cpu",
            "memsave",
            "pmemsave",
            "cont",
            "inject-nmi",
            "migrate_cancel",
            "migrate_set_downtime",
            "migrate_set_speed",
            "qom-list",
            "qom-get",
            "qom-set",
        ],
    },
    Interface {
        daemon: "blockd",
        name: "org.flotilla.Block1",
        commands: &[
            "query-block",
            "query-blockstats",
            "block_passwd",
            "block_resize",
            "blockdev-snapshot-sync",
            "qom-list",
            "qom-get",
            "qom-set",
        ],
    },
    Interface { daemon: "netd", name: "org.flotilla.Net1", commands: &["set_link", "qom-list", "qom-get", "qom-set"] },
    Interface {
        daemon: "displayd",
        name: "org.flotilla.Display1",
        commands: &[
            "query-mice",
            "query-vnc",
            "query-spice",
            "set_password",
            "expire_password",
            "qom-list",
            "qom-get",
            "qom-set",
        ],
    },
    Interface {
        daemon: "balloond",
        name: "org.flotilla.Balloon1",
        commands: &["balloon", "query-balloon", "qom-list", "qom-get", "qom-set"],
    },
];
