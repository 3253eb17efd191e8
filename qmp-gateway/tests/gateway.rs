//! The gateway end to end: a private dbus-daemon, mock daemons served with the schema's
//! generated glue, the real binary, clients on its unix and TCP sockets.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[test]
fn greeting_negotiation_and_commands() {
    let vm = Vm::start("basic");
    let mut c = vm.gateway.unix();
    assert_eq!(
        c.greeting,
        json!({"QMP": {"version": {"qemu": {"major": 1, "minor": 1, "micro": 0},
               "package": format!("flotilla-{}", env!("CARGO_PKG_VERSION"))}, "capabilities": []}})
    );
    let r = c.cmd(r#"{"execute": "query-status", "id": 1}"#);
    assert_eq!(class(&r), "CommandNotFound");
    assert_eq!(desc(&r), "Expecting capabilities negotiation with 'qmp_capabilities'");
    assert_eq!(r["id"], 1);
    c.negotiate();
    assert_eq!(
        c.cmd(r#"{"execute": "query-status"}"#),
        json!({"return": {"running": true, "singlestep": false, "status": "running"}})
    );
    assert_eq!(
        c.cmd(r#"{"execute": "query-name", "id": "abc-1"}"#),
        json!({"return": {"name": "mock-vm"}, "id": "abc-1"})
    );
    assert_eq!(
        c.cmd(r#"{"execute": "query-uuid", "id": {"seq": 7, "tag": ["x"]}}"#),
        json!({"return": {"UUID": "6b2f4c3e-8d1a-4c7b-9f10-2a3b4c5d6e7f"}, "id": {"seq": 7, "tag": ["x"]}})
    );
    assert_eq!(c.cmd("{'execute': 'query-kvm'}"), json!({"return": {"enabled": true, "present": true}}));
    let r = c.cmd(r#"{"execute": "query-cpus"}"#);
    assert_eq!(r["return"][1]["CPU"], 1);
    assert_eq!(c.cmd(r#"{"execute": "cont"}"#), json!({"return": {}}));
    let r = c.cmd(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(desc(&r), "Capabilities negotiation is already complete, command ignored");
}

#[test]
fn schema_errors_before_dispatch_and_daemon_errors_after() {
    let vm = Vm::start("errors");
    let mut c = vm.gateway.tcp();
    c.negotiate();
    // Checked against the schema: 1.1 classes and data, 7.2 texts.
    let r = c.cmd(r#"{"execute": "balloon"}"#);
    assert_eq!(
        r["error"],
        json!({"class": "MissingParameter", "desc": "Parameter 'value' is missing", "data": {"name": "value"}})
    );
    let r = c.cmd(r#"{"execute": "set_link", "arguments": {"name": "nic0", "up": 1}}"#);
    assert_eq!(class(&r), "InvalidParameterType");
    assert_eq!(desc(&r), "Invalid parameter type for 'up', expected: boolean");
    let r = c.cmd(r#"{"execute": "query-status", "arguments": {"foo": 1}}"#);
    assert_eq!((class(&r), desc(&r)), ("InvalidParameter", "Parameter 'foo' is unexpected"));
    let r = c.cmd(r#"{"execute": "no-such-command", "id": "err-1"}"#);
    assert_eq!(
        r,
        json!({"error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found",
                                   "data": {"name": "no-such-command"}}, "id": "err-1"})
    );
    let r = c.cmd(r#"{"execute": "memsave", "arguments": {"val": 18446744072080064512, "size": 1, "filename": "/x"}}"#);
    assert_eq!(desc(&r), "Invalid parameter type for 'val', expected: integer");
    // A command the schema has but vmm-core does not export.
    let r = c.cmd(r#"{"execute": "cpu", "arguments": {"index": 0}}"#);
    assert_eq!((class(&r), desc(&r)), ("CommandNotFound", "The command cpu has not been found"));
    // The daemon's own error, passed through.
    let r = c.cmd(r#"{"execute": "memsave", "arguments": {"val": 0, "size": 4096, "filename": "/tmp/x"}, "id": 3}"#);
    assert_eq!(
        r,
        json!({"error": {"class": "GenericError", "desc": "Invalid addr 0x0000000000000000/size 4096 specified", "data": {}}, "id": 3})
    );
}

#[test]
fn typed_arguments_reach_the_daemon() {
    let vm = Vm::start("memsave");
    let mut c = vm.gateway.unix();
    c.negotiate();
    let file = vm.dir.join("mem.bin");
    let r = c.execute("memsave", json!({"val": -2147483648i64, "size": 64, "filename": file, "cpu-index": 1}));
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(std::fs::read(&file).unwrap(), vec![0xab; 64]);
    let r = c.execute("memsave", json!({"val": 4096, "size": 8, "filename": file}));
    assert_eq!(r, json!({"return": {}}));
    let saved = vm.core.memsaves.lock().unwrap().clone();
    assert_eq!((saved[0].val, saved[0].cpu_index), (-2147483648, Some(1)));
    assert_eq!(saved[1].cpu_index, None, "an absent optional argument stays absent");
    let pfile = vm.dir.join("pmem.bin");
    assert_eq!(c.execute("pmemsave", json!({"val": 0, "size": 16, "filename": pfile})), json!({"return": {}}));
    assert_eq!(std::fs::read(&pfile).unwrap(), vec![0xcd; 16]);
}

#[test]
fn events_in_order_to_every_negotiated_client() {
    let vm = Vm::start("events");
    let mut a = vm.gateway.unix();
    let mut b = vm.gateway.tcp();
    let mut quiet = vm.gateway.unix(); // never negotiates
    a.negotiate();
    b.negotiate();
    // `stop` shows STOP before its return, as in shared/qemu-7.2-qmp/stop.txt.
    a.send_raw(b"{\"execute\": \"stop\", \"id\": \"s\"}\n");
    let ev = a.recv().unwrap();
    assert_eq!(ev["event"], "STOP", "{ev}");
    assert!(ev.get("data").is_none(), "STOP has no data: {ev}");
    assert!(ev["timestamp"]["seconds"].as_i64().unwrap() > 1_600_000_000);
    assert!(ev["timestamp"]["microseconds"].as_i64().unwrap() < 1_000_000);
    assert_eq!(a.recv().unwrap(), json!({"return": {}, "id": "s"}));
    assert_eq!(b.event("STOP")["event"], "STOP");
    // Several events, in order, with data.
    a.send_raw(b"{\"execute\": \"system_reset\"}\n{\"execute\": \"cont\"}\n{\"execute\": \"system_powerdown\"}\n");
    let mut seen = Vec::new();
    for _ in 0..6 {
        let v = a.recv().unwrap();
        seen.push(v.get("event").cloned().unwrap_or_else(|| v["return"].clone()));
    }
    assert_eq!(seen, [json!("RESET"), json!({}), json!("RESUME"), json!({}), json!("POWERDOWN"), json!({})]);
    let reset = b.event("RESET");
    assert_eq!(reset["data"], json!({"guest": false, "reason": "host-qmp-system-reset"}));
    assert_eq!(b.event("RESUME")["event"], "RESUME");
    assert_eq!(b.event("POWERDOWN")["event"], "POWERDOWN");
    // The client that never negotiated got none of it.
    let r = quiet.cmd(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(r, json!({"return": {}}));
    assert!(quiet.events.is_empty(), "{:?}", quiet.events);
    assert_eq!(quiet.cmd(r#"{"execute": "query-name"}"#)["return"]["name"], "mock-vm");
    assert!(quiet.events.is_empty(), "{:?}", quiet.events);
}

#[test]
fn absent_daemons_answer_as_qemu_without_the_device() {
    let vm = Vm::start("absent");
    let mut c = vm.gateway.unix();
    c.negotiate();
    let r = c.cmd(r#"{"execute": "query-balloon"}"#);
    assert_eq!(
        r["error"],
        json!({"class": "DeviceNotActive", "desc": "No balloon device has been activated", "data": {"device": "balloon"}})
    );
    let r = c.cmd(r#"{"execute": "balloon", "arguments": {"value": 134217728}}"#);
    assert_eq!(desc(&r), "No balloon device has been activated");
    assert_eq!(c.cmd(r#"{"execute": "query-block"}"#), json!({"return": []}));
    assert_eq!(c.cmd(r#"{"execute": "query-blockstats"}"#), json!({"return": []}));
    assert_eq!(c.cmd(r#"{"execute": "query-mice"}"#), json!({"return": []}));
    assert_eq!(c.cmd(r#"{"execute": "query-vnc"}"#), json!({"return": {"enabled": false}}));
    assert_eq!(c.cmd(r#"{"execute": "query-spice"}"#), json!({"return": {"enabled": false}}));
    let r = c.cmd(r#"{"execute": "set_link", "arguments": {"name": "nosuch", "up": true}}"#);
    assert_eq!((class(&r), desc(&r)), ("DeviceNotFound", "Device 'nosuch' not found"));
    let r = c.cmd(r#"{"execute": "block_resize", "arguments": {"device": "drive0", "size": 1048576}}"#);
    assert_eq!((class(&r), desc(&r)), ("DeviceNotFound", "Cannot find device='drive0' nor node-name=''"));
    let r = c.cmd(r#"{"execute": "set_password", "arguments": {"protocol": "vnc", "password": "x"}}"#);
    assert_eq!((class(&r), desc(&r)), ("SetPasswdFailed", "Could not set password"));
    // Nobody exports QOM here.
    let r = c.cmd(r#"{"execute": "qom-get", "arguments": {"path": "/nosuch", "property": "x"}}"#);
    assert_eq!((class(&r), desc(&r)), ("DeviceNotFound", "Device '/nosuch' not found"));
}

fn command_names(v: &Value) -> Vec<String> {
    v["return"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn query_commands_is_what_this_vm_serves() {
    let vm = Vm::start("commands");
    let mut c = vm.gateway.unix();
    c.negotiate();
    // The gateway introspects vmm-core when it appears; wait until its commands are in.
    let names = wait_for("vmm-core introspected", || {
        let n = command_names(&c.cmd(r#"{"execute": "query-commands"}"#));
        n.contains(&"query-status".to_string()).then_some(n)
    });
    let mut expected: Vec<&str> = CORE_COMMANDS.to_vec();
    expected.extend(["query-commands", "human-monitor-command", "qmp_capabilities"]);
    // Absent daemons' commands exist (they answer as QEMU does without the device).
    expected.extend([
        "query-block",
        "query-blockstats",
        "block_passwd",
        "block_resize",
        "blockdev-snapshot-sync",
        "set_link",
        "query-mice",
        "query-vnc",
        "query-spice",
        "set_password",
        "expire_password",
        "balloon",
        "query-balloon",
    ]);
    let mut got: Vec<&str> = names.iter().map(String::as_str).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert!(!names.contains(&"cpu".to_string()), "vmm-core does not export cpu");
    assert_eq!(names.last().unwrap(), "qmp_capabilities");
}

#[test]
fn a_daemon_that_goes_down_fails_fast_and_comes_back() {
    let mut vm = Vm::start("restart");
    let mut c = vm.gateway.unix();
    c.negotiate();
    assert_eq!(c.cmd(r#"{"execute": "query-name"}"#)["return"]["name"], "mock-vm");
    vm.core_daemon.take().unwrap().stop();
    // Once the bus has told the gateway, the error is immediate.
    let r = wait_for("the gateway to see vmm-core leave", || {
        let r = c.cmd(r#"{"execute": "query-name"}"#);
        r.get("error").is_some().then_some(r)
    });
    assert_eq!(class(&r), "GenericError");
    assert!(desc(&r).contains("vmm-core daemon is not available"), "{r}");
    let t = Instant::now();
    let r = c.cmd(r#"{"execute": "stop", "id": 1}"#);
    assert!(t.elapsed() < Duration::from_millis(500), "took {:?}", t.elapsed());
    assert_eq!((class(&r), &r["id"]), ("GenericError", &json!(1)));
    // HMP says so too, as output.
    let r = c.execute("human-monitor-command", json!({"command-line": "info status"}));
    assert!(r["return"].as_str().unwrap().starts_with("Error: The vmm-core daemon is not available"), "{r}");
    // query-commands keeps what it served.
    assert!(command_names(&c.cmd(r#"{"execute": "query-commands"}"#)).contains(&"query-status".to_string()));
    // A new vmm-core is used as soon as it is on the bus; the client never reconnected.
    vm.core_daemon = Some(start_core(&vm.bus.address, &vm.instance, vm.core.clone()));
    wait_for("vmm-core back", || {
        let r = c.cmd(r#"{"execute": "query-name"}"#);
        r.get("return").is_some().then_some(())
    });
    // And its events come through again.
    c.send_raw(b"{\"execute\": \"stop\"}\n");
    assert_eq!(c.recv().unwrap()["event"], "STOP");
    assert_eq!(c.recv().unwrap(), json!({"return": {}}));
}

#[test]
fn a_hung_daemon_times_out_and_the_session_carries_on() {
    let vm = Vm::start("hang");
    let mut c = vm.gateway.unix();
    let mut other = vm.gateway.tcp();
    c.negotiate();
    other.negotiate();
    vm.core.hang.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let r = c.cmd(r#"{"execute": "query-migrate", "id": "m"}"#);
    let took = t.elapsed();
    assert_eq!(
        (class(&r), desc(&r)),
        ("GenericError", "The vmm-core daemon did not answer 'query-migrate' within 2 s")
    );
    assert_eq!(r["id"], "m");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(5), "{took:?}");
    // Other clients were served meanwhile, and this one carries on.
    assert_eq!(other.cmd(r#"{"execute": "query-name"}"#)["return"]["name"], "mock-vm");
    vm.core.hang.store(false, Ordering::SeqCst);
    assert_eq!(c.cmd(r#"{"execute": "query-migrate"}"#), json!({"return": {}}));
}

#[test]
fn query_chardev_adds_the_qmp_sockets() {
    let vm = Vm::start("chardev");
    let mut c = vm.gateway.unix();
    c.negotiate();
    // The harness's readiness probe may still be connected for a moment.
    let r = wait_for("no TCP client", || {
        let r = c.cmd(r#"{"execute": "query-chardev"}"#);
        r["return"][2]["filename"].as_str().unwrap().starts_with("disconnected:").then_some(r)
    });
    let port = vm.gateway.tcp_port;
    assert_eq!(
        r["return"],
        json!([
            {"label": "serial0", "filename": "stdio"},
            {"label": "compat_monitor0", "filename": format!("unix:{},server=on", vm.gateway.sock.display())},
            {"label": "compat_monitor1", "filename": format!("disconnected:tcp:127.0.0.1:{port},server=on")},
        ])
    );
    let _t = vm.gateway.tcp();
    let r = wait_for("the TCP client counted", || {
        let r = c.cmd(r#"{"execute": "query-chardev"}"#);
        (!r["return"][2]["filename"].as_str().unwrap().starts_with("disconnected:")).then_some(r)
    });
    let f = r["return"][2]["filename"].as_str().unwrap();
    assert!(f.starts_with(&format!("tcp:127.0.0.1:{port},server=on <-> 127.0.0.1:")), "{f}");
    // The HMP view of the same.
    let r = c.execute("human-monitor-command", json!({"command-line": "info chardev"}));
    let out = r["return"].as_str().unwrap();
    assert!(out.starts_with("serial0: filename=stdio\r\ncompat_monitor0: filename=unix:"), "{out:?}");
}

#[test]
fn human_monitor_command_subset() {
    let vm = Vm::start("hmp");
    let mut c = vm.gateway.unix();
    c.negotiate();
    let hmp = |c: &mut Qmp, line: &str| -> Value { c.execute("human-monitor-command", json!({"command-line": line})) };
    assert_eq!(hmp(&mut c, "info version"), json!({"return": "1.1.0flotilla-mock\r\n"}));
    assert_eq!(hmp(&mut c, "info name"), json!({"return": "mock-vm\r\n"}));
    assert_eq!(hmp(&mut c, "info status"), json!({"return": "VM status: running\r\n"}));
    assert_eq!(hmp(&mut c, "info kvm"), json!({"return": "kvm support: enabled\r\n"}));
    assert_eq!(hmp(&mut c, "info cpus"), json!({"return": "* CPU #0: thread_id=1001\r\n  CPU #1: thread_id=1002\r\n"}));
    assert_eq!(
        hmp(&mut c, "info pci"),
        json!({"return": "  Bus  0, device   0, function 0:\r\n    Host bridge: PCI device 8086:29c0\r\n      id \"\"\r\n"})
    );
    assert_eq!(hmp(&mut c, "info mice"), json!({"return": "No mouse devices connected\r\n"}));
    // errors/human-monitor-command-unknown.txt
    assert_eq!(hmp(&mut c, "nosuchhmp"), json!({"return": "unknown command: 'nosuchhmp'\r\n"}));
    // stop through HMP: the event still comes first.
    c.send_raw(br#"{"execute": "human-monitor-command", "arguments": {"command-line": "stop"}}"#);
    c.send_raw(b"\n");
    assert_eq!(c.recv().unwrap()["event"], "STOP");
    assert_eq!(c.recv().unwrap(), json!({"return": ""}));
    assert_eq!(hmp(&mut c, "info status"), json!({"return": "VM status: paused\r\n"}));
    assert_eq!(hmp(&mut c, "c"), json!({"return": ""}));
    assert_eq!(c.event("RESUME")["event"], "RESUME");
    let file = vm.dir.join("hmp.bin");
    let r = hmp(&mut c, &format!("memsave 0x1000 32 \"{}\"", file.display()));
    assert_eq!(r, json!({"return": ""}));
    assert_eq!(std::fs::read(&file).unwrap().len(), 32);
    assert_eq!(vm.core.memsaves.lock().unwrap()[0].cpu_index, Some(0));
    let r = hmp(&mut c, "memsave 0 4096 \"/tmp/x\"");
    assert_eq!(r, json!({"return": "Error: Invalid addr 0x0000000000000000/size 4096 specified\r\n"}));
    // cpu-index picks the CPU, and a bad one is a QMP error (7.2's text).
    let r = c.execute("human-monitor-command", json!({"command-line": "info cpus", "cpu-index": 1}));
    assert_eq!(r, json!({"return": "  CPU #0: thread_id=1001\r\n* CPU #1: thread_id=1002\r\n"}));
    let r = c.execute("human-monitor-command", json!({"command-line": "info cpus", "cpu-index": 9}));
    assert_eq!((class(&r), desc(&r)), ("InvalidParameterValue", "Parameter 'cpu-index' expects a CPU number"));
    // qmp-test.c: the command with no command-line fails, id kept.
    let r = c.cmd("{ 'execute': 'human-monitor-command', 'id': 2 }");
    assert_eq!((class(&r), &r["id"]), ("MissingParameter", &json!(2)));
}

#[test]
fn a_second_daemon_routes_events_and_goes_down_cleanly() {
    let vm = Vm::start("balloon");
    let mut c = vm.gateway.unix();
    c.negotiate();
    assert_eq!(class(&c.cmd(r#"{"execute": "query-balloon"}"#)), "DeviceNotActive");
    let balloon = Arc::new(common::MockBalloon::default());
    *balloon.actual.lock().unwrap() = 268435456;
    let mut daemon = start_balloon(&vm.bus.address, &vm.instance, balloon.clone());
    wait_for("balloond seen", || {
        let r = c.cmd(r#"{"execute": "query-balloon"}"#);
        r.get("return").is_some().then_some(())
    });
    assert_eq!(c.cmd(r#"{"execute": "query-balloon"}"#), json!({"return": {"actual": 268435456}}));
    c.send_raw(b"{\"execute\": \"balloon\", \"arguments\": {\"value\": 201326592}}\n");
    let ev = c.recv().unwrap();
    assert_eq!((ev["event"].clone(), ev["data"].clone()), (json!("BALLOON_CHANGE"), json!({"actual": 201326592})));
    assert_eq!(c.recv().unwrap(), json!({"return": {}}));
    // Now balloond is part of this VM: down is an error, not "no balloon".
    daemon.stop();
    let r = wait_for("balloond gone", || {
        let r = c.cmd(r#"{"execute": "query-balloon"}"#);
        (r["error"]["class"] == "GenericError").then_some(r)
    });
    assert!(desc(&r).contains("balloond daemon is not available"), "{r}");
}

#[test]
fn set_link_goes_to_netd_and_info_network_shows_the_nics() {
    let nic = r#"{"name":"nic0","model":"virtio-net-pci","macaddr":"52:54:00:12:34:56","peer":{"name":"net0","type":"tap","info":"ifname=tap0,script=no,downscript=no"}}"#;
    let vm = Vm::start_with("net", &["--daemon", "netd", "--nic", nic]);
    let mut c = vm.gateway.unix();
    c.negotiate();
    // Declared but not yet there: a clear error, not the canned "no such device".
    let r = c.execute("set_link", json!({"name": "nic0", "up": false}));
    assert!(desc(&r).contains("netd daemon is not available"), "{r}");
    let net = Arc::new(common::MockNet::default());
    let _daemon = common::start_net(&vm.bus.address, &vm.instance, net.clone());
    wait_for("netd seen", || {
        let r = c.execute("set_link", json!({"name": "nic0", "up": false}));
        r.get("return").is_some().then_some(())
    });
    assert_eq!(net.links.lock().unwrap().last().cloned(), Some(("nic0".to_string(), false)));
    // errors/set_link-unknown-device.txt: netd's answer passes through.
    let r = c.execute("set_link", json!({"name": "nosuch", "up": true}));
    assert_eq!((class(&r), desc(&r)), ("DeviceNotFound", "Device 'nosuch' not found"));
    // HMP: set_link by netdev name, and info network.
    let r = c.execute("human-monitor-command", json!({"command-line": "set_link net0 on"}));
    assert_eq!(r, json!({"return": ""}));
    assert_eq!(net.links.lock().unwrap().last().cloned(), Some(("net0".to_string(), true)));
    let r = c.execute("human-monitor-command", json!({"command-line": "info network"}));
    assert_eq!(
        r,
        json!({"return": "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ net0: index=0,type=tap,ifname=tap0,script=no,downscript=no\r\n"})
    );
}

#[test]
fn without_netd_set_link_finds_no_device() {
    let vm = Vm::start("no-net");
    let mut c = vm.gateway.unix();
    c.negotiate();
    let r = c.execute("set_link", json!({"name": "nic0", "up": false}));
    assert_eq!((class(&r), desc(&r)), ("DeviceNotFound", "Device 'nic0' not found"));
    let r = c.execute("human-monitor-command", json!({"command-line": "info network"}));
    assert_eq!(r, json!({"return": ""}));
}

#[test]
fn a_declared_daemon_is_down_until_it_appears() {
    let vm = Vm::start_with("declared", &["--daemon", "balloond"]);
    let mut c = vm.gateway.unix();
    c.negotiate();
    let r = c.cmd(r#"{"execute": "query-balloon"}"#);
    assert!(desc(&r).contains("balloond daemon is not available"), "{r}");
}

#[test]
fn many_clients_on_both_sockets_at_once() {
    let vm = Vm::start("many");
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (sock, port) = (vm.gateway.sock.clone(), vm.gateway.tcp_port);
            std::thread::spawn(move || {
                let mut c = if i % 2 == 0 { Qmp::unix(&sock) } else { Qmp::tcp(port) };
                c.negotiate();
                // Pipelined: all requests first, then all replies in order.
                let mut batch = String::new();
                for n in 0..25 {
                    batch.push_str(&format!("{{\"execute\": \"query-status\", \"id\": [{i}, {n}]}}"));
                }
                c.send_raw(batch.as_bytes());
                for n in 0..25 {
                    let r = c.reply();
                    assert_eq!(r["id"], json!([i, n]));
                    assert_eq!(r["return"]["running"], true);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn quit_replies_then_closes() {
    let vm = Vm::start("quit");
    let mut c = vm.gateway.unix();
    c.negotiate();
    c.send_raw(b"{\"execute\": \"quit\"}\n");
    let ev = c.recv().unwrap();
    assert_eq!(
        (ev["event"].clone(), ev["data"].clone()),
        (json!("SHUTDOWN"), json!({"guest": false, "reason": "host-qmp-quit"}))
    );
    assert_eq!(c.recv().unwrap(), json!({"return": {}}));
    assert_eq!(c.recv(), None);
}

#[test]
fn socket_files_stale_replaced_live_refused_removed_at_exit() {
    let dir = test_dir("sockets");
    let bus = DbusDaemon::start(&dir);
    let core = Arc::new(MockCore::default());
    let _d = start_core(&bus.address, "sock", core);
    // A stale socket where the gateway's goes.
    drop(std::os::unix::net::UnixListener::bind(dir.join("qmp.sock")).unwrap());
    let mut g = Gateway::start(&dir, &bus.address, "sock", &[]);
    let mut c = g.unix();
    c.negotiate();
    // A second gateway on the same (live) path refuses to start and leaves it alone.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qmp-gateway"))
        .args(["--dbus-address", &bus.address, "--instance", "sock2", "--qmp"])
        .arg(format!("unix:{},server,nowait", g.sock.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Address already in use"), "{err}");
    assert!(g.sock.exists());
    assert_eq!(c.cmd(r#"{"execute": "query-name"}"#)["return"]["name"], "mock-vm");
    // SIGTERM: exit 0, socket gone.
    let st = g.terminate();
    assert_eq!(st.code(), Some(0), "{}", g.log());
    assert!(!g.sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn losing_the_bus_ends_the_gateway() {
    let dir = test_dir("buslost");
    let mut bus = DbusDaemon::start(&dir);
    let mut g = Gateway::start(&dir, &bus.address, "lost", &[]);
    bus.kill();
    let st = g.wait_exit();
    assert_eq!(st.code(), Some(1));
    assert!(g.log().contains("lost the D-Bus connection"), "{}", g.log());
    assert!(!g.sock.exists(), "the socket is removed on this exit too");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn command_line_errors() {
    let run =
        |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_qmp-gateway")).args(args).output().unwrap();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: qmp-gateway"));
    let out = run(&["--dbus-address", "unix:path=/nonexistent/bus", "--instance", "x", "--qmp", "unix:/tmp/x,nowait"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("client-mode sockets are not supported"));
    let out = run(&["--dbus-address", "unix:path=/nonexistent/bus", "--instance", "x", "--qmp", "unix:/tmp/x,server"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect to the D-Bus"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--qmp SPEC"));
}
