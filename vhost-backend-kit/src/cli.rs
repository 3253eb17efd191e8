//! A backend program's command line and its ends: the vhost-user spec's "Backend program
//! conventions" (`--socket-path PATH`, `--fd N`, `--print-capabilities`), Flotilla's launcher
//! form (`--config-json JSON --dbus-address ADDR --instance NAME [--ready-fd FD]`), and `main`
//! itself ([`run`]): exit signals first, then logging, then the daemon, its error printed
//! without a lock or a panic.
//!
//! Each daemon adds its own options through the callback of [`parse`]; the kit's options are
//! taken first, anything neither knows is an error.

use std::convert::Infallible;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use vhost::vhost_user::Listener;

use crate::signals::{ExitSignals, CLEANUP_DEADLINE};

/// A usage error; the daemon adds its usage text when it prints it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(text: impl Into<String>) -> UsageError {
        UsageError(text.into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listening on {path}: {source}")]
    Path {
        path: String,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("--fd {0}: not a listening unix socket")]
    NotListening(RawFd),
}

/// Where a frontend connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSpec {
    /// `--socket-path PATH`: bound here (a stale socket file replaced).
    Path(PathBuf),
    /// `--fd N`: a listening unix socket the caller handed over.
    Fd(RawFd),
}

impl SocketSpec {
    /// The listener, bound and listening.
    pub fn listen(&self) -> Result<Listener, ListenError> {
        match self {
            SocketSpec::Path(path) => Listener::new(path, true)
                .map_err(|source| ListenError::Path { path: path.display().to_string(), source }),
            SocketSpec::Fd(fd) => {
                if !is_listening_socket(*fd) {
                    return Err(ListenError::NotListening(*fd));
                }
                // SAFETY: the caller handed us this descriptor as a listening unix socket (the
                // vhost-user spec's --fd convention; checked above); nothing else owns it.
                Ok(unsafe { Listener::from_raw_fd(*fd) })
            }
        }
    }
}

/// Whether `fd` is a socket in the listening state.
fn is_listening_socket(fd: RawFd) -> bool {
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `on`; a bad fd is just an error.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, (&mut on as *mut libc::c_int).cast(), &mut len)
    };
    rc == 0 && on != 0
}

/// The bus a daemon serves on: `--dbus-address ADDR --instance NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bus {
    pub address: String,
    pub instance: String,
}

/// The options every backend program takes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Common {
    /// `--socket-path` or `--fd`.
    pub socket: Option<SocketSpec>,
    /// `--config-json`, as given: the daemon parses it into its own configuration.
    pub config_json: Option<String>,
    pub bus: Option<Bus>,
    /// `--ready-fd`: `ready\n` goes there once every socket listens and the bus name is owned.
    pub ready_fd: Option<RawFd>,
}

impl Common {
    /// Reports readiness on `--ready-fd`, if given (a failure is logged: the launcher then sees
    /// the pipe close without `ready` and says so).
    pub fn report_ready(&self) {
        if let Some(fd) = self.ready_fd {
            if let Err(e) = daemon_start::report_ready(fd) {
                tracing::warn!("cannot report readiness on fd {fd}: {e}");
            }
        }
    }
}

/// One option being parsed: `--name VALUE` or `--name=VALUE`.
pub struct Opt<'a> {
    name: String,
    inline: Option<String>,
    rest: &'a mut dyn Iterator<Item = String>,
}

impl Opt<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its value (after `=`, or the next argument).
    pub fn value(&mut self) -> Result<String, UsageError> {
        match self.inline.take() {
            Some(v) => Ok(v),
            None => self.rest.next().ok_or_else(|| UsageError(format!("{} needs a value", self.name))),
        }
    }

    /// Its value as a number.
    pub fn number<T: FromStr>(&mut self) -> Result<T, UsageError> {
        let v = self.value()?;
        v.parse().map_err(|_| UsageError(format!("{}: '{v}' is not a number", self.name)))
    }
}

/// Parses `args` (without the program name). `own` gets every option the kit does not know and
/// returns whether it is the daemon's. `-h`/`--help` is an empty [`UsageError`].
pub fn parse(
    args: impl IntoIterator<Item = String>,
    mut own: impl FnMut(&mut Opt) -> Result<bool, UsageError>,
) -> Result<Common, UsageError> {
    let mut common = Common::default();
    let (mut address, mut instance) = (None, None);
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        let mut opt = Opt { name, inline, rest: &mut it };
        match opt.name.as_str() {
            "--socket-path" => common.socket = Some(SocketSpec::Path(PathBuf::from(opt.value()?))),
            "--fd" => {
                let fd: RawFd = opt.number()?;
                if fd < 0 {
                    return Err(UsageError::new("--fd needs a descriptor"));
                }
                common.socket = Some(SocketSpec::Fd(fd));
            }
            "--config-json" => common.config_json = Some(opt.value()?),
            "--dbus-address" => address = Some(opt.value()?),
            "--instance" => instance = Some(opt.value()?),
            "--ready-fd" => {
                let fd = opt.value()?.parse().ok().filter(|&n: &RawFd| n > 2);
                common.ready_fd = Some(fd.ok_or_else(|| UsageError::new("--ready-fd needs a descriptor above 2"))?);
            }
            "-h" | "--help" => return Err(UsageError::new("")),
            _ => {
                if !own(&mut opt)? {
                    return Err(UsageError(format!("unknown argument '{}'", opt.name)));
                }
            }
        }
    }
    common.bus = match (address, instance) {
        (Some(address), Some(instance)) => Some(Bus { address, instance }),
        (None, None) => None,
        _ => return Err(UsageError::new("--dbus-address and --instance go together")),
    };
    Ok(common)
}

