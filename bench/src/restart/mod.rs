//! `flotilla-bench restart`: a vhost-user-blk backend SIGKILLed and restarted under a Linux
//! guest that writes and verifies, blockd against qemu-storage-daemon behind the same frontend
//! (QEMU TCG, chardev `reconnect=1`) in one run. The rig (guest load, kill loop, host-side image
//! check) is `flotilla_tests::restart`, the same as the `blockd_qemu_restart` test's; this part
//! runs it once per backend with N kills and reports recovery times and error / lost-write
//! counts side by side (see bench/README.md, "restart").

mod report;
mod vmm;
mod vmm_report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use flotilla_tests::restart::backend::{Backend, Kind, Spec};
use flotilla_tests::restart::qemu::Qemu;
use flotilla_tests::restart::soak::{check_image, soak, Settings};
use flotilla_tests::restart::workload::Load;
use flotilla_tests::restart::RigError;
use serde_json::json;

use report::BackendRun;
use vmm::Mode;

const USAGE: &str = "\
usage: flotilla-bench restart [options]

  A Linux guest (QEMU TCG, vhost-user-blk-pci with chardev reconnect=1) writes and verifies
  with O_DIRECT while the backend is SIGKILLed right after the guest reports requests in
  flight, and restarted on the same socket, N times; blockd and qemu-storage-daemon in turn.
  Reports SIGKILL -> guest I/O flowing again (ms), errors, lost or duplicated writes (guest
  read-backs that differ, and image slots on the host that differ from the last pass written),
  and hangs; ratios blockd/qsd.

  With --frontend vmm-core: vmm-core under KVM runs the project's test guest, whose `blkpulse`
  keeps up to 32 requests in flight and prints a line per completion (stamped on arrival);
  the backend is SIGKILLed right after a completion line saying requests are in flight, and
  recovery is SIGKILL -> the first completion after it. Backends: blockd and
  qemu-storage-daemon standalone (-chardev socket + -device vhost-user-blk-pci), restarted by
  the bench at once, and blockd under the launcher (-drive if=virtio), restarted by the
  launcher. Errors, lost or duplicated writes: the guest's checks and the image on the host.

options:
  --frontend F        qemu (QEMU 7.2 TCG + Linux, the default) or vmm-core
  --kills N           kills per backend (default 100)
  --only LIST         backends, comma-separated: blockd,qsd (default both); with
                      --frontend vmm-core also launcher (default all three)
  --format F          raw or qcow2 (default raw; vmm-core: raw only)
  --writers N         guest writers in parallel (default 4)
  --progress-s SECS   after a kill, limit for every writer to progress before it counts as a
                      hang (default 45)
  --dir DIR           where images and logs go (default /var/tmp)
  --blockd PATH       blockd (default: next to this executable)
  --qsd PATH          qemu-storage-daemon (default: on PATH)
  --json              JSON report on stdout (the table then goes to stderr)
";

