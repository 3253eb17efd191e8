//! A parsed JSON value to a QMP request, checked as QEMU checks the envelope
//! (`qmp_dispatch_check_obj()`): an object, with `execute` a string, `arguments` an object if
//! present, `id` any JSON, and nothing else. `id` is kept whenever the request is an object, so
//! that even an envelope error echoes it (as QEMU 7.2 does).

use flotilla_schema::check::QmpError;
use serde_json::{Map, Value};

use crate::qerror;

/// A well-formed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub execute: String,
    /// `None` when absent (the same as `{}`).
    pub arguments: Option<Map<String, Value>>,
    pub id: Option<Value>,
}

/// A refused request: the error, and the `id` to echo with it.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    pub error: QmpError,
    pub id: Option<Value>,
}

/// Checks the envelope of one message.
pub fn validate(message: Value) -> Result<Request, BadRequest> {
    let Value::Object(mut obj) = message else {
        return Err(BadRequest { error: qerror::not_an_object(), id: None });
    };
    let id = obj.remove("id");
    let fail = |error, id| Err(BadRequest { error, id });
    // Members in a fixed (sorted) order, so that a request with several faults always gets the
    // same answer; QEMU walks its hash table.
    for (key, value) in &obj {
        match key.as_str() {
            "execute" if !value.is_string() => return fail(qerror::execute_not_string(), id),
            "arguments" if !value.is_object() => return fail(qerror::arguments_not_object(), id),
            "execute" | "arguments" => {}
            other => return fail(qerror::unexpected_member(other), id),
        }
    }
    let execute = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        _ => return fail(qerror::lacks_execute(), id),
    };
    let arguments = match obj.remove("arguments") {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    Ok(Request { execute, arguments, id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(v: Value) -> (String, String, Value, Option<Value>) {
        let e = validate(v).unwrap_err();
        (e.error.class, e.error.desc, e.error.data.unwrap(), e.id)
    }

    #[test]
    fn good_requests() {
        let r = validate(json!({"execute": "query-status"})).unwrap();
        assert_eq!(r, Request { execute: "query-status".into(), arguments: None, id: None });
        let r = validate(json!({"execute": "balloon", "arguments": {"value": 1}, "id": {"seq": [1]}})).unwrap();
        assert_eq!(r.arguments.unwrap()["value"], 1);
        assert_eq!(r.id, Some(json!({"seq": [1]})));
        // id of any JSON type, null included.
        for id in [json!(null), json!(1.5), json!("x"), json!([1, "a"]), json!(false)] {
            assert_eq!(validate(json!({"execute": "x", "id": id.clone()})).unwrap().id, Some(id));
        }
    }

    #[test]
    fn envelope_errors_as_qemu() {
        assert_eq!(
            refused(json!([1, 2, 3])),
            ("QMPBadInputObject".into(), "QMP input must be a JSON object".into(), json!({"expected": "object"}), None)
        );
        assert_eq!(
            refused(json!({"arguments": {}})),
            (
                "QMPBadInputObject".into(),
                "QMP input lacks member 'execute'".into(),
                json!({"expected": "execute"}),
                None
            )
        );
        assert_eq!(
            refused(json!({"execute": 42, "id": 7})),
            (
                "QMPBadInputObjectMember".into(),
                "QMP input member 'execute' must be a string".into(),
                json!({"member": "execute", "expected": "string"}),
                Some(json!(7))
            )
        );
        assert_eq!(
            refused(json!({"execute": "query-status", "arguments": []})),
            (
                "QMPBadInputObjectMember".into(),
                "QMP input member 'arguments' must be an object".into(),
                json!({"member": "arguments", "expected": "object"}),
                None
            )
        );
        assert_eq!(
            refused(json!({"execute": "query-status", "foo": 1, "id": "a"})),
            (
                "QMPExtraInputObjectMember".into(),
                "QMP input member 'foo' is unexpected".into(),
                json!({"member": "foo"}),
                Some(json!("a"))
            )
        );
        // `arguments: null` is not an object either.
        assert_eq!(
            refused(json!({"execute": "x", "arguments": null})).1,
            "QMP input member 'arguments' must be an object"
        );
        // Scalars are not objects.
        for v in [json!(42), json!("x"), json!(null), json!(true)] {
            assert_eq!(refused(v).0, "QMPBadInputObject");
        }
    }
}