/// What a backend program is, for [`run`].
pub struct Program {
    /// Its name: the prefix of its error message.
    pub name: &'static str,
    /// The environment variable with its log filter (`BLOCKD_LOG`), default `info`.
    pub log_var: &'static str,
    /// `--print-capabilities`: the `type` (vhost-user.json's device type) and `features`.
    pub device_type: &'static str,
    pub features: &'static [&'static str],
}

/// The JSON `--print-capabilities` prints (`features` left out when there are none: the spec
/// makes it optional).
pub fn capabilities_json(device_type: &str, features: &[&str]) -> String {
    // The names are the program's own constants; Debug quoting is JSON quoting for them.
    if features.is_empty() {
        return format!("{{\"type\": {device_type:?}}}");
    }
    let features: Vec<String> = features.iter().map(|f| format!("{f:?}")).collect();
    format!("{{\"type\": {device_type:?}, \"features\": [{}]}}", features.join(", "))
}

/// A backend program's `main`: with `--print-capabilities` anywhere, prints them and exits 0
/// (the spec: other arguments are ignored); otherwise installs the exit signals (before any
/// thread starts), the log, and calls `daemon`, which serves until a signal ends the process
/// (see [`crate::signals`]) or returns an error, printed as `NAME: error` before the process
/// exits 1 at once.
pub fn run<E: std::fmt::Display>(
    program: &Program,
    daemon: impl FnOnce(ExitSignals) -> Result<Infallible, E>,
) -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--print-capabilities") {
        let mut out = std::io::stdout().lock();
        let printed =
            writeln!(out, "{}", capabilities_json(program.device_type, program.features)).and_then(|()| out.flush());
        return if printed.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let signals = match ExitSignals::install(CLEANUP_DEADLINE) {
        Ok(s) => s,
        Err(e) => {
            crate::logging::stderr_line(&format!("{}: {e}", program.name));
            return ExitCode::FAILURE;
        }
    };
    crate::logging::init(program.log_var, "info");
    let Err(e) = daemon(signals);
    crate::logging::stderr_line(&format!("{}: {e}", program.name));
    // SAFETY: _exit has no preconditions; serving threads may hold locks std's exit would
    // take (stdout) and nothing is left to flush: the images are flushed per connection and
    // a failed daemon has nothing more to save.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn parse_none(a: &[&str]) -> Result<Common, UsageError> {
        parse(args(a), |_| Ok(false))
    }

    #[test]
    fn the_launcher_form() {
        let c = parse_none(&[
            "--config-json",
            "{}",
            "--dbus-address",
            "unix:path=/b",
            "--instance",
            "vm1",
            "--ready-fd",
            "7",
        ])
        .expect("parsed");
        assert_eq!(c.config_json.as_deref(), Some("{}"));
        assert_eq!(c.bus, Some(Bus { address: "unix:path=/b".into(), instance: "vm1".into() }));
        assert_eq!(c.ready_fd, Some(7));
        assert_eq!(c.socket, None);
    }

    #[test]
    fn the_spec_form_with_inline_values() {
        let c = parse_none(&["--socket-path=/s.sock"]).expect("parsed");
        assert_eq!(c.socket, Some(SocketSpec::Path("/s.sock".into())));
        assert_eq!(parse_none(&["--fd", "3"]).expect("parsed").socket, Some(SocketSpec::Fd(3)));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = |a: &[&str]| parse_none(a).expect_err("an error").to_string();
        assert_eq!(e(&["--fd", "x"]), "--fd: 'x' is not a number");
        assert_eq!(e(&["--socket-path"]), "--socket-path needs a value");
        assert_eq!(e(&["--ready-fd", "2"]), "--ready-fd needs a descriptor above 2");
        assert_eq!(e(&["--instance", "i"]), "--dbus-address and --instance go together");
        assert_eq!(e(&["--bogus"]), "unknown argument '--bogus'");
        assert_eq!(e(&["--help"]), "");
    }

    #[test]
    fn the_daemon_takes_its_own_options() {
        let (mut mem, mut ro) = (None, false);
        let c = parse(args(&["--mem-bytes=4096", "--read-only", "--socket-path", "/s"]), |o| {
            match o.name() {
                "--mem-bytes" => mem = Some(o.number::<u64>()?),
                "--read-only" => ro = true,
                _ => return Ok(false),
            }
            Ok(true)
        })
        .expect("parsed");
        assert_eq!((mem, ro), (Some(4096), true));
        assert_eq!(c.socket, Some(SocketSpec::Path("/s".into())));
    }

    #[test]
    fn capabilities_are_the_specs_json() {
        assert_eq!(
            capabilities_json("block", &["read-only", "blk-file"]),
            r#"{"type": "block", "features": ["read-only", "blk-file"]}"#
        );
        assert_eq!(capabilities_json("balloon", &[]), r#"{"type": "balloon"}"#);
    }

    #[test]
    fn fd_must_be_a_listening_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        assert!(matches!(SocketSpec::Fd(fd).listen(), Err(ListenError::NotListening(_))));
        let dir = std::env::temp_dir().join(format!("kit-cli-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let l = std::os::unix::net::UnixListener::bind(dir.join("l.sock")).expect("bind");
        assert!(is_listening_socket(std::os::fd::AsRawFd::as_raw_fd(&l)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
