//! `blockd`: a standalone vhost-user-blk backend program, following the vhost-user spec's
//! conventions for backend programs.
//!
//! ```text
//! blockd --socket-path PATH --drive file=IMG,format=raw|qcow2[,readonly=on][,serial=S]
//! blockd --fd N --drive ...          # N: an inherited, listening unix socket
//! blockd --print-capabilities        # {"type": "block", ...}
//! ```
//! Options: `--num-queues N` (default 4), `--blk-file PATH` and `--read-only` (the spec's names,
//! for a raw image). Every connection gets a new daemon, so a frontend that disconnects and
//! reconnects is served again; the image is flushed whenever a connection ends.

use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use blockd::backend::BlockBackend;
use blockd::disk::{self, Format};
use blockd::request::{Drive, Limits, ID_BYTES};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

const USAGE: &str = "usage: blockd (--socket-path PATH | --fd N) --drive file=IMG,format=raw|qcow2[,readonly=on][,serial=S] [--num-queues N]\n       blockd --print-capabilities";

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error(transparent)]
    Open(#[from] disk::OpenError),
    #[error("listening on the vhost-user socket: {0}")]
    Listen(#[source] vhost::vhost_user::Error),
    #[error("setting up the backend: {0}")]
    Backend(#[from] blockd::backend::BackendError),
    #[error("serving a connection: {0}")]
    Daemon(vhost_user_backend::Error),
}

struct DriveSpec {
    file: PathBuf,
    format: Format,
    readonly: bool,
    serial: Option<String>,
}

struct Args {
    socket_path: Option<PathBuf>,
    fd: Option<i32>,
    drive: Option<DriveSpec>,
    num_queues: usize,
    print_capabilities: bool,
}

fn on_off(key: &str, v: &str) -> Result<bool, MainError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(MainError::Usage(format!("{key}={v}: expected on or off"))),
    }
}

/// `file=IMG,format=raw|qcow2[,readonly=on|off][,serial=S]` (QEMU's -drive spelling).
fn parse_drive(spec: &str) -> Result<DriveSpec, MainError> {
    let (mut file, mut format, mut readonly, mut serial) = (None, Format::Raw, false, None);
    for part in spec.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| MainError::Usage(format!("--drive: '{part}' is not key=value")))?;
        match k {
            "file" => file = Some(PathBuf::from(v)),
            "format" => format = v.parse().map_err(MainError::Usage)?,
            "readonly" => readonly = on_off(k, v)?,
            "serial" => serial = Some(v.to_string()),
            _ => return Err(MainError::Usage(format!("--drive: unknown option '{k}'"))),
        }
    }
    let file = file.ok_or_else(|| MainError::Usage("--drive needs file=".into()))?;
    Ok(DriveSpec { file, format, readonly, serial })
}

fn parse_args() -> Result<Args, MainError> {
    let mut args = Args { socket_path: None, fd: None, drive: None, num_queues: 4, print_capabilities: false };
    let mut blk_file = None;
    let mut read_only = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).ok_or_else(|| MainError::Usage(format!("{name} needs a value")));
        match name.as_str() {
            "--socket-path" => args.socket_path = Some(PathBuf::from(value()?)),
            "--fd" => args.fd = Some(value()?.parse().map_err(|_| MainError::Usage("--fd: not a number".into()))?),
            "--drive" => args.drive = Some(parse_drive(&value()?)?),
            "--blk-file" => blk_file = Some(PathBuf::from(value()?)),
            "--read-only" => read_only = true,
            "--num-queues" => {
                args.num_queues = value()?.parse().map_err(|_| MainError::Usage("--num-queues: not a number".into()))?;
                if !(1..=64).contains(&args.num_queues) {
                    return Err(MainError::Usage("--num-queues: 1 to 64".into()));
                }
            }
            "--print-capabilities" => args.print_capabilities = true,
            "-h" | "--help" => return Err(MainError::Usage(String::new())),
            other => return Err(MainError::Usage(format!("unknown argument '{other}'"))),
        }
    }
    if let Some(file) = blk_file {
        args.drive = Some(DriveSpec { file, format: Format::Raw, readonly: read_only, serial: None });
    } else if let Some(d) = args.drive.as_mut() {
        d.readonly |= read_only;
    }
    Ok(args)
}

fn run() -> Result<(), MainError> {
    let args = parse_args()?;
    if args.print_capabilities {
        println!("{{\"type\": \"block\", \"features\": [\"read-only\", \"blk-file\"]}}");
        return Ok(());
    }
    let spec = args.drive.ok_or_else(|| MainError::Usage("no --drive given".into()))?;
    let mut listener = match (&args.socket_path, args.fd) {
        (Some(path), None) => Listener::new(path, true).map_err(MainError::Listen)?,
        // SAFETY: the caller hands us this descriptor as a listening unix socket (the
        // vhost-user spec's --fd convention); nothing else in this process owns it.
        (None, Some(fd)) => unsafe { Listener::from_raw_fd(fd) },
        _ => return Err(MainError::Usage("give exactly one of --socket-path and --fd".into())),
    };
    let disk = disk::open(&spec.file, spec.format, spec.readonly)?;
    let serial = spec
        .serial
        .unwrap_or_else(|| spec.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let mut serial = serial.into_bytes();
    serial.truncate(ID_BYTES);
    let drive = Arc::new(Drive { disk, readonly: spec.readonly, serial, limits: Limits::default() });
    tracing::info!(file = %spec.file.display(), format = ?spec.format, readonly = spec.readonly,
        capacity = drive.disk.size(), "serving");
    flush_and_exit_on_signal(drive.clone());

    loop {
        let backend = BlockBackend::new(drive.clone(), args.num_queues)?;
        let mut daemon = VhostUserDaemon::new("blockd".into(), backend.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new()))
            .map_err(MainError::Daemon)?;
        daemon.start(&mut listener).map_err(MainError::Daemon)?;
        tracing::info!("frontend connected");
        match daemon.wait() {
            Ok(()) => tracing::info!("frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!("connection ended: {e}"),
        }
        tracing::info!(served = ?backend.served(), "requests completed per queue");
        backend.stop_workers();
        drop(daemon);
        if !spec.readonly {
            if let Err(e) = drive.disk.flush() {
                tracing::error!("flushing the image after the connection: {e}");
            }
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP flush the image (qcow2 metadata lives in imago's caches) and end
/// the process. The signals are blocked in every thread and taken by one waiting thread.
fn flush_and_exit_on_signal(drive: Arc<Drive>) {
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
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on a valid set, writing into a local.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!("signal {sig}: flushing the image and exiting");
        if !drive.readonly {
            if let Err(e) = drive.disk.flush() {
                tracing::error!("flushing the image: {e}");
                std::process::exit(1);
            }
        }
        std::process::exit(0);
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
