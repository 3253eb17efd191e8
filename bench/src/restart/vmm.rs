//! `flotilla-bench restart --frontend vmm-core`: vmm-core under KVM as the vhost-user-blk
//! frontend, the project's test guest keeping up to 32 requests in flight with `blkpulse`
//! (`blksoak` plus one `C <in flight>` line per completed request), the backend SIGKILLed right
//! after a completion line that says requests are still in flight, then restarted:
//! - `blockd` / `qsd`: standalone on a socket (`-chardev socket -device vhost-user-blk-pci`),
//!   restarted by this bench at once (the new process is listening when the restart returns);
//! - `launcher`: blockd as the `flotilla` launcher runs it (`-drive ...,if=virtio`), restarted by
//!   the launcher's supervisor (100 ms after it died).
//!
//! Recovery is SIGKILL -> the guest seeing the first completion after it: the completion line's
//! arrival on the host less the guest's own time from seeing the completions to printing the
//! line (TSC, in the line); only completions seen after the new backend listened (bench) or its
//! process appeared (launcher) count, since the dying backend's last completions can reach the
//! host after the kill. The raw line arrival is reported too. Errors: completions with a non-zero status, `ERR`/`WARN`/`EXCEPTION`
//! lines. Lost or duplicated writes: the guest's own dup/lost/mismatch counters per round, and
//! the image's sectors on the host that do not hold the last round's pattern at the end.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_tests::console::field;
use flotilla_tests::process::daemon_child;
use flotilla_tests::process::signal;
use flotilla_tests::qmp::{QmpVm, VmOptions};
use flotilla_tests::restart::backend::{Backend, Kind, Spec};
use flotilla_tests::stamped::{NoLine, StampedConsole};

/// Which backend, restarted by whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Blockd,
    Qsd,
    Launcher,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Blockd, Mode::Qsd, Mode::Launcher];

    pub fn key(self) -> &'static str {
        match self {
            Mode::Blockd => "blockd",
            Mode::Qsd => "qsd",
            Mode::Launcher => "launcher",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Mode::Blockd => "blockd --socket-path, restarted by the bench",
            Mode::Qsd => "qemu-storage-daemon vhost-user-blk export, restarted by the bench",
            Mode::Launcher => "blockd under flotilla (-drive if=virtio), restarted by the launcher",
        }
    }
}

/// What one mode's run needs.
pub struct Setup<'a> {
    pub kills: usize,
    pub dir: &'a Path,
    /// blockd or qemu-storage-daemon for the standalone modes.
    pub program: Option<&'a Path>,
    pub seed: u64,
}

/// One kill.
#[derive(Debug, Clone)]
pub struct KillRec {
    /// Requests the guest said were in flight in the completion line that triggered the kill.
    pub inflight: u32,
    /// SIGKILL -> the new backend listening (bench-restarted modes) or, under the launcher,
    /// its new blockd process existing. No completion before then can be the new backend's.
    pub back_ms: f64,
    /// SIGKILL -> the guest seeing the first completion after it.
    pub recovery_ms: Option<f64>,
    /// SIGKILL -> that completion's line arriving on the host.
    pub line_ms: Option<f64>,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub completions: u64,
    pub rounds: u64,
    pub dup: u64,
    pub lost: u64,
    pub mismatch: u64,
    /// Rounds whose first non-zero status was set.
    pub status_rounds: u64,
}

