//! The generated types: every one round-trips through serde_json, wire names are the schema's,
//! and QEMU 7.2's replies (where their shape is 1.1's) read into them.

use std::path::PathBuf;

use flotilla_schema::commands::{self, Command};
use flotilla_schema::table;
use flotilla_schema::types::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

type RoundTrip = fn(&Value) -> Result<Value, String>;

fn rt<T: Serialize + DeserializeOwned>(v: &Value) -> Result<Value, String> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&t).map_err(|e| e.to_string())
}

macro_rules! samples {
    ($($ty:ident => $json:expr),* $(,)?) => {
        vec![$((stringify!($ty), rt::<$ty> as RoundTrip, $json)),*]
    };
}

fn pci_device(bridge: Option<Value>) -> Value {
    let mut d = json!({
        "bus": 0, "slot": 1, "function": 0,
        "class_info": {"desc": "SCSI controller", "class": 256},
        "id": {"device": 4097, "vendor": 6900},
        "irq": 10, "qdev_id": "vblk0",
        "regions": [
            {"bar": 0, "type": "io", "address": 49152, "size": 128},
            {"bar": 4, "type": "memory", "address": 4261412864u64, "size": 16384,
             "prefetch": true, "mem_type_64": true}
        ]
    });
    if let Some(b) = bridge {
        d["pci_bridge"] = b;
    }
    d
}

fn bridge() -> Value {
    json!({
        "bus": {"number": 0, "secondary": 1, "subordinate": 1,
                "io_range": {"base": 4096, "limit": 8191},
                "memory_range": {"base": 0, "limit": 0},
                "prefetchable_range": {"base": 0, "limit": 0}},
        "devices": [pci_device(None)]
    })
}

fn stats() -> Value {
    json!({"rd_bytes": 12800, "wr_bytes": 0, "rd_operations": 4, "wr_operations": 0,
           "flush_operations": 0, "flush_total_time_ns": 0, "wr_total_time_ns": 0,
           "rd_total_time_ns": 796909, "wr_highest_offset": 0})
}

