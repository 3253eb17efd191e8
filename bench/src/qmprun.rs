//! One QMP measurement of one VM: boot it with `-qmp` sockets, then time round trips of each
//! command sequentially, from several clients at once, and pipelined, noting the CPU time each
//! process of the VM used meanwhile; for Flotilla also the D-Bus calls behind them
//! ([`crate::dbusprobe`]).
//!
//! Every VM gets one `-qmp unix:PATH,server=on,wait=off` socket per concurrent client: QEMU's
//! socket chardev serves one connection at a time, so its concurrent clients need a monitor
//! each (which QEMU then runs one request at a time in its main loop); Flotilla gets the same
//! command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::dbusprobe;
use crate::error::BenchError;
use crate::procfs;
use crate::qmp::{self, Greeting, QmpClient, Series};
use crate::runs::{Kind, Variant};
use crate::stats::{latency, Latency};
use crate::vmproc::{Stopped, VmProcess};

/// How the requests are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One client, one request at a time: the round-trip latency.
    Sequential,
    /// `clients` clients on their own sockets, each one request at a time: throughput.
    Concurrent,
    /// One client keeping `depth` requests unanswered: throughput of one connection.
    Pipelined,
}

pub const MODES: [Mode; 3] = [Mode::Sequential, Mode::Concurrent, Mode::Pipelined];

impl Mode {
    pub fn key(self) -> &'static str {
        match self {
            Mode::Sequential => "sequential",
            Mode::Concurrent => "concurrent",
            Mode::Pipelined => "pipelined",
        }
    }
}

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpSettings {
    pub commands: Vec<String>,
    /// Timed round trips per command and mode (concurrent: shared among the clients).
    pub requests: usize,
    /// Untimed round trips before each timed series (concurrent: shared among the clients).
    pub warmup: usize,
    pub clients: usize,
    pub depth: usize,
    /// Also time the D-Bus calls behind Flotilla's gateway.
    pub probe: bool,
    pub boot_timeout: Duration,
}

/// CPU time and context switches of one process per request of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuShare {
    pub process: String,
    pub us_per_request: f64,
    pub switches_per_request: f64,
}

/// `(process label, cpu µs so far, context switches so far)` for each process watched.
pub type Snapshot = Vec<(String, f64, u64)>;

/// What each process used between two snapshots, per request. A process missing from either
/// snapshot (exited, or started meanwhile) is left out.
pub fn shares(before: &Snapshot, after: &Snapshot, requests: usize) -> Vec<CpuShare> {
    let n = requests.max(1) as f64;
    after
        .iter()
        .filter_map(|(label, cpu, sw)| {
            let (_, cpu0, sw0) = before.iter().find(|b| &b.0 == label)?;
            Some(CpuShare {
                process: label.clone(),
                us_per_request: (cpu - cpu0).max(0.0) / n,
                switches_per_request: sw.saturating_sub(*sw0) as f64 / n,
            })
        })
        .collect()
}

/// The label of the bench's own process in the CPU figures.
pub const CLIENT_LABEL: &str = "bench (QMP/D-Bus client)";

/// The CPU use of the VM's processes, and of the bench's own (through getrusage, so that the
/// client threads of a concurrent series count after they have exited).
fn snapshot(pids: &[(i32, String)]) -> Snapshot {
    let mut v: Snapshot =
        pids.iter().filter_map(|(pid, label)| procfs::cpu_usage(*pid).map(|(c, s, _)| (label.clone(), c, s))).collect();
    if let Some((c, s)) = procfs::own_cpu_usage() {
        v.push((CLIENT_LABEL.to_string(), c, s));
    }
    v
}

/// How the CPU figures are taken on this host, for the report.
pub fn cpu_source() -> &'static str {
    match procfs::cpu_usage(std::process::id() as i32).map(|c| c.2) {
        Some(procfs::CpuSource::Sched) => {
            "VM processes: sum over the process's live threads of se.sum_exec_runtime and nr_switches from \
             /proc/PID/task/TID/sched (ns precision; a thread that exits during a series is not counted); \
             the bench: getrusage(RUSAGE_SELF), all its threads"
        }
        Some(procfs::CpuSource::StatTicks) => {
            "utime+stime from /proc/PID/stat (clock ticks: coarse) and the context switches of the live threads"
        }
        None => "unavailable",
    }
}

