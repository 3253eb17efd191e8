//! `flotilla-bench balloon`: how fast a virtio-balloon reclaims 1 GiB of a guest's memory, and
//! how much of it the host really gets back, Flotilla (vmm-core + balloond, which hole-punches
//! the guest-RAM memfd) against QEMU (its built-in virtio-balloon, madvise(DONTNEED) on its
//! anonymous RAM), on the same test guest, rounds interleaved.
//!
//! - `hostmem`: smaps_rollup and memfd allocation of every process of a VM;
//! - `monitor`: a QMP client that keeps events with their arrival times;
//! - `round`: one measured round on one VMM;
//! - `report`: medians, ratios, JSON and the table.

mod hostmem;
mod monitor;
mod report;
mod round;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{self, BenchError};
use crate::runs::Variant;
use crate::vmproc::Spec;
use report::SideResults;
use round::Plan;

const USAGE: &str = "\
usage: flotilla-bench balloon [options]

Boots the test guest with -m MEM and a virtio-balloon on Flotilla and on QEMU q35, makes TOUCH MiB
of its memory allocated on the host (the guest's `touch`), then sets the balloon target over QMP
so that RECLAIM MiB go into the balloon, and measures: the time from the QMP command to the
guest's `BALLOONED` line and to the last BALLOON_CHANGE event, and the host memory of every
process of the VM before and after (smaps_rollup; for Flotilla also the guest-RAM memfd's
allocated bytes). Then it deflates and checks that the guest's memory reads back intact.

options:
  --rounds N         interleaved rounds, each running both VMMs once (default 3)
  --json             the JSON report (raw numbers) on stdout, the table on stderr
  --mem MIB          guest RAM (default 1280)
  --reclaim MIB      how much the balloon takes (default 1024)
  --touch MIB        how much the guest touches first (default 1100; at least --reclaim)
  --qemu PATH        qemu-system-x86_64 (default: the one on PATH)
  --qemu-accel A     kvm (default) or tcg
  --flotilla PATH    the flotilla launcher (default: beside this executable; vmm-core,
                     qmp-gateway and balloond must sit beside it)
  --timeout SECS     boot to READY, and each short guest command (default 30)
  --balloon-timeout SECS   one inflation or deflation (default 120)
  --walk-timeout SECS      the guest's touch and touchcheck (default 600)
";

#[derive(Debug, Clone, PartialEq)]
struct Options {
    rounds: usize,
    json: bool,
    plan: Plan,
    qemu: Option<PathBuf>,
    qemu_accel: String,
    flotilla: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 3,
            json: false,
            plan: Plan {
                mem_mib: 1280,
                touch_mib: 1100,
                reclaim_mib: 1024,
                timeout: Duration::from_secs(30),
                balloon_timeout: Duration::from_secs(120),
                walk_timeout: Duration::from_secs(600),
            },
            qemu: None,
            qemu_accel: "kvm".into(),
            flotilla: None,
        }
    }
}

fn usage(msg: impl std::fmt::Display) -> BenchError {
    BenchError::Usage(format!("{msg}\n{USAGE}"))
}

