//! qemu-system-x86_64's command line, as far as Flotilla implements it.
//!
//! Every option is a row of [`OPTIONS`]: its name, whether it takes an argument, and what it
//! does. Options are spelled `-opt` or `--opt`, their argument is the next word, exactly as QEMU
//! reads them. Errors name the option and use QEMU's wording; `main` prefixes `flotilla: `.

use std::fmt;
use std::path::PathBuf;

use vm_config::{ChardevBackend, ChardevConfig, MachineConfig};

use crate::devices::DeviceSet;
use crate::qemu_opts::{parse_bool, parse_keyvals, parse_size, parse_uuid, size_error, ValueError};

/// The QEMU version our `-version` and QMP greeting claim compatibility with (the QMP schema's).
pub const QEMU_COMPAT_VERSION: &str = "1.1.0";
/// Name reported for the one machine type; `pc` and `q35` (and their versioned names) map to it.
pub const MACHINE_NAME: &str = "pc";
/// Guest RAM is rounded up to a multiple of this, as QEMU does.
pub const RAM_ALIGN: u64 = 8192;
/// Most vCPUs a machine can have (vm-config's `cpus` is a u8; one APIC ID below the broadcast).
pub const MAX_CPUS: u64 = 255;

/// What the launcher does besides building the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchOptions {
    pub machine: MachineConfig,
    /// `-pidfile`: written with the launcher's pid, removed on exit.
    pub pidfile: Option<PathBuf>,
    /// `-daemonize`: detach once vmm-core has started.
    pub daemonize: bool,
    /// `-qmp`: the QMP sockets the gateway serves, in order (none: no gateway).
    pub qmp: Vec<QmpSocket>,
    /// `-drive`, `-device`, `-chardev`, `-balloon`: checked, not yet placed (the sockets go
    /// in the runtime directory, which exists only once the launcher runs).
    pub devices: DeviceSet,
}

/// One `-qmp` listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpSocket {
    /// `unix:PATH,server,nowait`
    Unix { path: PathBuf },
    /// `tcp:HOST:PORT,server,nowait`; HOST is the loopback address when the user gave none.
    Tcp { host: String, port: u16 },
}

/// The address a `tcp:` socket listens on when its host part is empty (QEMU would take every
/// address; the gateway stays on the loopback unless the user names another).
pub const QMP_DEFAULT_HOST: &str = "127.0.0.1";

impl QmpSocket {
    /// The socket as the gateway's `--qmp` argument: a QEMU chardev spelling it accepts,
    /// `unix:PATH,server=on,wait=off` (a comma in PATH doubled, as QEMU escapes it) or
    /// `tcp:HOST:PORT,server=on,wait=off` with the host filled in.
    pub fn gateway_spec(&self) -> String {
        match self {
            QmpSocket::Unix { path } => {
                format!("unix:{},server=on,wait=off", path.display().to_string().replace(',', ",,"))
            }
            QmpSocket::Tcp { host, port } => format!("tcp:{host}:{port},server=on,wait=off"),
        }
    }
}

/// The outcome of parsing a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run(Box<LaunchOptions>),
    /// `-h`, `-help`
    Help,
    /// `-version`
    Version,
    /// `-machine help`
    MachineHelp,
    /// `-accel help`
    AccelHelp,
}

