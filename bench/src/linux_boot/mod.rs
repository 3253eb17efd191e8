//! `flotilla-bench linux-boot`: the project's kvm_pvm test kernel (`tests/kit/build-pvm-kernel.sh`,
//! the PVH vmlinux) booted to `Run /sbin/init` on vmm-core (through the `flotilla` launcher, the
//! disk through blockd, a balloon through balloond) and on QEMU's microvm and q35, with the same
//! command line, memory, vCPUs and root disk (a fresh copy of one `pvm_kernel::root_disk` per
//! boot). Reports the wall time to that line, the kernel's own timestamp on it, and what each
//! kernel log complains about (see bench/README.md, "Linux boot").

mod boot;
mod log;
mod machine;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use crate::error::BenchError;
use crate::vmproc::{self, Spec};
use machine::Machine;
use report::MachineRuns;

const USAGE: &str = "\
usage: flotilla-bench linux-boot [options]

  Boots the kvm_pvm test kernel (tests/kit/build-pvm-kernel.sh, its PVH vmlinux) with
  `console=ttyS0 root=/dev/vda1 rootwait`, -m 512 -smp 2, a root disk (MBR + ext4 whose
  /sbin/init spins in user mode; a fresh copy per boot) on virtio-blk and a virtio balloon, on:
    vmm-core      flotilla launcher -> vmm-core -M q35, the disk through blockd
    microvm       QEMU -accel kvm -M microvm,acpi=on,rtc=on, virtio-mmio devices
    microvm-pcie  the same with pcie=on and virtio-*-pci devices
    q35           QEMU -accel kvm -M q35 (SeaBIOS), virtio-*-pci devices
  and reports per machine the wall time from the VMM's start to the console line
  `Run /sbin/init`, the kernel's timestamp on it, the console lines that complain (errors,
  warnings, firmware bugs, timeouts) and the largest jumps of the kernel's clock; ratios
  vmm-core / each QEMU machine. Boots run one at a time (each a minute or more here).

options:
  --runs N            boots per machine (default 1)
  --machines LIST     comma-separated, of the four above (default vmm-core,microvm,q35)
  --timeout SECS      limit for one boot to `Run /sbin/init` (default 240)
  --q35-timeout SECS  the same for q35, whose ACPI _PRT evaluation is slow here (default 900)
  --after SECS        how long to keep reading the console after `Run /sbin/init` (default 3)
  --dir DIR           where the disks and console logs go (default /var/tmp)
  --keep              keep the console logs (they are kept anyway when a boot failed)
  --flotilla PATH     the launcher (default: next to this executable; vmm-core, blockd and
                      balloond beside it)
  --qemu PATH         qemu-system-x86_64 (default: on PATH)
  --json              JSON report on stdout (the table then goes to stderr)
";

