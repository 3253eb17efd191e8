//! Every QMP error the gateway itself answers, in one place (QEMU's `qerror.h`).
//!
//! The class and `data` are QEMU 1.1's, the level of the schema served; the `desc` is QEMU
//! 7.2's wording as recorded in `shared/qemu-7.2-qmp/` wherever 7.2 has the case, so a client
//! that matches on texts sees what current QEMU says. Argument errors come from the schema
//! crate's checker (`ArgError::to_qmp`) and follow the same rule.

use flotilla_schema::check::QmpError;
use serde_json::{json, Value};

fn with_data(class: &str, desc: impl Into<String>, data: Value) -> QmpError {
    QmpError { class: class.to_string(), desc: desc.into(), data: Some(data) }
}

/// Malformed JSON, and the size/nesting/token limits. 1.1: `JSONParsing`, no data fields.
pub fn json_parsing(desc: impl Into<String>) -> QmpError {
    with_data("JSONParsing", desc, json!({}))
}

/// The request is not a JSON object. 1.1: `QMPBadInputObject {expected: "object"}`.
pub fn not_an_object() -> QmpError {
    with_data("QMPBadInputObject", "QMP input must be a JSON object", json!({"expected": "object"}))
}

/// No `execute`. 1.1: `QMPBadInputObject {expected: "execute"}`.
pub fn lacks_execute() -> QmpError {
    with_data("QMPBadInputObject", "QMP input lacks member 'execute'", json!({"expected": "execute"}))
}

/// `execute` is not a string. 1.1: `QMPBadInputObjectMember {member, expected: "string"}`.
pub fn execute_not_string() -> QmpError {
    with_data(
        "QMPBadInputObjectMember",
        "QMP input member 'execute' must be a string",
        json!({"member": "execute", "expected": "string"}),
    )
}

/// `arguments` is not an object: the schema checker's own error, so the two agree.
pub fn arguments_not_object() -> QmpError {
    flotilla_schema::check::ArgError::ArgumentsNotObject.to_qmp()
}

/// A top-level member other than `execute`, `arguments`, `id`.
/// 1.1: `QMPExtraInputObjectMember {member}`.
pub fn unexpected_member(member: &str) -> QmpError {
    with_data(
        "QMPExtraInputObjectMember",
        format!("QMP input member '{member}' is unexpected"),
        json!({"member": member}),
    )
}

/// A command other than `qmp_capabilities` before negotiation. 1.1 answered
/// `CommandNotFound {name}`; 7.2's text.
pub fn negotiation_expected(name: &str) -> QmpError {
    with_data("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'", json!({"name": name}))
}

/// `qmp_capabilities` after negotiation (1.1: `CommandNotFound`, as 7.2).
pub fn negotiation_done() -> QmpError {
    with_data(
        "CommandNotFound",
        "Capabilities negotiation is already complete, command ignored",
        json!({"name": "qmp_capabilities"}),
    )
}

/// A command no live daemon exports (or not in the schema at all).
pub fn command_not_found(name: &str) -> QmpError {
    flotilla_schema::check::ArgError::CommandNotFound { name: name.to_string() }.to_qmp()
}

/// `qmp_capabilities {"enable": [...]}` naming a capability this server does not offer
/// (7.2's text; we offer none).
pub fn capability_not_available(cap: &str) -> QmpError {
    generic(format!("Capability '{cap}' not available"))
}

/// QEMU's catch-all class (1.2+; 1.1 spelled most of these `UndefinedError`).
pub fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::new("GenericError", desc)
}

/// A configured daemon that is not on the bus now (crashed, restarting).
pub fn daemon_unavailable(daemon: &str) -> QmpError {
    generic(format!("The {daemon} daemon is not available (it is stopped or restarting); try again"))
}

/// A daemon that did not answer within the call timeout.
pub fn daemon_timeout(daemon: &str, command: &str, secs: f64) -> QmpError {
    generic(format!("The {daemon} daemon did not answer '{command}' within {secs} s"))
}

/// A daemon answered something the contract does not allow.
pub fn daemon_protocol(daemon: &str, command: &str, what: impl std::fmt::Display) -> QmpError {
    generic(format!("The {daemon} daemon answered '{command}' incorrectly: {what}"))
}

/// `DeviceNotActive {device}` (1.1), e.g. no balloon.
pub fn device_not_active(device: &str, desc: impl Into<String>) -> QmpError {
    with_data("DeviceNotActive", desc, json!({"device": device}))
}

/// `DeviceNotFound {device}` (1.1).
pub fn device_not_found(device: &str, desc: impl Into<String>) -> QmpError {
    with_data("DeviceNotFound", desc, json!({"device": device}))
}

/// `InvalidParameter {name}` (1.1) with 7.2's enum-value wording.
pub fn invalid_parameter_value(name: &str, value: &str) -> QmpError {
    with_data("InvalidParameter", format!("Parameter '{name}' does not accept value '{value}'"), json!({"name": name}))
}

/// `InvalidParameterValue {name, expected}` (1.1) with 7.2's wording ("Parameter 'cpu-index'
/// expects a CPU number").
pub fn invalid_parameter_expects(name: &str, expected: &str) -> QmpError {
    with_data(
        "InvalidParameterValue",
        format!("Parameter '{name}' expects {expected}"),
        json!({"name": name, "expected": expected}),
    )
}

/// `SetPasswdFailed` (1.1, no data fields).
pub fn set_passwd_failed(desc: impl Into<String>) -> QmpError {
    with_data("SetPasswdFailed", desc, json!({}))
}