/// A command-line error: `location` is the option as typed (`-m 12X`), as QEMU prefixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub location: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    fn at(location: impl Into<String>, message: impl Into<String>) -> Self {
        CliError { location: Some(location.into()), message: message.into(), hint: None }
    }
    fn global(message: impl Into<String>) -> Self {
        CliError { location: None, message: message.into(), hint: None }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n{h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CliError {}

// ---------------------------------------------------------------------------------------------
// The option table
// ---------------------------------------------------------------------------------------------

type FlagFn = fn(&mut State) -> Result<(), ValueError>;
type ValueFn = fn(&mut State, &str) -> Result<(), ValueError>;

/// What an option does.
#[derive(Clone, Copy)]
pub enum Handler {
    /// No argument.
    Flag(FlagFn),
    /// One argument (the next word), named by the metavariable for `-help`.
    Value(&'static str, ValueFn),
    /// Stops parsing and does something else (`-version`, `-help`).
    Exit(fn() -> Action),
    /// A QEMU option a later Flotilla release implements; rejected for now.
    NotYet,
    /// A QEMU option Flotilla does not implement.
    Unsupported,
}

/// One row of the option table.
pub struct OptSpec {
    pub name: &'static str,
    pub handler: Handler,
    pub help: &'static str,
}

const fn spec(name: &'static str, handler: Handler, help: &'static str) -> OptSpec {
    OptSpec { name, handler, help }
}

use Handler::{Exit, Flag, NotYet, Unsupported, Value};

/// Every option Flotilla knows, in `-help` order.
pub static OPTIONS: &[OptSpec] = &[
    spec("h", Exit(|| Action::Help), "display this help and exit"),
    spec("help", Exit(|| Action::Help), "display this help and exit"),
    spec("version", Exit(|| Action::Version), "display version information and exit"),
    spec("machine", Value("[type=]name[,accel=kvm]", opt_machine), "select the machine (pc, q35; 'help' lists them)"),
    spec("M", Value("[type=]name[,accel=kvm]", opt_machine), "same as -machine"),
    spec("accel", Value("kvm[,kernel-irqchip=on]", opt_accel), "select the accelerator (only kvm)"),
    spec("enable-kvm", Flag(|_| Ok(())), "use KVM (always on)"),
    spec("name", Value("[guest=]name[,process=..][,debug-threads=on|off]", opt_name), "set the guest name"),
    spec("uuid", Value("%08x-%04x-%04x-%04x-%012x", opt_uuid), "set the system UUID"),
    spec("m", Value("[size=]megs[M|G|T]", opt_mem), "guest RAM size (plain number: MiB; default 128M)"),
    spec(
        "smp",
        Value("[cpus=]n[,sockets=..][,dies=..][,cores=..][,threads=..][,maxcpus=..]", opt_smp),
        "number of vCPUs (1..255)",
    ),
    spec("kernel", Value("bzImage", |s, v| set_path(&mut s.cfg.kernel, v)), "Linux kernel (bzImage or PVH ELF)"),
    spec("initrd", Value("file", |s, v| set_path(&mut s.cfg.initrd, v)), "initial ram disk"),
    spec("append", Value("cmdline", opt_append), "kernel command line"),
    spec("serial", Value("dev", opt_serial), "COM1: stdio, null, none, pty, file:PATH, unix:PATH,server=on[,wait=off]"),
    spec("nographic", Flag(|s| set_flag(&mut s.nographic)), "no display; COM1 on stdio unless -serial is given"),
    spec("display", Value("none", opt_display), "display type (only none)"),
    spec("S", Flag(|s| set_flag(&mut s.cfg.start_paused)), "do not start the CPUs (wait for 'cont')"),
    spec("no-shutdown", Flag(|s| set_flag(&mut s.cfg.no_shutdown)), "stop, do not exit, when the guest powers off"),
    spec("no-reboot", Flag(|s| set_flag(&mut s.cfg.no_reboot)), "exit instead of rebooting"),
    spec("mem-prealloc", Flag(|s| set_flag(&mut s.cfg.mem_prealloc)), "allocate all guest RAM at start"),
    spec("pidfile", Value("file", |s, v| set_path(&mut s.pidfile, v)), "write the launcher's pid to file"),
    spec("daemonize", Flag(|s| set_flag(&mut s.daemonize)), "detach once the VM has started"),
    spec("nodefaults", Flag(|s| set_flag(&mut s.nodefaults)), "no default devices (no COM1 unless -serial)"),
    spec("no-user-config", Flag(|_| Ok(())), "accepted; Flotilla reads no configuration files"),
    // Later Flotilla issues implement these; until then they are refused, never ignored.
    spec(
        "qmp",
        Value("unix:PATH,server,nowait|tcp:[HOST]:PORT,server,nowait", opt_qmp),
        "QMP monitor socket (repeatable)",
    ),
    spec("qmp-pretty", NotYet, ""),
    spec("monitor", NotYet, ""),
    spec("mon", NotYet, ""),
    spec(
        "drive",
        Value(
            "file=F,if=virtio|none[,format=raw|qcow2][,id=ID][,readonly=on|off][,cache=..][,werror=..][,rerror=..][,serial=S]",
            |s, v| s.devices.drive(v),
        ),
        "a disk image served by blockd",
    ),
    spec(
        "device",
        Value(
            "virtio-blk-pci,drive=ID|vhost-user-blk-pci,chardev=ID|virtio-balloon-pci|virtio-net-pci,netdev=ID[,mac=][,mq=on][,vectors=N][,id=][,addr=SLOT][,num-queues=N]",
            |s, v| s.devices.device(v),
        ),
        "add a device",
    ),
    spec(
        "chardev",
        Value("socket,id=ID,path=PATH", |s, v| s.devices.chardev(v)),
        "an external vhost-user backend's socket (vhost-user-blk-pci, -netdev vhost-user)",
    ),
    spec("balloon", Value("none|virtio[,addr=SLOT]", |s, v| s.devices.balloon(v)), "the virtio balloon (QEMU 1.1)"),
    spec("blockdev", NotYet, ""),
    spec(
        "netdev",
        Value(
            "tap,id=ID,ifname=NAME,script=no,downscript=no[,fd=N][,queues=N][,vnet_hdr=on|off][,vhost=off]|user,id=ID[,net=ADDR/BITS][,restrict=on|off][,hostfwd=RULE]|vhost-user,id=ID,chardev=ID[,queues=N]",
            |s, v| s.devices.netdev(v),
        ),
        "a NIC's host side: a tap (netd), user networking (netd, libslirp), an external vhost-user backend",
    ),
    spec(
        "net",
        Value(
            "nic,model=virtio[,macaddr=MAC][,vlan=N][,name=][,addr=][,vectors=]|tap,...[,vlan=N]|user,...[,vlan=N]|none",
            |s, v| s.devices.legacy_net(v),
        ),
        "QEMU 1.1's NIC and host side, joined by vlan (no default NIC)",
    ),
    spec("nic", NotYet, ""),
    spec("vnc", NotYet, ""),
    // QEMU options Flotilla does not implement.
    spec("cpu", Unsupported, ""),
    spec("hda", Unsupported, ""),
    spec("hdb", Unsupported, ""),
    spec("hdc", Unsupported, ""),
    spec("hdd", Unsupported, ""),
    spec("cdrom", Unsupported, ""),
    spec("fda", Unsupported, ""),
    spec("boot", Unsupported, ""),
    spec("bios", Unsupported, ""),
    spec("object", Unsupported, ""),
    spec("global", Unsupported, ""),
    spec("numa", Unsupported, ""),
    spec("mem-path", Unsupported, ""),
    spec("rtc", Unsupported, ""),
    spec("vga", Unsupported, ""),
    spec("usb", Unsupported, ""),
    spec("usbdevice", Unsupported, ""),
    spec("parallel", Unsupported, ""),
    spec("spice", Unsupported, ""),
    spec("sdl", Unsupported, ""),
    spec("curses", Unsupported, ""),
    spec("full-screen", Unsupported, ""),
    spec("incoming", Unsupported, ""),
    spec("loadvm", Unsupported, ""),
    spec("snapshot", Unsupported, ""),
    spec("gdb", Unsupported, ""),
    spec("s", Unsupported, ""),
    spec("d", Unsupported, ""),
    spec("D", Unsupported, ""),
    spec("k", Unsupported, ""),
    spec("icount", Unsupported, ""),
    spec("watchdog-action", Unsupported, ""),
    spec("action", Unsupported, ""),
    spec("sandbox", Unsupported, ""),
    spec("runas", Unsupported, ""),
    spec("chroot", Unsupported, ""),
    spec("readconfig", Unsupported, ""),
    spec("writeconfig", Unsupported, ""),
    spec("fsdev", Unsupported, ""),
    spec("virtfs", Unsupported, ""),
    spec("tpmdev", Unsupported, ""),
    spec("audiodev", Unsupported, ""),
    spec("add-fd", Unsupported, ""),
    spec("fw_cfg", Unsupported, ""),
    spec("smbios", Unsupported, ""),
    spec("overcommit", Unsupported, ""),
    spec("msg", Unsupported, ""),
    spec("trace", Unsupported, ""),
    spec("plugin", Unsupported, ""),
    spec("preconfig", Unsupported, ""),
    spec("compat", Unsupported, ""),
    spec("no-acpi", Unsupported, ""),
    spec("no-hpet", Unsupported, ""),
];

/// Looks an option up by name (without its dashes).
pub fn lookup(name: &str) -> Option<&'static OptSpec> {
    OPTIONS.iter().find(|o| o.name == name)
}

// ---------------------------------------------------------------------------------------------
// Parser state and handlers
// ---------------------------------------------------------------------------------------------

/// Where COM1 goes, as given by `-serial`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Serial {
    /// `-serial none`: no COM1 at all.
    None,
    Backend(ChardevBackend),
}

#[derive(Default)]
pub struct State {
    cfg: MachineConfig,
    serial: Option<(String, Serial)>,
    append: Option<String>,
    nographic: bool,
    nodefaults: bool,
    pidfile: Option<PathBuf>,
    daemonize: bool,
    qmp: Vec<QmpSocket>,
    devices: DeviceSet,
    machine_help: bool,
    accel_help: bool,
}

fn set_flag(f: &mut bool) -> Result<(), ValueError> {
    *f = true;
    Ok(())
}

fn set_path(p: &mut Option<PathBuf>, v: &str) -> Result<(), ValueError> {
    *p = Some(PathBuf::from(v));
    Ok(())
}

fn invalid_parameter(key: &str) -> ValueError {
    ValueError::new(format!("Invalid parameter '{key}'"))
}

fn opt_name(s: &mut State, v: &str) -> Result<(), ValueError> {
    for (k, val) in parse_keyvals(v, Some("guest")) {
        match k.as_str() {
            "guest" => s.cfg.name = Some(val),
            "process" => {} // the host process title; nothing to do
            "debug-threads" => {
                parse_bool(&k, &val)?;
            }
            _ => return Err(invalid_parameter(&k)),
        }
    }
    Ok(())
}

fn opt_uuid(s: &mut State, v: &str) -> Result<(), ValueError> {
    s.cfg.uuid = Some(parse_uuid(v).ok_or_else(|| ValueError::new("failed to parse UUID string: wrong format"))?);
    Ok(())
}

fn opt_mem(s: &mut State, v: &str) -> Result<(), ValueError> {
    for (k, val) in parse_keyvals(v, Some("size")) {
        match k.as_str() {
            "size" => {
                // A suffix-less number is MiB (QEMU's legacy format); 0 keeps the default.
                let bytes = parse_size("size", &val, 1 << 20)?;
                if bytes != 0 {
                    // QEMU rounds RAM up to 8 KiB (`-m 4097B` gives 8192 bytes).
                    s.cfg.mem_bytes = bytes.checked_next_multiple_of(RAM_ALIGN).ok_or_else(|| size_error("size"))?;
                }
            }
            "slots" | "maxmem" => {
                return Err(ValueError::new(format!("memory hotplug ('{k}') is not supported by flotilla")))
            }
            _ => return Err(invalid_parameter(&k)),
        }
    }
    Ok(())
}

fn opt_smp(s: &mut State, v: &str) -> Result<(), ValueError> {
    let mut vals: [Option<u64>; 6] = [None; 6];
    const KEYS: [&str; 6] = ["cpus", "sockets", "dies", "cores", "threads", "maxcpus"];
    for (k, val) in parse_keyvals(v, Some("cpus")) {
        let Some(i) = KEYS.iter().position(|&n| n == k) else {
            return Err(ValueError::new(format!("Parameter 'smp.{k}' is unexpected")));
        };
        let n: u64 = val
            .parse()
            .ok()
            .filter(|_| val.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| ValueError::new(format!("Parameter 'smp.{k}' expects integer")))?;
        vals[i] = Some(n);
    }
    s.cfg.cpus = smp_topology(vals)?;
    Ok(())
}

/// QEMU's machine_parse_smp_config() for a machine that prefers cores over sockets (pc since
/// 6.2), with Flotilla's limits: at most 255 vCPUs and no CPU hotplug (maxcpus == cpus).
fn smp_topology(v: [Option<u64>; 6]) -> Result<u8, ValueError> {
    if v.contains(&Some(0)) {
        return Err(ValueError::new("Invalid CPU topology: CPU topology parameters must be greater than zero"));
    }
    let [cpus, sockets, dies, cores, threads, maxcpus] = v.map(|x| u128::from(x.unwrap_or(0)));
    let dies = dies.max(1);
    let (mut sockets, mut cores, mut threads, mut maxcpus) = (sockets, cores, threads, maxcpus);
    if cpus == 0 && maxcpus == 0 {
        sockets = sockets.max(1);
        cores = cores.max(1);
        threads = threads.max(1);
    } else {
        maxcpus = if maxcpus > 0 { maxcpus } else { cpus };
        if cores == 0 {
            sockets = sockets.max(1);
            threads = threads.max(1);
            cores = maxcpus / (sockets * dies * threads);
        } else if sockets == 0 {
            threads = threads.max(1);
            sockets = maxcpus / (dies * cores * threads);
        }
        if threads == 0 {
            threads = maxcpus / (sockets * dies * cores);
        }
    }
    let product = sockets * dies * cores * threads;
    let maxcpus = if maxcpus > 0 { maxcpus } else { product };
    let cpus = if cpus > 0 { cpus } else { maxcpus };
    let topo = format!("sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads})");
    if product != maxcpus {
        return Err(ValueError::new(format!(
            "Invalid CPU topology: product of the hierarchy must match maxcpus: {topo} != maxcpus ({maxcpus})"
        )));
    }
    if maxcpus < cpus {
        return Err(ValueError::new(format!(
            "Invalid CPU topology: maxcpus must be equal to or greater than smp: {topo} == maxcpus ({maxcpus}) < smp_cpus ({cpus})"
        )));
    }
    if maxcpus > u128::from(MAX_CPUS) {
        return Err(ValueError::new(format!(
            "Invalid SMP CPUs {maxcpus}. The max CPUs supported by machine '{MACHINE_NAME}' is {MAX_CPUS}"
        )));
    }
    if maxcpus != cpus {
        return Err(ValueError::new(format!(
            "CPU hotplug is not supported by flotilla: maxcpus ({maxcpus}) must equal cpus ({cpus})"
        )));
    }
    // cpus <= maxcpus <= 255 here.
    u8::try_from(cpus).map_err(|_| ValueError::new(format!("Invalid SMP CPUs {cpus}")))
}

fn opt_append(s: &mut State, v: &str) -> Result<(), ValueError> {
    s.append = Some(v.to_string());
    Ok(())
}

const SERIAL_FORMS: &str =
    "flotilla supports -serial stdio, null, none, pty, file:PATH, unix:PATH,server=on[,wait=off]";

fn parse_serial(v: &str) -> Result<Serial, ValueError> {
    let unsupported =
        || ValueError::with_hint(format!("character backend '{v}' is not supported by flotilla"), SERIAL_FORMS);
    Ok(match v {
        "stdio" => Serial::Backend(ChardevBackend::Stdio),
        "null" => Serial::Backend(ChardevBackend::Null),
        "none" => Serial::None,
        "pty" => Serial::Backend(ChardevBackend::Pty),
        _ => {
            if let Some(path) = v.strip_prefix("file:") {
                if path.is_empty() {
                    return Err(ValueError::new("file: needs a path (file:PATH)"));
                }
                Serial::Backend(ChardevBackend::File { path: path.into() })
            } else if let Some(rest) = v.strip_prefix("unix:") {
                parse_unix_serial(rest)?
            } else if v.starts_with("chardev:") {
                return Err(ValueError::new(
                    "-serial chardev: is not supported by flotilla (a -chardev serves vhost-user-blk-pci only)",
                ));
            } else if v.starts_with("/dev/") || v.starts_with("COM") {
                return Err(unsupported());
            } else {
                let driver = v.split(':').next().unwrap_or(v);
                const QEMU_DRIVERS: &[&str] = &[
                    "vc",
                    "tcp",
                    "udp",
                    "telnet",
                    "websocket",
                    "mon",
                    "pipe",
                    "braille",
                    "msmouse",
                    "wctablet",
                    "testdev",
                    "spicevmc",
                    "spiceport",
                    "qemu-vdagent",
                ];
                if QEMU_DRIVERS.contains(&driver) {
                    return Err(unsupported());
                }
                return Err(ValueError::with_hint(format!("'{v}' is not a valid char driver"), SERIAL_FORMS));
            }
        }
    })
}

fn parse_unix_serial(rest: &str) -> Result<Serial, ValueError> {
    let mut path = None;
    let mut server = false;
    let mut wait = true;
    for (k, val) in parse_keyvals(rest, Some("path")) {
        match k.as_str() {
            "path" => path = Some(val),
            "server" => server = parse_bool(&k, &val)?,
            "wait" => wait = parse_bool(&k, &val)?,
            "telnet" | "tn3270" | "websocket" | "reconnect" | "reconnect-ms" | "abstract" | "tight" | "mux"
            | "logfile" | "logappend" => {
                return Err(ValueError::new(format!("unix socket option '{k}' is not supported by flotilla")))
            }
            _ => return Err(invalid_parameter(&k)),
        }
    }
    let path = path.filter(|p| !p.is_empty()).ok_or_else(|| ValueError::new("unix: needs a socket path"))?;
    if !server {
        return Err(ValueError::with_hint(
            "unix socket client mode is not supported by flotilla",
            "use unix:PATH,server=on[,wait=off]",
        ));
    }
    Ok(Serial::Backend(ChardevBackend::UnixServer { path: path.into(), wait }))
}

const QMP_FORMS: &str = "flotilla supports -qmp unix:PATH,server=on,wait=off and tcp:[HOST]:PORT,server=on,wait=off";

/// `-qmp`: a listening socket without waiting for a client (the gateway serves it).
fn parse_qmp(v: &str) -> Result<QmpSocket, ValueError> {
    let (kind, rest) = match v.split_once(':') {
        Some((k @ ("unix" | "tcp"), rest)) => (k, rest),
        _ => {
            let driver = v.split([':', ',']).next().unwrap_or(v);
            return Err(ValueError::with_hint(
                format!("character backend '{driver}' is not supported for -qmp by flotilla"),
                QMP_FORMS,
            ));
        }
    };
    let implied = if kind == "unix" { "path" } else { "host" };
    let mut target = None;
    let mut server = false;
    let mut wait = true;
    for (k, val) in parse_keyvals(rest, Some(implied)) {
        match k.as_str() {
            "path" if kind == "unix" => target = Some(val),
            "host" if kind == "tcp" => target = Some(val),
            "server" => server = parse_bool(&k, &val)?,
            "wait" => wait = parse_bool(&k, &val)?,
            "telnet" | "tn3270" | "websocket" | "reconnect" | "reconnect-ms" | "abstract" | "tight" | "mux"
            | "logfile" | "logappend" | "ipv4" | "ipv6" | "nodelay" | "to" | "tls-creds" | "tls-authz" => {
                return Err(ValueError::new(format!("socket option '{k}' is not supported for -qmp by flotilla")))
            }
            _ => return Err(invalid_parameter(&k)),
        }
    }
    if !server {
        return Err(ValueError::with_hint("-qmp client sockets are not supported by flotilla", QMP_FORMS));
    }
    if wait {
        return Err(ValueError::with_hint(
            "-qmp sockets that wait for a client before the VM starts are not supported by flotilla",
            "add ',wait=off' (or ',nowait')",
        ));
    }
    let target = target.unwrap_or_default();
    if kind == "unix" {
        if target.is_empty() {
            return Err(ValueError::new("unix: needs a socket path"));
        }
        return Ok(QmpSocket::Unix { path: target.into() });
    }
    // tcp:[HOST]:PORT, HOST possibly a bracketed IPv6 address.
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| ValueError::new(format!("host and/or port not specified in '{target}'")))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| ValueError::new(format!("tcp: port '{port}' is not a number between 1 and 65535")))?;
    let host = if host.is_empty() { QMP_DEFAULT_HOST.to_string() } else { host.to_string() };
    Ok(QmpSocket::Tcp { host, port })
}