#[derive(Debug, Clone, PartialEq)]
struct Options {
    kills: usize,
    backends: Vec<Kind>,
    format: String,
    writers: u32,
    progress: Duration,
    dir: PathBuf,
    blockd: Option<PathBuf>,
    qsd: Option<PathBuf>,
    json: bool,
    frontend: Frontend,
    /// The backends with --frontend vmm-core.
    modes: Vec<Mode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frontend {
    Qemu,
    VmmCore,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kills: 100,
            backends: vec![Kind::Blockd, Kind::Qsd],
            format: "raw".into(),
            writers: 4,
            progress: Duration::from_secs(45),
            dir: PathBuf::from("/var/tmp"),
            blockd: None,
            qsd: None,
            json: false,
            frontend: Frontend::Qemu,
            modes: Mode::ALL.to_vec(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RestartError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

fn usage(msg: impl std::fmt::Display) -> RestartError {
    RestartError::Usage(format!("{msg}\n{USAGE}"))
}

fn parse_args(args: &[String]) -> Result<Option<Options>, RestartError> {
    let mut o = Options::default();
    let mut it = args.iter();
    let mut only: Option<String> = None;
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| usage(format!("{name} needs a value")));
        match a.as_str() {
            "-h" | "--help" | "help" => return Ok(None),
            "--kills" => {
                let v = value(a)?;
                o.kills = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| usage(format!("--kills: '{v}' is not 1..10000")))?;
            }
            "--only" => only = Some(value(a)?),
            "--frontend" => {
                o.frontend = match value(a)?.as_str() {
                    "qemu" => Frontend::Qemu,
                    "vmm-core" => Frontend::VmmCore,
                    v => return Err(usage(format!("--frontend: '{v}' is neither qemu nor vmm-core"))),
                }
            }
            "--format" => {
                let v = value(a)?;
                if v != "raw" && v != "qcow2" {
                    return Err(usage(format!("--format: '{v}' is neither raw nor qcow2")));
                }
                o.format = v;
            }
            "--writers" => {
                let v = value(a)?;
                o.writers = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=16).contains(n))
                    .ok_or_else(|| usage(format!("--writers: '{v}' is not 1..16")))?;
            }
            "--progress-s" => {
                let v = value(a)?;
                let s: u64 = v
                    .parse()
                    .ok()
                    .filter(|n| (5..=600).contains(n))
                    .ok_or_else(|| usage(format!("--progress-s: '{v}' is not 5..600")))?;
                o.progress = Duration::from_secs(s);
            }
            "--dir" => o.dir = value(a)?.into(),
            "--blockd" => o.blockd = Some(value(a)?.into()),
            "--qsd" => o.qsd = Some(value(a)?.into()),
            "--json" => o.json = true,
            other => return Err(usage(format!("unknown argument '{other}'"))),
        }
    }
    if let Some(v) = only {
        match o.frontend {
            Frontend::Qemu => o.backends = pick(&v, &[Kind::Blockd, Kind::Qsd], Kind::key)?,
            Frontend::VmmCore => o.modes = pick(&v, &Mode::ALL, Mode::key)?,
        }
    }
    if o.frontend == Frontend::VmmCore && o.format != "raw" {
        return Err(usage("--frontend vmm-core: raw images only"));
    }
    Ok(Some(o))
}

/// The `--only` list, each name once, in the order given.
fn pick<T: Copy + PartialEq>(v: &str, all: &[T], key: fn(T) -> &'static str) -> Result<Vec<T>, RestartError> {
    let mut b = Vec::new();
    for k in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let names: Vec<&str> = all.iter().map(|&x| key(x)).collect();
        let x = all
            .iter()
            .copied()
            .find(|&x| key(x) == k)
            .ok_or_else(|| usage(format!("--only: unknown backend '{k}' ({})", names.join(", "))))?;
        if !b.contains(&x) {
            b.push(x);
        }
    }
    if b.is_empty() {
        return Err(usage("--only: no backend named"));
    }
    Ok(b)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn program(o: &Options, kind: Kind) -> Result<PathBuf, RestartError> {
    let (given, default, hint) = match kind {
        Kind::Blockd => (
            &o.blockd,
            std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("blockd"))),
            "build it (cargo build --release -p blockd) or pass --blockd PATH",
        ),
        Kind::Qsd => (&o.qsd, which("qemu-storage-daemon"), "install qemu-system-common or pass --qsd PATH"),
    };
    match given.clone().or(default) {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => Err(RestartError::Setup(format!("{}: {} does not exist; {hint}", kind.key(), p.display()))),
        None => Err(RestartError::Setup(format!("{} not found; {hint}", kind.key()))),
    }
}

/// 4 x 64 KiB per pass, as in the test; slots for 256 passes per writer before a slot is
/// written again (in qcow2, fresh clusters on every pass).
fn load(o: &Options) -> Load {
    Load { writers: o.writers, blocks: 4, kib: 64, slots: 256 * o.writers }
}

