//! blockd's D-Bus side on a private `dbus-daemon`: started as the launcher starts it
//! (`--config-json`, `--ready-fd`), it owns `org.flotilla.<instance>.Block` and answers the QMP
//! block commands (query-block, query-blockstats, block_resize, blockdev-snapshot-sync,
//! block_passwd) with the seed's error classes; images come from `qemu-img` and what blockd
//! writes passes `qemu-img check`. And vmm-core's side of the io-error path: a BLOCK_IO_ERROR
//! signal with action stop from the owner of the Block name pauses the test guest in
//! `io-error`; `cont` resumes it and the RESUME signal goes out on the bus.
//!
//! The guest I/O that makes blockd hold a request and retry it on RESUME is in
//! `blockd_qemu.rs` (QEMU as the frontend, ENOSPC on a tmpfs). Every wait is bounded.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_schema::dbus::{self, parse_error_message, EVENTS_INTERFACE, EVENT_SIGNAL};
use flotilla_schema::dbus_server::zbus::export::futures_core::Stream;
use flotilla_schema::dbus_server::zbus::{self, Connection, MatchRule, MessageStream};
use flotilla_tests::bus::Bus;
use flotilla_tests::machine::{boot, guest_config, TempDir};
use flotilla_tests::process::{binaries, spawn_ready, wait_timeout, Collector, Reaper};
use serde_json::{json, Value};
use vm_config::{BlockdConfig, CacheMode, DriveConfig, DriveFormat, ErrorAction};
use vmm_core::{RunState, VmEventKind};

const START: Duration = Duration::from_secs(15);
const REPLY: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;
const PATH: &str = "/org/flotilla/Block";
const IFACE: &str = "org.flotilla.Block1";

/// A zbus client on its own runtime.
struct Client {
    rt: tokio::runtime::Runtime,
    conn: Connection,
}