fn parse_args(args: &[String]) -> Result<Option<Options>, BenchError> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| usage(format!("{name} needs a value")));
        fn num(name: &str, v: String, min: u64) -> Result<u64, BenchError> {
            match v.parse::<u64>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(usage(format!("{name}: '{v}' is not a number >= {min}"))),
            }
        }
        match a.as_str() {
            "-h" | "--help" | "help" => return Ok(None),
            "--rounds" => o.rounds = num(a, value(a)?, 1)? as usize,
            "--json" => o.json = true,
            "--mem" => o.plan.mem_mib = num(a, value(a)?, 64)?,
            "--reclaim" => o.plan.reclaim_mib = num(a, value(a)?, 1)?,
            "--touch" => o.plan.touch_mib = num(a, value(a)?, 1)?,
            "--qemu" => o.qemu = Some(value(a)?.into()),
            "--qemu-accel" => match value(a)?.as_str() {
                v @ ("kvm" | "tcg") => o.qemu_accel = v.into(),
                v => return Err(usage(format!("--qemu-accel: '{v}' is neither kvm nor tcg"))),
            },
            "--flotilla" => o.flotilla = Some(value(a)?.into()),
            "--timeout" => o.plan.timeout = Duration::from_secs(num(a, value(a)?, 1)?),
            "--balloon-timeout" => o.plan.balloon_timeout = Duration::from_secs(num(a, value(a)?, 1)?),
            "--walk-timeout" => o.plan.walk_timeout = Duration::from_secs(num(a, value(a)?, 1)?),
            other => return Err(usage(format!("unknown argument '{other}'"))),
        }
    }
    let p = &o.plan;
    // The guest keeps at least 64 MiB (its image and stacks are in the low MiBs), and the
    // touched memory must cover what the balloon takes, or "freed" would measure untouched pages.
    if p.reclaim_mib + 64 > p.mem_mib {
        return Err(usage(format!("--reclaim {} leaves the {} MiB guest less than 64 MiB", p.reclaim_mib, p.mem_mib)));
    }
    if p.touch_mib < p.reclaim_mib || p.touch_mib + 16 > p.mem_mib {
        return Err(usage(format!(
            "--touch {} must be at least --reclaim ({}) and leave 16 MiB of the {} MiB guest",
            p.touch_mib, p.reclaim_mib, p.mem_mib
        )));
    }
    Ok(Some(o))
}

/// The binaries compared: (flotilla, vmm-core, balloond, qemu).
fn find_binaries(o: &Options) -> Result<(PathBuf, PathBuf, PathBuf, PathBuf), BenchError> {
    let flotilla = match &o.flotilla {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| BenchError::Io { what: "locating the bench executable".into(), source: e })?
            .with_file_name("flotilla"),
    };
    let dir = flotilla.parent().unwrap_or(Path::new(".")).to_path_buf();
    let (vmm_core, balloond) = (dir.join("vmm-core"), dir.join("balloond"));
    for p in [&flotilla, &vmm_core, &crate::runs::gateway_beside(&vmm_core), &balloond] {
        if !p.is_file() {
            return Err(BenchError::Setup(format!(
                "{} is missing: build the release binaries first (cargo build --release -p flotilla -p vmm-core \
                 -p qmp-gateway -p balloond -p flotilla-tests), or pass --flotilla PATH",
                p.display()
            )));
        }
    }
    let qemu = match &o.qemu {
        Some(p) if p.is_file() => p.clone(),
        Some(p) => return Err(BenchError::Setup(format!("--qemu {}: no such file", p.display()))),
        None => crate::which("qemu-system-x86_64")
            .ok_or_else(|| BenchError::Setup("qemu-system-x86_64 not found on PATH (or pass --qemu PATH)".into()))?,
    };
    Ok((flotilla, vmm_core, balloond, qemu))
}

/// Both command lines: the boot part's (`-M q35 -m MEM -smp 1 -kernel GUEST -serial stdio
/// -nodefaults ...`) plus the balloon and a QMP socket; QEMU with `-accel tcg` if asked.
fn specs(
    o: &Options,
    bins: &(PathBuf, PathBuf, PathBuf, PathBuf),
    elf: &Path,
    dir: &Path,
) -> Vec<(&'static str, Spec)> {
    let (flotilla, vmm_core, balloond, qemu) = bins;
    let extra = |key: &str| {
        vec![
            "-device".to_string(),
            "virtio-balloon-pci,id=balloon0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", round::socket_path(dir, key).display()),
        ]
    };
    let mut f = Variant::flotilla(flotilla.clone(), vmm_core).spec(o.plan.mem_mib, elf);
    f.args.extend(extra("flotilla"));
    f.env.push(("FLOTILLA_BALLOOND".into(), balloond.display().to_string()));
    // Logging costs the measurement nothing: warnings only.
    f.env.push(("BALLOOND_LOG".into(), "warn".into()));
    f.label = "flotilla".into();
    let mut q = Variant::qemu(qemu.clone(), "q35").map(|v| v.spec(o.plan.mem_mib, elf)).unwrap_or_else(|| Spec {
        label: "qemu".into(),
        program: qemu.clone(),
        args: Vec::new(),
        env: Vec::new(),
    });
    if o.qemu_accel == "tcg" {
        q.args = q
            .args
            .into_iter()
            .flat_map(|a| if a == "-enable-kvm" { vec!["-accel".into(), "tcg".into()] } else { vec![a] })
            .collect();
    }
    q.args.extend(extra("qemu"));
    q.label = "qemu".into();
    vec![("flotilla", f), ("qemu", q)]
}

