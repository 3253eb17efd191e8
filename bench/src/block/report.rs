//! The block part's results: per workload and side, each round's figures and their medians;
//! blockd over qemu-storage-daemon and over the host as ratios; the goal; a table.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::workload::{Pattern, Workload};
use crate::stats::{median, ratio, round};

/// The goal of issue 4: blockd at least as fast as qemu-storage-daemon everywhere, and at
/// least this share of the host's throughput at queue depth 32.
pub const HOST_SHARE_GOAL: f64 = 0.85;

/// One timed run of one workload on one side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub iops: f64,
    /// Megabytes (10^6 bytes) per second.
    pub mbps: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// CPU used by the side's process(es) over the run, in CPUs (1.0 = one CPU busy).
    pub cpus: Option<f64>,
    /// CPU used by the bench's frontend thread over the run (vhost-user sides only).
    pub frontend_cpus: Option<f64>,
}

/// Medians over rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Medians {
    pub iops: f64,
    pub mbps: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub cpus: Option<f64>,
    pub frontend_cpus: Option<f64>,
    /// The spread of throughput over rounds: how noisy this side was.
    pub iops_min: f64,
    pub iops_max: f64,
    pub n: usize,
}

pub fn medians(samples: &[Sample]) -> Option<Medians> {
    let m = |f: &dyn Fn(&Sample) -> Option<f64>| median(&samples.iter().filter_map(f).collect::<Vec<_>>());
    Some(Medians {
        iops: m(&|s| Some(s.iops))?,
        mbps: m(&|s| Some(s.mbps))?,
        p50_us: m(&|s| s.p50_us),
        p99_us: m(&|s| s.p99_us),
        cpus: m(&|s| s.cpus),
        frontend_cpus: m(&|s| s.frontend_cpus),
        iops_min: samples.iter().map(|s| s.iops).fold(f64::INFINITY, f64::min),
        iops_max: samples.iter().map(|s| s.iops).fold(f64::NEG_INFINITY, f64::max),
        n: samples.len(),
    })
}

/// Everything measured, keyed by workload then side ("blockd", "qsd", "host").
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub samples: BTreeMap<&'static str, BTreeMap<&'static str, Vec<Sample>>>,
    pub failures: Vec<String>,
}

impl Results {
    pub fn push(&mut self, w: &Workload, side: &'static str, s: Sample) {
        self.samples.entry(w.key).or_default().entry(side).or_default().push(s);
    }

    pub fn medians(&self, w: &Workload, side: &str) -> Option<Medians> {
        medians(self.samples.get(w.key)?.get(side)?)
    }
}

/// `a / b` of throughput and latency medians; throughput above 1 and latency below 1 mean
/// `a` is faster.
fn ratios(a: &Medians, b: &Medians) -> Value {
    let r = |x: Option<f64>, y: Option<f64>| x.zip(y).and_then(|(x, y)| ratio(x, y)).map(|v| round(v, 4));
    json!({
        "throughput": r(Some(a.iops), Some(b.iops)),
        "p50_latency": r(a.p50_us, b.p50_us),
        "p99_latency": r(a.p99_us, b.p99_us),
    })
}

/// The goal per workload: blockd/qsd throughput >= 1 (all), blockd/host >= 0.85 (QD32).
/// `None` where a side is missing.
pub fn goal(w: &Workload, blockd: Option<&Medians>, qsd: Option<&Medians>, host: Option<&Medians>) -> Value {
    let vs_qsd = blockd.zip(qsd).and_then(|(b, q)| ratio(b.iops, q.iops)).map(|r| r >= 1.0);
    let vs_host = if w.qd == 32 {
        blockd.zip(host).and_then(|(b, h)| ratio(b.iops, h.iops)).map(|r| r >= HOST_SHARE_GOAL)
    } else {
        None
    };
    json!({"blockd_ge_qsd": vs_qsd, "blockd_ge_85pct_host": vs_host})
}

fn opt(v: Option<f64>, places: i32) -> Value {
    v.map_or(Value::Null, |v| json!(round(v, places)))
}

fn medians_json(m: &Medians) -> Value {
    json!({
        "iops": round(m.iops, 0),
        "iops_min": round(m.iops_min, 0),
        "iops_max": round(m.iops_max, 0),
        "mb_per_s": round(m.mbps, 1),
        "p50_us": opt(m.p50_us, 1),
        "p99_us": opt(m.p99_us, 1),
        "cpus": opt(m.cpus, 2),
        "frontend_cpus": opt(m.frontend_cpus, 2),
        "rounds": m.n,
    })
}

fn sample_json(s: &Sample) -> Value {
    json!({
        "iops": round(s.iops, 0),
        "mb_per_s": round(s.mbps, 1),
        "p50_us": opt(s.p50_us, 1),
        "p99_us": opt(s.p99_us, 1),
        "cpus": opt(s.cpus, 2),
        "frontend_cpus": opt(s.frontend_cpus, 2),
    })
}

