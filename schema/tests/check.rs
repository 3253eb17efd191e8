//! The argument checker: QEMU 1.1's classes and data, QEMU 7.2's texts (from the transcripts).

use std::path::PathBuf;

use flotilla_schema::check::{check_arguments, check_command, ArgError, QmpError};
use flotilla_schema::parse::Builtin;
use flotilla_schema::table::{CommandSpec, Member, Ty};
use serde_json::{json, Value};

#[track_caller]
fn refused(command: &str, args: Value) -> ArgError {
    let args = if args.is_null() { None } else { Some(&args) };
    check_command(command, args).expect_err("refused")
}

#[track_caller]
fn accepted(command: &str, args: Value) {
    let args = if args.is_null() { None } else { Some(&args) };
    check_command(command, args).unwrap_or_else(|e| panic!("{command}: {e}"));
}

#[test]
fn missing_parameter() {
    let e = refused("balloon", Value::Null);
    assert_eq!(e, ArgError::MissingParameter { name: "value".into() });
    assert_eq!(e.class(), "MissingParameter");
    assert_eq!(e.to_string(), "Parameter 'value' is missing");
    assert_eq!(e.data(), json!({"name": "value"}));
    assert_eq!(
        serde_json::to_value(e.to_qmp()).unwrap(),
        json!({"class": "MissingParameter", "desc": "Parameter 'value' is missing", "data": {"name": "value"}})
    );
    assert_eq!(refused("set_link", json!({"name": "nic0"})).to_string(), "Parameter 'up' is missing");
    // The schema's order: `val` before `size` and `filename`.
    assert_eq!(refused("memsave", json!({})).to_string(), "Parameter 'val' is missing");
    // Missing comes before unexpected.
    assert_eq!(refused("balloon", json!({"foo": 1})).to_string(), "Parameter 'value' is missing");
}

#[test]
fn invalid_parameter_type() {
    let e = refused("balloon", json!({"value": "abc"}));
    assert_eq!(e, ArgError::InvalidParameterType { name: "value".into(), expected: "integer" });
    assert_eq!(e.class(), "InvalidParameterType");
    assert_eq!(e.to_string(), "Invalid parameter type for 'value', expected: integer");
    assert_eq!(e.data(), json!({"name": "value", "expected": "integer"}));

    let desc = |c, a| refused(c, a).to_string();
    assert_eq!(
        desc("set_link", json!({"name": "nic0", "up": 1})),
        "Invalid parameter type for 'up', expected: boolean"
    );
    assert_eq!(desc("qom-list", json!({"path": 5})), "Invalid parameter type for 'path', expected: string");
    assert_eq!(
        desc("migrate_set_downtime", json!({"value": "1"})),
        "Invalid parameter type for 'value', expected: number"
    );
    assert_eq!(desc("balloon", json!({"value": 1.0})), "Invalid parameter type for 'value', expected: integer");
    assert_eq!(desc("balloon", json!({"value": null})), "Invalid parameter type for 'value', expected: integer");
    // int is int64: 2^64 - 1629487104 (a kernel address sent unsigned) is refused.
    assert_eq!(
        desc("memsave", json!({"val": 18446744072080064512u64, "size": 4096, "filename": "/f", "cpu-index": 0})),
        "Invalid parameter type for 'val', expected: integer"
    );
    // An optional argument, when present, is checked.
    assert_eq!(
        desc("memsave", json!({"val": 0, "size": 4096, "filename": "/f", "cpu-index": "0"})),
        "Invalid parameter type for 'cpu-index', expected: integer"
    );
    // A type error comes before an unexpected argument.
    assert_eq!(
        desc("balloon", json!({"value": true, "foo": 1})),
        "Invalid parameter type for 'value', expected: integer"
    );
}

#[test]
fn unexpected_parameter() {
    let e = refused("query-status", json!({"foo": 1}));
    assert_eq!(e, ArgError::UnexpectedParameter { name: "foo".into() });
    assert_eq!(e.class(), "InvalidParameter");
    assert_eq!(e.to_string(), "Parameter 'foo' is unexpected");
    assert_eq!(e.data(), json!({"name": "foo"}));
    assert_eq!(refused("balloon", json!({"value": 1, "vaule": 2})).to_string(), "Parameter 'vaule' is unexpected");
}

