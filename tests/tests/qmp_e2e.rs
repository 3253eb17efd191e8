//! QMP end to end, through the whole stack: the real `flotilla` launcher boots the test guest
//! with `-qmp` sockets, which starts the private dbus-daemon, vmm-core and the supervised
//! qmp-gateway; real QMP clients (the `qemu.qmp` Python library, its `qmp-shell`, and raw
//! sockets) talk to the gateway, the gateway talks to vmm-core over D-Bus, and the test guest
//! confirms every effect from inside over its serial console (tests/guest/PROTOCOL.md): `stop`
//! freezes its tick counter, `system_reset` reboots it (boot=2), `system_powerdown` runs its ACPI
//! power-off, `memsave`/`pmemsave` return what it wrote, `inject-nmi` is counted on both CPUs.
//!
//! Every VM is `flotilla -name NAME -m 128 -smp 2 -kernel GUEST -display none -serial
//! unix:…,server=on,wait=on -qmp unix:…,server=on,wait=off [-qmp tcp:127.0.0.1:PORT,…]`, with
//! its runtime directory in the test's scratch directory, so that the leftover checks find every
//! process of the VM by that path. Every wait is bounded; a failing test kills what it started.
//!
//! The qemu.qmp library is required (scripts/setup-host installs it): without it these tests
//! fail with an install hint, they are never skipped.
//!
//! Not covered here, on purpose: the gateway's call-timeout path (a daemon that is on the bus
//! but does not answer). The launcher does not pass `--call-timeout`, so the gateway's default
//! of 30 s applies, far beyond this file's time budget; qmp-gateway's own tests cover it.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use flotilla_schema::dbus::{GATEWAY_COMMANDS, INTERFACES, QOM_COMMANDS};
use flotilla_tests::console::{field, Console};
use flotilla_tests::process::{alive, describe, signal, wait_gone, wait_timeout, Collector};
use flotilla_tests::pyqmp::{names, qmp_shell_command, require_qemu_qmp, timestamp, Agent};
use flotilla_tests::qmp::QmpAddr::{self, Unix as QmpAddrUnix};
use flotilla_tests::qmp::{class, desc, Incoming, QmpVm, VmOptions, BOOT, EXIT, REPLY};
use serde_json::{json, Value};

/// The guest's `write` pattern and where it puts it: the higher-half (direct map) alias of
/// physical 4 MiB, a kernel-style address at or above 2^63.
const VADDR: u64 = 0xffff_8000_0040_0000;
const PATTERN: u32 = 0x5eed_1e55;
const LEN: usize = 8192;

fn tick(line: &str) -> u64 {
    line.strip_prefix("TICK ").and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("not a TICK line: {line}"))
}

/// `NMIS total=N cpu0=N cpu1=N`: (cpu0, cpu1).
fn nmis(con: &mut Console) -> (u64, u64) {
    let l = con.command("nmis", "NMIS", REPLY).expect("nmis");
    let n = |k: &str| field(&l, k).map(|v| v.parse().expect("a count")).unwrap_or(0);
    (n("cpu0"), n("cpu1"))
}

/// Asks the guest for its NMI counts until both reach `want` (the APs count theirs
/// asynchronously), bounded.
fn wait_nmis(con: &mut Console, want: (u64, u64)) {
    let deadline = Instant::now() + REPLY;
    loop {
        let got = nmis(con);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "the guest counted NMIs {got:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's `write` of the pattern at [`VADDR`]; returns the physical address it reports.
fn guest_write(con: &mut Console) -> u64 {
    let wrote = con.command(&format!("write {VADDR:x} {PATTERN:08x} {LEN}"), "WROTE", REPLY).expect("write");
    let mut w = wrote.split_whitespace().skip(1);
    assert_eq!(w.next(), Some(format!("{VADDR:#x}").as_str()), "{wrote}");
    let paddr = w.next().and_then(|p| u64::from_str_radix(p.trim_start_matches("0x"), 16).ok());
    paddr.unwrap_or_else(|| panic!("no physical address in {wrote}"))
}

/// A memsave/pmemsave output file holds exactly what the guest wrote.
fn assert_pattern(path: &Path, len: usize) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes.len(), len, "{}", path.display());
    assert!(
        bytes.chunks(4).all(|c| c == PATTERN.to_le_bytes()),
        "{} does not hold the guest's pattern: {:02x?}",
        path.display(),
        &bytes[..16]
    );
}

/// An `Agent::execute` answer: `return {}`, and exactly the events `want` (name, data) arrived
/// before the reply, each with a timestamp no later than the reply's arrival.
fn assert_events_then_return(r: &Value, want: &[(&str, Value)]) {
    assert_eq!(r["return"], json!({}), "{r}");
    let before = r["events_before"].as_array().cloned().unwrap_or_default();
    let got: Vec<(String, Value)> = before
        .iter()
        .map(|e| (e["event"].as_str().unwrap_or("?").to_string(), e.get("data").cloned().unwrap_or(json!({}))))
        .collect();
    let want: Vec<(String, Value)> = want.iter().map(|(n, d)| (n.to_string(), d.clone())).collect();
    assert_eq!(got, want, "events before the reply: {before:?}");
    let t_reply = r["t_reply"].as_f64().expect("reply arrival time");
    for e in &before {
        // Both clocks are this host's CLOCK_REALTIME; the event's is truncated to microseconds.
        assert!(timestamp(e) <= t_reply + 1e-4, "event {e} is stamped after its reply arrived ({t_reply})");
    }
}

fn hmp(py: &mut Agent, client: &str, line: &str) -> String {
    let r = py.ret(client, "human-monitor-command", json!({"command-line": line}));
    r.as_str().unwrap_or_else(|| panic!("HMP {line:?} returned {r}")).to_string()
}

fn query_status(py: &mut Agent, client: &str) -> Value {
    py.ret(client, "query-status", json!({}))
}

fn status(running: bool, status: &str) -> Value {
    json!({"running": running, "singlestep": false, "status": status})
}

/// The commands this VM serves: vmm-core's exported methods, the gateway's own commands, the
/// commands of daemons this VM does not have (answered as QEMU answers without the device:
/// query-block `[]`, query-balloon DeviceNotActive, ...), and `qmp_capabilities`. The QOM
/// commands are nobody's here (vmm-core has no QOM tree yet).
fn expected_commands() -> BTreeSet<String> {
    let mut want: BTreeSet<String> = vmm_core::dbus::EXPORTED.iter().map(|s| s.to_string()).collect();
    want.extend(GATEWAY_COMMANDS.iter().map(|s| s.to_string()));
    for iface in INTERFACES.iter().filter(|i| i.daemon != "vmm-core") {
        want.extend(iface.commands.iter().filter(|c| !QOM_COMMANDS.contains(c)).map(|s| s.to_string()));
    }
    want.insert("qmp_capabilities".into());
    want
}

