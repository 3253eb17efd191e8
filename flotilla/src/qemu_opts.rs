//! QEMU's option-value syntaxes: `key=value,key2=value2` lists (QemuOpts: `,,` is a literal
//! comma, the first bare word may be an implied key, `flag` means `flag=on`, `noflag` means
//! `flag=off`), sizes with k/M/G/T/P/E suffixes, booleans and UUIDs.

/// A parse failure; the caller adds the `-option value:` location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError {
    pub message: String,
    pub hint: Option<String>,
}

impl ValueError {
    pub fn new(message: impl Into<String>) -> Self {
        ValueError { message: message.into(), hint: None }
    }
    pub fn with_hint(message: impl Into<String>, hint: impl Into<String>) -> Self {
        ValueError { message: message.into(), hint: Some(hint.into()) }
    }
}

/// Splits a QemuOpts string into `(key, value)` pairs, in order.
pub fn parse_keyvals(s: &str, implied: Option<&str>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, part) in split_commas(s).into_iter().enumerate() {
        match part.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => match implied {
                Some(key) if i == 0 => out.push((key.to_string(), part)),
                _ => match part.strip_prefix("no") {
                    // QEMU's short-form booleans: `server` = server=on, `nowait` = wait=off.
                    Some(rest) if !rest.is_empty() => out.push((rest.to_string(), "off".to_string())),
                    _ => out.push((part, "on".to_string())),
                },
            },
        }
    }
    out
}

/// Splits on `,`, where `,,` stands for a literal comma.
pub fn split_commas(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// QEMU's boolean spellings.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, ValueError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(ValueError::new(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

const SIZE_HINT: &str =
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

/// QEMU's error for a size that does not parse or does not fit in 64 bits.
pub fn size_error(key: &str) -> ValueError {
    ValueError::with_hint(format!("Parameter '{key}' expects a non-negative number below 2^64"), SIZE_HINT)
}

/// A QEMU size (`qemu_strtosz`): decimal (optionally with a fraction) or `0x` hex, then an
/// optional suffix B/K/M/G/T/P/E (any case); without a suffix the number is in `default_unit`.
pub fn parse_size(key: &str, s: &str, default_unit: u64) -> Result<u64, ValueError> {
    let err = || size_error(key);
    let (num, unit, suffixed) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() && !s.starts_with("0x") && !s.starts_with("0X") => {
            let unit = match c.to_ascii_lowercase() {
                'b' => 1u64,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(err()),
            };
            (&s[..i], unit, true)
        }
        Some(_) => (s, default_unit, false),
        None => return Err(err()),
    };
    if let Some(hex) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| err())?;
        return v.checked_mul(unit).ok_or_else(err);
    }
    let (whole, frac) = match num.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (num, None),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let whole: u64 = whole.parse().map_err(|_| err())?;
    let mut total = u128::from(whole) * u128::from(unit);
    if let Some(f) = frac {
        // A fraction needs an explicit unit larger than a byte ("1.5k"), as in QEMU: `-m 1.5`
        // is refused even though a plain `-m 1` means MiB.
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) || unit == 1 || !suffixed || f.len() > 18 {
            return Err(err());
        }
        let digits: u128 = f.parse().map_err(|_| err())?;
        total += digits * u128::from(unit) / 10u128.pow(f.len() as u32);
    }
    u64::try_from(total).map_err(|_| err())
}

