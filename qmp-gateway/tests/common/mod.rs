//! The test harness: a private `dbus-daemon`, mock daemons served with the schema's generated
//! zbus glue (the same the real daemons use), the gateway binary, and a blocking QMP client.
//! Every wait is bounded; a missing tool fails the test with what to install.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flotilla_schema::check::QmpError;
use flotilla_schema::commands::{BalloonArgs, MemsaveArgs, PmemsaveArgs, SetLinkArgs};
use flotilla_schema::dbus::{bus_name, object_path};
use flotilla_schema::dbus_server::{
    self, Balloon1, Balloon1Handler, Exported, Net1, Net1Handler, VmmCore1, VmmCore1Handler,
};
use flotilla_schema::types::{
    BalloonInfo, ChardevInfo, CpuInfo, KvmInfo, MigrationInfo, NameInfo, PciInfo, StatusInfo, UuidInfo, VersionInfo,
};
use serde_json::{json, Value};

/// How long any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A fresh directory for one test.
pub fn test_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "qmp-gateway-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `f` until it returns `Some`, at most `WAIT`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out after {WAIT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stop_child(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    // SAFETY: kill(2) on the pid of a child this harness spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_child(child, Duration::from_secs(5));
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    st
}

/// A private bus: `dbus-daemon --config-file=<generated> --print-address --nofork`.
pub struct DbusDaemon {
    child: Child,
    pub address: String,
}

impl DbusDaemon {
    pub fn start(dir: &Path) -> DbusDaemon {
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                dir.join("bus.sock").display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--print-address", "--nofork"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("dbus-daemon.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run dbus-daemon ({e}): install the `dbus` package (scripts/setup-host does)")
            });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let address = rx.recv_timeout(WAIT).expect("dbus-daemon printed no address").trim().to_string();
        assert!(address.starts_with("unix:"), "dbus-daemon address {address:?}");
        DbusDaemon { child, address }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A daemon served on its own thread and tokio runtime, stopped (its connection closed, as a
/// crash would) on [`MockDaemon::stop`] or drop.
pub struct MockDaemon {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockDaemon {
    fn run<F, Fut>(serve: F) -> MockDaemon
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = zbus::Connection>,
    {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let conn = serve().await;
                let _ = ready_tx.send(());
                let _ = stop_rx.await;
                // Close the socket now, as a crash would (clones elsewhere keep it otherwise).
                let _ = conn.close().await;
            });
        });
        ready_rx.recv_timeout(WAIT).expect("the mock daemon did not come up");
        MockDaemon { stop: Some(stop_tx), thread: Some(thread) }
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MockDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn emit(conn: &Mutex<Option<zbus::Connection>>, path: &str, event: &str, data: Value) {
    let conn = conn.lock().unwrap().clone().expect("serving");
    dbus_server::emit_qmp_event(&conn, path, event, &data, SystemTime::now()).await.expect("emit");
}

/// vmm-core as the gateway sees it: a few queries, run-state commands that emit their events
/// before returning (as vmm-core does), memsave/pmemsave writing files, a QMP error, and a
/// query that can be made to hang.
#[derive(Default)]
pub struct MockCore {
    pub conn: Mutex<Option<zbus::Connection>>,
    pub paused: AtomicBool,
    /// `query-migrate` hangs (for the timeout tests).
    pub hang: AtomicBool,
    pub memsaves: Mutex<Vec<MemsaveArgs>>,
}

/// What the mock vmm-core exports: not `cpu`, the `migrate_*` setters or QOM.
pub const CORE_COMMANDS: &[&str] = &[
    "query-name",
    "query-version",
    "query-kvm",
    "query-status",
    "query-uuid",
    "query-chardev",
    "query-migrate",
    "query-cpus",
    "query-pci",
    "quit",
    "stop",
    "system_reset",
    "system_powerdown",
    "memsave",
    "pmemsave",
    "cont",
    "inject-nmi",
];

const CORE_PATH: &str = "/org/flotilla/VmmCore";

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid schema value")
}