fn opt_qmp(s: &mut State, v: &str) -> Result<(), ValueError> {
    let sock = parse_qmp(v)?;
    if s.qmp.contains(&sock) {
        return Err(ValueError::new("the same QMP socket is given twice"));
    }
    s.qmp.push(sock);
    Ok(())
}

fn opt_serial(s: &mut State, v: &str) -> Result<(), ValueError> {
    if s.serial.is_some() {
        return Err(ValueError::new("flotilla supports one serial port (COM1); -serial given twice"));
    }
    s.serial = Some((v.to_string(), parse_serial(v)?));
    Ok(())
}

fn opt_display(_: &mut State, v: &str) -> Result<(), ValueError> {
    let ty = v.split([',', '=']).next().unwrap_or(v);
    if v.starts_with("vnc") {
        return Err(ValueError::new("VNC is not supported yet"));
    }
    match ty {
        "none" if v == "none" => Ok(()),
        "none" => {
            let key = v.split(',').nth(1).and_then(|kv| kv.split('=').next()).unwrap_or(v);
            if key == "gl" {
                Err(ValueError::new("OpenGL is not supported by the display"))
            } else {
                Err(invalid_parameter(key))
            }
        }
        "gtk" | "sdl" | "curses" | "egl-headless" | "spice-app" | "dbus" | "cocoa" => {
            Err(ValueError::new(format!("display '{ty}' is not supported by flotilla (only 'none')")))
        }
        _ => Err(ValueError::new(format!("Parameter 'type' does not accept value '{ty}'"))),
    }
}

const QEMU_ACCELS: &[&str] = &["tcg", "xen", "hax", "hvf", "whpx", "nvmm", "qtest"];

/// An accelerator list (`kvm`, `kvm:tcg`): the first one must be kvm (a fallback after it is
/// never used). Returns true for `help`.
fn check_accel(list: &str) -> Result<bool, ValueError> {
    let first = list.split(':').next().unwrap_or(list);
    match first {
        "kvm" => Ok(false),
        "help" | "?" => Ok(true),
        a if QEMU_ACCELS.contains(&a) => {
            Err(ValueError::new(format!("accelerator '{a}' is not supported by flotilla (only kvm)")))
        }
        a => Err(ValueError::new(format!("invalid accelerator {a}"))),
    }
}

fn opt_accel(s: &mut State, v: &str) -> Result<(), ValueError> {
    for (k, val) in parse_keyvals(v, Some("accel")) {
        match k.as_str() {
            "accel" => s.accel_help |= check_accel(&val)?,
            "kernel-irqchip" if matches!(val.as_str(), "on" | "yes" | "true") => {}
            "kernel-irqchip" => {
                return Err(ValueError::new(format!("kernel-irqchip={val} is not supported by flotilla (only on)")))
            }
            _ => return Err(ValueError::new(format!("Property 'kvm-accel.{k}' not found"))),
        }
    }
    Ok(())
}

fn machine_type_ok(t: &str) -> bool {
    matches!(t, "pc" | "q35") || t.starts_with("pc-i440fx-") || t.starts_with("pc-q35-")
}

