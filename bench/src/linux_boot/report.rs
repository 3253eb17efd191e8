//! The linux-boot report: per machine, the boot figures (medians over runs), the complaints of
//! its kernel log and where the kernel's clock jumped; ratios vmm-core / each QEMU machine.

use serde_json::{json, Value};

use crate::stats::{ratio, round, summarize};

use super::boot::Boot;
use super::log;
use super::machine::Machine;

pub struct MachineRuns {
    pub machine: Machine,
    pub argv: Vec<String>,
    pub boots: Vec<Boot>,
}

impl MachineRuns {
    fn series(&self, f: impl Fn(&Boot) -> Option<f64>) -> Vec<f64> {
        self.boots.iter().filter(|b| b.failure.is_none()).filter_map(f).collect()
    }

    fn wall_ms(&self) -> Vec<f64> {
        self.series(|b| b.run_init_ms)
    }

    fn kernel_s(&self) -> Vec<f64> {
        self.series(|b| b.run_init_kernel_s)
    }

    fn linux_version_ms(&self) -> Vec<f64> {
        self.series(|b| b.linux_version_ms)
    }

    /// Wall time not on the kernel's clock: the VMM's start, firmware, loading, and the kernel
    /// before its clock runs.
    fn before_kernel_clock_ms(&self) -> Vec<f64> {
        self.series(|b| Some(b.run_init_ms? - b.run_init_kernel_s? * 1e3))
    }

    /// Each complaint's text (timestamp stripped) once, in order of first appearance, with its
    /// first line as logged and how many boots logged it.
    pub fn distinct_complaints(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, String, usize)> = Vec::new();
        for b in &self.boots {
            let mut seen_here: Vec<&str> = Vec::new();
            for line in &b.complaints {
                let t = log::text(line);
                if seen_here.contains(&t) {
                    continue;
                }
                seen_here.push(t);
                match out.iter_mut().find(|(text, _, _)| text == t) {
                    Some(e) => e.2 += 1,
                    None => out.push((t.to_string(), line.clone(), 1)),
                }
            }
        }
        out.into_iter().map(|(_, line, n)| (line, n)).collect()
    }
}

fn median(v: &[f64]) -> Option<f64> {
    summarize(v).map(|s| s.median)
}

fn summary(v: &[f64], places: i32) -> Value {
    summarize(v).map_or(Value::Null, |s| s.to_json(v, places))
}

fn opt(v: Option<f64>, places: i32) -> Value {
    v.map_or(Value::Null, |x| json!(round(x, places)))
}

fn boot_json(b: &Boot) -> Value {
    json!({
        "run": b.run,
        "run_init_ms": opt(b.run_init_ms, 1),
        "run_init_kernel_s": opt(b.run_init_kernel_s, 6),
        "linux_version_ms": opt(b.linux_version_ms, 1),
        "console_lines": b.console_lines,
        "complaints": b.complaints,
        "largest_kernel_clock_gaps": b.gaps.iter().map(|g| json!({"seconds": round(g.seconds, 3), "before": g.before, "after": g.after})).collect::<Vec<_>>(),
        "vmm_stderr_complaints": b.vmm_complaints,
        "other_cpus_busy": opt(b.other_cpus, 2),
        "vm_cpu_s": opt(b.vm_cpu_s, 1),
        "loadavg_before": b.loadavg_before,
        "loadavg_at_run_init": b.loadavg_after,
        "failure": b.failure,
        "console_log": b.console_log.display().to_string(),
    })
}