fn samples() -> Vec<(&'static str, RoundTrip, Value)> {
    use commands::*;
    samples![
        NameInfo => json!({"name": "lab-guest"}),
        VersionInfo => json!({"qemu": {"major": 1, "minor": 1, "micro": 0}, "package": "flotilla-0.1.0"}),
        VersionInfoQemu => json!({"major": 7, "minor": 2, "micro": 22}),
        KvmInfo => json!({"enabled": false, "present": true}),
        RunState => json!("internal-error"),
        StatusInfo => json!({"running": false, "singlestep": false, "status": "save-vm"}),
        UuidInfo => json!({"UUID": "6b2f4c3e-8d1a-4c7b-9f10-2a3b4c5d6e7f"}),
        ChardevInfo => json!({"label": "ser0", "filename": "unix:/var/lib/vm/serial-a.sock,server=on"}),
        CommandInfo => json!({"name": "query-status"}),
        MigrationStats => json!({"transferred": 1, "remaining": 2, "total": 3}),
        MigrationInfo => json!({"status": "active",
            "ram": {"transferred": 1, "remaining": 2, "total": 3},
            "disk": {"transferred": 4, "remaining": 5, "total": 9}}),
        MouseInfo => json!({"name": "QEMU Virtio Tablet", "index": 3, "current": true, "absolute": true}),
        CpuInfo => json!({"CPU": 0, "current": true, "halted": false, "pc": -2130706432i64,
            "nip": 1, "npc": 2, "PC": 3, "thread_id": 4242}),
        BlockDeviceInfo => json!({"file": "/var/lib/vm/disk.qcow2", "ro": false, "drv": "qcow2",
            "backing_file": "/var/lib/vm/base.raw", "encrypted": false, "bps": 0, "bps_rd": 1,
            "bps_wr": 2, "iops": 3, "iops_rd": 4, "iops_wr": 5}),
        BlockDeviceIoStatus => json!("nospace"),
        BlockInfo => json!({"device": "drive0", "type": "unknown", "removable": true,
            "locked": false, "tray_open": false, "io-status": "ok",
            "inserted": {"file": "/var/lib/vm/disk.raw", "ro": true, "drv": "raw", "encrypted": false,
                "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}}),
        BlockDeviceStats => stats(),
        BlockStats => json!({"device": "drive0", "stats": stats(),
            "parent": {"stats": stats(), "parent": {"stats": stats()}}}),
        VncClientInfo => json!({"host": "127.0.0.1", "family": "ipv4", "service": "49616",
            "x509_dname": "CN=client", "sasl_username": "alice"}),
        VncInfo => json!({"enabled": true, "host": "127.0.0.1", "family": "ipv4", "service": "5905",
            "auth": "vnc", "clients": [{"host": "127.0.0.1", "family": "ipv4", "service": "49616"}]}),
        SpiceChannel => json!({"host": "127.0.0.1", "family": "ipv4", "port": "40000",
            "connection-id": 1804289383, "channel-type": 1, "channel-id": 0, "tls": false}),
        SpiceInfo => json!({"enabled": true, "host": "127.0.0.1", "port": 5930, "tls-port": 5931,
            "auth": "none", "compiled-version": "0.15.1",
            "channels": [{"host": "127.0.0.1", "family": "ipv4", "port": "40000",
                "connection-id": 1, "channel-type": 1, "channel-id": 0, "tls": true}]}),
        BalloonInfo => json!({"actual": 268435456, "mem_swapped_in": 1, "mem_swapped_out": 2,
            "major_page_faults": 3, "minor_page_faults": 4, "free_mem": 5, "total_mem": 6}),
        PciMemoryRange => json!({"base": 4096, "limit": 8191}),
        PciMemoryRegion => json!({"bar": 1, "type": "memory", "address": 4273799168u64,
            "size": 4096, "prefetch": false, "mem_type_64": false}),
        PciBridgeInfo => bridge(),
        PciBridgeInfoBus => bridge()["bus"].clone(),
        PciDeviceInfo => pci_device(Some(bridge())),
        PciDeviceInfoClassInfo => json!({"class": 1536}),
        PciDeviceInfoId => json!({"device": 10688, "vendor": 32902}),
        PciInfo => json!({"bus": 0, "devices": [pci_device(Some(bridge())), pci_device(None)]}),
        DevicePropertyInfo => json!({"name": "balloon0", "type": "child<virtio-balloon-pci>"}),
        Empty => json!({}),
        CpuArgs => json!({"index": 1}),
        MemsaveArgs => json!({"val": -2130706432i64, "size": 4096, "filename": "/tmp/m", "cpu-index": 0}),
        PmemsaveArgs => json!({"val": 0, "size": 4096, "filename": "/tmp/p"}),
        SetLinkArgs => json!({"name": "nic0", "up": false}),
        BlockPasswdArgs => json!({"device": "drive0", "password": "s3"}),
        BalloonArgs => json!({"value": 201326592}),
        BlockResizeArgs => json!({"device": "drive0", "size": 134217728}),
        BlockdevSnapshotSyncArgs => json!({"device": "drive1", "snapshot-file": "/tmp/o.qcow2", "format": "qcow2"}),
        HumanMonitorCommandArgs => json!({"command-line": "info status", "cpu-index": 0}),
        MigrateSetDowntimeArgs => json!({"value": 0.25}),
        MigrateSetSpeedArgs => json!({"value": 33554432}),
        QomListArgs => json!({"path": "/machine/peripheral"}),
        QomGetArgs => json!({"path": "/machine/peripheral/nic0", "property": "mac"}),
        QomSetArgs => json!({"path": "/machine/peripheral/balloon0",
            "property": "guest-stats-polling-interval", "value": 2}),
        SetPasswordArgs => json!({"protocol": "vnc", "password": "x", "connected": "keep"}),
        ExpirePasswordArgs => json!({"protocol": "vnc", "time": "+60"}),
    ]
}

#[test]
fn every_generated_type_round_trips() {
    let samples = samples();
    for (name, roundtrip, value) in &samples {
        assert_eq!(roundtrip(value).as_ref(), Ok(value), "{name}");
    }
    // Every struct and enum has a sample.
    let mut names: Vec<&str> = samples.iter().map(|(n, ..)| *n).collect();
    names.sort_unstable();
    for s in table::STRUCTS {
        assert!(names.binary_search(&s.name).is_ok(), "no sample for {}", s.name);
    }
    for e in table::ENUMS {
        assert!(names.binary_search(&e.name).is_ok(), "no sample for {}", e.name);
    }
    assert_eq!(samples.len(), table::STRUCTS.len() + table::ENUMS.len() + 1);
}

#[test]
fn optional_members_are_left_out_and_may_be_absent() {
    let minimal = json!({"actual": 1});
    let b: BalloonInfo = serde_json::from_value(minimal.clone()).unwrap();
    assert_eq!(b, BalloonInfo { actual: 1, ..Default::default() });
    assert_eq!(serde_json::to_value(&b).unwrap(), minimal);
    let v = serde_json::to_value(VncInfo { enabled: false, ..Default::default() }).unwrap();
    assert_eq!(v, json!({"enabled": false}));
    // Required members are required.
    assert!(serde_json::from_value::<KvmInfo>(json!({"enabled": true})).is_err());
    assert!(
        serde_json::from_value::<StatusInfo>(json!({"running": true, "singlestep": false, "status": "nope"})).is_err()
    );
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

#[test]
fn wire_names_are_the_schemas() {
    let cpu = CpuInfo {
        cpu: 0,
        current: true,
        halted: false,
        pc: Some(1),
        nip: None,
        npc: None,
        pc_upper: Some(2),
        thread_id: 7,
    };
    let v = serde_json::to_value(&cpu).unwrap();
    assert_eq!(keys(&v), ["CPU", "PC", "current", "halted", "pc", "thread_id"]);
    assert_eq!((v["pc"].clone(), v["PC"].clone()), (json!(1), json!(2)));

    let v = serde_json::to_value(UuidInfo { uuid: "u".into() }).unwrap();
    assert_eq!(keys(&v), ["UUID"]);

    let block = BlockInfo {
        device: "d".into(),
        type_: "unknown".into(),
        removable: false,
        locked: false,
        inserted: None,
        tray_open: Some(false),
        io_status: Some(BlockDeviceIoStatus::Failed),
    };
    let v = serde_json::to_value(&block).unwrap();
    assert_eq!(keys(&v), ["device", "io-status", "locked", "removable", "tray_open", "type"]);
    assert_eq!(v["io-status"], "failed");

    let region = PciMemoryRegion { mem_type_64: Some(true), ..Default::default() };
    let v = serde_json::to_value(&region).unwrap();
    assert_eq!(keys(&v), ["address", "bar", "mem_type_64", "size", "type"]);

    let dev: PciDeviceInfo = serde_json::from_value(pci_device(None)).unwrap();
    assert_eq!(dev.class_info.class, 256);
    assert_eq!(dev.class_info.desc.as_deref(), Some("SCSI controller"));
    assert_eq!(
        keys(&serde_json::to_value(&dev).unwrap()),
        ["bus", "class_info", "function", "id", "irq", "qdev_id", "regions", "slot"]
    );

    let v = serde_json::to_value(SpiceChannel::default()).unwrap();
    assert_eq!(keys(&v), ["channel-id", "channel-type", "connection-id", "family", "host", "port", "tls"]);
    let v =
        serde_json::to_value(SpiceInfo { tls_port: Some(1), compiled_version: Some("x".into()), ..Default::default() })
            .unwrap();
    assert_eq!(keys(&v), ["compiled-version", "enabled", "tls-port"]);

    let v = serde_json::to_value(commands::MemsaveArgs { cpu_index: Some(1), ..Default::default() }).unwrap();
    assert_eq!(keys(&v), ["cpu-index", "filename", "size", "val"]);
    let v = serde_json::to_value(commands::HumanMonitorCommandArgs::default()).unwrap();
    assert_eq!(keys(&v), ["command-line"]);
    let v = serde_json::to_value(commands::BlockdevSnapshotSyncArgs::default()).unwrap();
    assert_eq!(keys(&v), ["device", "snapshot-file"]);

    assert_eq!(RunState::ALL.len(), 13);
    assert_eq!(RunState::FinishMigrate.as_str(), "finish-migrate");
    assert_eq!("io-error".parse::<RunState>(), Ok(RunState::IoError));
    assert_eq!(RunState::Shutdown.to_string(), "shutdown");
    assert_eq!(serde_json::to_value(RunState::RestoreVm).unwrap(), "restore-vm");
}

#[test]
fn the_table_knows_the_rust_names() {
    let cpu = table::struct_spec("CpuInfo").unwrap();
    let pairs: Vec<(&str, &str)> = cpu.members.iter().map(|m| (m.name, m.rust_name)).collect();
    assert_eq!(
        pairs,
        [
            ("CPU", "cpu"),
            ("current", "current"),
            ("halted", "halted"),
            ("pc", "pc"),
            ("nip", "nip"),
            ("npc", "npc"),
            ("PC", "pc_upper"),
            ("thread_id", "thread_id")
        ]
    );
    assert_eq!(commands::InjectNmi::info().rust_name, "InjectNmi");
    assert_eq!(commands::QomGet::info().args_struct, Some("QomGetArgs"));
    assert_eq!(commands::Quit::info().args_struct, None);
}

/// One round trip per command's `Returns` type.
fn returns() -> Vec<(&'static str, RoundTrip)> {
    use commands::*;
    macro_rules! r {
        ($($c:ident),* $(,)?) => { vec![$((<$c as Command>::NAME, rt::<<$c as Command>::Returns> as RoundTrip)),*] };
    }
    r![
        QueryName,
        QueryVersion,
        QueryKvm,
        QueryStatus,
        QueryUuid,
        QueryChardev,
        QueryCommands,
        QueryMigrate,
        QueryMice,
        QueryCpus,
        QueryBlock,
        QueryBlockstats,
        QueryVnc,
        QuerySpice,
        QueryBalloon,
        QueryPci,
        Quit,
        Stop,
        SystemReset,
        SystemPowerdown,
        Cpu,
        Memsave,
        Pmemsave,
        Cont,
        InjectNmi,
        SetLink,
        BlockPasswd,
        Balloon,
        BlockResize,
        BlockdevSnapshotSync,
        HumanMonitorCommand,
        MigrateCancel,
        MigrateSetDowntime,
        MigrateSetSpeed,
        QomList,
        QomGet,
        QomSet,
        SetPassword,
        ExpirePassword,
    ]
}

#[test]
fn every_command_has_typed_returns() {
    let names: Vec<&str> = returns().iter().map(|(n, _)| *n).collect();
    let table: Vec<&str> = table::COMMANDS.iter().map(|c| c.name).collect();
    assert_eq!(names, table);
}

/// `sub` holds only members of `full`, with equal values (7.2 adds members 1.1 lacks).
fn is_subset(sub: &Value, full: &Value) -> bool {
    match (sub, full) {
        (Value::Object(a), Value::Object(b)) => a.iter().all(|(k, v)| b.get(k).is_some_and(|w| is_subset(v, w))),
        (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| is_subset(x, y)),
        (a, b) => a == b,
    }
}

fn transcripts() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/qemu-7.2-qmp");
    dir.is_dir().then_some(dir)
}

#[test]
fn qemu_7_2_replies_read_into_the_1_1_types() {
    let Some(dir) = transcripts() else {
        eprintln!("skipped: ../shared/qemu-7.2-qmp is not here");
        return;
    };
    let returns = returns();
    let mut checked = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "txt")) {
        let text = std::fs::read_to_string(file).unwrap();
        let mut pending: Option<String> = None;
        for line in text.lines() {
            if let Some(req) = line.strip_prefix("-> ") {
                // Some transcripts send malformed JSON on purpose.
                let req: Value = serde_json::from_str(req).unwrap_or_default();
                pending = req["execute"].as_str().map(str::to_string);
            } else if let Some(reply) = line.strip_prefix("<- ") {
                let Ok(reply) = serde_json::from_str::<Value>(reply) else { continue };
                let (Some(cmd), Some(ret)) = (&pending, reply.get("return")) else {
                    if reply.get("error").is_some() {
                        pending = None;
                    }
                    continue;
                };
                if let Some((_, roundtrip)) = returns.iter().find(|(n, _)| n == cmd) {
                    let back = roundtrip(ret)
                        .unwrap_or_else(|e| panic!("{}: {cmd} reply does not read: {e}\n{ret}", file.display()));
                    assert!(is_subset(&back, ret), "{}: {cmd}: {back} is not within {ret}", file.display());
                    checked.push(cmd.clone());
                }
                pending = None;
            }
        }
    }
    checked.sort();
    checked.dedup();
    eprintln!("checked {} commands against QEMU 7.2 replies: {checked:?}", checked.len());
    // The 34 commands QEMU 7.2 still has, less those it answered with an error every time.
    assert_eq!(checked.len(), 34, "{checked:?}");
    for c in ["query-block", "query-blockstats", "query-pci", "query-vnc", "query-spice", "query-chardev"] {
        assert!(checked.iter().any(|x| x == c), "{c} not checked");
    }
}
