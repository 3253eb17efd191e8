//! The generated zbus glue on a real bus: a private `dbus-daemon` (started by the test with its
//! own config file, killed at the end), a mock `VmmCore1Handler` exporting a few commands, and a
//! zbus client that introspects and calls it. Run with `--features dbus`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use flotilla_schema::check::QmpError;
use flotilla_schema::commands::MemsaveArgs;
use flotilla_schema::dbus::{self, ERROR_NAME};
use flotilla_schema::dbus_server::zbus::{self, fdo, Connection, MatchRule, MessageStream};
use flotilla_schema::dbus_server::{self as server, emit_qmp_event, Exported, VmmCore1, VmmCore1Handler};
use flotilla_schema::types::{CpuInfo, RunState, StatusInfo};

const WAIT: Duration = Duration::from_secs(10);

/// A private bus: `dbus-daemon --config-file` listening in a scratch directory; killed on drop.
struct Bus {
    child: Child,
    address: String,
    dir: PathBuf,
}

impl Bus {
    fn start(tag: &str) -> Bus {
        let dir = std::env::temp_dir().join(format!("flotilla-schema-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
                 \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
                 <busconfig>\n  <listen>unix:dir={}</listen>\n  <auth>EXTERNAL</auth>\n  \
                 <policy context=\"default\">\n    <allow send_destination=\"*\" eavesdrop=\"true\"/>\n    \
                 <allow eavesdrop=\"true\"/>\n    <allow own=\"*\"/>\n  </policy>\n</busconfig>\n",
                dir.display()
            ),
        )
        .expect("bus config");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--print-address", "--nofork", "--nopidfile"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dbus-daemon is installed");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let address = match rx.recv_timeout(WAIT) {
            Ok(l) if !l.trim().is_empty() => l.trim().to_string(),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dbus-daemon printed no address: {other:?}");
            }
        };
        Bus { child, address, dir }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A mock vmm-core: three commands, recording what memsave got.
#[derive(Default)]
struct Mock {
    memsaves: Mutex<Vec<MemsaveArgs>>,
}

impl VmmCore1Handler for Mock {
    async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        Ok(StatusInfo { running: false, singlestep: false, status: RunState::Paused })
    }

    async fn query_cpus(&self) -> Result<Vec<CpuInfo>, QmpError> {
        Ok(vec![CpuInfo {
            cpu: 0,
            current: true,
            halted: false,
            pc: Some(0x10_0000),
            nip: None,
            npc: None,
            pc_upper: None,
            thread_id: 42,
        }])
    }

    async fn memsave(&self, args: MemsaveArgs) -> Result<(), QmpError> {
        let fail = args.filename == "/nonexistent/x";
        self.memsaves.lock().unwrap().push(args);
        if fail {
            return Err(QmpError {
                class: "OpenFileFailed".into(),
                desc: "Could not open '/nonexistent/x': No such file or directory".into(),
                data: Some(serde_json::json!({"filename": "/nonexistent/x"})),
            });
        }
        Ok(())
    }
}

const EXPORTED: [&str; 3] = ["query-status", "query-cpus", "memsave"];
const NAME: &str = "org.flotilla.test_vm.VmmCore";
const PATH: &str = "/org/flotilla/VmmCore";
const IFACE: &str = "org.flotilla.VmmCore1";

async fn introspect(conn: &Connection) -> String {
    let reply = conn
        .call_method(Some(NAME), PATH, Some("org.freedesktop.DBus.Introspectable"), "Introspect", &())
        .await
        .expect("Introspect");
    reply.body().deserialize::<String>().expect("XML string")
}