pub fn to_json(runs: &[MachineRuns]) -> Value {
    let mut machines = serde_json::Map::new();
    for r in runs {
        machines.insert(
            r.machine.key().into(),
            json!({
                "describe": r.machine.describe(),
                "argv": r.argv,
                "run_init_ms": summary(&r.wall_ms(), 1),
                "run_init_kernel_s": summary(&r.kernel_s(), 6),
                "linux_version_ms": summary(&r.linux_version_ms(), 1),
                "before_kernel_clock_ms": summary(&r.before_kernel_clock_ms(), 1),
                "complaints_distinct": r.distinct_complaints().into_iter().map(|(l, n)| json!({"line": l, "boots": n})).collect::<Vec<_>>(),
                "boots": r.boots.iter().map(boot_json).collect::<Vec<_>>(),
            }),
        );
    }
    json!({ "machines": machines, "ratios": ratios(runs) })
}

/// vmm-core's medians over each QEMU machine's; below 1: vmm-core faster.
fn ratios(runs: &[MachineRuns]) -> Value {
    let mut out = serde_json::Map::new();
    let Some(ours) = runs.iter().find(|r| r.machine == Machine::VmmCore) else { return Value::Object(out) };
    for other in runs.iter().filter(|r| r.machine.is_qemu()) {
        let r = |f: fn(&MachineRuns) -> Vec<f64>| -> Value {
            match (median(&f(ours)), median(&f(other))) {
                (Some(a), Some(b)) => ratio(a, b).map_or(Value::Null, |x| json!(round(x, 4))),
                _ => Value::Null,
            }
        };
        out.insert(
            format!("vmm-core/{}", other.machine.key()),
            json!({
                "run_init_ms_median": r(MachineRuns::wall_ms),
                "run_init_kernel_s_median": r(MachineRuns::kernel_s),
                "linux_version_ms_median": r(MachineRuns::linux_version_ms),
            }),
        );
    }
    Value::Object(out)
}

fn secs(ms: Option<f64>) -> String {
    ms.map_or("-".into(), |v| format!("{:.1} s", v / 1e3))
}

