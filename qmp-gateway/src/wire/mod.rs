//! The QMP wire: bytes from a client to JSON values, as QEMU's json-streamer delimits them.
//!
//! [`lexer`] is QEMU's lexer, [`parser`] QEMU's parser; [`JsonStream`] here is the streamer:
//! it counts `{`/`[` depth over the tokens (never inside strings, which are single tokens) and
//! hands a message to the parser as soon as the depth is back to zero, so one message may span
//! many reads and one read may hold many messages. A token outside any brackets (`42`, `}`) is a
//! message of its own, as in QEMU.
//!
//! Errors are answered as QEMU 7.2 words them, and the stream carries on:
//! * a lexical error ("JSON parse error, stray '-s'") drops the message in progress; the lexer
//!   skips to the next structural or control character (QEMU's recovery);
//! * a parse error ("JSON parse error, expecting value") drops that message;
//! * a message over [`Limits::max_bytes`] ("JSON token size limit exceeded"), nesting deeper
//!   than [`Limits::max_depth`] ("JSON nesting depth limit exceeded") or with more than
//!   [`Limits::max_tokens`] tokens ("JSON token count limit exceeded") is dropped, and so is the
//!   rest of its line: input is skipped up to the next newline. Memory per client stays below
//!   the byte limit plus a small per-token overhead.

pub mod lexer;
pub mod parser;

use serde_json::Value;

use lexer::{Lexed, Lexer, TokenKind};
use parser::Token;

/// Bounds on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes from a message's first token to its last, whitespace included.
    pub max_bytes: usize,
    /// `{` and `[` open at once.
    pub max_depth: usize,
    /// Tokens in one message.
    pub max_tokens: usize,
}

impl Limits {
    /// 1 MiB, 64 levels, 64 Ki tokens: far above any QMP command (a few hundred bytes).
    pub const DEFAULT: Limits = Limits { max_bytes: 1 << 20, max_depth: 64, max_tokens: 1 << 16 };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a message was refused: the text is the QMP error's `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(pub String);

/// The QEMU-compatible message splitter and parser for one client stream.
#[derive(Debug)]
pub struct JsonStream {
    limits: Limits,
    lexer: Lexer,
    /// The texts of the tokens of the message in progress, one after the other.
    text: Vec<u8>,
    tokens: Vec<Token>,
    brace: i64,
    bracket: i64,
    /// Bytes of the message in progress so far.
    bytes: usize,
    /// After a limit error: skipping input up to the next newline.
    skip_line: bool,
}

enum Event {
    Token(TokenKind, usize, usize),
    Error(String),
}

impl Default for JsonStream {
    fn default() -> Self {
        Self::new(Limits::DEFAULT)
    }
}

impl JsonStream {
    pub fn new(limits: Limits) -> Self {
        JsonStream {
            limits,
            lexer: Lexer::new(),
            text: Vec::new(),
            tokens: Vec::new(),
            brace: 0,
            bracket: 0,
            bytes: 0,
            skip_line: false,
        }
    }

    /// Feeds bytes read from the client; every message or error they complete is pushed on
    /// `out`, in order.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Result<Value, JsonError>>) {
        for &b in data {
            self.feed_byte(b, out);
        }
    }

    /// Whether a message is in progress.
    fn open(&self) -> bool {
        !self.tokens.is_empty() || self.lexer.in_token()
    }

    fn reset(&mut self) {
        self.text.clear();
        self.tokens.clear();
        self.brace = 0;
        self.bracket = 0;
        self.bytes = 0;
        // Give back the memory of an unusually large message.
        if self.text.capacity() > 64 * 1024 {
            self.text = Vec::new();
            self.tokens = Vec::new();
        }
    }