impl VmmCore1Handler for MockCore {
    async fn query_name(&self) -> Result<NameInfo, QmpError> {
        Ok(NameInfo { name: Some("mock-vm".into()) })
    }
    async fn query_version(&self) -> Result<VersionInfo, QmpError> {
        Ok(from(json!({"qemu": {"major": 1, "minor": 1, "micro": 0}, "package": "flotilla-mock"})))
    }
    async fn query_kvm(&self) -> Result<KvmInfo, QmpError> {
        Ok(KvmInfo { enabled: true, present: true })
    }
    async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        let paused = self.paused.load(Ordering::SeqCst);
        Ok(from(json!({"running": !paused, "singlestep": false, "status": if paused { "paused" } else { "running" }})))
    }
    async fn query_uuid(&self) -> Result<UuidInfo, QmpError> {
        Ok(UuidInfo { uuid: "6b2f4c3e-8d1a-4c7b-9f10-2a3b4c5d6e7f".into() })
    }
    async fn query_chardev(&self) -> Result<Vec<ChardevInfo>, QmpError> {
        Ok(vec![ChardevInfo { label: "serial0".into(), filename: "stdio".into() }])
    }
    async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        if self.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Ok(MigrationInfo::default())
    }
    async fn query_cpus(&self) -> Result<Vec<CpuInfo>, QmpError> {
        Ok(from(json!([
            {"CPU": 0, "current": true, "halted": false, "pc": 4096, "thread_id": 1001},
            {"CPU": 1, "current": false, "halted": true, "pc": 8192, "thread_id": 1002}
        ])))
    }
    async fn query_pci(&self) -> Result<Vec<PciInfo>, QmpError> {
        Ok(from(json!([{"bus": 0, "devices": [
            {"bus": 0, "slot": 0, "function": 0, "class_info": {"class": 1536, "desc": "Host bridge"},
             "id": {"device": 10688, "vendor": 32902}, "qdev_id": "", "regions": []}]}])))
    }
    async fn quit(&self) -> Result<(), QmpError> {
        emit(&self.conn, CORE_PATH, "SHUTDOWN", json!({"guest": false, "reason": "host-qmp-quit"})).await;
        Ok(())
    }
    async fn stop(&self) -> Result<(), QmpError> {
        self.paused.store(true, Ordering::SeqCst);
        emit(&self.conn, CORE_PATH, "STOP", json!({})).await;
        Ok(())
    }
    async fn cont(&self) -> Result<(), QmpError> {
        self.paused.store(false, Ordering::SeqCst);
        emit(&self.conn, CORE_PATH, "RESUME", json!({})).await;
        Ok(())
    }
    async fn system_reset(&self) -> Result<(), QmpError> {
        emit(&self.conn, CORE_PATH, "RESET", json!({"guest": false, "reason": "host-qmp-system-reset"})).await;
        Ok(())
    }
    async fn system_powerdown(&self) -> Result<(), QmpError> {
        emit(&self.conn, CORE_PATH, "POWERDOWN", json!({})).await;
        Ok(())
    }
    async fn inject_nmi(&self) -> Result<(), QmpError> {
        Ok(())
    }
    async fn memsave(&self, args: MemsaveArgs) -> Result<(), QmpError> {
        if args.val == 0 {
            return Err(QmpError::new(
                "GenericError",
                format!("Invalid addr 0x0000000000000000/size {} specified", args.size),
            ));
        }
        std::fs::write(&args.filename, vec![0xab; args.size as usize])
            .map_err(|e| QmpError::new("OpenFileFailed", format!("Could not open '{}': {e}", args.filename)))?;
        self.memsaves.lock().unwrap().push(args);
        Ok(())
    }
    async fn pmemsave(&self, args: PmemsaveArgs) -> Result<(), QmpError> {
        std::fs::write(&args.filename, vec![0xcd; args.size as usize])
            .map_err(|e| QmpError::new("OpenFileFailed", format!("Could not open '{}': {e}", args.filename)))
    }
}