pub fn table(runs: &[MachineRuns], failures: &[String]) -> String {
    let mut t = String::new();
    t += "linux-boot: wall time from the VMM's start to the console line `Run /sbin/init` (median of the boots)\n";
    t += &format!(
        "{:<14} {:>6} {:>10} {:>12} {:>14} {:>13} {:>12}  {}\n",
        "machine",
        "boots",
        "wall",
        "kernel clock",
        "before clock",
        "Linux version",
        "others' CPUs",
        "load (before → at init)"
    );
    for r in runs {
        let ok = r.wall_ms().len();
        let first = r.boots.iter().find(|b| b.failure.is_none());
        t += &format!(
            "{:<14} {:>6} {:>10} {:>12} {:>14} {:>13} {:>12}  {}\n",
            r.machine.key(),
            format!("{ok}/{}", r.boots.len()),
            secs(median(&r.wall_ms())),
            median(&r.kernel_s()).map_or("-".into(), |s| format!("{s:.2} s")),
            secs(median(&r.before_kernel_clock_ms())),
            secs(median(&r.linux_version_ms())),
            median(&r.series(|b| b.other_cpus)).map_or("-".into(), |c| format!("{c:.2}")),
            first.map_or("-".into(), |b| format!(
                "{} → {}",
                b.loadavg_before.as_deref().unwrap_or("?"),
                b.loadavg_after.as_deref().unwrap_or("?")
            )),
        );
    }
    if let Value::Object(ratios) = ratios(runs) {
        for (k, v) in ratios {
            let f = |n: &str| v[n].as_f64().map_or("-".into(), |x| format!("{x:.2}"));
            t += &format!(
                "ratio {k}: wall {}, kernel clock {}, to `Linux version` {}\n",
                f("run_init_ms_median"),
                f("run_init_kernel_s_median"),
                f("linux_version_ms_median")
            );
        }
    }
    t += "\nlargest jumps of the kernel clock (first boot that got there):\n";
    for r in runs {
        let Some(b) = r.boots.iter().find(|b| b.failure.is_none()).or(r.boots.first()) else { continue };
        t += &format!("  {}:\n", r.machine.key());
        for g in b.gaps.iter().take(3) {
            t += &format!("    {:>6.2} s after  {}\n", g.seconds, g.before);
            t += &format!("             before {}\n", g.after);
        }
    }
    t += "\nwhat each kernel log complains about (lines matching the filter; each text once):\n";
    for r in runs {
        let c = r.distinct_complaints();
        t += &format!("  {} ({} distinct):\n", r.machine.key(), c.len());
        for (line, n) in c {
            let count = if r.boots.len() > 1 { format!("  ({n}/{} boots)", r.boots.len()) } else { String::new() };
            t += &format!("    {line}{count}\n");
        }
        let vmm: Vec<&String> = r.boots.iter().flat_map(|b| &b.vmm_complaints).collect();
        if !vmm.is_empty() {
            t += &format!("    the VMM's own stderr ({} lines), first: {}\n", vmm.len(), vmm[0]);
        }
    }
    for r in runs {
        for b in r.boots.iter().filter(|b| b.failure.is_some()) {
            t += &format!("\n{} run {} failed: {}\n", r.machine.key(), b.run, b.failure.as_deref().unwrap_or(""));
        }
    }
    for f in failures {
        t += &format!("\nfailed: {f}\n");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn boot(run: usize, wall: Option<f64>, kernel: Option<f64>, complaints: &[&str]) -> Boot {
        Boot {
            run,
            linux_version_ms: Some(100.0),
            run_init_ms: wall,
            run_init_kernel_s: kernel,
            complaints: complaints.iter().map(|s| s.to_string()).collect(),
            gaps: vec![],
            console_lines: 10,
            vmm_complaints: vec![],
            other_cpus: Some(0.5),
            vm_cpu_s: Some(1.0),
            loadavg_before: Some("1.0 1.0 1.0".into()),
            loadavg_after: Some("1.2 1.0 1.0".into()),
            failure: wall.is_none().then(|| "timed out".to_string()),
            console_log: PathBuf::from("/x.log"),
        }
    }

    #[test]
    fn ratios_are_vmm_core_over_qemu_and_failures_do_not_count() {
        let runs = vec![
            MachineRuns {
                machine: Machine::VmmCore,
                argv: vec![],
                boots: vec![boot(1, Some(50_000.0), Some(49.0), &["[ 1.0] a error"]), boot(2, None, None, &[])],
            },
            MachineRuns {
                machine: Machine::Microvm,
                argv: vec![],
                boots: vec![boot(1, Some(100_000.0), Some(98.0), &[])],
            },
        ];
        let j = to_json(&runs);
        assert_eq!(j["ratios"]["vmm-core/microvm"]["run_init_ms_median"], 0.5);
        assert_eq!(j["ratios"]["vmm-core/microvm"]["run_init_kernel_s_median"], 0.5);
        assert_eq!(j["machines"]["vmm-core"]["run_init_ms"]["n"], 1);
        assert_eq!(j["machines"]["vmm-core"]["before_kernel_clock_ms"]["median"], 1000.0);
        let t = table(&runs, &[]);
        assert!(t.contains("ratio vmm-core/microvm: wall 0.50"), "{t}");
        assert!(t.contains("vmm-core run 2 failed: timed out"), "{t}");
        assert!(t.contains("[ 1.0] a error  (1/2 boots)"), "{t}");
    }

    #[test]
    fn complaints_are_counted_once_per_boot_by_their_text() {
        let r = MachineRuns {
            machine: Machine::Q35,
            argv: vec![],
            boots: vec![
                boot(1, Some(1.0), Some(1.0), &["[ 1.0] x failed", "[ 2.0] x failed", "[ 3.0] y error"]),
                boot(2, Some(1.0), Some(1.0), &["[ 1.5] x failed"]),
            ],
        };
        assert_eq!(r.distinct_complaints(), [("[ 1.0] x failed".to_string(), 2), ("[ 3.0] y error".to_string(), 1)]);
    }
}