/// The root disk: room for ext4's journal and the init, as the kernel tests use.
const DISK_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq)]
struct Options {
    runs: usize,
    machines: Vec<Machine>,
    timeout: Duration,
    q35_timeout: Duration,
    after: Duration,
    dir: PathBuf,
    keep: bool,
    flotilla: Option<PathBuf>,
    qemu: Option<PathBuf>,
    json: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            runs: 1,
            machines: Machine::DEFAULT.to_vec(),
            timeout: Duration::from_secs(240),
            q35_timeout: Duration::from_secs(900),
            after: Duration::from_secs(3),
            dir: PathBuf::from("/var/tmp"),
            keep: false,
            flotilla: None,
            qemu: None,
            json: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Vm(#[from] BenchError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LinuxBootError {
    let what = what.into();
    move |source| LinuxBootError::Io { what, source }
}

fn usage(msg: impl std::fmt::Display) -> LinuxBootError {
    LinuxBootError::Usage(format!("{msg}\n{USAGE}"))
}

fn seconds(name: &str, v: &str, range: std::ops::RangeInclusive<u64>) -> Result<Duration, LinuxBootError> {
    v.parse()
        .ok()
        .filter(|n| range.contains(n))
        .map(Duration::from_secs)
        .ok_or_else(|| usage(format!("{name}: '{v}' is not {}..{}", range.start(), range.end())))
}

fn parse_args(args: &[String]) -> Result<Option<Options>, LinuxBootError> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| usage(format!("{name} needs a value")));
        match a.as_str() {
            "-h" | "--help" | "help" => return Ok(None),
            "--runs" => {
                let v = value(a)?;
                o.runs = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| usage(format!("--runs: '{v}' is not 1..100")))?;
            }
            "--machines" => o.machines = machines(&value(a)?)?,
            "--timeout" => o.timeout = seconds(a, &value(a)?, 10..=3600)?,
            "--q35-timeout" => o.q35_timeout = seconds(a, &value(a)?, 10..=3600)?,
            "--after" => o.after = seconds(a, &value(a)?, 0..=60)?,
            "--dir" => o.dir = value(a)?.into(),
            "--keep" => o.keep = true,
            "--flotilla" => o.flotilla = Some(value(a)?.into()),
            "--qemu" => o.qemu = Some(value(a)?.into()),
            "--json" => o.json = true,
            other => return Err(usage(format!("unknown argument '{other}'"))),
        }
    }
    Ok(Some(o))
}

/// The `--machines` list, each once, in the order given.
fn machines(v: &str) -> Result<Vec<Machine>, LinuxBootError> {
    let mut out = Vec::new();
    for k in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let m = Machine::ALL.into_iter().find(|m| m.key() == k).ok_or_else(|| {
            let names: Vec<&str> = Machine::ALL.iter().map(|m| m.key()).collect();
            usage(format!("--machines: unknown machine '{k}' ({})", names.join(", ")))
        })?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        return Err(usage("--machines: none named"));
    }
    Ok(out)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// The launcher, with the daemons it starts beside it.
fn find_flotilla(o: &Options) -> Result<PathBuf, LinuxBootError> {
    let flotilla = match &o.flotilla {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(io("locating the bench executable"))?
            .parent()
            .unwrap_or(Path::new("."))
            .join("flotilla"),
    };
    let dir = flotilla.parent().unwrap_or(Path::new("."));
    for p in [flotilla.clone(), dir.join("vmm-core"), dir.join("blockd"), dir.join("balloond")] {
        if !p.is_file() {
            return Err(LinuxBootError::Setup(format!(
                "{} is missing: build it (cargo build --release -p flotilla -p vmm-core -p blockd -p balloond) \
                 or pass --flotilla PATH",
                p.display()
            )));
        }
    }
    Ok(flotilla)
}

fn find_qemu(o: &Options) -> Result<PathBuf, LinuxBootError> {
    match o.qemu.clone().or_else(|| which("qemu-system-x86_64")) {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(LinuxBootError::Setup(
            "qemu-system-x86_64 not found (scripts/setup-host installs it), or pass --qemu PATH".into(),
        )),
    }
}

/// A short command's stdout lines, or why not.
fn lines(program: &str, args: &[&str]) -> Result<Vec<String>, String> {
    let spec = Spec {
        label: program.into(),
        program: program.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec![],
    };
    vmproc::output_lines(&spec, Duration::from_secs(10)).map_err(|e| crate::error::chain(&e))
}

/// A short command's stdout as one string; "unknown (...)" when it failed or said nothing.
fn output(program: &str, args: &[&str]) -> String {
    match lines(program, args) {
        Ok(l) if l.is_empty() => format!("unknown ({program} said nothing on stdout)"),
        Ok(l) => l.join("\n"),
        Err(e) => format!("unknown ({e})"),
    }
}

