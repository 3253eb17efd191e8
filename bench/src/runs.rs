//! The VMs compared and one measured run of each kind: a boot (start to the first serial line
//! and to READY) and a memory sample (smaps of every process of the VM, guest booted to READY).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::BenchError;
use crate::smaps::{self, Accounting, GuestRamRule, Usage};
use crate::vmproc::{Spec, Stopped, VmProcess};
use crate::{procfs, tracelog};

/// The test guest's first serial line on its first boot (tests/guest/PROTOCOL.md).
pub const FIRST_LINE: &str = "FLOTILLA-GUEST v1 boot=1";
/// The name vmm-core gives its guest-RAM memfd (vmm-core/src/memory.rs).
pub const GUEST_RAM_MEMFD: &str = "flotilla-guest-ram";
/// Room above the `-m` size allowed for QEMU's RAM mapping (alignment, guard page).
pub const QEMU_RAM_SLACK_KIB: u64 = 4096;
/// Only the boot-marker events of vmm-core at info, the rest at the default (warn), so that
/// logging costs the measured boot nothing.
pub const MARKER_LOG_FILTER: &str = "warn,vmm_core::devices::marker=info";
/// How long the guest gets to answer one command.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Flotilla,
    Qemu,
}

/// One VMM configuration in the comparison.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Short name used in the JSON (`flotilla`, `qemu-q35`, ...).
    pub key: String,
    pub label: String,
    pub kind: Kind,
    pub program: PathBuf,
    pub machine: &'static str,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A failure of this variant fails the bench (flotilla and plain q35); the others are
    /// reported as unavailable.
    pub required: bool,
}

/// The QEMU configurations the bench knows: `(key suffix, label, machine, extra args)`.
pub const QEMU_VARIANTS: &[(&str, &str, &str, &[&str])] = &[
    ("q35", "QEMU q35, SeaBIOS (the default firmware)", "q35", &[]),
    ("q35-qboot", "QEMU q35 with -bios qboot.rom", "q35", &["-bios", "qboot.rom"]),
    ("microvm", "QEMU -M microvm (qboot firmware)", "microvm", &[]),
];

/// Where the launcher is told to find qmp-gateway: beside vmm-core (target/release/).
pub fn gateway_beside(vmm_core: &Path) -> PathBuf {
    vmm_core.with_file_name("qmp-gateway")
}

impl Variant {
    pub fn flotilla(program: PathBuf, vmm_core: &Path) -> Variant {
        Variant {
            key: "flotilla".into(),
            label: "Flotilla (flotilla + vmm-core)".into(),
            kind: Kind::Flotilla,
            program,
            machine: "q35",
            extra_args: Vec::new(),
            env: vec![
                ("FLOTILLA_VMM_CORE".into(), vmm_core.display().to_string()),
                ("FLOTILLA_QMP_GATEWAY".into(), gateway_beside(vmm_core).display().to_string()),
                ("RUST_LOG".into(), MARKER_LOG_FILTER.into()),
                ("NO_COLOR".into(), "1".into()),
            ],
            required: true,
        }
    }

    pub fn qemu(program: PathBuf, which: &str) -> Option<Variant> {
        let (key, label, machine, extra) = QEMU_VARIANTS.iter().find(|v| v.0 == which)?;
        Some(Variant {
            key: format!("qemu-{key}"),
            label: (*label).into(),
            kind: Kind::Qemu,
            program,
            machine,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            required: *key == "q35",
        })
    }

