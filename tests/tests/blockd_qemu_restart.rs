//! blockd SIGKILLed and restarted while a Linux guest writes and verifies through it, with QEMU
//! (`-accel tcg`) as an independent vhost-user-blk frontend (chardev `reconnect=1`) and Linux's
//! own virtio-blk driver: the user's report in issue 9 (one run in three the guest's I/O hung for
//! good; with qcow2 a chunk read back differed from what was written).
//!
//! Four writers and a probe run in the guest (`tests/kit/write-verify.sh`): each pass writes
//! distinct text to a fresh slot with four O_DIRECT dd at once, reads it back with O_DIRECT and
//! compares. Each kill follows at once a pass line showing a request in flight on the disk;
//! blockd is started again on the same socket. Asserted: every kill is recovered from (the probe
//! and every writer progress within a bound: a lost request hangs a writer for good, since
//! Linux's virtio-blk never times requests out), no dd failed, every read-back matched, the
//! guest's kernel logged no I/O error, afterwards (blockd SIGKILLed once more, not stopped
//! cleanly) the image's bytes on the host - the raw file, or qcow2 through `qemu-img convert`
//! after `qemu-img check` found no corruption (leaked clusters allowed) - are exactly what the
//! writers' last passes wrote, and blockd's log shows it resubmitted requests it found in flight
//! (so the kills did land on requests in blockd's hands).
//!
//! Against the blockd of 350f321 (before issue 9) the qcow2 case fails: after a few kills the
//! guest's dd get I/O errors (7068 in one run, with 2 read-backs that differed from what was
//! written: the report's symptom; a stall after 6 kills in another). The raw case passed its data
//! checks over 32 kills (QEMU restarts a ring at the used index, which is right unless
//! completions were out of order at the kill) and failed only for want of resubmissions: the
//! raw hang the user saw one run in three was not reproduced here.
//!
//! The raw case throttles blockd's disk I/O (`cache=none` and a cgroup v1 blkio throttle, the
//! way restart_e2e does): unthrottled, raw requests spend so little time in blockd that 32 kills
//! in a row could all miss them (seen once in the full suite on a loaded machine).
//!
//! Needs `qemu-system-x86_64` and `qemu-img` (`scripts/setup-host` installs them). Bounded
//! everywhere; takes a few minutes per format under TCG.

use flotilla_tests::blkio::{Limits, Throttle};
use flotilla_tests::machine::TempDir;
use flotilla_tests::restart::backend::{Backend, Kind, Spec};
use flotilla_tests::restart::qemu::Qemu;
use flotilla_tests::restart::soak::{check_image, soak, Outcome, Settings};
use flotilla_tests::restart::workload::Load;
use std::process::Command;
use std::time::Duration;

const KILLS: usize = 12;
/// 4 writers, 4 x 64 KiB per pass, 1024 slots: a 256 MiB disk, and in qcow2 every pass
/// allocates fresh clusters (metadata changes in flight at every kill) for 256 passes a writer.
const LOAD: Load = Load { writers: 4, blocks: 4, kib: 64, slots: 1024 };

/// blockd's O_DIRECT I/O in the raw case: a 64 KiB write takes ~30 ms, so a kill after a pass
/// line showing a request in flight finds it in blockd's hands.
const LIMITS: Limits = Limits { read_bps: 4 << 20, write_bps: 2 << 20, read_iops: 500, write_iops: 250 };

/// Kills beyond [`KILLS`] while no kill has yet caught a request in blockd's hands.
const EXTRA_KILLS: usize = 20;

/// Requests blockd found recorded in flight and redid after its restarts (its log).
fn resubmitted(blockd: &Backend) -> u64 {
    blockd
        .log()
        .lines()
        .filter(|l| l.contains("ring recovered from the inflight region"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("resubmit=")?.parse::<u64>().ok()))
        .sum()
}

/// A kill follows a pass line showing a request in flight (2 at once are rarely seen: on a
/// fast backend a minute can pass without one). Raw requests spend so little time in blockd that
/// a dozen kills may all miss them there: then up to [`EXTRA_KILLS`] more, until one did not.
fn settings() -> Settings {
    Settings {
        kills: KILLS,
        extra_kills: EXTRA_KILLS,
        until: Some(|b| resubmitted(b) > 0),
        min_inflight: 1,
        busy_timeout: Duration::from_secs(60),
        progress_timeout: Duration::from_secs(45),
    }
}

fn image(dir: &TempDir, format: &str) -> std::path::PathBuf {
    let path = dir.path(&format!("disk.{format}"));
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&path)
        .arg(LOAD.disk_bytes().to_string())
        .output()
        .expect("running qemu-img (scripts/setup-host installs it)");
    assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    path
}

