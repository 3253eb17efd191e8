//! The command line:
//!
//! ```text
//! qmp-gateway --dbus-address ADDR --instance NAME --qmp SPEC [--qmp SPEC]...
//!             [--daemon NAME]... [--call-timeout SECONDS] [--nic JSON]...
//! ```
//!
//! `--nic` describes one NIC for `info network` ([`crate::hmp_net::Nic`]).
//!
//! `SPEC` is QEMU's `-qmp` chardev text for a listening socket: `unix:PATH,server,nowait`,
//! `unix:PATH,server=on,wait=off`, `tcp:HOST:PORT,server,nowait` (an empty HOST is
//! 127.0.0.1; `[::1]` for IPv6). `,,` in a path is a comma, as in QEMU's option syntax.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_schema::dbus::INTERFACES;

/// Where a QMP listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// One `--qmp` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpSpec {
    /// As given, for messages.
    pub text: String,
    pub endpoint: Endpoint,
    /// `wait=on` (QEMU's default for a server without `nowait`): QEMU would hold the guest
    /// until a client connects. The gateway never holds the guest; the launcher may.
    pub wait: bool,
}

/// The gateway's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub dbus_address: String,
    pub instance: String,
    pub qmp: Vec<QmpSpec>,
    /// Daemons the launcher configured for this VM (vmm-core always is).
    pub daemons: Vec<String>,
    pub call_timeout: Duration,
    /// `--nic`: the VM's NICs, for `info network`.
    pub nics: Vec<crate::hmp_net::Nic>,
}

pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub const USAGE: &str = "usage: qmp-gateway --dbus-address ADDR --instance NAME --qmp SPEC [--qmp SPEC]...
                   [--daemon vmm-core|blockd|netd|displayd|balloond]... [--call-timeout SECONDS] [--nic JSON]...
  SPEC: unix:PATH,server,nowait | unix:PATH,server=on,wait=off | tcp:[HOST]:PORT,server,nowait
  (normally started by the flotilla launcher)";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error("{USAGE}")]
    Help,
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("-qmp {spec}: {why}")]
    Spec { spec: String, why: String },
}

/// QEMU's on/off words.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Splits at commas, `,,` being a literal comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("never empty").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("never empty").push(c);
        }
    }
    parts
}

/// Parses one `-qmp` chardev text.
pub fn parse_qmp_spec(text: &str) -> Result<QmpSpec, CliError> {
    let err = |why: String| CliError::Spec { spec: text.to_string(), why };
    let parts = split_opts(text);
    let (addr, opts) = parts.split_first().expect("split gives at least one part");
    let endpoint = if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(err("a unix socket needs a path".into()));
        }
        Endpoint::Unix(PathBuf::from(path))
    } else if let Some(hp) = addr.strip_prefix("tcp:") {
        let (host, port) = hp.rsplit_once(':').ok_or_else(|| err("expected tcp:HOST:PORT".into()))?;
        let port: u16 = port.parse().map_err(|_| err(format!("port '{port}' is not a number from 0 to 65535")))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let host = if host.is_empty() { "127.0.0.1".to_string() } else { host.to_string() };
        Endpoint::Tcp { host, port }
    } else {
        return Err(err("only unix:PATH and tcp:HOST:PORT listening sockets are supported".into()));
    };
    let mut server = false;
    let mut wait = true;
    for opt in opts {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        let flag = |v: Option<&str>| match v {
            None => Ok(true),
            Some(v) => parse_bool(v).ok_or_else(|| err(format!("Parameter '{key}' expects 'on' or 'off'"))),
        };
        match key {
            "server" => server = flag(value)?,
            "wait" => wait = flag(value)?,
            "nowait" if value.is_none() => wait = false,
            "ipv4" | "ipv6" | "nodelay" if matches!(endpoint, Endpoint::Tcp { .. }) => {
                flag(value)?;
            }
            _ => return Err(err(format!("Invalid parameter '{key}'"))),
        }
    }
    if !server {
        return Err(err("the gateway only listens: add 'server' (client-mode sockets are not supported)".into()));
    }
    Ok(QmpSpec { text: text.to_string(), endpoint, wait })
}