/// One timed series of one command in one mode.
#[derive(Debug, Clone)]
pub struct ModeSample {
    pub latency_us: Latency,
    /// Requests answered per second of wall time, first request to last reply.
    pub rps: f64,
    pub cpu: Vec<CpuShare>,
}

#[derive(Debug, Clone)]
pub struct CommandSample {
    pub command: String,
    pub reply_bytes: usize,
    pub modes: Vec<(Mode, ModeSample)>,
}

#[derive(Debug, Clone)]
pub struct ProbeSample {
    pub key: &'static str,
    pub what: &'static str,
    pub latency_us: Latency,
    pub cpu: Vec<CpuShare>,
}

/// How long the VM's processes are watched, idle, before the series.
pub const IDLE_WINDOW: Duration = Duration::from_millis(300);

/// Everything measured on one VM in one round.
#[derive(Debug, Clone)]
pub struct QmpSample {
    /// Each process's CPU use, in percent of one CPU, over [`IDLE_WINDOW`] with the guest idle
    /// (READY, in `sti; hlt`) and no request in flight: a VM that burns CPU while idle would
    /// take it from the monitor path on a small host, and this shows it.
    pub idle_cpu_percent: Vec<(String, f64)>,
    pub greeting: Greeting,
    pub commands: Vec<CommandSample>,
    pub probes: Vec<ProbeSample>,
    /// Events that arrived during the series (skipped; none are expected).
    pub events: u64,
    /// CPUs kept busy, on average over the measurement, by processes other than this VM's and
    /// the bench (the neighbours' load: on a small shared host it slows the multi-hop path),
    /// and the hypervisor's steal time, in CPUs.
    pub foreign_cpus: Option<f64>,
    pub steal_cpus: Option<f64>,
    pub stopped: Stopped,
}

/// The `-qmp` sockets of a variant: one per client.
pub fn socket_paths(dir: &Path, key: &str, clients: usize) -> Vec<PathBuf> {
    (0..clients.max(1)).map(|i| dir.join(format!("{key}-{i}.sock"))).collect()
}

/// The arguments that add the sockets, in QEMU's spelling (which Flotilla takes).
pub fn qmp_args(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().flat_map(|p| ["-qmp".to_string(), format!("unix:{},server=on,wait=off", p.display())]).collect()
}

fn to_us(ns: &[u64]) -> Vec<f64> {
    ns.iter().map(|n| *n as f64 / 1e3).collect()
}