    /// The same command line for every VMM (Flotilla takes QEMU's spellings), `-M` and the
    /// firmware aside.
    pub fn spec(&self, mem_mib: u64, elf: &Path) -> Spec {
        let mut args: Vec<String> = [
            "-enable-kvm",
            "-M",
            self.machine,
            "-m",
            &mem_mib.to_string(),
            "-smp",
            "1",
            "-kernel",
            &elf.display().to_string(),
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-nodefaults",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra_args.iter().cloned());
        Spec { label: self.key.clone(), program: self.program.clone(), args, env: self.env.clone() }
    }

    pub fn guest_ram_rule(&self, mem_mib: u64) -> GuestRamRule {
        match self.kind {
            Kind::Flotilla => GuestRamRule::Memfd(GUEST_RAM_MEMFD.into()),
            Kind::Qemu => GuestRamRule::AnonymousOfSize { ram_kib: mem_mib * 1024, slack_kib: QEMU_RAM_SLACK_KIB },
        }
    }
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1e3
}

fn is_ready(l: &str) -> bool {
    l.trim() == "READY"
}

/// One boot, in milliseconds since just before fork+exec of the VMM.
#[derive(Debug, Clone, Copy)]
pub struct BootSample {
    pub first_line_ms: f64,
    pub ready_ms: f64,
    /// Flotilla only: vmm-core's boot-marker time (since `Vm::new` began) of the guest's `mark`
    /// command, sent as soon as READY was read; and when the answer `MARKED` reached the bench.
    pub mark: Option<(f64, f64)>,
    pub stopped: Stopped,
}

pub fn run_boot(v: &Variant, mem_mib: u64, elf: &Path, timeout: Duration) -> Result<BootSample, BenchError> {
    let mut p = VmProcess::spawn(&v.spec(mem_mib, elf))?;
    let deadline = p.started + timeout;
    let first = p.expect(&format!("'{FIRST_LINE}'"), |l| l.contains(FIRST_LINE), deadline)?;
    let ready = p.expect("READY", is_ready, deadline)?;
    let mut mark = None;
    if v.kind == Kind::Flotilla {
        p.send("mark")?;
        let marked = p.expect("MARKED", |l| l.trim() == "MARKED", Instant::now() + REPLY_TIMEOUT)?;
        let us = p.expect_stderr(
            "vmm-core's 'guest boot marker' log line",
            tracelog::boot_marker_us,
            Instant::now() + REPLY_TIMEOUT,
        )?;
        mark = Some((us as f64 / 1e3, ms(p.started, marked)));
    }
    let stopped = p.stop()?;
    Ok(BootSample { first_line_ms: ms(p.started, first), ready_ms: ms(p.started, ready), mark, stopped })
}

#[derive(Debug, Clone)]
pub struct ProcessMemory {
    pub pid: i32,
    pub comm: String,
    pub acc: Accounting,
}

/// The memory of one VM (all its processes) at READY.
#[derive(Debug, Clone)]
pub struct MemSample {
    pub processes: Vec<ProcessMemory>,
    pub total: Usage,
    pub guest_ram: Usage,
    pub stopped: Stopped,
}

impl MemSample {
    pub fn overhead(&self) -> Usage {
        self.total.minus(self.guest_ram)
    }
}

pub fn run_memory(
    v: &Variant,
    mem_mib: u64,
    elf: &Path,
    timeout: Duration,
    settle: Duration,
) -> Result<MemSample, BenchError> {
    let mut p = VmProcess::spawn(&v.spec(mem_mib, elf))?;
    p.expect("READY", is_ready, p.started + timeout)?;
    std::thread::sleep(settle);
    let rule = v.guest_ram_rule(mem_mib);
    let mut processes = Vec::new();
    for pid in procfs::process_tree(p.pid()) {
        let path = format!("/proc/{pid}/smaps");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| BenchError::Io { what: format!("{}: reading {path}", v.key), source: e })?;
        let maps = smaps::parse(&text).map_err(|e| BenchError::Smaps { pid, source: e })?;
        let acc = smaps::account(&maps, &rule)
            .map_err(|detail| BenchError::GuestRam { what: format!("{} (pid {pid})", v.key), detail })?;
        let comm = procfs::comm_and_ppid(pid).map(|c| c.0).unwrap_or_default();
        processes.push(ProcessMemory { pid, comm, acc });
    }
    check_guest_ram_found(v, mem_mib, &processes, &rule)?;
    let total = processes.iter().fold(Usage::default(), |u, p| u.plus(p.acc.total));
    let guest_ram = processes.iter().fold(Usage::default(), |u, p| u.plus(p.acc.guest_ram));
    let stopped = p.stop()?;
    Ok(MemSample { processes, total, guest_ram, stopped })
}

/// Some process must map the whole guest RAM, else the rule found the wrong thing (or nothing)
/// and the overhead figure would be wrong.
fn check_guest_ram_found(
    v: &Variant,
    mem_mib: u64,
    processes: &[ProcessMemory],
    rule: &GuestRamRule,
) -> Result<(), BenchError> {
    let ram_kib = mem_mib * 1024;
    let slack = match rule {
        GuestRamRule::Memfd(_) => 0,
        GuestRamRule::AnonymousOfSize { slack_kib, .. } => *slack_kib,
    };
    let ok = processes.iter().any(|p| (ram_kib..=ram_kib + slack).contains(&p.acc.guest_ram.size_kib));
    if ok {
        return Ok(());
    }
    let found: Vec<String> = processes
        .iter()
        .map(|p| {
            format!("pid {} ({}): {} KiB in {:?}", p.pid, p.comm, p.acc.guest_ram.size_kib, p.acc.guest_ram_mappings)
        })
        .collect();
    Err(BenchError::GuestRam {
        what: v.key.clone(),
        detail: format!(
            "no process maps {ram_kib} KiB of guest RAM by the rule \"{}\"; found: {}",
            rule.describe(),
            found.join("; ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vmm_gets_the_same_command_line_but_for_machine_and_firmware() {
        let elf = Path::new("/g.elf");
        let f = Variant::flotilla("/t/flotilla".into(), Path::new("/t/vmm-core")).spec(128, elf);
        let q = Variant::qemu("/usr/bin/qemu".into(), "q35").unwrap().spec(128, elf);
        assert_eq!(f.args, q.args);
        assert!(f.args.windows(2).any(|w| w == ["-m", "128"]));
        assert!(f.args.windows(2).any(|w| w == ["-kernel", "/g.elf"]));
        let qb = Variant::qemu("/usr/bin/qemu".into(), "q35-qboot").unwrap().spec(128, elf);
        assert_eq!(&qb.args[qb.args.len() - 2..], ["-bios", "qboot.rom"]);
        let mv = Variant::qemu("/usr/bin/qemu".into(), "microvm").unwrap().spec(128, elf);
        assert!(mv.args.windows(2).any(|w| w == ["-M", "microvm"]));
        assert!(Variant::qemu("/q".into(), "nope").is_none());
    }

    #[test]
    fn only_flotilla_and_plain_q35_are_required() {
        assert!(Variant::flotilla("/f".into(), Path::new("/v")).required);
        let req: Vec<bool> = QEMU_VARIANTS.iter().map(|v| Variant::qemu("/q".into(), v.0).unwrap().required).collect();
        assert_eq!(req, [true, false, false]);
    }

    #[test]
    fn guest_ram_check_wants_the_whole_ram_in_one_process() {
        let v = Variant::qemu("/q".into(), "q35").unwrap();
        let rule = v.guest_ram_rule(256);
        let mut p = ProcessMemory { pid: 1, comm: "qemu".into(), acc: Accounting::default() };
        assert!(check_guest_ram_found(&v, 256, std::slice::from_ref(&p), &rule).is_err());
        p.acc.guest_ram.size_kib = 262144;
        assert!(check_guest_ram_found(&v, 256, std::slice::from_ref(&p), &rule).is_ok());
    }
}