/// Serves a [`MockCore`] as `org.flotilla.<instance>.VmmCore`.
pub fn start_core(address: &str, instance: &str, core: Arc<MockCore>) -> MockDaemon {
    let (address, name) = (address.to_string(), bus_name(instance, "VmmCore"));
    MockDaemon::run(move || async move {
        let iface = Exported::new(VmmCore1::new(core.clone()), CORE_COMMANDS).expect("vmm-core commands");
        let conn = dbus_server::serve(&address, &name, &object_path("VmmCore"), iface).await.expect("serve vmm-core");
        *core.conn.lock().unwrap() = Some(conn.clone());
        conn
    })
}

/// balloond: `balloon` emits `BALLOON_CHANGE` before it returns.
#[derive(Default)]
pub struct MockBalloon {
    pub conn: Mutex<Option<zbus::Connection>>,
    pub actual: Mutex<i64>,
}

impl Balloon1Handler for MockBalloon {
    async fn balloon(&self, args: BalloonArgs) -> Result<(), QmpError> {
        *self.actual.lock().unwrap() = args.value;
        emit(&self.conn, "/org/flotilla/Balloon", "BALLOON_CHANGE", json!({"actual": args.value})).await;
        Ok(())
    }
    async fn query_balloon(&self) -> Result<BalloonInfo, QmpError> {
        Ok(from(json!({"actual": *self.actual.lock().unwrap()})))
    }
}

pub fn start_balloon(address: &str, instance: &str, b: Arc<MockBalloon>) -> MockDaemon {
    let (address, name) = (address.to_string(), bus_name(instance, "Balloon"));
    MockDaemon::run(move || async move {
        let iface = Exported::new(Balloon1::new(b.clone()), &["balloon", "query-balloon"]).expect("balloon commands");
        let conn = dbus_server::serve(&address, &name, &object_path("Balloon"), iface).await.expect("serve balloond");
        *b.conn.lock().unwrap() = Some(conn.clone());
        conn
    })
}

/// netd: one NIC `nic0` on netdev `net0`; set_link records the state, other names are
/// DeviceNotFound as netd answers them.
#[derive(Default)]
pub struct MockNet {
    pub links: Mutex<Vec<(String, bool)>>,
}

impl Net1Handler for MockNet {
    async fn set_link(&self, args: SetLinkArgs) -> Result<(), QmpError> {
        if args.name != "nic0" && args.name != "net0" {
            return Err(QmpError::new("DeviceNotFound", format!("Device '{}' not found", args.name)));
        }
        self.links.lock().unwrap().push((args.name, args.up));
        Ok(())
    }
}

pub fn start_net(address: &str, instance: &str, n: Arc<MockNet>) -> MockDaemon {
    let (address, name) = (address.to_string(), bus_name(instance, "Net"));
    MockDaemon::run(move || async move {
        let iface = Exported::new(Net1::new(n), &["set_link"]).expect("set_link");
        dbus_server::serve(&address, &name, &object_path("Net"), iface).await.expect("serve netd")
    })
}

/// A free loopback TCP port (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The gateway binary.
pub struct Gateway {
    child: Child,
    pub sock: PathBuf,
    pub tcp_port: u16,
    pub stderr: PathBuf,
}

impl Gateway {
    /// Starts `qmp-gateway` with a unix and a TCP listener and a 2 s call timeout, and waits
    /// until both accept.
    pub fn start(dir: &Path, address: &str, instance: &str, extra: &[&str]) -> Gateway {
        let sock = dir.join("qmp.sock");
        let tcp_port = free_port();
        let stderr = dir.join("gateway.log");
        let unix_spec = format!("unix:{},server=on,wait=off", sock.display());
        let tcp_spec = format!("tcp::{tcp_port},server,nowait");
        let mut args = vec![
            "--dbus-address",
            address,
            "--instance",
            instance,
            "--qmp",
            &unix_spec,
            "--qmp",
            &tcp_spec,
            "--call-timeout",
            "2",
        ];
        args.extend_from_slice(extra);
        let child = Command::new(env!("CARGO_BIN_EXE_qmp-gateway"))
            .args(&args)
            .env("RUST_LOG", "qmp_gateway=debug")
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("run qmp-gateway");
        let mut g = Gateway { child, sock, tcp_port, stderr };
        wait_for("the gateway's sockets", || {
            if let Ok(Some(st)) = g.child.try_wait() {
                panic!("qmp-gateway exited with {st}: {}", g.log());
            }
            (UnixStream::connect(&g.sock).is_ok() && TcpStream::connect(("127.0.0.1", g.tcp_port)).is_ok())
                .then_some(())
        });
        g
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and the exit status (bounded).
    pub fn terminate(&mut self) -> ExitStatus {
        stop_child(&mut self.child).expect("the gateway did not stop on SIGTERM")
    }

    /// Waits for the gateway to exit on its own.
    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_child(&mut self.child, WAIT).expect("the gateway did not exit")
    }