/// Parses the arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Config, CliError> {
    let mut args = args.into_iter();
    let mut dbus_address = None;
    let mut instance = None;
    let mut qmp = Vec::new();
    let mut daemons = Vec::new();
    let mut call_timeout = DEFAULT_CALL_TIMEOUT;
    let mut nics = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Err(CliError::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value =
            || inline.clone().or_else(|| args.next()).ok_or_else(|| CliError::Usage(format!("{name} needs a value")));
        match name.as_str() {
            "--dbus-address" => dbus_address = Some(value()?),
            "--instance" => instance = Some(value()?),
            "--qmp" => qmp.push(parse_qmp_spec(&value()?)?),
            "--daemon" => {
                let d = value()?;
                if !INTERFACES.iter().any(|i| i.daemon == d) {
                    return Err(CliError::Usage(format!("--daemon: unknown daemon '{d}'")));
                }
                daemons.push(d);
            }
            "--nic" => nics.push(crate::hmp_net::parse_nic(&value()?).map_err(CliError::Usage)?),
            "--call-timeout" => {
                let v = value()?;
                let secs: f64 =
                    v.parse().ok().filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 3600.0).ok_or_else(|| {
                        CliError::Usage(format!("--call-timeout: '{v}' is not a number of seconds (0-3600)"))
                    })?;
                call_timeout = Duration::from_secs_f64(secs);
            }
            other => return Err(CliError::Usage(format!("unknown argument '{other}'"))),
        }
    }
    let dbus_address = dbus_address.ok_or_else(|| CliError::Usage("--dbus-address is required".into()))?;
    let instance = instance.ok_or_else(|| CliError::Usage("--instance is required".into()))?;
    if qmp.is_empty() {
        return Err(CliError::Usage("at least one --qmp is required".into()));
    }
    Ok(Config { dbus_address, instance, qmp, daemons, call_timeout, nics })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Result<QmpSpec, String> {
        parse_qmp_spec(s).map_err(|e| e.to_string())
    }

    #[test]
    fn qemu_spellings() {
        let s = spec("unix:/run/vm/qmp.sock,server,nowait").unwrap();
        assert_eq!(s.endpoint, Endpoint::Unix("/run/vm/qmp.sock".into()));
        assert!(!s.wait);
        let s = spec("unix:/a,,b.sock,server=on,wait=off").unwrap();
        assert_eq!(s.endpoint, Endpoint::Unix("/a,b.sock".into()));
        assert!(!s.wait);
        assert_eq!(
            spec("tcp::4444,server,nowait").unwrap().endpoint,
            Endpoint::Tcp { host: "127.0.0.1".into(), port: 4444 }
        );
        assert_eq!(
            spec("tcp:0.0.0.0:4444,server=on,wait=off").unwrap().endpoint,
            Endpoint::Tcp { host: "0.0.0.0".into(), port: 4444 }
        );
        assert_eq!(spec("tcp:[::1]:5,server,nowait").unwrap().endpoint, Endpoint::Tcp { host: "::1".into(), port: 5 });
        assert!(spec("unix:/x,server").unwrap().wait, "QEMU's default is wait=on");
        assert!(spec("tcp:localhost:1,server,nowait,nodelay,ipv4=on").is_ok());
    }

    #[test]
    fn refused_specs() {
        assert_eq!(
            spec("unix:/x").unwrap_err(),
            "-qmp unix:/x: the gateway only listens: add 'server' (client-mode sockets are not supported)"
        );
        assert_eq!(spec("unix:/x,server,foo").unwrap_err(), "-qmp unix:/x,server,foo: Invalid parameter 'foo'");
        assert!(spec("tcp::99999,server").unwrap_err().contains("port '99999'"));
        assert!(spec("tcp:4444,server").unwrap_err().contains("expected tcp:HOST:PORT"));
        assert!(spec("stdio").is_err());
        assert!(spec("unix:,server").is_err());
        assert!(spec("unix:/x,server=maybe").unwrap_err().contains("expects 'on' or 'off'"));
    }

    fn args(a: &[&str]) -> Result<Config, CliError> {
        parse(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn command_line() {
        let c = args(&[
            "--dbus-address",
            "unix:path=/tmp/bus",
            "--instance=vm1",
            "--qmp",
            "unix:/a,server,nowait",
            "--qmp=tcp::4444,server,nowait",
            "--daemon",
            "balloond",
            "--call-timeout",
            "2.5",
        ])
        .unwrap();
        assert_eq!(c.dbus_address, "unix:path=/tmp/bus");
        assert_eq!(c.instance, "vm1");
        assert_eq!(c.qmp.len(), 2);
        assert_eq!(c.daemons, ["balloond"]);
        assert_eq!(c.call_timeout, Duration::from_millis(2500));
        assert_eq!(args(&["--help"]), Err(CliError::Help));
        assert!(
            matches!(args(&["--instance", "x", "--qmp", "unix:/a,server"]), Err(CliError::Usage(m)) if m.contains("--dbus-address"))
        );
        assert!(
            matches!(args(&["--dbus-address", "a", "--instance", "x"]), Err(CliError::Usage(m)) if m.contains("--qmp"))
        );
        assert!(matches!(args(&["--daemon", "nosuchd"]), Err(CliError::Usage(m)) if m.contains("nosuchd")));
        let nic = r#"{"name":"nic0","model":"virtio-net-pci","macaddr":"52:54:00:12:34:56","peer":{"name":"n0","type":"user","info":"net=10.0.2.0,restrict=off"}}"#;
        let base = ["--dbus-address", "unix:path=/b", "--instance", "v", "--qmp", "unix:/a,server,nowait"];
        let c = args(&[&base[..], &["--nic", nic]].concat()).unwrap();
        assert_eq!((c.nics.len(), c.nics[0].name.as_str(), c.nics[0].queues), (1, "nic0", 1));
        assert!(
            matches!(args(&[&base[..], &["--nic", "{}"]].concat()), Err(CliError::Usage(m)) if m.starts_with("--nic: not a NIC description"))
        );
        assert!(matches!(args(&["--bogus"]), Err(CliError::Usage(m)) if m.contains("--bogus")));
        assert!(matches!(args(&["--instance"]), Err(CliError::Usage(m)) if m.contains("needs a value")));
    }
}