fn elapsed(t: Instant) -> String {
    format!("{:.2}s", t.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// 1. The qemu.qmp library, every command, the guest confirming.
// ---------------------------------------------------------------------------------------------

/// The qemu.qmp library (`QMPClient`) through one VM's life: greeting and negotiation (by hand
/// and by the library), every query with exact answers (query-pci against what the guest finds
/// on its bus, query-cpus thread ids against vmm-core's threads, query-commands against what
/// the VM's daemons export), stop/cont against the guest's tick counter, memsave/pmemsave of
/// the guest's pattern at a higher-half address, inject-nmi counted on both CPUs, `cpu`, the
/// HMP subset with its effects, system_reset (boot=2), and quit (SHUTDOWN, reply, close, exit 0,
/// nothing left). Events are checked to arrive before the reply of the command that caused
/// them, stamped no later than that reply's arrival.
#[test]
fn qemu_qmp_library_runs_every_command_and_the_guest_confirms() {
    require_qemu_qmp();
    let t0 = Instant::now();
    let uuid = "6f9619ff-8b86-d011-b42d-00c04fc964ff";
    let mut vm = QmpVm::start("qmp-lib", &VmOptions { name: "e2e-lib", qmp: &[true], extra: &["-uuid", uuid] });
    let mut con = vm.console_ready();
    let core = vm.vmm_core();
    let addr = vm.qmp[0].py();
    let mut py = Agent::start();
    // The leftover check at the end finds the VM's processes by the scratch directory: make
    // sure it finds all of them now (so "none left" means something).
    let gw = vm.gateway(None, BOOT).expect("flotilla runs a qmp-gateway");
    let running = flotilla_tests::process::processes_mentioning(vm.marker());
    for (what, pid) in [("flotilla", vm.pid()), ("vmm-core", core), ("qmp-gateway", gw)] {
        assert!(running.iter().any(|(p, _)| *p == pid), "{what} ({pid}) not found by the marker: {running:?}");
    }
    assert!(running.iter().any(|(_, c)| c.contains("dbus-daemon")), "the bus not found by the marker: {running:?}");

    // Greeting, and negotiation done by hand through the library (negotiate=False).
    let r = py.ok(json!({"op": "connect", "client": "n", "address": addr, "negotiate": false, "retry_for": 10}));
    let g = &r["greeting"]["QMP"];
    assert_eq!(g["version"]["qemu"], json!({"major": 1, "minor": 1, "micro": 0}), "{r}");
    let package = g["version"]["package"].as_str().expect("package").to_string();
    assert!(package.starts_with("flotilla-"), "{r}");
    assert_eq!(g["capabilities"], json!([]), "{r}");
    let e = py.err("n", "query-status", json!({}));
    assert_eq!(
        (e["class"].as_str(), e["desc"].as_str()),
        (Some("CommandNotFound"), Some("Expecting capabilities negotiation with 'qmp_capabilities'"))
    );
    assert_eq!(py.ret("n", "qmp_capabilities", json!({})), json!({}));
    let e = py.err("n", "qmp_capabilities", json!({}));
    assert_eq!(
        (e["class"].as_str(), e["desc"].as_str()),
        (Some("CommandNotFound"), Some("Capabilities negotiation is already complete, command ignored"))
    );
    assert_eq!(query_status(&mut py, "n"), status(true, "running"));
    py.disconnect("n");

    // The library's own negotiation, then the queries.
    let g2 = py.connect("m", addr.clone());
    assert_eq!(g2, r["greeting"]);
    assert_eq!(py.ret("m", "query-name", json!({})), json!({"name": "e2e-lib"}));
    assert_eq!(py.ret("m", "query-uuid", json!({})), json!({"UUID": uuid}));
    assert_eq!(py.ret("m", "query-kvm", json!({})), json!({"enabled": true, "present": true}));
    assert_eq!(
        py.ret("m", "query-version", json!({})),
        json!({"qemu": {"major": 1, "minor": 1, "micro": 0}, "package": package})
    );
    assert_eq!(query_status(&mut py, "m"), status(true, "running"));
    assert_eq!(py.ret("m", "query-mice", json!({})), json!([]));
    assert_eq!(py.ret("m", "query-migrate", json!({})), json!({}));
    let QmpAddrUnix(qmp_path) = &vm.qmp[0] else { unreachable!() };
    assert_eq!(
        py.ret("m", "query-chardev", json!({})),
        json!([
            {"label": "serial0", "filename": format!("unix:{},server=on", vm.serial.display())},
            {"label": "compat_monitor0", "filename": format!("unix:{},server=on", qmp_path.display())},
        ])
    );

    // query-pci: the host bridge, and exactly the functions the guest finds on bus 0.
    let pci = py.ret("m", "query-pci", json!({}));
    let buses = pci.as_array().expect("a list of buses");
    assert_eq!(buses.len(), 1, "{pci}");
    assert_eq!(buses[0]["bus"], 0);
    let devices = buses[0]["devices"].as_array().expect("devices");
    let host = devices.iter().find(|d| d["slot"] == 0 && d["function"] == 0).expect("00:00.0");
    assert_eq!(host["id"], json!({"vendor": 0x8086, "device": 0x29c0}), "{host}");
    assert_eq!(host["class_info"], json!({"class": 0x0600, "desc": "Host bridge"}), "{host}");
    let from_qmp: BTreeSet<String> = devices
        .iter()
        .map(|d| {
            format!(
                "PCI 00:{:02x}.{} vendor={:04x} device={:04x}",
                d["slot"].as_u64().unwrap_or(99),
                d["function"].as_u64().unwrap_or(9),
                d["id"]["vendor"].as_u64().unwrap_or(0),
                d["id"]["device"].as_u64().unwrap_or(0)
            )
        })
        .collect();
    con.command("pci", "ECAM", REPLY).expect("pci");
    let from_guest: BTreeSet<String> = con
        .history
        .iter()
        .rev()
        .take_while(|l| !l.starts_with("READY"))
        .filter(|l| l.starts_with("PCI "))
        .map(|l| l.split(" class=").next().unwrap_or("").to_string())
        .collect();
    assert_eq!(from_qmp, from_guest, "query-pci against what the guest sees");

    // query-commands: exactly what this VM serves.
    let cmds = py.ret("m", "query-commands", json!({}));
    let listed: Vec<String> =
        cmds.as_array().expect("a list").iter().map(|c| c["name"].as_str().expect("name").to_string()).collect();
    let set: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(set.len(), listed.len(), "duplicates in {listed:?}");
    assert_eq!(set, expected_commands());
    // Not listed means not served: the QOM commands answer CommandNotFound for the root.
    let e = py.err("m", "qom-list", json!({"path": "/"}));
    assert_eq!(e["class"], "CommandNotFound", "{e}");

    // query-cpus: both vCPUs, their thread ids are threads of the vmm-core process.
    let cpus = py.ret("m", "query-cpus", json!({}));
    let cpus = cpus.as_array().expect("a list").clone();
    assert_eq!(cpus.len(), 2, "{cpus:?}");
    let mut tids = Vec::new();
    for (i, c) in cpus.iter().enumerate() {
        assert_eq!(c["CPU"], i, "{c}");
        assert_eq!(c["current"], i == 0, "{c}");
        let tid = c["thread_id"].as_i64().expect("thread_id");
        assert!(
            Path::new(&format!("/proc/{core}/task/{tid}")).is_dir(),
            "thread_id {tid} of CPU {i} is not a thread of vmm-core (pid {core})"
        );
        assert_ne!(tid, i64::from(core), "a vCPU runs on its own thread");
        tids.push(tid);
    }
    assert_ne!(tids[0], tids[1]);

    // stop freezes the guest's counter (STOP before the reply), cont resumes it (RESUME).
    con.send("spin").expect("spin");
    let mut last = 0;
    while last < 3 {
        last = tick(&con.expect("TICK", REPLY).expect("ticks"));
    }
    let r = py.execute("m", "stop", json!({}));
    assert_events_then_return(&r, &[("STOP", json!({}))]);
    // Lines the guest wrote just before it stopped may still be on their way; then silence.
    for l in con.drain_for(Duration::from_millis(200)) {
        if l.starts_with("TICK") {
            last = tick(&l);
        }
    }
    let frozen = con.drain_for(Duration::from_millis(800));
    assert!(frozen.is_empty(), "the guest ran while stopped: {frozen:?}");
    assert_eq!(query_status(&mut py, "m"), status(false, "paused"));
    // stop when stopped: no error and no second STOP (as QEMU).
    assert_events_then_return(&py.execute("m", "stop", json!({})), &[]);
    assert_events_then_return(&py.execute("m", "cont", json!({})), &[("RESUME", json!({}))]);
    let next = tick(&con.expect("TICK", REPLY).expect("a tick after cont"));
    assert_eq!(next, last + 1, "the counter goes on where it stopped");
    assert_eq!(query_status(&mut py, "m"), status(true, "running"));
    assert_events_then_return(&py.execute("m", "cont", json!({})), &[]);
    con.command("ping", "PONG", REPLY).expect("ping ends spin");

    // memsave of the guest's pattern at a higher-half address: unsigned is refused as QEMU
    // refuses it (int64), negative is the address.
    let paddr = guest_write(&mut con);
    let out = vm.dir.path("memsave.bin");
    let e = py.err("m", "memsave", json!({"val": VADDR, "size": LEN, "filename": out}));
    assert_eq!(
        e,
        json!({"class": "InvalidParameterType", "desc": "Invalid parameter type for 'val', expected: integer",
               "data": {"name": "val", "expected": "integer"}})
    );
    assert!(!out.exists(), "a refused memsave created its file");
    assert_eq!(py.ret("m", "memsave", json!({"val": VADDR as i64, "size": LEN, "filename": out})), json!({}));
    assert_pattern(&out, LEN);
    let pout = vm.dir.path("pmemsave.bin");
    assert_eq!(py.ret("m", "pmemsave", json!({"val": paddr, "size": LEN, "filename": pout})), json!({}));
    assert_pattern(&pout, LEN);
    let e = py.err("m", "memsave", json!({"val": 0x1000_0000_0000_i64, "size": 4096, "filename": out}));
    assert_eq!(e["class"], "GenericError", "{e}");
    assert!(e["desc"].as_str().unwrap_or("").starts_with("Invalid addr 0x0000100000000000"), "{e}");
    let e = py.err("m", "memsave", json!({"val": VADDR as i64, "size": 16, "filename": out, "cpu-index": 2}));
    assert_eq!(
        (e["class"].as_str(), e["desc"].as_str()),
        (Some("InvalidParameterValue"), Some("Parameter 'cpu-index' expects a CPU number"))
    );

    // inject-nmi reaches both CPUs.
    let (n0, n1) = nmis(&mut con);
    assert_events_then_return(&py.execute("m", "inject-nmi", json!({})), &[]);
    wait_nmis(&mut con, (n0 + 1, n1 + 1));

    // cpu 1: query-cpus marks it current, memsave's default CPU is it (same page tables: the
    // pattern again); a CPU that does not exist is refused.
    assert_eq!(py.ret("m", "cpu", json!({"index": 1})), json!({}));
    let cpus = py.ret("m", "query-cpus", json!({}));
    let current: Vec<bool> = cpus.as_array().expect("list").iter().map(|c| c["current"] == true).collect();
    assert_eq!(current, [false, true], "{cpus}");
    let out1 = vm.dir.path("memsave-cpu1.bin");
    assert_eq!(py.ret("m", "memsave", json!({"val": VADDR as i64, "size": LEN, "filename": out1})), json!({}));
    assert_pattern(&out1, LEN);
    let e = py.err("m", "cpu", json!({"index": 2}));
    assert_eq!(
        (e["class"].as_str(), e["desc"].as_str()),
        (Some("InvalidParameterValue"), Some("Parameter 'index' expects a CPU number"))
    );
    assert_eq!(py.ret("m", "cpu", json!({"index": 0})), json!({}));

    // human-monitor-command: QEMU's HMP output, and the effects.
    assert_eq!(hmp(&mut py, "m", "info status"), "VM status: running\r\n");
    assert_eq!(
        hmp(&mut py, "m", "info cpus"),
        format!("* CPU #0: thread_id={}\r\n  CPU #1: thread_id={}\r\n", tids[0], tids[1])
    );
    let info_pci = hmp(&mut py, "m", "info pci");
    assert!(
        info_pci.starts_with("  Bus  0, device   0, function 0:\r\n    Host bridge: PCI device 8086:29c0\r\n"),
        "{info_pci:?}"
    );
    assert_eq!(hmp(&mut py, "m", "info version"), format!("1.1.0{package}\r\n"));
    let r = py.execute("m", "human-monitor-command", json!({"command-line": "stop"}));
    assert_eq!(r["return"], "", "{r}");
    assert_eq!(names(r["events_before"].as_array().expect("events")), ["STOP"]);
    assert_eq!(hmp(&mut py, "m", "info status"), "VM status: paused\r\n");
    // A line sent to the stopped guest is answered only once it runs again.
    con.send("ping").expect("ping");
    let quiet = con.drain_for(Duration::from_millis(400));
    assert!(quiet.is_empty(), "the stopped guest answered: {quiet:?}");
    let r = py.execute("m", "human-monitor-command", json!({"command-line": "cont"}));
    assert_eq!(names(r["events_before"].as_array().expect("events")), ["RESUME"]);
    con.expect("PONG", REPLY).expect("PONG after cont");
    assert_eq!(hmp(&mut py, "m", "info status"), "VM status: running\r\n");
    assert_eq!(hmp(&mut py, "m", "nmi"), "");
    wait_nmis(&mut con, (n0 + 2, n1 + 2));

    // system_reset: RESET before the reply, the guest boots again.
    assert_events_then_return(
        &py.execute("m", "system_reset", json!({})),
        &[("RESET", json!({"guest": false, "reason": "host-qmp-system-reset"}))],
    );
    let banner = con.expect("FLOTILLA-GUEST", BOOT).expect("reboot");
    assert_eq!(field(&banner, "boot"), Some("2"), "{banner}");
    con.expect("READY", BOOT).expect("READY after the reset");
    assert_eq!(query_status(&mut py, "m"), status(true, "running"));
    let stray = py.events("m", &[], Duration::ZERO);
    assert!(stray.is_empty(), "unexpected events: {stray:?}");

    // quit: SHUTDOWN, the reply, the socket closes (seen by a raw client too), flotilla exits
    // 0 and nothing is left.
    let mut watcher = vm.raw(0);
    watcher.negotiate();
    assert_events_then_return(
        &py.execute("m", "quit", json!({})),
        &[("SHUTDOWN", json!({"guest": false, "reason": "host-qmp-quit"}))],
    );
    let ev = watcher.wait_event("SHUTDOWN", REPLY);
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-qmp-quit"}));
    watcher.expect_closed(EXIT);
    py.disconnect("m");
    vm.assert_exits_0_and_cleaned_up(core);
    let stderr = py.finish();
    assert!(!stderr.contains("Traceback"), "the agent failed:\n{stderr}");
    eprintln!("qemu.qmp end to end: {}", elapsed(t0));
}

/// `-S` and no `-uuid`: prelaunch (QMP and HMP), the null UUID, the guest does not run until
/// `cont`; then system_powerdown: POWERDOWN, the guest's ACPI power-button handler powers it
/// off (POWER-BUTTON, POWEROFF), SHUTDOWN guest-shutdown, and the VM ends with nothing left.
#[test]
fn prelaunch_null_uuid_and_system_powerdown_through_qemu_qmp() {
    require_qemu_qmp();
    let t0 = Instant::now();
    let mut vm = QmpVm::start("qmp-power", &VmOptions { name: "e2e-power", qmp: &[true], extra: &["-S"] });
    // -S: vmm-core waits for the serial client, then stays in prelaunch.
    let mut con = vm.console();
    let core = vm.vmm_core();
    let mut py = Agent::start();
    py.ok(json!({"op": "connect", "client": "m", "address": vm.qmp[0].py(), "retry_for": 10}));
    assert_eq!(query_status(&mut py, "m"), status(false, "prelaunch"));
    assert_eq!(hmp(&mut py, "m", "info status"), "VM status: paused (prelaunch)\r\n");
    let nil = "00000000-0000-0000-0000-000000000000";
    assert_eq!(py.ret("m", "query-uuid", json!({})), json!({"UUID": nil}));
    assert_eq!(hmp(&mut py, "m", "info uuid"), format!("{nil}\r\n"));
    assert_eq!(py.ret("m", "query-name", json!({})), json!({"name": "e2e-power"}));
    let early = con.drain_for(Duration::from_millis(300));
    assert!(early.is_empty(), "the guest ran before cont: {early:?}");

    assert_events_then_return(&py.execute("m", "cont", json!({})), &[("RESUME", json!({}))]);
    let banner = con.expect("FLOTILLA-GUEST", BOOT).expect("boot after cont");
    assert_eq!(field(&banner, "boot"), Some("1"), "{banner}");
    con.expect("READY", BOOT).expect("READY");
    assert_eq!(query_status(&mut py, "m"), status(true, "running"));

    // system_powerdown: POWERDOWN before the reply; the guest sees the ACPI power button and
    // powers off: SHUTDOWN guest-shutdown, and the VM ends.
    let r = py.execute("m", "system_powerdown", json!({}));
    let shutdown = json!({"guest": true, "reason": "guest-shutdown"});
    // The guest may be quick enough to power off before the reply is on its way (its
    // SHUTDOWN then comes before the reply too, as it would from QEMU).
    let mut events = r["events_before"].as_array().cloned().unwrap_or_default();
    if events.len() == 2 {
        assert_events_then_return(&r, &[("POWERDOWN", json!({})), ("SHUTDOWN", shutdown.clone())]);
    } else {
        assert_events_then_return(&r, &[("POWERDOWN", json!({}))]);
    }
    con.expect("POWER-BUTTON", REPLY).expect("the guest saw the power button");
    con.expect("POWEROFF", REPLY).expect("the guest powers off");
    events.extend(py.events("m", if events.len() == 2 { &[] } else { &["SHUTDOWN"] }, REPLY));
    assert_eq!(names(&events), ["POWERDOWN", "SHUTDOWN"], "{events:?}");
    assert_eq!(events[1]["data"], shutdown);
    assert!(timestamp(&events[1]) >= timestamp(&events[0]), "SHUTDOWN stamped before POWERDOWN");
    py.disconnect("m");
    vm.assert_exits_0_and_cleaned_up(core);
    eprintln!("prelaunch + powerdown: {}", elapsed(t0));
}

// ---------------------------------------------------------------------------------------------
// 2. qmp-shell.
// ---------------------------------------------------------------------------------------------

/// Runs qmp-shell (`args`, then the socket) with `input` on stdin, bounded; returns the output
/// of each input line (split at the shell's prompts) after the banner.
fn qmp_shell(args: &[&str], sock: &Path, input: &str) -> (String, Vec<String>) {
    qmp_shell_run(args, sock, input, false)
}

/// [`qmp_shell`]; with `quits`, the input ends the VM: qmp-shell (qemu.qmp 0.0.6) then dies of
/// the EOFError its own close() meets on the connection the server closed, as it does with
/// QEMU, so only that failure is accepted.
fn qmp_shell_run(args: &[&str], sock: &Path, input: &str, quits: bool) -> (String, Vec<String>) {
    let mut cmd = qmp_shell_command();
    cmd.args(args).arg(sock).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("qmp-shell runs");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("feeding qmp-shell");
    let mut out = Collector::new(child.stdout.take().expect("stdout"));
    let mut err = Collector::new(child.stderr.take().expect("stderr"));
    let status = wait_timeout(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("qmp-shell {args:?} did not finish; stdout so far:\n{}", out.take())
    });
    let (out, err) = (out.take(), err.take());
    if quits && !status.success() {
        assert_eq!(err.trim_end().lines().last(), Some("EOFError"), "qmp-shell {args:?}:\n{out}\nstderr:\n{err}");
    } else {
        assert!(status.success(), "qmp-shell {args:?}: {}\nstdout:\n{out}\nstderr:\n{err}", describe(status));
        assert!(!err.contains("Traceback"), "qmp-shell {args:?} failed:\nstdout:\n{out}\nstderr:\n{err}");
    }
    // Each input line's output follows a prompt; the last prompt met the end of input.
    let mut parts: Vec<&str> = out.split("(QEMU) ").collect();
    let banner = parts.remove(0).to_string();
    assert_eq!(parts.pop().map(str::trim), Some(""), "output after the end of input:\n{out}");
    assert_eq!(parts.len(), input.lines().count(), "one output per input line:\n{out}");
    (banner, parts.iter().map(|p| p.trim_end_matches('\n').to_string()).collect())
}

fn shell_json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("qmp-shell printed {s:?}: {e}"))
}

