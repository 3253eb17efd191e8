//! The kill loop. The guest's writers and probe run (see [`super::workload`]); each round waits
//! for a pass line that shows requests in flight on the disk, SIGKILLs the backend at once and
//! starts it again on the same socket, then waits (bounded) until the probe read again and every
//! writer finished a pass after the kill. A writer that never does is a hang: the loop ends there
//! and says so. Then the writers are stopped, the guest's kernel log searched for I/O errors, and
//! (by [`check_image`]) the image's bytes on the host compared with what the writers reported.

use super::backend::Backend;
use super::qemu::{Line, Qemu};
use super::workload::{self, Event, Load, Status};
use super::RigError;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Settings {
    pub kills: usize,
    /// Up to this many more kills while `until` says no (e.g. until the backend's log shows a
    /// kill caught requests in its hands).
    pub extra_kills: usize,
    pub until: Option<fn(&Backend) -> bool>,
    /// A kill follows a pass line that shows at least this many requests in flight on the disk.
    pub min_inflight: u32,
    /// Up to this long for a pass line showing requests in flight (the kill's trigger).
    pub busy_timeout: Duration,
    /// Up to this long after a kill for the probe and every writer to make progress.
    pub progress_timeout: Duration,
}

/// One kill and the recovery after it.
#[derive(Debug, Clone)]
pub struct Kill {
    /// The pass line the kill followed, with the disk's requests in flight it showed.
    pub trigger: String,
    pub inflight: u32,
    /// SIGKILL -> the new backend's socket exists.
    pub listening_ms: f64,
    /// SIGKILL -> the first probe read issued after it completed, by the guest's clock mapped
    /// onto the host's (see `GuestClock`): guest I/O flowing again, late by at most one probe
    /// interval plus the clock's 20 ms slack.
    pub probe_ms: Option<f64>,
    /// SIGKILL -> every writer printed a pass line.
    pub writers_ms: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub kills: Vec<Kill>,
    /// Passes reported (each a write and a verified read-back of one slot).
    pub passes: u64,
    /// Passes whose read-back differed from what was written.
    pub bad: Vec<String>,
    /// Passes where dd failed, and failed probe reads.
    pub errors: Vec<String>,
    /// The stall that ended the loop early, if any.
    pub hang: Option<String>,
    /// Per writer: the last pass whose write succeeded (from its `done` line).
    pub last: Vec<u64>,
    /// Median interval between probe lines before the first kill (the probe's resolution).
    pub probe_interval_ms: f64,
    /// Guest kernel log lines about I/O errors.
    pub dmesg: Vec<String>,
}

struct Progress {
    /// Per writer: when its last pass line arrived.
    writer_at: Vec<Option<Instant>>,
}

/// The guest's uptime mapped onto the host's clock: host = uptime + offset, the offset being
/// the smallest (host arrival - uptime) seen, i.e. the probe line with the quickest way out.
/// Under TCG the guest's clock follows the host's; /proc/uptime counts in 10 ms.
struct GuestClock {
    base: Instant,
    offset: f64,
}

impl GuestClock {
    fn secs(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.base).as_secs_f64()
    }

    fn saw(&mut self, at: Instant, up: f64) {
        self.offset = self.offset.min(self.secs(at) - up);
    }
}

/// A probe read whose start maps to within this of the kill may have started before it.
const CLOCK_SLACK_S: f64 = 0.02;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Run<'a> {
    q: &'a mut Qemu,
    load: Load,
    out: Outcome,
    prog: Progress,
    clock: GuestClock,
}

