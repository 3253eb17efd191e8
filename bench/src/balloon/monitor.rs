//! A QMP client for the balloon part: commands with arguments, and every event kept with the
//! moment its line arrived. A reader thread stamps each line as it is read, so that the
//! time of a `BALLOON_CHANGE` does not depend on when the bench gets round to looking.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::BenchError;

const CONNECT_POLL: Duration = Duration::from_millis(10);
/// A line longer than this is not a QMP message the bench can use.
const MAX_LINE: usize = 1 << 20;

pub struct Monitor {
    what: String,
    writer: UnixStream,
    lines: Receiver<(Instant, Result<Value, String>)>,
    /// Events read so far, with their arrival times, in order.
    pub events: Vec<(Instant, Value)>,
}

impl Monitor {
    /// Connects (retrying while the socket is absent or not listening, until `deadline`), reads
    /// the greeting and negotiates capabilities.
    pub fn connect(what: &str, path: &Path, deadline: Instant) -> Result<Monitor, BenchError> {
        let io = |action: &str, e: std::io::Error| BenchError::Io { what: format!("{what}: {action}"), source: e };
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(CONNECT_POLL)
                }
                Err(e) => return Err(io(&format!("connecting to {}", path.display()), e)),
            }
        };
        let reader = stream.try_clone().map_err(|e| io("duplicating the socket", e))?;
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("balloon-qmp".into())
            .spawn(move || {
                for line in BufReader::new(reader).split(b'\n') {
                    let at = Instant::now();
                    let msg = match line {
                        Ok(l) if l.len() > MAX_LINE => Err(format!("a line of {} bytes", l.len())),
                        Ok(l) => serde_json::from_slice::<Value>(&l)
                            .map_err(|e| format!("not JSON ({e}): {:?}", String::from_utf8_lossy(&l))),
                        Err(e) => Err(format!("reading: {e}")),
                    };
                    let stop = msg.is_err();
                    if tx.send((at, msg)).is_err() || stop {
                        return;
                    }
                }
            })
            .map_err(|e| io("starting the reader thread", e))?;
        let mut m = Monitor { what: what.into(), writer: stream, lines: rx, events: Vec::new() };
        let (_, greeting) = m.next(deadline, "the greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(m.error("reading the greeting", format!("not a QMP greeting: {greeting}")));
        }
        m.execute("qmp_capabilities", json!({}), deadline)?;
        Ok(m)
    }

    fn error(&self, doing: &str, detail: impl Into<String>) -> BenchError {
        BenchError::Qmp { what: format!("{}: {doing}", self.what), detail: detail.into() }
    }

    /// The next message of any kind.
    fn next(&mut self, deadline: Instant, waiting_for: &str) -> Result<(Instant, Value), BenchError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok((at, Ok(v))) => Ok((at, v)),
            Ok((_, Err(e))) => Err(self.error(&format!("waiting for {waiting_for}"), e)),
            Err(RecvTimeoutError::Timeout) => {
                Err(self.error(&format!("waiting for {waiting_for}"), "no answer in time"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.error(&format!("waiting for {waiting_for}"), "the monitor closed the connection"))
            }
        }
    }

    /// Sends a command; returns its `return` value and when the reply arrived. Events read
    /// meanwhile are kept in [`Monitor::events`]; an `error` reply is an error.
    pub fn execute(&mut self, command: &str, args: Value, deadline: Instant) -> Result<(Value, Instant), BenchError> {
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": args}))
            .map_err(|e| self.error(command, format!("encoding the request: {e}")))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| BenchError::Io { what: format!("{}: sending {command}", self.what), source: e })?;
        loop {
            let (at, v) = self.next(deadline, &format!("the reply to {command}"))?;
            if v.get("event").is_some() {
                self.events.push((at, v));
            } else if let Some(r) = v.get("return") {
                return Ok((r.clone(), at));
            } else {
                return Err(self.error(command, format!("answered {v}")));
            }
        }
    }

    /// Waits until `deadline` for an event named `name` that `want` accepts, looking first at
    /// the events already read; returns when it arrived and its data. Events before it are kept.
    pub fn wait_event(
        &mut self,
        name: &str,
        want: impl Fn(&Value) -> bool,
        deadline: Instant,
    ) -> Result<(Instant, Value), BenchError> {
        let hit = |v: &Value| v["event"] == name && want(&v["data"]);
        if let Some((at, v)) = self.events.iter().find(|(_, v)| hit(v)) {
            return Ok((*at, v["data"].clone()));
        }
        loop {
            let (at, v) = self.next(deadline, &format!("the event {name}"))?;
            if v.get("event").is_none() {
                return Err(self.error(&format!("waiting for {name}"), format!("a reply nobody asked for: {v}")));
            }
            let found = hit(&v);
            let data = v["data"].clone();
            self.events.push((at, v));
            if found {
                return Ok((at, data));
            }
        }
    }

    /// Forgets the events read so far (before a new measurement).
    pub fn clear_events(&mut self) {
        self.events.clear();
    }
}