/// What was measured: the host, QEMU, and which vmm-core (its commit, whether its sources
/// differed from it, the binary's time stamp).
fn host_info(qemu: Option<&Path>, flotilla: Option<&Path>) -> serde_json::Value {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).display().to_string();
    let git = |args: &[&str]| {
        let mut a = vec!["-C", src.as_str()];
        a.extend_from_slice(args);
        output("git", &a)
    };
    let binary = |p: PathBuf| {
        let m = p.metadata().ok();
        let modified = m
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        json!({"path": p.display().to_string(), "modified_unix": modified})
    };
    let dir = flotilla.and_then(Path::parent);
    let kvm_modules: Vec<&str> =
        ["kvm_intel", "kvm_amd", "kvm_pvm"].into_iter().filter(|m| Path::new("/sys/module").join(m).exists()).collect();
    json!({
        "kernel": output("uname", &["-r"]),
        "kvm_modules": kvm_modules,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "loadavg_at_start": boot::loadavg(),
        "qemu_version": qemu.map(|q| output(&q.display().to_string(), &["-version"]).lines().next().unwrap_or("").to_string()),
        "git_commit": git(&["rev-parse", "--short", "HEAD"]),
        "vmm_core_commit": git(&["log", "-1", "--format=%h", "--", "vmm-core"]),
        // Empty: the launcher's and daemons' sources were as committed when the bench ran
        // (the binaries may still be older: see their time stamps).
        "vmm_side_uncommitted_changes": lines("git", &["-C", src.as_str(), "status", "--porcelain", "--", "vmm-core", "flotilla", "blockd", "balloond", "vm-config"])
            .map_or_else(|e| json!(format!("unknown ({e})")), |l| json!(l)),
        "binaries": dir.map(|d| ["flotilla", "vmm-core", "blockd", "balloond"].map(|b| binary(d.join(b))).to_vec()),
    })
}