/// Requests per second over series that ran side by side.
fn throughput(series: &[Series]) -> f64 {
    let (Some(start), Some(end)) = (series.iter().map(|s| s.started).min(), series.iter().map(|s| s.finished).max())
    else {
        return 0.0;
    };
    let n: usize = series.iter().map(|s| s.latencies_ns.len()).sum();
    let secs = end.duration_since(start).as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

fn mode_sample(series: &[Series], before: &Snapshot, after: &Snapshot) -> Result<ModeSample, BenchError> {
    let all: Vec<u64> = series.iter().flat_map(|s| s.latencies_ns.iter().copied()).collect();
    let latency_us = latency(&to_us(&all))
        .ok_or_else(|| BenchError::Qmp { what: "summarising a series".into(), detail: "no round trips".into() })?;
    Ok(ModeSample { latency_us, rps: throughput(series), cpu: shares(before, after, all.len()) })
}

/// Polls `command` until its answer is complete (Flotilla's gateway learns what vmm-core
/// exports by introspecting it just after start), until `deadline`.
fn wait_until_served(c: &mut QmpClient, command: &str, deadline: Instant) -> Result<(), BenchError> {
    loop {
        let reply = c.execute(command)?;
        match qmp::check_reply(command, &reply) {
            Ok(()) => return Ok(()),
            Err(detail) if Instant::now() >= deadline => {
                return Err(BenchError::Qmp { what: format!("checking the answer to {command}"), detail })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The timed part of one command on an open connection (and its siblings for concurrency).
#[allow(clippy::too_many_arguments)]
fn measure_command(
    v: &Variant,
    main: &mut QmpClient,
    paths: &[PathBuf],
    command: &str,
    s: &QmpSettings,
    deadline: Instant,
    snap: &dyn Fn() -> Snapshot,
) -> Result<CommandSample, BenchError> {
    let request = qmp::request_line(command);
    let mut modes = Vec::new();
    let mut reply_bytes = 0;
    for mode in MODES {
        let sample = match mode {
            Mode::Sequential | Mode::Pipelined => {
                let depth = if mode == Mode::Sequential { 1 } else { s.depth };
                if s.warmup > 0 {
                    main.time_series(&request, s.warmup, depth, deadline)?;
                }
                let before = snap();
                let series = main.time_series(&request, s.requests, depth, deadline)?;
                let after = snap();
                reply_bytes = series.reply_bytes;
                mode_sample(std::slice::from_ref(&series), &before, &after)?
            }
            Mode::Concurrent => {
                let (series, before, after) = concurrent(v, main, paths, &request, s, deadline, snap)?;
                mode_sample(&series, &before, &after)?
            }
        };
        modes.push((mode, sample));
    }
    Ok(CommandSample { command: command.to_string(), reply_bytes, modes })
}

/// `paths.len()` clients (the open one on the first socket, new ones on the others) warm up,
/// then all start together at a barrier; each sends its share one request at a time.
fn concurrent(
    v: &Variant,
    main: &mut QmpClient,
    paths: &[PathBuf],
    request: &[u8],
    s: &QmpSettings,
    deadline: Instant,
    snap: &dyn Fn() -> Snapshot,
) -> Result<(Vec<Series>, Snapshot, Snapshot), BenchError> {
    let n = paths.len().max(1);
    let mut others = Vec::new();
    for (i, p) in paths.iter().enumerate().skip(1) {
        let (mut c, _) = QmpClient::connect(&format!("{} QMP client {i}", v.key), p, deadline)?;
        c.negotiate()?;
        others.push(c);
    }
    let (per_client, warmup) = (s.requests.div_ceil(n), s.warmup.div_ceil(n));
    let barrier = Barrier::new(n + 1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = std::iter::once(main)
            .chain(others.iter_mut())
            .map(|c| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let warm = if warmup > 0 { c.time_series(request, warmup, 1, deadline).map(drop) } else { Ok(()) };
                    // Both waits happen whatever went wrong, so that nobody waits for ever.
                    barrier.wait();
                    barrier.wait();
                    warm.and_then(|()| c.time_series(request, per_client, 1, deadline))
                })
            })
            .collect();
        barrier.wait();
        let before = snap();
        barrier.wait();
        let mut series = Vec::new();
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(s)) => series.push(s),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(BenchError::Qmp {
                        what: format!("{}: concurrent clients", v.key),
                        detail: "a client thread panicked".into(),
                    });
                }
            }
        }
        let after = snap();
        match first_err {
            Some(e) => Err(e),
            None => Ok((series, before, after)),
        }
    })
}

/// Calls per block of the investigation: small enough that every path sees the same host
/// conditions, large enough that the snapshots around a block cost little.
pub const PROBE_BLOCK: usize = 100;

/// QMP commands timed alongside the D-Bus probes: with and without vmm-core's `spawn_blocking`.
pub const PROBE_QMP: [(&str, &str); 2] = [("qmp-query-status", "query-status"), ("qmp-query-kvm", "query-kvm")];

/// Per process, the CPU µs and context switches summed over blocks.
type CpuTotals = BTreeMap<String, (f64, u64)>;

fn accumulate(acc: &mut CpuTotals, before: &Snapshot, after: &Snapshot) {
    for (label, cpu, sw) in after {
        if let Some((_, cpu0, sw0)) = before.iter().find(|b| &b.0 == label) {
            let e = acc.entry(label.clone()).or_insert((0.0, 0));
            e.0 += (cpu - cpu0).max(0.0);
            e.1 += sw.saturating_sub(*sw0);
        }
    }
}

fn per_request(acc: &CpuTotals, n: usize) -> Vec<CpuShare> {
    let n = n.max(1) as f64;
    acc.iter()
        .map(|(k, (cpu, sw))| CpuShare {
            process: k.clone(),
            us_per_request: cpu / n,
            switches_per_request: *sw as f64 / n,
        })
        .collect()
}

