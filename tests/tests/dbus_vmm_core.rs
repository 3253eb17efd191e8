//! vmm-core on D-Bus, end to end: `flotilla -name dbustest ...` boots the test guest with its
//! private bus; `busctl --address=…` (systemd's client) introspects and calls
//! `org.flotilla.VmmCore1`, a zbus client watches the `QmpEvent` signals and checks that each
//! comes before the reply of the command that caused it, and the guest's serial console
//! confirms the effects (stop freezes its counter, cont resumes it, system_reset reboots it,
//! memsave returns what it wrote). Every wait is bounded; a failing test kills what it started.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla_schema::dbus::{self, EVENTS_INTERFACE, EVENT_SIGNAL};
use flotilla_schema::dbus_server::zbus::{self, Connection, MatchRule, Message, MessageStream};
use flotilla_tests::console::{field, Console};
use flotilla_tests::guest::guest_elf;
use flotilla_tests::machine::TempDir;
use flotilla_tests::process::{
    binaries, cmdline, describe, processes_mentioning, signal, vmm_core_child, wait_gone, wait_timeout, Collector,
    Reaper,
};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(30);
const REPLY: Duration = Duration::from_secs(10);
const EXIT: Duration = Duration::from_secs(15);
const INSTANCE: &str = "dbustest";
const BUS_NAME: &str = "org.flotilla.dbustest.VmmCore";
const PATH: &str = "/org/flotilla/VmmCore";
const IFACE: &str = "org.flotilla.VmmCore1";

/// A VM started through flotilla (COM1 on a unix socket, the runtime directory and so the bus
/// inside the test's scratch directory), with the bus address vmm-core was given.
struct Vm {
    reaper: Reaper,
    stderr: Collector,
    console: Console,
    address: String,
    core: i32,
    dir: TempDir,
}

impl Vm {
    fn start(tag: &str, cpus: &str) -> Vm {
        let dir = TempDir::new(tag);
        let sock = dir.path("serial.sock");
        let serial = format!("unix:{},server=on,wait=on", sock.display());
        let elf = guest_elf().display().to_string();
        let mut child = Command::new(&binaries().flotilla)
            .env("FLOTILLA_VMM_CORE", &binaries().vmm_core)
            .env("XDG_RUNTIME_DIR", &dir.0)
            .env_remove("RUST_LOG")
            .args(["-name", INSTANCE, "-m", "128", "-smp", cpus, "-kernel", &elf, "-serial", &serial])
            .args(["-display", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning flotilla");
        let stderr = Collector::new(child.stderr.take().expect("stderr"));
        let reaper = Reaper::new(child, &dir.0.display().to_string());
        let mut console = Console::connect(&sock, BOOT).unwrap_or_else(|e| panic!("{e}"));
        console.expect("READY", BOOT).unwrap_or_else(|e| panic!("{e}"));
        let core = vmm_core_child(reaper.pid(), BOOT).expect("flotilla has a vmm-core child");
        let args = cmdline(core).expect("vmm-core's command line");
        let address = args
            .split(' ')
            .skip_while(|a| *a != "--dbus-address")
            .nth(1)
            .unwrap_or_else(|| panic!("no --dbus-address in {args}"))
            .to_string();
        assert!(args.contains(&format!("--instance {INSTANCE}")), "{args}");
        let runtime = dir.0.join("flotilla");
        assert!(address.starts_with(&format!("unix:path={}/{INSTANCE}-", runtime.display())), "{address}");
        Vm { reaper, stderr, console, address, core, dir }
    }

    /// `busctl --address=ADDR ARGS...`, bounded.
    fn busctl(&self, args: &[&str]) -> Output {
        let mut child = Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("busctl is installed (systemd)");
        let mut out = Collector::new(child.stdout.take().expect("stdout"));
        let mut err = Collector::new(child.stderr.take().expect("stderr"));
        let status = wait_timeout(&mut child, REPLY).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("busctl {args:?} did not finish within {REPLY:?}")
        });
        Output { status, stdout: out.take().into_bytes(), stderr: err.take().into_bytes() }
    }

