//! The QMP part of the report: per variant, command and mode the median over rounds of each
//! round's p50/p99/mean latency and requests per second; Flotilla over QEMU as ratios; the
//! 1.5x latency goal; and the breakdown of Flotilla's `query-status` from the D-Bus probes.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::qmprun::{CpuShare, Mode, QmpSample, QmpSettings, MODES};
use crate::runs::Variant;
use crate::stats::{self, median, round, Latency};

/// The latency goal of issue 3: Flotilla's no worse than this times QEMU's.
pub const GOAL_RATIO: f64 = 1.5;

/// Everything measured for one VMM.
#[derive(Debug, Clone)]
pub struct QmpResults {
    pub variant: Variant,
    pub argv: Vec<String>,
    pub samples: Vec<QmpSample>,
    pub failures: Vec<String>,
}

/// The host's floor per hop: unix socket ping-pong between two threads, one summary per round.
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    /// Wherever the scheduler puts the two threads.
    pub any_cpu: Vec<Latency>,
    /// The two threads pinned to two different CPUs (`cpus`).
    pub cross_cpu: Vec<Latency>,
    pub cpus: Option<(usize, usize)>,
}

fn baseline_json(b: &[Latency]) -> Value {
    json!({
        "p50_us": us(median(&b.iter().map(|l| l.p50).collect::<Vec<_>>())),
        "p99_us": us(median(&b.iter().map(|l| l.p99).collect::<Vec<_>>())),
        "rounds": b.iter().map(|l| l.to_json(1)).collect::<Vec<_>>(),
    })
}

/// Medians over rounds of one series' figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Medians {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
    pub rps: f64,
}

fn medians_of(rounds: &[(Latency, f64)]) -> Option<Medians> {
    let m = |f: &dyn Fn(&(Latency, f64)) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    Some(Medians { p50: m(&|r| r.0.p50)?, p99: m(&|r| r.0.p99)?, mean: m(&|r| r.0.mean)?, rps: m(&|r| r.1)? })
}

/// Per process, the median over rounds of its CPU µs and context switches per request.
fn cpu_medians(rounds: &[&[CpuShare]]) -> (Map<String, Value>, Map<String, Value>) {
    let mut us: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut sw: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for r in rounds {
        for c in r.iter() {
            us.entry(&c.process).or_default().push(c.us_per_request);
            sw.entry(&c.process).or_default().push(c.switches_per_request);
        }
    }
    let to_map = |m: BTreeMap<&str, Vec<f64>>, places| {
        m.into_iter().map(|(k, v)| (k.to_string(), json!(median(&v).map(|x| round(x, places))))).collect()
    };
    (to_map(us, 1), to_map(sw, 2))
}

impl QmpResults {
    pub fn new(variant: Variant, argv: Vec<String>) -> Self {
        QmpResults { variant, argv, samples: Vec::new(), failures: Vec::new() }
    }

    /// Each round's figures for one command and mode.
    fn rounds(&self, command: &str, mode: Mode) -> Vec<(Latency, f64, &[CpuShare])> {
        self.samples
            .iter()
            .filter_map(|s| {
                let c = s.commands.iter().find(|c| c.command == command)?;
                let (_, m) = c.modes.iter().find(|(md, _)| *md == mode)?;
                Some((m.latency_us, m.rps, m.cpu.as_slice()))
            })
            .collect()
    }

    pub fn medians(&self, command: &str, mode: Mode) -> Option<Medians> {
        medians_of(&self.rounds(command, mode).iter().map(|r| (r.0, r.1)).collect::<Vec<_>>())
    }

    fn probe_rounds(&self, key: &str) -> Vec<(Latency, &[CpuShare])> {
        self.samples
            .iter()
            .filter_map(|s| s.probes.iter().find(|p| p.key == key).map(|p| (p.latency_us, p.cpu.as_slice())))
            .collect()
    }

    /// Median over rounds of a probe's p50 (µs).
    pub fn probe_p50(&self, key: &str) -> Option<f64> {
        median(&self.probe_rounds(key).iter().map(|r| r.0.p50).collect::<Vec<_>>())
    }
}

fn r4(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |v| json!(round(v, 4)))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    stats::ratio(a?, b?)
}

