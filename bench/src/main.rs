//! flotilla-bench: Flotilla against qemu-system-x86_64, side by side in one run, on the same
//! test guest (see bench/README.md). JSON report on stdout, a short table on stderr.

mod balloon;
mod block;
mod dbusprobe;
mod error;
mod linux_boot;
mod part;
mod procfs;
mod qmp;
mod qmpreport;
mod qmprun;
mod report;
mod restart;
mod runs;
mod smaps;
mod stats;
mod tracelog;
mod vmproc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use error::BenchError;
use qmpreport::QmpResults;
use qmprun::QmpSettings;
use report::{BootSetup, MemSetup, Setup, VariantResults};
use runs::{Variant, QEMU_VARIANTS};
use vmproc::Spec;

const USAGE: &str = "\
usage: flotilla-bench [all|boot|memory|qmp] [options]
       flotilla-bench block [options]   (see flotilla-bench block --help)
       flotilla-bench balloon [options] (see flotilla-bench balloon --help)
       flotilla-bench restart [options] (see flotilla-bench restart --help)

  all (default)   boot times, memory overhead, then QMP round trips
  boot            process start -> the guest's first serial line and READY, N interleaved runs
  memory          RSS/PSS of the VMM's processes minus guest RAM, guest booted to READY
  qmp             QMP round trips (latency p50/p99, requests/s) through Flotilla's gateway and
                  QEMU's monitor, and the D-Bus calls behind Flotilla's

options:
  --runs N             boot runs per variant (default 10)
  --warmup N           discarded boot runs per variant before measuring (default 1)
  --mem-runs N         memory samples per variant (default 3)
  --boot-mem MIB       guest RAM for the boot runs (default 128)
  --mem MIB            guest RAM for the memory runs (default 256)
  --qemu PATH          qemu-system-x86_64 to compare with (default: the one on PATH)
  --flotilla PATH      the flotilla launcher (default: next to this executable, i.e.
                       target/release/flotilla; vmm-core must sit beside it)
  --qemu-variants L    comma-separated QEMU set (default q35,q35-qboot,microvm; q35 is always run)
  --timeout SECS       limit for one boot to READY (default 30)
  --settle-ms MS       wait after READY before sampling memory (default 500)
  --qmp-rounds N       QMP rounds; each boots every VMM once (default 5)
  --qmp-requests N     timed round trips per command and mode (default 2000)
  --qmp-warmup N       untimed round trips before each timed series (default 200)
  --qmp-clients N      concurrent clients, one -qmp socket each (default 4)
  --qmp-depth N        requests kept unanswered in the pipelined series (default 8)
  --qmp-commands L     comma-separated commands without arguments (default
                       query-status,query-commands)
  --no-dbus-probe      skip timing the D-Bus calls behind Flotilla's gateway
  --pin-cpu N          run the bench and every VM on CPU N only (default: unpinned)
";

#[derive(Debug, Clone, PartialEq)]
struct Options {
    boot: bool,
    memory: bool,
    qmp: bool,
    runs: usize,
    warmup: usize,
    mem_runs: usize,
    boot_mib: u64,
    mem_mib: u64,
    qemu: Option<PathBuf>,
    flotilla: Option<PathBuf>,
    qemu_variants: Vec<String>,
    timeout: Duration,
    settle: Duration,
    qmp_rounds: usize,
    qmp_settings: QmpSettings,
    pin_cpu: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            boot: true,
            memory: true,
            qmp: true,
            runs: 10,
            warmup: 1,
            mem_runs: 3,
            boot_mib: 128,
            mem_mib: 256,
            qemu: None,
            flotilla: None,
            qemu_variants: QEMU_VARIANTS.iter().map(|v| v.0.to_string()).collect(),
            timeout: Duration::from_secs(30),
            settle: Duration::from_millis(500),
            qmp_rounds: 5,
            qmp_settings: QmpSettings {
                commands: vec!["query-status".into(), "query-commands".into()],
                requests: 2000,
                warmup: 200,
                clients: 4,
                depth: 8,
                probe: true,
                boot_timeout: Duration::from_secs(30),
            },
            pin_cpu: None,
        }
    }
}

