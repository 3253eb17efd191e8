//! Malformed schemas are refused, with the line and column of the fault (QEMU's
//! tests/qapi-schema/ cases are the model).

use flotilla_schema::parse::{parse, ParseError};

#[track_caller]
fn fails(text: &str, line: u32, col: u32, message: &str) {
    let e: ParseError = match parse(text) {
        Ok(s) => panic!("accepted {text:?}: {s:?}"),
        Err(e) => e,
    };
    assert_eq!((e.pos.line, e.pos.col), (line, col), "position of {:?} for {text:?}", e.message);
    assert!(e.message.contains(message), "message {:?} lacks {message:?} for {text:?}", e.message);
    assert_eq!(e.to_string(), format!("{line}:{col}: {}", e.message));
}

#[test]
fn unterminated_string() {
    fails("{ 'command': 'foo }\n", 1, 14, "missing terminating \"'\"");
    fails("{ 'command': 'foo", 1, 14, "missing terminating");
}

#[test]
fn missing_colon() {
    fails("{ 'command' 'foo' }", 1, 13, "expected ':'");
}

#[test]
fn missing_comma() {
    fails("{ 'command': 'foo'\n  'data': {} }", 2, 3, "expected ',' or '}'");
    fails("{ 'enum': 'E', 'data': [ 'a' 'b' ] }", 1, 30, "expected ',' or ']'");
}

#[test]
fn duplicate_key() {
    fails("{ 'command': 'foo',\n  'command': 'bar' }", 2, 3, "duplicate key 'command'");
    fails("{ 'type': 'A', 'data': { 'x': 'int', 'x': 'str' } }", 1, 38, "duplicate key 'x'");
}

#[test]
fn member_repeated_as_optional() {
    fails("{ 'type': 'A', 'data': { 'x': 'int', '*x': 'str' } }", 1, 38, "member 'x' repeats");
}

#[test]
fn unknown_type_reference() {
    fails("{ 'type': 'A',\n  'data': { 'b': 'Nope' } }", 2, 18, "type 'A' member 'b' uses unknown type 'Nope'");
    fails("{ 'type': 'A', 'data': { 'b': ['Nope'] } }", 1, 32, "unknown type 'Nope'");
    fails("{ 'type': 'A', 'data': { 'b': { 'c': 'Nope' } } }", 1, 38, "type 'A' member 'b.c' uses unknown type 'Nope'");
    fails("{ 'command': 'c', 'returns': 'Nope' }", 1, 30, "'returns' uses unknown type 'Nope'");
    fails("{ 'command': 'c', 'data': { 'a': 'Nope' } }", 1, 34, "argument 'a' uses unknown");
}

#[test]
fn bad_names() {
    fails("{ 'type': 'A', 'data': { 'b c': 'str' } }", 1, 26, "bad member name 'b c'");
    fails("{ 'type': 'A', 'data': { '*': 'str' } }", 1, 26, "bad member name '*'");
    fails("{ 'type': 'A', 'data': { '-x': 'str' } }", 1, 26, "bad member name '-x'");
    fails("{ 'type': 'lower', 'data': {} }", 1, 11, "bad type name 'lower'");
    fails("{ 'enum': 'E', 'data': [ 'a b' ] }", 1, 26, "bad value 'a b'");
    fails("{ 'command': 'Bad Name' }", 1, 14, "bad command name");
}

#[test]
fn trailing_garbage() {
    fails("{ 'command': 'foo' }\nxyz\n", 2, 1, "stray 'x'");
    fails("{ 'command': 'foo' } }", 1, 22, "expected '{'");
    fails("{ 'command': 'foo' } 'bar'", 1, 22, "expected '{'");
}

#[test]
fn not_python_literals() {
    fails("{ \"command\": \"foo\" }", 1, 3, "not \"");
    fails("{ 'command': 'a\\qb' }", 1, 16, "unknown escape");
    fails("{ 'command': 'foo', }", 1, 21, "expected a string key");
    fails("{ 'command': }", 1, 14, "expected a value, found '}'");
    fails("{ 'command': 'foo'", 1, 19, "expected ',' or '}'");
    fails("{ 'command': 'foo', 'data': {", 1, 30, "expected a string key");
}

#[test]
fn top_level_must_be_a_definition() {
    fails("[ 'a' ]", 1, 1, "expected '{'");
    fails("{ 'data': {} }", 1, 1, "none of 'type', 'enum', 'command'");
    fails("{ 'type': 'A', 'enum': 'B', 'data': {} }", 1, 16, "both 'type' and 'enum'");
    fails("{ 'type': ['A'], 'data': {} }", 1, 11, "must name the definition");
}

