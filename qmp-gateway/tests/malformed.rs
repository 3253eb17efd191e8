//! Raw-socket tests of every malformed-input case: QEMU's tests/qtest/qmp-test.c
//! (test_malformed, test_qmp_protocol), the 7.2 transcripts in shared/qemu-7.2-qmp/errors/,
//! and the gateway's limits. After each, the stream must still work.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// qmp-test.c's assert_recovered().
fn assert_recovered(c: &mut Qmp) {
    let r = c.cmd("{ 'execute': 'no-such-cmd' }");
    assert_eq!(class(&r), "CommandNotFound", "{r}");
}

/// qmp-test.c's test_malformed(), with the classes mapped to QEMU 1.1's (7.2 says GenericError
/// for all of them).
fn test_malformed(c: &mut Qmp) {
    for (raw, what) in [
        (&b"{]\n"[..], "syntax error"),
        (b"{\xFF", "impossible byte outside string"),
        (b"{\x01", "funny control character outside string"),
        (b"{'bad \xFF", "impossible byte in string"),
        (b"{'execute': 'nonexistent', 'id':'\n", "control character in string"),
        (b"%p", "interpolation"),
    ] {
        c.send_raw(raw);
        let r = c.reply();
        assert_eq!(class(&r), "JSONParsing", "{what}: {r}");
        assert!(desc(&r).starts_with("JSON parse error, "), "{what}: {r}");
        assert_eq!(r["error"]["data"], json!({}));
        assert!(r.get("id").is_none());
        assert_recovered(c);
    }
    for (req, cls, text) in [
        ("null", "QMPBadInputObject", "QMP input must be a JSON object"),
        ("{}", "QMPBadInputObject", "QMP input lacks member 'execute'"),
        ("{ 'execute': true }", "QMPBadInputObjectMember", "QMP input member 'execute' must be a string"),
        (
            "{ 'execute': 'no-such-cmd', 'arguments': [] }",
            "QMPBadInputObjectMember",
            "QMP input member 'arguments' must be an object",
        ),
        (
            "{ 'execute': 'no-such-cmd', 'extra': true }",
            "QMPExtraInputObjectMember",
            "QMP input member 'extra' is unexpected",
        ),
    ] {
        let r = c.cmd(req);
        assert_eq!((class(&r), desc(&r)), (cls, text), "{req}");
    }
}

#[test]
fn qmp_test_protocol() {
    let vm = Vm::start("protocol");
    let mut c = vm.gateway.unix();
    assert!(c.greeting["QMP"]["capabilities"].as_array().unwrap().is_empty());
    let r = c.cmd("{ 'execute': 'query-version' }");
    assert_eq!(class(&r), "CommandNotFound");
    test_malformed(&mut c);
    c.negotiate();
    assert_eq!(class(&c.cmd("{ 'execute': 'qmp_capabilities' }")), "CommandNotFound");
    let r = c.cmd("{ 'execute': 'query-version' }");
    assert_eq!(r["return"]["qemu"]["major"], 1);
    test_malformed(&mut c);
    let r = c.cmd("{ 'execute': 'query-name', 'id': 'cookie#1' }");
    assert_eq!(r["id"], "cookie#1");
    assert!(r["return"].is_object());
}