/// qemu.qmp's `qmp-shell` with piped stdin: QMP mode (queries, stop/cont with the guest
/// confirming, events printed on an empty line, memsave/pmemsave, an unknown command) and HMP
/// mode (`-H`: info status/name, stop, cont, nmi, an unknown HMP command). The VM runs with
/// `-no-shutdown`: after the guest's own ACPI power-off it stays, in run state `shutdown`
/// (`cont` answers ResetRequired), until `quit` from qmp-shell ends it.
#[test]
fn qmp_shell_drives_the_vm_and_no_shutdown_keeps_it_after_poweroff() {
    require_qemu_qmp();
    let t0 = Instant::now();
    let mut vm = QmpVm::start("qmp-shell", &VmOptions { name: "e2e-shell", qmp: &[true], extra: &["-no-shutdown"] });
    let mut con = vm.console_ready();
    let core = vm.vmm_core();
    let QmpAddrUnix(sock) = vm.qmp[0].clone() else { unreachable!() };
    // The gateway starts after vmm-core is ready; make sure it listens before qmp-shell tries.
    drop(vm.raw(0));

    // QMP mode, one command per line; an empty line prints the events received so far.
    let paddr = guest_write(&mut con);
    let out = vm.dir.path("shell-memsave.bin");
    let input = format!(
        "query-status\nstop\n\nquery-status\nquery-name\nmemsave val={} size={LEN} filename={}\n\
         pmemsave val={paddr} size={LEN} filename={}.p\nno-such-command\n",
        VADDR as i64,
        out.display(),
        out.display()
    );
    let (banner, o) = qmp_shell(&[], &sock, &input);
    assert!(banner.contains("Welcome to the QMP low-level shell!"), "{banner}");
    assert!(banner.contains("Connected to QEMU 1.1.0"), "{banner}");
    assert_eq!(shell_json(&o[0]), json!({"return": status(true, "running")}));
    assert_eq!(shell_json(&o[1]), json!({"return": {}}));
    assert!(o[2].contains("'event': 'STOP'") && o[2].contains("'timestamp'"), "events line: {:?}", o[2]);
    assert_eq!(shell_json(&o[3]), json!({"return": status(false, "paused")}));
    assert_eq!(shell_json(&o[4]), json!({"return": {"name": "e2e-shell"}}));
    assert_eq!(shell_json(&o[5]), json!({"return": {}}));
    assert_pattern(&out, LEN);
    assert_eq!(shell_json(&o[6]), json!({"return": {}}));
    assert_pattern(Path::new(&format!("{}.p", out.display())), LEN);
    assert_eq!(shell_json(&o[7])["error"]["class"], "CommandNotFound", "{}", o[7]);
    // The guest is stopped: a ping waits for cont.
    con.send("ping").expect("ping");
    let quiet = con.drain_for(Duration::from_millis(300));
    assert!(quiet.is_empty(), "the stopped guest answered: {quiet:?}");
    let (_, o) = qmp_shell(&[], &sock, "cont\n\nquery-status\n");
    assert_eq!(shell_json(&o[0]), json!({"return": {}}));
    assert!(o[1].contains("'event': 'RESUME'"), "{:?}", o[1]);
    assert_eq!(shell_json(&o[2]), json!({"return": status(true, "running")}));
    con.expect("PONG", REPLY).expect("PONG once running");

    // HMP mode (-H): every line through human-monitor-command.
    let (nmi0, nmi1) = nmis(&mut con);
    let (banner, o) =
        qmp_shell(&["-H"], &sock, "info status\nstop\ninfo status\ncont\ninfo status\nnmi\ninfo name\nnosuchhmp\n");
    assert!(banner.contains("Welcome to the HMP shell!"), "{banner}");
    let o: Vec<&str> = o.iter().map(|s| s.trim_end()).collect();
    assert_eq!(
        o,
        [
            "VM status: running",
            "",
            "VM status: paused",
            "",
            "VM status: running",
            "",
            "e2e-shell",
            "unknown command: 'nosuchhmp'",
        ]
    );
    wait_nmis(&mut con, (nmi0 + 1, nmi1 + 1));

    // -no-shutdown: the guest's ACPI power-off leaves the VM in run state `shutdown`.
    let mut watcher = vm.raw(0);
    watcher.negotiate();
    con.command("poweroff", "POWEROFF", REPLY).expect("poweroff");
    let ev = watcher.wait_event("SHUTDOWN", REPLY);
    assert_eq!(ev["data"], json!({"guest": true, "reason": "guest-shutdown"}));
    let after = con.drain_for(Duration::from_millis(1200));
    assert!(after.iter().all(|l| !l.starts_with("ERR")), "the guest kept running after S5: {after:?}");
    let (_, o) = qmp_shell(&[], &sock, "query-status\ncont\n");
    assert_eq!(shell_json(&o[0]), json!({"return": status(false, "shutdown")}));
    let e = shell_json(&o[1]);
    assert_eq!(e["error"]["class"], "ResetRequired", "cont after shutdown: {e}");
    let (_, o) = qmp_shell(&["-H"], &sock, "info status\n");
    assert_eq!(o[0].trim_end(), "VM status: paused (shutdown)");
    assert!(vm.reaper.child().try_wait().expect("try_wait").is_none(), "flotilla ended despite -no-shutdown");

    // quit through qmp-shell ends it all.
    let t = Instant::now();
    let (_, o) = qmp_shell_run(&[], &sock, "quit\n", true);
    assert_eq!(shell_json(&o[0]), json!({"return": {}}));
    let ev = watcher.wait_event("SHUTDOWN", REPLY);
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-qmp-quit"}));
    watcher.expect_closed(EXIT);
    eprintln!("qmp-shell quit took {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    vm.assert_exits_0_and_cleaned_up(core);
    eprintln!("qmp-shell: {}", elapsed(t0));
}

// ---------------------------------------------------------------------------------------------
// 3. Two QMP sockets, several clients on each.
// ---------------------------------------------------------------------------------------------

/// A unix and a loopback TCP QMP socket, three library clients on each with 30 commands in
/// flight at once, plus one raw client per socket that does not negotiate: every negotiated
/// client gets every event (whichever socket the command came from), the others get none, and
/// a client negotiating late gets only what happens afterwards.
#[test]
fn two_sockets_many_clients_all_get_events_once_negotiated() {
    require_qemu_qmp();
    let t0 = Instant::now();
    let mut vm = QmpVm::start("qmp-multi", &VmOptions { name: "e2e-multi", qmp: &[true, false], extra: &[] });
    let mut con = vm.console_ready();
    let core = vm.vmm_core();
    let mut py = Agent::start();
    let clients = ["u0", "u1", "u2", "t0", "t1", "t2"];
    for c in clients {
        let addr = if c.starts_with('u') { vm.qmp[0].py() } else { vm.qmp[1].py() };
        py.ok(json!({"op": "connect", "client": c, "address": addr, "retry_for": 10}));
    }
    // Two raw clients that never negotiate, one per socket.
    let mut shy_unix = vm.raw(0);
    let mut shy_tcp = vm.raw(1);
    for shy in [&shy_unix, &shy_tcp] {
        assert_eq!(shy.greeting["QMP"]["version"]["qemu"]["minor"], 1, "{}", shy.greeting);
    }

    // Everyone at once: 5 commands per client in flight together.
    let mut calls = Vec::new();
    for c in clients {
        for cmd in ["query-status", "query-name", "query-kvm", "query-cpus", "query-uuid"] {
            calls.push(json!({"client": c, "cmd": cmd}));
        }
    }
    let r = py.ok(json!({"op": "gather", "calls": calls}));
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 30);
    for (i, res) in results.iter().enumerate() {
        let ret = &res["return"];
        match i % 5 {
            0 => assert_eq!(*ret, status(true, "running"), "{res}"),
            1 => assert_eq!(*ret, json!({"name": "e2e-multi"}), "{res}"),
            2 => assert_eq!(*ret, json!({"enabled": true, "present": true}), "{res}"),
            3 => assert_eq!(ret.as_array().map(Vec::len), Some(2), "{res}"),
            _ => assert!(ret["UUID"].is_string(), "{res}"),
        }
    }

    // stop from one unix client, cont from one TCP client: every negotiated client gets both.
    assert_events_then_return(&py.execute("u1", "stop", json!({})), &[("STOP", json!({}))]);
    // t2 got STOP too, before its own reply.
    assert_events_then_return(&py.execute("t2", "cont", json!({})), &[("STOP", json!({})), ("RESUME", json!({}))]);
    for c in clients {
        // Those two saw their part before their replies.
        let want: Vec<&str> = match c {
            "u1" => vec!["RESUME"],
            "t2" => vec![],
            _ => vec!["STOP", "RESUME"],
        };
        let ev = py.events(c, &want, REPLY);
        assert_eq!(names(&ev), want, "{c}: {ev:?}");
    }
    con.command("ping", "PONG", REPLY).expect("guest runs");
    for shy in [&mut shy_unix, &mut shy_tcp] {
        let got = shy.drain(Duration::from_millis(200));
        assert!(got.is_empty(), "a client that never negotiated got {got:?}");
    }

    // A late negotiation gets no earlier events, and from then on every event.
    shy_unix.negotiate();
    assert!(shy_unix.drain(Duration::from_millis(100)).is_empty());
    assert_events_then_return(
        &py.execute("t0", "system_reset", json!({})),
        &[("RESET", json!({"guest": false, "reason": "host-qmp-system-reset"}))],
    );
    assert_eq!(field(&con.expect("FLOTILLA-GUEST", BOOT).expect("reboot"), "boot"), Some("2"));
    let ev = shy_unix.wait_event("RESET", REPLY);
    assert_eq!(ev["data"]["reason"], "host-qmp-system-reset");
    for c in clients.iter().filter(|c| **c != "t0") {
        assert_eq!(names(&py.events(c, &["RESET"], REPLY)), ["RESET"], "{c}");
    }
    let got = shy_tcp.drain(Duration::from_millis(200));
    assert!(got.is_empty(), "a client that never negotiated got {got:?}");

    // One client leaving disturbs nobody.
    py.disconnect("u2");
    py.disconnect("t1");
    let r = py.ok(json!({"op": "gather", "calls": [
        {"client": "u0", "cmd": "query-name"}, {"client": "t0", "cmd": "query-name"}]}));
    assert!(r["results"].as_array().expect("results").iter().all(|x| x["return"]["name"] == "e2e-multi"), "{r}");

    // quit over TCP: SHUTDOWN to everyone negotiated, nothing to the shy client; all close.
    assert_events_then_return(
        &py.execute("t2", "quit", json!({})),
        &[("SHUTDOWN", json!({"guest": false, "reason": "host-qmp-quit"}))],
    );
    for c in ["u0", "u1", "t0"] {
        assert_eq!(names(&py.events(c, &["SHUTDOWN"], REPLY)), ["SHUTDOWN"], "{c}");
    }
    shy_unix.wait_event("SHUTDOWN", REPLY);
    shy_unix.expect_closed(EXIT);
    shy_tcp.expect_closed(EXIT);
    assert!(shy_tcp.events.is_empty(), "the shy TCP client got events: {:?}", shy_tcp.events);
    vm.assert_exits_0_and_cleaned_up(core);
    eprintln!("two sockets, 8 clients: {}", elapsed(t0));
}