/// `(name, message)` of a failed call.
fn error_of(e: zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, msg, _) => (name.to_string(), msg.unwrap_or_default()),
        zbus::Error::FDO(f) => match *f {
            fdo::Error::UnknownMethod(m) => ("org.freedesktop.DBus.Error.UnknownMethod".into(), m),
            other => (format!("{other:?}"), String::new()),
        },
        other => panic!("not a method error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_glue_serves_introspects_and_round_trips() {
    let bus = Bus::start("glue");
    let mock = Arc::new(Mock::default());
    assert_eq!(dbus::bus_name("test-vm", "VmmCore"), NAME);
    assert_eq!(dbus::object_path("VmmCore"), PATH);
    let iface = Exported::new(VmmCore1::new(mock.clone()), &EXPORTED).expect("commands of VmmCore1");
    assert_eq!(iface.commands(), ["memsave", "query-cpus", "query-status"]);
    assert!(Exported::new(VmmCore1::new(mock.clone()), &["balloon"]).is_err(), "not a VmmCore1 command");
    let served = tokio::time::timeout(WAIT, server::serve(&bus.address, NAME, PATH, iface))
        .await
        .expect("connect in time")
        .expect("serve");
    let client = tokio::time::timeout(WAIT, zbus::connection::Builder::address(bus.address.as_str()).build())
        .await
        .expect("client in time")
        .expect("client");

    // Introspection shows exactly the exported methods, typed as dbus::method() says.
    let xml = introspect(&client).await;
    let vmm = dbus::interface("vmm-core").expect("vmm-core");
    let full = dbus::methods_in_xml(&dbus::introspection_xml(vmm), IFACE);
    let exported_names: Vec<&str> =
        EXPORTED.iter().map(|c| flotilla_schema::table::command(c).unwrap().rust_name).collect();
    let want: Vec<dbus::XmlMethod> = full.into_iter().filter(|(m, _)| exported_names.contains(&m.as_str())).collect();
    assert_eq!(dbus::methods_in_xml(&xml, IFACE), want, "{xml}");
    assert!(xml.contains("<annotation name=\"org.flotilla.Qmp.Command\" value=\"memsave\"/>"), "{xml}");
    assert!(xml.contains("<interface name=\"org.flotilla.Events1\">"), "{xml}");
    assert!(xml.contains("<signal name=\"QmpEvent\">"), "{xml}");
    assert!(!xml.contains("\"Stop\""), "an unexported method is hidden: {xml}");

    // A struct result as JSON of the generated type.
    let reply = client.call_method(Some(NAME), PATH, Some(IFACE), "QueryStatus", &()).await.expect("QueryStatus");
    let json: String = reply.body().deserialize().expect("s");
    let status: StatusInfo = serde_json::from_str(&json).expect("StatusInfo");
    assert_eq!(status.status, RunState::Paused);
    assert_eq!(json, r#"{"running":false,"singlestep":false,"status":"paused"}"#);
    let reply = client.call_method(Some(NAME), PATH, Some(IFACE), "QueryCpus", &()).await.expect("QueryCpus");
    let json: String = reply.body().deserialize().expect("s");
    assert_eq!(json, r#"[{"CPU":0,"current":true,"halted":false,"pc":1048576,"thread_id":42}]"#);

    // Typed arguments into the argument struct, the optional one as a 0/1 array.
    let call = |file: &'static str, cpu: Vec<i64>| {
        let client = client.clone();
        async move { client.call_method(Some(NAME), PATH, Some(IFACE), "Memsave", &(-4096i64, 4096i64, file, cpu)).await }
    };
    call("/tmp/a", vec![1]).await.expect("Memsave with cpu-index");
    call("/tmp/b", vec![]).await.expect("Memsave without cpu-index");
    {
        let got = mock.memsaves.lock().unwrap();
        assert_eq!(got[0], MemsaveArgs { val: -4096, size: 4096, filename: "/tmp/a".into(), cpu_index: Some(1) });
        assert_eq!(got[1].cpu_index, None);
    }

    // A QMP error travels as org.flotilla.Qmp.Error with the error object as JSON.
    let (name, msg) = error_of(call("/nonexistent/x", vec![]).await.expect_err("fails"));
    assert_eq!(name, ERROR_NAME);
    let err = dbus::parse_error_message(&name, &msg).expect("a QMP error");
    assert_eq!(err.class, "OpenFileFailed");
    assert_eq!(err.data, Some(serde_json::json!({"filename": "/nonexistent/x"})));
    // So does an argument the glue cannot unpack.
    let (name, msg) = error_of(call("/tmp/c", vec![1, 2]).await.expect_err("two cpu-index values"));
    let err = dbus::parse_error_message(&name, &msg).expect("a QMP error");
    assert_eq!(err.class, "InvalidParameterValue", "{msg}");
    // An unexported method does not exist; a wrong signature is refused by zbus.
    let e = client.call_method(Some(NAME), PATH, Some(IFACE), "Stop", &()).await.expect_err("Stop is not exported");
    assert_eq!(error_of(e).0, "org.freedesktop.DBus.Error.UnknownMethod");
    client.call_method(Some(NAME), PATH, Some(IFACE), "Memsave", &("x",)).await.expect_err("bad signature");

    // The QmpEvent signal.
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(dbus::EVENTS_INTERFACE)
        .member(dbus::EVENT_SIGNAL)
        .build()
        .expect("match rule");
    let mut stream = MessageStream::for_match_rule(rule, &client, None).await.expect("match rule");
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    emit_qmp_event(&served, PATH, "RESET", &serde_json::json!({"guest": false, "reason": "host-qmp-system-reset"}), at)
        .await
        .expect("emit");
    let msg = tokio::time::timeout(WAIT, futures_next(&mut stream)).await.expect("signal in time").expect("signal");
    let (event, data, secs, usecs): (String, String, i64, i64) = msg.body().deserialize().expect("(ssxx)");
    assert_eq!(event, "RESET");
    assert_eq!(data, r#"{"guest":false,"reason":"host-qmp-system-reset"}"#);
    assert_eq!((secs, usecs), (1_700_000_000, 123_456));
    assert_eq!(msg.header().path().map(|p| p.to_string()).as_deref(), Some(PATH));
}

/// Every command of every interface exported: the generated wrapper introspects exactly as
/// `dbus::introspection_xml` describes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_wrappers_match_the_schema_descriptions() {
    let bus = Bus::start("full");
    let mock = Arc::new(Mock::default());
    let vmm = dbus::interface("vmm-core").expect("vmm-core");
    let iface = Exported::new(VmmCore1::new(mock), vmm.commands).expect("all");
    let _served = server::serve(&bus.address, NAME, PATH, iface).await.expect("serve");
    let client = zbus::connection::Builder::address(bus.address.as_str()).build().await.expect("client");
    let xml = introspect(&client).await;
    assert_eq!(dbus::methods_in_xml(&xml, IFACE), dbus::methods_in_xml(&dbus::introspection_xml(vmm), IFACE), "{xml}");
    // A method the daemon did not override answers CommandNotFound.
    let e = client.call_method(Some(NAME), PATH, Some(IFACE), "Stop", &()).await.expect_err("default");
    let (name, msg) = error_of(e);
    let err = dbus::parse_error_message(&name, &msg).expect("QMP error");
    assert_eq!((err.class.as_str(), err.desc.as_str()), ("CommandNotFound", "The command stop has not been found"));
}

/// The other interfaces' wrappers, introspected without a bus (zbus writes the same XML).
#[test]
fn every_generated_wrapper_introspects_as_described() {
    use flotilla_schema::dbus_server::{Balloon1, Block1, Display1, Net1};
    use flotilla_schema::dbus_server::{Balloon1Handler, Block1Handler, Display1Handler, Net1Handler};
    use zbus::object_server::Interface;
    struct Nothing;
    impl Block1Handler for Nothing {}
    impl Net1Handler for Nothing {}
    impl Display1Handler for Nothing {}
    impl Balloon1Handler for Nothing {}
    fn xml<I: Interface>(i: &I) -> String {
        let mut s = String::from("<node>\n");
        i.introspect_to_writer(&mut s, 2);
        s.push_str("</node>\n");
        s
    }
    let h = Arc::new(Nothing);
    let pairs = [
        ("blockd", xml(&Block1::new(h.clone()))),
        ("netd", xml(&Net1::new(h.clone()))),
        ("displayd", xml(&Display1::new(h.clone()))),
        ("balloond", xml(&Balloon1::new(h.clone()))),
    ];
    for (daemon, got) in pairs {
        let i = dbus::interface(daemon).expect(daemon);
        assert_eq!(
            dbus::methods_in_xml(&got, i.name),
            dbus::methods_in_xml(&dbus::introspection_xml(i), i.name),
            "{daemon}: {got}"
        );
    }
}

async fn futures_next(stream: &mut MessageStream) -> Option<zbus::Message> {
    use std::future::poll_fn;
    use std::pin::Pin;
    use zbus::export::futures_core::Stream;
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await.and_then(Result::ok)
}