/// Flotilla's figures over the other's: latencies (below 1: Flotilla faster) and throughput
/// (above 1: Flotilla faster).
fn ratios(f: &QmpResults, q: &QmpResults, commands: &[String]) -> Value {
    let mut out = Map::new();
    for c in commands {
        let mut per_mode = Map::new();
        for mode in MODES {
            let (a, b) = (f.medians(c, mode), q.medians(c, mode));
            per_mode.insert(
                mode.key().into(),
                json!({
                    "p50": r4(ratio(a.map(|m| m.p50), b.map(|m| m.p50))),
                    "p99": r4(ratio(a.map(|m| m.p99), b.map(|m| m.p99))),
                    "mean": r4(ratio(a.map(|m| m.mean), b.map(|m| m.mean))),
                    "rps": r4(ratio(a.map(|m| m.rps), b.map(|m| m.rps))),
                }),
            );
        }
        out.insert(c.clone(), Value::Object(per_mode));
    }
    Value::Object(out)
}

/// The goal, judged on the sequential round trips (latency is what it is about).
fn goal(f: &QmpResults, q: &QmpResults, commands: &[String]) -> Value {
    let mut out = Map::new();
    out.insert("max_latency_ratio".into(), json!(GOAL_RATIO));
    out.insert("judged_on".into(), json!("sequential round trips: Flotilla's p50 and p99 over QEMU's"));
    for c in commands {
        let (a, b) = (f.medians(c, Mode::Sequential), q.medians(c, Mode::Sequential));
        let p50 = ratio(a.map(|m| m.p50), b.map(|m| m.p50));
        let p99 = ratio(a.map(|m| m.p99), b.map(|m| m.p99));
        let met = match (p50, p99) {
            (Some(x), Some(y)) => json!(x <= GOAL_RATIO && y <= GOAL_RATIO),
            _ => Value::Null,
        };
        out.insert(c.clone(), json!({"p50_ratio": r4(p50), "p99_ratio": r4(p99), "met": met}));
    }
    Value::Object(out)
}

fn us(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |v| json!(round(v, 1)))
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

/// The pieces of Flotilla's `query-status`, from one round's interleaved probes (p50s, µs):
/// `(name, value)`, each a difference of two paths that share all but that piece.
pub fn pieces(sample: &QmpSample) -> Vec<(&'static str, Option<f64>)> {
    let p = |key: &str| sample.probes.iter().find(|p| p.key == key).map(|p| p.latency_us.p50);
    let (qs, qk) = (p("qmp-query-status"), p("qmp-query-kvm"));
    let (get_id, ping, kvm, status) =
        (p("bus-GetId"), p("vmm-core-Ping"), p("vmm-core-QueryKvm"), p("vmm-core-QueryStatus"));
    vec![
        ("qmp_query_status", qs),
        ("qmp_query_kvm", qk),
        ("dbus_QueryStatus_direct", status),
        ("gateway_and_qmp_socket_query_status", diff(qs, status)),
        ("gateway_and_qmp_socket_query_kvm", diff(qk, kvm)),
        ("spawn_blocking_and_vm_status_dbus", diff(status, kvm)),
        ("spawn_blocking_and_vm_status_qmp", diff(qs, qk)),
        ("generated_handler_and_json", diff(kvm, ping)),
        ("second_bus_hop_and_vmm_core_dispatch", diff(ping, get_id)),
        ("bus_round_trip_bench_dbus_daemon", get_id),
    ]
}