fn opt_machine(s: &mut State, v: &str) -> Result<(), ValueError> {
    for (k, val) in parse_keyvals(v, Some("type")) {
        match k.as_str() {
            "type" if val == "help" || val == "?" => s.machine_help = true,
            "type" if machine_type_ok(&val) => {}
            "type" => {
                return Err(ValueError::with_hint(
                    format!("unsupported machine type: \"{val}\""),
                    "Use -machine help to list supported machines",
                ))
            }
            "accel" => s.accel_help |= check_accel(&val)?,
            _ => return Err(ValueError::new(format!("machine property '{k}' is not supported by flotilla"))),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_string()).collect();
    let mut st = State::default();
    let mut i = 0;
    while i < args.len() {
        let word = &args[i];
        i += 1;
        let Some(stripped) = word.strip_prefix('-') else {
            // QEMU takes a bare word as the first disk image (-hda).
            return Err(CliError::at(word, "disk image arguments (-hda) are not supported by flotilla"));
        };
        let name = stripped.strip_prefix('-').unwrap_or(stripped);
        let Some(opt) = lookup(name) else {
            return Err(CliError::at(word, "invalid option"));
        };
        match opt.handler {
            Exit(action) => return Ok(action()),
            NotYet => return Err(CliError::at(word, "option not supported yet")),
            Unsupported => return Err(CliError::at(word, "option not supported by flotilla")),
            Flag(f) => f(&mut st).map_err(|e| located(word, e))?,
            Value(_, f) => {
                let Some(arg) = args.get(i) else {
                    return Err(CliError::at(word, "requires an argument"));
                };
                i += 1;
                f(&mut st, arg).map_err(|e| located(&format!("{word} {arg}"), e))?;
            }
        }
    }
    finish(st)
}

fn located(loc: &str, e: ValueError) -> CliError {
    CliError { location: Some(loc.to_string()), message: e.message, hint: e.hint }
}

/// Cross-option checks and defaults, in QEMU's order and words.
fn finish(mut st: State) -> Result<Action, CliError> {
    if st.machine_help {
        return Ok(Action::MachineHelp);
    }
    if st.accel_help {
        return Ok(Action::AccelHelp);
    }
    if st.cfg.kernel.is_none() {
        if st.append.as_deref().is_some_and(|a| !a.is_empty()) {
            return Err(CliError::global("-append only allowed with -kernel option"));
        }
        if st.cfg.initrd.is_some() {
            return Err(CliError::global("-initrd only allowed with -kernel option"));
        }
    }
    st.cfg.cmdline = st.append.take().unwrap_or_default();

    if st.daemonize && st.nographic && st.serial.is_none() && !st.nodefaults {
        return Err(CliError::global("-nographic cannot be used with -daemonize"));
    }
    let (serial_loc, backend) = match st.serial.take() {
        Some((arg, Serial::Backend(b))) => (format!("-serial {arg}"), Some(b)),
        Some((_, Serial::None)) => (String::new(), None),
        // -nodefaults: no default COM1, not even -nographic's stdio one (as QEMU).
        None if st.nodefaults => (String::new(), None),
        None if st.nographic => ("-nographic".to_string(), Some(ChardevBackend::Stdio)),
        // QEMU's default COM1 is a "vc" console; without a display it goes nowhere.
        None => (String::new(), Some(ChardevBackend::Null)),
    };
    if st.daemonize && backend == Some(ChardevBackend::Stdio) {
        return Err(CliError::at(serial_loc, "cannot use stdio with -daemonize"));
    }
    st.cfg.serial = backend.map(|backend| ChardevConfig { id: "serial0".into(), backend });
    st.devices.finish().map_err(|(loc, e)| located(&loc, e))?;

    Ok(Action::Run(Box::new(LaunchOptions {
        machine: st.cfg,
        pidfile: st.pidfile,
        daemonize: st.daemonize,
        qmp: st.qmp,
        devices: st.devices,
    })))
}

// ---------------------------------------------------------------------------------------------
// Texts
// ---------------------------------------------------------------------------------------------

pub fn version_text() -> String {
    format!(
        "QEMU emulator version {QEMU_COMPAT_VERSION} (flotilla-{})\nFlotilla: a QEMU-compatible virtual machine monitor for Linux/KVM\n",
        env!("CARGO_PKG_VERSION")
    )
}

pub fn help_text() -> String {
    let mut s = format!(
        "{}usage: flotilla [options]\n\nOptions (spelled -opt or --opt, as in qemu-system-x86_64):\n",
        version_text()
    );
    for o in OPTIONS {
        let (arg, help) = match o.handler {
            Flag(_) | Exit(_) => ("", o.help),
            Value(meta, _) => (meta, o.help),
            NotYet | Unsupported => continue,
        };
        let left = if arg.is_empty() { format!("-{}", o.name) } else { format!("-{} {arg}", o.name) };
        if left.len() < 30 {
            s.push_str(&format!("  {left:<30} {help}\n"));
        } else {
            s.push_str(&format!("  {left}\n  {:<30} {help}\n", ""));
        }
    }
    let not_yet: Vec<String> =
        OPTIONS.iter().filter(|o| matches!(o.handler, NotYet)).map(|o| format!("-{}", o.name)).collect();
    s.push_str(&format!("\nNot supported yet: {}\n", not_yet.join(" ")));
    s.push_str(
        "\nvmm-core, qmp-gateway, blockd, balloond and netd are started from the directory of this executable,\n\
         or from $FLOTILLA_VMM_CORE, $FLOTILLA_QMP_GATEWAY, $FLOTILLA_BLOCKD, $FLOTILLA_BALLOOND and $FLOTILLA_NETD;\n\
         dbus-daemon from $FLOTILLA_DBUS_DAEMON or PATH.\n\
         Logging: RUST_LOG (e.g. RUST_LOG=debug).\n",
    );
    s
}

pub fn machine_help_text() -> String {
    format!(
        "Supported machines are:\n{:<20} Flotilla x86_64 machine (KVM, PCIe root, ACPI) (default)\n{:<20} alias of pc\n",
        MACHINE_NAME, "q35"
    )
}

pub fn accel_help_text() -> String {
    "Accelerators supported in flotilla:\nkvm\n".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> LaunchOptions {
        match parse(args) {
            Ok(Action::Run(o)) => *o,
            other => panic!("{args:?}: expected a machine, got {other:?}"),
        }
    }
    fn cfg(args: &[&str]) -> MachineConfig {
        run(args).machine
    }
    fn err(args: &[&str]) -> String {
        match parse(args) {
            Err(e) => e.to_string(),
            Ok(a) => panic!("{args:?}: expected an error, got {a:?}"),
        }
    }
    fn serial(args: &[&str]) -> Option<ChardevBackend> {
        cfg(args).serial.map(|c| {
            assert_eq!(c.id, "serial0");
            c.backend
        })
    }
    const SIZE_ERR: &str = "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

    #[test]
    fn defaults_match_qemu() {
        let o = run(&[]);
        assert_eq!(o.pidfile, None);
        assert!(!o.daemonize);
        let c = o.machine;
        assert_eq!(c.mem_bytes, 128 << 20);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.name, None);
        assert_eq!(c.uuid, None);
        assert_eq!(c.serial, Some(ChardevConfig { id: "serial0".into(), backend: ChardevBackend::Null }));
        assert!(!c.start_paused && !c.no_shutdown && !c.no_reboot);
        assert_eq!(c.cmdline, "");
    }

    #[test]
    fn table_has_no_duplicates_and_every_row_resolves() {
        for (i, o) in OPTIONS.iter().enumerate() {
            assert!(OPTIONS[i + 1..].iter().all(|p| p.name != o.name), "duplicate -{}", o.name);
            assert!(std::ptr::eq(lookup(o.name).expect("lookup"), o));
            if matches!(o.handler, Flag(_) | Value(..) | Exit(_)) {
                assert!(!o.help.is_empty(), "-{} has no help", o.name);
            }
        }
    }

    #[test]
    fn name_spellings() {
        assert_eq!(cfg(&["-name", "vm1"]).name.as_deref(), Some("vm1"));
        assert_eq!(cfg(&["--name", "vm1"]).name.as_deref(), Some("vm1"));
        assert_eq!(cfg(&["-name", "guest=vm2"]).name.as_deref(), Some("vm2"));
        assert_eq!(cfg(&["-name", "guest=vm3,debug-threads=on,process=p"]).name.as_deref(), Some("vm3"));
        assert_eq!(cfg(&["-name", "a,,b"]).name.as_deref(), Some("a,b"));
        assert_eq!(cfg(&["-name", "first", "-name", "second"]).name.as_deref(), Some("second"));
        assert_eq!(err(&["-name", "guest=a,bogus=1"]), "-name guest=a,bogus=1: Invalid parameter 'bogus'");
        assert_eq!(
            err(&["-name", "a,debug-threads=maybe"]),
            "-name a,debug-threads=maybe: Parameter 'debug-threads' expects 'on' or 'off'"
        );
        assert_eq!(err(&["-name"]), "-name: requires an argument");
    }

    #[test]
    fn uuid() {
        assert_eq!(
            cfg(&["-uuid", "6F9619FF-8B86-D011-B42D-00C04FC964FF"]).uuid.as_deref(),
            Some("6f9619ff-8b86-d011-b42d-00c04fc964ff")
        );
        assert_eq!(err(&["-uuid", "xyz"]), "-uuid xyz: failed to parse UUID string: wrong format");
        assert_eq!(
            err(&["-uuid", "6f9619ff-8b86-d011-b42d-00c04fc964f"]),
            "-uuid 6f9619ff-8b86-d011-b42d-00c04fc964f: failed to parse UUID string: wrong format"
        );
        assert_eq!(err(&["-uuid"]), "-uuid: requires an argument");
    }

    #[test]
    fn memory_spellings() {
        let mib = 1u64 << 20;
        assert_eq!(cfg(&["-m", "512"]).mem_bytes, 512 * mib);
        assert_eq!(cfg(&["-m", "512M"]).mem_bytes, 512 * mib);
        assert_eq!(cfg(&["-m", "512m"]).mem_bytes, 512 * mib);
        assert_eq!(cfg(&["-m", "2G"]).mem_bytes, 2048 * mib);
        assert_eq!(cfg(&["-m", "1T"]).mem_bytes, 1 << 40);
        assert_eq!(cfg(&["-m", "262144K"]).mem_bytes, 256 * mib);
        assert_eq!(cfg(&["-m", "1.5G"]).mem_bytes, 1536 * mib);
        assert_eq!(cfg(&["-m", "size=1G"]).mem_bytes, 1024 * mib);
        assert_eq!(cfg(&["-m", "size=300"]).mem_bytes, 300 * mib);
        assert_eq!(cfg(&["--m", "64"]).mem_bytes, 64 * mib);
        assert_eq!(cfg(&["-m", "0"]).mem_bytes, 128 * mib, "QEMU keeps the default for 0");
        assert_eq!(cfg(&["-m", "4097B"]).mem_bytes, 8192, "rounded up to 8 KiB like QEMU");
        assert_eq!(cfg(&["-m", "1000K"]).mem_bytes, 1_024_000);
        assert_eq!(cfg(&["-m", "256", "-m", "1G"]).mem_bytes, 1024 * mib);
    }

    #[test]
    fn memory_errors() {
        assert_eq!(err(&["-m", "12X"]), format!("-m 12X: {SIZE_ERR}"));
        assert_eq!(err(&["-m", "size=12X"]), format!("-m size=12X: {SIZE_ERR}"));
        assert_eq!(err(&["-m", "-5"]), format!("-m -5: {SIZE_ERR}"));
        assert_eq!(err(&["-m", ""]), format!("-m : {SIZE_ERR}"));
        assert_eq!(err(&["-m", "99999999999999"]), format!("-m 99999999999999: {SIZE_ERR}"));
        assert_eq!(err(&["-m", "1.5"]), format!("-m 1.5: {SIZE_ERR}"));
        assert_eq!(err(&["-m", "18446744073709551615B"]), format!("-m 18446744073709551615B: {SIZE_ERR}"));
        assert_eq!(err(&["-m"]), "-m: requires an argument");
        assert_eq!(err(&["-m", "1G,slots=2"]), "-m 1G,slots=2: memory hotplug ('slots') is not supported by flotilla");
        assert_eq!(
            err(&["-m", "1G,maxmem=4G"]),
            "-m 1G,maxmem=4G: memory hotplug ('maxmem') is not supported by flotilla"
        );
        assert_eq!(err(&["-m", "1G,foo=1"]), "-m 1G,foo=1: Invalid parameter 'foo'");
    }

    #[test]
    fn smp_spellings() {
        assert_eq!(cfg(&["-smp", "4"]).cpus, 4);
        assert_eq!(cfg(&["-smp", "cpus=2"]).cpus, 2);
        assert_eq!(cfg(&["-smp", "cpus=4,sockets=2,cores=2,threads=1"]).cpus, 4);
        assert_eq!(cfg(&["-smp", "4,sockets=1,cores=2,threads=2,maxcpus=4"]).cpus, 4);
        assert_eq!(cfg(&["-smp", "sockets=2,cores=3"]).cpus, 6, "cpus from the topology");
        assert_eq!(cfg(&["-smp", "maxcpus=3"]).cpus, 3);
        assert_eq!(cfg(&["-smp", "8,sockets=2"]).cpus, 8, "cores computed");
        assert_eq!(cfg(&["-smp", "8,cores=2"]).cpus, 8, "sockets computed");
        assert_eq!(cfg(&["-smp", "8,sockets=2,cores=2"]).cpus, 8, "threads computed");
        assert_eq!(cfg(&["-smp", "2,dies=1"]).cpus, 2);
        assert_eq!(cfg(&["-smp", "255"]).cpus, 255);
        assert_eq!(cfg(&["--smp", "3"]).cpus, 3);
    }

    #[test]
    fn smp_errors() {
        let zero = "Invalid CPU topology: CPU topology parameters must be greater than zero";
        assert_eq!(err(&["-smp", "0"]), format!("-smp 0: {zero}"));
        assert_eq!(err(&["-smp", "cpus=0"]), format!("-smp cpus=0: {zero}"));
        assert_eq!(err(&["-smp", "2,sockets=0"]), format!("-smp 2,sockets=0: {zero}"));
        assert_eq!(
            err(&["-smp", "256"]),
            "-smp 256: Invalid SMP CPUs 256. The max CPUs supported by machine 'pc' is 255"
        );
        assert_eq!(
            err(&["-smp", "99999999999"]),
            "-smp 99999999999: Invalid SMP CPUs 99999999999. The max CPUs supported by machine 'pc' is 255"
        );
        assert_eq!(err(&["-smp", "foo"]), "-smp foo: Parameter 'smp.cpus' expects integer");
        assert_eq!(err(&["-smp", "-1"]), "-smp -1: Parameter 'smp.cpus' expects integer");
        assert_eq!(err(&["-smp", "2,cores=x"]), "-smp 2,cores=x: Parameter 'smp.cores' expects integer");
        assert_eq!(err(&["-smp", "2,bogus=1"]), "-smp 2,bogus=1: Parameter 'smp.bogus' is unexpected");
        assert_eq!(
            err(&["-smp", "cpus=2,sockets=3"]),
            "-smp cpus=2,sockets=3: Invalid CPU topology: product of the hierarchy must match maxcpus: \
             sockets (3) * dies (1) * cores (0) * threads (1) != maxcpus (2)"
        );
        assert_eq!(
            err(&["-smp", "cpus=4,maxcpus=2"]),
            "-smp cpus=4,maxcpus=2: Invalid CPU topology: maxcpus must be equal to or greater than smp: \
             sockets (1) * dies (1) * cores (2) * threads (1) == maxcpus (2) < smp_cpus (4)"
        );
        assert_eq!(
            err(&["-smp", "2,maxcpus=4"]),
            "-smp 2,maxcpus=4: CPU hotplug is not supported by flotilla: maxcpus (4) must equal cpus (2)"
        );
        assert_eq!(err(&["-smp"]), "-smp: requires an argument");
    }

    #[test]
    fn kernel_initrd_append() {
        let c = cfg(&["-kernel", "/k", "-initrd", "/i", "-append", "console=ttyS0 panic=-1"]);
        assert_eq!(c.kernel, Some("/k".into()));
        assert_eq!(c.initrd, Some("/i".into()));
        assert_eq!(c.cmdline, "console=ttyS0 panic=-1");
        assert_eq!(cfg(&["-kernel", "/k"]).cmdline, "");
        assert_eq!(cfg(&["-append", ""]).cmdline, "", "an empty -append needs no kernel");
        assert_eq!(err(&["-initrd", "/i"]), "-initrd only allowed with -kernel option");
        assert_eq!(err(&["-append", "x"]), "-append only allowed with -kernel option");
        assert_eq!(err(&["-kernel"]), "-kernel: requires an argument");
        assert_eq!(err(&["-kernel", "/k", "-append"]), "-append: requires an argument");
    }

    #[test]
    fn serial_spellings() {
        use ChardevBackend as B;
        assert_eq!(serial(&["-serial", "stdio"]), Some(B::Stdio));
        assert_eq!(serial(&["-serial", "null"]), Some(B::Null));
        assert_eq!(serial(&["-serial", "none"]), None);
        assert_eq!(serial(&["-serial", "pty"]), Some(B::Pty));
        assert_eq!(serial(&["-serial", "file:/tmp/x.log"]), Some(B::File { path: "/tmp/x.log".into() }));
        assert_eq!(serial(&["-serial", "file:/tmp/a,b"]), Some(B::File { path: "/tmp/a,b".into() }));
        let unix = |path: &str, wait| Some(B::UnixServer { path: path.into(), wait });
        assert_eq!(serial(&["-serial", "unix:/tmp/s,server,nowait"]), unix("/tmp/s", false));
        assert_eq!(serial(&["-serial", "unix:/tmp/s,server=on,wait=off"]), unix("/tmp/s", false));
        assert_eq!(serial(&["-serial", "unix:/tmp/s,server"]), unix("/tmp/s", true));
        assert_eq!(serial(&["-serial", "unix:/tmp/s,server=on"]), unix("/tmp/s", true));
        assert_eq!(serial(&["-serial", "unix:/tmp/s,server=on,wait=on"]), unix("/tmp/s", true));
        assert_eq!(serial(&["-serial", "unix:path=/tmp/s,server=on,wait=off"]), unix("/tmp/s", false));
        assert_eq!(serial(&["-serial", "unix:/tmp/a,,b,server=on,wait=off"]), unix("/tmp/a,b", false));
        assert_eq!(serial(&["--serial", "pty"]), Some(B::Pty));
    }

    #[test]
    fn serial_errors() {
        let forms = SERIAL_FORMS;
        assert_eq!(err(&["-serial", "foo"]), format!("-serial foo: 'foo' is not a valid char driver\n{forms}"));
        assert_eq!(
            err(&["-serial", "vc"]),
            format!("-serial vc: character backend 'vc' is not supported by flotilla\n{forms}")
        );
        assert_eq!(
            err(&["-serial", "tcp:localhost:4444,server"]),
            format!("-serial tcp:localhost:4444,server: character backend 'tcp:localhost:4444,server' is not supported by flotilla\n{forms}")
        );
        assert_eq!(
            err(&["-serial", "mon:stdio"]),
            format!("-serial mon:stdio: character backend 'mon:stdio' is not supported by flotilla\n{forms}")
        );
        assert_eq!(
            err(&["-serial", "/dev/ttyS0"]),
            format!("-serial /dev/ttyS0: character backend '/dev/ttyS0' is not supported by flotilla\n{forms}")
        );
        assert_eq!(
            err(&["-serial", "chardev:c0"]),
            "-serial chardev:c0: -serial chardev: is not supported by flotilla (a -chardev serves vhost-user-blk-pci only)"
        );
        assert_eq!(err(&["-serial", "unix:/tmp/x,bogus"]), "-serial unix:/tmp/x,bogus: Invalid parameter 'bogus'");
        assert_eq!(
            err(&["-serial", "unix:/tmp/x,server,telnet"]),
            "-serial unix:/tmp/x,server,telnet: unix socket option 'telnet' is not supported by flotilla"
        );
        assert_eq!(
            err(&["-serial", "unix:/tmp/x"]),
            "-serial unix:/tmp/x: unix socket client mode is not supported by flotilla\nuse unix:PATH,server=on[,wait=off]"
        );
        assert_eq!(
            err(&["-serial", "unix:/tmp/x,server=maybe"]),
            "-serial unix:/tmp/x,server=maybe: Parameter 'server' expects 'on' or 'off'"
        );
        assert_eq!(err(&["-serial", "unix:"]), "-serial unix:: unix: needs a socket path");
        assert_eq!(err(&["-serial", "file:"]), "-serial file:: file: needs a path (file:PATH)");
        assert_eq!(
            err(&["-serial", "pty", "-serial", "null"]),
            "-serial null: flotilla supports one serial port (COM1); -serial given twice"
        );
        assert_eq!(err(&["-serial"]), "-serial: requires an argument");
    }

    #[test]
    fn nographic_and_display() {
        assert_eq!(serial(&["-nographic"]), Some(ChardevBackend::Stdio));
        assert_eq!(serial(&["-nographic", "-serial", "pty"]), Some(ChardevBackend::Pty));
        assert_eq!(serial(&["-serial", "none", "-nographic"]), None);
        assert_eq!(serial(&["-display", "none"]), Some(ChardevBackend::Null));
        assert_eq!(serial(&["-nodefaults"]), None);
        assert_eq!(serial(&["-nodefaults", "-nographic"]), None);
        assert_eq!(serial(&["-nodefaults", "-serial", "pty"]), Some(ChardevBackend::Pty));
        assert_eq!(serial(&["--nographic"]), Some(ChardevBackend::Stdio));
        assert_eq!(err(&["-display", "gtk"]), "-display gtk: display 'gtk' is not supported by flotilla (only 'none')");
        assert_eq!(
            err(&["-display", "sdl,gl=on"]),
            "-display sdl,gl=on: display 'sdl' is not supported by flotilla (only 'none')"
        );
        assert_eq!(err(&["-display", "bogus"]), "-display bogus: Parameter 'type' does not accept value 'bogus'");
        assert_eq!(err(&["-display", "none,gl=on"]), "-display none,gl=on: OpenGL is not supported by the display");
        assert_eq!(err(&["-display", "none,foo=1"]), "-display none,foo=1: Invalid parameter 'foo'");
        assert_eq!(err(&["-display", "vnc=:0"]), "-display vnc=:0: VNC is not supported yet");
        assert_eq!(err(&["-display"]), "-display: requires an argument");
    }

    #[test]
    fn run_state_flags() {
        let c = cfg(&["-S", "-no-shutdown", "-no-reboot"]);
        assert!(c.start_paused && c.no_shutdown && c.no_reboot);
        let c = cfg(&["--S", "--no-shutdown", "--no-reboot"]);
        assert!(c.start_paused && c.no_shutdown && c.no_reboot);
        assert!(!cfg(&["-no-reboot"]).start_paused);
    }

    #[test]
    fn mem_prealloc_reaches_the_machine_config() {
        assert!(!cfg(&[]).mem_prealloc, "off unless asked for");
        assert!(cfg(&["-mem-prealloc"]).mem_prealloc);
        assert!(cfg(&["--mem-prealloc", "-m", "256"]).mem_prealloc);
        let json = cfg(&["-mem-prealloc"]).to_json();
        assert!(json.contains("\"mem_prealloc\":true"), "{json}");
        // A config from a launcher that predates the field still parses (off).
        let old = json.replace(",\"mem_prealloc\":true", "");
        assert!(!old.contains("mem_prealloc"), "{old}");
        assert!(!MachineConfig::from_json(&old).expect("old config").mem_prealloc);
    }

    #[test]
    fn pidfile_and_daemonize() {
        let o = run(&["-pidfile", "/run/vm.pid", "-daemonize", "-serial", "pty"]);
        assert_eq!(o.pidfile, Some("/run/vm.pid".into()));
        assert!(o.daemonize);
        assert!(run(&["-daemonize"]).daemonize, "default null serial is fine");
        assert!(run(&["-daemonize", "-nographic", "-nodefaults"]).daemonize);
        assert!(run(&["-daemonize", "-nographic", "-serial", "null"]).daemonize);
        assert_eq!(err(&["-nographic", "-daemonize"]), "-nographic cannot be used with -daemonize");
        assert_eq!(err(&["-daemonize", "-serial", "stdio"]), "-serial stdio: cannot use stdio with -daemonize");
    }

    #[test]
    fn accelerator_spellings() {
        for args in [
            &["-enable-kvm"][..],
            &["-accel", "kvm"],
            &["--accel", "kvm"],
            &["-accel", "accel=kvm"],
            &["-accel", "kvm,kernel-irqchip=on"],
            &["-machine", "accel=kvm"],
            &["-machine", "pc,accel=kvm"],
            &["-machine", "accel=kvm:tcg"],
            &["-M", "q35,accel=kvm", "-enable-kvm"],
        ] {
            run(args);
        }
        assert_eq!(err(&["-accel", "tcg"]), "-accel tcg: accelerator 'tcg' is not supported by flotilla (only kvm)");
        assert_eq!(err(&["-accel", "foo"]), "-accel foo: invalid accelerator foo");
        assert_eq!(
            err(&["-machine", "accel=tcg"]),
            "-machine accel=tcg: accelerator 'tcg' is not supported by flotilla (only kvm)"
        );
        assert_eq!(
            err(&["-machine", "pc,accel=tcg:kvm"]),
            "-machine pc,accel=tcg:kvm: accelerator 'tcg' is not supported by flotilla (only kvm)"
        );
        assert_eq!(
            err(&["-accel", "kvm,kernel-irqchip=split"]),
            "-accel kvm,kernel-irqchip=split: kernel-irqchip=split is not supported by flotilla (only on)"
        );
        assert_eq!(
            err(&["-accel", "kvm,thread=multi"]),
            "-accel kvm,thread=multi: Property 'kvm-accel.thread' not found"
        );
        assert_eq!(parse(["-accel", "help"]), Ok(Action::AccelHelp));
        assert_eq!(err(&["-accel"]), "-accel: requires an argument");
    }

    #[test]
    fn machine_types() {
        for t in ["pc", "q35", "pc-i440fx-7.2", "pc-q35-8.0", "type=pc", "type=q35"] {
            run(&["-machine", t]);
            run(&["-M", t]);
            run(&["--machine", t]);
        }
        let hint = "Use -machine help to list supported machines";
        assert_eq!(
            err(&["-machine", "microvm"]),
            format!("-machine microvm: unsupported machine type: \"microvm\"\n{hint}")
        );
        assert_eq!(err(&["-M", "isapc"]), format!("-M isapc: unsupported machine type: \"isapc\"\n{hint}"));
        assert_eq!(
            err(&["-machine", "pc,usb=off"]),
            "-machine pc,usb=off: machine property 'usb' is not supported by flotilla"
        );
        assert_eq!(parse(["-machine", "help"]), Ok(Action::MachineHelp));
        assert_eq!(parse(["-M", "?"]), Ok(Action::MachineHelp));
        assert_eq!(err(&["-M"]), "-M: requires an argument");
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(["-version"]), Ok(Action::Version));
        assert_eq!(parse(["--version"]), Ok(Action::Version));
        assert_eq!(parse(["-h"]), Ok(Action::Help));
        assert_eq!(parse(["-help"]), Ok(Action::Help));
        assert_eq!(parse(["--help"]), Ok(Action::Help));
        // QEMU acts on -version where it appears: later junk is not looked at, earlier is.
        assert_eq!(parse(["-version", "-bogus"]), Ok(Action::Version));
        assert_eq!(err(&["-bogus", "-version"]), "-bogus: invalid option");
        let h = help_text();
        for o in ["-m [size=]megs", "-smp", "-serial dev", "-nographic", "-daemonize", "-pidfile file"] {
            assert!(h.contains(o), "help lacks {o}");
        }
        assert!(h.contains("Not supported yet: -qmp-pretty -monitor -mon"));
        assert!(h.contains("-qmp unix:PATH,server,nowait|tcp:[HOST]:PORT,server,nowait"));
        assert!(version_text().starts_with("QEMU emulator version 1.1.0 (flotilla-"));
        assert!(machine_help_text().contains("q35"));
    }

    #[test]
    fn unknown_and_malformed_options() {
        assert_eq!(err(&["-foo"]), "-foo: invalid option");
        assert_eq!(err(&["--foo"]), "--foo: invalid option");
        assert_eq!(err(&["-"]), "-: invalid option");
        assert_eq!(err(&["--"]), "--: invalid option");
        assert_eq!(err(&["---m", "1"]), "---m: invalid option");
        assert_eq!(err(&["-mem", "1"]), "-mem: invalid option", "no prefix matching");
        assert_eq!(err(&["-m=512"]), "-m=512: invalid option");
        assert_eq!(err(&["disk.img"]), "disk.img: disk image arguments (-hda) are not supported by flotilla");
        assert_eq!(err(&["-cpu", "host"]), "-cpu: option not supported by flotilla");
        assert_eq!(err(&["-hda", "x.img"]), "-hda: option not supported by flotilla");
    }

    #[test]
    fn later_options_are_refused_not_ignored() {
        for o in ["qmp-pretty", "nic", "vnc", "monitor", "mon", "blockdev"] {
            for dashes in ["-", "--"] {
                let e = parse([format!("{dashes}{o}"), "x".to_string()]).expect_err(o);
                assert_eq!(e.to_string(), format!("{dashes}{o}: option not supported yet"));
            }
        }
        // Even after valid options, and even without an argument.
        assert_eq!(err(&["-m", "1G", "-monitor"]), "-monitor: option not supported yet");
    }

    #[test]
    fn qmp_spellings() {
        let unix = |p: &str| QmpSocket::Unix { path: p.into() };
        let tcp = |h: &str, port| QmpSocket::Tcp { host: h.into(), port };
        assert_eq!(run(&["-qmp", "unix:/tmp/q.sock,server,nowait"]).qmp, [unix("/tmp/q.sock")]);
        assert_eq!(run(&["-qmp", "unix:/tmp/q.sock,server=on,wait=off"]).qmp, [unix("/tmp/q.sock")]);
        assert_eq!(run(&["--qmp", "unix:path=/tmp/q,server=on,wait=off"]).qmp, [unix("/tmp/q")]);
        assert_eq!(run(&["-qmp", "unix:/tmp/a,,b,server,nowait"]).qmp, [unix("/tmp/a,b")]);
        assert_eq!(run(&["-qmp", "tcp:localhost:4444,server,nowait"]).qmp, [tcp("localhost", 4444)]);
        assert_eq!(run(&["-qmp", "tcp::4444,server=on,wait=off"]).qmp, [tcp("127.0.0.1", 4444)], "loopback by default");
        assert_eq!(run(&["-qmp", "tcp:0.0.0.0:4444,server,nowait"]).qmp, [tcp("0.0.0.0", 4444)]);
        assert_eq!(run(&["-qmp", "tcp:[::1]:4444,server,nowait"]).qmp, [tcp("[::1]", 4444)]);
        let two = run(&["-qmp", "unix:/tmp/a,server,nowait", "-qmp", "tcp::5555,server,nowait"]).qmp;
        assert_eq!(two, [unix("/tmp/a"), tcp("127.0.0.1", 5555)]);
        assert!(run(&[]).qmp.is_empty());
        // What the gateway is given.
        assert_eq!(unix("/tmp/a,b").gateway_spec(), "unix:/tmp/a,,b,server=on,wait=off");
        assert_eq!(tcp("127.0.0.1", 4444).gateway_spec(), "tcp:127.0.0.1:4444,server=on,wait=off");
    }

    #[test]
    fn qmp_errors() {
        assert_eq!(
            err(&["-qmp", "unix:/tmp/q,server"]),
            "-qmp unix:/tmp/q,server: -qmp sockets that wait for a client before the VM starts are not supported by flotilla\nadd ',wait=off' (or ',nowait')"
        );
        assert_eq!(
            err(&["-qmp", "unix:/tmp/q"]),
            format!("-qmp unix:/tmp/q: -qmp client sockets are not supported by flotilla\n{QMP_FORMS}")
        );
        assert_eq!(
            err(&["-qmp", "stdio"]),
            format!("-qmp stdio: character backend 'stdio' is not supported for -qmp by flotilla\n{QMP_FORMS}")
        );
        assert_eq!(err(&["-qmp", "unix:,server,nowait"]), "-qmp unix:,server,nowait: unix: needs a socket path");
        assert_eq!(
            err(&["-qmp", "unix:/q,server,nowait,bogus=1"]),
            "-qmp unix:/q,server,nowait,bogus=1: Invalid parameter 'bogus'"
        );
        assert_eq!(
            err(&["-qmp", "tcp:4444,server,nowait"]),
            "-qmp tcp:4444,server,nowait: host and/or port not specified in '4444'"
        );
        assert_eq!(
            err(&["-qmp", "tcp::http,server,nowait"]),
            "-qmp tcp::http,server,nowait: tcp: port 'http' is not a number between 1 and 65535"
        );
        assert_eq!(
            err(&["-qmp", "tcp::4444,server,nowait,telnet"]),
            "-qmp tcp::4444,server,nowait,telnet: socket option 'telnet' is not supported for -qmp by flotilla"
        );
        assert_eq!(
            err(&["-qmp", "unix:/q,server,nowait", "-qmp", "unix:/q,server=on,wait=off"]),
            "-qmp unix:/q,server=on,wait=off: the same QMP socket is given twice"
        );
        assert_eq!(err(&["-qmp"]), "-qmp: requires an argument");
    }

    #[test]
    fn a_full_command_line() {
        let o = run(&[
            "-name",
            "guest=web1",
            "-uuid",
            "12345678-1234-1234-1234-123456789ABC",
            "-machine",
            "q35,accel=kvm",
            "-m",
            "2G",
            "-smp",
            "cpus=2,sockets=1,cores=2,threads=1",
            "-kernel",
            "/b/vmlinuz",
            "-initrd",
            "/b/initrd.img",
            "-append",
            "console=ttyS0",
            "-serial",
            "unix:/run/s.sock,server=on,wait=off",
            "-display",
            "none",
            "-S",
            "-no-shutdown",
            "-pidfile",
            "/run/f.pid",
            "-daemonize",
            "-enable-kvm",
        ]);
        let expected = MachineConfig {
            name: Some("web1".into()),
            uuid: Some("12345678-1234-1234-1234-123456789abc".into()),
            mem_bytes: 2 << 30,
            cpus: 2,
            kernel: Some("/b/vmlinuz".into()),
            initrd: Some("/b/initrd.img".into()),
            cmdline: "console=ttyS0".into(),
            serial: Some(ChardevConfig {
                id: "serial0".into(),
                backend: ChardevBackend::UnixServer { path: "/run/s.sock".into(), wait: false },
            }),
            start_paused: true,
            no_shutdown: true,
            no_reboot: false,
            mem_prealloc: false,
            vhost_user_devices: Vec::new(),
        };
        let want = LaunchOptions {
            machine: expected,
            pidfile: Some("/run/f.pid".into()),
            daemonize: true,
            qmp: Vec::new(),
            devices: DeviceSet::default(),
        };
        assert_eq!(o, want);
        // The JSON handed to vmm-core round-trips.
        assert_eq!(MachineConfig::from_json(&o.machine.to_json()).expect("json"), o.machine);
    }

    // -----------------------------------------------------------------------------------------
    // -drive, -device, -chardev, -balloon
    // -----------------------------------------------------------------------------------------

    use crate::devices::{Backend, DeviceSpec, DriveIf, DriveSpec};
    use vm_config::{CacheMode, DriveFormat, ErrorAction, VirtioKind};

    fn devs(args: &[&str]) -> DeviceSet {
        run(args).devices
    }
    const ID_ERR: &str =
        "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.";

    #[test]
    fn drive_defaults_and_qemu_ids() {
        let d = devs(&["-drive", "file=/i/a.img,if=virtio", "-drive", "file=/i/b.img,if=virtio,format=qcow2"]);
        assert_eq!(
            d.drives[0],
            DriveSpec {
                location: "-drive file=/i/a.img,if=virtio".into(),
                id: "virtio0".into(),
                interface: DriveIf::Virtio,
                file: "/i/a.img".into(),
                format: None,
                readonly: false,
                cache: CacheMode::Writeback,
                werror: ErrorAction::Enospc,
                rerror: ErrorAction::Report,
                serial: None,
                format_option: None,
            }
        );
        assert_eq!(d.drives[1].id, "virtio1");
        assert_eq!(d.drives[1].format, Some(DriveFormat::Qcow2));
        // Each if=virtio drive brings its virtio-blk-pci, without a qdev id (as QEMU's query-pci).
        assert_eq!(d.devices.len(), 2);
        assert_eq!(
            d.devices[0],
            DeviceSpec {
                location: "-drive file=/i/a.img,if=virtio".into(),
                id: String::new(),
                model: "virtio-blk-pci",
                kind: VirtioKind::Block,
                backend: Backend::Drive("virtio0".into()),
                num_queues: 1,
                queue_size: 256,
                pci_slot: None,
                serial: None,
                msix_vectors: None,
            }
        );
        // index= picks the unit, the next free one is used after it; if=none has its own.
        let d = devs(&[
            "-drive",
            "file=/a,if=virtio,index=2",
            "-drive",
            "/b,if=virtio",
            "-drive",
            "file=/c,if=none",
            "-drive",
            "file=/d,if=virtio,id=mine",
            "-drive",
            "file=/e,if=virtio",
        ]);
        let ids: Vec<&str> = d.drives.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(ids, ["virtio2", "virtio0", "none0", "mine", "virtio3"], "a drive with an id takes a unit too");
        assert_eq!(d.drives[1].file, PathBuf::from("/b"), "file is the implied first key");
        assert!(d.has_drives() && !d.has_balloon());
        assert!(!devs(&[]).has_drives());
    }

    #[test]
    fn drive_options() {
        let d = devs(&[
            "-drive",
            "file=/i/x,,y.img,if=virtio,format=raw,id=disk-1.a_b,readonly=on,cache=none,werror=stop,rerror=ignore,serial=SN1,media=disk",
        ]);
        let x = &d.drives[0];
        assert_eq!(x.file, PathBuf::from("/i/x,y.img"));
        assert_eq!((x.id.as_str(), x.format, x.readonly), ("disk-1.a_b", Some(DriveFormat::Raw), true));
        assert_eq!((x.cache, x.werror, x.rerror), (CacheMode::None, ErrorAction::Stop, ErrorAction::Ignore));
        assert_eq!(x.serial.as_deref(), Some("SN1"));
        for (v, c) in [
            ("writeback", CacheMode::Writeback),
            ("none", CacheMode::None),
            ("writethrough", CacheMode::Writethrough),
            ("directsync", CacheMode::Directsync),
            ("unsafe", CacheMode::Unsafe),
        ] {
            assert_eq!(devs(&["-drive", &format!("file=/a,if=virtio,cache={v}")]).drives[0].cache, c);
        }
        for (v, a) in [
            ("report", ErrorAction::Report),
            ("ignore", ErrorAction::Ignore),
            ("stop", ErrorAction::Stop),
            ("enospc", ErrorAction::Enospc),
        ] {
            assert_eq!(devs(&["-drive", &format!("file=/a,if=virtio,werror={v}")]).drives[0].werror, a);
            if a != ErrorAction::Enospc {
                assert_eq!(devs(&["-drive", &format!("file=/a,if=virtio,rerror={v}")]).drives[0].rerror, a);
            }
        }
        assert!(devs(&["-drive", "file=/a,if=virtio,readonly"]).drives[0].readonly, "short-form boolean");
        assert!(!devs(&["-drive", "file=/a,if=virtio,readonly=off"]).drives[0].readonly);
        // An unknown key is the format driver's to refuse (once the format is known).
        assert_eq!(devs(&["-drive", "file=/a,if=virtio,bogus=1"]).drives[0].format_option.as_deref(), Some("bogus"));
    }

    #[test]
    fn drive_errors_as_qemu_prints_them() {
        let e = |a: &str| err(&["-drive", a]);
        assert_eq!(e("file=/a,if=virtio,cache=foo"), "-drive file=/a,if=virtio,cache=foo: invalid cache option");
        assert_eq!(
            e("file=/a,if=virtio,werror=foo"),
            "-drive file=/a,if=virtio,werror=foo: 'foo' invalid write error action"
        );
        assert_eq!(
            e("file=/a,if=virtio,rerror=enospc"),
            "-drive file=/a,if=virtio,rerror=enospc: 'enospc' invalid read error action"
        );
        assert_eq!(
            e("file=/a,if=virtio,readonly=maybe"),
            "-drive file=/a,if=virtio,readonly=maybe: Parameter 'read-only' expects 'on' or 'off'"
        );
        assert_eq!(e("file=/a,if=foo"), "-drive file=/a,if=foo: unsupported bus type 'foo'");
        assert_eq!(e("file=/a,if=virtio,format=foo"), "-drive file=/a,if=virtio,format=foo: Unknown driver 'foo'");
        assert_eq!(
            e("file=/a,if=virtio,format=vmdk"),
            "-drive file=/a,if=virtio,format=vmdk: image format 'vmdk' is not supported by flotilla (only raw and qcow2)"
        );
        assert_eq!(e("file=/a,if=virtio,media=foo"), "-drive file=/a,if=virtio,media=foo: 'foo' invalid media");
        assert_eq!(
            e("file=/a,if=virtio,media=cdrom"),
            "-drive file=/a,if=virtio,media=cdrom: media=cdrom is not supported by flotilla (only disk)"
        );
        assert_eq!(e("if=virtio"), "-drive if=virtio: Device needs media, but drive is empty");
        assert_eq!(e("file=,if=virtio"), "-drive file=,if=virtio: A block device must be specified for \"file\"");
        assert_eq!(
            e("if=none,id=d"),
            "-drive if=none,id=d: a drive without a medium (no file=) is not supported by flotilla"
        );
        assert_eq!(e("file=/a,if=virtio,id=1a"), format!("-drive file=/a,if=virtio,id=1a: {ID_ERR}"));
        assert_eq!(e("file=/a,if=virtio,id="), format!("-drive file=/a,if=virtio,id=: {ID_ERR}"));
        assert_eq!(
            e("file=/a,if=virtio,index=x"),
            "-drive file=/a,if=virtio,index=x: Parameter 'index' expects a number"
        );
        assert_eq!(
            e("file=/a,if=virtio,format=raw,bogus=1"),
            "-drive file=/a,if=virtio,format=raw,bogus=1: Block format 'raw' does not support the option 'bogus'"
        );
        assert_eq!(
            e("file=/a,if=virtio,format=qcow2,addr=5"),
            "-drive file=/a,if=virtio,format=qcow2,addr=5: Block format 'qcow2' does not support the option 'addr'"
        );
        assert_eq!(
            e("file=/a,if=virtio,aio=native"),
            "-drive file=/a,if=virtio,aio=native: -drive option 'aio' is not supported by flotilla"
        );
        // QEMU's default interface is IDE; only virtio and none exist here.
        let hint = "flotilla supports -drive if=virtio and if=none (with -device virtio-blk-pci,drive=ID)";
        assert_eq!(
            e("file=/a"),
            format!("-drive file=/a: if=ide (QEMU's default) is not supported by flotilla\n{hint}")
        );
        assert_eq!(
            e("file=/a,if=scsi"),
            format!("-drive file=/a,if=scsi: if=scsi is not supported by flotilla\n{hint}")
        );
        assert_eq!(
            e("file=/a,if=ide"),
            format!("-drive file=/a,if=ide: if=ide (QEMU's default) is not supported by flotilla\n{hint}")
        );
        assert_eq!(
            err(&["-drive", "file=/a,if=virtio,id=a", "-drive", "file=/b,if=none,id=a"]),
            "-drive file=/b,if=none,id=a: Duplicate ID 'a' for drive"
        );
        assert_eq!(
            err(&["-drive", "file=/a,if=virtio,id=virtio1", "-drive", "file=/b,if=virtio"]),
            "-drive file=/b,if=virtio: Duplicate ID 'virtio1' for drive",
            "a generated id clashes with a given one, as in QEMU"
        );
        assert_eq!(
            err(&["-drive", "file=/a,if=virtio", "-drive", "file=/b,if=virtio,index=0"]),
            "-drive file=/b,if=virtio,index=0: drive with bus=0, unit=0 (index=0) exists"
        );
        assert_eq!(err(&["-drive"]), "-drive: requires an argument");
    }

    #[test]
    fn device_virtio_blk_pci() {
        let d = devs(&[
            "-device",
            "virtio-blk-pci,drive=d0,id=vblk0,addr=0x5,num-queues=4,serial=S,queue-size=128",
            "-drive",
            "file=/a,if=none,id=d0,format=raw",
        ]);
        assert_eq!(d.drives[0].interface, DriveIf::None);
        assert_eq!(
            d.devices,
            [DeviceSpec {
                location: "-device virtio-blk-pci,drive=d0,id=vblk0,addr=0x5,num-queues=4,serial=S,queue-size=128"
                    .into(),
                id: "vblk0".into(),
                model: "virtio-blk-pci",
                kind: VirtioKind::Block,
                backend: Backend::Drive("d0".into()),
                num_queues: 4,
                queue_size: 128,
                pci_slot: Some(5),
                serial: Some("S".into()),
                msix_vectors: None,
            }],
            "a -device may name a -drive given after it"
        );
        let d = devs(&["-drive", "file=/a,if=none,id=d0", "-device", "driver=virtio-blk-pci,drive=d0,addr=1f.0"]);
        assert_eq!((d.devices[0].pci_slot, d.devices[0].num_queues, d.devices[0].id.as_str()), (Some(0x1f), 1, ""));
        // An if=none drive no device uses is still a drive (query-block lists it).
        let d = devs(&["-drive", "file=/a,if=none,id=spare"]);
        assert_eq!((d.drives.len(), d.devices.len()), (1, 0));
        // Command-line order is PCI order.
        let d = devs(&[
            "-device",
            "virtio-balloon-pci",
            "-drive",
            "file=/a,if=virtio",
            "-drive",
            "file=/b,if=none,id=b",
            "-device",
            "virtio-blk-pci,drive=b",
        ]);
        let models: Vec<_> = d.devices.iter().map(|x| (x.model, x.backend.clone())).collect();
        assert_eq!(
            models,
            [
                ("virtio-balloon-pci", Backend::Balloon),
                ("virtio-blk-pci", Backend::Drive("virtio0".into())),
                ("virtio-blk-pci", Backend::Drive("b".into())),
            ]
        );
    }

    #[test]
    fn device_errors_as_qemu_prints_them() {
        let drive = ["-drive", "file=/a,if=none,id=d"];
        let with = |dev: &str| err(&[drive[0], drive[1], "-device", dev]);
        assert_eq!(
            err(&["-device", "virtio-blk-pci,drive=nope"]),
            "-device virtio-blk-pci,drive=nope: Property 'virtio-blk-device.drive' can't find value 'nope'"
        );
        assert_eq!(err(&["-device", "virtio-blk-pci"]), "-device virtio-blk-pci: drive property not set");
        assert_eq!(
            err(&[drive[0], drive[1], "-device", "virtio-blk-pci,drive=d", "-device", "virtio-blk-pci,drive=d,id=x"]),
            "-device virtio-blk-pci,drive=d,id=x: Drive 'd' is already in use by another device"
        );
        assert_eq!(
            err(&["-drive", "file=/a,if=virtio", "-device", "virtio-blk-pci,drive=virtio0"]),
            "-device virtio-blk-pci,drive=virtio0: Drive 'virtio0' is already in use by another device"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,bogus=1"),
            "-device virtio-blk-pci,drive=d,bogus=1: Property 'virtio-blk-pci.bogus' not found"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,chardev=c"),
            "-device virtio-blk-pci,drive=d,chardev=c: Property 'virtio-blk-pci.chardev' not found"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,num-queues=0"),
            "-device virtio-blk-pci,drive=d,num-queues=0: num-queues property must be larger than 0"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,num-queues=x"),
            "-device virtio-blk-pci,drive=d,num-queues=x: Parameter 'num-queues' expects integer"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,num-queues=65"),
            "-device virtio-blk-pci,drive=d,num-queues=65: num-queues 65 is more than flotilla supports (64)"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,queue-size=100"),
            "-device virtio-blk-pci,drive=d,queue-size=100: invalid queue-size property (100), must be > 2 and a power of 2 and <= 1024"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,addr=zz"),
            "-device virtio-blk-pci,drive=d,addr=zz: Property 'virtio-blk-pci.addr' doesn't take value 'zz'"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,addr=0x20"),
            "-device virtio-blk-pci,drive=d,addr=0x20: Property 'virtio-blk-pci.addr' doesn't take value '0x20'"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,addr=0"),
            "-device virtio-blk-pci,drive=d,addr=0: PCI: slot 0 function 0 not available for virtio-blk-pci, in use by the host bridge"
        );
        assert_eq!(
            with("virtio-blk-pci,drive=d,addr=3.1"),
            "-device virtio-blk-pci,drive=d,addr=3.1: PCI function 1 is not supported by flotilla: devices are single-function (addr=SLOT or SLOT.0)"
        );
        assert_eq!(with("virtio-blk-pci,drive=d,id=1x"), format!("-device virtio-blk-pci,drive=d,id=1x: {ID_ERR}"));
        assert_eq!(
            err(&[drive[0], drive[1], "-device", "virtio-blk-pci,drive=d,id=x", "-device", "virtio-balloon-pci,id=x"]),
            "-device virtio-balloon-pci,id=x: Duplicate ID 'x' for device"
        );
        assert_eq!(
            err(&[drive[0], drive[1], "-device", "virtio-blk-pci,drive=d,addr=5", "-device", "virtio-balloon-pci,addr=5.0"]),
            "-device virtio-balloon-pci,addr=5.0: PCI: slot 5 function 0 not available for virtio-balloon-pci, in use by virtio-blk-pci,id=(null)"
        );
        assert_eq!(err(&["-device", "foo-pci"]), "-device foo-pci: 'foo-pci' is not a valid device model name");
        assert_eq!(err(&["-device", "e1000"]), "-device e1000: device 'e1000' is not supported by flotilla");
        assert_eq!(err(&["-device", "id=x"]), "-device id=x: Parameter 'driver' is missing");
        assert_eq!(err(&["-device"]), "-device: requires an argument");
    }

    #[test]
    fn chardev_and_vhost_user_blk_pci() {
        let d = devs(&[
            "-chardev",
            "socket,id=qsd0,path=/run/qsd.sock",
            "-device",
            "vhost-user-blk-pci,chardev=qsd0,id=ext0,num-queues=2,addr=6",
        ]);
        assert_eq!(d.chardevs[0].path, PathBuf::from("/run/qsd.sock"));
        let x = &d.devices[0];
        assert_eq!((x.model, x.kind, x.id.as_str()), ("vhost-user-blk-pci", VirtioKind::Block, "ext0"));
        assert_eq!(x.backend, Backend::External("/run/qsd.sock".into()));
        assert_eq!(
            (x.num_queues, x.queue_size, x.pci_slot),
            (2, 128, Some(6)),
            "QEMU's vhost-user-blk queue-size is 128"
        );
        assert!(!d.has_drives(), "an external backend needs no blockd");
        // QEMU's reconnect= is accepted (vmm-core always reconnects); server=off is the default.
        devs(&["-chardev", "socket,id=c,path=/x,reconnect=1,server=off", "-device", "vhost-user-blk-pci,chardev=c"]);

        assert_eq!(err(&["-device", "vhost-user-blk-pci"]), "-device vhost-user-blk-pci: chardev is mandatory");
        assert_eq!(
            err(&["-device", "vhost-user-blk-pci,chardev=c"]),
            "-device vhost-user-blk-pci,chardev=c: Property 'vhost-user-blk.chardev' can't find value 'c'"
        );
        assert_eq!(
            err(&[
                "-chardev",
                "socket,id=c,path=/x",
                "-device",
                "vhost-user-blk-pci,chardev=c",
                "-device",
                "vhost-user-blk-pci,chardev=c"
            ]),
            "-device vhost-user-blk-pci,chardev=c: Property 'vhost-user-blk.chardev' can't take value 'c', it's in use"
        );
        assert_eq!(
            err(&["-chardev", "socket,id=c,path=/x", "-device", "vhost-user-blk-pci,chardev=c,drive=d"]),
            "-device vhost-user-blk-pci,chardev=c,drive=d: Property 'vhost-user-blk-pci.drive' not found"
        );
        assert_eq!(err(&["-chardev", "socket,path=/x"]), "-chardev socket,path=/x: chardev: no id specified");
        assert_eq!(err(&["-chardev", "socket,id=c"]), "-chardev socket,id=c: Unable to parse FD number ");
        assert_eq!(err(&["-chardev", "foo,id=c"]), "-chardev foo,id=c: 'foo' is not a valid char driver name");
        assert_eq!(
            err(&["-chardev", "stdio,id=c"]),
            "-chardev stdio,id=c: chardev backend 'stdio' is not supported by flotilla (only socket, for vhost-user-blk-pci)"
        );
        assert_eq!(
            err(&["-chardev", "socket,id=c,path=/x", "-chardev", "socket,id=c,path=/y"]),
            "-chardev socket,id=c,path=/y: Duplicate ID 'c' for chardev"
        );
        assert_eq!(
            err(&["-chardev", "socket,id=c,path=/x,server=on,wait=off"]),
            "-chardev socket,id=c,path=/x,server=on,wait=off: -chardev socket,server=on is not supported by flotilla: vmm-core connects to the backend's socket"
        );
        assert_eq!(
            err(&["-chardev", "socket,id=c,path=/x,bogus=1"]),
            "-chardev socket,id=c,path=/x,bogus=1: Invalid parameter 'bogus'"
        );
        assert_eq!(
            err(&["-chardev", "socket,id=c,host=h,port=1"]),
            "-chardev socket,id=c,host=h,port=1: socket option 'host' is not supported by flotilla"
        );
        assert_eq!(err(&["-chardev", "socket,id=9,path=/x"]), format!("-chardev socket,id=9,path=/x: {ID_ERR}"));
        assert_eq!(err(&["-chardev"]), "-chardev: requires an argument");
    }

    #[test]
    fn balloon_spellings() {
        let b = |args: &[&str]| {
            let d = devs(args);
            d.devices.iter().filter(|x| x.backend == Backend::Balloon).cloned().collect::<Vec<_>>()
        };
        let one = b(&["-device", "virtio-balloon-pci,id=balloon0,addr=4"]);
        assert_eq!(
            one,
            [DeviceSpec {
                location: "-device virtio-balloon-pci,id=balloon0,addr=4".into(),
                id: "balloon0".into(),
                model: "virtio-balloon-pci",
                kind: VirtioKind::Balloon,
                backend: Backend::Balloon,
                num_queues: 3,
                queue_size: 128,
                pci_slot: Some(4),
                serial: None,
                msix_vectors: None,
            }]
        );
        assert!(devs(&["-device", "virtio-balloon-pci"]).has_balloon());
        let q11 = b(&["-balloon", "virtio"]);
        assert_eq!((q11.len(), q11[0].id.as_str(), q11[0].pci_slot), (1, "", None));
        assert_eq!(b(&["-balloon", "virtio,addr=0x9"])[0].pci_slot, Some(9));
        assert!(b(&["-balloon", "none"]).is_empty());
        assert!(b(&["-balloon", "virtio", "-balloon", "none"]).is_empty(), "the last -balloon wins");
        assert_eq!(b(&["-balloon", "none", "-balloon", "virtio"]).len(), 1);
        assert!(b(&[]).is_empty(), "QEMU 1.1 had no balloon by default");

        assert_eq!(err(&["-balloon", "foo"]), "-balloon foo: Unknown -balloon argument foo");
        assert_eq!(err(&["-balloon", "virtio,foo=1"]), "-balloon virtio,foo=1: Unknown -balloon argument virtio,foo=1");
        assert_eq!(err(&["-balloon", "virtiox"]), "-balloon virtiox: Unknown -balloon argument virtiox");
        assert_eq!(
            err(&["-device", "virtio-balloon-pci", "-device", "virtio-balloon-pci"]),
            "-device virtio-balloon-pci: Only one balloon device is supported"
        );
        assert_eq!(
            err(&["-device", "virtio-balloon-pci", "-balloon", "virtio"]),
            "-balloon virtio: Only one balloon device is supported"
        );
        assert_eq!(
            err(&["-device", "virtio-balloon-pci,id=b1,bogus=2"]),
            "-device virtio-balloon-pci,id=b1,bogus=2: Property 'virtio-balloon-pci.bogus' not found"
        );
        assert_eq!(
            err(&["-device", "virtio-balloon-pci,num-queues=2"]),
            "-device virtio-balloon-pci,num-queues=2: Property 'virtio-balloon-pci.num-queues' not found"
        );
        assert_eq!(
            err(&["-device", "virtio-balloon-pci,id=1b"]),
            format!("-device virtio-balloon-pci,id=1b: {ID_ERR}")
        );
        assert_eq!(err(&["-balloon"]), "-balloon: requires an argument");
    }

    #[test]
    fn help_lists_the_device_options() {
        let h = help_text();
        for o in [
            "-drive file=F,if=virtio|none",
            "-device virtio-blk-pci,drive=ID",
            "-chardev socket,id=ID,path=PATH",
            "-balloon none|virtio",
        ] {
            assert!(h.contains(o), "help lacks {o}:\n{h}");
        }
        assert!(h.contains("$FLOTILLA_BLOCKD, $FLOTILLA_BALLOOND and $FLOTILLA_NETD"));
    }

    // Network options: their own file (flotilla/src/cli_net_tests.rs), same helpers.
    include!("cli_net_tests.rs");
}
