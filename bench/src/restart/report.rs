//! The restart part's report: per backend, recovery times over its kills (median, p90, max of
//! SIGKILL -> socket listening again, -> the guest's probe read completing, -> every writer
//! progressing) and what went wrong (errors, lost or duplicated writes, a hang); ratios
//! blockd/qsd; the goal (< 150 ms, 0 errors, 0 lost or duplicated writes) judged per backend.

use flotilla_tests::restart::backend::Kind;
use flotilla_tests::restart::soak::{ImageCheck, Outcome};
use serde_json::{json, Value};

use crate::stats::{ratio, round, summarize};

/// The goal the issue states for SIGKILL -> guest I/O flowing again.
pub const GOAL_MS: f64 = 150.0;

pub struct BackendRun {
    pub kind: Kind,
    pub starts: u32,
    pub outcome: Outcome,
    /// None after a hang (the writers never said what they last wrote).
    pub image_check: Option<ImageCheck>,
}

impl BackendRun {
    fn series(&self, f: impl Fn(&flotilla_tests::restart::soak::Kill) -> Option<f64>) -> Vec<f64> {
        self.outcome.kills.iter().filter_map(f).collect()
    }

    fn probe(&self) -> Vec<f64> {
        self.series(|k| k.probe_ms)
    }

    fn listening(&self) -> Vec<f64> {
        self.series(|k| Some(k.listening_ms))
    }

    fn writers(&self) -> Vec<f64> {
        self.series(|k| k.writers_ms)
    }

    /// dd failures and failed probe reads in the guest, plus its kernel's I/O error lines.
    fn errors(&self) -> usize {
        self.outcome.errors.len() + self.outcome.dmesg.len()
    }

    /// Read-backs that differed in the guest plus image slots on the host that do not hold the
    /// last pass written: a lost write, or an old one done again after a newer one.
    fn lost_or_duplicated(&self) -> usize {
        self.outcome.bad.len() + self.image_check.as_ref().map_or(0, |c| c.mismatches.len())
    }

    fn goal_met(&self) -> bool {
        let p = self.probe();
        self.outcome.hang.is_none()
            && self.errors() == 0
            && self.lost_or_duplicated() == 0
            && summarize(&p).is_some_and(|s| s.median < GOAL_MS)
    }
}

fn median(v: &[f64]) -> Option<f64> {
    summarize(v).map(|s| s.median)
}

fn summary(v: &[f64]) -> Value {
    summarize(v).map_or(Value::Null, |s| s.to_json(v, 1))
}

pub fn to_json(runs: &[BackendRun]) -> Value {
    let mut backends = serde_json::Map::new();
    for r in runs {
        let o = &r.outcome;
        backends.insert(
            r.kind.key().into(),
            json!({
                "kills": o.kills.len(),
                "starts": r.starts,
                "passes": o.passes,
                "kill_to_listening_ms": summary(&r.listening()),
                "kill_to_probe_read_ms": summary(&r.probe()),
                "kill_to_all_writers_ms": summary(&r.writers()),
                "probe_interval_ms": round(o.probe_interval_ms, 1),
                "in_flight_at_kill": o.kills.iter().map(|k| k.inflight).collect::<Vec<_>>(),
                "errors": r.errors(),
                "error_lines": o.errors.iter().chain(&o.dmesg).take(20).collect::<Vec<_>>(),
                "lost_or_duplicated_writes": r.lost_or_duplicated(),
                "bad_read_backs": o.bad.iter().take(20).collect::<Vec<_>>(),
                "image_mismatched_slots": r.image_check.as_ref().map(|c| c.mismatches.iter().take(20).collect::<Vec<_>>()),
                "qemu_img_check_exit": r.image_check.as_ref().and_then(|c| c.check.as_ref().map(|(code, _)| *code)),
                "hang": o.hang,
                "goal_met": r.goal_met(),
            }),
        );
    }
    let by = |k: Kind| runs.iter().find(|r| r.kind == k);
    let ratios = match (by(Kind::Blockd), by(Kind::Qsd)) {
        (Some(b), Some(q)) => {
            let r = |f: fn(&BackendRun) -> Vec<f64>| {
                median(&f(b)).zip(median(&f(q))).and_then(|(x, y)| ratio(x, y)).map(|v| round(v, 3))
            };
            json!({
                "kill_to_listening": r(BackendRun::listening),
                "kill_to_probe_read": r(BackendRun::probe),
                "kill_to_all_writers": r(BackendRun::writers),
            })
        }
        _ => Value::Null,
    };
    json!({
        "part": "restart",
        "goal": {"kill_to_guest_io_ms_below": GOAL_MS, "errors": 0, "lost_or_duplicated_writes": 0},
        "backends": backends,
        "ratios_blockd_over_qsd": ratios,
    })
}

/// One line per backend for progress output.
pub fn line(r: &BackendRun) -> String {
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    format!(
        "{}: {} kills, probe read again after {} ms median, {} errors, {} lost/duplicated writes{}",
        r.kind.key(),
        r.outcome.kills.len(),
        f(median(&r.probe())),
        r.errors(),
        r.lost_or_duplicated(),
        r.outcome.hang.as_ref().map_or(String::new(), |h| format!(", HANG: {h}"))
    )
}

pub fn table(runs: &[BackendRun], failures: &[String]) -> String {
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    let mut t = format!(
        "{:<8} {:>6} {:>12} {:>18} {:>14} {:>16} {:>7} {:>10} {:>5}\n",
        "backend",
        "kills",
        "listen ms",
        "probe ms med/p90",
        "writers ms",
        "probe interval",
        "errors",
        "lost/dup",
        "goal"
    );
    for r in runs {
        let p = summarize(&r.probe());
        t += &format!(
            "{:<8} {:>6} {:>12} {:>18} {:>14} {:>16} {:>7} {:>10} {:>5}\n",
            r.kind.key(),
            r.outcome.kills.len(),
            f(median(&r.listening())),
            format!("{}/{}", f(p.map(|s| s.median)), f(p.map(|s| s.p90))),
            f(median(&r.writers())),
            format!("{:.0}", r.outcome.probe_interval_ms),
            r.errors(),
            r.lost_or_duplicated(),
            if r.goal_met() { "met" } else { "no" }
        );
        if let Some(h) = &r.outcome.hang {
            t += &format!("  {} HUNG: {h}\n", r.kind.key());
        }
    }
    for f in failures {
        t += &format!("  FAILED {f}\n");
    }
    t
}
