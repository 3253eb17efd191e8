//! QEMU's JSON parser (`qobject/json-parser.c`): the tokens of one message to a JSON value,
//! with QEMU's error texts ("JSON parse error, expecting value", "... duplicate key", ...).
//!
//! Strings: double- or single-quoted; escapes `\" \' \\ \/ \b \f \n \r \t \uXXXX` (surrogate
//! pairs joined); the raw bytes must be UTF-8 and every code point a valid Unicode character
//! (no surrogates, no noncharacters), as QEMU's `mod_utf8_codepoint()` has it. Integers become
//! `i64` when they fit, else `u64`, else a double (QEMU's QNum); a number that is not finite as a
//! double (`1e999`) is refused, since JSON has no way to send it back.

use serde_json::{Map, Number, Value};

use super::lexer::TokenKind;

/// A token of a message: its kind and its text's range in the message's text buffer.
#[derive(Debug, Clone, Copy)]
pub struct Token {
    pub kind: TokenKind,
    pub start: u32,
    pub end: u32,
}

struct Parser<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    pos: usize,
}

type Parsed<T> = Result<T, String>;

fn err<T>(msg: impl Into<String>) -> Parsed<T> {
    Err(format!("JSON parse error, {}", msg.into()))
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a Token> {
        self.tokens.get(self.pos)
    }

    fn pop(&mut self) -> Option<&'a Token> {
        let t = self.tokens.get(self.pos);
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn text(&self, t: &Token) -> &'a [u8] {
        &self.text[t.start as usize..t.end as usize]
    }

    fn value(&mut self) -> Parsed<Value> {
        let Some(t) = self.peek() else { return err("premature EOI") };
        match t.kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::String => {
                self.pos += 1;
                parse_string(self.text(t)).map(Value::String)
            }
            TokenKind::Integer | TokenKind::Float => {
                self.pos += 1;
                parse_number(self.text(t), t.kind == TokenKind::Integer)
            }
            TokenKind::Keyword => {
                self.pos += 1;
                match self.text(t) {
                    b"true" => Ok(Value::Bool(true)),
                    b"false" => Ok(Value::Bool(false)),
                    b"null" => Ok(Value::Null),
                    other => err(format!("invalid keyword '{}'", String::from_utf8_lossy(other))),
                }
            }
            _ => err("expecting value"),
        }
    }

    fn pair(&mut self, map: &mut Map<String, Value>) -> Parsed<()> {
        if self.peek().is_none() {
            return err("premature EOI");
        }
        let key = match self.value()? {
            Value::String(s) => s,
            _ => return err("key is not a string in object"),
        };
        match self.pop() {
            None => return err("premature EOI"),
            Some(t) if t.kind != TokenKind::Colon => return err("missing : in object pair"),
            Some(_) => {}
        }
        let value = self.value()?;
        if map.contains_key(&key) {
            return err("duplicate key");
        }
        map.insert(key, value);
        Ok(())
    }

    fn object(&mut self) -> Parsed<Value> {
        self.pos += 1; // '{'
        let mut map = Map::new();
        match self.peek() {
            None => return err("premature EOI"),
            Some(t) if t.kind == TokenKind::RCurly => {
                self.pos += 1;
                return Ok(Value::Object(map));
            }
            Some(_) => {}
        }
        self.pair(&mut map)?;
        loop {
            match self.pop() {
                None => return err("premature EOI"),
                Some(t) if t.kind == TokenKind::RCurly => return Ok(Value::Object(map)),
                Some(t) if t.kind != TokenKind::Comma => return err("expected separator in dict"),
                Some(_) => self.pair(&mut map)?,
            }
        }
    }

    fn array(&mut self) -> Parsed<Value> {
        self.pos += 1; // '['
        let mut list = Vec::new();
        match self.peek() {
            None => return err("premature EOI"),
            Some(t) if t.kind == TokenKind::RSquare => {
                self.pos += 1;
                return Ok(Value::Array(list));
            }
            Some(_) => {}
        }
        list.push(self.value()?);
        loop {
            match self.pop() {
                None => return err("premature EOI"),
                Some(t) if t.kind == TokenKind::RSquare => return Ok(Value::Array(list)),
                Some(t) if t.kind != TokenKind::Comma => return err("expected separator in list"),
                Some(_) => list.push(self.value()?),
            }
        }
    }
}

/// Parses the tokens of one message (as the streamer delimits it) into a value.
pub fn parse(tokens: &[Token], text: &[u8]) -> Result<Value, String> {
    let mut p = Parser { tokens, text, pos: 0 };
    let v = p.value()?;
    // The streamer hands over exactly one value's tokens, or an unbalanced prefix that fails
    // above; anything left would be a streamer bug, reported rather than dropped.
    if p.pos != tokens.len() {
        return err("expecting value");
    }
    Ok(v)
}

fn parse_number(text: &[u8], integer: bool) -> Parsed<Value> {
    // The lexer only lets ASCII digits, signs, '.', 'e' and 'E' through.
    let s = std::str::from_utf8(text).unwrap_or_default();
    if integer {
        if let Ok(i) = s.parse::<i64>() {
            return Ok(Value::Number(i.into()));
        }
        if let Ok(u) = s.parse::<u64>() {
            return Ok(Value::Number(u.into()));
        }
    }
    match s.parse::<f64>().ok().and_then(Number::from_f64) {
        Some(n) => Ok(Value::Number(n)),
        None => err(format!("number {s} is out of range")),
    }
}

