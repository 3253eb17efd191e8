//! The guest's side: `tests/kit/write-verify.sh` typed into the shell, its output lines parsed,
//! and the bytes the disk must hold once the writers stopped, computed from the last pass each
//! writer reported (the independent truth the host compares the image with).

use super::qemu::Qemu;
use super::RigError;

/// The guest script (see its header for the layout and the lines it prints).
pub const SCRIPT: &str = include_str!("../../kit/write-verify.sh");

/// What the writers do: `writers` in parallel, each pass `blocks` blocks of `kib` KiB to a slot
/// of its own among `slots` (a multiple of `writers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub writers: u32,
    pub blocks: u32,
    pub kib: u32,
    pub slots: u32,
}

impl Load {
    pub fn slot_bytes(&self) -> u64 {
        u64::from(self.blocks) * u64::from(self.kib) * 1024
    }

    /// The disk the load covers (the image is made this size).
    pub fn disk_bytes(&self) -> u64 {
        u64::from(self.slots) * self.slot_bytes()
    }

    /// The shell line that starts the writers and the probe on `dev`.
    pub fn start_line(&self, dev: &str) -> String {
        format!("wv {} {} {} {} {dev}", self.writers, self.blocks, self.kib, self.slots)
    }

    /// The slot pass `p` (from 1) of writer `w` writes.
    pub fn slot(&self, w: u32, p: u64) -> u64 {
        ((p - 1) * u64::from(self.writers) + u64::from(w)) % u64::from(self.slots)
    }

    /// Block `b` of pass `p` of writer `w`: the script's `yes "FLOTILLA w= p= b=" | head -c`.
    pub fn block(&self, w: u32, p: u64, b: u32) -> Vec<u8> {
        let line = format!("FLOTILLA w={w} p={p} b={b}\n");
        line.bytes().cycle().take(self.kib as usize * 1024).collect()
    }

    /// The whole disk as it must be when writer `w`'s last successful pass was `last[w]`
    /// (never-written slots read as zeroes).
    pub fn expected(&self, last: &[u64]) -> Vec<u8> {
        let mut disk = vec![0u8; self.disk_bytes() as usize];
        let slot = self.slot_bytes() as usize;
        let block = self.kib as usize * 1024;
        for (w, &lastp) in (0u32..).zip(last) {
            // Only the last pass that landed in each slot counts; passes wrap every
            // slots/writers passes.
            let first = lastp.saturating_sub(u64::from(self.slots / self.writers)) + 1;
            for p in first..=lastp {
                let at = self.slot(w, p) as usize * slot;
                for b in 0..self.blocks {
                    let off = at + b as usize * block;
                    disk[off..off + block].copy_from_slice(&self.block(w, p, b));
                }
            }
        }
        disk
    }

    /// Slots whose bytes differ from `want`, each described by what it should and does hold.
    pub fn mismatches(&self, want: &[u8], got: &[u8]) -> Vec<String> {
        let slot = self.slot_bytes() as usize;
        let mut out = Vec::new();
        for s in 0..self.slots as usize {
            let (a, b) = (&want[s * slot..(s + 1) * slot], got.get(s * slot..(s + 1) * slot).unwrap_or(&[]));
            if a != b {
                let head = |x: &[u8]| String::from_utf8_lossy(&x[..x.len().min(28)]).replace('\n', "\\n");
                out.push(format!("slot {s}: want {:?}, have {:?}", head(a), head(b)));
            }
        }
        out
    }
}

/// How a pass ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The read-back differed from what was written (cmp's line).
    Bad(String),
    /// dd failed (which one and its message).
    Err(String),
}

/// One line of the script's output.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Pass {
        w: u32,
        p: u64,
        status: Status,
        reads: u32,
        writes: u32,
    },
    Done {
        w: u32,
        last: u64,
    },
    /// A probe read done: its number and the guest's uptime (s) before and after it.
    Tick(u64, f64, f64),
    TickErr(String),
    TickDone,
}

fn field<'a>(words: &[&'a str], key: &str) -> Option<&'a str> {
    words.iter().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Parses a line the script printed; None for anything else (echoed input, kernel messages).
