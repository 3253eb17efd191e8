//! `flotilla-bench block`: blockd against qemu-storage-daemon against the host, on one image.
//!
//! The bench is its own vhost-user-blk frontend ([`frontend`]): no VM, no guest CPU, one queue,
//! the same features and the same request layout for both backends. The host side is fio on
//! the same file ([`fio`]). Every side uses O_DIRECT (blockd's `cache=none` where this blockd
//! has it; the report says when it does not). Rounds are interleaved: for each round and
//! workload every side runs once, the order rotating, so drift falls on all alike; the report
//! takes medians over rounds (see bench/README.md, "block").

mod error;
mod fio;
mod frontend;
mod image;
mod report;
mod request;
mod ring;
mod server;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vmproc::{self, Spec};
use error::BlockError;
use frontend::Device;
use report::{Results, Sample};
use server::Server;
use workload::{Workload, WORKLOADS};

const USAGE: &str = "\
usage: flotilla-bench block [options]

  4 KiB random read/write at QD1 and QD32 and 1 MiB sequential read/write at QD8, through a
  vhost-user-blk frontend of the bench's own into blockd and qemu-storage-daemon, and fio on the
  host, all on the same raw image with O_DIRECT; interleaved rounds, medians, ratios.

options:
  --image-size SIZE   image size, K/M/G suffixes (default 1G)
  --runtime-s SECS    timed seconds per run (default 5; fractions allowed)
  --warmup-s SECS     untimed seconds before each run (default 1)
  --rounds N          rounds; each runs every workload on every side once (default 3)
  --only LIST         sides, comma-separated: blockd,qsd,host (default all three)
  --workloads LIST    comma-separated workload keys (default all six)
  --dir DIR           where the image is made; a real disk, not tmpfs (default /var/tmp)
  --blockd PATH       blockd (default: next to this executable, i.e. target/release/blockd)
  --blockd-opts OPTS  more key=value options for blockd's --drive, e.g. aio=threads
  --qsd PATH          qemu-storage-daemon (default: on PATH)
  --fio PATH          fio (default: on PATH)
  --json              JSON report on stdout (the table then goes to stderr)
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Blockd,
    Qsd,
    Host,
}

impl Side {
    fn key(self) -> &'static str {
        match self {
            Side::Blockd => "blockd",
            Side::Qsd => "qsd",
            Side::Host => "host",
        }
    }
}

const ALL_SIDES: [Side; 3] = [Side::Blockd, Side::Qsd, Side::Host];

#[derive(Debug, Clone, PartialEq)]
struct Options {
    image_size: u64,
    runtime: Duration,
    warmup: Duration,
    rounds: usize,
    sides: Vec<Side>,
    workloads: Vec<Workload>,
    dir: PathBuf,
    blockd: Option<PathBuf>,
    /// Appended to blockd's `--drive` (comma-separated key=value).
    blockd_opts: Option<String>,
    qsd: Option<PathBuf>,
    fio: Option<PathBuf>,
    json: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image_size: 1 << 30,
            runtime: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            rounds: 3,
            sides: ALL_SIDES.to_vec(),
            workloads: WORKLOADS.to_vec(),
            dir: PathBuf::from("/var/tmp"),
            blockd: None,
            blockd_opts: None,
            qsd: None,
            fio: None,
            json: false,
        }
    }
}

fn usage(msg: impl std::fmt::Display) -> BlockError {
    BlockError::Usage(format!("{msg}\n{USAGE}"))
}

/// `1G`, `512M`, `64K`, or bytes; binary units. A multiple of 1 MiB, so that every workload's
/// block divides it.
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let v = num.parse::<u64>().ok()?.checked_mul(mult)?;
    (v >= 1 << 20 && v % (1 << 20) == 0).then_some(v)
}

fn parse_secs(name: &str, v: &str, min: f64) -> Result<Duration, BlockError> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= min && x <= 3600.0 => Ok(Duration::from_secs_f64(x)),
        _ => Err(usage(format!("{name}: '{v}' is not a number of seconds between {min} and 3600"))),
    }
}