fn usage_error(msg: impl std::fmt::Display) -> BenchError {
    BenchError::Usage(format!("{msg}\n{USAGE}"))
}

fn parse_args(args: &[String]) -> Result<Option<Options>, BenchError> {
    let mut o = Options::default();
    let mut it = args.iter();
    let mut seen_part = false;
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| usage_error(format!("{name} needs a value")));
        fn num<T>(name: &str, v: String, min: T) -> Result<T, BenchError>
        where
            T: std::str::FromStr + PartialOrd + std::fmt::Display,
        {
            match v.parse::<T>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(usage_error(format!("{name}: '{v}' is not a number >= {min}"))),
            }
        }
        match a.as_str() {
            "-h" | "--help" | "help" => return Ok(None),
            "all" | "boot" | "memory" | "qmp" if !seen_part => {
                seen_part = true;
                o.boot = a == "all" || a == "boot";
                o.memory = a == "all" || a == "memory";
                o.qmp = a == "all" || a == "qmp";
            }
            "--runs" => o.runs = num("--runs", value("--runs")?, 1)?,
            "--warmup" => o.warmup = num("--warmup", value("--warmup")?, 0)?,
            "--mem-runs" => o.mem_runs = num("--mem-runs", value("--mem-runs")?, 1)?,
            "--boot-mem" => o.boot_mib = num("--boot-mem", value("--boot-mem")?, 16)?,
            "--mem" => o.mem_mib = num("--mem", value("--mem")?, 16)?,
            "--qemu" => o.qemu = Some(value("--qemu")?.into()),
            "--flotilla" => o.flotilla = Some(value("--flotilla")?.into()),
            "--qemu-variants" => {
                let list = value("--qemu-variants")?;
                let mut v = vec!["q35".to_string()];
                for w in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
                    if !QEMU_VARIANTS.iter().any(|q| q.0 == w) {
                        let known: Vec<&str> = QEMU_VARIANTS.iter().map(|q| q.0).collect();
                        return Err(usage_error(format!("unknown QEMU variant '{w}' (known: {})", known.join(", "))));
                    }
                    if !v.iter().any(|x| x == w) {
                        v.push(w.to_string());
                    }
                }
                o.qemu_variants = v;
            }
            "--timeout" => o.timeout = Duration::from_secs(num("--timeout", value("--timeout")?, 1)?),
            "--settle-ms" => o.settle = Duration::from_millis(num("--settle-ms", value("--settle-ms")?, 0)?),
            "--qmp-rounds" => o.qmp_rounds = num("--qmp-rounds", value("--qmp-rounds")?, 1)?,
            "--qmp-requests" => o.qmp_settings.requests = num("--qmp-requests", value("--qmp-requests")?, 1)?,
            "--qmp-warmup" => o.qmp_settings.warmup = num("--qmp-warmup", value("--qmp-warmup")?, 0)?,
            "--qmp-clients" => o.qmp_settings.clients = num("--qmp-clients", value("--qmp-clients")?, 1)?,
            "--qmp-depth" => o.qmp_settings.depth = num("--qmp-depth", value("--qmp-depth")?, 1)?,
            "--qmp-commands" => {
                let list = value("--qmp-commands")?;
                let cmds: Vec<String> =
                    list.split(',').map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect();
                let bad = |c: &String| !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
                if cmds.is_empty() || cmds.iter().any(bad) {
                    return Err(usage_error(format!("--qmp-commands: '{list}' is not a list of command names")));
                }
                o.qmp_settings.commands = cmds;
            }
            "--no-dbus-probe" => o.qmp_settings.probe = false,
            "--pin-cpu" => o.pin_cpu = Some(num("--pin-cpu", value("--pin-cpu")?, 0)?),
            other => return Err(usage_error(format!("unknown argument '{other}'"))),
        }
    }
    o.qmp_settings.boot_timeout = o.timeout;
    Ok(Some(o))
}