/// Flotilla's `query-status`, piece by piece: each piece's median over rounds.
pub fn breakdown(f: &QmpResults, q: Option<&QmpResults>) -> Value {
    let rounds: Vec<Vec<(&'static str, Option<f64>)>> =
        f.samples.iter().filter(|s| !s.probes.is_empty()).map(pieces).collect();
    let Some(first) = rounds.first() else { return Value::Null };
    let mut out = Map::new();
    out.insert(
        "what".into(),
        json!(
            "µs. Pieces: per round, differences of the p50s of two interleaved paths that differ by that piece \
               alone; then the median over rounds. gateway_and_qmp_socket = QMP through the gateway minus the same \
               D-Bus call made by the bench's zbus client (so it also nets the two D-Bus clients' difference). \
               The sequential series' figures are the headline ones"
        ),
    );
    for (i, (name, _)) in first.iter().enumerate() {
        let v: Vec<f64> = rounds.iter().filter_map(|r| r.get(i).and_then(|x| x.1)).collect();
        out.insert((*name).into(), us(median(&v)));
    }
    let qmp = f.medians("query-status", Mode::Sequential).map(|m| m.p50);
    let qemu = q.and_then(|q| q.medians("query-status", Mode::Sequential)).map(|m| m.p50);
    out.insert("sequential_query_status_flotilla".into(), us(qmp));
    out.insert("sequential_query_status_qemu".into(), us(qemu));
    out.insert("sequential_excess_over_qemu".into(), us(diff(qmp, qemu)));
    out.insert(
        "sequential_query_commands_flotilla_gateway_alone".into(),
        us(f.medians("query-commands", Mode::Sequential).map(|m| m.p50)),
    );
    Value::Object(out)
}

fn variant_json(r: &QmpResults, commands: &[String]) -> Value {
    let mut cmds = Map::new();
    for c in commands {
        let mut per_mode = Map::new();
        for mode in MODES {
            let rounds = r.rounds(c, mode);
            let med = r.medians(c, mode);
            let cpu: Vec<&[CpuShare]> = rounds.iter().map(|x| x.2).collect();
            let (cpu_us, switches) = cpu_medians(&cpu);
            per_mode.insert(
                mode.key().into(),
                json!({
                    "p50_us": us(med.map(|m| m.p50)),
                    "p99_us": us(med.map(|m| m.p99)),
                    "mean_us": us(med.map(|m| m.mean)),
                    "rps": med.map(|m| round(m.rps, 0)),
                    "cpu_us_per_request": cpu_us,
                    "context_switches_per_request": switches,
                    "rounds": rounds.iter().map(|(l, rps, _)| {
                        let mut v = l.to_json(1);
                        v["rps"] = json!(round(*rps, 0));
                        v
                    }).collect::<Vec<_>>(),
                }),
            );
        }
        cmds.insert(c.clone(), Value::Object(per_mode));
    }
    let mut probes = Map::new();
    if let Some(first) = r.samples.iter().find(|s| !s.probes.is_empty()) {
        for p in &first.probes {
            let rounds = r.probe_rounds(p.key);
            let lat: Vec<(Latency, f64)> = rounds.iter().map(|x| (x.0, 0.0)).collect();
            let med = medians_of(&lat);
            let (cpu_us, switches) = cpu_medians(&rounds.iter().map(|x| x.1).collect::<Vec<_>>());
            probes.insert(
                p.key.into(),
                json!({
                    "what": p.what,
                    "p50_us": us(med.map(|m| m.p50)),
                    "p99_us": us(med.map(|m| m.p99)),
                    "mean_us": us(med.map(|m| m.mean)),
                    "cpu_us_per_request": cpu_us,
                    "context_switches_per_request": switches,
                    "rounds": rounds.iter().map(|(l, _)| l.to_json(1)).collect::<Vec<_>>(),
                }),
            );
        }
    }
    let last = r.samples.last();
    let reply_bytes: Map<String, Value> = last
        .map(|s| s.commands.iter().map(|c| (c.command.clone(), json!(c.reply_bytes))).collect())
        .unwrap_or_default();
    json!({
        "key": r.variant.key,
        "label": r.variant.label,
        "argv": r.argv,
        "rounds": r.samples.len(),
        "greeting": last.map(|s| json!({
            "version": s.greeting.version,
            "package": s.greeting.package,
            "capabilities": s.greeting.capabilities,
        })),
        "reply_bytes": reply_bytes,
        "idle_cpu_percent_max": idle_max(r),
        "commands": cmds,
        "probes": if probes.is_empty() { Value::Null } else { Value::Object(probes) },
        "events_seen": r.samples.iter().map(|s| s.events).sum::<u64>(),
        "foreign_cpus_per_round": r.samples.iter().map(|s| s.foreign_cpus.map(|c| round(c, 2))).collect::<Vec<_>>(),
        "steal_cpus_per_round": r.samples.iter().map(|s| s.steal_cpus.map(|c| round(c, 2))).collect::<Vec<_>>(),
        "forced_stops": r.samples.iter().filter(|s| !s.stopped.graceful).count(),
    })
}

/// Per process, the highest idle CPU use (percent of one CPU) seen in any round.
fn idle_max(r: &QmpResults) -> Value {
    let mut m: BTreeMap<&str, f64> = BTreeMap::new();
    for s in &r.samples {
        for (p, pct) in &s.idle_cpu_percent {
            let e = m.entry(p).or_insert(0.0);
            *e = e.max(*pct);
        }
    }
    Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), json!(round(v, 1)))).collect())
}