impl Run<'_> {
    /// Takes the next line (None at `deadline`) and books what it says.
    fn next(&mut self, deadline: Instant) -> Result<Option<(Line, Option<Event>)>, RigError> {
        let Some((at, text)) = self.q.next_line(deadline)? else { return Ok(None) };
        let ev = workload::parse(&text);
        match &ev {
            Some(Event::Pass { w, p, status, .. }) => {
                self.out.passes += 1;
                if let Some(slot) = self.prog.writer_at.get_mut(*w as usize) {
                    *slot = Some(at);
                }
                match status {
                    Status::Ok => {}
                    Status::Bad(s) => self.out.bad.push(format!("writer {w} pass {p}: {s}")),
                    Status::Err(s) => self.out.errors.push(format!("writer {w} pass {p}: {s}")),
                }
            }
            Some(Event::Tick(_, _, end)) => self.clock.saw(at, *end),
            Some(Event::TickErr(s)) => self.out.errors.push(format!("probe: {s}")),
            Some(Event::Done { w, last }) => {
                if let Some(l) = self.out.last.get_mut(*w as usize) {
                    *l = *last;
                }
            }
            Some(Event::TickDone) | None => {}
        }
        Ok(Some(((at, text), ev)))
    }
}

/// Installs and starts the load, runs the kills, stops the load and reads the guest's kernel
/// log. Errors are for the rig failing (QEMU gone, a backend that does not start); what the
/// backend gets wrong (hangs, errors, bad data) is in the [`Outcome`].
pub fn soak(q: &mut Qemu, backend: &mut Backend, load: Load, s: &Settings) -> Result<Outcome, RigError> {
    workload::install(q)?;
    q.send(&load.start_line("/dev/vda"))?;
    let n = load.writers as usize;
    let mut run = Run {
        q,
        load,
        out: Outcome { last: vec![0; n], ..Default::default() },
        prog: Progress { writer_at: vec![None; n] },
        clock: GuestClock { base: Instant::now(), offset: f64::INFINITY },
    };
    warm_up(&mut run)?;
    let mut i = 0;
    while i < s.kills || (i < s.kills + s.extra_kills && s.until.is_some_and(|done| !done(backend))) {
        i += 1;
        match kill_once(&mut run, backend, s, i - 1)? {
            Ok(k) => run.out.kills.push(k),
            Err(hang) => {
                run.out.hang = Some(hang);
                return Ok(run.out);
            }
        }
    }
    stop(&mut run)?;
    run.out.dmesg = dmesg_errors(run.q)?;
    Ok(run.out)
}

/// Until every writer passed twice; measures the probe's interval meanwhile.
fn warm_up(run: &mut Run) -> Result<(), RigError> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut passes = vec![0u32; run.load.writers as usize];
    let mut ticks = Vec::new();
    while passes.iter().any(|&p| p < 2) {
        let Some((_, ev)) = run.next(deadline)? else {
            return Err(run.q.guest_error(&format!("the writers did not start (passes per writer {passes:?})")));
        };
        match ev {
            Some(Event::Pass { w, .. }) => passes[w as usize] += 1,
            Some(Event::Tick(_, _, end)) => ticks.push(end),
            _ => {}
        }
    }
    let mut gaps: Vec<f64> = ticks.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect();
    run.out.probe_interval_ms = median(&mut gaps);
    Ok(())
}

/// One kill; Err(description) for a stall.
fn kill_once(run: &mut Run, backend: &mut Backend, s: &Settings, i: usize) -> Result<Result<Kill, String>, RigError> {
    let deadline = Instant::now() + s.busy_timeout;
    let (trigger, inflight) = loop {
        match run.next(deadline)? {
            Some(((_, text), Some(Event::Pass { reads, writes, .. }))) if reads + writes >= s.min_inflight => {
                break (text, reads + writes)
            }
            Some(_) => {}
            None => {
                return Ok(Err(format!(
                    "before kill {}: no pass line showing {} or more requests in flight within {:?} \
                     (not a hang if pass lines kept coming)",
                    i + 1,
                    s.min_inflight,
                    s.busy_timeout
                )))
            }
        }
    };
    let killed = Instant::now();
    backend.kill_and_restart()?;
    let listening_ms = ms(killed.elapsed());
    let deadline = killed + s.progress_timeout;
    let mut probe_ms = None;
    let mut writers_ms = None;
    while probe_ms.is_none() || writers_ms.is_none() {
        let Some(((at, _), ev)) = run.next(deadline)? else {
            let stuck: Vec<usize> =
                (0..run.prog.writer_at.len()).filter(|&w| run.prog.writer_at[w].is_none_or(|t| t <= killed)).collect();
            return Ok(Err(format!(
                "kill {}: {:?} after the SIGKILL, writers {stuck:?}{} had made no progress (trigger: {trigger})",
                i + 1,
                s.progress_timeout,
                if probe_ms.is_none() { " and the probe" } else { "" }
            )));
        };
        if let Some(Event::Tick(_, start, end)) = ev {
            // On the host's clock, from the kill (not when the line arrived). Only a read issued
            // after the kill counts: one the dying backend completed can be seen by the guest
            // tens of ms later under TCG. The one in flight at the kill ended a read earlier.
            let from_kill = |t: f64| t + run.clock.offset - run.clock.secs(killed);
            if probe_ms.is_none() && from_kill(start) > CLOCK_SLACK_S {
                probe_ms = Some(from_kill(end) * 1000.0);
            }
        }
        if writers_ms.is_none() && run.prog.writer_at.iter().all(|t| t.is_some_and(|t| t > killed)) {
            writers_ms = Some(ms(at - killed));
        }
    }
    Ok(Ok(Kill { trigger, inflight, listening_ms, probe_ms, writers_ms }))
}