    /// `busctl --json=short call` of a VmmCore1 method that must succeed: its `data` array.
    fn call(&self, method: &str, sig_and_args: &[&str]) -> Vec<Value> {
        let mut args = vec!["--json=short", "call", BUS_NAME, PATH, IFACE, method];
        args.extend_from_slice(sig_and_args);
        let o = self.busctl(&args);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "busctl call {method}: {}\n{out}", String::from_utf8_lossy(&o.stderr));
        if out.trim().is_empty() {
            return Vec::new();
        }
        let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{method}: {e}: {out}"));
        v["data"].as_array().cloned().unwrap_or_default()
    }

    /// A method returning JSON text: the parsed value.
    fn query(&self, method: &str) -> Value {
        let data = self.call(method, &[]);
        let text = data.first().and_then(Value::as_str).unwrap_or_else(|| panic!("{method}: {data:?}"));
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{method}: {e}: {text}"))
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        wait_timeout(self.reaper.child(), EXIT).unwrap_or_else(|| panic!("flotilla still running after {EXIT:?}"))
    }

    /// After flotilla exited: no process of the VM (vmm-core, dbus-daemon), no runtime directory.
    fn assert_cleaned_up(&self) {
        assert!(wait_gone(self.core, Duration::from_secs(2)), "vmm-core outlived flotilla");
        let left = processes_mentioning(&self.dir.0.display().to_string());
        assert!(left.is_empty(), "processes left running: {left:?}");
        let runtime = self.dir.0.join("flotilla");
        assert!(!runtime.exists(), "runtime directory left: {:?}", std::fs::read_dir(&runtime).map(|d| d.count()));
    }
}

/// A zbus client on the VM's bus, with the QmpEvent signals routed to it.
struct Client {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    /// Every message this connection receives (signals and replies), in arrival order.
    all: MessageStream,
    _events: MessageStream,
}

impl Client {
    fn connect(address: &str) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let (conn, all, events) = rt.block_on(async {
            let conn = tokio::time::timeout(REPLY, zbus::connection::Builder::address(address).build())
                .await
                .expect("connect in time")
                .expect("connect");
            let all = MessageStream::from(&conn);
            let rule = MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .interface(EVENTS_INTERFACE)
                .member(EVENT_SIGNAL)
                .path(PATH)
                .build()
                .expect("rule");
            let events = MessageStream::for_match_rule(rule, &conn, None).await.expect("AddMatch");
            (conn, all, events)
        });
        Client { rt, conn, all, _events: events }
    }

    /// Calls a method; returns its reply, or the D-Bus error (name, message).
    fn call<B>(&self, method: &str, body: &B) -> Result<Message, (String, String)>
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        let fut = self.conn.call_method(Some(BUS_NAME), PATH, Some(IFACE), method, body);
        match self.rt.block_on(async { tokio::time::timeout(REPLY, fut).await }).expect("reply in time") {
            Ok(m) => Ok(m),
            Err(zbus::Error::MethodError(name, msg, _)) => Err((name.to_string(), msg.unwrap_or_default())),
            Err(e) => panic!("{method}: {e}"),
        }
    }

    /// The next received message (signal or reply), within `REPLY`.
    fn next(&mut self) -> Message {
        use std::future::poll_fn;
        use std::pin::Pin;
        use zbus::export::futures_core::Stream;
        let all = &mut self.all;
        let fut = poll_fn(|cx| Pin::new(&mut *all).poll_next(cx));
        match self.rt.block_on(async { tokio::time::timeout(REPLY, fut).await }) {
            Ok(Some(Ok(m))) => m,
            other => panic!("no message within {REPLY:?}: {other:?}"),
        }
    }

    /// Calls a method without arguments and returns, in arrival order, the QmpEvents that came
    /// before its reply: (event, data).
    fn call_collecting_events(&mut self, method: &str) -> Vec<(String, Value)> {
        let reply = self.call(method, &()).unwrap_or_else(|e| panic!("{method}: {e:?}"));
        let serial = reply.header().reply_serial().expect("a reply has a reply serial");
        let mut events = Vec::new();
        loop {
            let m = self.next();
            let h = m.header();
            if h.reply_serial() == Some(serial) {
                return events;
            }
            if let Some((e, d)) = qmp_event(&m) {
                events.push((e, d));
            }
        }
    }

    /// The next QmpEvent, skipping other messages.
    fn next_event(&mut self) -> (String, Value) {
        let deadline = Instant::now() + REPLY;
        while Instant::now() < deadline {
            if let Some(e) = qmp_event(&self.next()) {
                return e;
            }
        }
        panic!("no QmpEvent within {REPLY:?}");
    }
}

fn qmp_event(m: &Message) -> Option<(String, Value)> {
    let h = m.header();
    if h.member().map(|n| n.as_str()) != Some(EVENT_SIGNAL)
        || h.interface().map(|i| i.as_str()) != Some(EVENTS_INTERFACE)
    {
        return None;
    }
    let (event, data, secs, usecs): (String, String, i64, i64) = m.body().deserialize().expect("QmpEvent is (ssxx)");
    assert!(secs > 1_600_000_000 && (0..1_000_000).contains(&usecs), "timestamp {secs}.{usecs}");
    Some((event, serde_json::from_str(&data).expect("data is JSON")))
}

fn tick(line: &str) -> u64 {
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad TICK line {line:?}"))
}

