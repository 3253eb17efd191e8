//! `balloond`: the virtio-balloon vhost-user backend program.
//!
//! ```text
//! balloond --config-json '<vm_config::BalloondConfig>' --dbus-address ADDR --instance NAME [--ready-fd FD]
//! balloond --socket-path PATH --mem-bytes N [--dbus-address ADDR --instance NAME]
//! balloond --fd N --mem-bytes N          # N: an inherited, listening unix socket
//! balloond --print-capabilities          # {"type": "balloon"}
//! ```
//! `--stats-interval-ms MS` (default 1000, 0 = never): how often the guest's stats buffer is
//! returned to ask for fresh numbers. With `--ready-fd` it writes `ready\n` there and closes it
//! once the socket listens and, with D-Bus, the bus name is owned. Every connection gets a new
//! daemon on the same listener, so a frontend that reconnects is served again.

use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use balloond::backend::{BackendError, BalloonBackend};
use balloond::dbus::DbusServer;
use balloond::device::Device;
use daemon_start::{report_ready, BusThreadError};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_config::BalloondConfig;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

const USAGE: &str = "usage: balloond --config-json JSON --dbus-address ADDR --instance NAME [--ready-fd FD]\n       \
balloond (--socket-path PATH | --fd N) --mem-bytes N [--dbus-address ADDR --instance NAME] [--ready-fd FD]\n       \
balloond --print-capabilities\n       \
options: --stats-interval-ms MS (default 1000, 0: never ask for fresh stats)";

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("--config-json: {0}")]
    Config(#[source] vm_config::ConfigError),
    #[error("listening on the vhost-user socket {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("starting the device: {0}")]
    Device(#[source] std::io::Error),
    #[error(transparent)]
    Dbus(#[from] BusThreadError),
    #[error("setting up the backend: {0}")]
    Backend(#[from] BackendError),
    #[error("serving a connection: {0}")]
    Daemon(vhost_user_backend::Error),
}

struct Args {
    socket: Option<PathBuf>,
    fd: Option<i32>,
    mem_bytes: Option<u64>,
    dbus: Option<(String, String)>,
    ready_fd: Option<i32>,
    stats_interval: Option<Duration>,
}

fn number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, MainError> {
    v.parse().map_err(|_| MainError::Usage(format!("{name}: '{v}' is not a number")))
}

fn parse_args() -> Result<Args, MainError> {
    let mut a = Args {
        socket: None,
        fd: None,
        mem_bytes: None,
        dbus: None,
        ready_fd: None,
        stats_interval: Some(Duration::from_secs(1)),
    };
    let (mut address, mut instance, mut config) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value =
            || inline.clone().or_else(|| it.next()).ok_or_else(|| MainError::Usage(format!("{name} needs a value")));
        match name.as_str() {
            "--config-json" => config = Some(BalloondConfig::from_json(&value()?).map_err(MainError::Config)?),
            "--socket-path" => a.socket = Some(PathBuf::from(value()?)),
            "--fd" => a.fd = Some(number(&name, &value()?)?),
            "--mem-bytes" => a.mem_bytes = Some(number(&name, &value()?)?),
            "--dbus-address" => address = Some(value()?),
            "--instance" => instance = Some(value()?),
            "--ready-fd" => {
                let fd: i32 = number(&name, &value()?)?;
                if fd <= 2 {
                    return Err(MainError::Usage("--ready-fd needs a descriptor above 2".into()));
                }
                a.ready_fd = Some(fd);
            }
            "--stats-interval-ms" => {
                let ms: u64 = number(&name, &value()?)?;
                a.stats_interval = (ms > 0).then(|| Duration::from_millis(ms));
            }
            "-h" | "--help" => return Err(MainError::Usage(String::new())),
            other => return Err(MainError::Usage(format!("unknown argument '{other}'"))),
        }
    }
    if let Some(c) = config {
        if a.socket.is_some() || a.mem_bytes.is_some() {
            return Err(MainError::Usage("--config-json already names the socket and the memory size".into()));
        }
        tracing::info!(id = %c.id, "balloon device");
        a.socket = Some(c.socket);
        a.mem_bytes = Some(c.mem_bytes);
    }
    a.dbus = match (address, instance) {
        (Some(ad), Some(i)) => Some((ad, i)),
        (None, None) => None,
        _ => return Err(MainError::Usage("--dbus-address and --instance go together".into())),
    };
    Ok(a)
}

fn run() -> Result<(), MainError> {
    // The vhost-user spec's backend-program convention: with --print-capabilities, print and
    // exit, ignoring every other argument. vhost-user.json has no balloon type (no other
    // vhost-user balloon exists); "balloon" is what one would be called. No options to list.
    if std::env::args().skip(1).any(|a| a == "--print-capabilities") {
        println!("{{\"type\": \"balloon\"}}");
        return Ok(());
    }
    let args = parse_args()?;
    let mem_bytes = args.mem_bytes.ok_or_else(|| MainError::Usage("no --mem-bytes (or --config-json) given".into()))?;
    if mem_bytes == 0 {
        return Err(MainError::Usage("--mem-bytes must be above 0".into()));
    }
    exit_on_signal();
    let mut listener = match (&args.socket, args.fd) {
        (Some(path), None) => Listener::new(path, true)
            .map_err(|source| MainError::Listen { path: path.display().to_string(), source })?,
        // SAFETY: the caller hands us this descriptor as a listening unix socket (the
        // vhost-user spec's --fd convention); nothing else in this process owns it.
        (None, Some(fd)) => unsafe { Listener::from_raw_fd(fd) },
        _ => return Err(MainError::Usage("give exactly one of --socket-path (or --config-json) and --fd".into())),
    };
    let device = Device::new(mem_bytes).map_err(MainError::Device)?;
    let _bus = match &args.dbus {
        Some((address, instance)) => Some(DbusServer::start(device.clone(), address, instance)?),
        None => None,
    };
    if let Some(fd) = args.ready_fd {
        if let Err(e) = report_ready(fd) {
            tracing::warn!("cannot report readiness on fd {fd}: {e}");
        }
    }
    tracing::info!(mem_bytes, "serving");
    loop {
        serve_one(&mut listener, &device, args.stats_interval)?;
    }
}

/// Serves one frontend connection to its end.
fn serve_one(listener: &mut Listener, device: &Arc<Device>, stats_interval: Option<Duration>) -> Result<(), MainError> {
    let backend = BalloonBackend::new(device.clone())?;
    let mut daemon =
        VhostUserDaemon::new("balloond".into(), backend.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new()))
            .map_err(MainError::Daemon)?;
    daemon.start(listener).map_err(MainError::Daemon)?;
    tracing::info!("frontend connected");
    let poller = stats_interval.map(|i| backend.spawn_stats_poller(i)).transpose()?;
    match daemon.wait() {
        Ok(()) => tracing::info!("frontend disconnected"),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => tracing::info!("frontend disconnected"),
        Err(e) => tracing::warn!("connection ended: {e}"),
    }
    drop(poller);
    device.set_backend(None);
    backend.stop_workers();
    drop(daemon);
    tracing::info!(totals = ?device.counters.values(), "balloon totals so far");
    Ok(())
}

/// SIGTERM, SIGINT and SIGHUP end the process at once: the balloon keeps no state that needs
/// saving (the guest's pages are already back with the host). The signals are blocked in
/// every thread and taken by one waiting thread.
fn exit_on_signal() {
    // SAFETY: plain libc signal-set manipulation on a local, initialised sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on a valid set, writing into a local.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!("signal {sig}: exiting");
        std::process::exit(0);
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the signal thread: {e}");
    }
}

fn main() -> ExitCode {
    daemon_logging::init_from("BALLOOND_LOG", "info");
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("balloond: {e}");
            ExitCode::FAILURE
        }
    }
}