pub fn to_json(workloads: &[Workload], sides: &[&'static str], r: &Results) -> Value {
    let mut out = Map::new();
    let mut all_met = true;
    let mut any_goal = false;
    for w in workloads {
        let mut per_side = Map::new();
        for side in sides {
            let samples = r.samples.get(w.key).and_then(|m| m.get(side)).cloned().unwrap_or_default();
            per_side.insert(
                side.to_string(),
                json!({
                    "median": medians(&samples).map_or(Value::Null, |m| medians_json(&m)),
                    "rounds": samples.iter().map(sample_json).collect::<Vec<_>>(),
                }),
            );
        }
        let (b, q, h) = (r.medians(w, "blockd"), r.medians(w, "qsd"), r.medians(w, "host"));
        let mut rat = Map::new();
        if let (Some(b), Some(q)) = (&b, &q) {
            rat.insert("blockd/qsd".into(), ratios(b, q));
        }
        if let (Some(b), Some(h)) = (&b, &h) {
            rat.insert("blockd/host".into(), ratios(b, h));
        }
        if let (Some(q), Some(h)) = (&q, &h) {
            rat.insert("qsd/host".into(), ratios(q, h));
        }
        let g = goal(w, b.as_ref(), q.as_ref(), h.as_ref());
        for k in ["blockd_ge_qsd", "blockd_ge_85pct_host"] {
            if let Some(met) = g[k].as_bool() {
                any_goal = true;
                all_met &= met;
            }
        }
        out.insert(
            w.key.to_string(),
            json!({
                "op": w.fio_rw(),
                "block_size": w.bs,
                "queue_depth": w.qd,
                "sides": per_side,
                "ratios": rat,
                "goal": g,
            }),
        );
    }
    json!({"workloads": out, "goal_met": if any_goal { json!(all_met) } else { Value::Null }})
}

fn figure(w: &Workload, m: Option<&Medians>) -> String {
    match m {
        None => "-".into(),
        Some(m) if w.pattern == Pattern::Sequential => format!("{:.0} MB/s", m.mbps),
        Some(m) => format!("{:.0} IOPS", m.iops),
    }
}

fn lat(m: Option<&Medians>) -> String {
    match m.and_then(|m| m.p50_us.zip(m.p99_us)) {
        Some((a, b)) => format!("{a:.0}/{b:.0} µs"),
        None => "-".into(),
    }
}

pub fn table(workloads: &[Workload], sides: &[&'static str], r: &Results) -> String {
    let mut s = String::from("\nblock: medians over rounds (throughput; p50/p99 submission-to-completion latency)\n");
    s += &format!("{:<19}", "workload");
    for side in sides {
        s += &format!(" {:>15} {:>15}", side, "p50/p99");
    }
    s += &format!(" {:>10} {:>11}\n", "blockd/qsd", "blockd/host");
    for w in workloads {
        s += &format!("{:<19}", w.key);
        for side in sides {
            let m = r.medians(w, side);
            s += &format!(" {:>15} {:>15}", figure(w, m.as_ref()), lat(m.as_ref()));
        }
        let b = r.medians(w, "blockd");
        let rr = |o: &str| {
            b.zip(r.medians(w, o)).and_then(|(b, x)| ratio(b.iops, x.iops)).map_or("-".into(), |v| format!("{v:.2}"))
        };
        s += &format!(" {:>10} {:>11}\n", rr("qsd"), rr("host"));
    }
    s += &format!("goal: blockd/qsd >= 1.00 on every workload, blockd/host >= {HOST_SHARE_GOAL:.2} at QD32\n");
    for f in &r.failures {
        s += &format!("failed: {f}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::workload::WORKLOADS;

    fn s(iops: f64, p50: f64) -> Sample {
        Sample {
            iops,
            mbps: iops * 4096.0 / 1e6,
            p50_us: Some(p50),
            p99_us: Some(p50 * 2.0),
            cpus: None,
            frontend_cpus: None,
        }
    }

    #[test]
    fn medians_over_rounds() {
        let m = medians(&[s(100.0, 10.0), s(300.0, 30.0), s(200.0, 20.0)]).unwrap();
        assert_eq!((m.iops, m.p50_us, m.p99_us, m.cpus, m.n), (200.0, Some(20.0), Some(40.0), None, 3));
        assert_eq!((m.iops_min, m.iops_max), (100.0, 300.0));
        assert_eq!(medians(&[]), None);
    }

    #[test]
    fn ratios_and_goal() {
        let w32 = WORKLOADS[1];
        let w1 = WORKLOADS[0];
        let mut r = Results::default();
        for (side, iops) in [("blockd", 90.0), ("qsd", 80.0), ("host", 100.0)] {
            r.push(&w32, side, s(iops, 10.0));
            r.push(&w1, side, s(iops / 10.0, 100.0 / iops));
        }
        let j = to_json(&[w1, w32], &["blockd", "qsd", "host"], &r);
        let w = &j["workloads"]["randread-4k-qd32"];
        assert_eq!(w["ratios"]["blockd/qsd"]["throughput"], 1.125);
        assert_eq!(w["ratios"]["blockd/host"]["throughput"], 0.9);
        assert_eq!(w["goal"]["blockd_ge_qsd"], true);
        assert_eq!(w["goal"]["blockd_ge_85pct_host"], true);
        // the host share applies at QD32 only
        assert_eq!(j["workloads"]["randread-4k-qd1"]["goal"]["blockd_ge_85pct_host"], Value::Null);
        assert_eq!(j["goal_met"], true);
        // 84 % of the host misses the goal
        r.push(&w32, "blockd", s(84.0, 10.0));
        r.push(&w32, "blockd", s(84.0, 10.0));
        let j = to_json(&[w32], &["blockd", "qsd", "host"], &r);
        assert_eq!(j["workloads"]["randread-4k-qd32"]["goal"]["blockd_ge_85pct_host"], false);
        assert_eq!(j["goal_met"], false);
        let t = table(&[w1, w32], &["blockd", "qsd", "host"], &r);
        assert!(t.contains("randread-4k-qd32"), "{t}");
        assert!(t.contains("0.84"), "{t}");
    }

    #[test]
    fn missing_sides_give_no_ratio_and_no_verdict() {
        let mut r = Results::default();
        r.push(&WORKLOADS[1], "blockd", s(1.0, 1.0));
        let j = to_json(&WORKLOADS[1..2], &["blockd"], &r);
        assert_eq!(j["workloads"]["randread-4k-qd32"]["ratios"], json!({}));
        assert_eq!(j["goal_met"], Value::Null);
    }
}