/// Tells the writers to stop and waits for each one's `done` line and the probe's.
fn stop(run: &mut Run) -> Result<(), RigError> {
    run.q.send("touch /tmp/stop")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done = vec![false; run.load.writers as usize];
    let mut probe = false;
    while !probe || done.iter().any(|d| !d) {
        match run.next(deadline)? {
            Some((_, Some(Event::Done { w, .. }))) => done[w as usize] = true,
            Some((_, Some(Event::TickDone))) => probe = true,
            Some(_) => {}
            None => {
                return Err(run.q.guest_error(&format!("the writers did not stop (done: {done:?}, probe {probe})")))
            }
        }
    }
    Ok(())
}

/// The guest kernel's log lines about I/O errors on the disk.
fn dmesg_errors(q: &mut Qemu) -> Result<Vec<String>, RigError> {
    q.send("dmesg | grep -iE 'i/o error|blk_update|buffer i/o|critical|hung_task|blocked for more' | sed 's/^/DMESG: /'; echo \"DM\"\"END\"")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    loop {
        match q.next_line(deadline)? {
            Some((_, l)) if l.starts_with("DMEND") => return Ok(lines),
            Some((_, l)) => {
                if let Some(m) = l.strip_prefix("DMESG: ") {
                    lines.push(m.to_string());
                }
            }
            None => return Err(q.guest_error("no answer to dmesg")),
        }
    }
}

/// What the host found in the image once the backend was gone.
#[derive(Debug, Clone)]
pub struct ImageCheck {
    /// Slots that do not hold what the writers reported (see [`Load::mismatches`]).
    pub mismatches: Vec<String>,
    /// qcow2: `qemu-img check`'s exit status (0 clean, 3 leaked clusters only) and output.
    pub check: Option<(i32, String)>,
}

/// Reads the image as a raw disk (qcow2 through `qemu-img convert`) and compares it with the
/// bytes the writers' last passes put there.
pub fn check_image(
    load: &Load,
    last: &[u64],
    image: &Path,
    format: &str,
    scratch: &Path,
) -> Result<ImageCheck, RigError> {
    let mut check = None;
    let raw = if format == "qcow2" {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(image)
            .output()
            .map_err(RigError::io("running qemu-img check"))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        check = Some((out.status.code().unwrap_or(-1), text));
        let raw = scratch.join("converted.raw");
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(image)
            .arg(&raw)
            .output()
            .map_err(RigError::io("running qemu-img convert"))?;
        if !out.status.success() {
            return Err(RigError::Process {
                what: "qemu-img convert failed".into(),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        raw
    } else {
        image.to_path_buf()
    };
    let got = std::fs::read(&raw).map_err(RigError::io(format!("reading {}", raw.display())))?;
    let mismatches = load.mismatches(&load.expected(last), &got);
    Ok(ImageCheck { mismatches, check })
}