/// The `qmp` section of the report.
pub fn to_json(
    s: &QmpSettings,
    rounds: usize,
    guest_mem_mib: u64,
    results: &[QmpResults],
    baseline: &Baseline,
) -> Value {
    let f = results.iter().find(|r| r.variant.key == "flotilla");
    let mut ratio_map = Map::new();
    let mut goals = Map::new();
    for q in results.iter().filter(|r| r.variant.key != "flotilla") {
        if let Some(f) = f {
            let key = format!("flotilla/{}", q.variant.key);
            ratio_map.insert(key.clone(), ratios(f, q, &s.commands));
            goals.insert(key, goal(f, q, &s.commands));
        }
    }
    let qemu = results.iter().find(|r| r.variant.key == "qemu-q35");
    json!({
        "what": "QMP round trips on the monitor's unix socket, timed by the bench (a Rust client): from just \
                 before the request line is written to the arrival of the end of its reply line. \
                 Flotilla: client -> qmp-gateway -> dbus-daemon -> vmm-core and back (query-commands is answered \
                 by the gateway itself); QEMU: its own QMP monitor",
        "guest_mem_mib": guest_mem_mib,
        "commands": s.commands,
        "rounds": rounds,
        "order": "each round boots every VMM once (start rotating by round), measures, and stops it; figures \
                  are medians over the rounds of each round's p50/p99/mean/rps",
        "series": {
            "warmup_round_trips": s.warmup,
            "timed_round_trips": s.requests,
            "sequential": "one client, one request at a time",
            "concurrent": format!("{} clients, one -qmp socket each, one request at a time each, started together; \
                                   the timed and warm-up round trips are shared among them", s.clients),
            "pipelined": format!("one client keeping {} requests unanswered", s.depth),
        },
        "neighbours": format!("foreign_cpus_per_round: CPUs kept busy on average, during each round's measurement of that \
                        VMM, by processes other than the VM's and the bench's (/proc/stat busy time minus theirs; \
                        clock ticks, so approximate); steal_cpus_per_round: the hypervisor's steal time. This host has \
                        {} CPUs; load from neighbours slows Flotilla's several-process path more than QEMU's",
                        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
        "idle": "idle_cpu_percent_max: each VM process's CPU use (percent of one CPU) over 300 ms before the \
                 series, guest idle and no request in flight; the highest of the rounds (a VMM busy while idle \
                 would take CPU from the monitor path on a small host)",
        "cpu": format!("cpu_us_per_request and context_switches_per_request: what each process used during the timed \
                        series divided by its round trips; the bench's own process is the client. Source: {}",
                       crate::qmprun::cpu_source()),
        "host_baseline": {
            "what": "unix socket ping-pong of 32 bytes between two threads of the bench, one request at a time: \
                     the floor of one hop (a wake-up each way) on this host; medians over rounds. any_cpu: where \
                     the scheduler puts them (usually together); cross_cpu: pinned to two different CPUs, so every \
                     message wakes a thread on the other, idle, CPU",
            "any_cpu": baseline_json(&baseline.any_cpu),
            "cross_cpu": if baseline.cross_cpu.is_empty() { Value::Null } else { baseline_json(&baseline.cross_cpu) },
            "cross_cpus": baseline.cpus.map(|c| [c.0, c.1]),
        },
        "variants": results.iter().map(|r| variant_json(r, &s.commands)).collect::<Vec<_>>(),
        "ratios": ratio_map,
        "goal": goals,
        "flotilla_query_status_breakdown": f.map(|f| breakdown(f, qemu)),
    })
}

fn fmt(v: Option<f64>, places: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.places$}"))
}