    fn limit_error(&mut self, desc: &str, out: &mut Vec<Result<Value, JsonError>>) {
        out.push(Err(JsonError(desc.to_string())));
        self.reset();
        self.lexer.reset();
        self.skip_line = true;
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Result<Value, JsonError>>) {
        if self.skip_line {
            if b == b'\n' {
                self.skip_line = false;
            }
            return;
        }
        let mut events: [Option<Event>; 2] = [None, None];
        {
            let Self { lexer, text, .. } = self;
            let mut n = 0;
            lexer.feed(b, |what, t| {
                events[n] = Some(match what {
                    Lexed::Token(kind) => {
                        let start = text.len();
                        text.extend_from_slice(t);
                        Event::Token(kind, start, text.len())
                    }
                    Lexed::Error => Event::Error(String::from_utf8_lossy(t).into_owned()),
                });
                n += 1;
            });
        }
        for ev in events.into_iter().flatten() {
            match ev {
                Event::Error(text) => {
                    out.push(Err(JsonError(format!("JSON parse error, stray '{text}'"))));
                    self.reset();
                }
                Event::Token(kind, start, end) => {
                    if self.token(kind, start, end, out) {
                        return; // a limit error: the rest of the line is skipped
                    }
                }
            }
        }
        if self.open() {
            self.bytes += 1;
            if self.bytes > self.limits.max_bytes {
                self.limit_error("JSON token size limit exceeded", out);
            }
        } else {
            self.bytes = 0;
        }
    }