// ---------------------------------------------------------------------------------------------
// 4. The gateway crashes; the launcher restarts it; the guest never notices.
// ---------------------------------------------------------------------------------------------

/// SIGKILL to the qmp-gateway (flotilla's child, found through /proc): the guest's counter
/// goes on without a gap, the launcher starts a new gateway, a client reconnects (bounded
/// retry) and commands, events and their effects work again.
#[test]
fn a_killed_gateway_is_restarted_and_clients_reconnect_while_the_guest_runs_on() {
    require_qemu_qmp();
    let t0 = Instant::now();
    let mut vm = QmpVm::start("qmp-crash", &VmOptions { name: "e2e-crash", qmp: &[true], extra: &[] });
    let mut con = vm.console_ready();
    let core = vm.vmm_core();
    let gw = vm.gateway(None, BOOT).expect("flotilla runs a qmp-gateway");
    let mut py = Agent::start();
    let addr = vm.qmp[0].py();
    py.ok(json!({"op": "connect", "client": "c", "address": addr, "retry_for": 10}));
    assert_eq!(query_status(&mut py, "c"), status(true, "running"));

    con.send("spin").expect("spin");
    let mut last = tick(&con.expect("TICK", REPLY).expect("ticks"));
    signal(gw, libc::SIGKILL);
    let killed = Instant::now();
    assert!(wait_gone(gw, Duration::from_secs(2)), "qmp-gateway {gw} survived SIGKILL");
    // The library's connection is gone with it.
    let r = py.request(json!({"op": "execute", "client": "c", "cmd": "query-status", "args": {}}), REPLY);
    assert!(r.get("exception").is_some(), "a command on the dead gateway's connection: {r}");

    // Reconnect at once, retrying (bounded) until the launcher has started a new gateway;
    // meanwhile the guest keeps running: its counter goes on, one by one.
    let connect = json!({"op": "connect", "client": "c", "address": addr, "retry_for": 10});
    let sent = killed.elapsed();
    py.send(&connect);
    let window = con.drain_for(Duration::from_millis(600));
    let r = py.answer(&connect, Duration::from_secs(20));
    assert!(r.get("exception").is_none(), "reconnecting: {r}");
    let back = sent + Duration::from_secs_f64(r["took"].as_f64().unwrap_or(0.0));
    let ticks: Vec<u64> = window.iter().filter(|l| l.starts_with("TICK")).map(|l| tick(l)).collect();
    assert!(ticks.len() >= 3, "the guest stalled without its gateway: {window:?}");
    for t in &ticks {
        assert_eq!(*t, last + 1, "ticks skipped or repeated: {window:?}");
        last = *t;
    }
    let gw2 = vm.gateway(Some(gw), Duration::from_secs(5)).expect("a new qmp-gateway");
    assert_ne!(gw2, gw);
    assert_eq!(r["greeting"]["QMP"]["version"]["qemu"]["major"], 1, "{r}");
    let attempts = r["attempts"].clone();
    assert_eq!(query_status(&mut py, "c"), status(true, "running"));
    assert_eq!(py.ret("c", "query-name", json!({})), json!({"name": "e2e-crash"}));

    // Commands and events work again, and reach the guest.
    assert_events_then_return(&py.execute("c", "stop", json!({})), &[("STOP", json!({}))]);
    for l in con.drain_for(Duration::from_millis(200)) {
        if l.starts_with("TICK") {
            last = tick(&l);
        }
    }
    let frozen = con.drain_for(Duration::from_millis(500));
    assert!(frozen.is_empty(), "the guest ran while stopped: {frozen:?}");
    assert_events_then_return(&py.execute("c", "cont", json!({})), &[("RESUME", json!({}))]);
    assert_eq!(tick(&con.expect("TICK", REPLY).expect("tick")), last + 1);
    con.command("ping", "PONG", REPLY).expect("ping");
    assert_eq!(query_status(&mut py, "c"), status(true, "running"));

    assert_events_then_return(
        &py.execute("c", "quit", json!({})),
        &[("SHUTDOWN", json!({"guest": false, "reason": "host-qmp-quit"}))],
    );
    py.disconnect("c");
    let status = vm.wait_exit(EXIT);
    let stderr = vm.stderr.take();
    assert_eq!(status.code(), Some(0), "flotilla ended with {}; stderr:\n{stderr}", describe(status));
    assert!(
        stderr.contains(&format!("qmp-gateway (pid {gw}) exited (signal 9)")),
        "the launcher did not report the crash:\n{stderr}"
    );
    vm.assert_cleaned_up(core);
    eprintln!(
        "gateway restart: the client was back within {:.0} ms of the kill ({} connection attempts); test {}",
        back.as_secs_f64() * 1e3,
        attempts,
        elapsed(t0)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. vmm-core gone: commands answer at once.
// ---------------------------------------------------------------------------------------------

/// vmm-core killed (SIGKILL) under a running gateway: QMP commands owned by vmm-core (and HMP
/// over them) answer GenericError "The vmm-core daemon is not available ..." at once (< 2 s,
/// measured in ms) instead of hanging; the gateway's own commands still answer.
///
/// The launcher tears the VM down as soon as vmm-core exits, so to see the gateway with
/// vmm-core absent the launcher is held (SIGSTOP) while vmm-core is killed, and let go
/// (SIGCONT) afterwards: it then ends the VM as it would have, dying of vmm-core's signal.
#[test]
fn with_vmm_core_gone_commands_fail_at_once_instead_of_hanging() {
    let t0 = Instant::now();
    let mut vm = QmpVm::start("qmp-down", &VmOptions { name: "e2e-down", qmp: &[true], extra: &[] });
    let mut con = vm.console_ready();
    let core = vm.vmm_core();
    let gw = vm.gateway(None, BOOT).expect("qmp-gateway");
    let mut c = vm.raw(0);
    c.negotiate();
    assert_eq!(c.execute("query-status", Value::Null)["return"], status(true, "running"));
    con.command("ping", "PONG", REPLY).expect("ping");

    signal(vm.pid(), libc::SIGSTOP);
    signal(core, libc::SIGKILL);
    assert!(wait_gone(core, Duration::from_secs(2)), "vmm-core survived SIGKILL");

    let unavailable = "The vmm-core daemon is not available (it is stopped or restarting); try again";
    let mut worst = Duration::ZERO;
    for (cmd, args) in [
        ("query-status", Value::Null),
        ("stop", Value::Null),
        ("query-chardev", Value::Null),
        ("memsave", json!({"val": 0, "size": 16, "filename": vm.dir.path("x.bin")})),
    ] {
        let t = Instant::now();
        let r = c.execute(cmd, args);
        let took = t.elapsed();
        worst = worst.max(took);
        assert_eq!((class(&r), desc(&r)), ("GenericError", unavailable), "{cmd}: {r}");
        assert!(took < Duration::from_secs(2), "{cmd} took {took:?} to fail");
    }
    let t = Instant::now();
    let r = c.execute("human-monitor-command", json!({"command-line": "info status"}));
    assert_eq!(r["return"], format!("Error: {unavailable}\r\n"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // The gateway's own commands still answer.
    let r = c.execute("query-commands", Value::Null);
    assert!(r["return"].as_array().is_some_and(|l| l.iter().any(|x| x["name"] == "query-commands")), "{r}");
    assert!(alive(gw), "the gateway died with vmm-core");

    // Let the launcher go: it notices vmm-core's death and ends everything.
    signal(vm.pid(), libc::SIGCONT);
    c.expect_closed(EXIT);
    let status = vm.wait_exit(EXIT);
    let stderr = vm.stderr.take();
    assert_eq!(describe(status), "signal 9", "flotilla ends like vmm-core did; stderr:\n{stderr}");
    // vmm-core, killed, could not remove its serial socket: the launcher does.
    vm.assert_cleaned_up(core);
    eprintln!("vmm-core down: errors within {:.1} ms; test {}", worst.as_secs_f64() * 1e3, elapsed(t0));
}

// ---------------------------------------------------------------------------------------------
// 6. Malformed input through the full stack.
// ---------------------------------------------------------------------------------------------

/// Raw sockets (unix and TCP) through the full stack: a command before negotiation, bad JSON,
/// an unknown command, a missing argument, a wrong type, an unexpected argument and a 2 MiB
/// message are answered with QEMU 1.1's classes and `data`, and the stream recovers each time;
/// on the wire STOP/RESUME precede their replies and every line ends in `\r\n`; the guest and
/// the gateway are untouched (no restart); `quit` gives SHUTDOWN, the reply, then EOF.
#[test]
fn malformed_input_through_the_full_stack_is_answered_and_the_stream_recovers() {
    let t0 = Instant::now();
    let mut vm = QmpVm::start("qmp-malformed", &VmOptions { name: "e2e-bad", qmp: &[true, false], extra: &[] });
    let mut con = vm.console_ready();
    let core = vm.vmm_core();
    let gw = vm.gateway(None, BOOT).expect("qmp-gateway");

    for sock in 0..2 {
        let mut c = vm.raw(sock);
        let r = c.cmd(r#"{"execute": "query-status", "id": "early"}"#);
        assert_eq!((class(&r), r["id"].as_str()), ("CommandNotFound", Some("early")), "{r}");
        c.negotiate();
        if sock == 0 {
            // Both monitors in query-chardev; the TCP one has no client yet.
            let QmpAddrUnix(path) = &vm.qmp[0] else { unreachable!() };
            let QmpAddr::Tcp(port) = &vm.qmp[1] else { unreachable!() };
            let r = c.execute("query-chardev", Value::Null);
            assert_eq!(
                r["return"],
                json!([
                    {"label": "serial0", "filename": format!("unix:{},server=on", vm.serial.display())},
                    {"label": "compat_monitor0", "filename": format!("unix:{},server=on", path.display())},
                    {"label": "compat_monitor1", "filename": format!("disconnected:tcp:127.0.0.1:{port},server=on")},
                ])
            );
        }

        // Bad JSON: JSONParsing (as many replies as QEMU's parser gives), then the stream goes on.
        c.send_raw(b"{\"execute\": query-status}\n");
        c.send_raw(b"{\"execute\": \"query-name\", \"id\": \"after-bad-json\"}\n");
        let mut bad = Vec::new();
        let after = loop {
            let r = c.reply();
            if r.get("id").is_some() {
                break r;
            }
            bad.push(r);
        };
        assert_eq!(after["return"], json!({"name": "e2e-bad"}), "{after}");
        assert!(!bad.is_empty(), "no error for bad JSON");
        for r in &bad {
            assert_eq!(class(r), "JSONParsing", "{bad:?}");
            assert!(desc(r).starts_with("JSON parse error, "), "{bad:?}");
        }
        // Unknown command, missing argument, wrong type, unexpected argument: 1.1's classes.
        let r = c.execute("no-such-command", Value::Null);
        assert_eq!(
            r["error"],
            json!({"class": "CommandNotFound", "desc": "The command no-such-command has not been found",
                   "data": {"name": "no-such-command"}})
        );
        let r = c.execute("memsave", json!({"val": 0, "size": 16}));
        assert_eq!(
            r["error"],
            json!({"class": "MissingParameter", "desc": "Parameter 'filename' is missing", "data": {"name": "filename"}})
        );
        let r = c.execute("memsave", json!({"val": 0, "size": "16", "filename": "/dev/null"}));
        assert_eq!(
            r["error"],
            json!({"class": "InvalidParameterType", "desc": "Invalid parameter type for 'size', expected: integer",
                   "data": {"name": "size", "expected": "integer"}})
        );
        let r = c.execute("query-status", json!({"verbose": true}));
        assert_eq!(r["error"]["class"], "InvalidParameter", "{r}");
        assert_eq!(r["error"]["data"], json!({"name": "verbose"}), "{r}");
        // A huge message: one error, nothing held, the stream recovers.
        c.send_raw(b"{\"execute\": \"query-name\", \"id\": \"");
        let chunk = vec![b'x'; 256 * 1024];
        for _ in 0..8 {
            c.send_raw(&chunk);
        }
        c.send_raw(b"\"}\n");
        let r = c.reply();
        assert_eq!(
            r["error"],
            json!({"class": "JSONParsing", "desc": "JSON token size limit exceeded", "data": {}}),
            "2 MiB message"
        );
        let r = c.cmd(r#"{"execute": "query-status", "id": {"seq": 1}}"#);
        assert_eq!(r, json!({"return": status(true, "running"), "id": {"seq": 1}}));

        // On the wire: STOP before stop's reply, RESUME before cont's, every line \r\n-ended.
        c.send_raw(b"{\"execute\": \"stop\", \"id\": 1}\n");
        let a = c.next(REPLY);
        let b = c.next(REPLY);
        match (a, b) {
            (Some(Incoming::Msg(a)), Some(Incoming::Msg(b))) => {
                assert_eq!(a["event"], "STOP", "{a}");
                assert_eq!(b, json!({"return": {}, "id": 1}));
            }
            other => panic!("stop: {other:?}"),
        }
        c.send_raw(b"{\"execute\": \"cont\", \"id\": 2}\n");
        match (c.next(REPLY), c.next(REPLY)) {
            (Some(Incoming::Msg(a)), Some(Incoming::Msg(b))) => {
                assert_eq!(a["event"], "RESUME", "{a}");
                assert_eq!(b, json!({"return": {}, "id": 2}));
            }
            other => panic!("cont: {other:?}"),
        }
        let lines = c.raw_lines.lock().expect("lock").clone();
        assert!(lines.iter().all(|l| l.ends_with("}\r\n")), "line ends: {lines:?}");
    }
    // The whole stack is fine: the guest runs, the gateway never restarted.
    con.command("ping", "PONG", REPLY).expect("ping");
    assert_eq!(vm.gateway(None, Duration::ZERO), Some(gw), "the gateway was restarted");

    // quit on a raw socket: SHUTDOWN, the reply, then the server closes (QEMU's transcript).
    let mut c = vm.raw(0);
    c.negotiate();
    c.send_raw(b"{\"execute\": \"quit\"}\n");
    match (c.next(REPLY), c.next(REPLY)) {
        (Some(Incoming::Msg(a)), Some(Incoming::Msg(b))) => {
            assert_eq!(a["event"], "SHUTDOWN", "{a}");
            assert_eq!(b, json!({"return": {}}));
        }
        other => panic!("quit: {other:?}"),
    }
    c.expect_closed(EXIT);
    vm.assert_exits_0_and_cleaned_up(core);
    eprintln!("malformed input: {}", elapsed(t0));
}