fn parse_args(args: &[String]) -> Result<Option<Options>, BlockError> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| usage(format!("{name} needs a value")));
        match a.as_str() {
            "-h" | "--help" | "help" => return Ok(None),
            "--image-size" => {
                let v = value(a)?;
                o.image_size = parse_size(&v)
                    .ok_or_else(|| usage(format!("--image-size: '{v}' is not a size of whole MiB, at least 1M")))?;
            }
            "--runtime-s" => o.runtime = parse_secs(a, &value(a)?, 0.1)?,
            "--warmup-s" => o.warmup = parse_secs(a, &value(a)?, 0.0)?,
            "--rounds" => {
                let v = value(a)?;
                o.rounds = v
                    .parse()
                    .ok()
                    .filter(|&n: &usize| (1..=100).contains(&n))
                    .ok_or_else(|| usage(format!("--rounds: '{v}' is not 1..100")))?;
            }
            "--only" => {
                let v = value(a)?;
                let mut sides = Vec::new();
                for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let side = ALL_SIDES
                        .into_iter()
                        .find(|x| x.key() == s)
                        .ok_or_else(|| usage(format!("--only: unknown side '{s}' (blockd, qsd, host)")))?;
                    if !sides.contains(&side) {
                        sides.push(side);
                    }
                }
                if sides.is_empty() {
                    return Err(usage("--only: no side named"));
                }
                o.sides = sides;
            }
            "--workloads" => {
                let v = value(a)?;
                let mut ws = Vec::new();
                for k in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let known = || WORKLOADS.iter().map(|w| w.key).collect::<Vec<_>>().join(", ");
                    ws.push(
                        workload::by_key(k)
                            .ok_or_else(|| usage(format!("--workloads: unknown '{k}' (known: {})", known())))?,
                    );
                }
                if ws.is_empty() {
                    return Err(usage("--workloads: none named"));
                }
                o.workloads = ws;
            }
            "--dir" => o.dir = value(a)?.into(),
            "--blockd" => o.blockd = Some(value(a)?.into()),
            "--blockd-opts" => {
                let v = value(a)?;
                let ok = |kv: &str| kv.split_once('=').is_some_and(|(k, v)| !k.is_empty() && !v.is_empty());
                if v.is_empty() || !v.split(',').all(ok) {
                    return Err(usage(format!("--blockd-opts: '{v}' is not key=value[,key=value...]")));
                }
                o.blockd_opts = Some(v);
            }
            "--qsd" => o.qsd = Some(value(a)?.into()),
            "--fio" => o.fio = Some(value(a)?.into()),
            "--json" => o.json = true,
            other => return Err(usage(format!("unknown argument '{other}'"))),
        }
    }
    Ok(Some(o))
}

/// The programs the chosen sides need, found or refused with a hint.
struct Tools {
    blockd: Option<PathBuf>,
    qsd: Option<PathBuf>,
    fio: Option<PathBuf>,
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn find_tools(o: &Options) -> Result<Tools, BlockError> {
    let need = |s: Side| o.sides.contains(&s);
    let pick =
        |given: &Option<PathBuf>, default: Option<PathBuf>, what: &str, hint: &str| -> Result<PathBuf, BlockError> {
            match given.clone().or(default) {
                Some(p) if p.is_file() => Ok(p),
                Some(p) => Err(BlockError::Setup(format!("{what}: {} does not exist; {hint}", p.display()))),
                None => Err(BlockError::Setup(format!("{what} not found; {hint}"))),
            }
        };
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("blockd")));
    Ok(Tools {
        blockd: need(Side::Blockd)
            .then(|| pick(&o.blockd, beside, "blockd", "build it (cargo build --release -p blockd) or pass --blockd PATH"))
            .transpose()?,
        qsd: need(Side::Qsd)
            .then(|| pick(&o.qsd, which("qemu-storage-daemon"), "qemu-storage-daemon", "scripts/bench-deps installs it (Debian's qemu-system-common), or pass --qsd PATH / leave it out with --only"))
            .transpose()?,
        fio: need(Side::Host)
            .then(|| pick(&o.fio, which("fio"), "fio", "scripts/bench-deps installs it, or pass --fio PATH / leave the host out with --only"))
            .transpose()?,
    })
}

fn first_line(program: &Path, args: &[&str]) -> String {
    let spec = Spec {
        label: program.display().to_string(),
        program: program.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![],
    };
    match vmproc::output_lines(&spec, Duration::from_secs(10)) {
        Ok(l) => l.into_iter().find(|l| !l.trim().is_empty()).unwrap_or_default(),
        Err(e) => format!("unknown ({})", crate::error::chain(&e)),
    }
}

