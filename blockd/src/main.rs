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
//! again; the image is flushed whenever a connection ends.

use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use blockd::backend::BlockBackend;
use blockd::dbus::DbusServer;
use blockd::disk::{self, Format, OpenFlags};
use blockd::engine::{DriveRuntime, Image};
use blockd::request::{Drive, Limits, ID_BYTES};
use blockd::service::BlockService;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_config::{BlockdConfig, CacheMode, DriveConfig, DriveFormat, ErrorAction};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

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
    #[error("listening on {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("setting up the backend: {0}")]
    Backend(#[from] blockd::backend::BackendError),
    #[error("serving a connection: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error(transparent)]
    Dbus(#[from] daemon_start::BusThreadError),
    #[error("the recorded images: {0}")]
    State(#[from] blockd::state::StateError),
}

/// Where a drive's frontend connects.
enum SocketSpec {
    Path(PathBuf),
    Fd(i32),
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
    aio: Aio,
    config: Option<BlockdConfig>,
    socket: Option<SocketSpec>,
    drive: Option<DriveConfig>,
    num_queues: u16,
    dbus: Option<(String, String)>,
    ready_fd: Option<i32>,
    print_capabilities: bool,
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
    let mut args = Args {
        aio: Aio::IoUring,
        config: None,
        socket: None,
        drive: None,
        num_queues: 4,
        dbus: None,
        ready_fd: None,
        print_capabilities: false,
    };
    let (mut blk_file, mut read_only, mut address, mut instance) = (None, false, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value =
            || inline.clone().or_else(|| it.next()).ok_or_else(|| MainError::Usage(format!("{name} needs a value")));
        match name.as_str() {
            "--config-json" => args.config = Some(BlockdConfig::from_json(&value()?).map_err(MainError::Config)?),
            "--socket-path" => args.socket = Some(SocketSpec::Path(PathBuf::from(value()?))),
            "--fd" => {
                let fd = value()?.parse().map_err(|_| MainError::Usage("--fd: not a number".into()))?;
                args.socket = Some(SocketSpec::Fd(fd));
            }
            "--drive" => {
                // aio= is not part of DriveConfig: take it out first.
                let spec = value()?;
                let mut rest = Vec::new();
                for part in spec.split(',') {
                    match part {
                        "aio=threads" => args.aio = Aio::Threads,
                        "aio=io_uring" => args.aio = Aio::IoUring,
                        p if p.starts_with("aio=") => {
                            return Err(MainError::Usage(format!("--drive: {p}: threads or io_uring")));
                        }
                        p => rest.push(p),
                    }
                }
                args.drive = Some(parse_drive(&rest.join(","))?);
            }
            "--blk-file" => blk_file = Some(PathBuf::from(value()?)),
            "--read-only" => read_only = true,
            "--num-queues" => {
                args.num_queues =
                    value()?.parse().map_err(|_| MainError::Usage("--num-queues: not a number".into()))?;
                if !(1..=64).contains(&args.num_queues) {
                    return Err(MainError::Usage("--num-queues: 1 to 64".into()));
                }
            }
            "--dbus-address" => address = Some(value()?),
            "--instance" => instance = Some(value()?),
            "--ready-fd" => {
                let fd = value()?.parse().ok().filter(|&n: &i32| n > 2);
                args.ready_fd =
                    Some(fd.ok_or_else(|| MainError::Usage("--ready-fd needs a descriptor above 2".into()))?);
            }
            "--print-capabilities" => args.print_capabilities = true,
            "-h" | "--help" => return Err(MainError::Usage(String::new())),
            other => return Err(MainError::Usage(format!("unknown argument '{other}'"))),
        }
    }
    if let Some(file) = blk_file {
        let mut d = parse_drive(&format!("file={}", file.display()))?;
        d.readonly = read_only;
        args.drive = Some(d);
    } else if let Some(d) = args.drive.as_mut() {
        d.readonly |= read_only;
    }
    match (address, instance) {
        (Some(a), Some(i)) => args.dbus = Some((a, i)),
        (None, None) => {}
        _ => return Err(MainError::Usage("--dbus-address and --instance go together".into())),
    }
    Ok(args)
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

fn listen(spec: &SocketSpec) -> Result<Listener, MainError> {
    match spec {
        SocketSpec::Path(path) => {
            Listener::new(path, true).map_err(|source| MainError::Listen { path: path.display().to_string(), source })
        }
        // SAFETY: the caller hands us this descriptor as a listening unix socket (the
        // vhost-user spec's --fd convention); nothing else in this process owns it.
        SocketSpec::Fd(fd) => Ok(unsafe { Listener::from_raw_fd(*fd) }),
    }
}

/// Serves one drive's socket: a new daemon per frontend connection, for ever.
fn serve_socket(drive: Arc<DriveRuntime>, mut listener: Listener, num_queues: usize) -> Result<(), MainError> {
    loop {
        let backend = BlockBackend::new(drive.clone(), num_queues)?;
        let mut daemon =
            VhostUserDaemon::new("blockd".into(), backend.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new()))
                .map_err(MainError::Daemon)?;
        // io_uring completions are reaped by the queue workers themselves.
        backend.attach(&daemon.get_epoll_handlers())?;
        daemon.start(&mut listener).map_err(MainError::Daemon)?;
        tracing::info!(device = %drive.id, "frontend connected");
        match daemon.wait() {
            Ok(()) => tracing::info!(device = %drive.id, "frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(device = %drive.id, "frontend disconnected"),
            Err(e) => tracing::warn!(device = %drive.id, "connection ended: {e}"),
        }
        tracing::info!(device = %drive.id, served = ?backend.served(), "requests completed per queue");
        backend.stop_workers();
        drop(daemon);
        drive.set_backend_req(None);
        drive.drop_held();
        if !drive.drive.readonly {
            if let Err(e) = drive.drive.disk().flush() {
                tracing::error!(device = %drive.id, "flushing the image after the connection: {e}");
            }
        }
    }
}

fn run() -> Result<(), MainError> {
    let signals = block_exit_signals();
    let args = parse_args()?;
    if args.print_capabilities {
        println!("{{\"type\": \"block\", \"features\": [\"read-only\", \"blk-file\"]}}");
        return Ok(());
    }
    // (drive config, where its frontend connects)
    let mut drives: Vec<(DriveConfig, Option<SocketSpec>)> = Vec::new();
    let mut state_file = None;
    match (args.config, args.drive) {
        (Some(cfg), None) if args.socket.is_none() => {
            if args.dbus.is_none() {
                return Err(MainError::Usage("--config-json needs --dbus-address and --instance".into()));
            }
            let mut cfg = cfg;
            // A blockd restarted after a snapshot goes on with the overlays it recorded.
            if let Some(path) = &cfg.state_file {
                match blockd::state::State::load(path) {
                    Ok(Some(state)) => {
                        for id in state.apply(&mut cfg.drives) {
                            tracing::info!(device = %id, state = %path.display(), "using the image recorded before the restart");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            state_file = cfg.state_file.clone();
            for d in cfg.drives {
                let s = d.socket.clone().map(SocketSpec::Path);
                drives.push((d, s));
            }
        }
        (None, Some(mut d)) => {
            // Standalone: GET_ID answers the image's file name unless serial= says otherwise.
            if d.serial.is_none() {
                d.serial = d.file.file_name().map(|n| n.to_string_lossy().into_owned());
            }
            let socket = args.socket.ok_or_else(|| MainError::Usage("give one of --socket-path and --fd".into()))?;
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
            listeners.push((rt.clone(), listen(s)?, usize::from(cfg.num_queues.clamp(1, 64))));
        }
        runtimes.push(rt);
    }
    flush_and_exit_on_signal(signals, runtimes.clone());
    let svc = Arc::new(BlockService::new(runtimes).with_state_file(state_file));
    let _dbus = match &args.dbus {
        Some((address, instance)) => Some(DbusServer::start(svc.clone(), address, instance)?),
        None => None,
    };

    let (done_tx, done_rx) = std::sync::mpsc::channel::<(String, MainError)>();
    for (rt, listener, nq) in listeners {
        let tx = done_tx.clone();
        let id = rt.id.clone();
        std::thread::Builder::new()
            .name(format!("vu-{id}"))
            .spawn(move || {
                if let Err(e) = serve_socket(rt, listener, nq) {
                    let _ = tx.send((id, e));
                }
            })
            .map_err(|e| MainError::Usage(format!("cannot start a thread: {e}")))?;
    }
    drop(done_tx);
    if let Some(fd) = args.ready_fd {
        if let Err(e) = daemon_start::report_ready(fd) {
            tracing::warn!("cannot report readiness on fd {fd}: {e}");
        }
    }
    match done_rx.recv() {
        Ok((id, e)) => {
            tracing::error!(device = %id, "serving the drive failed: {e}");
            Err(e)
        }
        // No socket at all (only socket-less drives): serve D-Bus until a signal ends us.
        Err(_) => loop {
            std::thread::park();
        },
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and every thread started after it (call
/// it first: the I/O threads must not take them); [`flush_and_exit_on_signal`] waits for them.
fn block_exit_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local, initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// SIGTERM, SIGINT and SIGHUP (blocked by [`block_exit_signals`]) flush the images (qcow2
/// metadata lives in imago's caches) and end the process; one thread waits for them.
fn flush_and_exit_on_signal(set: libc::sigset_t, drives: Vec<Arc<DriveRuntime>>) {
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on a valid set, writing into a local.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!("signal {sig}: flushing the images and exiting");
        let mut failed = false;
        for d in drives.iter().filter(|d| !d.drive.readonly) {
            if let Err(e) = d.drive.disk().flush() {
                tracing::error!(device = %d.id, "flushing the image: {e}");
                failed = true;
            }
        }
        std::process::exit(i32::from(failed));
    });
}

fn main() -> ExitCode {
    daemon_logging::init_from("BLOCKD_LOG", "info");
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockd: {e}");
            ExitCode::FAILURE
        }
    }
}