/// A UUID in 8-4-4-4-12 hex form; returns it in canonical lower case.
pub fn parse_uuid(s: &str) -> Option<String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if groups.len() != lens.len() {
        return None;
    }
    for (g, len) in groups.iter().zip(lens) {
        if g.len() != len || !g.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
    }
    Some(s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(s: &str, implied: Option<&str>) -> Vec<(String, String)> {
        parse_keyvals(s, implied)
    }
    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn keyvals_implied_first_key_only() {
        assert_eq!(kv("vm1", Some("guest")), vec![p("guest", "vm1")]);
        assert_eq!(kv("guest=vm1,debug-threads=on", Some("guest")), vec![p("guest", "vm1"), p("debug-threads", "on")]);
        assert_eq!(kv("a,server", Some("path")), vec![p("path", "a"), p("server", "on")]);
        assert_eq!(kv("a,nowait", Some("path")), vec![p("path", "a"), p("wait", "off")]);
        assert_eq!(kv("server", None), vec![p("server", "on")]);
        assert_eq!(kv("no", None), vec![p("no", "on")]);
    }

    #[test]
    fn keyvals_double_comma_is_literal() {
        assert_eq!(kv("a,,b,x=c,,d", Some("guest")), vec![p("guest", "a,b"), p("x", "c,d")]);
        assert_eq!(split_commas("a,,,b"), vec!["a,", "b"]);
        assert_eq!(split_commas(""), vec![""]);
    }

    #[test]
    fn sizes() {
        let m = 1u64 << 20;
        assert_eq!(parse_size("size", "512", m), Ok(512 * m));
        assert_eq!(parse_size("size", "512M", m), Ok(512 * m));
        assert_eq!(parse_size("size", "512m", m), Ok(512 * m));
        assert_eq!(parse_size("size", "2G", m), Ok(2 << 30));
        assert_eq!(parse_size("size", "2g", m), Ok(2 << 30));
        assert_eq!(parse_size("size", "1T", m), Ok(1 << 40));
        assert_eq!(parse_size("size", "64k", m), Ok(64 << 10));
        assert_eq!(parse_size("size", "64K", m), Ok(64 << 10));
        assert_eq!(parse_size("size", "4096B", m), Ok(4096));
        assert_eq!(parse_size("size", "1.5G", m), Ok(3 << 29));
        assert!(parse_size("size", "1.5", m).is_err(), "QEMU 7.2: a fraction needs a suffix");
        assert!(parse_size("size", "0x10M", m).is_err(), "hex takes no suffix");
        assert_eq!(parse_size("size", "0x100", 1), Ok(256));
        assert_eq!(parse_size("size", "0", m), Ok(0));
        for bad in ["", "12X", "-1", "1.5B", "M", "1..5G", "1.G", "0x", "0xZ", "16E", "99999999999999999999", " 1"] {
            let e = parse_size("size", bad, m).expect_err(bad);
            assert_eq!(e.message, "Parameter 'size' expects a non-negative number below 2^64", "{bad}");
            assert!(e.hint.as_deref().is_some_and(|h| h.starts_with("Optional suffix k, M, G")));
        }
        assert_eq!(parse_size("size", "15E", 1), Ok(15 << 60));
        assert!(parse_size("size", "17592186044416", m).is_err(), "2^44 MiB overflows");
    }

    #[test]
    fn bools() {
        for t in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool("k", t), Ok(true));
        }
        for f in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool("k", f), Ok(false));
        }
        assert_eq!(parse_bool("wait", "maybe").unwrap_err().message, "Parameter 'wait' expects 'on' or 'off'");
    }

    #[test]
    fn uuids() {
        assert_eq!(
            parse_uuid("6F9619FF-8B86-D011-B42D-00C04FC964FF").as_deref(),
            Some("6f9619ff-8b86-d011-b42d-00c04fc964ff")
        );
        assert!(parse_uuid("00000000-0000-0000-0000-000000000000").is_some());
        for bad in [
            "",
            "xyz",
            "6f9619ff8b86d011b42d00c04fc964ff",
            "6f9619ff-8b86-d011-b42d-00c04fc964f",
            "6f9619ff-8b86-d011-b42d-00c04fc964fff",
            "6f9619ff-8b86-d011-b42d-00c04fc964fg",
            "6f9619f-f8b86-d011-b42d-00c04fc964ff",
            "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
            "6f9619ff-8b86-d011-b42d-00c04fc964ff-",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }
}