#[test]
fn keys_and_shapes() {
    fails("{ 'command': 'c', 'bogus': 'x' }", 1, 19, "command 'c': unknown key 'bogus'");
    fails("{ 'type': 'A', 'returns': 'str', 'data': {} }", 1, 16, "unknown key 'returns'");
    fails("{ 'type': 'A' }", 1, 1, "type 'A': missing 'data'");
    fails("{ 'type': 'A', 'data': 'str' }", 1, 24, "'data' must be a dictionary");
    fails("{ 'enum': 'E', 'data': { 'a': 'str' } }", 1, 24, "must be a list of strings");
    fails("{ 'enum': 'E', 'data': [ ['a'] ] }", 1, 26, "values must be strings");
    fails("{ 'enum': 'E', 'data': [ 'a',\n 'a' ] }", 2, 2, "value 'a' repeats the one at line 1");
    fails("{ 'type': 'A', 'data': { 'b': ['str', 'int'] } }", 1, 31, "exactly one type name");
    fails("{ 'type': 'A', 'data': { 'b': [] } }", 1, 31, "exactly one type name");
    fails("{ 'command': 'c', 'gen': 'yes' }", 1, 26, "'gen' may only be 'no'");
    fails("{ 'command': 'c', 'returns': { 'a': 'str' } }", 1, 30, "'returns' must name a type");
}

#[test]
fn duplicate_definitions() {
    fails(
        "{ 'type': 'A', 'data': {} }\n{ 'enum': 'A', 'data': [] }",
        2,
        11,
        "'A' is already defined as type at line 1",
    );
    fails("{ 'command': 'c' }\n\n{ 'command': 'c' }", 3, 14, "command 'c' is already defined at line 1");
}

#[test]
fn comments_count_lines() {
    fails(
        "# a comment 'with quotes\n##\n# @x: {not parsed}\n##\n{ 'command': 'x', 'data': { 'a': 'Q' } }",
        5,
        34,
        "unknown type 'Q'",
    );
}

#[test]
fn an_error_in_the_seed_is_reported_at_its_line() {
    let seed = flotilla_schema::SCHEMA_TEXT;
    let at = seed.find("'status': 'RunState'").unwrap() + "'status': ".len();
    let line = seed[..at].lines().count() as u32;
    let col = (at - seed[..at].rfind('\n').unwrap()) as u32;
    let broken = format!("{}'RunStat'{}", &seed[..at], &seed[at + "'RunState'".len()..]);
    fails(&broken, line, col, "type 'StatusInfo' member 'status' uses unknown type 'RunStat'");

    let at = seed.find("'inject-nmi'").unwrap() + 1;
    let broken = format!("{}{}", &seed[..at], &seed[at + "inject-nmi'".len()..]);
    let line = seed[..at].lines().count() as u32;
    let e = parse(&broken).unwrap_err();
    assert_eq!(e.pos.line, line, "{e}");
}

#[test]
fn well_formed_variants_are_accepted() {
    let s = parse(
        "# header\n\
         { 'enum': 'E', 'data': [] }\n\
         { 'type': 'T', 'data': { '*e': 'E', 'l': ['T'], 'n': { 'x': 'uint8', '*y': ['int16'] },\n\
           'a': 'any', 'v': 'visitor', 'f': 'number' } }\n\
         { 'command': 'c-d_e', 'data': {}, 'returns': ['str'], 'gen': 'no' }\n\
         { 'command': 'q', 'returns': 'E' }\n\
         { 'type': 'Esc', 'data': { 'it\\'s': 'str' } }\n",
    );
    let e = s.expect_err("'it's' is not a member name");
    assert_eq!((e.pos.line, e.pos.col), (7, 28));
    let s = parse(
        "{ 'enum': 'E', 'data': [] }\n\
         { 'type': 'T', 'data': { '*e': 'E', 'l': ['T'], 'n': { 'x': 'uint8', '*y': ['int16'] },\n\
           'a': 'any', 'v': 'visitor', 'f': 'number' } }\n\
         { 'command': 'c-d_e', 'data': {}, 'returns': ['str'], 'gen': 'no' }\n\
         { 'command': 'q', 'returns': 'E' }\n",
    )
    .unwrap();
    assert_eq!(s.entities.len(), 4);
    let c = s.find_command("c-d_e").unwrap();
    assert!(!c.gen);
    assert_eq!(c.data.as_deref().map(<[_]>::len), Some(0));
}
