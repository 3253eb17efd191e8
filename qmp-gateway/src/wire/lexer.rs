//! QEMU's JSON lexer (`qobject/json-lexer.c`), byte by byte.
//!
//! The same state machine as QEMU 7.2, without interpolation: RFC 8259 tokens plus QEMU's two
//! extensions (single-quoted strings, `\'` in strings). Any keyword `[a-z]+` is a token (the
//! parser refuses unknown ones). Bytes 0x00-0x1F (but in whitespace) and 0xFE/0xFF are never
//! part of a token. Validating UTF-8 and escapes is the parser's job.
//!
//! After a lexical error the lexer skips input until a structural character, an ASCII control
//! character other than tab, or 0xFE/0xFF, exactly as QEMU does, so that the stream
//! resynchronises on the next line or brace.

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

/// What the lexer reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lexed {
    /// A token ended.
    Token(TokenKind),
    /// A lexical error; the text is the bad token up to and including the offending byte.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Digits,
    Sign,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// The lexer. Feed it bytes one at a time with [`Lexer::feed`].
#[derive(Debug)]
pub struct Lexer {
    state: State,
    token: Vec<u8>,
}

impl Default for Lexer {
    fn default() -> Self {
        Self::new()
    }
}

/// What a state does with a byte.
enum Step {
    /// Consume the byte and go to the state.
    Go(State),
    /// Consume the byte; it completes a token.
    Done(TokenKind),
    /// The token ended before this byte (lookahead): emit it, then lex the byte from Start.
    EndBefore(TokenKind),
    /// The byte is not consumed: re-lex it from Start (leaving recovery).
    Resync,
    /// Consume the byte; it is an error.
    Error,
}

fn is_structural_or_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b >= 0xFE || matches!(b, b'[' | b']' | b'{' | b'}' | b':' | b',')
}