#[test]
fn busctl_and_a_zbus_client_drive_vmm_core_through_flotilla() {
    let mut vm = Vm::start("dbus-core", "2");

    // Introspection: exactly the methods vmm-core implements, typed as the schema says; the
    // QOM methods are not there yet; the event signal is.
    let o = vm.busctl(&["introspect", BUS_NAME, PATH]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let iface = dbus::interface("vmm-core").expect("vmm-core");
    for m in dbus::methods(iface) {
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(&format!(".{}", m.name)));
        let exported = vmm_core::dbus::EXPORTED.contains(&m.command.name);
        match line {
            Some(l) => {
                assert!(exported, "{} is shown but not implemented: {l}", m.name);
                let cols: Vec<&str> = l.split_whitespace().collect();
                let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
                assert_eq!(cols[1], "method", "{l}");
                assert_eq!(cols[2], dash(&m.in_signature()), "{l}");
                assert_eq!(cols[3], dash(m.out_signature()), "{l}");
            }
            None => assert!(!exported, "{} missing from:\n{text}", m.name),
        }
    }
    assert!(!text.contains(".QomList"), "{text}");
    assert!(text.lines().any(|l| l.starts_with(".QmpEvent") && l.contains("signal") && l.contains("ssxx")), "{text}");
    assert_eq!(vmm_core::dbus::EXPORTED.len(), iface.commands.len() - 3);

    // Queries through busctl.
    let status = vm.query("QueryStatus");
    assert_eq!(status, serde_json::json!({"running": true, "singlestep": false, "status": "running"}));
    assert_eq!(vm.query("QueryName"), serde_json::json!({"name": INSTANCE}));
    assert_eq!(
        vm.query("QueryVersion"),
        serde_json::json!({"qemu": {"major": 1, "minor": 1, "micro": 0}, "package": format!("flotilla-{}", env!("CARGO_PKG_VERSION"))})
    );
    assert_eq!(vm.query("QueryKvm"), serde_json::json!({"enabled": true, "present": true}));
    assert_eq!(vm.query("QueryMigrate"), serde_json::json!({}));
    let cpus = vm.query("QueryCpus");
    let cpus = cpus.as_array().expect("list");
    assert_eq!(cpus.len(), 2);
    assert_eq!((cpus[0]["CPU"].as_i64(), cpus[0]["current"].as_bool()), (Some(0), Some(true)));
    assert_eq!((cpus[1]["CPU"].as_i64(), cpus[1]["current"].as_bool()), (Some(1), Some(false)));
    assert!(cpus[0]["thread_id"].as_i64().is_some_and(|t| t > 0));
    let pci = vm.query("QueryPci");
    assert_eq!(pci[0]["devices"][0]["class_info"], serde_json::json!({"desc": "Host bridge", "class": 1536}));
    assert_eq!(vm.query("QueryChardev")[0]["label"], "serial0");

    // `cpu`: a bad index is the seed's InvalidParameterValue, as a QMP error in the D-Bus error.
    let o = vm.busctl(&["call", BUS_NAME, PATH, IFACE, "Cpu", "x", "7"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(r#""class":"InvalidParameterValue""#) && err.contains("Parameter 'index' expects a CPU number"),
        "{err}"
    );
    vm.call("Cpu", &["x", "1"]);
    assert_eq!(vm.query("QueryCpus")[1]["current"], true, "cpu 1 is now current");
    vm.call("Cpu", &["x", "0"]);

    // stop freezes the guest, STOP before the reply; cont resumes it, RESUME before the reply.
    let mut client = Client::connect(&vm.address);
    vm.console.send("spin").expect("spin");
    let before = tick(&vm.console.expect("TICK", REPLY).expect("tick"));
    assert_eq!(client.call_collecting_events("Stop"), [("STOP".to_string(), serde_json::json!({}))]);
    assert_eq!(vm.query("QueryStatus")["status"], "paused");
    vm.console.drain_for(Duration::from_millis(200));
    let frozen = vm.console.drain_for(Duration::from_millis(1500));
    assert!(frozen.is_empty(), "guest ran while stopped: {frozen:?}");
    assert_eq!(client.call_collecting_events("Cont"), [("RESUME".to_string(), serde_json::json!({}))]);
    let after = tick(&vm.console.expect("TICK", REPLY).expect("tick after cont"));
    assert!(after > before, "the counter goes on: {before} then {after}");
    assert_eq!(client.call_collecting_events("Stop"), [("STOP".to_string(), serde_json::json!({}))]);
    assert_eq!(client.call_collecting_events("Stop"), [], "stop while stopped: no event, no error");
    client.call_collecting_events("Cont");
    vm.console.command("ping", "PONG", REPLY).expect("ping ends spin");

    // memsave of a guest-virtual kernel-style address (negative as int64), default CPU.
    let wrote = vm.console.command("write ffff800000400000 c0ffee11 8192", "WROTE", REPLY).expect("write");
    assert!(wrote.starts_with("WROTE 0xffff800000400000"), "{wrote}");
    let out = vm.dir.path("memsave.bin");
    let val = 0xffff_8000_0040_0000_u64 as i64;
    let file = out.display().to_string();
    client.call("Memsave", &(val, 8192i64, file.as_str(), Vec::<i64>::new())).expect("memsave");
    let bytes = std::fs::read(&out).expect("memsave file");
    assert_eq!(bytes.len(), 8192);
    assert!(bytes.chunks(4).all(|c| c == 0xc0ff_ee11_u32.to_le_bytes()), "memsave returned what the guest wrote");
    let (name, msg) = client.call("Memsave", &(val, 16i64, file.as_str(), vec![9i64])).expect_err("bad cpu");
    let e = dbus::parse_error_message(&name, &msg).expect("QMP error");
    assert_eq!(
        (e.class.as_str(), e.desc.as_str()),
        ("InvalidParameterValue", "Parameter 'cpu-index' expects a CPU number")
    );
    let (name, msg) = client.call("Pmemsave", &(0i64, 16i64, "/nonexistent/dir/x.bin")).expect_err("bad path");
    let e = dbus::parse_error_message(&name, &msg).expect("QMP error");
    assert_eq!(e.class, "OpenFileFailed", "{msg}");
    assert_eq!(e.data, Some(serde_json::json!({"filename": "/nonexistent/dir/x.bin"})));

    // system_reset: RESET (host) before the reply; the guest boots again.
    let events = client.call_collecting_events("SystemReset");
    assert_eq!(events, [("RESET".to_string(), serde_json::json!({"guest": false, "reason": "host-qmp-system-reset"}))]);
    let banner = vm.console.expect("FLOTILLA-GUEST", BOOT).expect("rebooted");
    assert_eq!(field(&banner, "boot"), Some("2"), "{banner}");
    vm.console.expect("READY", BOOT).expect("ready after reset");

    // quit: SHUTDOWN before the reply, then everything ends, exit 0, nothing left.
    let events = client.call_collecting_events("Quit");
    assert_eq!(events, [("SHUTDOWN".to_string(), serde_json::json!({"guest": false, "reason": "host-qmp-quit"}))]);
    let status = vm.wait_exit();
    let stderr = vm.stderr.take();
    assert_eq!(status.code(), Some(0), "flotilla ended with {}; stderr:\n{stderr}", describe(status));
    vm.assert_cleaned_up();
}

#[test]
fn powerdown_and_signal_shutdowns_are_signalled_with_their_reason() {
    // system_powerdown: POWERDOWN before the reply; the test guest answers the ACPI power
    // button by powering off: SHUTDOWN guest-shutdown, and the VM ends.
    let mut vm = Vm::start("dbus-powerdown", "1");
    let mut client = Client::connect(&vm.address);
    let shutdown = ("SHUTDOWN".to_string(), serde_json::json!({"guest": true, "reason": "guest-shutdown"}));
    let mut events = client.call_collecting_events("SystemPowerdown");
    // POWERDOWN comes before the reply; the guest's SHUTDOWN may too (a quick guest powers
    // off before this client has read the reply; seen once in CI), never before POWERDOWN.
    assert_eq!(events.first(), Some(&("POWERDOWN".to_string(), serde_json::json!({}))), "{events:?}");
    vm.console.expect("POWER-BUTTON", REPLY).expect("the guest saw the power button");
    if events.len() == 1 {
        events.push(client.next_event());
    }
    assert_eq!(events[1..], [shutdown], "{events:?}");
    let status = vm.wait_exit();
    assert_eq!(status.code(), Some(0), "{}; stderr:\n{}", describe(status), vm.stderr.take());
    vm.assert_cleaned_up();
    drop(client);

    // SIGTERM to the launcher: vmm-core gets it and says SHUTDOWN host-signal; all ends.
    let mut vm = Vm::start("dbus-sigterm", "1");
    let mut client = Client::connect(&vm.address);
    signal(vm.reaper.pid(), libc::SIGTERM);
    assert_eq!(
        client.next_event(),
        ("SHUTDOWN".to_string(), serde_json::json!({"guest": false, "reason": "host-signal"}))
    );
    let status = vm.wait_exit();
    let stderr = vm.stderr.take();
    assert_eq!(status.code(), Some(0), "{}; stderr:\n{stderr}", describe(status));
    assert!(stderr.contains("terminating on signal"), "{stderr}");
    vm.assert_cleaned_up();
}