pub struct ModeRun {
    pub mode: Mode,
    pub kills: Vec<KillRec>,
    pub counters: Counters,
    /// Non-zero-status completions and ERR/WARN/EXCEPTION lines (first 20).
    pub errors: Vec<String>,
    pub error_count: usize,
    /// Image sectors on the host not holding the last round's pattern (None: not checked).
    pub image_bad_sectors: Option<u64>,
    /// blockd's "ring recovered from the inflight region" lines: (restarts that resubmitted
    /// at least one request, requests resubmitted in all). None for qsd: it says nothing.
    pub inflight_recoveries: Option<(usize, u64)>,
    pub hang: Option<String>,
    /// Gaps between consecutive completion lines with no kill between them (ms): the pace of
    /// completions undisturbed, the resolution of the recovery figure.
    pub gaps_ms: Vec<f64>,
    /// The guest's `BLKSOAK` round lines (first 40): stalls, longest wait, kicks.
    pub round_lines: Vec<String>,
    /// The pattern the last finished `blkpulse` left in the range (its `BLKSOAKED` line).
    pub last_pattern: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Backend(#[from] flotilla_tests::restart::RigError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

const SECTOR: u64 = 512;
/// 64 MiB image; each round covers the first 4 MiB.
const IMAGE_BYTES: u64 = 64 << 20;
const SOAK_SECTORS: u64 = 8192;
const ROUNDS_PER_COMMAND: u64 = 4;
const DEPTH: u32 = 32;
const FIRST_PATTERN: u32 = 0x50a4_0000;
/// No line at all for this long while the soak runs: a hang (the guest's own limit is 30 s).
const SILENCE: Duration = Duration::from_secs(40);
const BOOT: Duration = Duration::from_secs(30);

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

enum Target {
    Standalone(Backend),
    Launcher,
}

/// Runs one mode: its own image, VM and backend, `setup.kills` kills, the image checked.
pub fn run_mode(mode: Mode, setup: &Setup) -> Result<ModeRun, VmmError> {
    let image = setup.dir.join(format!("vmm-{}.raw", mode.key()));
    let f = std::fs::File::create(&image).map_err(io(format!("creating {}", image.display())))?;
    f.set_len(IMAGE_BYTES).map_err(io("sizing the image"))?;
    drop(f);
    let socket = setup.dir.join(format!("vmm-{}.sock", mode.key()));
    let mut target = match mode {
        Mode::Launcher => Target::Launcher,
        Mode::Blockd | Mode::Qsd => {
            let program = setup.program.ok_or_else(|| VmmError::Setup(format!("{}: no program", mode.key())))?;
            Target::Standalone(Backend::start(Spec {
                kind: if mode == Mode::Blockd { Kind::Blockd } else { Kind::Qsd },
                program: program.into(),
                image: image.clone(),
                format: "raw".into(),
                socket: socket.clone(),
                log: setup.dir.join(format!("vmm-{}.log", mode.key())),
                num_queues: 1,
                cache: None,
            })?)
        }
    };
    let chardev = format!("socket,id=c0,path={}", socket.display());
    let drive = format!("file={},if=virtio,format=raw,id=d0", image.display());
    let extra: Vec<&str> = match mode {
        Mode::Launcher => vec!["-drive", &drive],
        _ => vec!["-chardev", &chardev, "-device", "vhost-user-blk-pci,chardev=c0,id=d0"],
    };
    let tag = format!("bench-rs-{}", mode.key());
    let vm = QmpVm::start(&tag, &VmOptions { name: &tag, qmp: &[], extra: &extra });
    let result = soak(mode, setup, &vm, &mut target);
    let vm_log = {
        let QmpVm { reaper, mut stderr, dir, .. } = vm;
        // The reaper kills the launcher and everything mentioning the VM's directory.
        drop(reaper);
        let log = stderr.take();
        drop(dir);
        log
    };
    let mut run = result?;
    let backend_log = match &mut target {
        Target::Standalone(b) => {
            b.kill()?;
            b.log()
        }
        Target::Launcher => vm_log,
    };
    run.inflight_recoveries = (mode != Mode::Qsd).then(|| resubmitted(&backend_log));
    if run.hang.is_none() {
        if let Some(pattern) = run.last_pattern {
            run.image_bad_sectors = Some(bad_sectors(&image, pattern)?);
        }
    }
    let _ = std::fs::remove_file(&image);
    Ok(run)
}

/// From blockd's log: restarts that resubmitted requests, and how many in all.
fn resubmitted(log: &str) -> (usize, u64) {
    let counts: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("ring recovered from the inflight region"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("resubmit=")?.parse().ok()))
        .collect();
    (counts.iter().filter(|&&n| n > 0).count(), counts.iter().sum())
}

/// Sectors of the soaked range that do not hold `pattern ^ sector` in every word.
fn bad_sectors(image: &Path, pattern: u32) -> Result<u64, VmmError> {
    let f = std::fs::File::open(image).map_err(io(format!("opening {}", image.display())))?;
    let mut buf = vec![0u8; (SOAK_SECTORS * SECTOR) as usize];
    f.read_exact_at(&mut buf, 0).map_err(io(format!("reading {}", image.display())))?;
    let mut bad = 0;
    for (s, chunk) in buf.chunks(SECTOR as usize).enumerate() {
        let word = (pattern ^ s as u32).to_le_bytes();
        if chunk.chunks(4).any(|w| w != word) {
            bad += 1;
        }
    }
    Ok(bad)
}

/// SIGKILLs the backend; for the bench-restarted modes starts it again. Returns the kill
/// instant and when the new backend listened (bench-restarted) or its process appeared
/// (under the launcher, whose restart delay doubles from 100 ms while restarts come less than
/// 10 s apart).
fn kill(mode: Mode, vm: &QmpVm, target: &mut Target) -> Result<(Instant, Instant), VmmError> {
    match target {
        Target::Standalone(b) => {
            let at = Instant::now();
            b.kill_and_restart()?;
            Ok((at, Instant::now()))
        }
        Target::Launcher => {
            let pid = daemon_child(vm.pid(), "blockd", None)
                .ok_or_else(|| VmmError::Setup(format!("{}: the launcher has no blockd child", mode.key())))?;
            signal(pid, libc::SIGKILL);
            let at = Instant::now();
            let deadline = at + Duration::from_secs(15);
            loop {
                if daemon_child(vm.pid(), "blockd", Some(pid)).is_some() {
                    return Ok((at, Instant::now()));
                }
                if Instant::now() >= deadline {
                    return Err(VmmError::Setup(format!("no new blockd 15 s after killing {pid}")));
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }
}

fn parse<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    field(line, key).and_then(|v| v.parse().ok())
}

/// Boots the guest, then `blkpulse` commands (4 rounds each, a new pattern every round) until
/// `setup.kills` kills have recovered; a kill once the previous one recovered and 20-200 ms of
/// I/O followed, at the first completion line after that which says requests are in flight.
fn soak(mode: Mode, setup: &Setup, vm: &QmpVm, target: &mut Target) -> Result<ModeRun, VmmError> {
    let mut con = StampedConsole::connect(&vm.serial, BOOT)
        .map_err(|e| VmmError::Setup(format!("{}: {e}", mode.key())))?;
    let boot = |what: &str, r: Result<_, NoLine>| {
        r.map_err(|e| VmmError::Setup(format!("{}: no {what} from the guest ({e:?})", mode.key())))
    };
    boot("READY", con.expect("READY", BOOT))?;
    con.send("blk").map_err(|e| VmmError::Setup(e.to_string()))?;
    let blk = boot("BLK", con.expect("BLK", BOOT))?;
    if blk.text.starts_with("ERR") {
        return Err(VmmError::Setup(format!("{}: {}", mode.key(), blk.text)));
    }
    let mut run = ModeRun {
        mode,
        kills: Vec::new(),
        counters: Counters::default(),
        errors: Vec::new(),
        error_count: 0,
        image_bad_sectors: None,
        inflight_recoveries: None,
        hang: None,
        last_pattern: None,
        gaps_ms: Vec::new(),
        round_lines: Vec::new(),
    };
    let mut last_completion: Option<Instant> = None;
    let mut rng = setup.seed | 1;
    let mut pattern = FIRST_PATTERN;
    let send = |con: &mut StampedConsole, pattern: u32| {
        con.send(&format!("blkpulse {DEPTH} 0 {SOAK_SECTORS} {ROUNDS_PER_COMMAND} {pattern:x}"))
            .map_err(|e| VmmError::Setup(e.to_string()))
    };
    send(&mut con, pattern)?;
    // (kill instant, lower bound for a line to count as recovery, index in run.kills)
    let mut pending: Option<(Instant, Instant, usize)> = None;
    let mut next_kill = Instant::now() + Duration::from_millis(500);
    let error = |run: &mut ModeRun, l: &str| {
        run.error_count += 1;
        if run.errors.len() < 20 {
            run.errors.push(l.to_string());
        }
    };
    loop {
        let line = match con.next(SILENCE) {
            Ok(l) => l,
            Err(e) => {
                run.hang = Some(format!("no guest line for {SILENCE:?} ({e:?}) after {} kills", run.kills.len()));
                return Ok(run);
            }
        };
        let t = line.text.as_str();
        let completion = t.starts_with("C ") || t.starts_with("E ");
        if completion {
            let mut words = t.split_whitespace().skip(1).map(|w| w.parse::<u64>().ok());
            let (got, inflight) = (words.next().flatten().unwrap_or(0), words.next().flatten().unwrap_or(0));
            // When the guest saw these completions: the arrival less the guest's own time
            // between seeing them and printing the line.
            let seen = line.at.checked_sub(Duration::from_micros(words.next().flatten().unwrap_or(0))).unwrap_or(line.at);
            run.counters.completions += got;
            if let (Some(prev), None) = (last_completion, pending) {
                run.gaps_ms.push(ms(line.at - prev));
            }
            last_completion = Some(line.at);
            if t.starts_with("E ") {
                error(&mut run, t);
            }
            if let Some((at, after, i)) = pending {
                if seen > after {
                    run.kills[i].recovery_ms = Some(ms(seen - at));
                    run.kills[i].line_ms = Some(ms(line.at - at));
                    pending = None;
                    next_kill = line.at + Duration::from_millis(20 + xorshift(&mut rng) % 181);
                }
                continue;
            }
            if run.kills.len() < setup.kills && inflight > 0 && Instant::now() >= next_kill {
                let (at, after) = kill(mode, vm, target)?;
                // A completion the dying backend made can reach the host after the kill; none
                // before `after` can be the new backend's.
                run.kills.push(KillRec { inflight: inflight as u32, back_ms: ms(after - at), recovery_ms: None, line_ms: None });
                pending = Some((at, after, run.kills.len() - 1));
                last_completion = None;
            }
        } else if t.starts_with("BLKSOAKED") {
            run.last_pattern =
                field(t, "pattern").and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok());
            if parse::<u64>(t, "bad").unwrap_or(1) != 0 {
                error(&mut run, t);
            }
            pattern = pattern.wrapping_add(ROUNDS_PER_COMMAND as u32);
            if run.kills.len() >= setup.kills && pending.is_none() {
                return Ok(run);
            }
            send(&mut con, pattern)?;
        } else if t.starts_with("BLKSOAK ") {
            if run.round_lines.len() < 40 {
                run.round_lines.push(t.to_string());
            }
            let c = &mut run.counters;
            c.rounds += 1;
            c.dup += parse::<u64>(t, "dup").unwrap_or(0);
            c.lost += parse::<u64>(t, "lost").unwrap_or(0);
            c.mismatch += parse::<u64>(t, "mismatch").unwrap_or(0);
            c.status_rounds += u64::from(parse::<u32>(t, "status").unwrap_or(0) != 0);
        } else if t.starts_with("ERR") || t.starts_with("WARN") || t.starts_with("EXCEPTION") {
            error(&mut run, t);
            if t.starts_with("ERR timeout") || t.starts_with("EXCEPTION") || t.starts_with("ERR blk soak") {
                run.hang = Some(format!("{t} after {} kills", run.kills.len()));
                return Ok(run);
            }
        }
    }
}

/// The backend program a mode needs.
pub fn needs(mode: Mode) -> Option<Kind> {
    match mode {
        Mode::Blockd => Some(Kind::Blockd),
        Mode::Qsd => Some(Kind::Qsd),
        Mode::Launcher => None,
    }
}

/// Where the launcher, vmm-core and qmp-gateway are: `FLOTILLA_BIN_DIR`, else next to this
/// executable (the tests' helpers read that variable).
pub fn bin_dir() -> Result<PathBuf, VmmError> {
    let dir = match std::env::var_os(flotilla_tests::process::BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
            .ok_or_else(|| VmmError::Setup("cannot tell where this executable is".into()))?,
    };
    for exe in ["flotilla", "vmm-core", "qmp-gateway"] {
        if !dir.join(exe).is_file() {
            return Err(VmmError::Setup(format!(
                "{} missing; build it (cargo build -p {exe}) or set {}",
                dir.join(exe).display(),
                flotilla_tests::process::BIN_DIR_ENV
            )));
        }
    }
    std::env::set_var(flotilla_tests::process::BIN_DIR_ENV, &dir);
    Ok(dir)
}