    pub fn unix(&self) -> Qmp {
        Qmp::unix(&self.sock)
    }

    pub fn tcp(&self) -> Qmp {
        Qmp::tcp(self.tcp_port)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// A whole setup: bus, mock vmm-core, gateway.
pub struct Vm {
    pub dir: PathBuf,
    pub bus: DbusDaemon,
    pub instance: String,
    pub core: Arc<MockCore>,
    pub core_daemon: Option<MockDaemon>,
    pub gateway: Gateway,
}

impl Vm {
    pub fn start(name: &str) -> Vm {
        Vm::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Vm {
        let dir = test_dir(name);
        let bus = DbusDaemon::start(&dir);
        let instance = format!("t-{name}");
        let core = Arc::new(MockCore::default());
        let core_daemon = Some(start_core(&bus.address, &instance, core.clone()));
        let gateway = Gateway::start(&dir, &bus.address, &instance, extra);
        Vm { dir, bus, instance, core, core_daemon, gateway }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut d) = self.core_daemon.take() {
            d.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A blocking QMP client; every read is bounded by [`WAIT`].
pub struct Qmp {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    /// Events met while waiting for a reply.
    pub events: Vec<Value>,
    pub greeting: Value,
}

impl Qmp {
    pub fn unix(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).expect("connect to the unix socket");
        s.set_read_timeout(Some(WAIT)).unwrap();
        Qmp::with(Box::new(s))
    }

    pub fn tcp(port: u16) -> Qmp {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the TCP socket");
        s.set_read_timeout(Some(WAIT)).unwrap();
        Qmp::with(Box::new(s))
    }

    fn with(stream: Box<dyn Stream>) -> Qmp {
        let mut q = Qmp { stream, buf: Vec::new(), events: Vec::new(), greeting: Value::Null };
        q.greeting = q.recv().expect("a greeting");
        q
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the gateway");
    }

    /// The next line, parsed; `None` at EOF. Panics if it does not end in `\r\n`.
    pub fn recv(&mut self) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8(line).expect("UTF-8 from the gateway");
                assert!(text.ends_with("\r\n"), "a line not ending in \\r\\n: {text:?}");
                return Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON {text:?}: {e}")));
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading from the gateway: {e} (a reply did not come within {WAIT:?})"),
            }
        }
    }

    /// The next reply (`return` or `error`), keeping events aside.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.recv().expect("the gateway closed the connection");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Sends a command line (a `\n` is added) and returns its reply.
    pub fn cmd(&mut self, text: &str) -> Value {
        self.send_raw(text.as_bytes());
        self.send_raw(b"\n");
        self.reply()
    }

    pub fn execute(&mut self, name: &str, args: Value) -> Value {
        self.cmd(&json!({"execute": name, "arguments": args}).to_string())
    }

    pub fn negotiate(&mut self) -> &mut Self {
        assert_eq!(self.cmd(r#"{"execute": "qmp_capabilities"}"#), json!({"return": {}}));
        self
    }

    /// Waits for an event by name (bounded).
    pub fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.recv().unwrap_or_else(|| panic!("EOF while waiting for {name}"));
            if v["event"] == name {
                return v;
            }
            self.events.push(v);
        }
    }
}

/// The class of an error reply.
pub fn class(v: &Value) -> &str {
    v["error"]["class"].as_str().unwrap_or_else(|| panic!("not an error reply: {v}"))
}

pub fn desc(v: &Value) -> &str {
    v["error"]["desc"].as_str().unwrap_or_else(|| panic!("not an error reply: {v}"))
}
