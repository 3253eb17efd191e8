//! Reading a Linux console log: the printk timestamp of a line, the lines that complain (about
//! the machine, mostly), and where the kernel's clock jumped between two lines (where the boot
//! waited: an ACPI loop timeout, a probe, a slow device).

/// What marks a line as a complaint, lower case, matched anywhere in the line's text (the
/// timestamp stripped). Broad on purpose: the report lists them per machine so that the
/// comparison shows what each machine's log says, not a verdict.
const COMPLAINTS: &[&str] = &[
    "not reserved",
    "_osc",
    "ae_",
    "acpi error",
    "acpi bios error",
    "acpi warning",
    "firmware bug",
    "[firmware",
    "fail",
    "error",
    "can't",
    "cannot",
    "unable",
    "warning",
    "timed out",
    "timeout",
    "nobody cared",
    "bug:",
    "oops",
    "call trace",
    "invalid",
    "bogus",
    "broken",
    "not found",
    "no irq",
    "mismatch",
    "missing",
    "unknown",
];

/// The console line that ends the measured boot.
pub const RUN_INIT: &str = "Run /sbin/init";
/// The kernel's first line: when the VMM (and firmware) handed over.
pub const LINUX_VERSION: &str = "Linux version ";

/// The printk timestamp (`[   52.262156] ...`) in seconds, and the text after it.
pub fn split_timestamp(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (ts, text) = rest.split_once(']')?;
    let s: f64 = ts.trim().parse().ok()?;
    Some((s, text.strip_prefix(' ').unwrap_or(text)))
}

/// The line's text without its timestamp (the whole line when it has none).
pub fn text(line: &str) -> &str {
    split_timestamp(line).map_or(line, |(_, t)| t)
}

/// Whether the line complains (see [`COMPLAINTS`]). The kernel's echo of its own command line
/// is never one.
pub fn complains(line: &str) -> bool {
    let t = text(line);
    if t.starts_with("Command line:") || t.starts_with("Kernel command line:") {
        return false;
    }
    let lower = t.to_ascii_lowercase();
    COMPLAINTS.iter().any(|c| lower.contains(c))
}

/// A stretch of kernel time with no console line.
#[derive(Debug, Clone, PartialEq)]
pub struct Gap {
    pub seconds: f64,
    /// The last line before it and the first after it.
    pub before: String,
    pub after: String,
}

/// The `n` largest jumps of the printk clock between consecutive timestamped lines, largest
/// first.
pub fn largest_gaps<'a>(lines: impl IntoIterator<Item = &'a str>, n: usize) -> Vec<Gap> {
    let mut gaps = Vec::new();
    let mut prev: Option<(f64, &str)> = None;
    for line in lines {
        let Some((ts, _)) = split_timestamp(line) else { continue };
        if let Some((p, before)) = prev {
            if ts > p {
                gaps.push(Gap { seconds: ts - p, before: before.to_string(), after: line.to_string() });
            }
        }
        prev = Some((ts, line));
    }
    gaps.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    gaps.truncate(n);
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_read() {
        assert_eq!(
            split_timestamp("[   52.262156] Run /sbin/init as init process"),
            Some((52.262156, "Run /sbin/init as init process"))
        );
        assert_eq!(split_timestamp("[    0.000000] Linux version 6.12"), Some((0.0, "Linux version 6.12")));
        assert_eq!(split_timestamp("SeaBIOS (version 1.16)"), None);
        assert_eq!(split_timestamp("[abc] x"), None);
        assert_eq!(text("plain"), "plain");
    }

    #[test]
    fn complaints_are_told_from_the_rest() {
        for l in [
            "[    9.1] ACPI Error: Aborting method \\_SB.PCI0._PRT due to previous error (AE_AML_LOOP_TIMEOUT)",
            "[    2.0] PCI: MMCONFIG at [mem 0xb0000000-0xbfffffff] not reserved in ACPI motherboard resources",
            "[    3.0] acpi PNP0A08:00: _OSC: platform does not support [PCIeHotplug]",
            "[    4.0] i8042: Can't read CTR while initializing i8042",
            "[    5.0] [Firmware Bug]: TSC doesn't count with P0 frequency!",
            "[    6.0] irq 9: nobody cared (try booting with the \"irqpoll\" option)",
            "[    7.0] virtio_blk virtio0: probe failed",
        ] {
            assert!(complains(l), "{l}");
        }
        for l in [
            "[    0.0] Command line: console=ttyS0 root=/dev/vda1 rootwait",
            "[   52.2] Run /sbin/init as init process",
            "[    1.0] virtio_blk virtio0: [vda] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)",
        ] {
            assert!(!complains(l), "{l}");
        }
    }

    #[test]
    fn the_largest_gaps_come_first() {
        let lines = ["[ 0.5] a", "no timestamp", "[ 1.0] b", "[ 31.0] c", "[ 32.0] d", "[ 40.0] e"];
        let g = largest_gaps(lines, 2);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].seconds, g[0].before.as_str(), g[0].after.as_str()), (30.0, "[ 1.0] b", "[ 31.0] c"));
        assert_eq!(g[1].seconds, 8.0);
        assert!(largest_gaps(["[ 1.0] only"], 3).is_empty());
    }
}
