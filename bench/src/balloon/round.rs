//! One measured round on one VMM: boot the test guest with a virtio-balloon, make its spare
//! memory really allocated on the host (`touch`), inflate the balloon by the reclaim size over
//! QMP and time it, measure the host memory before and after, then deflate and check that
//! the guest reads its memory back intact (`touchcheck`). The VM is stopped (its whole process
//! group killed and reaped) on every path out, by [`VmProcess`]'s drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::hostmem::{self, Snapshot};
use super::monitor::Monitor;
use crate::error::BenchError;
use crate::vmproc::{Spec, VmProcess};

pub const MIB: u64 = 1 << 20;
pub const PAGE: u64 = 4096;

/// What one round does; the same for both VMMs.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub mem_mib: u64,
    pub touch_mib: u64,
    pub reclaim_mib: u64,
    /// Boot to READY, and each guest command but the long ones.
    pub timeout: Duration,
    /// Inflating or deflating, to the guest's `BALLOONED` line and the last event.
    pub balloon_timeout: Duration,
    /// `touch` and `touchcheck`: they walk all the touched memory, slowly where the guest's
    /// instructions are emulated (kvm_pvm).
    pub walk_timeout: Duration,
}

impl Plan {
    /// The QMP `balloon` target, in bytes: the guest keeps `mem - reclaim`.
    pub fn target_bytes(&self) -> u64 {
        (self.mem_mib - self.reclaim_mib) * MIB
    }
    /// The guest's `actual` once inflated, in 4 KiB pages.
    pub fn reclaim_pages(&self) -> u64 {
        self.reclaim_mib * MIB / PAGE
    }
}

/// One round's raw figures.
#[derive(Debug, Clone)]
pub struct Sample {
    /// QMP `balloon` sent -> its reply.
    pub command_ms: f64,
    /// QMP `balloon` sent -> the guest's `BALLOONED actual=<reclaim pages>`.
    pub ballooned_ms: f64,
    /// QMP `balloon` sent -> the `BALLOON_CHANGE` carrying the target.
    pub event_ms: f64,
    /// `BALLOON_CHANGE` events seen during the inflation.
    pub events: usize,
    /// The guest's `touch`, answer to answer.
    pub touch_ms: f64,
    /// Deflating back to the full size, command to `BALLOONED actual=0`.
    pub deflate_ms: f64,
    pub touchcheck: String,
    pub touchcheck_ms: f64,
    pub before: Snapshot,
    pub after: Snapshot,
}

impl Sample {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "command_ms": self.command_ms,
            "ballooned_ms": self.ballooned_ms,
            "event_ms": self.event_ms,
            "events": self.events,
            "touch_ms": self.touch_ms,
            "deflate_ms": self.deflate_ms,
            "touchcheck": self.touchcheck,
            "touchcheck_ms": self.touchcheck_ms,
            "before": self.before.to_json(),
            "after": self.after.to_json(),
        })
    }
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1e3
}

/// `key=<u64>` in a guest line.
pub fn field_u64(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?.parse().ok()
}

/// Waits until `deadline` for a guest line that `want` accepts; returns its arrival time and
/// the line itself.
fn expect_line(
    p: &mut VmProcess,
    what: &str,
    want: impl Fn(&str) -> bool,
    deadline: Instant,
) -> Result<(Instant, String), BenchError> {
    // `expect` takes a `Fn`; the matching line is kept through a RefCell.
    let hit = std::cell::RefCell::new(String::new());
    let at = p.expect(
        what,
        |l| {
            let ok = want(l);
            if ok {
                *hit.borrow_mut() = l.trim().to_string();
            }
            ok
        },
        deadline,
    )?;
    Ok((at, hit.into_inner()))
}

/// Sends a guest command and waits for the line starting with `answer` (or an `ERR` line,
/// which is an error); returns when it was sent, when the answer arrived, and the answer.
fn command(
    p: &mut VmProcess,
    cmd: &str,
    answer: &str,
    timeout: Duration,
) -> Result<(Instant, Instant, String), BenchError> {
    let sent = Instant::now();
    p.send(cmd)?;
    let (at, line) = expect_line(
        p,
        &format!("'{answer}' (the answer to '{cmd}')"),
        |l| l.starts_with(answer) || l.starts_with("ERR "),
        sent + timeout,
    )?;
    if line.starts_with("ERR ") {
        return Err(BenchError::Guest { what: format!("the guest's answer to '{cmd}'"), detail: line });
    }
    Ok((sent, at, line))
}