/// Flotilla's path a piece at a time: QMP `query-status` and `query-kvm` through the gateway
/// and the D-Bus probes of [`dbusprobe`], in blocks of [`PROBE_BLOCK`] sequential calls, the
/// paths taking turns (the first rotating by block), so that drift and the neighbours' load
/// fall on all of them alike.
fn investigate(
    main: &mut QmpClient,
    target: &dbusprobe::BusTarget,
    s: &QmpSettings,
    deadline: Instant,
    snap: &dyn Fn() -> Snapshot,
) -> Result<Vec<ProbeSample>, BenchError> {
    let mut prober = dbusprobe::Prober::connect(target)?;
    for (_, c) in PROBE_QMP {
        wait_until_served(main, c, deadline)?;
    }
    let n_qmp = PROBE_QMP.len();
    let n = n_qmp + prober.probes.len();
    let mut run = |i: usize, count: usize, main: &mut QmpClient| -> Result<Vec<u64>, BenchError> {
        if i < n_qmp {
            Ok(main.time_series(&qmp::request_line(PROBE_QMP[i].1), count, 1, deadline)?.latencies_ns)
        } else {
            prober.time(i - n_qmp, count, deadline)
        }
    };
    for i in 0..n {
        if s.warmup > 0 {
            run(i, s.warmup, main)?;
        }
    }
    let mut lat: Vec<Vec<u64>> = vec![Vec::with_capacity(s.requests); n];
    let mut cpu: Vec<CpuTotals> = vec![CpuTotals::new(); n];
    for block in 0..s.requests.div_ceil(PROBE_BLOCK) {
        let count = PROBE_BLOCK.min(s.requests - block * PROBE_BLOCK);
        for i in (0..n).map(|i| (i + block) % n) {
            let before = snap();
            lat[i].extend(run(i, count, main)?);
            accumulate(&mut cpu[i], &before, &snap());
        }
    }
    let whats: Vec<(&'static str, &'static str)> = PROBE_QMP
        .iter()
        .map(|(k, _)| (*k, "QMP through the gateway (interleaved with the D-Bus probes)"))
        .chain(prober.probes.iter().map(|p| (p.key, p.what)))
        .collect();
    whats
        .into_iter()
        .zip(lat.iter().zip(&cpu))
        .map(|((key, what), (l, c))| {
            let latency_us = latency(&to_us(l))
                .ok_or_else(|| BenchError::Qmp { what: format!("probe {key}"), detail: "no calls timed".into() })?;
            Ok(ProbeSample { key, what, latency_us, cpu: per_request(c, l.len()) })
        })
        .collect()
}