#[test]
fn command_and_arguments_object() {
    let e = refused("no-such-command", Value::Null);
    assert_eq!(e.class(), "CommandNotFound");
    assert_eq!(e.to_string(), "The command no-such-command has not been found");
    assert_eq!(e.data(), json!({"name": "no-such-command"}));

    let e = refused("query-status", json!([]));
    assert_eq!(e, ArgError::ArgumentsNotObject);
    assert_eq!(e.class(), "QMPBadInputObjectMember");
    assert_eq!(e.to_string(), "QMP input member 'arguments' must be an object");
    assert_eq!(e.data(), json!({"member": "arguments", "expected": "object"}));
}

#[test]
fn valid_arguments_pass() {
    accepted("query-status", Value::Null);
    accepted("query-status", json!({}));
    accepted("memsave", json!({"val": -2130706432i64, "size": 4096, "filename": "/f"}));
    accepted("memsave", json!({"val": 0, "size": 4096, "filename": "/f", "cpu-index": 1}));
    accepted("migrate_set_downtime", json!({"value": 1}));
    accepted("migrate_set_downtime", json!({"value": 0.5}));
    accepted("balloon", json!({"value": i64::MAX}));
    accepted("balloon", json!({"value": i64::MIN}));
    for value in [json!(1), json!("s"), json!(null), json!({"a": [1]}), json!([true])] {
        accepted("qom-set", json!({"path": "/", "property": "p", "value": value}));
    }
    accepted("human-monitor-command", json!({"command-line": "info status"}));
    accepted("blockdev-snapshot-sync", json!({"device": "d", "snapshot-file": "/o", "format": "qcow2"}));
}

static NESTED: CommandSpec = CommandSpec {
    name: "x-test",
    rust_name: "XTest",
    args_struct: None,
    members: &[
        Member { name: "stats", rust_name: "stats", ty: Ty::Struct("MigrationStats"), optional: true },
        Member { name: "state", rust_name: "state", ty: Ty::Enum("RunState"), optional: true },
        Member { name: "list", rust_name: "list", ty: Ty::List(&Ty::Builtin(Builtin::Int)), optional: true },
        Member { name: "byte", rust_name: "byte", ty: Ty::Builtin(Builtin::Uint8), optional: true },
        Member { name: "i8", rust_name: "i8", ty: Ty::Builtin(Builtin::Int8), optional: true },
        Member { name: "u64", rust_name: "u64", ty: Ty::Builtin(Builtin::Uint64), optional: true },
        Member { name: "id", rust_name: "id", ty: Ty::Struct("PciDeviceInfoId"), optional: true },
    ],
    returns: None,
    gen: true,
};

#[test]
fn structs_enums_lists_and_sized_integers() {
    let check = |v: Value| check_arguments(&NESTED, Some(&v)).map_err(|e| (e.class(), e.to_string()));
    assert_eq!(check(json!({"stats": {"transferred": 1, "remaining": 2, "total": 3}, "state": "running"})), Ok(()));
    assert_eq!(
        check(json!({"stats": 1})),
        Err(("InvalidParameterType", "Invalid parameter type for 'stats', expected: object".into()))
    );
    assert_eq!(
        check(json!({"stats": {"transferred": 1, "total": 3}})),
        Err(("MissingParameter", "Parameter 'stats.remaining' is missing".into()))
    );
    assert_eq!(
        check(json!({"stats": {"transferred": 1, "remaining": 2, "total": 3, "x": 0}})),
        Err(("InvalidParameter", "Parameter 'stats.x' is unexpected".into()))
    );
    assert_eq!(
        check(json!({"id": {"device": 1, "vendor": "x"}})),
        Err(("InvalidParameterType", "Invalid parameter type for 'id.vendor', expected: integer".into()))
    );
    assert_eq!(
        check(json!({"state": "sleeping"})),
        Err(("InvalidParameter", "Parameter 'state' does not accept value 'sleeping'".into()))
    );
    assert_eq!(
        check(json!({"state": 1})),
        Err(("InvalidParameterType", "Invalid parameter type for 'state', expected: string".into()))
    );
    assert_eq!(check(json!({"list": [1, 2, 3]})), Ok(()));
    assert_eq!(
        check(json!({"list": 1})),
        Err(("InvalidParameterType", "Invalid parameter type for 'list', expected: array".into()))
    );
    assert_eq!(
        check(json!({"list": [1, "2"]})),
        Err(("InvalidParameterType", "Invalid parameter type for 'list[1]', expected: integer".into()))
    );
    assert_eq!(check(json!({"byte": 255, "i8": -128, "u64": u64::MAX})), Ok(()));
    assert_eq!(check(json!({"byte": 256})), Err(("InvalidParameterValue", "Parameter 'byte' expects uint8".into())));
    assert_eq!(check(json!({"i8": 128})), Err(("InvalidParameterValue", "Parameter 'i8' expects int8".into())));
    assert_eq!(check(json!({"u64": -1})), Err(("InvalidParameterValue", "Parameter 'u64' expects uint64".into())));
    let e = check_arguments(&NESTED, Some(&json!({"byte": 256}))).unwrap_err();
    assert_eq!(e.data(), json!({"name": "byte", "expected": "uint8"}));
}

