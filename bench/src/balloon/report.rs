//! The balloon part's figures: per-round derived values (time to reclaim, MiB freed on the
//! host, share of the reclaim size), their medians per VMM, Flotilla/QEMU ratios, the JSON
//! report (raw numbers included) and the table.

use serde_json::{json, Value};

use super::round::{Plan, Sample, MIB};
use crate::stats::{self, round};

/// One VMM's rounds.
#[derive(Debug, Clone)]
pub struct SideResults {
    pub key: &'static str,
    pub label: String,
    pub argv: Vec<String>,
    pub samples: Vec<Sample>,
    pub failures: Vec<String>,
}

/// KiB that went away between two readings, in MiB (negative: it grew).
pub fn freed_mib(before_kib: u64, after_kib: u64) -> f64 {
    (before_kib as f64 - after_kib as f64) / 1024.0
}

/// The figures of one round that the report summarises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Derived {
    pub reclaim_ms: f64,
    pub event_ms: f64,
    /// Drop of the summed RSS of the VM's processes.
    pub freed_rss_mib: f64,
    /// Drop of the summed PSS (a shared page counted once).
    pub freed_pss_mib: f64,
    /// Drop of anonymous memory (QEMU's guest RAM).
    pub freed_anon_mib: f64,
    /// Drop of the bytes allocated to the memfds (Flotilla's guest RAM).
    pub freed_memfd_mib: f64,
    /// `freed_rss_mib` over the reclaim size.
    pub share: f64,
}

pub fn derive(s: &Sample, reclaim_mib: u64) -> Derived {
    let (b, a) = (&s.before.total, &s.after.total);
    let freed_rss_mib = freed_mib(b.rss_kib, a.rss_kib);
    Derived {
        reclaim_ms: s.ballooned_ms,
        event_ms: s.event_ms,
        freed_rss_mib,
        freed_pss_mib: freed_mib(b.pss_kib, a.pss_kib),
        freed_anon_mib: freed_mib(b.anonymous_kib, a.anonymous_kib),
        freed_memfd_mib: (s.before.memfd_bytes as f64 - s.after.memfd_bytes as f64) / MIB as f64,
        share: share(freed_rss_mib, reclaim_mib),
    }
}

/// Freed MiB as a share of the reclaim size (0 for an empty reclaim).
pub fn share(freed_mib: f64, reclaim_mib: u64) -> f64 {
    if reclaim_mib == 0 {
        0.0
    } else {
        freed_mib / reclaim_mib as f64
    }
}

/// Medians of the derived figures over the rounds that succeeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Medians {
    pub n: usize,
    pub reclaim_ms: f64,
    pub event_ms: f64,
    pub freed_rss_mib: f64,
    pub freed_pss_mib: f64,
    pub freed_anon_mib: f64,
    pub freed_memfd_mib: f64,
    pub share: f64,
}

pub fn medians(d: &[Derived]) -> Option<Medians> {
    let m = |f: fn(&Derived) -> f64| stats::median(&d.iter().map(f).collect::<Vec<_>>());
    Some(Medians {
        n: d.len(),
        reclaim_ms: m(|x| x.reclaim_ms)?,
        event_ms: m(|x| x.event_ms)?,
        freed_rss_mib: m(|x| x.freed_rss_mib)?,
        freed_pss_mib: m(|x| x.freed_pss_mib)?,
        freed_anon_mib: m(|x| x.freed_anon_mib)?,
        freed_memfd_mib: m(|x| x.freed_memfd_mib)?,
        share: m(|x| x.share)?,
    })
}

fn opt(v: Option<f64>, places: i32) -> Value {
    v.map_or(Value::Null, |x| json!(round(x, places)))
}

