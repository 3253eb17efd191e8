//! One boot: a fresh copy of the root disk, the VM started with its console on our pipe, every
//! console line kept with its arrival time until `Run /sbin/init` (or the limit), a few seconds
//! more for what follows, then the VM stopped (SIGTERM, then SIGKILL to its group) and its disk
//! removed. What the neighbours did meanwhile is measured too: this host is shared.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::procfs;
use crate::vmproc::{Spec, VmProcess};

use super::log::{self, Gap};

/// Gaps of the kernel clock kept per boot.
const GAPS: usize = 5;
/// The VMM's own stderr complaints kept per boot.
const VMM_LINES: usize = 30;

/// What one boot showed.
#[derive(Debug, Clone)]
pub struct Boot {
    pub run: usize,
    /// Process start -> the kernel's first line (`Linux version`) on our pipe.
    pub linux_version_ms: Option<f64>,
    /// Process start -> `Run /sbin/init` on our pipe.
    pub run_init_ms: Option<f64>,
    /// The printk timestamp of that line.
    pub run_init_kernel_s: Option<f64>,
    /// The console lines (all, with their timestamps) that complain, in order.
    pub complaints: Vec<String>,
    pub gaps: Vec<Gap>,
    pub console_lines: usize,
    /// The VMM's stderr lines at WARN or ERROR (QEMU: `warning:`, `error:`), the first few.
    pub vmm_complaints: Vec<String>,
    /// Host CPUs kept busy by anything but this VM, averaged over the boot.
    pub other_cpus: Option<f64>,
    /// This VM's processes' CPU time over the boot (s).
    pub vm_cpu_s: Option<f64>,
    pub loadavg_before: Option<String>,
    pub loadavg_after: Option<String>,
    /// Why it did not reach `Run /sbin/init`, with the last lines.
    pub failure: Option<String>,
    /// Where the console log went (kept when asked or on failure).
    pub console_log: PathBuf,
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// CPU seconds used so far by the processes of the VM's tree (exited ones are not counted).
fn tree_cpu_s(pid: i32) -> f64 {
    procfs::process_tree(pid).into_iter().filter_map(procfs::cpu_usage).map(|(us, _, _)| us / 1e6).sum()
}

/// tracing's WARN and ERROR levels (vmm-core and the daemons), QEMU's `warning:`/`error:`.
fn vmm_complains(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    line.contains(" WARN ") || line.contains(" ERROR ") || l.contains("warning:") || l.contains("error:")
}

pub struct Settings<'a> {
    pub run: usize,
    pub spec: Spec,
    pub base_disk: &'a Path,
    pub disk: &'a Path,
    pub timeout: Duration,
    /// How long to keep reading after `Run /sbin/init`.
    pub after: Duration,
    pub console_log: PathBuf,
}