    /// Takes a token; returns whether it hit a limit.
    fn token(&mut self, kind: TokenKind, start: usize, end: usize, out: &mut Vec<Result<Value, JsonError>>) -> bool {
        match kind {
            TokenKind::LCurly => self.brace += 1,
            TokenKind::RCurly => self.brace -= 1,
            TokenKind::LSquare => self.bracket += 1,
            TokenKind::RSquare => self.bracket -= 1,
            _ => {}
        }
        if self.tokens.len() + 1 > self.limits.max_tokens {
            self.limit_error("JSON token count limit exceeded", out);
            return true;
        }
        if self.brace + self.bracket > self.limits.max_depth as i64 {
            self.limit_error("JSON nesting depth limit exceeded", out);
            return true;
        }
        self.tokens.push(Token { kind, start: start as u32, end: end as u32 });
        if (self.brace > 0 || self.bracket > 0) && self.brace >= 0 && self.bracket >= 0 {
            return false;
        }
        out.push(parser::parse(&self.tokens, &self.text).map_err(JsonError));
        self.reset();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(stream: &mut JsonStream, input: &[u8]) -> Vec<Result<Value, String>> {
        let mut out = Vec::new();
        stream.feed(input, &mut out);
        out.into_iter().map(|r| r.map_err(|e| e.0)).collect()
    }

    fn all(input: &[u8]) -> Vec<Result<Value, String>> {
        run(&mut JsonStream::default(), input)
    }

    fn perr(s: &str) -> Result<Value, String> {
        Err(format!("JSON parse error, {s}"))
    }

    #[test]
    fn whole_messages() {
        assert_eq!(all(br#"{"execute": "query-status"}"#), [Ok(json!({"execute": "query-status"}))]);
        assert_eq!(all(b"{'execute': 'stop'}\n"), [Ok(json!({"execute": "stop"}))]);
        assert_eq!(all(br#"{"a": {"b": [1, [2, {"c": "}]"}]]}}"#), [Ok(json!({"a": {"b": [1, [2, {"c": "}]"}]]}}))]);
    }

    #[test]
    fn several_messages_in_one_read() {
        assert_eq!(
            all(br#"{"execute":"a"}{"execute":"b"}  [1]"x""#),
            [Ok(json!({"execute": "a"})), Ok(json!({"execute": "b"})), Ok(json!([1])), Ok(json!("x"))]
        );
    }

    #[test]
    fn one_message_over_many_reads() {
        let msg = br#"{"execute": "memsave", "arguments": {"val": -1, "filename": "a\"b"}, "id": [1, 2.5]}"#;
        // Every split point, including inside strings, escapes and numbers.
        for cut in 0..msg.len() {
            let mut s = JsonStream::default();
            let mut got = run(&mut s, &msg[..cut]);
            got.extend(run(&mut s, &msg[cut..]));
            assert_eq!(
                got,
                [Ok(json!({"execute": "memsave", "arguments": {"val": -1, "filename": "a\"b"}, "id": [1, 2.5]}))],
                "cut at {cut}"
            );
        }
        // Byte by byte.
        let mut s = JsonStream::default();
        let mut got = Vec::new();
        for b in msg.iter() {
            got.extend(run(&mut s, std::slice::from_ref(b)));
        }
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn top_level_scalars_need_a_following_byte() {
        let mut s = JsonStream::default();
        assert_eq!(run(&mut s, b"42"), []);
        assert_eq!(run(&mut s, b"\n"), [Ok(json!(42))]);
        assert_eq!(all(b"true "), [Ok(json!(true))]);
        assert_eq!(all(b"nul "), [perr("invalid keyword 'nul'")]);
    }

    /// The 7.2 transcripts' malformed cases give the same errors, in the same number.
    #[test]
    fn qemu_7_2_malformed_transcripts() {
        assert_eq!(all(b"{\"execute\": query-status}\n"), [perr("stray '-s'"), perr("expecting value")]);
        assert_eq!(
            all(b"{\"execute\": \"query-\x01status\"}\n"),
            [perr("stray '\"query-\u{1}'"), perr("expecting value")]
        );
        assert_eq!(
            all(b"{\"execute\": \"query-status\"}}\n"),
            [Ok(json!({"execute": "query-status"})), perr("expecting value")]
        );
        // A truncated object stays pending over the newline; a later `}` completes it, and the
        // trailing comma is then the error.
        let mut s = JsonStream::default();
        assert_eq!(run(&mut s, b"{\"execute\": \"query-status\", \n"), []);
        assert_eq!(run(&mut s, b"}\n"), [perr("expecting value")]);
        assert_eq!(run(&mut s, b"{\"execute\": \"query-status\"}\n"), [Ok(json!({"execute": "query-status"}))]);
    }

    /// QEMU's tests/qtest/qmp-test.c test_malformed(), at the JSON level.
    #[test]
    fn qmp_test_malformed_json() {
        // Lexical errors, each followed by a valid command that must work.
        for bad in [&b"\x80"[..], b"\xff", b"\"\x80\"", b"\"\xff\"", b"\x1b", b"\"\x01\"", b"'abc\x02'"] {
            let mut s = JsonStream::default();
            let mut got = run(&mut s, bad);
            got.extend(run(&mut s, b"\n{\"execute\": \"query-name\"}"));
            let errors = got.iter().filter(|r| r.is_err()).count();
            assert!(errors >= 1, "{bad:?}: {got:?}");
            assert_eq!(got.last().unwrap(), &Ok(json!({"execute": "query-name"})), "{bad:?}");
        }
        // Parse errors (the lexer is fine with them).
        assert_eq!(all(b"\"\\x\" "), [perr("invalid escape sequence in string")]);
        assert_eq!(all(b"{\"a\" 1}"), [perr("missing : in object pair")]);
        assert_eq!(all(b"{1: 2}"), [perr("key is not a string in object")]);
        assert_eq!(all(b"{\"a\": 1 \"b\": 2}"), [perr("expected separator in dict")]);
        assert_eq!(all(b"[1 2]"), [perr("expected separator in list")]);
        assert_eq!(all(b"{\"a\": }"), [perr("expecting value")]);
        assert_eq!(all(b"[1,]"), [perr("expecting value")]);
        assert_eq!(all(b"{\"a\": 1, \"a\": 2}"), [perr("duplicate key")]);
        assert_eq!(all(b"]"), [perr("expecting value")]);
        assert_eq!(all(b"{]"), [perr("expecting value")]);
        assert_eq!(all(b"{\"execute\": foo}"), [perr("invalid keyword 'foo'")]);
    }

    #[test]
    fn recovers_after_each_error() {
        let mut s = JsonStream::default();
        let mut got = run(&mut s, b"{\"a\" 1}\n{\"execute\": \"x\"}");
        assert_eq!(got.remove(0), perr("missing : in object pair"));
        assert_eq!(got, [Ok(json!({"execute": "x"}))]);
    }

    #[test]
    fn nesting_limit() {
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert_eq!(all(ok.as_bytes()).len(), 1);
        assert!(all(ok.as_bytes())[0].is_ok());
        let mut s = JsonStream::default();
        let deep = format!("{}{}\n", "[".repeat(65), "]".repeat(65));
        assert_eq!(run(&mut s, deep.as_bytes()), [Err("JSON nesting depth limit exceeded".to_string())]);
        // One error for the whole line, then the next line works.
        assert_eq!(run(&mut s, b"{\"execute\": \"x\"}"), [Ok(json!({"execute": "x"}))]);
        // Objects count too.
        let deep = format!("{}1{}\n", "{\"a\":".repeat(65), "}".repeat(65));
        assert_eq!(all(deep.as_bytes()), [Err("JSON nesting depth limit exceeded".to_string())]);
    }

    #[test]
    fn size_limit_without_buffering_the_excess() {
        let mut s = JsonStream::default();
        // A 2 MiB string, fed in 64 KiB reads, never held beyond the limit.
        let mut got = run(&mut s, b"{\"execute\": \"");
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..32 {
            got.extend(run(&mut s, &chunk));
            assert!(s.lexer.pending_len() <= Limits::DEFAULT.max_bytes);
            assert!(s.text.len() <= Limits::DEFAULT.max_bytes);
        }
        got.extend(run(&mut s, b"\"}\n{\"execute\": \"after\"}"));
        assert_eq!(got, [Err("JSON token size limit exceeded".to_string()), Ok(json!({"execute": "after"}))]);

        // Many small tokens over the limit, on one line.
        let big = format!("[{}1]\n", "1,".repeat(600_000));
        let mut s = JsonStream::default();
        let mut got = run(&mut s, big.as_bytes());
        got.extend(run(&mut s, b"[2]"));
        assert_eq!(got[0], Err("JSON token count limit exceeded".to_string()));
        assert_eq!(got[1..], [Ok(json!([2]))]);

        // Just under the limit is fine.
        let s_len = Limits::DEFAULT.max_bytes - 20;
        let fits = format!("{{\"execute\": \"{}\"}}", "b".repeat(s_len));
        assert!(fits.len() <= Limits::DEFAULT.max_bytes);
        assert!(all(fits.as_bytes())[0].is_ok());
    }

    #[test]
    fn custom_limits() {
        let limits = Limits { max_bytes: 32, max_depth: 2, max_tokens: 8 };
        let mut s = JsonStream::new(limits);
        assert_eq!(run(&mut s, b"[[[]]]\n"), [Err("JSON nesting depth limit exceeded".to_string())]);
        assert_eq!(run(&mut s, b"[1,2,3,4,5]\n"), [Err("JSON token count limit exceeded".to_string())]);
        assert_eq!(
            run(&mut s, b"\"0123456789012345678901234567890123\"\n"),
            [Err("JSON token size limit exceeded".to_string())]
        );
        assert_eq!(run(&mut s, b"[[1]]"), [Ok(json!([[1]]))]);
    }

    #[test]
    fn whitespace_between_messages_is_free() {
        let mut s = JsonStream::new(Limits { max_bytes: 16, max_depth: 4, max_tokens: 16 });
        let spaces = vec![b' '; 10_000];
        assert_eq!(run(&mut s, &spaces), []);
        assert_eq!(run(&mut s, b"{\"a\": 1}"), [Ok(json!({"a": 1}))]);
    }
}
