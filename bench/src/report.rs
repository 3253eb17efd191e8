//! The results: JSON for stdout (machines read it) and a short table for stderr (people do).

use serde_json::{json, Map, Value};

use crate::runs::{BootSample, MemSample, Variant};
use crate::stats::{self, round, summarize};

/// Everything measured for one variant.
#[derive(Debug, Clone)]
pub struct VariantResults {
    pub variant: Variant,
    pub argv_boot: Vec<String>,
    pub argv_memory: Vec<String>,
    pub boots: Vec<BootSample>,
    pub mems: Vec<MemSample>,
    pub failures: Vec<String>,
}

impl VariantResults {
    pub fn new(variant: Variant, argv_boot: Vec<String>, argv_memory: Vec<String>) -> Self {
        VariantResults { variant, argv_boot, argv_memory, boots: Vec::new(), mems: Vec::new(), failures: Vec::new() }
    }

    fn series(&self, f: impl Fn(&BootSample) -> Option<f64>) -> Vec<f64> {
        self.boots.iter().filter_map(f).collect()
    }

    pub fn first_line(&self) -> Vec<f64> {
        self.series(|b| Some(b.first_line_ms))
    }
    pub fn ready(&self) -> Vec<f64> {
        self.series(|b| Some(b.ready_ms))
    }
    fn mark(&self) -> Vec<f64> {
        self.series(|b| b.mark.map(|m| m.0))
    }
    fn marked(&self) -> Vec<f64> {
        self.series(|b| b.mark.map(|m| m.1))
    }
    fn mem(&self, f: impl Fn(&MemSample) -> u64) -> Vec<f64> {
        self.mems.iter().map(|m| f(m) as f64).collect()
    }
    pub fn overhead_rss(&self) -> Vec<f64> {
        self.mem(|m| m.overhead().rss_kib)
    }
    pub fn overhead_pss(&self) -> Vec<f64> {
        self.mem(|m| m.overhead().pss_kib)
    }
    fn forced_stops(&self) -> usize {
        self.boots.iter().filter(|b| !b.stopped.graceful).count()
            + self.mems.iter().filter(|m| !m.stopped.graceful).count()
    }
}

fn summary_json(samples: &[f64], places: i32) -> Value {
    summarize(samples).map_or(Value::Null, |s| s.to_json(samples, places))
}

fn median(samples: &[f64]) -> Option<f64> {
    summarize(samples).map(|s| s.median)
}
fn p90(samples: &[f64]) -> Option<f64> {
    summarize(samples).map(|s| s.p90)
}

fn ratio_of(a: Option<f64>, b: Option<f64>) -> Value {
    match (a, b) {
        (Some(a), Some(b)) => stats::ratio(a, b).map_or(Value::Null, |r| json!(round(r, 4))),
        _ => Value::Null,
    }
}

/// Parameters of the run, echoed into the report.
pub struct Setup {
    pub command: Vec<String>,
    pub host: Value,
    pub guest_elf: String,
    pub boot: Option<BootSetup>,
    pub memory: Option<MemSetup>,
    pub unavailable: Vec<(String, String)>,
}

pub struct BootSetup {
    pub mem_mib: u64,
    pub runs: usize,
    pub warmup: usize,
}

pub struct MemSetup {
    pub mem_mib: u64,
    pub runs: usize,
    pub settle_ms: u64,
}

fn boot_json(r: &VariantResults) -> Value {
    json!({
        "key": r.variant.key,
        "label": r.variant.label,
        "argv": r.argv_boot,
        "first_line_ms": summary_json(&r.first_line(), 3),
        "ready_ms": summary_json(&r.ready(), 3),
        "vmm_core_mark_ms": summary_json(&r.mark(), 3),
        "marked_ms": summary_json(&r.marked(), 3),
    })
}