/// QEMU's `is_valid_codepoint()`: no surrogates, no noncharacters, nothing above U+10FFFF.
fn valid_codepoint(cp: u32) -> bool {
    cp <= 0x10FFFF && !(0xFDD0..=0xFDEF).contains(&cp) && (cp & 0xFFFE) != 0xFFFE && !(0xD800..=0xDFFF).contains(&cp)
}

fn hex4(s: &[u8]) -> Option<u32> {
    if s.len() < 4 {
        return None;
    }
    let mut cp = 0u32;
    for &c in &s[..4] {
        cp = (cp << 4) | (c as char).to_digit(16)?;
    }
    Some(cp)
}

/// Decodes one UTF-8 sequence at the start of `s`: (code point, length).
fn utf8_codepoint(s: &[u8]) -> Option<(u32, usize)> {
    let b0 = *s.first()?;
    let (len, init) = match b0 {
        0x00..=0x7F => return Some((b0 as u32, 1)),
        0xC2..=0xDF => (2, (b0 & 0x1F) as u32),
        0xE0..=0xEF => (3, (b0 & 0x0F) as u32),
        0xF0..=0xF4 => (4, (b0 & 0x07) as u32),
        _ => return None,
    };
    if s.len() < len {
        return None;
    }
    let mut cp = init;
    for &b in &s[1..len] {
        if b & 0xC0 != 0x80 {
            return None;
        }
        cp = (cp << 6) | (b & 0x3F) as u32;
    }
    let min = [0, 0, 0x80, 0x800, 0x10000][len];
    if cp < min {
        return None; // overlong
    }
    Some((cp, len))
}

/// A string token (quotes included) to its value.
pub fn parse_string(token: &[u8]) -> Parsed<String> {
    let quote = token[0];
    let body = &token[1..];
    let mut out = String::new();
    let mut i = 0;
    while i < body.len() && body[i] != quote {
        let c = body[i];
        if c == b'\\' {
            let beg = i;
            let Some(&e) = body.get(i + 1) else { return err("invalid escape sequence in string") };
            i += 2;
            let ch = match e {
                b'"' => '"',
                b'\'' => '\'',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let mut cp = hex4(&body[i..]);
                    i += 4.min(body.len() - i);
                    if let Some(lead) = cp.filter(|c| (0xD800..=0xDBFF).contains(c)) {
                        if body.get(i) == Some(&b'\\') && body.get(i + 1) == Some(&b'u') {
                            cp = match hex4(&body[i + 2..]) {
                                Some(t) if (0xDC00..=0xDFFF).contains(&t) => {
                                    i += 6;
                                    Some(0x10000 + ((lead & 0x3FF) << 10) + (t & 0x3FF))
                                }
                                _ => None,
                            };
                        }
                    }
                    match cp.filter(|&c| valid_codepoint(c)).and_then(char::from_u32) {
                        Some(ch) => ch,
                        None => {
                            let shown = String::from_utf8_lossy(&body[beg..i.min(body.len())]);
                            return err(format!("{shown} is not a valid Unicode character"));
                        }
                    }
                }
                _ => return err("invalid escape sequence in string"),
            };
            out.push(ch);
        } else {
            match utf8_codepoint(&body[i..]) {
                Some((cp, len)) if valid_codepoint(cp) => {
                    out.push(char::from_u32(cp).expect("valid code point"));
                    i += len;
                }
                _ => return err("invalid UTF-8 sequence in string"),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(t: &str) -> Result<String, String> {
        parse_string(t.as_bytes())
    }

    #[test]
    fn strings() {
        assert_eq!(s(r#""plain""#).unwrap(), "plain");
        assert_eq!(s(r#"'single "quoted"'"#).unwrap(), "single \"quoted\"");
        assert_eq!(s(r#""\"\'\\\/\b\f\n\r\t""#).unwrap(), "\"'\\/\u{8}\u{c}\n\r\t");
        assert_eq!(s(r#""\u00e9\u20AC""#).unwrap(), "é€");
        assert_eq!(s(r#""\ud83d\ude00""#).unwrap(), "😀");
        assert_eq!(s("\"é😀\"").unwrap(), "é😀");
        assert_eq!(s(r#""\x""#).unwrap_err(), "JSON parse error, invalid escape sequence in string");
        assert_eq!(s(r#""\ud83d""#).unwrap_err(), "JSON parse error, \\ud83d is not a valid Unicode character");
        assert_eq!(s(r#""\uzzzz""#).unwrap_err(), "JSON parse error, \\uzzzz is not a valid Unicode character");
        assert_eq!(s(r#""\uffff""#).unwrap_err(), "JSON parse error, \\uffff is not a valid Unicode character");
        let bad_utf8 = parse_string(b"\"\xc3\x28\"").unwrap_err();
        assert_eq!(bad_utf8, "JSON parse error, invalid UTF-8 sequence in string");
        let overlong = parse_string(b"\"\xc0\xaf\"").unwrap_err();
        assert_eq!(overlong, "JSON parse error, invalid UTF-8 sequence in string");
        let surrogate = parse_string(b"\"\xed\xa0\x80\"").unwrap_err();
        assert_eq!(surrogate, "JSON parse error, invalid UTF-8 sequence in string");
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"42", true).unwrap(), json!(42));
        assert_eq!(parse_number(b"-9223372036854775808", true).unwrap(), json!(i64::MIN));
        assert_eq!(parse_number(b"18446744073709551615", true).unwrap(), json!(u64::MAX));
        assert_eq!(parse_number(b"18446744073709551616", true).unwrap(), json!(18446744073709551616.0));
        assert_eq!(parse_number(b"1.5", false).unwrap(), json!(1.5));
        assert_eq!(parse_number(b"1e999", false).unwrap_err(), "JSON parse error, number 1e999 is out of range");
    }
}