impl Client {
    fn connect(address: &str) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let conn = rt.block_on(async {
            tokio::time::timeout(REPLY, zbus::connection::Builder::address(address).build())
                .await
                .expect("connect in time")
                .expect("connect")
        });
        Client { rt, conn }
    }

    /// Calls `method` on blockd; Ok(body) or Err(the QMP error object).
    fn call<B>(&self, bus: &str, method: &str, body: &B) -> Result<Option<Value>, Value>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        self.rt.block_on(async {
            let call = self.conn.call_method(Some(bus), PATH, Some(IFACE), method, body);
            match tokio::time::timeout(REPLY, call).await.expect("reply in time") {
                Ok(reply) => {
                    let text: Option<String> = reply.body().deserialize().ok();
                    Ok(text.map(|t| serde_json::from_str(&t).expect("the reply is JSON")))
                }
                Err(zbus::Error::MethodError(name, msg, _)) => {
                    let e = parse_error_message(name.as_str(), msg.as_deref().unwrap_or_default())
                        .unwrap_or_else(|| panic!("{method}: not a QMP error: {name} {msg:?}"));
                    Err(serde_json::to_value(e).expect("error to JSON"))
                }
                Err(e) => panic!("{method}: {e}"),
            }
        })
    }

    fn introspect(&self, bus: &str) -> String {
        self.rt.block_on(async {
            let call =
                self.conn.call_method(Some(bus), PATH, Some("org.freedesktop.DBus.Introspectable"), "Introspect", &());
            let reply = tokio::time::timeout(REPLY, call).await.expect("in time").expect("introspect");
            reply.body().deserialize::<String>().expect("xml")
        })
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn drive(id: &str, file: &Path, format: DriveFormat, readonly: bool) -> DriveConfig {
    DriveConfig {
        id: id.into(),
        file: file.into(),
        format,
        readonly,
        cache: CacheMode::Writeback,
        werror: ErrorAction::Enospc,
        rerror: ErrorAction::Report,
        serial: None,
        socket: None,
        num_queues: 1,
    }
}

/// blockd started the launcher's way; returns once it wrote `ready` on its pipe.
fn start_blockd(dir: &TempDir, bus: &Bus, instance: &str, cfg: &BlockdConfig) -> (Reaper, Collector) {
    let mut cmd = Command::new(&binaries().blockd);
    cmd.arg("--config-json")
        .arg(cfg.to_json())
        .args(["--dbus-address", &bus.address, "--instance", instance])
        .env("BLOCKD_LOG", "info");
    spawn_ready(&mut cmd, &dir.0.display().to_string(), START)
}

fn class(e: &Value) -> &str {
    e["class"].as_str().unwrap_or_default()
}

#[test]
fn blockd_answers_the_qmp_block_commands_over_dbus() {
    let dir = TempDir::new("blockd-dbus");
    let bus = Bus::start(&dir, START);
    let raw = dir.path("disk.raw");
    let base = dir.path("base.raw");
    let top = dir.path("top.qcow2");
    let ro = dir.path("ro.raw");
    run(Command::new("qemu-img").args(["create", "-f", "raw"]).arg(&raw).arg("8M"));
    run(Command::new("qemu-img").args(["create", "-f", "raw"]).arg(&base).arg("16M"));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 0 1M"]).arg(&base));
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-F", "raw", "-b"]).arg(&base).arg(&top));
    run(Command::new("qemu-img").args(["create", "-f", "raw"]).arg(&ro).arg("1M"));
    let cfg = BlockdConfig {
        drives: vec![
            drive("d0", &raw, DriveFormat::Raw, false),
            DriveConfig { werror: ErrorAction::Report, ..drive("d1", &top, DriveFormat::Qcow2, false) },
            drive("d2", &ro, DriveFormat::Raw, true),
        ],
        state_file: None,
    };
    let (mut blockd, mut log) = start_blockd(&dir, &bus, "blk-dbus", &cfg);
    let name = dbus::bus_name("blk-dbus", "Block");
    let c = Client::connect(&bus.address);

    // Exactly the commands blockd serves are on the bus.
    let xml = c.introspect(&name);
    for m in ["QueryBlock", "QueryBlockstats", "BlockResize", "BlockdevSnapshotSync", "BlockPasswd"] {
        assert!(xml.contains(&format!("<method name=\"{m}\"")), "{m} not introspected:\n{xml}");
    }
    assert!(!xml.contains("QomList"), "unimplemented methods are hidden:\n{xml}");

    // query-block: every drive, socket or not, as QEMU 1.1 describes it.
    let blocks = c.call(&name, "QueryBlock", &()).expect("query-block").expect("body");
    let want0 = json!({"device": "d0", "type": "hd", "removable": false, "locked": false, "io-status": "ok",
        "inserted": {"file": raw.display().to_string(), "ro": false, "drv": "raw", "encrypted": false,
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}});
    assert_eq!(blocks[0], want0, "{blocks}");
    assert_eq!(blocks[1]["inserted"]["drv"], "qcow2", "{blocks}");
    assert_eq!(blocks[1]["inserted"]["backing_file"], base.display().to_string(), "{blocks}");
    assert!(blocks[1].get("io-status").is_none(), "werror=report, rerror=report: no io-status: {blocks}");
    assert_eq!(blocks[2]["inserted"]["ro"], true, "{blocks}");

    // query-blockstats: device counters, and the file layer as `parent`.
    let stats = c.call(&name, "QueryBlockstats", &()).expect("query-blockstats").expect("body");
    assert_eq!(stats.as_array().map(Vec::len), Some(3), "{stats}");
    assert_eq!(stats[0]["device"], "d0");
    for k in [
        "rd_bytes",
        "wr_bytes",
        "rd_operations",
        "wr_operations",
        "flush_operations",
        "flush_total_time_ns",
        "wr_total_time_ns",
        "rd_total_time_ns",
        "wr_highest_offset",
    ] {
        assert_eq!(stats[0]["stats"][k], 0, "{k}: {stats}");
        assert_eq!(stats[0]["parent"]["stats"][k], 0, "{k}: {stats}");
    }
    assert!(stats[0]["parent"].get("device").is_none(), "{stats}");

    // block_resize: raw grows and shrinks (QEMU 7.2 accepts both), errors as the seed says.
    c.call(&name, "BlockResize", &("d0", (32 * MIB) as i64)).expect("grow");
    assert_eq!(std::fs::metadata(&raw).expect("raw").len(), 32 * MIB);
    c.call(&name, "BlockResize", &("d0", (4 * MIB) as i64)).expect("shrink");
    assert_eq!(std::fs::metadata(&raw).expect("raw").len(), 4 * MIB);
    let e = c.call(&name, "BlockResize", &("nosuch", MIB as i64)).expect_err("unknown device");
    assert_eq!(
        e,
        json!({"class": "DeviceNotFound", "desc": "Cannot find device='nosuch' nor node-name=''",
        "data": {"device": "nosuch"}})
    );
    let e = c.call(&name, "BlockResize", &("d0", -1i64)).expect_err("negative");
    assert_eq!((class(&e), e["desc"].as_str()), ("InvalidParameterValue", Some("Parameter 'size' expects a >0 size")));
    let e = c.call(&name, "BlockResize", &("d2", (2 * MIB) as i64)).expect_err("read-only");
    assert_eq!(class(&e), "DeviceIsReadOnly", "{e}");
    let e = c.call(&name, "BlockResize", &("d1", 12345i64)).expect_err("qcow2 unaligned");
    assert_eq!(e["desc"], "The new size must be a multiple of 512", "{e}");
    c.call(&name, "BlockResize", &("d1", (24 * MIB) as i64)).expect("qcow2 grow");

    // block_passwd: nothing here is encrypted.
    let e = c.call(&name, "BlockPasswd", &("d0", "x")).expect_err("not encrypted");
    assert_eq!(class(&e), "DeviceNotEncrypted", "{e}");
    let e = c.call(&name, "BlockPasswd", &("nosuch", "x")).expect_err("unknown");
    assert_eq!(class(&e), "DeviceNotFound", "{e}");

    // blockdev-snapshot-sync: format checks, unopenable files, then a real overlay.
    let snap = dir.path("snap.qcow2");
    let s = snap.display().to_string();
    let e = c.call(&name, "BlockdevSnapshotSync", &("d1", &s, vec!["vmdk9"])).expect_err("bad format");
    assert_eq!(
        e,
        json!({"class": "InvalidBlockFormat", "desc": "Invalid block format 'vmdk9'", "data": {"name": "vmdk9"}})
    );
    let e = c
        .call(&name, "BlockdevSnapshotSync", &("d1", "/nonexistent/dir/s.qcow2", Vec::<String>::new()))
        .expect_err("unopenable");
    assert_eq!(class(&e), "OpenFileFailed", "{e}");
    let e = c.call(&name, "BlockdevSnapshotSync", &("nosuch", &s, Vec::<String>::new())).expect_err("unknown");
    assert_eq!(class(&e), "DeviceNotFound", "{e}");
    let e = c
        .call(&name, "BlockdevSnapshotSync", &("d1", top.display().to_string(), Vec::<String>::new()))
        .expect_err("the image in use is never overwritten");
    assert_eq!(class(&e), "OpenFileFailed", "{e}");
    c.call(&name, "BlockdevSnapshotSync", &("d1", &s, vec!["qcow2"])).expect("snapshot");
    let blocks = c.call(&name, "QueryBlock", &()).expect("query-block").expect("body");
    assert_eq!(blocks[1]["inserted"]["file"], s, "{blocks}");
    assert_eq!(blocks[1]["inserted"]["drv"], "qcow2", "{blocks}");
    assert_eq!(blocks[1]["inserted"]["backing_file"], top.display().to_string(), "{blocks}");
    // A raw drive snapshots too: the overlay's backing format is raw.
    let snap0 = dir.path("snap0.qcow2");
    c.call(&name, "BlockdevSnapshotSync", &("d0", snap0.display().to_string(), Vec::<String>::new())).expect("raw");

    // blockd exits cleanly on SIGTERM (images flushed); qemu-img sees clean, right images.
    flotilla_tests::process::signal(blockd.pid(), libc::SIGTERM);
    let st = wait_timeout(blockd.child(), REPLY);
    assert!(st.is_some_and(|s| s.success()), "blockd on SIGTERM: {st:?}\n{}", log.take());
    let info = run(Command::new("qemu-img").args(["info", "--output=json"]).arg(&snap));
    let info: Value = serde_json::from_str(&info).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], 24 * MIB, "{info}");
    assert_eq!(info["backing-filename"], top.display().to_string(), "{info}");
    run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&snap));
    run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&top));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "read -P 0x5c 0 1M", "-c", "read -P 0 16M 8M"]).arg(&snap));
    run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&snap0));
    run(Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&snap0).arg(&raw));
}