/// `name` on PATH, as the shell would find it.
fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(if d.is_empty() { "." } else { d }).join(name))
        .find(|p| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

fn find_qemu(o: &Options) -> Result<PathBuf, BenchError> {
    match &o.qemu {
        Some(p) if p.is_file() => Ok(p.clone()),
        Some(p) => Err(BenchError::Setup(format!(
            "--qemu {}: no such file (scripts/setup-host installs qemu-system-x86_64)",
            p.display()
        ))),
        None => which("qemu-system-x86_64").ok_or_else(|| {
            BenchError::Setup(
                "qemu-system-x86_64 not found on PATH: the benchmark compares against it. Install it with \
                 scripts/setup-host (Debian's qemu-system-x86), or pass --qemu PATH."
                    .into(),
            )
        }),
    }
}

/// The flotilla launcher and the vmm-core (and, for the QMP part, qmp-gateway) beside it.
fn find_flotilla(o: &Options) -> Result<(PathBuf, PathBuf), BenchError> {
    let flotilla = match &o.flotilla {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| BenchError::Io { what: "locating the bench executable".into(), source: e })?
            .parent()
            .unwrap_or(Path::new("."))
            .join("flotilla"),
    };
    let vmm_core = flotilla.parent().unwrap_or(Path::new(".")).join("vmm-core");
    let gateway = runs::gateway_beside(&vmm_core);
    let needed = if o.qmp { vec![&flotilla, &vmm_core, &gateway] } else { vec![&flotilla, &vmm_core] };
    for p in needed {
        if !p.is_file() {
            return Err(BenchError::Setup(format!(
                "{} is missing: build the release binaries first (cargo build --release --workspace), \
                 or pass --flotilla PATH",
                p.display()
            )));
        }
    }
    Ok((flotilla, vmm_core))
}

fn check_kvm() -> Result<(), BenchError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| BenchError::Io { what: "opening /dev/kvm read-write (both VMMs need KVM)".into(), source: e })
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn host_info(qemu: &Path, flotilla: &Path, vmm_core: &Path) -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines().find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_string()))
    });
    let kvm: Vec<&str> =
        ["kvm_intel", "kvm_amd", "kvm_pvm"].into_iter().filter(|m| Path::new("/sys/module").join(m).exists()).collect();
    let version = vmproc::first_line(
        &Spec { label: "qemu -version".into(), program: qemu.into(), args: vec!["-version".into()], env: vec![] },
        |l| l.contains("version"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| format!("unknown ({})", error::chain(&e)));
    json!({
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "kvm_modules": kvm,
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "qemu": qemu.display().to_string(),
        "qemu_version": version,
        "flotilla": flotilla.display().to_string(),
        "vmm_core": vmm_core.display().to_string(),
        "build": build_info(&[flotilla, vmm_core, &runs::gateway_beside(vmm_core)]),
    })
}

/// What was measured: the bench's own build profile, the source revision and the Rust
/// compiler (as found now), and the binaries' sizes and times.
fn build_info(binaries: &[&Path]) -> serde_json::Value {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    let run = |label: &str, program: &str, args: &[&str]| {
        let spec = Spec {
            label: label.into(),
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![],
        };
        vmproc::output_lines(&spec, Duration::from_secs(10)).map_err(|e| error::chain(&e))
    };
    let git = |args: &[&str]| {
        let mut a = vec!["-C", src.to_str().unwrap_or(".")];
        a.extend_from_slice(args);
        run("git", "git", &a)
    };
    let commit = git(&["rev-parse", "HEAD"]).map(|l| l.join(""));
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|l| !l.is_empty());
    let rustc = run("rustc -V", "rustc", &["-V"]).map(|l| l.join(" "));
    let bins: Vec<serde_json::Value> = binaries
        .iter()
        .map(|p| {
            let m = p.metadata().ok();
            let modified = m
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            json!({"path": p.display().to_string(), "bytes": m.map(|m| m.len()), "modified_unix": modified})
        })
        .collect();
    let or_err = |r: Result<serde_json::Value, String>| r.unwrap_or_else(|e| json!(format!("unknown ({e})")));
    json!({
        "bench_profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "cargo_profile_release": "opt-level 3, debug = 1 (line tables; Cargo.toml [profile.release])",
        "source": src.display().to_string(),
        "git_commit": or_err(commit.map(|c| json!(c))),
        "git_tracked_changes": or_err(dirty.map(|d| json!(d))),
        "rustc_on_path": or_err(rustc.map(|r| json!(r))),
        "binaries": bins,
    })
}

