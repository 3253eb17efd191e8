//! flotilla-bench: Flotilla against qemu-system-x86_64, side by side in one run, on the same
//! test guest (see bench/README.md). JSON report on stdout, a short table on stderr.

mod error;
mod procfs;
mod report;
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
use report::{BootSetup, MemSetup, Setup, VariantResults};
use runs::{Variant, QEMU_VARIANTS};
use vmproc::Spec;

const USAGE: &str = "\
usage: flotilla-bench [all|boot|memory] [options]

  all (default)   boot times, then memory overhead
  boot            process start -> the guest's first serial line and READY, N interleaved runs
  memory          RSS/PSS of the VMM's processes minus guest RAM, guest booted to READY

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
";

#[derive(Debug, Clone, PartialEq)]
struct Options {
    boot: bool,
    memory: bool,
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            boot: true,
            memory: true,
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
            "all" | "boot" | "memory" if !seen_part => {
                seen_part = true;
                o.boot = a != "memory";
                o.memory = a != "boot";
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
            other => return Err(usage_error(format!("unknown argument '{other}'"))),
        }
    }
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

/// The flotilla launcher and the vmm-core beside it.
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
    for p in [&flotilla, &vmm_core] {
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
    let host = host_info(&qemu, &flotilla, &vmm_core);

    // Warm-up boots: page cache, and whether the optional QEMU variants work here at all.
    let mut unavailable = Vec::new();
    for _ in 0..o.warmup.max(1) {
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
    Ok((report::to_json(&setup, &results), report::table(&setup, &results), failed))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
        assert!(o.boot && o.memory);
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
        assert!(!o.boot && o.memory);
        assert_eq!(o.mem_mib, 512);
        assert!(parse_args(&args("--help")).unwrap().is_none());
    }

    #[test]
    fn bad_arguments() {
        for bad in ["--runs 0", "--runs", "--runs x", "--qemu-variants pc", "--frobnicate", "boot memory", "--mem 8"] {
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
