//! `netd`: serves a VM's virtio-net NICs over vhost-user, and set_link on D-Bus.
//!
//! ```text
//! netd --config-json '<vm_config::NetdConfig>' --dbus-address ADDR --instance NAME [--ready-fd FD]
//! netd (--socket-path PATH | --fd N) (--tap NAME [--queues N] | --tap-fd N [--tap-fd N ...] | --frames-fd N)
//!      [--mac 52:54:00:12:34:56] [--id ID] [--netdev ID] [--state-file PATH]
//!      [--dbus-address ADDR --instance NAME]
//! netd --print-capabilities              # {"type": "net"}
//! ```
//! The first is the launcher's: each NIC on its own socket, its tap descriptors (or slirp-net's
//! frame socket) inherited. The second is a plain vhost-user backend program, for
//! `qemu-system-x86_64 -netdev vhost-user,...`: `--tap` opens an existing tap (one the user may
//! use: no CAP_NET_ADMIN is needed), `--tap-fd` takes inherited tap queues, `--frames-fd` a
//! SOCK_SEQPACKET socket carrying one Ethernet frame per message. Every connection gets a new
//! daemon on the same listener; SIGTERM, SIGINT and SIGHUP end netd with status 0 (nothing to
//! save: link states are recorded as they change).

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use netd::backend::NetBackend;
use netd::dbus::DbusServer;
use netd::nic::{self, Nic};
use netd::persist::LinkStore;
use netd::port::Port;
use netd::tap::{Tap, TapError};
use vhost_backend_kit::cli::{self, Opt, Program, SocketSpec, UsageError};
use vhost_backend_kit::serve::{BoxError, Device, Servers};
use vhost_backend_kit::signals::ExitSignals;
use vhost_user_backend::VringEpollHandler;
use vm_config::{NetBackendConfig, NetdConfig, NicConfig};

