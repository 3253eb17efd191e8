//! QMP end to end: the test guest booted by the real `flotilla` with `-qmp` sockets (so with
//! its private bus, vmm-core and the supervised `qmp-gateway`), and a raw QMP socket client
//! that reads exactly what is on the wire.
//!
//! The `qmp-gateway` binary is built here like `process::binaries` builds flotilla and
//! vmm-core (one `cargo build -p qmp-gateway` per test process, into the same target directory
//! and profile), or taken from `FLOTILLA_BIN_DIR`; the launcher is pointed at it with
//! `FLOTILLA_QMP_GATEWAY`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::console::Console;
use crate::guest::guest_elf;
use crate::machine::TempDir;
use crate::process::{
    binaries, children, describe, processes_mentioning, vmm_core_child, wait_gone, wait_timeout, Collector, Reaper,
};

/// Booting to READY.
pub const BOOT: Duration = Duration::from_secs(30);
/// One reply, one guest answer.
pub const REPLY: Duration = Duration::from_secs(10);
/// flotilla's exit after the VM ended.
pub const EXIT: Duration = Duration::from_secs(15);

/// The `qmp-gateway` executable (built with the others by [`binaries`]).
pub fn gateway_binary() -> &'static Path {
    let p = &binaries().qmp_gateway;
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// A free loopback TCP port (bound and released: another process could take it in between,
/// which is unlikely enough on a test machine).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// One `-qmp` socket of a [`QmpVm`].
#[derive(Debug, Clone)]
pub enum QmpAddr {
    Unix(PathBuf),
    Tcp(u16),
}

impl QmpAddr {
    /// As the `address` of a qemu.qmp `connect()`.
    pub fn py(&self) -> Value {
        match self {
            QmpAddr::Unix(p) => json!(p.display().to_string()),
            QmpAddr::Tcp(port) => json!(["127.0.0.1", port]),
        }
    }

    fn arg(&self) -> String {
        match self {
            QmpAddr::Unix(p) => format!("unix:{},server=on,wait=off", p.display()),
            QmpAddr::Tcp(port) => format!("tcp:127.0.0.1:{port},server=on,wait=off"),
        }
    }
}

/// What a [`QmpVm`] is started with.
pub struct VmOptions<'a> {
    pub name: &'a str,
    /// `-qmp` sockets: `true` a unix one (in the scratch directory), `false` a loopback TCP one.
    pub qmp: &'a [bool],
    pub extra: &'a [&'a str],
}

/// The test guest started through `flotilla -name NAME -m 128 -smp 2 -kernel GUEST -serial
/// unix:SOCK,server=on,wait=on -display none -qmp ...`, in a scratch directory that is also the
/// launcher's runtime directory (so every process of the VM mentions it: the leftover check).
/// Everything it started is killed when it is dropped.
pub struct QmpVm {
    pub reaper: Reaper,
    pub stderr: Collector,
    pub serial: PathBuf,
    pub qmp: Vec<QmpAddr>,
    pub dir: TempDir,
    pub name: String,
}

