//! The real `qemu.qmp` Python library in Rust tests: `tests/qmp/agent.py` runs its `QMPClient`s
//! and answers one JSON line per request (see the script's docstring), so a test can interleave
//! what the library sends and receives with what the test guest prints on its console.
//!
//! Nothing is skipped: without python3 or qemu.qmp, [`require_qemu_qmp`] fails the test and
//! says how to install it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use serde_json::{json, Value};

use crate::process::{wait_timeout, Collector};

/// How to get the library, for failure messages.
pub const INSTALL_HINT: &str =
    "run scripts/setup-host, or `python3 -m pip install 'qemu.qmp==0.0.6'` (it also installs qmp-shell)";

/// The directory of the Python scripts these tests drive (`tests/qmp/`).
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qmp")
}

/// Fails (never skips) unless python3 can import `qemu.qmp` and its legacy API and qmp-shell.
pub fn require_qemu_qmp() {
    let out = Command::new("python3")
        .args(["-c", "import qemu.qmp, qemu.qmp.legacy, qemu.qmp.qmp_shell; print(qemu.qmp.__file__)"])
        .stdin(Stdio::null())
        .output();
    match out {
        Err(e) => panic!("python3 is needed for the qemu.qmp tests ({e}): install python3, then {INSTALL_HINT}"),
        Ok(o) if !o.status.success() => panic!(
            "the qemu.qmp Python library is needed for these tests: {INSTALL_HINT}\n(python3 said: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => {}
    }
}

/// The qmp-shell command: the `qmp-shell` script qemu.qmp installs when it is on PATH, else the
/// same module run by python3.
pub fn qmp_shell_command() -> Command {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qmp-shell").is_file()))
        .unwrap_or(false);
    if on_path {
        Command::new("qmp-shell")
    } else {
        let mut c = Command::new("python3");
        c.args(["-m", "qemu.qmp.qmp_shell"]);
        c
    }
}

/// A running agent (`python3 tests/qmp/agent.py`); killed when dropped.
pub struct Agent {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: Collector,
}

impl Agent {
    pub fn start() -> Agent {
        let script = scripts_dir().join("agent.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}; {INSTALL_HINT}", script.display()));
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = Collector::new(child.stderr.take().expect("stderr"));
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Agent { child, stdin, lines: rx, stderr }
    }

    /// Sends one request and waits (bounded) for its answer, which may be an exception
    /// (`{"exception": ...}`); QMP errors come back as `{"error": ...}`.
    pub fn request(&mut self, req: Value, limit: Duration) -> Value {
        self.send(&req);
        self.answer(&req, limit)
    }

    /// Sends a request without waiting: the agent works on it while the test does something
    /// else; [`Agent::answer`] collects the answer.
    pub fn send(&mut self, req: &Value) {
        let text = format!("{req}\n");
        if let Err(e) = self.stdin.write_all(text.as_bytes()).and_then(|_| self.stdin.flush()) {
            panic!("writing to the qemu.qmp agent: {e}; its stderr:\n{}", self.finish());
        }
    }

    /// The answer to the request sent last (bounded).
    pub fn answer(&mut self, req: &Value, limit: Duration) -> Value {
        match self.lines.recv_timeout(limit) {
            Ok(line) => serde_json::from_str(&line).unwrap_or_else(|e| panic!("agent answered {line:?}: {e}")),
            Err(e) => {
                panic!("no answer from the qemu.qmp agent within {limit:?} to {req} ({e}); stderr:\n{}", self.finish())
            }
        }
    }

    /// A request that must not end in an exception.
    pub fn ok(&mut self, req: Value) -> Value {
        let limit = Duration::from_secs(20);
        let r = self.request(req.clone(), limit);
        if let Some(e) = r.get("exception") {
            panic!("qemu.qmp agent: {req} raised {e}\n{}", r["traceback"].as_str().unwrap_or(""));
        }
        r
    }

    /// `QMPClient(name).connect(address)` (a unix path or `["127.0.0.1", port]`), negotiating;
    /// returns the greeting.
    pub fn connect(&mut self, client: &str, address: Value) -> Value {
        self.ok(json!({"op": "connect", "client": client, "address": address}))["greeting"].clone()
    }

    /// Runs a command; the answer has `return` or `error`, `events_before` (events received
    /// since the last report, before the reply) and `t_reply` (arrival time of the reply).
    pub fn execute(&mut self, client: &str, cmd: &str, args: Value) -> Value {
        self.ok(json!({"op": "execute", "client": client, "cmd": cmd, "args": args}))
    }

    /// A command that must succeed: its `return`.
    pub fn ret(&mut self, client: &str, cmd: &str, args: Value) -> Value {
        let r = self.execute(client, cmd, args.clone());
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{cmd} {args} failed through qemu.qmp: {r}"),
        }
    }

    /// A command that must fail: its error object (`class`, `desc`, `data`).
    pub fn err(&mut self, client: &str, cmd: &str, args: Value) -> Value {
        let r = self.execute(client, cmd, args.clone());
        match r.get("error") {
            Some(v) => v.clone(),
            None => panic!("{cmd} {args} should have failed: {r}"),
        }
    }

    /// The events `client` received since they were last reported (by [`Agent::execute`]'s
    /// `events_before` or by this), waiting up to `timeout` for each of `want` to be among them.
    pub fn events(&mut self, client: &str, want: &[&str], timeout: Duration) -> Vec<Value> {
        let r = self.ok(json!({"op": "events", "client": client, "want": want, "timeout": timeout.as_secs_f64()}));
        assert_eq!(
            r["listener_total"], r["inbound_total"],
            "qemu.qmp's default event listener did not get every event the connection received"
        );
        r["events"].as_array().cloned().unwrap_or_default()
    }

    pub fn disconnect(&mut self, client: &str) -> Value {
        self.ok(json!({"op": "disconnect", "client": client}))
    }

    /// Stops the agent; returns its stderr.
    pub fn finish(&mut self) -> String {
        let _ = self.stdin.write_all(b"{\"op\": \"quit\"}\n");
        let _ = self.stdin.flush();
        if wait_timeout(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stderr.take()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The names of `events`, in order.
pub fn names(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["event"].as_str().unwrap_or("?").to_string()).collect()
}

/// An event's timestamp as seconds since the epoch.
pub fn timestamp(event: &Value) -> f64 {
    let t = &event["timestamp"];
    let (s, us) = (t["seconds"].as_i64(), t["microseconds"].as_i64());
    match (s, us) {
        (Some(s), Some(us)) if (0..1_000_000).contains(&us) => s as f64 + us as f64 / 1e6,
        _ => panic!("event without a valid timestamp: {event}"),
    }
}