fn step(state: State, b: u8) -> Step {
    use State::*;
    use Step::*;
    let string_byte = (0x20..=0xFD).contains(&b);
    match state {
        Start => match b {
            b'"' => Go(DqString),
            b'\'' => Go(SqString),
            b'0' => Go(Zero),
            b'1'..=b'9' => Go(Digits),
            b'-' => Go(Sign),
            b'{' => Done(TokenKind::LCurly),
            b'}' => Done(TokenKind::RCurly),
            b'[' => Done(TokenKind::LSquare),
            b']' => Done(TokenKind::RSquare),
            b',' => Done(TokenKind::Comma),
            b':' => Done(TokenKind::Colon),
            b'a'..=b'z' => Go(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Go(Start),
            _ => Error,
        },
        Recovery => {
            if is_structural_or_control(b) {
                Resync
            } else {
                Go(Recovery)
            }
        }
        DqString => match b {
            b'\\' => Go(DqEscape),
            b'"' => Done(TokenKind::String),
            _ if string_byte => Go(DqString),
            _ => Error,
        },
        DqEscape => {
            if string_byte {
                Go(DqString)
            } else {
                Error
            }
        }
        SqString => match b {
            b'\\' => Go(SqEscape),
            b'\'' => Done(TokenKind::String),
            _ if string_byte => Go(SqString),
            _ => Error,
        },
        SqEscape => {
            if string_byte {
                Go(SqString)
            } else {
                Error
            }
        }
        Zero => match b {
            b'0'..=b'9' => Error,
            b'.' => Go(Mantissa),
            _ => EndBefore(TokenKind::Integer),
        },
        Digits => match b {
            b'0'..=b'9' => Go(Digits),
            b'e' | b'E' => Go(ExpE),
            b'.' => Go(Mantissa),
            _ => EndBefore(TokenKind::Integer),
        },
        Sign => match b {
            b'0' => Go(Zero),
            b'1'..=b'9' => Go(Digits),
            _ => Error,
        },
        Mantissa => match b {
            b'0'..=b'9' => Go(MantissaDigits),
            _ => Error,
        },
        MantissaDigits => match b {
            b'0'..=b'9' => Go(MantissaDigits),
            b'e' | b'E' => Go(ExpE),
            _ => EndBefore(TokenKind::Float),
        },
        ExpE => match b {
            b'-' | b'+' => Go(ExpSign),
            b'0'..=b'9' => Go(ExpDigits),
            _ => Error,
        },
        ExpSign => match b {
            b'0'..=b'9' => Go(ExpDigits),
            _ => Error,
        },
        ExpDigits => match b {
            b'0'..=b'9' => Go(ExpDigits),
            _ => EndBefore(TokenKind::Float),
        },
        Keyword => match b {
            b'a'..=b'z' => Go(Keyword),
            _ => EndBefore(TokenKind::Keyword),
        },
    }
}

impl Lexer {
    pub fn new() -> Self {
        Lexer { state: State::Start, token: Vec::new() }
    }

    /// Bytes of the token in progress (for the message size limit).
    pub fn pending_len(&self) -> usize {
        self.token.len()
    }

    /// Whether a token is in progress (not between tokens, not recovering).
    pub fn in_token(&self) -> bool {
        !matches!(self.state, State::Start | State::Recovery)
    }

    /// Forgets any token in progress and starts afresh.
    pub fn reset(&mut self) {
        self.state = State::Start;
        self.token.clear();
    }

    /// Lexes one byte, reporting each token or error it completes (at most two: `1}` ends the
    /// integer and is the brace) with its text.
    pub fn feed(&mut self, b: u8, mut emit: impl FnMut(Lexed, &[u8])) {
        loop {
            match step(self.state, b) {
                Step::Go(s) => {
                    self.state = s;
                    if !matches!(s, State::Start | State::Recovery) {
                        self.token.push(b);
                    }
                    return;
                }
                Step::Done(kind) => {
                    self.token.push(b);
                    emit(Lexed::Token(kind), &self.token);
                    self.token.clear();
                    self.state = State::Start;
                    return;
                }
                Step::EndBefore(kind) => {
                    emit(Lexed::Token(kind), &self.token);
                    self.token.clear();
                    self.state = State::Start;
                }
                Step::Resync => self.state = State::Start,
                Step::Error => {
                    self.token.push(b);
                    emit(Lexed::Error, &self.token);
                    self.token.clear();
                    self.state = State::Recovery;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lexes `input` into (kind or "ERR", text) pairs.
    fn lex(input: &[u8]) -> Vec<(String, String)> {
        let mut l = Lexer::new();
        let mut out = Vec::new();
        for &b in input {
            l.feed(b, |what, text| {
                let text = String::from_utf8_lossy(text).into_owned();
                match what {
                    Lexed::Token(k) => out.push((format!("{k:?}"), text)),
                    Lexed::Error => out.push(("ERR".into(), text)),
                }
            });
        }
        out
    }

    fn kinds(input: &[u8]) -> Vec<String> {
        lex(input).into_iter().map(|(k, t)| format!("{k}:{t}")).collect()
    }

    #[test]
    fn tokens() {
        assert_eq!(
            kinds(br#"{"a": [1, -2.5e3, true], 'b': null}"#),
            [
                "LCurly:{",
                "String:\"a\"",
                "Colon::",
                "LSquare:[",
                "Integer:1",
                "Comma:,",
                "Float:-2.5e3",
                "Comma:,",
                "Keyword:true",
                "RSquare:]",
                "Comma:,",
                "String:'b'",
                "Colon::",
                "Keyword:null",
                "RCurly:}"
            ]
        );
    }

    #[test]
    fn number_needs_lookahead() {
        // The integer ends only when the next byte arrives.
        assert_eq!(kinds(b"42"), Vec::<String>::new());
        assert_eq!(kinds(b"42 "), ["Integer:42"]);
        assert_eq!(kinds(b"[0]"), ["LSquare:[", "Integer:0", "RSquare:]"]);
        assert_eq!(kinds(b"1.5e+3,"), ["Float:1.5e+3", "Comma:,"]);
    }

    #[test]
    fn escapes_and_quotes_inside_strings() {
        assert_eq!(kinds(br#""a\"b'c" "#), [r#"String:"a\"b'c""#]);
        assert_eq!(kinds(br#"'a\'b"c' "#), [r#"String:'a\'b"c'"#]);
        assert_eq!(kinds(br#""{[}]" "#), [r#"String:"{[}]""#]);
    }

    #[test]
    fn errors_and_recovery_as_qemu() {
        // `query` is a keyword token, `-s` an error; recovery skips `tatus` up to `}`.
        assert_eq!(
            kinds(br#"{"execute": query-status}"#),
            ["LCurly:{", "String:\"execute\"", "Colon::", "Keyword:query", "ERR:-s", "RCurly:}"]
        );
        // A control character inside a string.
        assert_eq!(
            kinds(b"{\"execute\": \"query-\x01status\"}"),
            ["LCurly:{", "String:\"execute\"", "Colon::", "ERR:\"query-\x01", "RCurly:}"]
        );
        // 0xFF is never valid; recovery ends at a newline.
        assert_eq!(kinds(b"\xff garbage\n[]"), ["ERR:\u{fffd}", "LSquare:[", "RSquare:]"]);
        // Leading zeros and bare signs.
        assert_eq!(kinds(b"01 "), ["ERR:01"]);
        assert_eq!(kinds(b"-x "), ["ERR:-x"]);
        assert_eq!(kinds(b"1.x"), ["ERR:1.x"]);
        // Upper case is not a keyword.
        assert_eq!(kinds(b"True\n"), ["ERR:T"]);
    }

    #[test]
    fn token_then_error() {
        assert_eq!(kinds(b"1\x01"), ["Integer:1", "ERR:\x01"]);
    }
}