/// Waits for `BALLOONED actual=<pages>`; other lines are skipped, but an `ERR` or a `WARN`
/// from the balloon driver ends the wait with that line.
fn wait_ballooned(p: &mut VmProcess, pages: u64, deadline: Instant) -> Result<Instant, BenchError> {
    let want = format!("BALLOONED actual={pages}");
    let (at, line) = expect_line(
        p,
        &format!("'{want}'"),
        |l| l.trim() == want || l.starts_with("ERR ") || l.starts_with("WARN balloon"),
        deadline,
    )?;
    if line != want {
        return Err(BenchError::Guest {
            what: format!("waiting for '{want}'"),
            detail: format!("the guest said {line:?}"),
        });
    }
    Ok(at)
}

/// One round: the VM described by `spec` (its `-qmp` socket at `qmp`).
pub fn run(spec: &Spec, qmp: &Path, plan: &Plan) -> Result<Sample, BenchError> {
    let _ = std::fs::remove_file(qmp);
    let mut p = VmProcess::spawn(spec)?;
    let boot_deadline = p.started + plan.timeout;
    p.expect("READY", |l| l.trim() == "READY", boot_deadline)?;
    let mut mon = Monitor::connect(&format!("{} QMP", spec.label), qmp, boot_deadline)?;

    let (_, _, init) = command(&mut p, "balloon", "BALLOON ", plan.timeout)?;
    if field_u64(&init, "num_pages") != Some(0) {
        return Err(BenchError::Guest { what: "the balloon at start".into(), detail: format!("not empty: {init}") });
    }
    let (t_sent, t_done, touched) =
        command(&mut p, &format!("touch {}", plan.touch_mib), "TOUCHED", plan.walk_timeout)?;
    let touched_bytes = touched.split_whitespace().nth(1).and_then(|b| b.parse::<u64>().ok());
    if touched_bytes != Some(plan.touch_mib * MIB) {
        return Err(BenchError::Guest {
            what: format!("touch {}", plan.touch_mib),
            detail: format!("the guest touched less than asked (its balloon pool is smaller?): {touched}"),
        });
    }
    let touch_ms = ms(t_sent, t_done);

    let before = hostmem::snapshot(p.pid())?;
    mon.clear_events();
    let target = plan.target_bytes();
    let t0 = Instant::now();
    let deadline = t0 + plan.balloon_timeout;
    let (_, replied) = mon.execute("balloon", json!({"value": target}), deadline)?;
    let ballooned = wait_ballooned(&mut p, plan.reclaim_pages(), deadline)?;
    let (event, _) = mon.wait_event("BALLOON_CHANGE", |d| d["actual"].as_u64() == Some(target), deadline)?;
    let events = mon.events.iter().filter(|(_, v)| v["event"] == "BALLOON_CHANGE").count();
    let after = hostmem::snapshot(p.pid())?;

    // Give it all back and check that the guest's memory is intact (or zero where the host
    // discarded it).
    let d0 = Instant::now();
    let deadline = d0 + plan.balloon_timeout;
    mon.execute("balloon", json!({"value": plan.mem_mib * MIB}), deadline)?;
    let deflated = wait_ballooned(&mut p, 0, deadline)?;
    let (c_sent, c_done, check) = command(&mut p, "touchcheck", "TOUCHCHECK", plan.walk_timeout)?;
    if !check.starts_with("TOUCHCHECK ok ") {
        return Err(BenchError::Guest { what: "touchcheck after deflating".into(), detail: check });
    }
    p.stop()?;
    Ok(Sample {
        command_ms: ms(t0, replied),
        ballooned_ms: ms(t0, ballooned),
        event_ms: ms(t0, event),
        events,
        touch_ms,
        deflate_ms: ms(d0, deflated),
        touchcheck: check,
        touchcheck_ms: ms(c_sent, c_done),
        before,
        after,
    })
}

/// Where a side's QMP socket lives for the bench.
pub fn socket_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.qmp"))
}