/// Round `round` visits the variants starting at a different one each time, so that no VMM
/// always runs first (after an idle gap) or right after a given other.
fn rotated(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + round) % n)
}

fn run(o: &Options, command: Vec<String>) -> Result<(serde_json::Value, String, bool), BenchError> {
    check_kvm()?;
    let qemu = find_qemu(o)?;
    let (flotilla, vmm_core) = find_flotilla(o)?;
    let elf = flotilla_tests::guest::guest_elf();
    if !elf.is_file() {
        return Err(BenchError::Setup(format!(
            "the test guest {} is missing; it is built by tests/build.rs (cargo build --release -p flotilla-tests)",
            elf.display()
        )));
    }
    vmproc::become_subreaper()?;
    if let Some(cpu) = o.pin_cpu {
        vmproc::pin_to_cpu(cpu)?;
    }

    let mut variants = vec![Variant::flotilla(flotilla.clone(), &vmm_core)];
    variants.extend(o.qemu_variants.iter().filter_map(|k| Variant::qemu(qemu.clone(), k)));
    let mut results: Vec<VariantResults> = variants
        .into_iter()
        .map(|v| {
            let (b, m) = (v.spec(o.boot_mib, &elf).argv(), v.spec(o.mem_mib, &elf).argv());
            VariantResults::new(v, b, m)
        })
        .collect();
    eprintln!("flotilla-bench: {} vs {}", flotilla.display(), qemu.display());
    let mut host = host_info(&qemu, &flotilla, &vmm_core);
    host["pinned_to_cpu"] = json!(o.pin_cpu);

    // Warm-up boots: page cache, and whether the optional QEMU variants work here at all.
    let mut unavailable = Vec::new();
    let warmups = if o.boot || o.memory { o.warmup.max(1) } else { 0 };
    for _ in 0..warmups {
        let mut keep = Vec::new();
        for r in results.drain(..) {
            match runs::run_boot(&r.variant, o.boot_mib, &elf, o.timeout) {
                Ok(_) => keep.push(r),
                Err(e) if r.variant.required => return Err(e),
                Err(e) => {
                    eprintln!("flotilla-bench: {} does not boot the test guest here; left out", r.variant.key);
                    unavailable.push((r.variant.key.clone(), error::chain(&e)));
                }
            }
        }
        results = keep;
    }

    let mut failed = false;
    if o.boot {
        for round in 0..o.runs {
            let mut line = format!("boot round {}/{}:", round + 1, o.runs);
            for i in rotated(results.len(), round) {
                let r = &mut results[i];
                match runs::run_boot(&r.variant, o.boot_mib, &elf, o.timeout) {
                    Ok(s) => {
                        line += &format!(" {} {:.1} ms", r.variant.key, s.first_line_ms);
                        r.boots.push(s);
                    }
                    Err(e) => {
                        failed = true;
                        let msg = error::chain(&e);
                        eprintln!("flotilla-bench: {}: boot run failed: {msg}", r.variant.key);
                        r.failures.push(format!("boot round {}: {msg}", round + 1));
                    }
                }
            }
            eprintln!("{line}");
        }
    }
    if o.memory {
        for round in 0..o.mem_runs {
            let mut line = format!("memory round {}/{}:", round + 1, o.mem_runs);
            for i in rotated(results.len(), round) {
                let r = &mut results[i];
                match runs::run_memory(&r.variant, o.mem_mib, &elf, o.timeout, o.settle) {
                    Ok(s) => {
                        line += &format!(" {} {:.1} MiB", r.variant.key, s.overhead().rss_kib as f64 / 1024.0);
                        r.mems.push(s);
                    }
                    Err(e) => {
                        failed = true;
                        let msg = error::chain(&e);
                        eprintln!("flotilla-bench: {}: memory run failed: {msg}", r.variant.key);
                        r.failures.push(format!("memory round {}: {msg}", round + 1));
                    }
                }
            }
            eprintln!("{line}");
        }
    }

    let setup = Setup {
        command,
        host,
        guest_elf: elf.display().to_string(),
        boot: o.boot.then_some(BootSetup { mem_mib: o.boot_mib, runs: o.runs, warmup: o.warmup.max(1) }),
        memory: o.memory.then_some(MemSetup {
            mem_mib: o.mem_mib,
            runs: o.mem_runs,
            settle_ms: o.settle.as_millis() as u64,
        }),
        unavailable,
    };
    if !(o.boot || o.memory) {
        results.clear();
    }
    let mut json = report::to_json(&setup, &results);
    let mut table = report::table(&setup, &results);
    if o.qmp {
        let (qmp_results, baseline, qmp_failed) = run_qmp(o, &flotilla, &vmm_core, &qemu, &elf)?;
        failed |= qmp_failed;
        json["qmp"] = qmpreport::to_json(&o.qmp_settings, o.qmp_rounds, o.boot_mib, &qmp_results, &baseline);
        for r in qmp_results.iter().filter(|r| !r.failures.is_empty()) {
            json["failures"][format!("qmp:{}", r.variant.key)] = json!(r.failures);
        }
        table += &qmpreport::table(&o.qmp_settings, o.qmp_rounds, &qmp_results, &baseline);
    }
    Ok((json, table, failed))
}