/// Boots `v` with its QMP sockets, measures every command in every mode (and, for Flotilla,
/// the D-Bus probes), and stops it.
pub fn run_qmp(
    v: &Variant,
    mem_mib: u64,
    elf: &Path,
    sock_dir: &Path,
    s: &QmpSettings,
) -> Result<QmpSample, BenchError> {
    let paths = socket_paths(sock_dir, &v.key, s.clients);
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    let mut spec = v.spec(mem_mib, elf);
    spec.args.extend(qmp_args(&paths));
    let mut p = VmProcess::spawn(&spec)?;
    p.expect("READY", |l| l.trim() == "READY", p.started + s.boot_timeout)?;
    let deadline = Instant::now() + s.boot_timeout;
    let (mut main, greeting) = QmpClient::connect(&format!("{} QMP client 0", v.key), &paths[0], deadline)?;
    main.negotiate()?;
    for c in &s.commands {
        wait_until_served(&mut main, c, deadline)?;
    }

    let watched: Vec<(i32, String)> = procfs::process_tree(p.pid())
        .into_iter()
        .map(|pid| (pid, procfs::comm_and_ppid(pid).map(|c| c.0).unwrap_or_else(|| format!("pid {pid}"))))
        .collect();
    let snap = || snapshot(&watched);
    let before = snap();
    std::thread::sleep(IDLE_WINDOW);
    let after = snap();
    let idle_cpu_percent = shares(&before, &after, 1)
        .into_iter()
        .filter(|c| c.process != CLIENT_LABEL)
        .map(|c| (c.process, c.us_per_request / IDLE_WINDOW.as_micros() as f64 * 100.0))
        .collect();

    let (t_start, host_start, own_start) = (Instant::now(), procfs::host_cpu_us(), snap());
    // Each series is bounded: generous for 2000 round trips, short of hanging on a stuck VMM.
    let series_limit = Duration::from_secs(60) + Duration::from_millis(5 * (s.requests + s.warmup) as u64);
    let mut commands = Vec::new();
    for c in &s.commands {
        commands.push(measure_command(v, &mut main, &paths, c, s, Instant::now() + series_limit, &snap)?);
    }
    let mut probes = Vec::new();
    if s.probe && v.kind == Kind::Flotilla {
        let pids: Vec<i32> = watched.iter().map(|w| w.0).collect();
        let target = dbusprobe::find_target(&pids).ok_or_else(|| BenchError::Qmp {
            what: format!("{}: finding the VM's D-Bus", v.key),
            detail: "no vmm-core with --dbus-address and --instance among the VM's processes".into(),
        })?;
        probes = investigate(&mut main, &target, s, Instant::now() + 8 * series_limit, &snap)?;
    }
    let events = main.events;
    drop(main);
    let wall_us = t_start.elapsed().as_secs_f64() * 1e6;
    let own_us: f64 = shares(&own_start, &snap(), 1).iter().map(|c| c.us_per_request).sum();
    let (foreign_cpus, steal_cpus) = match (host_start, procfs::host_cpu_us()) {
        (Some((b0, s0)), Some((b1, s1))) if wall_us > 0.0 => {
            (Some(((b1 - b0 - own_us) / wall_us).max(0.0)), Some((s1 - s0) / wall_us))
        }
        _ => (None, None),
    };
    let stopped = p.stop()?;
    for path in &paths {
        let _ = std::fs::remove_file(path);
    }
    Ok(QmpSample { idle_cpu_percent, greeting, commands, probes, events, foreign_cpus, steal_cpus, stopped })
}

/// The host's floor for one hop: round trips of a 32-byte message between two threads of the
/// bench over a unix socket pair (each way wakes a sleeping thread, as every hop of a QMP
/// request does). `cpus`: pin the two threads to these CPUs (two different ones: the cost of
/// waking a thread on another, idle, CPU); `None`: wherever the scheduler puts them. Returns
/// the round-trip times in microseconds.
pub fn pingpong(count: usize, warmup: usize, cpus: Option<(usize, usize)>) -> Result<Vec<f64>, BenchError> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let io = |e| BenchError::Io { what: "timing the unix socket ping-pong baseline".into(), source: e };
    let (mut a, mut b) = UnixStream::pair().map_err(io)?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(qmp::REPLY_TIMEOUT)).map_err(io)?;
    }
    let total = count + warmup;
    let pin = move |cpu: Option<usize>| match cpu {
        Some(c) => crate::vmproc::pin_to_cpu(c),
        None => Ok(()),
    };
    let echo = std::thread::spawn(move || -> Result<(), BenchError> {
        pin(cpus.map(|c| c.1))?;
        let mut buf = [0u8; 32];
        for _ in 0..total {
            b.read_exact(&mut buf).and_then(|()| b.write_all(&buf)).map_err(io)?;
        }
        Ok(())
    });
    // The timing side runs in a thread of its own too, so that its pin does not stay on the
    // bench's main thread.
    let timer = std::thread::spawn(move || -> Result<Vec<f64>, BenchError> {
        pin(cpus.map(|c| c.0))?;
        let mut out = Vec::with_capacity(count);
        let mut buf = [7u8; 32];
        for i in 0..total {
            let t0 = Instant::now();
            a.write_all(&buf).and_then(|()| a.read_exact(&mut buf)).map_err(io)?;
            if i >= warmup {
                out.push(t0.elapsed().as_nanos() as f64 / 1e3);
            }
        }
        Ok(out)
    });
    let panicked = || io(std::io::Error::other("a ping-pong thread panicked"));
    let out = timer.join().map_err(|_| panicked())?;
    // If the timer failed, its end of the pair is closed and the echo thread ends too.
    let echoed = echo.join().map_err(|_| panicked())?;
    let out = out?;
    echoed?;
    Ok(out)
}