const USAGE: &str = "usage: netd --config-json JSON --dbus-address ADDR --instance NAME [--ready-fd FD]\n       \
netd (--socket-path PATH | --fd N) (--tap NAME [--queues N] | --tap-fd N [--tap-fd N ...] | --frames-fd N) [--mac MAC] [--id ID] [--netdev ID] [--state-file PATH] [--dbus-address ADDR --instance NAME]\n       \
netd --print-capabilities";

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("--config-json: {0}")]
    Config(#[source] vm_config::ConfigError),
    #[error("NIC '{id}': {source}")]
    Tap {
        id: String,
        #[source]
        source: TapError,
    },
    #[error("NIC '{id}': frame socket {fd}: {source}")]
    Frames {
        id: String,
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("NIC '{id}': {source}")]
    Mac {
        id: String,
        #[source]
        source: nic::MacError,
    },
    #[error(transparent)]
    Nic(#[from] nic::NicError),
    #[error("link states: {0}")]
    State(#[from] netd::persist::PersistError),
    #[error(transparent)]
    Listen(#[from] cli::ListenError),
    #[error(transparent)]
    Serve(#[from] vhost_backend_kit::serve::ServeError),
    #[error(transparent)]
    Dbus(#[from] vhost_backend_kit::daemon_start::BusThreadError),
}

impl From<UsageError> for MainError {
    fn from(e: UsageError) -> MainError {
        MainError::Usage(e.0)
    }
}

/// One NIC on its socket: a [`NetBackend`] per connection.
struct NicDevice {
    nic: Arc<Nic>,
}

impl Device for NicDevice {
    type Backend = NetBackend;
    type Session = ();

    fn label(&self) -> &str {
        &self.nic.id
    }

    fn backend(&self) -> Result<NetBackend, BoxError> {
        Ok(NetBackend::new(self.nic.clone())?)
    }

    fn attach(&self, backend: &NetBackend, workers: &[Arc<VringEpollHandler<NetBackend>>]) -> Result<(), BoxError> {
        Ok(backend.attach(workers)?)
    }

    fn connected(&self, _backend: &NetBackend) -> Result<(), BoxError> {
        Ok(())
    }

    fn disconnected(&self, _backend: &NetBackend) {
        self.nic.set_backend(None);
        let c = &self.nic.counters;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            nic = %self.nic.id,
            rx_frames = l(&c.rx_frames), rx_dropped = l(&c.rx_dropped),
            tx_frames = l(&c.tx_frames), tx_dropped = l(&c.tx_dropped),
            bad_chains = l(&c.bad_chains),
            "totals so far"
        );
    }
}

/// The host ports of a NIC from its config: inherited tap queues or a frame socket.
fn ports(cfg: &NicConfig) -> Result<Vec<Port>, MainError> {
    let id = cfg.id.clone();
    match &cfg.backend {
        NetBackendConfig::Tap { fds, .. } => fds
            .iter()
            .map(|&fd| {
                // SAFETY: the launcher handed these descriptors to netd, one owner each.
                unsafe { Tap::from_fd(fd) }.map(Port::Tap).map_err(|source| MainError::Tap { id: id.clone(), source })
            })
            .collect(),
        NetBackendConfig::User { socket_fd: Some(fd), .. } => {
            // SAFETY: slirp-net's end of the frame socket, handed to netd alone.
            let p = unsafe { Port::frames_from_fd(*fd) }.map_err(|source| MainError::Frames { id, fd: *fd, source })?;
            Ok(vec![p])
        }
        NetBackendConfig::User { socket_fd: None, .. } => {
            // No host side: a socket whose other end nobody reads (frames to it are dropped).
            let mut fds = [0; 2];
            // SAFETY: socketpair writes two descriptors into the array.
            let rc = unsafe {
                libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
            };
            if rc != 0 {
                return Err(MainError::Frames { id, fd: -1, source: std::io::Error::last_os_error() });
            }
            // The peer end stays open for the life of the process: leaked on purpose.
            // SAFETY: ours, handed over once.
            let p = unsafe { Port::frames_from_fd(fds[0]) }.map_err(|source| MainError::Frames { id, fd: fds[0], source })?;
            Ok(vec![p])
        }
    }
}

struct Standalone {
    tap: Option<String>,
    tap_fds: Vec<i32>,
    frames_fd: Option<i32>,
    queues: u16,
    mac: String,
    id: String,
    netdev: String,
    state_file: Option<PathBuf>,
}

fn run(_exit: ExitSignals) -> Result<Infallible, MainError> {
    let mut s = Standalone {
        tap: None,
        tap_fds: Vec::new(),
        frames_fd: None,
        queues: 1,
        mac: "52:54:00:12:34:56".into(),
        id: "net0".into(),
        netdev: "hostnet0".into(),
        state_file: None,
    };
    let mut standalone_given = false;
    let common = cli::parse(std::env::args().skip(1), |opt: &mut Opt| {
        match opt.name() {
            "--tap" => s.tap = Some(opt.value()?),
            "--tap-fd" => s.tap_fds.push(opt.number()?),
            "--frames-fd" => s.frames_fd = Some(opt.number()?),
            "--queues" => {
                s.queues = opt.number()?;
                if !(1..=16).contains(&s.queues) {
                    return Err(UsageError::new("--queues: 1 to 16"));
                }
            }
            "--mac" => s.mac = opt.value()?,
            "--id" => s.id = opt.value()?,
            "--netdev" => s.netdev = opt.value()?,
            "--state-file" => s.state_file = Some(PathBuf::from(opt.value()?)),
            _ => return Ok(false),
        }
        standalone_given = true;
        Ok(true)
    })?;

    // (NIC, where its frontend connects)
    let mut nics: Vec<(Arc<Nic>, SocketSpec)> = Vec::new();
    if let Some(json) = &common.config_json {
        if standalone_given || common.socket.is_some() {
            return Err(MainError::Usage("--config-json goes without the standalone options".into()));
        }
        let cfg = NetdConfig::from_json(json).map_err(MainError::Config)?;
        let links = Arc::new(LinkStore::open(cfg.state_file.clone())?);
        let mut ids = std::collections::HashSet::new();
        for n in &cfg.nics {
            if !ids.insert(n.id.clone()) {
                return Err(MainError::Usage(format!("NIC id '{}' given twice", n.id)));
            }
            let mac = nic::parse_mac(&n.mac).map_err(|source| MainError::Mac { id: n.id.clone(), source })?;
            let ports = ports(n)?;
            if ports.len() != usize::from(n.queue_pairs.max(1)) {
                return Err(MainError::Usage(format!(
                    "NIC '{}': {} queue pair(s) but {} host descriptor(s)",
                    n.id,
                    n.queue_pairs,
                    ports.len()
                )));
            }
            let nic = Nic::new(n.id.clone(), n.netdev.clone(), mac, ports, links.clone())?;
            tracing::info!(nic = %n.id, netdev = %n.netdev, mac = %n.mac, queue_pairs = n.queue_pairs,
                vnet_hdr = nic.caps.vnet_hdr, ufo = nic.caps.ufo, "NIC");
            nics.push((nic, SocketSpec::Path(n.socket.clone())));
        }
    } else {
        let socket = common
            .socket
            .clone()
            .ok_or_else(|| MainError::Usage("give one of --socket-path (or --config-json) and --fd".into()))?;
        let backend = match (&s.tap, s.tap_fds.is_empty(), s.frames_fd) {
            (Some(name), true, None) => {
                let taps = Tap::open(name, s.queues).map_err(|source| MainError::Tap { id: s.id.clone(), source })?;
                taps.into_iter().map(Port::Tap).collect()
            }
            (None, false, None) => {
                let cfg = NicConfig {
                    id: s.id.clone(),
                    netdev: s.netdev.clone(),
                    mac: s.mac.clone(),
                    socket: PathBuf::new(),
                    queue_pairs: s.tap_fds.len() as u16,
                    backend: NetBackendConfig::Tap { fds: s.tap_fds.clone(), ifname: None, vnet_hdr: true },
                };
                ports(&cfg)?
            }
            (None, true, Some(fd)) => {
                let cfg = NicConfig {
                    id: s.id.clone(),
                    netdev: s.netdev.clone(),
                    mac: s.mac.clone(),
                    socket: PathBuf::new(),
                    queue_pairs: 1,
                    backend: NetBackendConfig::User { socket_fd: Some(fd), restrict: false, hostfwd: vec![], net: None },
                };
                ports(&cfg)?
            }
            _ => return Err(MainError::Usage("give one of --tap, --tap-fd (repeatable) and --frames-fd".into())),
        };
        let mac = nic::parse_mac(&s.mac).map_err(|source| MainError::Mac { id: s.id.clone(), source })?;
        let links = Arc::new(LinkStore::open(s.state_file.clone())?);
        let nic = Nic::new(s.id.clone(), s.netdev.clone(), mac, backend, links)?;
        tracing::info!(nic = %s.id, mac = %s.mac, queue_pairs = nic.queue_pairs, vnet_hdr = nic.caps.vnet_hdr,
            ufo = nic.caps.ufo, "NIC");
        nics.push((nic, socket));
    }

    let mut listeners = Vec::new();
    for (nic, socket) in &nics {
        listeners.push((nic.clone(), socket.listen()?));
    }
    let _bus = match &common.bus {
        Some(bus) => Some(DbusServer::start(nics.iter().map(|(n, _)| n.clone()).collect(), &bus.address, &bus.instance)?),
        None => None,
    };
    let mut servers = Servers::new();
    for (nic, listener) in listeners {
        servers.spawn(Arc::new(NicDevice { nic }), listener)?;
    }
    common.report_ready();
    tracing::info!(nics = nics.len(), "serving");
    Err(servers.wait().into())
}

// vhost-user.json's device type for virtio-net backends.
const PROGRAM: Program = Program { name: "netd", log_var: "NETD_LOG", device_type: "net", features: &[] };

fn main() -> ExitCode {
    cli::run(&PROGRAM, run)
}