/// The QMP part: Flotilla and QEMU q35, each booted once per round (the start rotating), with
/// their sockets in a directory of the bench's, removed at the end.
fn run_qmp(
    o: &Options,
    flotilla: &Path,
    vmm_core: &Path,
    qemu: &Path,
    elf: &Path,
) -> Result<(Vec<QmpResults>, qmpreport::Baseline, bool), BenchError> {
    let s = &o.qmp_settings;
    let dir = std::env::temp_dir().join(format!("flotilla-bench-qmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Io { what: format!("creating {}", dir.display()), source: e })?;
    let variants = [Variant::flotilla(flotilla.into(), vmm_core), Variant::qemu(qemu.into(), "q35").expect("known")];
    let mut results: Vec<QmpResults> = variants
        .into_iter()
        .map(|v| {
            let mut spec = v.spec(o.boot_mib, elf);
            spec.args.extend(qmprun::qmp_args(&qmprun::socket_paths(&dir, &v.key, s.clients)));
            QmpResults::new(v, spec.argv())
        })
        .collect();
    let mut failed = false;
    let mut baseline = qmpreport::Baseline::default();
    let cross = qmprun::two_cpus();
    for round in 0..o.qmp_rounds {
        let mut line = format!("qmp round {}/{}:", round + 1, o.qmp_rounds);
        match qmprun::pingpong(s.requests, s.warmup, None) {
            Ok(v) => baseline.any_cpu.extend(stats::latency(&v)),
            Err(e) => eprintln!("flotilla-bench: ping-pong baseline: {}", error::chain(&e)),
        }
        if let Some(cpus) = cross {
            match qmprun::pingpong(s.requests, s.warmup, Some(cpus)) {
                Ok(v) => baseline.cross_cpu.extend(stats::latency(&v)),
                Err(e) => eprintln!("flotilla-bench: cross-CPU ping-pong baseline: {}", error::chain(&e)),
            }
            baseline.cpus = Some(cpus);
        }
        for i in rotated(results.len(), round) {
            let r = &mut results[i];
            match qmprun::run_qmp(&r.variant, o.boot_mib, elf, &dir, s) {
                Ok(sample) => {
                    let seq = sample.commands.first().and_then(|c| c.modes.first()).map(|(_, m)| m.latency_us);
                    if let (Some(l), Some(c)) = (seq, s.commands.first()) {
                        line += &format!(" {} {c} p50 {:.1} µs p99 {:.1} µs", r.variant.key, l.p50, l.p99);
                    }
                    if let Some(f) = sample.foreign_cpus {
                        line += &format!(" (others busy {f:.2} CPU)");
                    }
                    line += ";";
                    r.samples.push(sample);
                }
                Err(e) => {
                    failed = true;
                    let msg = error::chain(&e);
                    eprintln!("flotilla-bench: {}: QMP run failed: {msg}", r.variant.key);
                    r.failures.push(format!("qmp round {}: {msg}", round + 1));
                }
            }
        }
        eprintln!("{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((results, baseline, failed))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "block") {
        return block::main(&args[1..]);
    }
    if args.first().is_some_and(|a| a == "balloon") {
        return balloon::main(&args[1..]);
    }
    if args.first().is_some_and(|a| a == "restart") {
        return restart::main(&args[1..]);
    }
    if args.first().is_some_and(|a| a == "linux-boot") {
        return linux_boot::main(&args[1..]);
    }
    let opts = match parse_args(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("flotilla-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let command: Vec<String> = std::env::args().collect();
    match run(&opts, command) {
        Ok((json, table, failed)) => {
            println!("{}", serde_json::to_string_pretty(&json).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")));
            eprint!("{table}");
            if failed {
                eprintln!("flotilla-bench: some runs failed (see \"failures\" in the report)");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flotilla-bench: {}", error::chain(&e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn defaults() {
        let o = parse_args(&[]).unwrap().unwrap();
        assert_eq!(o, Options::default());
        assert!(o.boot && o.memory && o.qmp);
        assert_eq!((o.qmp_rounds, o.qmp_settings.requests, o.qmp_settings.warmup), (5, 2000, 200));
        assert_eq!(o.qmp_settings.commands, ["query-status", "query-commands"]);
        assert_eq!((o.runs, o.mem_mib, o.boot_mib), (10, 256, 128));
    }

    #[test]
    fn parts_and_options() {
        let o = parse_args(&args("boot --runs 3 --qemu-variants microvm --timeout 5")).unwrap().unwrap();
        assert!(o.boot && !o.memory);
        assert_eq!(o.runs, 3);
        assert_eq!(o.qemu_variants, ["q35", "microvm"]);
        assert_eq!(o.timeout, Duration::from_secs(5));
        let o = parse_args(&args("memory --mem 512")).unwrap().unwrap();
        assert!(!o.boot && o.memory && !o.qmp);
        assert_eq!(o.mem_mib, 512);
        let o = parse_args(&args(
            "qmp --qmp-rounds 2 --qmp-requests 50 --qmp-warmup 0 --qmp-clients 2 --qmp-depth 4 \
             --qmp-commands query-kvm,query-status --no-dbus-probe --timeout 7 --pin-cpu 1",
        ))
        .unwrap()
        .unwrap();
        assert!(!o.boot && !o.memory && o.qmp);
        assert_eq!(o.qmp_rounds, 2);
        let s = &o.qmp_settings;
        assert_eq!((s.requests, s.warmup, s.clients, s.depth, s.probe), (50, 0, 2, 4, false));
        assert_eq!(s.commands, ["query-kvm", "query-status"]);
        assert_eq!(s.boot_timeout, Duration::from_secs(7));
        assert_eq!(o.pin_cpu, Some(1));
        assert!(parse_args(&args("--help")).unwrap().is_none());
    }

    #[test]
    fn bad_arguments() {
        for bad in [
            "--runs 0",
            "--runs",
            "--runs x",
            "--qemu-variants pc",
            "--frobnicate",
            "boot memory",
            "qmp boot",
            "--mem 8",
            "--qmp-clients 0",
            "--qmp-commands ,",
            "--qmp-commands query\"status",
        ] {
            assert!(matches!(parse_args(&args(bad)), Err(BenchError::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn rounds_rotate_the_start() {
        assert_eq!(rotated(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rotated(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(rotated(3, 5).collect::<Vec<_>>(), [2, 0, 1]);
    }
}