/// The human summary of the QMP part (stderr).
pub fn table(s: &QmpSettings, rounds: usize, results: &[QmpResults], baseline: &Baseline) -> String {
    let mut out = format!(
        "\nqmp: round trips on the monitor socket, {} timed per series, medians of {rounds} rounds \
         (latency µs, throughput requests/s)\n",
        s.requests
    );
    let w = results.iter().map(|r| r.variant.key.len()).max().unwrap_or(8).max(8);
    out += &format!(
        "  {:14} {:10} {:w$}  {:>8} {:>8} {:>8} {:>8}  {:>13}\n",
        "command", "mode", "", "p50", "p99", "mean", "rps", "ratio p50/p99"
    );
    let f = results.iter().find(|r| r.variant.key == "flotilla");
    for c in &s.commands {
        for mode in MODES {
            for r in results {
                let m = r.medians(c, mode);
                let rat = match (f, m) {
                    (Some(f), Some(q)) if r.variant.key != "flotilla" => f.medians(c, mode).map(|fm| {
                        format!("{}/{}", fmt(stats::ratio(fm.p50, q.p50), 2), fmt(stats::ratio(fm.p99, q.p99), 2))
                    }),
                    _ => None,
                };
                out += &format!(
                    "  {:14} {:10} {:w$}  {:>8} {:>8} {:>8} {:>8}  {:>13}\n",
                    c,
                    mode.key(),
                    r.variant.key,
                    fmt(m.map(|m| m.p50), 1),
                    fmt(m.map(|m| m.p99), 1),
                    fmt(m.map(|m| m.mean), 1),
                    fmt(m.map(|m| m.rps), 0),
                    rat.unwrap_or_default(),
                );
            }
        }
    }
    out += &format!("  ratio = Flotilla's / QEMU's latency; goal <= {GOAL_RATIO} (sequential)\n");
    if let Some(f) = f {
        let probes = [
            "qmp-query-status",
            "qmp-query-kvm",
            "vmm-core-QueryStatus",
            "vmm-core-QueryKvm",
            "vmm-core-Ping",
            "bus-GetId",
        ];
        if probes.iter().any(|p| f.probe_p50(p).is_some()) {
            out += "  Flotilla's path a piece at a time (interleaved blocks; p50 µs, medians of rounds):\n   ";
            for p in probes {
                out += &format!(" {p} {}", fmt(f.probe_p50(p), 1));
            }
            out += "\n";
        }
    }
    let p50 = |b: &[Latency]| median(&b.iter().map(|l| l.p50).collect::<Vec<_>>());
    if let Some(b) = p50(&baseline.any_cpu) {
        out += &format!("  host floor, unix socket ping-pong between two threads: p50 {b:.1} µs");
        if let Some(c) = p50(&baseline.cross_cpu) {
            out += &format!(", {c:.1} µs across two CPUs");
        }
        out += "\n";
    }
    for r in results.iter().filter(|r| !r.failures.is_empty()) {
        out += &format!("\nFAILED QMP rounds of {}: {}\n", r.variant.key, r.failures.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::Greeting;
    use crate::qmprun::{CommandSample, ModeSample, ProbeSample};
    use crate::vmproc::Stopped;
    use std::path::Path;

    fn lat(p50: f64, p99: f64) -> Latency {
        Latency { n: 100, min: p50 / 2.0, p50, p90: p99, p99, max: p99 * 2.0, mean: p50 * 1.1 }
    }

    fn sample(p50: f64, p99: f64, rps: f64, probes: Vec<ProbeSample>) -> QmpSample {
        let mode = |p50, p99| ModeSample {
            latency_us: lat(p50, p99),
            rps,
            cpu: vec![CpuShare { process: "x".into(), us_per_request: p50 / 4.0, switches_per_request: 2.0 }],
        };
        QmpSample {
            idle_cpu_percent: vec![("x".into(), 0.5)],
            greeting: Greeting { version: "1.1.0".into(), package: "p".into(), capabilities: vec![] },
            commands: vec![CommandSample {
                command: "query-status".into(),
                reply_bytes: 68,
                modes: MODES.iter().map(|m| (*m, mode(p50, p99))).collect(),
            }],
            probes,
            events: 0,
            foreign_cpus: Some(0.25),
            steal_cpus: Some(0.0),
            stopped: Stopped { graceful: true },
        }
    }

    fn probe(key: &'static str, p50: f64) -> ProbeSample {
        ProbeSample { key, what: "w", latency_us: lat(p50, p50 * 2.0), cpu: vec![] }
    }

    fn settings() -> QmpSettings {
        QmpSettings {
            commands: vec!["query-status".into()],
            requests: 100,
            warmup: 10,
            clients: 4,
            depth: 8,
            probe: true,
            boot_timeout: std::time::Duration::from_secs(1),
        }
    }

    #[test]
    fn medians_over_rounds_ratios_and_goal() {
        let probes = || {
            vec![
                probe("qmp-query-status", 250.0),
                probe("qmp-query-kvm", 200.0),
                probe("bus-GetId", 40.0),
                probe("vmm-core-Ping", 90.0),
                probe("vmm-core-QueryKvm", 100.0),
                probe("vmm-core-QueryStatus", 130.0),
            ]
        };
        let mut f = QmpResults::new(Variant::flotilla("/f".into(), Path::new("/v")), vec![]);
        f.samples = vec![
            sample(200.0, 400.0, 4000.0, probes()),
            sample(300.0, 500.0, 3000.0, probes()),
            sample(250.0, 900.0, 5000.0, probes()),
        ];
        let mut q = QmpResults::new(Variant::qemu("/q".into(), "q35").unwrap(), vec![]);
        q.samples = vec![sample(100.0, 200.0, 8000.0, vec![]), sample(100.0, 1000.0, 9000.0, vec![])];
        assert_eq!(
            f.medians("query-status", Mode::Sequential),
            Some(Medians { p50: 250.0, p99: 500.0, mean: 275.0, rps: 4000.0 })
        );
        assert_eq!(q.medians("query-status", Mode::Sequential).unwrap().p99, 600.0);
        let base = Baseline { any_cpu: vec![lat(20.0, 40.0)], cross_cpu: vec![], cpus: None };
        let v = to_json(&settings(), 3, 128, &[f, q], &base);
        let r = &v["ratios"]["flotilla/qemu-q35"]["query-status"]["sequential"];
        assert_eq!((r["p50"].as_f64(), r["p99"].as_f64(), r["rps"].as_f64()), (Some(2.5), Some(0.8333), Some(0.4706)));
        let g = &v["goal"]["flotilla/qemu-q35"]["query-status"];
        assert_eq!(g["met"], false);
        let b = &v["flotilla_query_status_breakdown"];
        assert_eq!(b["gateway_and_qmp_socket_query_status"], 120.0);
        assert_eq!(b["gateway_and_qmp_socket_query_kvm"], 100.0);
        assert_eq!(b["spawn_blocking_and_vm_status_dbus"], 30.0);
        assert_eq!(b["spawn_blocking_and_vm_status_qmp"], 50.0);
        assert_eq!(b["second_bus_hop_and_vmm_core_dispatch"], 50.0);
        assert_eq!(b["sequential_excess_over_qemu"], 150.0);
        let fv = &v["variants"][0];
        assert_eq!(fv["commands"]["query-status"]["concurrent"]["rps"], 4000.0);
        assert_eq!(fv["commands"]["query-status"]["sequential"]["cpu_us_per_request"]["x"], 62.5);
        assert_eq!(fv["probes"]["vmm-core-QueryStatus"]["p50_us"], 130.0);
        assert_eq!(fv["reply_bytes"]["query-status"], 68);
        assert_eq!(fv["idle_cpu_percent_max"]["x"], 0.5);
        assert!(v["variants"][1]["probes"].is_null());
        assert_eq!(v["host_baseline"]["any_cpu"]["p50_us"], 20.0);
        assert!(v["host_baseline"]["cross_cpu"].is_null());
        let t = table(&settings(), 3, &[], &base);
        assert!(t.contains("p50 20.0 µs"));
        assert!(t.contains("qmp: round trips"));
    }
}