/// One backend's soak: its own image, QEMU, kills, then the image checked on the host.
fn run_backend(o: &Options, kind: Kind, program: &Path, dir: &Path) -> Result<BackendRun, RigError> {
    let load = load(o);
    let image = dir.join(format!("{}.{}", kind.key(), o.format));
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", &o.format])
        .arg(&image)
        .arg(load.disk_bytes().to_string())
        .output()
        .map_err(RigError::io("running qemu-img create"))?;
    if !out.status.success() {
        return Err(RigError::Process {
            what: "qemu-img create".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let socket = dir.join(format!("{}.sock", kind.key()));
    let spec = Spec {
        kind,
        program: program.into(),
        image: image.clone(),
        format: o.format.clone(),
        socket: socket.clone(),
        log: dir.join(format!("{}.log", kind.key())),
        num_queues: 2,
        cache: None,
    };
    let mut backend = Backend::start(spec)?;
    let mut q = Qemu::boot(dir, &socket, 2, 2)?;
    let settings = Settings {
        kills: o.kills,
        extra_kills: 0,
        until: None,
        // 2 at once are rarely seen on a fast backend (as in the test).
        min_inflight: 1,
        busy_timeout: Duration::from_secs(60),
        progress_timeout: o.progress,
    };
    let outcome = soak(&mut q, &mut backend, load, &settings)?;
    q.poweroff();
    // Killed, not stopped: the host must find what the guest saw acknowledged.
    backend.kill()?;
    // After a hang the writers never reported their last pass: nothing to compare with.
    let image_check = match outcome.hang {
        None => Some(check_image(&load, &outcome.last, &image, &o.format, dir)?),
        Some(_) => None,
    };
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(dir.join("converted.raw"));
    Ok(BackendRun { kind, starts: backend.starts, outcome, image_check })
}

fn run(o: &Options) -> Result<(serde_json::Value, String, bool), RestartError> {
    if o.frontend == Frontend::VmmCore {
        return run_vmm(o);
    }
    let programs: Vec<(Kind, PathBuf)> =
        o.backends.iter().map(|&k| program(o, k).map(|p| (k, p))).collect::<Result<_, _>>()?;
    let dir = scratch_dir(o, "restart")?;
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for (kind, program) in &programs {
        eprintln!("flotilla-bench restart: {} with {} kills ({}) ...", kind.key(), o.kills, o.format);
        match run_backend(o, *kind, program, &dir) {
            Ok(r) => {
                eprintln!("flotilla-bench restart: {}", report::line(&r));
                runs.push(r);
            }
            Err(e) => failures.push(format!("{}: {e}", kind.key())),
        }
    }
    let mut json = report::to_json(&runs);
    json["command"] = json!(std::env::args().collect::<Vec<_>>());
    json["settings"] = json!({
        "kills": o.kills,
        "format": o.format,
        "writers": o.writers,
        "progress_timeout_s": o.progress.as_secs(),
        "frontend": "qemu-system-x86_64 -accel tcg, vhost-user-blk-pci num-queues=2, -smp 2, chardev reconnect=1",
        "programs": programs.iter().map(|(k, p)| (k.key().to_string(), json!(p.display().to_string()))).collect::<serde_json::Map<_, _>>(),
    });
    let table = report::table(&runs, &failures);
    Ok(finish(json, table, failures, &dir))
}

/// The vmm-core frontend: each mode in turn on its own VM (see [`vmm`]).
fn run_vmm(o: &Options) -> Result<(serde_json::Value, String, bool), RestartError> {
    let bins = vmm::bin_dir().map_err(|e| RestartError::Setup(e.to_string()))?;
    let programs: Vec<(Mode, Option<PathBuf>)> = o
        .modes
        .iter()
        .map(|&m| vmm::needs(m).map(|k| program(o, k)).transpose().map(|p| (m, p)))
        .collect::<Result<_, _>>()?;
    let dir = scratch_dir(o, "restart-vmm")?;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0x5eed, |d| d.as_nanos() as u64);
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for (mode, program) in &programs {
        eprintln!("flotilla-bench restart: vmm-core, {} with {} kills ...", mode.key(), o.kills);
        let setup = vmm::Setup { kills: o.kills, dir: &dir, program: program.as_deref(), seed };
        match vmm::run_mode(*mode, &setup) {
            Ok(r) => {
                eprintln!("flotilla-bench restart: {}", vmm_report::line(&r));
                runs.push(r);
            }
            Err(e) => failures.push(format!("{}: {e}", mode.key())),
        }
    }
    let mut json = vmm_report::to_json(&runs);
    json["command"] = json!(std::env::args().collect::<Vec<_>>());
    json["settings"] = json!({
        "kills": o.kills,
        "frontend": "vmm-core (KVM), the test guest's blkpulse: depth 32, 4 MiB range, 4 KiB and 256 KiB requests, write then read back",
        "kill_delay_ms": "20-200 after the previous recovery, then at the next completion line with requests in flight",
        "seed": seed,
        "bin_dir": bins.display().to_string(),
        "programs": programs.iter().filter_map(|(m, p)| p.as_ref().map(|p| (m.key().to_string(), json!(p.display().to_string())))).collect::<serde_json::Map<_, _>>(),
    });
    let table = vmm_report::table(&runs, &failures);
    Ok(finish(json, table, failures, &dir))
}

/// The scratch directory of one run (images, logs): `DIR/flotilla-bench-<tag>-<pid>`.
fn scratch_dir(o: &Options, tag: &str) -> Result<PathBuf, RestartError> {
    let dir = o.dir.join(format!("flotilla-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|source| RestartError::Io { what: format!("creating {}", dir.display()), source })?;
    Ok(dir)
}

/// The report with its failures; the scratch directory kept (and named) when something failed,
/// removed otherwise.
fn finish(
    mut json: serde_json::Value,
    table: String,
    failures: Vec<String>,
    dir: &Path,
) -> (serde_json::Value, String, bool) {
    let failed = !failures.is_empty();
    json["failures"] = json!(failures);
    if failed {
        eprintln!("flotilla-bench restart: logs are in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
    (json, table, failed)
}

/// The `restart` subcommand; `args` are those after `restart`.
pub fn main(args: &[String]) -> ExitCode {
    crate::part::main("restart", "backends", USAGE, parse_args(args), |o| o.json, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse() {
        let o = parse_args(&args(&["--kills", "20", "--only", "qsd", "--format", "qcow2", "--json"])).unwrap().unwrap();
        assert_eq!((o.kills, o.backends.clone(), o.format.as_str(), o.json), (20, vec![Kind::Qsd], "qcow2", true));
        assert_eq!(parse_args(&args(&[])).unwrap().unwrap(), Options::default());
        assert!(parse_args(&args(&["--kills", "0"])).is_err());
        assert!(parse_args(&args(&["--format", "vmdk"])).is_err());
        assert!(parse_args(&args(&["--only", "nbd"])).is_err());
        assert!(parse_args(&args(&["--help"])).unwrap().is_none());
        let v = parse_args(&args(&["--only", "launcher,qsd", "--frontend", "vmm-core", "--kills", "5"])).unwrap().unwrap();
        assert_eq!((v.frontend, v.modes.clone(), v.kills), (Frontend::VmmCore, vec![Mode::Launcher, Mode::Qsd], 5));
        assert_eq!(o.frontend, Frontend::Qemu);
        assert!(parse_args(&args(&["--frontend", "vmm-core", "--format", "qcow2"])).is_err());
        assert!(parse_args(&args(&["--only", "launcher"])).is_err());
        assert!(parse_args(&args(&["--frontend", "xen"])).is_err());
    }
}