/// Whether this blockd takes `cache=none` (O_DIRECT) in `--drive`: its usage line says so.
fn blockd_has_cache_none(blockd: &Path) -> bool {
    let spec = Spec { label: "blockd --help".into(), program: blockd.into(), args: vec!["--help".into()], env: vec![] };
    // blockd prints its usage on stderr and exits non-zero; run it through sh to read both.
    let sh = Spec {
        label: spec.label.clone(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), "\"$0\" --help 2>&1".into(), blockd.display().to_string()],
        env: vec![],
    };
    vmproc::output_lines(&sh, Duration::from_secs(10)).map(|l| l.iter().any(|l| l.contains("cache="))).unwrap_or(false)
}

/// What was measured: sources, binaries, versions, the machine.
fn host_info(o: &Options, tools: &Tools, blockd_direct: bool, qsd_aio: &str) -> Value {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    let git = |args: &[&str]| {
        let mut a = vec!["-C", src.to_str().unwrap_or(".")];
        a.extend_from_slice(args);
        let spec = Spec {
            label: "git".into(),
            program: "git".into(),
            args: a.iter().map(|s| s.to_string()).collect(),
            env: vec![],
        };
        vmproc::output_lines(&spec, Duration::from_secs(10))
            .map(|l| l.join("\n"))
            .unwrap_or_else(|e| format!("unknown ({})", crate::error::chain(&e)))
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines().find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_string()))
    });
    let mount = image::mount_of(&o.dir);
    let bin = |p: &Option<PathBuf>| {
        p.as_ref().map(|p| {
            let m = p.metadata().ok();
            let modified = m
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            json!({"path": p.display().to_string(), "bytes": m.map(|m| m.len()), "modified_unix": modified})
        })
    };
    json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "image_dir": o.dir.display().to_string(),
        "image_mount": mount.map(|(dev, mp, fs)| json!({"device": dev, "mount_point": mp, "fstype": fs})),
        "bench_profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "git_head": git(&["rev-parse", "HEAD"]),
        "blockd_last_commit": git(&["log", "-1", "--format=%H %cI %s", "--", "blockd"]),
        "blockd_uncommitted_changes": !git(&["status", "--porcelain", "--", "blockd"]).trim().is_empty(),
        "blockd": bin(&tools.blockd),
        "blockd_cache": if blockd_direct { "cache=none (O_DIRECT)" } else { "buffered: this blockd has no cache= option; the image's page cache is dropped before every run" },
        "qsd": bin(&tools.qsd),
        "qsd_version": tools.qsd.as_ref().map(|q| first_line(q, &["--version"])),
        "qsd_aio": qsd_aio,
        "fio": bin(&tools.fio),
        "fio_version": tools.fio.as_ref().map(|f| first_line(f, &["--version"])),
    })
}

/// Everything one run needs to know that does not change between runs.
struct Ctx<'a> {
    o: &'a Options,
    tools: &'a Tools,
    dir: PathBuf,
    image: PathBuf,
    blockd_direct: bool,
    /// qemu-storage-daemon's aio mode: io_uring, or native where this QEMU lacks it.
    qsd_aio: &'static str,
    /// Per backend, what the first connection negotiated.
    device_info: serde_json::Map<String, Value>,
}

fn rusage_thread_secs() -> Option<f64> {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return None;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(tv(ru.ru_utime) + tv(ru.ru_stime))
}