pub fn parse(line: &str) -> Option<Event> {
    if let Some(rest) = line.strip_prefix("WT ") {
        return Some(match rest.trim() {
            "done" => Event::TickDone,
            r if r.starts_with("ERR") => Event::TickErr(r.to_string()),
            r => {
                let mut f = r.split_whitespace();
                let (n, t0, t1) = (f.next()?, f.next()?, f.next()?);
                Event::Tick(n.parse().ok()?, t0.parse().ok()?, t1.parse().ok()?)
            }
        });
    }
    let rest = line.strip_prefix("WV ")?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let w = field(&words, "w")?.parse().ok()?;
    if words.get(1) == Some(&"done") {
        return Some(Event::Done { w, last: field(&words, "p")?.parse().ok()? });
    }
    let p = field(&words, "p")?.parse().ok()?;
    let (reads, writes) = field(&words, "if")?.split_once('/')?;
    let (reads, writes) = (reads.parse().ok()?, writes.parse().ok()?);
    // What sits between `p=` and `if=` is the status.
    let body = rest.split_once(&format!("p={p} "))?.1.rsplit_once(" if=")?.0.trim().to_string();
    let status = match body.as_str() {
        "ok" => Status::Ok,
        b if b.starts_with("BAD") => Status::Bad(b.to_string()),
        b => Status::Err(b.to_string()),
    };
    Some(Event::Pass { w, p, status, reads, writes })
}

/// Types the script into the guest's shell (comments dropped) as /tmp/wv.sh and sources it.
pub fn install(q: &mut Qemu) -> Result<(), RigError> {
    let body: String = SCRIPT
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    q.send("cat > /tmp/wv.sh <<'FLOTILLA_EOF'")?;
    for l in body.lines() {
        q.send(l)?;
        // The tty's input queue is 4 KiB; do not outrun the shell.
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    q.send("FLOTILLA_EOF")?;
    let got = q.ask("WVLEN", "R=$(wc -c < /tmp/wv.sh)")?;
    if got != body.len().to_string() {
        return Err(q.guest_error(&format!("/tmp/wv.sh holds {got} bytes, {} were typed", body.len())));
    }
    let ok = q.ask("WVDEF", ". /tmp/wv.sh; type wv >/dev/null; R=$?")?;
    if ok != "0" {
        return Err(q.guest_error("sourcing /tmp/wv.sh did not define wv"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        assert_eq!(
            parse("WV w=2 p=17 ok if=0/3"),
            Some(Event::Pass { w: 2, p: 17, status: Status::Ok, reads: 0, writes: 3 })
        );
        assert_eq!(
            parse("WV w=0 p=3 BAD /tmp/wvp0 /tmp/wvr0 differ: char 5, line 1 if=1/0"),
            Some(Event::Pass {
                w: 0,
                p: 3,
                status: Status::Bad("BAD /tmp/wvp0 /tmp/wvr0 differ: char 5, line 1".into()),
                reads: 1,
                writes: 0
            })
        );
        assert!(matches!(
            parse("WV w=1 p=4 ERR write dd: error writing '/dev/vda': Input/output error if=0/0"),
            Some(Event::Pass { status: Status::Err(_), .. })
        ));
        assert_eq!(parse("WV w=3 done p=40"), Some(Event::Done { w: 3, last: 40 }));
        assert_eq!(parse("WT 12 31.55 31.57"), Some(Event::Tick(12, 31.55, 31.57)));
        assert_eq!(parse("WT 12"), None);
        assert_eq!(parse("WT done"), Some(Event::TickDone));
        assert_eq!(parse("        echo \"WV w=$w p=$p $st if=$ri/$wi\""), None);
    }

    #[test]
    fn expected_disk_keeps_the_last_pass_of_each_slot() {
        let l = Load { writers: 2, blocks: 2, kib: 4, slots: 4 };
        // Writer 0: passes 1..=3 go to slots 0, 2, 0 (wrapped); writer 1: pass 1 to slot 1.
        let d = l.expected(&[3, 1]);
        let slot = l.slot_bytes() as usize;
        assert!(d.starts_with(b"FLOTILLA w=0 p=3 b=0\n"));
        assert!(d[slot..].starts_with(b"FLOTILLA w=1 p=1 b=0\n"));
        assert!(d[2 * slot..].starts_with(b"FLOTILLA w=0 p=2 b=0\n"));
        assert!(d[2 * slot + 4096..].starts_with(b"FLOTILLA w=0 p=2 b=1\n"));
        assert!(d[3 * slot..].iter().all(|&b| b == 0));
        assert_eq!(l.mismatches(&d, &d), Vec::<String>::new());
        let mut e = d.clone();
        e[slot + 7] ^= 1;
        assert_eq!(l.mismatches(&d, &e).len(), 1);
    }
}