fn loadavg() -> Value {
    json!(std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()))
}

fn run(o: &Options, command: Vec<String>) -> Result<(Value, String, bool), BenchError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| BenchError::Io { what: "opening /dev/kvm read-write".into(), source: e })?;
    let bins = find_binaries(o)?;
    let elf = flotilla_tests::guest::guest_elf();
    if !elf.is_file() {
        return Err(BenchError::Setup(format!(
            "the test guest {} is missing (cargo build --release -p flotilla-tests builds it)",
            elf.display()
        )));
    }
    let dir = std::env::temp_dir().join(format!("flotilla-bench-balloon-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Io { what: format!("creating {}", dir.display()), source: e })?;
    let load_before = loadavg();
    let specs = specs(o, &bins, &elf, &dir);
    let mut results: Vec<SideResults> = specs
        .iter()
        .map(|(key, s)| SideResults {
            key,
            label: if *key == "flotilla" {
                "Flotilla: flotilla + vmm-core + balloond (hole-punches the guest-RAM memfd)".into()
            } else {
                format!("QEMU q35 -accel {} (built-in virtio-balloon, madvise DONTNEED)", o.qemu_accel)
            },
            argv: s.argv(),
            samples: Vec::new(),
            failures: Vec::new(),
        })
        .collect();
    eprintln!("flotilla-bench balloon: {} vs {}", bins.0.display(), bins.3.display());
    let mut failed = false;
    for r in 0..o.rounds {
        let mut line = format!("balloon round {}/{}:", r + 1, o.rounds);
        for i in crate::rotated(specs.len(), r) {
            let (key, spec) = &specs[i];
            match round::run(spec, &round::socket_path(&dir, key), &o.plan) {
                Ok(s) => {
                    let d = report::derive(&s, o.plan.reclaim_mib);
                    line += &format!(
                        " {key} {:.1} ms, freed {:.1} MiB ({:.1}%), memfd {:.1} MiB, touchcheck {:.1} s;",
                        d.reclaim_ms,
                        d.freed_rss_mib,
                        d.share * 100.0,
                        d.freed_memfd_mib,
                        s.touchcheck_ms / 1e3
                    );
                    results[i].samples.push(s);
                }
                Err(e) => {
                    failed = true;
                    let msg = error::chain(&e);
                    eprintln!("flotilla-bench balloon: {key}: round {} failed: {msg}", r + 1);
                    results[i].failures.push(format!("round {}: {msg}", r + 1));
                }
            }
        }
        eprintln!("{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut host = crate::host_info(&bins.3, &bins.0, &bins.1);
    host["balloond"] = json!(bins.2.display().to_string());
    let setup = json!({
        "command": command,
        "guest_elf": elf.display().to_string(),
        "qemu_accel": o.qemu_accel,
        "rounds": o.rounds,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "host": host,
    });
    let json = report::to_json(setup, &o.plan, &results);
    let mut table = report::table(&o.plan, &results);
    table += &format!("load average before {load_before}, after {}\n", loadavg());
    Ok((json, table, failed))
}

pub fn main(args: &[String]) -> ExitCode {
    crate::part::main("balloon", "rounds", USAGE, parse_args(args), |o| o.json, |o| run(o, std::env::args().collect()))
}
