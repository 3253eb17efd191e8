//! The vmm-core frontend's report: per mode, SIGKILL -> the guest's first completion after it
//! (median, p90), errors, lost or duplicated writes (the guest's counters, the image on the
//! host), whether the goal is met; ratios blockd/qsd and launcher/qsd.

use serde_json::{json, Value};

use super::report::GOAL_MS;
use super::vmm::ModeRun;
use crate::stats::{ratio, round, summarize};

impl ModeRun {
    fn recovery(&self) -> Vec<f64> {
        self.kills.iter().filter_map(|k| k.recovery_ms).collect()
    }

    fn back(&self) -> Vec<f64> {
        self.kills.iter().map(|k| k.back_ms).collect()
    }

    /// Guest dup + lost + mismatched sectors, plus image sectors wrong on the host.
    fn lost_or_duplicated(&self) -> u64 {
        let c = &self.counters;
        c.dup + c.lost + c.mismatch + self.image_bad_sectors.unwrap_or(0)
    }

    fn errors(&self) -> u64 {
        self.error_count as u64 + self.counters.status_rounds
    }

    fn goal_met(&self) -> bool {
        self.hang.is_none()
            && self.image_bad_sectors == Some(0)
            && self.errors() == 0
            && self.lost_or_duplicated() == 0
            && self.kills.iter().all(|k| k.recovery_ms.is_some())
            && summarize(&self.recovery()).is_some_and(|s| s.median < GOAL_MS)
    }
}

fn summary(v: &[f64]) -> Value {
    summarize(v).map_or(Value::Null, |s| s.to_json(v, 2))
}

pub fn to_json(runs: &[ModeRun]) -> Value {
    let mut modes = serde_json::Map::new();
    for r in runs {
        let c = &r.counters;
        modes.insert(
            r.mode.key().into(),
            json!({
                "restarted_by": r.mode.describe(),
                "kills": r.kills.len(),
                "kill_to_guest_io_ms": summary(&r.recovery()),
                "kill_to_completion_line_ms": summary(&r.kills.iter().filter_map(|k| k.line_ms).collect::<Vec<_>>()),
                // Bench-restarted: the new backend listening; launcher: its new blockd existing.
                "kill_to_new_backend_ms": summary(&r.back()),
                "in_flight_at_kill": r.kills.iter().map(|k| k.inflight).collect::<Vec<_>>(),
                "restarts_that_resubmitted": r.inflight_recoveries.map(|(n, _)| n),
                "requests_resubmitted": r.inflight_recoveries.map(|(_, n)| n),
                "completions": c.completions,
                "completion_line_gap_ms": summarize(&r.gaps_ms).map(|s| json!({"median": round(s.median, 2), "p90": round(s.p90, 2), "max": round(s.max, 2), "n": s.n})),
                "rounds": c.rounds,
                "errors": r.errors(),
                "error_lines": r.errors,
                "guest_dup": c.dup,
                "guest_lost": c.lost,
                "guest_mismatched_sectors": c.mismatch,
                "image_bad_sectors": r.image_bad_sectors,
                "lost_or_duplicated_writes": r.lost_or_duplicated(),
                "hang": r.hang,
                "round_lines": r.round_lines,
                "goal_met": r.goal_met(),
            }),
        );
    }
    let med = |key: &str| runs.iter().find(|r| r.mode.key() == key).and_then(|r| summarize(&r.recovery()));
    let q = med("qsd").map(|s| s.median);
    let over_qsd = |key: &str| med(key).map(|s| s.median).zip(q).and_then(|(a, b)| ratio(a, b)).map(|v| round(v, 3));
    json!({
        "part": "restart",
        "frontend": "vmm-core",
        "goal": {"kill_to_guest_io_ms_below": GOAL_MS, "errors": 0, "lost_or_duplicated_writes": 0},
        "backends": modes,
        "ratios_over_qsd_median": {"blockd": over_qsd("blockd"), "launcher": over_qsd("launcher")},
    })
}

pub fn line(r: &ModeRun) -> String {
    let s = summarize(&r.recovery());
    format!(
        "{}: {} kills, guest I/O again after {} ms median, {} errors, {} lost/duplicated writes{}",
        r.mode.key(),
        r.kills.len(),
        s.map_or("-".into(), |s| format!("{:.1}", s.median)),
        r.errors(),
        r.lost_or_duplicated(),
        r.hang.as_ref().map_or(String::new(), |h| format!(", HANG: {h}"))
    )
}

pub fn table(runs: &[ModeRun], failures: &[String]) -> String {
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    let mut t = format!(
        "{:<9} {:>6} {:>20} {:>10} {:>9} {:>9} {:>7} {:>9} {:>5}\n",
        "backend", "kills", "guest I/O ms med/p90", "max", "new ms", "gap ms", "errors", "lost/dup", "goal"
    );
    for r in runs {
        let s = summarize(&r.recovery());
        t += &format!(
            "{:<9} {:>6} {:>20} {:>10} {:>9} {:>9} {:>7} {:>9} {:>5}\n",
            r.mode.key(),
            r.kills.len(),
            format!("{}/{}", f(s.map(|s| s.median)), f(s.map(|s| s.p90))),
            f(s.map(|s| s.max)),
            f(summarize(&r.back()).map(|s| s.median)),
            f(summarize(&r.gaps_ms).map(|s| s.median)),
            r.errors(),
            r.lost_or_duplicated(),
            if r.goal_met() { "met" } else { "no" }
        );
        if let Some(h) = &r.hang {
            t += &format!("  {} HUNG: {h}\n", r.mode.key());
        }
    }
    for f in failures {
        t += &format!("  FAILED {f}\n");
    }
    t
}