fn run(o: &Options) -> Result<(serde_json::Value, String, bool), LinuxBootError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(io("opening /dev/kvm read-write (every machine here uses KVM)"))?;
    let flotilla = o.machines.contains(&Machine::VmmCore).then(|| find_flotilla(o)).transpose()?;
    let qemu = o.machines.iter().any(|m| m.is_qemu()).then(|| find_qemu(o)).transpose()?;
    let kernel = flotilla_tests::pvm_kernel::kernel().map_err(LinuxBootError::Setup)?;
    let dir = o.dir.join(format!("flotilla-bench-linux-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    // The kit keeps one build and removes the others: another build (another fragment) may
    // take this one away at any time, so every boot uses a copy of its own.
    let vmlinux = dir.join("vmlinux");
    for (from, to) in [(&kernel.vmlinux, &vmlinux), (&kernel.system_map, &dir.join("System.map"))] {
        std::fs::copy(from, to).map_err(io(format!("copying {} to {}", from.display(), to.display())))?;
    }
    let base = dir.join("root-base.raw");
    flotilla_tests::pvm_kernel::root_disk(&base, DISK_BYTES, "flotilla-bench linux-boot")
        .map_err(|e| LinuxBootError::Setup(format!("writing the root disk {}: {e}", base.display())))?;
    let host = host_info(qemu.as_deref(), flotilla.as_deref());
    eprintln!(
        "flotilla-bench linux-boot: {} ({}); vmm-core at {}; load {}",
        kernel.vmlinux.display(),
        kernel.kver,
        host["vmm_core_commit"].as_str().unwrap_or("?"),
        host["loadavg_at_start"].as_str().unwrap_or("?")
    );

    let mut runs: Vec<MachineRuns> = o
        .machines
        .iter()
        .map(|&m| {
            let program = if m.is_qemu() { qemu.clone() } else { flotilla.clone() };
            let disk = dir.join(format!("{}.raw", m.key()));
            let argv = machine::spec(m, &program.unwrap_or_default(), &vmlinux, &disk).argv();
            MachineRuns { machine: m, argv, boots: Vec::new() }
        })
        .collect();
    let mut failures = Vec::new();
    for round in 0..o.runs {
        // Each round starts from a different machine, so that none always boots first.
        let n = runs.len();
        for i in (0..n).map(|i| (i + round) % n) {
            let r = &mut runs[i];
            let m = r.machine;
            let program = if m.is_qemu() { qemu.clone() } else { flotilla.clone() }.unwrap_or_default();
            let disk = dir.join(format!("{}.raw", m.key()));
            let settings = boot::Settings {
                run: round + 1,
                spec: machine::spec(m, &program, &vmlinux, &disk),
                base_disk: &base,
                disk: &disk,
                timeout: if m == Machine::Q35 { o.q35_timeout } else { o.timeout },
                after: o.after,
                console_log: dir.join(format!("{}-{}.console.log", m.key(), round + 1)),
            };
            eprintln!("flotilla-bench linux-boot: {} run {}/{} ...", m.key(), round + 1, o.runs);
            match boot::boot(&settings) {
                Ok(b) => {
                    eprintln!(
                        "flotilla-bench linux-boot: {} run {}: {}",
                        m.key(),
                        round + 1,
                        match (&b.failure, b.run_init_ms, b.run_init_kernel_s) {
                            (Some(f), _, _) => format!("failed: {f}"),
                            (None, Some(w), Some(k)) => format!(
                                "`Run /sbin/init` after {:.1} s (kernel clock {k:.2} s), {} complaints",
                                w / 1e3,
                                b.complaints.len()
                            ),
                            _ => "no timestamp on `Run /sbin/init`".into(),
                        }
                    );
                    r.boots.push(b);
                }
                Err(e) => failures.push(format!("{} run {}: {}", m.key(), round + 1, crate::error::chain(&e))),
            }
        }
    }
    let boot_failed = runs.iter().flat_map(|r| &r.boots).any(|b| b.failure.is_some());
    let mut json = report::to_json(&runs);
    json["command"] = json!(std::env::args().collect::<Vec<_>>());
    json["settings"] = json!({
        "kernel": {"vmlinux": kernel.vmlinux.display().to_string(), "booted_copy": vmlinux.display().to_string(), "version": kernel.kver},
        "cmdline": machine::CMDLINE,
        "mem_mib": machine::MEM_MIB,
        "cpus": machine::CPUS,
        "disk_bytes": DISK_BYTES,
        "runs": o.runs,
        "timeout_s": o.timeout.as_secs(),
        "q35_timeout_s": o.q35_timeout.as_secs(),
        "after_s": o.after.as_secs(),
    });
    json["host"] = host;
    json["failures"] = json!(failures);
    let table = report::table(&runs, &failures);
    let failed = boot_failed || !failures.is_empty();
    let _ = std::fs::remove_file(&base);
    if failed || o.keep {
        eprintln!("flotilla-bench linux-boot: console logs are in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok((json, table, failed))
}

/// The `linux-boot` subcommand; `args` are those after `linux-boot`.
pub fn main(args: &[String]) -> ExitCode {
    crate::part::main("linux-boot", "boots", USAGE, parse_args(args), |o| o.json, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse() {
        assert_eq!(parse_args(&[]).unwrap().unwrap(), Options::default());
        let o = parse_args(&args(&[
            "--runs",
            "3",
            "--machines",
            "q35,vmm-core,q35",
            "--timeout",
            "60",
            "--q35-timeout",
            "1200",
            "--after",
            "0",
            "--keep",
            "--json",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((o.runs, o.machines.clone()), (3, vec![Machine::Q35, Machine::VmmCore]));
        assert_eq!(
            (o.timeout, o.q35_timeout, o.after),
            (Duration::from_secs(60), Duration::from_secs(1200), Duration::ZERO)
        );
        assert!(o.keep && o.json);
        for bad in [
            &["--runs", "0"][..],
            &["--machines", "pc"],
            &["--machines", ","],
            &["--timeout", "5"],
            &["--x"],
            &["--runs"],
        ] {
            assert!(matches!(parse_args(&args(bad)), Err(LinuxBootError::Usage(_))), "{bad:?}");
        }
        assert!(parse_args(&args(&["--help"])).unwrap().is_none());
    }
}