/// Two different online CPUs for the cross-CPU ping-pong: the first this process may run on
/// (the one of `--pin-cpu`) and another; `None` on a one-CPU host.
pub fn two_cpus() -> Option<(usize, usize)> {
    // SAFETY: sysconf only reads a configuration value.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if online < 2 {
        return None;
    }
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid cpu_set_t of the size passed, for the calling thread (0).
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return None;
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: every index is below the set's size.
    let first = (0..max).find(|c| unsafe { libc::CPU_ISSET(*c, &set) })?;
    Some((first, if first == 0 { 1 } else { 0 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_shares_are_per_request_and_skip_missing_processes() {
        let before: Snapshot = vec![("gw".into(), 1000.0, 10), ("core".into(), 500.0, 4), ("gone".into(), 1.0, 1)];
        let after: Snapshot = vec![("gw".into(), 3000.0, 410), ("core".into(), 500.0, 4), ("new".into(), 9.0, 9)];
        let s = shares(&before, &after, 200);
        assert_eq!(
            s,
            [
                CpuShare { process: "gw".into(), us_per_request: 10.0, switches_per_request: 2.0 },
                CpuShare { process: "core".into(), us_per_request: 0.0, switches_per_request: 0.0 },
            ]
        );
    }

    #[test]
    fn pingpong_times_every_round_trip() {
        let v = pingpong(50, 5, None).unwrap();
        assert_eq!(v.len(), 50);
        assert!(v.iter().all(|t| *t > 0.0));
        if let Some(cpus) = two_cpus() {
            assert_ne!(cpus.0, cpus.1);
            assert_eq!(pingpong(20, 0, Some(cpus)).unwrap().len(), 20);
        }
    }

    #[test]
    fn cpu_totals_add_up_over_blocks() {
        let mut acc = CpuTotals::new();
        accumulate(&mut acc, &vec![("a".into(), 10.0, 1)], &vec![("a".into(), 30.0, 5), ("b".into(), 1.0, 1)]);
        accumulate(&mut acc, &vec![("a".into(), 100.0, 10)], &vec![("a".into(), 120.0, 14)]);
        assert_eq!(
            per_request(&acc, 4),
            [CpuShare { process: "a".into(), us_per_request: 10.0, switches_per_request: 2.0 }]
        );
    }

    #[test]
    fn one_socket_per_client_in_qemus_spelling() {
        let paths = socket_paths(Path::new("/tmp/b"), "flotilla", 2);
        assert_eq!(paths, [PathBuf::from("/tmp/b/flotilla-0.sock"), PathBuf::from("/tmp/b/flotilla-1.sock")]);
        assert_eq!(
            qmp_args(&paths),
            [
                "-qmp",
                "unix:/tmp/b/flotilla-0.sock,server=on,wait=off",
                "-qmp",
                "unix:/tmp/b/flotilla-1.sock,server=on,wait=off"
            ]
        );
        assert_eq!(socket_paths(Path::new("/d"), "q", 0).len(), 1);
    }

    fn series(t0: Instant, start_ms: u64, end_ms: u64, n: usize) -> Series {
        Series {
            latencies_ns: vec![1000; n],
            started: t0 + Duration::from_millis(start_ms),
            finished: t0 + Duration::from_millis(end_ms),
            reply_bytes: 10,
        }
    }

    #[test]
    fn throughput_spans_all_clients() {
        // 2 x 500 requests between 0 and 500 ms: 2000 per second.
        let t0 = Instant::now();
        let t = throughput(&[series(t0, 0, 400, 500), series(t0, 100, 500, 500)]);
        assert!((t - 2000.0).abs() < 1e-6, "{t}");
        assert_eq!(throughput(&[]), 0.0);
        let m = mode_sample(&[series(t0, 0, 1000, 10)], &vec![], &vec![]).unwrap();
        assert_eq!((m.latency_us.p50, m.latency_us.n), (1.0, 10));
        assert!((m.rps - 10.0).abs() < 1e-9);
    }
}