fn memory_json(r: &VariantResults, mem_mib: u64) -> Value {
    let last = r.mems.last().map(|m| {
        json!({
            "processes": m.processes.iter().map(|p| json!({
                "pid": p.pid,
                "comm": p.comm,
                "rss_kib": p.acc.total.rss_kib,
                "pss_kib": p.acc.total.pss_kib,
                "guest_ram_rss_kib": p.acc.guest_ram.rss_kib,
                "guest_ram_pss_kib": p.acc.guest_ram.pss_kib,
                "overhead_rss_kib": p.acc.overhead().rss_kib,
                "overhead_pss_kib": p.acc.overhead().pss_kib,
                "overhead_anonymous_kib": p.acc.overhead().anonymous_kib,
                "guest_ram_mappings": p.acc.guest_ram_mappings,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "key": r.variant.key,
        "label": r.variant.label,
        "argv": r.argv_memory,
        "guest_ram_rule": r.variant.guest_ram_rule(mem_mib).describe(),
        "overhead_rss_kib": summary_json(&r.overhead_rss(), 0),
        "overhead_pss_kib": summary_json(&r.overhead_pss(), 0),
        "overhead_anonymous_kib": summary_json(&r.mem(|m| m.overhead().anonymous_kib), 0),
        "total_rss_kib": summary_json(&r.mem(|m| m.total.rss_kib), 0),
        "total_pss_kib": summary_json(&r.mem(|m| m.total.pss_kib), 0),
        "guest_ram_rss_kib": summary_json(&r.mem(|m| m.guest_ram.rss_kib), 0),
        "processes": r.mems.last().map(|m| m.processes.len()),
        "last_sample": last,
    })
}

pub fn to_json(setup: &Setup, results: &[VariantResults]) -> Value {
    let flotilla = results.iter().find(|r| r.variant.key == "flotilla");
    let mut ratios = Map::new();
    for q in results.iter().filter(|r| r.variant.key != "flotilla") {
        let Some(f) = flotilla else { break };
        ratios.insert(
            format!("flotilla/{}", q.variant.key),
            json!({
                "first_line_median": ratio_of(median(&f.first_line()), median(&q.first_line())),
                "first_line_p90": ratio_of(p90(&f.first_line()), p90(&q.first_line())),
                "ready_median": ratio_of(median(&f.ready()), median(&q.ready())),
                "ready_p90": ratio_of(p90(&f.ready()), p90(&q.ready())),
                "memory_overhead_rss_median": ratio_of(median(&f.overhead_rss()), median(&q.overhead_rss())),
                "memory_overhead_pss_median": ratio_of(median(&f.overhead_pss()), median(&q.overhead_pss())),
            }),
        );
    }
    let boot = setup.boot.as_ref().map(|b| {
        json!({
            "what": "wall time from just before fork+exec of the VMM to the arrival on its stdout pipe of the \
                     guest's first serial line ('FLOTILLA-GUEST v1 boot=1') and of READY (end of the boot report)",
            "guest_mem_mib": b.mem_mib,
            "runs": b.runs,
            "warmup_runs_discarded": b.warmup,
            "order": "interleaved: each round boots every variant once, the starting variant rotating by round",
            "vmm_core_mark_ms": "Flotilla only: vmm-core's own clock, from the start of Vm::new (after process \
                                 start and launcher) to the guest's port 0x80 write made by the `mark` command, which \
                                 the bench sends as soon as it reads READY (the test guest writes no marker while \
                                 booting); marked_ms is when the answer MARKED reached the bench on its clock",
            "variants": results.iter().filter(|r| !r.boots.is_empty() || !r.failures.is_empty()).map(boot_json).collect::<Vec<_>>(),
        })
    });
    let memory = setup.memory.as_ref().map(|m| {
        json!({
            "what": "RSS and PSS (KiB) summed over every process of the VM (the launcher and its descendants), \
                     each minus the Rss/Pss of its guest-RAM mapping(s), sampled from /proc/PID/smaps with the \
                     guest booted to READY",
            "guest_mem_mib": m.mem_mib,
            "runs": m.runs,
            "settle_ms": m.settle_ms,
            "order": "interleaved, rotating like the boot runs",
            "not_counted": "kernel memory (KVM's page tables, the vCPU structures) and page cache not mapped by the VMM",
            "variants": results.iter().filter(|r| !r.mems.is_empty()).map(|r| memory_json(r, m.mem_mib)).collect::<Vec<_>>(),
        })
    });
    let failures: Map<String, Value> =
        results.iter().filter(|r| !r.failures.is_empty()).map(|r| (r.variant.key.clone(), json!(r.failures))).collect();
    let forced: Map<String, Value> = results.iter().map(|r| (r.variant.key.clone(), json!(r.forced_stops()))).collect();
    json!({
        "bench": "flotilla-bench",
        "report_version": 2,
        "command": setup.command,
        "host": setup.host,
        "guest_elf": setup.guest_elf,
        "ratios": ratios,
        "boot": boot,
        "memory": memory,
        "unavailable": setup.unavailable.iter().map(|(k, why)| json!({"key": k, "reason": why})).collect::<Vec<_>>(),
        "failures": failures,
        "forced_stops": forced,
    })
}

fn fmt_opt(v: Option<f64>, places: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.places$}"))
}

fn mib(kib: Option<f64>) -> Option<f64> {
    kib.map(|k| k / 1024.0)
}

/// The human summary (stderr).
pub fn table(setup: &Setup, results: &[VariantResults]) -> String {
    let mut s = String::new();
    let w = results.iter().map(|r| r.variant.key.len()).max().unwrap_or(8).max(8);
    let flotilla = results.iter().find(|r| r.variant.key == "flotilla");
    if let Some(b) = &setup.boot {
        s += &format!(
            "\nboot: start -> first serial line / READY, -m {}, {} interleaved runs each (ms)\n",
            b.mem_mib, b.runs
        );
        s += &format!(
            "  {:w$}  {:>10} {:>10}  {:>10} {:>10}  {:>9}\n",
            "", "first p50", "first p90", "READY p50", "READY p90", "ratio p50"
        );
        for r in results.iter().filter(|r| !r.boots.is_empty()) {
            let ratio = flotilla.and_then(|f| stats::ratio(median(&f.first_line())?, median(&r.first_line())?));
            s += &format!(
                "  {:w$}  {:>10} {:>10}  {:>10} {:>10}  {:>9}\n",
                r.variant.key,
                fmt_opt(median(&r.first_line()), 1),
                fmt_opt(p90(&r.first_line()), 1),
                fmt_opt(median(&r.ready()), 1),
                fmt_opt(p90(&r.ready()), 1),
                if r.variant.key == "flotilla" { "".into() } else { fmt_opt(ratio, 4) },
            );
        }
        if let Some(m) = flotilla.and_then(|f| median(&f.mark())) {
            s += &format!("  (vmm-core's boot marker: Vm::new -> guest `mark` sent at READY, median {m:.1} ms)\n");
        }
        s += "  ratio p50 = Flotilla's first-line median / that variant's\n";
    }
    if let Some(m) = &setup.memory {
        s += &format!(
            "\nmemory at READY, -m {}, {} runs each (MiB, medians; overhead = total minus the guest-RAM mapping)\n",
            m.mem_mib, m.runs
        );
        s += &format!(
            "  {:w$}  {:>12} {:>12}  {:>10} {:>10}  {:>9}\n",
            "", "overhead RSS", "overhead PSS", "total RSS", "guest RSS", "ratio RSS"
        );
        for r in results.iter().filter(|r| !r.mems.is_empty()) {
            let ratio = flotilla.and_then(|f| stats::ratio(median(&f.overhead_rss())?, median(&r.overhead_rss())?));
            s += &format!(
                "  {:w$}  {:>12} {:>12}  {:>10} {:>10}  {:>9}\n",
                r.variant.key,
                fmt_opt(mib(median(&r.overhead_rss())), 1),
                fmt_opt(mib(median(&r.overhead_pss())), 1),
                fmt_opt(mib(median(&r.mem(|m| m.total.rss_kib))), 1),
                fmt_opt(mib(median(&r.mem(|m| m.guest_ram.rss_kib))), 1),
                if r.variant.key == "flotilla" { "".into() } else { fmt_opt(ratio, 4) },
            );
        }
    }
    for (k, why) in &setup.unavailable {
        s += &format!("\nunavailable: {k}: {why}\n");
    }
    for r in results.iter().filter(|r| !r.failures.is_empty()) {
        s += &format!("\nFAILED runs of {}: {}\n", r.variant.key, r.failures.len());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::Variant;
    use crate::smaps::Usage;
    use crate::vmproc::Stopped;
    use std::path::Path;

    fn boot(first: f64, ready: f64) -> BootSample {
        BootSample { first_line_ms: first, ready_ms: ready, mark: None, stopped: Stopped { graceful: true } }
    }

    fn mem(rss: u64, guest: u64) -> MemSample {
        MemSample {
            processes: Vec::new(),
            total: Usage { rss_kib: rss, pss_kib: rss, ..Default::default() },
            guest_ram: Usage { rss_kib: guest, pss_kib: guest, ..Default::default() },
            stopped: Stopped { graceful: true },
        }
    }

    #[test]
    fn ratios_are_flotilla_over_qemu() {
        let mut f = VariantResults::new(Variant::flotilla("/f".into(), Path::new("/v")), vec![], vec![]);
        f.boots = vec![boot(10.0, 20.0), boot(30.0, 40.0)];
        f.mems = vec![mem(3000, 1000)];
        let mut q = VariantResults::new(Variant::qemu("/q".into(), "q35").unwrap(), vec![], vec![]);
        q.boots = vec![boot(100.0, 200.0), boot(300.0, 400.0)];
        q.mems = vec![mem(9000, 1000)];
        let setup = Setup {
            command: vec![],
            host: Value::Null,
            guest_elf: "g".into(),
            boot: Some(BootSetup { mem_mib: 128, runs: 2, warmup: 0 }),
            memory: Some(MemSetup { mem_mib: 256, runs: 1, settle_ms: 0 }),
            unavailable: vec![],
        };
        let v = to_json(&setup, &[f, q]);
        let r = &v["ratios"]["flotilla/qemu-q35"];
        assert_eq!(r["first_line_median"], 0.1);
        assert_eq!(r["ready_median"], 0.1);
        assert_eq!(r["memory_overhead_rss_median"], 0.25);
        assert_eq!(v["boot"]["variants"][0]["first_line_ms"]["median"], 20.0);
        assert_eq!(v["memory"]["variants"][1]["overhead_rss_kib"]["median"], 8000.0);
        assert!(v["boot"]["variants"][0]["vmm_core_mark_ms"].is_null());
    }
}