impl Ctx<'_> {
    fn backend_args(&self, side: Side, socket: &Path) -> (PathBuf, Vec<String>) {
        let img = self.image.display();
        match side {
            Side::Blockd => {
                let cache = if self.blockd_direct { ",cache=none" } else { "" };
                let extra = self.o.blockd_opts.as_ref().map_or(String::new(), |x| format!(",{x}"));
                (
                    self.tools.blockd.clone().unwrap_or_default(),
                    vec![
                        "--socket-path".into(),
                        socket.display().to_string(),
                        "--drive".into(),
                        format!("file={img},format=raw{cache}{extra}"),
                        "--num-queues".into(),
                        "1".into(),
                    ],
                )
            }
            _ => (
                self.tools.qsd.clone().unwrap_or_default(),
                vec![
                    "--blockdev".into(),
                    format!("driver=file,node-name=f,filename={img},cache.direct=on,aio={}", self.qsd_aio),
                    "--export".into(),
                    format!(
                        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=1",
                        socket.display()
                    ),
                ],
            ),
        }
    }

    /// One workload through the bench frontend into a freshly started backend.
    fn run_vhost(&mut self, side: Side, w: &Workload, round: usize, seed: u64) -> Result<Sample, BlockError> {
        let socket = self.dir.join(format!("{}.sock", side.key()));
        let log = self.dir.join(format!("{}-{}-round{}.log", side.key(), w.key, round + 1));
        let (program, args) = self.backend_args(side, &socket);
        let server = Server::start(side.key(), &program, &args, &socket, &log, Duration::from_secs(10))?;
        let measured = (|| {
            let mut dev = Device::connect(&socket, frontend::memory_for(&[*w]))?;
            if !self.device_info.contains_key(side.key()) {
                self.device_info.insert(
                    side.key().into(),
                    json!({
                        "argv": server.argv,
                        "acked_features": format!("{:#x}", dev.acked),
                        "capacity_bytes": dev.capacity_bytes(),
                        "size_max": dev.config.size_max,
                        "seg_max": dev.config.seg_max,
                        "blk_size": dev.config.blk_size,
                        "segment_bytes": dev.seg,
                    }),
                );
            }
            if dev.capacity_bytes() < self.o.image_size {
                return Err(BlockError::Backend {
                    what: "capacity".into(),
                    detail: format!("{} bytes, the image has {}", dev.capacity_bytes(), self.o.image_size),
                });
            }
            dev.fill_buffers(seed)?;
            dev.check_data(self.o.image_size - 4096, 4096, seed ^ 0x5555)?;
            let (cpu0, me0, t0) = (server.cpu_secs(), rusage_thread_secs(), Instant::now());
            let m = dev.run(w, self.o.image_size, self.o.warmup, self.o.runtime, seed)?;
            let wall = t0.elapsed().as_secs_f64();
            let cpus = server.cpu_secs().zip(cpu0).map(|(b, a)| (b - a) / wall);
            let me = rusage_thread_secs().zip(me0).map(|(b, a)| (b - a) / wall);
            dev.close()?;
            Ok((m, cpus, me))
        })();
        let ended = server.stop(Duration::from_secs(5));
        let (m, cpus, frontend_cpus) = measured.map_err(|e| match e {
            BlockError::Backend { what, detail } => {
                BlockError::Backend { what, detail: format!("{detail}; backend log: {}", server::tail(&log, 3)) }
            }
            e => e,
        })?;
        ended?;
        let _ = std::fs::remove_file(&log);
        let l = crate::stats::latency(&m.latencies_us);
        if m.ops == 0 {
            return Err(BlockError::Backend { what: "timed run".into(), detail: "no request completed".into() });
        }
        Ok(Sample {
            iops: m.ops as f64 / m.secs,
            mbps: m.bytes as f64 / m.secs / 1e6,
            p50_us: l.map(|l| l.p50),
            p99_us: l.map(|l| l.p99),
            cpus,
            frontend_cpus,
        })
    }

    fn run_fio(&self, w: &Workload) -> Result<Sample, BlockError> {
        let fio = self.tools.fio.clone().unwrap_or_default();
        let spec = Spec {
            label: "fio".into(),
            program: fio,
            args: fio::args(w, &self.image, self.o.image_size, self.o.warmup, self.o.runtime),
            env: vec![],
        };
        let limit = self.o.warmup + self.o.runtime + Duration::from_secs(60);
        let out = vmproc::output_lines(&spec, limit)?.join("\n");
        let r = fio::parse(&out, w)?;
        if r.errors != 0 {
            return Err(BlockError::Fio(format!("job error {}", r.errors)));
        }
        Ok(Sample {
            iops: r.iops,
            mbps: r.bytes_per_s / 1e6,
            p50_us: r.p50_us,
            p99_us: r.p99_us,
            cpus: r.cpu_percent.map(|p| p / 100.0),
            frontend_cpus: None,
        })
    }
}

/// qemu-storage-daemon's aio: io_uring where this build has it, else native.
fn probe_qsd_aio(qsd: &Path, dir: &Path, image: &Path) -> &'static str {
    let socket = dir.join("qsd-probe.sock");
    let log = dir.join("qsd-probe.log");
    let args = vec![
        "--blockdev".into(),
        format!("driver=file,node-name=f,filename={},cache.direct=on,aio=io_uring", image.display()),
        "--export".into(),
        format!("type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on", socket.display()),
    ];
    let ok = Server::start("qsd", qsd, &args, &socket, &log, Duration::from_secs(10))
        .and_then(|s| s.stop(Duration::from_secs(5)));
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&socket);
    if ok.is_ok() {
        "io_uring"
    } else {
        "native"
    }
}