impl QmpVm {
    pub fn start(tag: &str, opts: &VmOptions) -> QmpVm {
        let dir = TempDir::new(tag);
        let serial = dir.path("serial.sock");
        let qmp: Vec<QmpAddr> = opts
            .qmp
            .iter()
            .enumerate()
            .map(
                |(i, unix)| {
                    if *unix {
                        QmpAddr::Unix(dir.path(&format!("qmp{i}.sock")))
                    } else {
                        QmpAddr::Tcp(free_port())
                    }
                },
            )
            .collect();
        let elf = guest_elf().display().to_string();
        let mut cmd = Command::new(&binaries().flotilla);
        cmd.env("FLOTILLA_VMM_CORE", &binaries().vmm_core)
            .env("FLOTILLA_QMP_GATEWAY", gateway_binary())
            .env("XDG_RUNTIME_DIR", &dir.0)
            .env_remove("RUST_LOG")
            .args(["-name", opts.name, "-m", "128", "-smp", "2", "-kernel", &elf, "-display", "none"])
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=on", serial.display()));
        for q in &qmp {
            cmd.arg("-qmp").arg(q.arg());
        }
        cmd.args(opts.extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning flotilla");
        let stderr = Collector::new(child.stderr.take().expect("stderr"));
        let reaper = Reaper::new(child, &dir.0.display().to_string());
        QmpVm { reaper, stderr, serial, qmp, dir, name: opts.name.to_string() }
    }

    pub fn pid(&self) -> i32 {
        self.reaper.pid()
    }

    pub fn marker(&self) -> &str {
        &self.reaper.marker
    }

    /// Connects to the serial socket (vmm-core waits for it before the guest runs).
    pub fn console(&self) -> Console {
        Console::connect(&self.serial, BOOT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Connects to the serial socket and waits for READY.
    pub fn console_ready(&self) -> Console {
        let mut c = self.console();
        c.expect("READY", BOOT).unwrap_or_else(|e| panic!("{e}"));
        c
    }

    pub fn vmm_core(&self) -> i32 {
        vmm_core_child(self.pid(), BOOT).expect("flotilla has a vmm-core child")
    }

    /// The qmp-gateway child of flotilla, waiting up to `timeout` for one (other than `not`).
    pub fn gateway(&self, not: Option<i32>, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = children(self.pid()).into_iter().find(|&c| {
                Some(c) != not
                    && std::fs::read_link(format!("/proc/{c}/exe"))
                        .ok()
                        .and_then(|e| e.file_name().map(|n| n.to_string_lossy().starts_with("qmp-gateway")))
                        .unwrap_or(false)
            });
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A raw client on socket `i`, retrying the connection until the gateway listens.
    pub fn raw(&self, i: usize) -> RawQmp {
        RawQmp::connect(&self.qmp[i], BOOT)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match wait_timeout(self.reaper.child(), timeout) {
            Some(s) => s,
            None => panic!("flotilla still running after {timeout:?}"),
        }
    }

    /// Waits for flotilla to exit 0, then checks that nothing of the VM is left.
    pub fn assert_exits_0_and_cleaned_up(&mut self, core: i32) {
        let status = self.wait_exit(EXIT);
        let stderr = self.stderr.take();
        assert_eq!(status.code(), Some(0), "flotilla ended with {}; stderr:\n{stderr}", describe(status));
        assert!(!stderr.contains("panicked"), "a process panicked:\n{stderr}");
        self.assert_cleaned_up(core);
    }

    /// After flotilla has exited: no vmm-core, gateway or dbus-daemon (nothing mentioning the
    /// scratch directory), no serial or QMP socket file, no runtime directory.
    pub fn assert_cleaned_up(&self, core: i32) {
        assert!(!self.serial.exists(), "serial socket {} was not removed", self.serial.display());
        assert!(wait_gone(core, Duration::from_secs(2)), "vmm-core (pid {core}) outlived flotilla");
        let left = processes_mentioning(self.marker());
        assert!(left.is_empty(), "processes left running: {left:?}");
        for q in &self.qmp {
            if let QmpAddr::Unix(p) = q {
                assert!(!p.exists(), "QMP socket {} was not removed", p.display());
            }
            if let QmpAddr::Tcp(port) = q {
                assert!(
                    TcpStream::connect(("127.0.0.1", *port)).is_err(),
                    "something still listens on the QMP port {port}"
                );
            }
        }
        let runtime = self.dir.path("flotilla");
        assert!(!runtime.exists(), "the runtime directory {} was not removed", runtime.display());
    }
}

/// One message from the server, or the end of the stream.
#[derive(Debug)]
pub enum Incoming {
    Msg(Value),
    /// The server closed the connection (EOF or reset).
    Closed,
}

/// A QMP client on a plain socket: what is on the wire, nothing interpreted.
pub struct RawQmp {
    writer: Box<dyn Write + Send>,
    rx: Receiver<Incoming>,
    pub greeting: Value,
    /// Events read while waiting for a reply, oldest first.
    pub events: Vec<Value>,
    /// Every raw line received (with its `\r\n`), for the line-ending check.
    pub raw_lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl RawQmp {
    /// Connects (retrying until `timeout`: the gateway starts after vmm-core is ready, and is
    /// restarted after a crash) and reads the greeting.
    pub fn connect(addr: &QmpAddr, timeout: Duration) -> RawQmp {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::try_connect(addr) {
                Ok(c) => return c,
                Err(e) if Instant::now() >= deadline => {
                    panic!("cannot connect to QMP {addr:?} within {timeout:?}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// One attempt: connect and read the greeting within a second.
    pub fn try_connect(addr: &QmpAddr) -> std::io::Result<RawQmp> {
        let (reader, writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match addr {
            QmpAddr::Unix(p) => {
                let s = UnixStream::connect(p)?;
                (Box::new(s.try_clone()?), Box::new(s))
            }
            QmpAddr::Tcp(port) => {
                let s = TcpStream::connect(("127.0.0.1", *port))?;
                s.set_nodelay(true)?;
                (Box::new(s.try_clone()?), Box::new(s))
            }
        };
        let (tx, rx) = channel();
        let raw_lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let raw2 = raw_lines.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            loop {
                let mut line = Vec::new();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Incoming::Closed);
                        return;
                    }
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                raw2.lock().expect("lock").push(text.clone());
                let msg = match serde_json::from_str::<Value>(text.trim()) {
                    Ok(v) => v,
                    Err(e) => json!({"unparsable": text, "why": e.to_string()}),
                };
                if tx.send(Incoming::Msg(msg)).is_err() {
                    return;
                }
            }
        });
        let greeting = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(Incoming::Msg(v)) => v,
            Ok(Incoming::Closed) => return Err(std::io::Error::other("closed before the greeting")),
            Err(_) => return Err(std::io::Error::other("no greeting within 1 s")),
        };
        Ok(RawQmp { writer, rx, greeting, events: Vec::new(), raw_lines })
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("writing to the QMP socket");
        self.writer.flush().expect("flush");
    }

    /// The next message or the end of the stream, within `timeout` (None: nothing came).
    pub fn next(&mut self, timeout: Duration) -> Option<Incoming> {
        match self.rx.recv_timeout(timeout) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Incoming::Closed),
        }
    }

    /// The next reply (not an event; events are kept in `self.events`).
    pub fn reply(&mut self) -> Value {
        let deadline = Instant::now() + REPLY;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(Incoming::Msg(m)) if m.get("event").is_some() => self.events.push(m),
                Some(Incoming::Msg(m)) => return m,
                Some(Incoming::Closed) => panic!("the QMP connection closed while waiting for a reply"),
                None => panic!("no QMP reply within {REPLY:?} (events meanwhile: {:?})", self.events),
            }
        }
    }

    /// Sends one request line and returns its reply.
    pub fn cmd(&mut self, line: &str) -> Value {
        self.send_raw(format!("{line}\n").as_bytes());
        self.reply()
    }

    /// `{"execute": NAME, "arguments": ARGS}` and its reply.
    pub fn execute(&mut self, name: &str, args: Value) -> Value {
        let req = if args.is_null() { json!({"execute": name}) } else { json!({"execute": name, "arguments": args}) };
        self.cmd(&req.to_string())
    }

    /// Runs a command that must succeed and returns its `return` value (panics with the reply
    /// otherwise).
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.execute(name, args.clone());
        r.get("return").cloned().unwrap_or_else(|| panic!("{name} {args} failed: {r}"))
    }