#[test]
fn qmp_error_shape() {
    let e = QmpError::new("DeviceNotFound", "Device 'nosuch' not found");
    assert_eq!(
        serde_json::to_value(&e).unwrap(),
        json!({"class": "DeviceNotFound", "desc": "Device 'nosuch' not found", "data": {}})
    );
    let bare = QmpError { data: None, ..e.clone() };
    assert_eq!(
        serde_json::to_value(&bare).unwrap(),
        json!({"class": "DeviceNotFound", "desc": "Device 'nosuch' not found"})
    );
    let back: QmpError = serde_json::from_value(json!({"class": "C", "desc": "d"})).unwrap();
    assert_eq!(back.data, None);
    let from: QmpError = ArgError::MissingParameter { name: "up".into() }.into();
    assert_eq!(from.class, "MissingParameter");
}

fn transcripts() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/qemu-7.2-qmp");
    dir.is_dir().then_some(dir)
}

/// Every request/reply pair of the transcripts, as (file, request, reply).
fn exchanges(dir: &std::path::Path) -> Vec<(String, Value, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for d in [dir.to_path_buf(), dir.join("errors")] {
        files.extend(std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()));
    }
    files.retain(|f| f.extension().is_some_and(|e| e == "txt"));
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut request: Option<Value> = None;
        for line in text.lines() {
            if let Some(r) = line.strip_prefix("-> ") {
                request = serde_json::from_str(r).ok();
            } else if let Some(r) = line.strip_prefix("<- ") {
                let Ok(reply) = serde_json::from_str::<Value>(r) else { continue };
                if reply.get("return").is_some() || reply.get("error").is_some() {
                    if let Some(req) = request.take() {
                        out.push((file.display().to_string(), req, reply));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn texts_match_qemu_7_2_transcripts() {
    let Some(dir) = transcripts() else {
        eprintln!("skipped: ../shared/qemu-7.2-qmp is not here");
        return;
    };
    let mut compared = 0;
    let mut passed = 0;
    for (file, req, reply) in exchanges(&dir) {
        let Some(name) = req["execute"].as_str() else { continue };
        if name == "qmp_capabilities" {
            continue; // the gateway's, not a schema command
        }
        let result = check_command(name, req.get("arguments"));
        if let Some(err) = reply.get("error") {
            let desc = err["desc"].as_str().unwrap();
            let ours =
                ["is missing", "is unexpected", "Invalid parameter type", "has not been found", "must be an object"];
            // The envelope's checks ("QMP input member 'foo' is unexpected") are the gateway's.
            let envelope = desc.starts_with("QMP input") && !desc.contains("'arguments'");
            if !envelope && ours.iter().any(|s| desc.contains(s)) {
                // A command 7.2 removed is one we have: not comparable.
                if desc.contains("has not been found") && flotilla_schema::table::command(name).is_some() {
                    continue;
                }
                let e = result.expect_err(&format!("{file}: {req} should be refused"));
                assert_eq!(e.to_string(), desc, "{file}");
                compared += 1;
                continue;
            }
        }
        // 7.2's own commands (query-cpus-fast, migrate-set-parameters) are not the seed's.
        if reply.get("return").is_some() && flotilla_schema::table::command(name).is_some() {
            result.unwrap_or_else(|e| panic!("{file}: {req} accepted by QEMU, refused here: {e}"));
            passed += 1;
        }
    }
    eprintln!("{compared} error texts compared, {passed} accepted requests passed");
    assert!(compared >= 8, "{compared}");
    assert!(passed >= 34, "{passed}");
}