#[test]
fn transcripts_of_qemu_7_2_malformed_input() {
    let vm = Vm::start("transcripts");
    let mut c = vm.gateway.tcp();
    c.negotiate();
    // errors/malformed-bad-token.txt: two errors for one line.
    c.send_raw(b"{\"execute\": query-status}\n");
    assert_eq!(desc(&c.reply()), "JSON parse error, stray '-s'");
    assert_eq!(desc(&c.reply()), "JSON parse error, expecting value");
    // errors/malformed-control-char.txt
    c.send_raw(b"{\"execute\": \"query-\x01status\"}\n");
    assert_eq!(desc(&c.reply()), "JSON parse error, stray '\"query-\u{1}'");
    assert_eq!(desc(&c.reply()), "JSON parse error, expecting value");
    // errors/malformed-extra-brace.txt: the command runs, the stray brace is an error.
    c.send_raw(b"{\"execute\": \"query-status\"}}\n");
    assert_eq!(c.reply()["return"]["status"], "running");
    assert_eq!(desc(&c.reply()), "JSON parse error, expecting value");
    // errors/malformed-truncated.txt then -completed.txt.
    c.send_raw(b"{\"execute\": \"query-status\", \n");
    c.send_raw(b"}\n");
    assert_eq!(desc(&c.reply()), "JSON parse error, expecting value");
    // errors/single-quotes.txt
    assert_eq!(c.cmd("{'execute': 'query-status'}")["return"]["running"], true);
    // errors/request-not-object.txt, missing-execute.txt, execute-not-string.txt,
    // arguments-not-object.txt, unknown-key.txt (7.2 texts, 1.1 classes).
    assert_eq!(desc(&c.cmd("[1, 2, 3]")), "QMP input must be a JSON object");
    assert_eq!(desc(&c.cmd(r#"{"arguments": {}}"#)), "QMP input lacks member 'execute'");
    assert_eq!(desc(&c.cmd(r#"{"execute": 42}"#)), "QMP input member 'execute' must be a string");
    let r = c.cmd(r#"{"execute": "query-status", "arguments": []}"#);
    assert_eq!(r["error"]["data"], json!({"member": "arguments", "expected": "object"}));
    let r = c.cmd(r#"{"execute": "query-status", "foo": 1, "id": 5}"#);
    assert_eq!(
        r,
        json!({"error": {"class": "QMPExtraInputObjectMember", "desc": "QMP input member 'foo' is unexpected",
                                   "data": {"member": "foo"}}, "id": 5})
    );
    // errors/id-echo-*.txt: any JSON, on success and error.
    for id in [json!(42), json!("abc-1"), json!({"seq": 7, "tag": ["x"]}), json!(null), json!(1.5), json!([true])] {
        let r = c.cmd(&json!({"execute": "query-name", "id": id}).to_string());
        assert_eq!(r["id"], id);
        let r = c.cmd(&json!({"execute": "no-such-command", "id": id}).to_string());
        assert_eq!(r["id"], id);
        assert_eq!(class(&r), "CommandNotFound");
        let r = c.cmd(&json!({"execute": 7, "id": id}).to_string());
        assert_eq!(r["id"], id);
    }
}

#[test]
fn messages_split_and_joined_across_writes() {
    let vm = Vm::start("split");
    let mut c = vm.gateway.unix();
    c.negotiate();
    // Byte by byte, with pauses so that each byte is its own read.
    let msg = br#"{"execute": "query-name", "id": "a\"b}"}"#;
    for b in msg.iter() {
        c.send_raw(std::slice::from_ref(b));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.reply(), json!({"return": {"name": "mock-vm"}, "id": "a\"b}"}));
    // Several in one write, no separators.
    c.send_raw(br#"{"execute":"query-name","id":1}{"execute":"query-kvm","id":2}["x"]{"execute":"query-uuid","id":3}"#);
    assert_eq!(c.reply()["id"], 1);
    assert_eq!(c.reply()["id"], 2);
    assert_eq!(class(&c.reply()), "QMPBadInputObject");
    assert_eq!(c.reply()["id"], 3);
}

#[test]
fn limits_answer_and_the_stream_recovers() {
    let vm = Vm::start("limits");
    let mut c = vm.gateway.unix();
    c.negotiate();
    // Nesting: 64 levels are fine (as arguments they are simply unexpected), 65 are not.
    let ok = format!("{{\"execute\": \"query-name\", \"id\": {}{}}}", "[".repeat(63), "]".repeat(63));
    assert_eq!(c.cmd(&ok)["return"]["name"], "mock-vm");
    let deep = format!("{{\"execute\": \"query-name\", \"id\": {}{}}}", "[".repeat(64), "]".repeat(64));
    let r = c.cmd(&deep);
    assert_eq!(r["error"], json!({"class": "JSONParsing", "desc": "JSON nesting depth limit exceeded", "data": {}}));
    assert_recovered(&mut c);
    // Size: a 3 MiB message gets one error; the connection stays and works.
    c.send_raw(b"{\"execute\": \"query-name\", \"id\": \"");
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..48 {
        c.send_raw(&chunk);
    }
    c.send_raw(b"\"}\n");
    let r = c.reply();
    assert_eq!(desc(&r), "JSON token size limit exceeded");
    assert_recovered(&mut c);
    // Just under 1 MiB is served.
    let id = "y".repeat((1 << 20) - 100);
    let r = c.cmd(&format!("{{\"execute\": \"query-name\", \"id\": \"{id}\"}}"));
    assert_eq!(r["id"].as_str().unwrap().len(), id.len());
    // Garbage never makes the gateway hold a message: 4 MiB of `[` on one line, one error.
    let mut garbage = vec![b'['; 4 << 20];
    garbage.push(b'\n');
    c.send_raw(&garbage);
    assert_eq!(desc(&c.reply()), "JSON nesting depth limit exceeded");
    assert_recovered(&mut c);
    // Other clients never noticed.
    let mut other = vm.gateway.tcp();
    other.negotiate();
    assert_eq!(other.cmd(r#"{"execute": "query-name"}"#)["return"]["name"], "mock-vm");
}

#[test]
fn invalid_utf8_and_escapes() {
    let vm = Vm::start("utf8");
    let mut c = vm.gateway.unix();
    c.negotiate();
    c.send_raw(b"{\"execute\": \"query-name\", \"id\": \"\xc3\x28\"}\n");
    assert_eq!(desc(&c.reply()), "JSON parse error, invalid UTF-8 sequence in string");
    let r = c.cmd(r#"{"execute": "query-name", "id": "\u00e9\ud83d\ude00\n"}"#);
    assert_eq!(r["id"], "é😀\n");
    let r = c.cmd(r#"{"execute": "query-name", "id": "\q"}"#);
    assert_eq!(desc(&r), "JSON parse error, invalid escape sequence in string");
    let r = c.cmd(r#"{"execute": "query-name", "id": "\udc00"}"#);
    assert_eq!(desc(&r), "JSON parse error, \\udc00 is not a valid Unicode character");
    let r = c.cmd(r#"{"execute": "query-name", "id": 1, "id": 2}"#);
    assert_eq!(desc(&r), "JSON parse error, duplicate key");
    assert_recovered(&mut c);
}

#[test]
fn a_client_vanishing_mid_message_harms_nobody() {
    let vm = Vm::start("vanish");
    for _ in 0..5 {
        let mut c = vm.gateway.unix();
        c.negotiate();
        c.send_raw(b"{\"execute\": \"query-name\", \"arguments\": {\"x\": [1, 2");
        drop(c);
    }
    let mut c = vm.gateway.unix();
    c.negotiate();
    assert_eq!(c.cmd(r#"{"execute": "query-name"}"#)["return"]["name"], "mock-vm");
}