#[test]
fn blockd_config_errors_are_clear() {
    let dir = TempDir::new("blockd-dbus-bad");
    let bus = Bus::start(&dir, START);
    let cfg =
        BlockdConfig { drives: vec![drive("d0", &dir.path("missing.raw"), DriveFormat::Raw, false)], state_file: None };
    let out = Command::new(&binaries().blockd)
        .arg("--config-json")
        .arg(cfg.to_json())
        .args(["--dbus-address", &bus.address, "--instance", "bad"])
        .output()
        .expect("blockd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("drive 'd0'") && err.contains("missing.raw"), "{err}");
    let out = Command::new(&binaries().blockd).args(["--config-json", "{\"drives\": 3}"]).output().expect("blockd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config-json"), "{out:?}");
}

/// The next `QmpEvent` on `stream` named `want`, bounded.
fn next_event(rt: &tokio::runtime::Runtime, stream: &mut MessageStream, want: &str) -> Value {
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + REPLY;
        loop {
            let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx));
            let msg = tokio::time::timeout_at(deadline, next).await.unwrap_or_else(|_| panic!("no {want} in time"));
            let msg = msg.expect("stream open").expect("message");
            let (event, data, _, _): (String, String, i64, i64) = msg.body().deserialize().expect("(ssxx)");
            if event == want {
                return serde_json::from_str(&data).expect("data JSON");
            }
        }
    })
}