    pub fn negotiate(&mut self) {
        let r = self.cmd(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(r, json!({"return": {}}), "qmp_capabilities");
    }

    /// Waits for an event named `name` (bounded); earlier events stay in `self.events`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(Incoming::Msg(m)) if m["event"] == name => return m,
                Some(Incoming::Msg(m)) if m.get("event").is_some() => self.events.push(m),
                Some(Incoming::Msg(m)) => panic!("unexpected reply while waiting for {name}: {m}"),
                Some(Incoming::Closed) => panic!("the QMP connection closed while waiting for {name}"),
                None => panic!("no {name} event within {timeout:?} (other events: {:?})", self.events),
            }
        }
    }

    /// Everything that arrives within `window` (for "nothing arrives" checks).
    pub fn drain(&mut self, window: Duration) -> Vec<Value> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(Incoming::Msg(m)) => got.push(m),
                Some(Incoming::Closed) => {
                    got.push(json!({"closed": true}));
                    break;
                }
                None => break,
            }
        }
        got
    }

    /// Waits (bounded) for the server to close the connection; panics on anything but events.
    pub fn expect_closed(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(Incoming::Closed) => return,
                Some(Incoming::Msg(m)) if m.get("event").is_some() => self.events.push(m),
                Some(Incoming::Msg(m)) => panic!("a reply after the end: {m}"),
                None => panic!("the QMP connection is still open after {timeout:?}"),
            }
        }
    }
}

/// A reply's error class ("" for a success).
pub fn class(r: &Value) -> &str {
    r["error"]["class"].as_str().unwrap_or("")
}

/// A reply's error text ("" for a success).
pub fn desc(r: &Value) -> &str {
    r["error"]["desc"].as_str().unwrap_or("")
}
