//! `blockd`: serves the drives of a VM over vhost-user-blk, and the QMP block commands on
//! D-Bus. Two forms:
//!
//! ```text
//! blockd --config-json JSON --dbus-address ADDR --instance NAME [--ready-fd FD]
//! blockd (--socket-path PATH | --fd N) --drive file=IMG,format=raw|qcow2[,readonly=on][,serial=S]
//!        [,id=ID][,cache=MODE][,werror=ACTION][,rerror=ACTION][,aio=threads|io_uring]
//!        [--num-queues N]
//!        [--dbus-address ADDR --instance NAME]
//! blockd --print-capabilities        # {"type": "block", ...}
//! ```
//! The first is how the launcher starts it: JSON is a `vm_config::BlockdConfig`; every drive
//! with a socket is served on it, every drive (with or without one) is listed by query-block;
//! `ready\n` goes to FD (then closed) once every socket listens and the bus name is owned.
//! The second is a plain vhost-user backend program (the vhost-user spec's conventions:
//! `--socket-path`, `--fd`, `--print-capabilities`, and `--blk-file PATH --read-only`).
//! Every connection gets a new daemon, so a frontend that disconnects and reconnects is served
//! again; the image is flushed whenever a connection ends. SIGTERM, SIGINT and SIGHUP flush
//! every image and end blockd: 0, or 1 if a flush failed (`vhost_backend_kit::signals`).
//! The program conventions, the serve loop and the exit are the backend kit's; this file holds
//! the drives: their options, opening them, what a connection's end does.

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use blockd::backend::BlockBackend;
use blockd::dbus::DbusServer;
use blockd::disk::{self, Format, OpenFlags};
use blockd::engine::{DriveRuntime, Image};
use blockd::request::{Drive, Limits, ID_BYTES};
use blockd::service::BlockService;
use vhost_backend_kit::cli::{self, Common, Opt, Program, UsageError};
use vhost_backend_kit::serve::{BoxError, Device, Servers};
use vhost_backend_kit::signals::ExitSignals;
use vhost_user_backend::VringEpollHandler;
use vm_config::{BlockdConfig, CacheMode, DriveConfig, DriveFormat, ErrorAction};