#[test]
fn vmm_core_pauses_in_io_error_on_blockds_stop_event() {
    let dir = TempDir::new("blockd-dbus-core");
    let bus = Bus::start(&dir, START);
    let mut b = boot(guest_config(&dir, 1, 64), TempDir::new("blockd-dbus-core-vm"));
    let events = b.vm.subscribe();
    let server = vmm_core::dbus::DbusServer::start(b.vm.clone(), &bus.address, "ioerr").expect("vmm-core on the bus");

    // A stand-in blockd: owns the Block name, emits QmpEvent there, hears vmm-core's RESUME.
    let fake = Client::connect(&bus.address);
    let core_name = dbus::bus_name("ioerr", "VmmCore");
    let mut core_events = fake.rt.block_on(async {
        fake.conn.request_name(dbus::bus_name("ioerr", "Block")).await.expect("own the Block name");
        let rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(core_name.as_str())
            .interface(EVENTS_INTERFACE)
            .member(EVENT_SIGNAL)
            .build()
            .expect("rule");
        MessageStream::for_match_rule(rule, &fake.conn, None).await.expect("AddMatch")
    });
    let emit = |action: &str| {
        fake.rt.block_on(async {
            let data = json!({"device": "d0", "operation": "write", "action": action, "nospace": true,
                "reason": "No space left on device"});
            flotilla_schema::dbus_server::emit_qmp_event(
                &fake.conn,
                PATH,
                "BLOCK_IO_ERROR",
                &data,
                std::time::SystemTime::now(),
            )
            .await
            .expect("emit");
        })
    };

    // action report: nothing stops.
    emit("report");
    b.console.command("ping", "PONG", REPLY).expect("the guest still runs");
    assert_eq!(b.vm.status(), (RunState::Running, true));

    // action stop: paused in io-error, STOP on the bus. (The guest spins, printing TICKs, so
    // it is seen to stop and to run again, as in vmm_core_guest's stop/cont test.)
    b.console.send("spin").expect("spin");
    b.console.expect("TICK", REPLY).expect("ticking");
    emit("stop");
    let deadline = Instant::now() + REPLY;
    while b.vm.status().0 != RunState::IoError {
        assert!(Instant::now() < deadline, "not in io-error: {:?}", b.vm.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(b.vm.status(), (RunState::IoError, false));
    assert_eq!(next_event(&fake.rt, &mut core_events, "STOP"), json!({}));
    let kinds: Vec<VmEventKind> = events.try_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec![VmEventKind::Stop], "one STOP");
    b.vm.cont().expect("cont");
    assert_eq!(b.vm.status(), (RunState::Running, true));
    assert_eq!(next_event(&fake.rt, &mut core_events, "RESUME"), json!({}));
    b.console.expect("TICK", REPLY).expect("the guest runs again");
    b.console.command("ping", "PONG", REPLY).expect("ping ends spin");
    server.shutdown(REPLY);
    b.vm.quit();
}
