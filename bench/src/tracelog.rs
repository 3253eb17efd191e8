//! Reading vmm-core's log lines (tracing's fmt output on stderr) for the guest boot marker:
//! `... INFO vmm_core::devices::marker: guest boot marker value=1 elapsed_us=12345`.

/// Removes ANSI escape sequences (CSI `ESC [ ... final-byte`), in case the log is coloured.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // Parameter and intermediate bytes, then one final byte in 0x40..=0x7e.
            for c in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next(); // a two-byte escape
        }
    }
    out
}

/// `key=value` from a structured log line (the value ends at whitespace).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The `elapsed_us` of a "guest boot marker" line, or `None` for any other line.
pub fn boot_marker_us(line: &str) -> Option<u64> {
    let plain = strip_ansi(line);
    if !plain.contains("guest boot marker") {
        return None;
    }
    field(&plain, "elapsed_us")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_marker_line() {
        let l =
            "2026-05-01T12:00:00.123456Z  INFO vmm_core::devices::marker: guest boot marker value=1 elapsed_us=12345";
        assert_eq!(boot_marker_us(l), Some(12345));
    }

    #[test]
    fn coloured_marker_line() {
        let l = "\x1b[2m2026-05-01T12:00:00.123456Z\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mvmm_core::devices::marker\x1b[0m\x1b[2m:\x1b[0m guest boot marker \x1b[3mvalue\x1b[0m\x1b[2m=\x1b[0m1 \x1b[3melapsed_us\x1b[0m\x1b[2m=\x1b[0m987";
        assert_eq!(boot_marker_us(l), Some(987));
        assert_eq!(strip_ansi("\x1b[1;31mred\x1b[0m \x1bcx"), "red x");
    }

    #[test]
    fn other_lines_are_not_markers() {
        assert_eq!(boot_marker_us("INFO vmm_core: vmm-core started pid=5 elapsed_us=3"), None);
        assert_eq!(boot_marker_us("INFO guest boot marker value=1"), None);
        assert_eq!(boot_marker_us("INFO guest boot marker elapsed_us=soon"), None);
        assert_eq!(field("a=1 elapsed_us=2", "elapsed_us"), Some("2"));
        assert_eq!(field("xelapsed_us=2", "elapsed_us"), None);
    }
}
