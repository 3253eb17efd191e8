//! What the gateway writes: the greeting, replies, errors and events, one JSON object per line,
//! each ending in `\r\n` as QEMU's monitor does. Member order follows QEMU 7.2's wire (`return`
//! or `error` first, then `id`; events `timestamp`, `event`, `data`).

use flotilla_schema::check::QmpError;
use serde_json::{json, Value};

/// The schema level served: QEMU 1.1.0.
pub const QEMU_VERSION: (i64, i64, i64) = (1, 1, 0);

/// `VersionInfo.package`: `flotilla-<version>`.
pub fn package() -> String {
    format!("flotilla-{}", env!("CARGO_PKG_VERSION"))
}

fn line(mut s: String) -> String {
    s.push_str("\r\n");
    s
}

fn to_json(v: &Value) -> String {
    serde_json::to_string(v).expect("a JSON value serializes")
}

/// The greeting sent on connect. 1.1 advertised no capabilities.
pub fn greeting() -> String {
    let (major, minor, micro) = QEMU_VERSION;
    line(format!(
        "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"major\": {major}, \"minor\": {minor}, \"micro\": {micro}}}, \
         \"package\": {}}}, \"capabilities\": []}}}}",
        to_json(&Value::String(package()))
    ))
}

fn with_id(mut s: String, id: Option<&Value>) -> String {
    if let Some(id) = id {
        s.push_str(", \"id\": ");
        s.push_str(&to_json(id));
    }
    s.push('}');
    line(s)
}

/// `{"return": value, "id": id}`.
pub fn success(value: &Value, id: Option<&Value>) -> String {
    with_id(format!("{{\"return\": {}", to_json(value)), id)
}

/// `{"error": {"class", "desc", "data"}, "id": id}`.
pub fn error(err: &QmpError, id: Option<&Value>) -> String {
    let e = serde_json::to_string(err).expect("a QmpError serializes");
    with_id(format!("{{\"error\": {e}"), id)
}

/// `{"timestamp": {...}, "event": name, "data": data}`; `data` is left out when it is an empty
/// object, as QEMU leaves it out of events that have none (`STOP`, `RESUME`, `POWERDOWN`).
pub fn event(name: &str, data: &Value, seconds: i64, microseconds: i64) -> String {
    let mut s = format!(
        "{{\"timestamp\": {{\"seconds\": {seconds}, \"microseconds\": {microseconds}}}, \"event\": {}",
        to_json(&json!(name))
    );
    let empty = data.as_object().is_some_and(|m| m.is_empty());
    if !empty {
        s.push_str(", \"data\": ");
        s.push_str(&to_json(data));
    }
    s.push('}');
    line(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Value {
        assert!(s.ends_with("\r\n"), "{s:?}");
        assert_eq!(s.matches('\n').count(), 1, "one line: {s:?}");
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn greeting_shape() {
        let g = parse(&greeting());
        assert_eq!(
            g,
            json!({"QMP": {"version": {"qemu": {"major": 1, "minor": 1, "micro": 0},
                   "package": format!("flotilla-{}", env!("CARGO_PKG_VERSION"))}, "capabilities": []}})
        );
    }

    #[test]
    fn replies() {
        assert_eq!(success(&json!({}), None), "{\"return\": {}}\r\n");
        assert_eq!(success(&json!({"name": "a"}), Some(&json!(42))), "{\"return\": {\"name\":\"a\"}, \"id\": 42}\r\n");
        let e = QmpError::new("GenericError", "bad\nthing");
        assert_eq!(
            parse(&error(&e, Some(&json!({"seq": 7})))),
            json!({"error": {"class": "GenericError", "desc": "bad\nthing", "data": {}}, "id": {"seq": 7}})
        );
    }

    #[test]
    fn events() {
        assert_eq!(
            parse(&event("STOP", &json!({}), 5, 6)),
            json!({"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 6}})
        );
        assert_eq!(
            parse(&event("RESET", &json!({"guest": false}), 1, 2)),
            json!({"event": "RESET", "data": {"guest": false}, "timestamp": {"seconds": 1, "microseconds": 2}})
        );
    }
}
