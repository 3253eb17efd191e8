//! A QMP client made for timing: blocking I/O on a unix socket, one request line out, the
//! reply line in, nothing parsed while the clock runs.
//!
//! A round trip is timed from just before the request is written to the arrival of the `\n`
//! that ends its reply. Replies are told from events by their first member only
//! ([`classify`]: QEMU and the gateway both write `{"return": ...`, `{"error": ...` and
//! `{"timestamp": ..., "event": ...}`), so a 6 KiB `query-commands` answer costs the client a
//! copy, not a JSON parse. Before any timing, each command's answer is parsed in full and
//! checked ([`check_reply`]); every connection's negotiation is checked too.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::BenchError;

/// How long one reply may take; every read is bounded by it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// A reply longer than this is an error (no QMP reply of the commands measured comes near it).
const MAX_LINE: usize = 16 << 20;
const CONNECT_POLL: Duration = Duration::from_millis(5);

/// What a line from the monitor is, by its first member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    Greeting,
    Return,
    Error,
    Event,
    Other,
}

/// Classifies a line by the name of its first member, without parsing the rest.
pub fn classify(line: &[u8]) -> LineKind {
    let t = line.trim_ascii_start();
    let Some(t) = t.strip_prefix(b"{") else { return LineKind::Other };
    let t = t.trim_ascii_start();
    for (key, kind) in [
        (&b"\"return\""[..], LineKind::Return),
        (b"\"error\"", LineKind::Error),
        (b"\"timestamp\"", LineKind::Event),
        (b"\"event\"", LineKind::Event),
        (b"\"QMP\"", LineKind::Greeting),
    ] {
        if t.starts_with(key) {
            return kind;
        }
    }
    LineKind::Other
}

/// The greeting's version and capabilities, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// `major.minor.micro` of `QMP.version.qemu`.
    pub version: String,
    pub package: String,
    pub capabilities: Vec<String>,
}

/// Parses `{"QMP": {"version": {"qemu": {...}, "package": ...}, "capabilities": [...]}}`.
pub fn parse_greeting(line: &str) -> Result<Greeting, String> {
    let v: Value = serde_json::from_str(line.trim()).map_err(|e| format!("not JSON ({e}): {line:?}"))?;
    let qmp = v.get("QMP").ok_or_else(|| format!("no \"QMP\" member: {line:?}"))?;
    let q = &qmp["version"]["qemu"];
    let n = |k: &str| q[k].as_i64().ok_or_else(|| format!("no version.qemu.{k}: {line:?}"));
    let version = format!("{}.{}.{}", n("major")?, n("minor")?, n("micro")?);
    let package = qmp["version"]["package"].as_str().unwrap_or_default().to_string();
    let capabilities = match &qmp["capabilities"] {
        Value::Array(a) => a.iter().map(|c| c.as_str().unwrap_or_default().to_string()).collect(),
        _ => return Err(format!("no capabilities list: {line:?}")),
    };
    Ok(Greeting { version, package, capabilities })
}

/// Checks a full reply to `command`: a `return`, of the shape the command has. `query-status`
/// answers a `StatusInfo`; `query-commands` a list that names at least itself.
pub fn check_reply(command: &str, reply: &Value) -> Result<(), String> {
    if let Some(e) = reply.get("error") {
        return Err(format!("{command} failed: {e}"));
    }
    let Some(r) = reply.get("return") else { return Err(format!("{command}: not a reply: {reply}")) };
    let ok = match command {
        "query-status" => r["status"].is_string() && r["running"].is_boolean(),
        "query-commands" => r
            .as_array()
            .is_some_and(|l| l.iter().any(|c| c["name"] == command) && l.iter().all(|c| c["name"].is_string())),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{command}: unexpected answer {r}"))
    }
}

/// The request line for a command without arguments (no `id`: both monitors answer alike).
pub fn request_line(command: &str) -> Vec<u8> {
    format!("{{\"execute\": \"{command}\"}}\n").into_bytes()
}

/// One timed series on one connection.
#[derive(Debug, Clone)]
pub struct Series {
    /// Round-trip times in nanoseconds, in the order the replies came.
    pub latencies_ns: Vec<u64>,
    /// Just before the first request was written.
    pub started: Instant,
    /// When the last reply arrived.
    pub finished: Instant,
    /// Length of the last reply line, `\r\n` included.
    pub reply_bytes: usize,
}

pub struct QmpClient {
    what: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: Vec<u8>,
    /// Events read (and skipped) while waiting for replies.
    pub events: u64,
}