/// Boots once; an error only for what stops the bench from trying (the disk copy, the spawn).
pub fn boot(s: &Settings) -> Result<Boot, super::LinuxBootError> {
    std::fs::copy(s.base_disk, s.disk).map_err(super::io(format!("copying the root disk to {}", s.disk.display())))?;
    let loadavg_before = loadavg();
    let host_before = procfs::host_cpu_us();
    let lines: RefCell<Vec<(Instant, String)>> = RefCell::default();
    let keep = |l: &str| {
        lines.borrow_mut().push((Instant::now(), l.to_string()));
    };
    let mut vm = VmProcess::spawn(&s.spec)?;
    let pid = vm.pid();
    let started = vm.started;
    let reached = vm.expect(
        "Run /sbin/init",
        |l| {
            keep(l);
            log::text(l).starts_with(log::RUN_INIT)
        },
        started + s.timeout,
    );
    let (wall, mut failure) = match reached {
        Ok(at) => (Some(at.duration_since(started)), None),
        Err(e) => (None, Some(crate::error::chain(&e))),
    };
    let vm_cpu_s = tree_cpu_s(pid);
    let host_after = procfs::host_cpu_us();
    let loadavg_after = loadavg();
    if wall.is_some() {
        // Whatever the kernel says right after init starts; the wait ends in a timeout (or
        // the VM's exit), both expected.
        let _ = vm.expect(
            "nothing",
            |l| {
                keep(l);
                false
            },
            Instant::now() + s.after,
        );
    }
    let vmm_complaints: RefCell<Vec<String>> = RefCell::default();
    // A deadline of now: one look at the stderr lines so far, none of them accepted.
    let _ = vm.expect_stderr(
        "complaints",
        |l| {
            let mut v = vmm_complaints.borrow_mut();
            if vmm_complains(l) && v.len() < VMM_LINES {
                v.push(l.to_string());
            }
            None::<()>
        },
        Instant::now(),
    );
    let vmm_complaints = vmm_complaints.into_inner();
    if let Err(e) = vm.stop() {
        failure.get_or_insert(crate::error::chain(&e));
    }
    let _ = std::fs::remove_file(s.disk);

    let lines = lines.into_inner();
    let text: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    std::fs::write(&s.console_log, text).map_err(super::io(format!("writing {}", s.console_log.display())))?;
    let linux_version_ms = lines
        .iter()
        .find(|(_, l)| log::text(l).starts_with(log::LINUX_VERSION))
        .map(|(at, _)| at.duration_since(started).as_secs_f64() * 1e3);
    // Both wall figures from the same clock: when this thread took each line (the reader's
    // arrival stamp of the matched line can precede the moment an earlier line was taken).
    let run_init_ms = lines
        .iter()
        .find(|(_, l)| log::text(l).starts_with(log::RUN_INIT))
        .map(|(at, _)| at.duration_since(started).as_secs_f64() * 1e3)
        .or_else(|| wall.map(|w| w.as_secs_f64() * 1e3));
    let run_init_kernel_s = lines
        .iter()
        .find(|(_, l)| log::text(l).starts_with(log::RUN_INIT))
        .and_then(|(_, l)| log::split_timestamp(l))
        .map(|(ts, _)| ts);
    let other_cpus = match (host_before, host_after, wall) {
        (Some((b, _)), Some((a, _)), Some(w)) if w > Duration::ZERO => {
            Some(((a - b) / 1e6 - vm_cpu_s).max(0.0) / w.as_secs_f64())
        }
        _ => None,
    };
    Ok(Boot {
        run: s.run,
        linux_version_ms,
        run_init_ms: wall.and(run_init_ms),
        run_init_kernel_s,
        complaints: lines.iter().map(|(_, l)| l).filter(|l| log::complains(l)).cloned().collect(),
        gaps: log::largest_gaps(lines.iter().map(|(_, l)| l.as_str()), GAPS),
        console_lines: lines.len(),
        vmm_complaints,
        other_cpus,
        vm_cpu_s: Some(vm_cpu_s),
        loadavg_before,
        loadavg_after,
        failure,
        console_log: s.console_log.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_complaints_are_picked() {
        assert!(vmm_complains("2026-12-08T00:07:51Z  WARN vmm_core::vcpu: unhandled port"));
        assert!(vmm_complains("qemu-system-x86_64: warning: host doesn't support requested feature"));
        assert!(!vmm_complains("2026-12-08T00:07:51Z  INFO blockd: drive open werror=Enospc rerror=Report"));
    }

    fn settings(dir: &Path, script: &str, timeout: Duration) -> (Settings<'static>, PathBuf) {
        let base: &'static Path = Box::leak(dir.join("base.raw").into_boxed_path());
        std::fs::write(base, b"disk").unwrap();
        let disk: &'static Path = Box::leak(dir.join("copy.raw").into_boxed_path());
        let spec =
            Spec { label: "sh".into(), program: "/bin/sh".into(), args: vec!["-c".into(), script.into()], env: vec![] };
        let log = dir.join("console.log");
        (
            Settings {
                run: 1,
                spec,
                base_disk: base,
                disk,
                timeout,
                after: Duration::from_millis(200),
                console_log: log.clone(),
            },
            log,
        )
    }

    #[test]
    fn a_boot_is_timed_to_run_init_and_its_complaints_kept() {
        let dir = std::env::temp_dir().join(format!("lb-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = "echo '[    0.000000] Linux version 6.12'; \
                      echo '[    1.500000] ACPI Error: AE_NOT_FOUND'; \
                      echo 'vmm: warning: something' >&2; \
                      echo '[    9.250000] Run /sbin/init as init process'; \
                      echo '[    9.300000] late line'; exec sleep 30";
        let (s, log) = settings(&dir, script, Duration::from_secs(10));
        let b = boot(&s).unwrap();
        assert_eq!(b.failure, None);
        assert_eq!(b.run_init_kernel_s, Some(9.25));
        assert!(b.run_init_ms.unwrap() >= b.linux_version_ms.unwrap());
        assert_eq!(b.complaints, ["[    1.500000] ACPI Error: AE_NOT_FOUND"]);
        assert_eq!(b.gaps[0].seconds, 7.75);
        assert_eq!(b.console_lines, 4, "the line after init is read too");
        assert_eq!(b.vmm_complaints, ["vmm: warning: something"]);
        assert!(std::fs::read_to_string(log).unwrap().contains("late line"));
        assert!(!s.disk.exists(), "the disk copy is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_boot_that_never_gets_there_is_a_failure_with_its_complaints() {
        let dir = std::env::temp_dir().join(format!("lb-boot-fail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (s, _) =
            settings(&dir, "echo '[ 2.0] ACPI BIOS Error (bug): x'; exec sleep 30", Duration::from_millis(500));
        let b = boot(&s).unwrap();
        assert!(b.failure.as_deref().unwrap().contains("Run /sbin/init"), "{:?}", b.failure);
        assert_eq!((b.run_init_ms, b.run_init_kernel_s), (None, None));
        assert_eq!(b.complaints.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