fn summary(o: &Outcome) -> String {
    let times: Vec<String> = o
        .kills
        .iter()
        .map(|k| {
            let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
            format!(
                "in flight {} listening {:.0} probe {} writers {}",
                k.inflight,
                k.listening_ms,
                f(k.probe_ms),
                f(k.writers_ms)
            )
        })
        .collect();
    format!(
        "{} kills, {} passes, probe interval {:.0} ms, last passes {:?}\n  {}",
        o.kills.len(),
        o.passes,
        o.probe_interval_ms,
        o.last,
        times.join("\n  ")
    )
}

fn kill_blockd_during_write_and_verify(format: &str, throttled: bool) {
    let dir = TempDir::new(&format!("blockd-restart-{format}"));
    let img = image(&dir, format);
    // Every blockd (the first and each restart) is started by this thread while it is in the
    // throttle's cgroup, so each is born there; QEMU is not.
    let throttle = if throttled {
        match Throttle::new(&format!("qemu-restart-{format}"), &img, LIMITS) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("{format}: blockd's I/O is not throttled ({e}): kills will rarely find requests in blockd");
                None
            }
        }
    } else {
        None
    };
    let enter = |t: &Option<Throttle>| t.as_ref().map(|t| t.enter_thread().unwrap_or_else(|e| panic!("{e}")));
    let spec = Spec {
        kind: Kind::Blockd,
        program: flotilla_tests::process::binaries().blockd.clone(),
        image: img.clone(),
        format: format.into(),
        socket: dir.path("vub.sock"),
        log: dir.path("blockd.log"),
        num_queues: 2,
        cache: throttle.as_ref().map(|_| "none".to_string()),
    };
    let in_cgroup = enter(&throttle);
    let mut blockd = Backend::start(spec).unwrap_or_else(|e| panic!("starting blockd: {e}"));
    drop(in_cgroup);
    let mut q = Qemu::boot(&dir.0, &dir.path("vub.sock"), 2, 2).unwrap_or_else(|e| panic!("booting: {e}"));
    let in_cgroup = enter(&throttle);
    let outcome = soak(&mut q, &mut blockd, LOAD, &settings());
    drop(in_cgroup);
    let o = match outcome {
        Ok(o) => o,
        Err(e) => panic!("the rig failed: {e}\nblockd's log:\n{}", blockd.log_tail(40)),
    };
    let report = summary(&o);
    eprintln!("{format}: {report}");
    // Every failure at once: a hang also leaves errors or bad read-backs worth seeing.
    let mut failed = Vec::new();
    if let Some(h) = &o.hang {
        failed.push(format!("guest I/O stalled: {h}"));
    }
    if !o.errors.is_empty() {
        let first: Vec<&String> = o.errors.iter().take(10).collect();
        failed.push(format!("{} I/O errors in the guest, the first: {first:#?}", o.errors.len()));
    }
    if !o.bad.is_empty() {
        let first: Vec<&String> = o.bad.iter().take(10).collect();
        failed.push(format!("{} read-backs differed from what was written, the first: {first:#?}", o.bad.len()));
    }
    if !o.dmesg.is_empty() {
        failed.push(format!("the guest's kernel logged: {:#?}", o.dmesg));
    }
    assert!(failed.is_empty(), "{}\n{report}\nblockd's log:\n{}", failed.join("\n"), blockd.log_tail(60));
    assert!(o.kills.len() >= KILLS, "{report}");
    q.poweroff();
    // A last SIGKILL instead of a clean stop: what the guest saw acknowledged must be in the file.
    blockd.kill().unwrap_or_else(|e| panic!("{e}"));
    let c = check_image(&LOAD, &o.last, &img, format, &dir.0).unwrap_or_else(|e| panic!("checking the image: {e}"));
    if let Some((code, text)) = &c.check {
        // 3: leaked clusters only (allocated, never referenced: what a kill mid-allocation
        // leaves, as with QEMU); 2 would be corruption.
        assert!(*code == 0 || *code == 3, "qemu-img check (exit {code}):\n{text}");
        let said = text.lines().filter(|l| l.contains("were found")).collect::<Vec<_>>().join("; ");
        eprintln!("{format}: qemu-img check exit {code}: {said}");
    }
    assert!(c.mismatches.is_empty(), "the image differs from what the guest wrote: {:#?}\n{report}", c.mismatches);
    // blockd's own view: requests it found recorded in flight and redid after a restart.
    let resubmitted = resubmitted(&blockd);
    eprintln!("{format}: blockd started {} times, resubmitted {resubmitted} requests in all", blockd.starts);
    assert!(
        resubmitted > 0,
        "none of {} kills caught a request in flight in blockd (none resubmitted):\n{report}",
        o.kills.len()
    );
}

#[test]
fn raw_survives_sigkills_during_write_and_verify() {
    kill_blockd_during_write_and_verify("raw", true);
}

#[test]
fn qcow2_survives_sigkills_during_write_and_verify() {
    kill_blockd_during_write_and_verify("qcow2", false);
}