fn side_json(r: &SideResults, reclaim_mib: u64) -> Value {
    let d: Vec<Derived> = r.samples.iter().map(|s| derive(s, reclaim_mib)).collect();
    let med = medians(&d);
    json!({
        "label": r.label,
        "argv": r.argv,
        "median": med.map(|m| json!({
            "rounds": m.n,
            "reclaim_ms": round(m.reclaim_ms, 3),
            "balloon_change_ms": round(m.event_ms, 3),
            "freed_rss_mib": round(m.freed_rss_mib, 2),
            "freed_pss_mib": round(m.freed_pss_mib, 2),
            "freed_anonymous_mib": round(m.freed_anon_mib, 2),
            "freed_memfd_mib": round(m.freed_memfd_mib, 2),
            "share_of_reclaim": round(m.share, 4),
        })),
        "rounds": r.samples.iter().zip(&d).map(|(s, d)| {
            let mut v = s.to_json();
            v["freed_rss_mib"] = json!(round(d.freed_rss_mib, 2));
            v["freed_memfd_mib"] = json!(round(d.freed_memfd_mib, 2));
            v["share_of_reclaim"] = json!(round(d.share, 4));
            v
        }).collect::<Vec<_>>(),
        "failures": r.failures,
    })
}

/// Medians of both sides, or `None` where a side has no successful round.
fn both(results: &[SideResults], reclaim_mib: u64) -> (Option<Medians>, Option<Medians>) {
    let med = |key: &str| {
        let r = results.iter().find(|r| r.key == key)?;
        medians(&r.samples.iter().map(|s| derive(s, reclaim_mib)).collect::<Vec<_>>())
    };
    (med("flotilla"), med("qemu"))
}

pub fn to_json(setup: Value, plan: &Plan, results: &[SideResults]) -> Value {
    let (f, q) = both(results, plan.reclaim_mib);
    let ratio = |g: fn(&Medians) -> f64| match (f, q) {
        (Some(f), Some(q)) => opt(stats::ratio(g(&f), g(&q)), 4),
        _ => Value::Null,
    };
    let mut sides = serde_json::Map::new();
    for r in results {
        sides.insert(r.key.to_string(), side_json(r, plan.reclaim_mib));
    }
    json!({
        "part": "balloon",
        "setup": setup,
        "plan": {
            "mem_mib": plan.mem_mib,
            "touch_mib": plan.touch_mib,
            "reclaim_mib": plan.reclaim_mib,
            "target_bytes": plan.target_bytes(),
            "reclaim_pages": plan.reclaim_pages(),
        },
        "sides": sides,
        "ratios_flotilla_over_qemu": {
            "reclaim_ms": ratio(|m| m.reclaim_ms),
            "balloon_change_ms": ratio(|m| m.event_ms),
            "freed_rss_mib": ratio(|m| m.freed_rss_mib),
            "share_of_reclaim": ratio(|m| m.share),
        },
    })
}

pub fn table(plan: &Plan, results: &[SideResults]) -> String {
    let mut t = format!(
        "\nballoon: reclaim {} MiB of a {} MiB guest ({} MiB touched first); medians over the rounds\n",
        plan.reclaim_mib, plan.mem_mib, plan.touch_mib
    );
    t += &format!(
        "{:<10} {:>6} {:>12} {:>14} {:>12} {:>12} {:>8}\n",
        "", "rounds", "reclaim ms", "last event ms", "freed RSS", "freed memfd", "share"
    );
    for r in results {
        let d: Vec<Derived> = r.samples.iter().map(|s| derive(s, plan.reclaim_mib)).collect();
        match medians(&d) {
            Some(m) => {
                t += &format!(
                    "{:<10} {:>6} {:>12.1} {:>14.1} {:>8.1} MiB {:>8.1} MiB {:>7.1}%\n",
                    r.key,
                    m.n,
                    m.reclaim_ms,
                    m.event_ms,
                    m.freed_rss_mib,
                    m.freed_memfd_mib,
                    m.share * 100.0
                )
            }
            None => t += &format!("{:<10} no successful round\n", r.key),
        }
        for f in &r.failures {
            t += &format!("  {} failed: {f}\n", r.key);
        }
    }
    if let (Some(f), Some(q)) = both(results, plan.reclaim_mib) {
        let r = |a: f64, b: f64| stats::ratio(a, b).map_or("n/a".to_string(), |x| format!("{x:.3}"));
        t += &format!(
            "Flotilla/QEMU: reclaim time {}, last event {}, freed {}, share {}\n",
            r(f.reclaim_ms, q.reclaim_ms),
            r(f.event_ms, q.event_ms),
            r(f.freed_rss_mib, q.freed_rss_mib),
            r(f.share, q.share)
        );
    }
    t
}