const USAGE: &str = "usage: blockd --config-json JSON --dbus-address ADDR --instance NAME [--ready-fd FD]\n       \
blockd (--socket-path PATH | --fd N) --drive file=IMG,format=raw|qcow2[,readonly=on][,serial=S][,id=ID][,cache=C][,werror=A][,rerror=A][,aio=threads|io_uring] [--num-queues N] [--dbus-address ADDR --instance NAME]\n       \
blockd --print-capabilities";

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("--config-json: {0}")]
    Config(#[source] vm_config::ConfigError),
    #[error("drive '{id}': {source}")]
    Open {
        id: String,
        #[source]
        source: disk::OpenError,
    },
    #[error(transparent)]
    Listen(#[from] cli::ListenError),
    #[error(transparent)]
    Serve(#[from] vhost_backend_kit::serve::ServeError),
    #[error(transparent)]
    Dbus(#[from] vhost_backend_kit::daemon_start::BusThreadError),
    #[error("the recorded images: {0}")]
    State(#[from] blockd::state::StateError),
}

impl From<UsageError> for MainError {
    fn from(e: UsageError) -> MainError {
        MainError::Usage(e.0)
    }
}

/// `aio=`: how raw images do their reads and writes (QEMU's option name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aio {
    /// One io_uring per drive (the default; the pool where the kernel refuses io_uring).
    IoUring,
    /// Every request on a thread of the drive's pool.
    Threads,
}

struct Args {
    common: Common,
    aio: Aio,
    config: Option<BlockdConfig>,
    drive: Option<DriveConfig>,
    num_queues: u16,
}

fn on_off(key: &str, v: &str) -> Result<bool, MainError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(MainError::Usage(format!("{key}={v}: expected on or off"))),
    }
}

fn cache_mode(v: &str) -> Result<CacheMode, MainError> {
    Ok(match v {
        "writeback" => CacheMode::Writeback,
        "none" => CacheMode::None,
        "writethrough" => CacheMode::Writethrough,
        "directsync" => CacheMode::Directsync,
        "unsafe" => CacheMode::Unsafe,
        _ => return Err(MainError::Usage(format!("cache={v}: writeback, none, writethrough, directsync or unsafe"))),
    })
}

fn error_action(k: &str, v: &str) -> Result<ErrorAction, MainError> {
    Ok(match v {
        "report" => ErrorAction::Report,
        "ignore" => ErrorAction::Ignore,
        "stop" => ErrorAction::Stop,
        "enospc" => ErrorAction::Enospc,
        _ => return Err(MainError::Usage(format!("{k}={v}: report, ignore, stop or enospc"))),
    })
}

/// `file=IMG,format=raw|qcow2[,readonly=on|off][,serial=S][,id=..][,cache=..][,werror=..][,rerror=..]`
/// (QEMU's -drive spelling).
fn parse_drive(spec: &str) -> Result<DriveConfig, MainError> {
    let mut d = DriveConfig {
        id: "drive0".into(),
        file: PathBuf::new(),
        format: DriveFormat::Raw,
        readonly: false,
        cache: CacheMode::Writeback,
        werror: ErrorAction::Enospc,
        rerror: ErrorAction::Report,
        serial: None,
        socket: None,
        num_queues: 4,
    };
    let mut file = None;
    for part in spec.split(',') {
        let (k, v) =
            part.split_once('=').ok_or_else(|| MainError::Usage(format!("--drive: '{part}' is not key=value")))?;
        match k {
            "file" => file = Some(PathBuf::from(v)),
            "format" => {
                d.format = match v.parse::<Format>().map_err(MainError::Usage)? {
                    Format::Raw => DriveFormat::Raw,
                    Format::Qcow2 => DriveFormat::Qcow2,
                }
            }
            "readonly" => d.readonly = on_off(k, v)?,
            "serial" => d.serial = Some(v.to_string()),
            "id" => d.id = v.to_string(),
            "cache" => d.cache = cache_mode(v)?,
            "werror" => d.werror = error_action(k, v)?,
            "rerror" => d.rerror = error_action(k, v)?,
            _ => return Err(MainError::Usage(format!("--drive: unknown option '{k}'"))),
        }
    }
    d.file = file.ok_or_else(|| MainError::Usage("--drive needs file=".into()))?;
    Ok(d)
}

fn parse_args() -> Result<Args, MainError> {
    let (mut aio, mut drive, mut num_queues) = (Aio::IoUring, None, 4u16);
    let (mut blk_file, mut read_only) = (None, false);
    // Errors of blockd's own options, which are richer than a usage line.
    let mut own_error = None;
    let mut own = |opt: &mut Opt| -> Result<bool, UsageError> {
        match opt.name() {
            "--drive" => {
                // aio= is not part of DriveConfig: take it out first.
                let spec = opt.value()?;
                let mut rest = Vec::new();
                for part in spec.split(',') {
                    match part {
                        "aio=threads" => aio = Aio::Threads,
                        "aio=io_uring" => aio = Aio::IoUring,
                        p if p.starts_with("aio=") => {
                            return Err(UsageError(format!("--drive: {p}: threads or io_uring")));
                        }
                        p => rest.push(p),
                    }
                }
                match parse_drive(&rest.join(",")) {
                    Ok(d) => drive = Some(d),
                    Err(e) => {
                        own_error = Some(e);
                        return Err(UsageError::new(""));
                    }
                }
            }
            "--blk-file" => blk_file = Some(PathBuf::from(opt.value()?)),
            "--read-only" => read_only = true,
            "--num-queues" => {
                num_queues = opt.value()?.parse().map_err(|_| UsageError::new("--num-queues: not a number"))?;
                if !(1..=64).contains(&num_queues) {
                    return Err(UsageError::new("--num-queues: 1 to 64"));
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let parsed = cli::parse(std::env::args().skip(1), &mut own);
    if let Some(e) = own_error {
        return Err(e);
    }
    let common = parsed?;
    let config = common.config_json.as_deref().map(BlockdConfig::from_json).transpose().map_err(MainError::Config)?;
    if let Some(file) = blk_file {
        let mut d = parse_drive(&format!("file={}", file.display()))?;
        d.readonly = read_only;
        drive = Some(d);
    } else if let Some(d) = drive.as_mut() {
        d.readonly |= read_only;
    }
    Ok(Args { common, aio, config, drive, num_queues })
}

/// Opens a drive's image and wraps it for serving.
fn open_drive(cfg: &DriveConfig, aio: Aio) -> Result<Arc<DriveRuntime>, MainError> {
    let direct = matches!(cfg.cache, CacheMode::None | CacheMode::Directsync);
    let format = Format::from(cfg.format);
    let flags = OpenFlags { readonly: cfg.readonly, direct };
    let disk = disk::open(&cfg.file, format, flags).map_err(|source| MainError::Open { id: cfg.id.clone(), source })?;
    let mut serial = cfg.serial.clone().unwrap_or_else(|| cfg.id.clone()).into_bytes();
    serial.truncate(ID_BYTES);
    let mut drive = Drive::new(disk, cfg.readonly, serial, Limits::default());
    drive.cache = cfg.cache;
    drive.werror = cfg.werror;
    drive.rerror = cfg.rerror;
    tracing::info!(id = %cfg.id, file = %cfg.file.display(), ?format, readonly = cfg.readonly, cache = ?cfg.cache,
        werror = ?cfg.werror, rerror = ?cfg.rerror, capacity = drive.disk().size(), "drive open");
    let uring = match (aio, format) {
        (Aio::IoUring, Format::Raw) => match blockd::uring::Uring::new(&cfg.id) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(id = %cfg.id, "io_uring unavailable ({e}): using the thread pool");
                None
            }
        },
        _ => None,
    };
    tracing::info!(id = %cfg.id, io_uring = uring.is_some(), "I/O engine");
    Ok(DriveRuntime::with_uring(&cfg.id, drive, Image { file: cfg.file.clone(), format }, direct, uring))
}

/// One drive served on a socket: a [`BlockBackend`] per connection.
struct DriveDevice {
    drive: Arc<DriveRuntime>,
    num_queues: usize,
}

impl Device for DriveDevice {
    type Backend = BlockBackend;
    type Session = ();

    fn label(&self) -> &str {
        &self.drive.id
    }

    fn backend(&self) -> Result<BlockBackend, BoxError> {
        Ok(BlockBackend::new(self.drive.clone(), self.num_queues)?)
    }

    fn attach(&self, backend: &BlockBackend, workers: &[Arc<VringEpollHandler<BlockBackend>>]) -> Result<(), BoxError> {
        // io_uring completions are reaped by the queue workers themselves.
        Ok(backend.attach(workers)?)
    }

    fn connected(&self, _backend: &BlockBackend) -> Result<(), BoxError> {
        Ok(())
    }

    fn disconnected(&self, backend: &BlockBackend) {
        let drive = &self.drive;
        tracing::info!(device = %drive.id, served = ?backend.served(), "requests completed per queue");
        drive.set_backend_req(None);
        drive.drop_held();
        if !drive.drive.readonly {
            if let Err(e) = drive.drive.disk().flush() {
                tracing::error!(device = %drive.id, "flushing the image after the connection: {e}");
            }
        }
    }
}

/// Flushes every writable image (qcow2 metadata may still be in imago's caches) and returns
/// the exit status: 1 if one failed. Logs only after flushing: stderr may be a full pipe.
fn flush_images(drives: &[Arc<DriveRuntime>]) -> i32 {
    let failed: Vec<_> = drives
        .iter()
        .filter(|d| !d.drive.readonly)
        .filter_map(|d| d.drive.disk().flush().err().map(|e| (d.id.clone(), e)))
        .collect();
    for (id, e) in &failed {
        tracing::error!(device = %id, "flushing the image: {e}");
    }
    i32::from(!failed.is_empty())
}

fn run(exit: ExitSignals) -> Result<Infallible, MainError> {
    let args = parse_args()?;
    // (drive config, where its frontend connects)
    let mut drives: Vec<(DriveConfig, Option<cli::SocketSpec>)> = Vec::new();
    let mut state_file = None;
    match (args.config, args.drive) {
        (Some(cfg), None) if args.common.socket.is_none() => {
            if args.common.bus.is_none() {
                return Err(MainError::Usage("--config-json needs --dbus-address and --instance".into()));
            }
            let mut cfg = cfg;
            // A blockd restarted after a snapshot goes on with the overlays it recorded.
            if let Some(path) = &cfg.state_file {
                if let Some(state) = blockd::state::State::load(path)? {
                    for id in state.apply(&mut cfg.drives) {
                        tracing::info!(device = %id, state = %path.display(), "using the image recorded before the restart");
                    }
                }
            }
            state_file = cfg.state_file.clone();
            for d in cfg.drives {
                let s = d.socket.clone().map(cli::SocketSpec::Path);
                drives.push((d, s));
            }
        }
        (None, Some(mut d)) => {
            // Standalone: GET_ID answers the image's file name unless serial= says otherwise.
            if d.serial.is_none() {
                d.serial = d.file.file_name().map(|n| n.to_string_lossy().into_owned());
            }
            let socket = args
                .common
                .socket
                .clone()
                .ok_or_else(|| MainError::Usage("give one of --socket-path and --fd".into()))?;
            d.num_queues = args.num_queues;
            drives.push((d, Some(socket)));
        }
        (None, None) => return Err(MainError::Usage("no --drive or --config-json given".into())),
        _ => return Err(MainError::Usage("--config-json goes without --drive, --socket-path and --fd".into())),
    }
    let mut ids = std::collections::HashSet::new();
    for (d, _) in &drives {
        if !ids.insert(d.id.clone()) {
            return Err(MainError::Usage(format!("drive id '{}' given twice", d.id)));
        }
    }

    let mut runtimes = Vec::new();
    let mut listeners = Vec::new();
    for (cfg, socket) in &drives {
        let rt = open_drive(cfg, args.aio)?;
        if let Some(s) = socket {
            listeners.push((rt.clone(), s.listen()?, usize::from(cfg.num_queues.clamp(1, 64))));
        }
        runtimes.push(rt);
    }
    let all = runtimes.clone();
    exit.on_exit({
        let runtimes = runtimes.clone();
        move |_signal| flush_images(&runtimes)
    });
    let svc = Arc::new(BlockService::new(runtimes).with_state_file(state_file));
    let _dbus = match &args.common.bus {
        Some(bus) => Some(DbusServer::start(svc.clone(), &bus.address, &bus.instance)?),
        None => None,
    };
    let mut servers = Servers::new();
    for (drive, listener, num_queues) in listeners {
        servers.spawn(Arc::new(DriveDevice { drive, num_queues }), listener)?;
    }
    args.common.report_ready();
    let failed = servers.wait();
    // A socket can no longer be served and blockd ends: what the frontends wrote is made
    // durable first, as on a signal.
    flush_images(&all);
    Err(failed.into())
}

const PROGRAM: Program =
    Program { name: "blockd", log_var: "BLOCKD_LOG", device_type: "block", features: &["read-only", "blk-file"] };

fn main() -> ExitCode {
    cli::run(&PROGRAM, run)
}