/// Each round starts the sides at a different one, and so does each workload.
fn rotated(n: usize, by: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + by) % n)
}

fn run(o: &Options, command: Vec<String>) -> Result<(Value, String, bool), BlockError> {
    let tools = find_tools(o)?;
    let fstype = image::check_dir(&o.dir)?;
    let dir = o.dir.join(format!("flotilla-bench-block-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BlockError::io(format!("creating {}", dir.display())))?;
    let image = dir.join("disk.raw");
    eprintln!("flotilla-bench block: writing a {} MiB image of random data to {}", o.image_size >> 20, image.display());
    let made = image::create(&image, o.image_size, 0x00f1_0771);
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    let blockd_direct = tools.blockd.as_deref().is_some_and(blockd_has_cache_none);
    if tools.blockd.is_some() && !blockd_direct {
        eprintln!("flotilla-bench block: this blockd has no cache=none: it runs buffered (page cache dropped before each run)");
    }
    let qsd_aio = tools.qsd.as_deref().map_or("io_uring", |q| probe_qsd_aio(q, &dir, &image));
    let mut ctx = Ctx {
        o,
        tools: &tools,
        dir: dir.clone(),
        image: image.clone(),
        blockd_direct,
        qsd_aio,
        device_info: serde_json::Map::new(),
    };
    // Before the runs: the sources and binaries as they are when measured.
    let host = host_info(o, &tools, blockd_direct, qsd_aio);
    let mut results = Results::default();
    let mut failed = false;
    for round in 0..o.rounds {
        for (wi, w) in o.workloads.iter().enumerate() {
            let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul((round * 16 + wi + 1) as u64);
            let mut line = format!("round {}/{} {:<18}", round + 1, o.rounds, w.key);
            for si in rotated(o.sides.len(), round + wi) {
                let side = o.sides[si];
                let r = image::drop_cache(&image).and_then(|()| match side {
                    Side::Host => ctx.run_fio(w),
                    _ => ctx.run_vhost(side, w, round, seed),
                });
                match r {
                    Ok(s) => {
                        line += &format!(" {} {:.0} IOPS {:.0} MB/s;", side.key(), s.iops, s.mbps);
                        results.push(w, side.key(), s);
                    }
                    Err(e) => {
                        failed = true;
                        let msg = crate::error::chain(&e);
                        line += &format!(" {} FAILED;", side.key());
                        results.failures.push(format!("{} {} round {}: {msg}", side.key(), w.key, round + 1));
                    }
                }
            }
            eprintln!("{line}");
        }
    }
    let sides: Vec<&'static str> = o.sides.iter().map(|s| s.key()).collect();
    let mut json = report::to_json(&o.workloads, &sides, &results);
    json["command"] = json!(command);
    json["host"] = host;
    json["host"]["image_fs_magic"] = json!(format!("{fstype:#x}"));
    json["devices"] = Value::Object(ctx.device_info.clone());
    json["settings"] = json!({
        "image_bytes": o.image_size,
        "runtime_s": o.runtime.as_secs_f64(),
        "warmup_s": o.warmup.as_secs_f64(),
        "rounds": o.rounds,
        "queue_size": frontend::QUEUE_SIZE,
        "sequential_queue_depth": workload::SEQ_QD,
        "o_direct": {"blockd": blockd_direct, "qsd": true, "host": true},
    });
    if tools.blockd.is_some() && !blockd_direct {
        // Buffered blockd against O_DIRECT peers measures the page cache, not the path.
        json["goal_met"] = Value::Null;
        json["goal_note"] = json!("not judged: blockd ran buffered (no cache=none), the other sides with O_DIRECT");
    }
    json["failures"] = json!(results.failures);
    let table = report::table(&o.workloads, &sides, &results);
    // The image is large; the logs of failed runs are small and worth keeping.
    let _ = std::fs::remove_file(&image);
    if results.failures.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("flotilla-bench block: logs of the failed runs are in {}", dir.display());
    }
    Ok((json, table, failed))
}

/// The `block` subcommand; `args` are those after `block`.
pub fn main(args: &[String]) -> ExitCode {
    crate::part::main("block", "runs", USAGE, parse_args(args), |o| o.json, |o| run(o, std::env::args().collect()))
}

#[cfg(test)]
mod tests;