impl QmpClient {
    /// Connects (retrying while the socket is absent or not listening yet, until `deadline`)
    /// and reads the greeting.
    pub fn connect(what: &str, path: &Path, deadline: Instant) -> Result<(QmpClient, Greeting), BenchError> {
        let io = |action: &str, e: std::io::Error| BenchError::Io { what: format!("{what}: {action}"), source: e };
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(CONNECT_POLL)
                }
                Err(e) => return Err(io(&format!("connecting to {}", path.display()), e)),
            }
        };
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| io("setting the read timeout", e))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(|e| io("setting the write timeout", e))?;
        let writer = stream.try_clone().map_err(|e| io("duplicating the socket", e))?;
        let mut c =
            QmpClient { what: what.to_string(), reader: BufReader::new(stream), writer, line: Vec::new(), events: 0 };
        c.read_line("the greeting")?;
        let text = String::from_utf8_lossy(&c.line).into_owned();
        let greeting = parse_greeting(&text).map_err(|d| c.error("reading the greeting", d))?;
        Ok((c, greeting))
    }

    fn error(&self, doing: &str, detail: impl Into<String>) -> BenchError {
        BenchError::Qmp { what: format!("{}: {doing}", self.what), detail: detail.into() }
    }

    /// Reads one line into `self.line` (its `\n` included).
    fn read_line(&mut self, waiting_for: &str) -> Result<(), BenchError> {
        self.line.clear();
        let r = (&mut self.reader).take(MAX_LINE as u64).read_until(b'\n', &mut self.line);
        match r {
            Ok(0) => Err(self.error(&format!("waiting for {waiting_for}"), "the monitor closed the connection")),
            Ok(_) if self.line.last() != Some(&b'\n') => Err(self.error(
                &format!("waiting for {waiting_for}"),
                format!("no end of line within {} bytes", self.line.len()),
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(BenchError::Io { what: format!("{}: waiting for {waiting_for}", self.what), source: e }),
        }
    }

    /// Reads lines until one is not an event; returns its kind.
    fn next_reply(&mut self, waiting_for: &str) -> Result<LineKind, BenchError> {
        loop {
            self.read_line(waiting_for)?;
            match classify(&self.line) {
                LineKind::Event => self.events += 1,
                k => return Ok(k),
            }
        }
    }

    fn send(&mut self, request: &[u8]) -> Result<(), BenchError> {
        self.writer
            .write_all(request)
            .map_err(|e| BenchError::Io { what: format!("{}: sending a request", self.what), source: e })
    }

    /// Sends one request and parses its whole reply (not for timing).
    pub fn execute(&mut self, command: &str) -> Result<Value, BenchError> {
        self.send(&request_line(command))?;
        self.next_reply(command)?;
        let text = String::from_utf8_lossy(&self.line).into_owned();
        serde_json::from_str(text.trim()).map_err(|e| self.error(command, format!("reply is not JSON ({e}): {text:?}")))
    }

    /// `qmp_capabilities`, which both monitors want before any other command.
    pub fn negotiate(&mut self) -> Result<(), BenchError> {
        let r = self.execute("qmp_capabilities")?;
        if r.get("return").is_none() {
            return Err(self.error("negotiating capabilities", format!("answered {r}")));
        }
        Ok(())
    }

    /// Sends `count` requests, at most `depth` unanswered at a time (1: one round trip after
    /// the other), and times each from its write to its reply. Fails on an error reply, a
    /// reply that is not one, or when `deadline` passes.
    pub fn time_series(
        &mut self,
        request: &[u8],
        count: usize,
        depth: usize,
        deadline: Instant,
    ) -> Result<Series, BenchError> {
        let depth = depth.max(1);
        let mut latencies_ns = Vec::with_capacity(count);
        let mut in_flight: VecDeque<Instant> = VecDeque::with_capacity(depth);
        let mut sent = 0;
        let started = Instant::now();
        while sent < count && in_flight.len() < depth {
            in_flight.push_back(Instant::now());
            self.send(request)?;
            sent += 1;
        }
        while let Some(t0) = in_flight.pop_front() {
            let kind = self.next_reply("a reply")?;
            let t1 = Instant::now();
            if kind != LineKind::Return {
                let text = String::from_utf8_lossy(&self.line).into_owned();
                return Err(self.error("timing round trips", format!("reply {} was not a return: {text:?}", sent)));
            }
            latencies_ns.push(t1.duration_since(t0).as_nanos() as u64);
            if t1 > deadline {
                return Err(self.error(
                    "timing round trips",
                    format!("deadline passed after {} of {count} replies", latencies_ns.len()),
                ));
            }
            if sent < count {
                in_flight.push_back(Instant::now());
                self.send(request)?;
                sent += 1;
            }
        }
        Ok(Series { latencies_ns, started, finished: Instant::now(), reply_bytes: self.line.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_are_classified_by_their_first_member() {
        assert_eq!(classify(b"{\"return\": {}}\r\n"), LineKind::Return);
        assert_eq!(classify(b"{\"return\":[{\"name\":\"x\"}]}\r\n"), LineKind::Return);
        assert_eq!(classify(b"  { \"error\": {\"class\": \"GenericError\"}}\r\n"), LineKind::Error);
        assert_eq!(
            classify(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n"),
            LineKind::Event
        );
        assert_eq!(classify(b"{\"event\": \"STOP\"}"), LineKind::Event);
        assert_eq!(classify(b"{\"QMP\": {}}"), LineKind::Greeting);
        assert_eq!(classify(b"[]"), LineKind::Other);
        assert_eq!(classify(b"{\"returned\": 1}"), LineKind::Other);
        assert_eq!(classify(b""), LineKind::Other);
    }

    #[test]
    fn greetings_of_both_monitors() {
        let q = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;
        let g = parse_greeting(q).unwrap();
        assert_eq!(g.version, "7.2.22");
        assert_eq!(g.package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
        assert_eq!(g.capabilities, ["oob"]);
        let f = "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 1, \"minor\": 1, \"micro\": 0}, \"package\": \"flotilla-0.1.0\"}, \"capabilities\": []}}\r\n";
        let g = parse_greeting(f).unwrap();
        assert_eq!((g.version.as_str(), g.package.as_str(), g.capabilities.len()), ("1.1.0", "flotilla-0.1.0", 0));
        assert!(parse_greeting("{\"return\": {}}").is_err());
        assert!(parse_greeting("{\"QMP\": {\"version\": {}}}").is_err());
        assert!(parse_greeting("nonsense").is_err());
    }

    #[test]
    fn replies_are_checked_for_their_shape() {
        let status = json!({"return": {"status": "running", "singlestep": false, "running": true}});
        assert!(check_reply("query-status", &status).is_ok());
        assert!(check_reply("query-status", &json!({"return": {}})).is_err());
        let err = json!({"error": {"class": "CommandNotFound", "desc": "x"}});
        assert!(check_reply("query-status", &err).unwrap_err().contains("CommandNotFound"));
        let cmds = json!({"return": [{"name": "query-status"}, {"name": "query-commands"}]});
        assert!(check_reply("query-commands", &cmds).is_ok());
        // A list that does not name query-commands itself (a daemon not introspected yet...).
        assert!(check_reply("query-commands", &json!({"return": [{"name": "quit"}]})).is_err());
        assert!(check_reply("query-kvm", &json!({"return": {"enabled": true}})).is_ok());
        assert!(check_reply("query-kvm", &json!({"QMP": {}})).is_err());
    }

    #[test]
    fn request_lines() {
        assert_eq!(request_line("query-status"), b"{\"execute\": \"query-status\"}\n");
    }

    /// A fake monitor on a socket pair: greeting, then `n` replies with an event before the first.
    #[test]
    fn a_series_against_a_fake_monitor_skips_events_and_keeps_depth() {
        let dir = std::env::temp_dir().join(format!("flotilla-bench-qmp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 9, \"minor\": 0, \"micro\": 1}, \"package\": \"\"}, \"capabilities\": []}}\r\n").unwrap();
            let mut line = String::new();
            let mut n = 0;
            while r.read_line(&mut line).unwrap() > 0 {
                if n == 1 {
                    w.write_all(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 0}, \"event\": \"RESUME\"}\r\n")
                        .unwrap();
                }
                w.write_all(b"{\"return\": {\"status\": \"running\", \"singlestep\": false, \"running\": true}}\r\n")
                    .unwrap();
                line.clear();
                n += 1;
            }
            n
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut c, g) = QmpClient::connect("fake", &path, deadline).unwrap();
        assert_eq!(g.version, "9.0.1");
        c.negotiate().unwrap();
        let s = c.time_series(&request_line("query-status"), 50, 4, deadline).unwrap();
        assert_eq!(s.latencies_ns.len(), 50);
        assert_eq!(c.events, 1);
        assert!(s.finished >= s.started);
        assert_eq!(s.reply_bytes, 73);
        drop(c);
        assert_eq!(server.join().unwrap(), 51);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_error_reply_fails_the_series() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = BufReader::new(b);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\r\n").unwrap();
        });
        let writer = a.try_clone().unwrap();
        let mut c = QmpClient { what: "pair".into(), reader: BufReader::new(a), writer, line: Vec::new(), events: 0 };
        let e = c.time_series(b"{}\n", 3, 1, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(crate::error::chain(&e).contains("GenericError"), "{}", crate::error::chain(&e));
        server.join().unwrap();
    }
}
