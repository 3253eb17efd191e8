//! HMP output and argument parsing for the device daemons' commands: `info block`,
//! `info blockstats`, `block_resize`, `info balloon`, `balloon`. Text as QEMU 7.2 prints it
//! (block/monitor/block-hmp-cmds.c, monitor/hmp-cmds.c), built from the QMP replies this
//! gateway gets, so it shows what the 1.1 schema carries: fields 7.2 prints but 1.1's
//! BlockInfo lacks (cache mode, node name, qdev path) appear only when a daemon sends them.

use std::fmt::Write as _;

use serde_json::Value;

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_default()
}

fn flag(v: &Value) -> bool {
    v.as_bool().unwrap_or_default()
}

/// `info block [device]`: hmp_info_block() / print_block_info() for each BlockInfo of
/// query-block (only `device` when one is named).
pub fn info_block(list: &Value, device: Option<&str>) -> String {
    let mut out = String::new();
    let mut first = true;
    for info in list.as_array().into_iter().flatten() {
        let name = info["device"].as_str().unwrap_or_default();
        if device.is_some_and(|d| d != name) {
            continue;
        }
        if !first {
            out.push('\n');
        }
        first = false;
        block_info(&mut out, info);
    }
    out
}

fn block_info(s: &mut String, info: &Value) {
    s.push_str(info["device"].as_str().unwrap_or_default());
    let inserted = info.get("inserted");
    if let Some(node) = inserted.and_then(|i| i.get("node-name")).and_then(Value::as_str) {
        let _ = write!(s, " ({node})");
    }
    match inserted {
        Some(i) => {
            let _ = writeln!(
                s,
                ": {} ({}{}{})",
                i["file"].as_str().unwrap_or_default(),
                i["drv"].as_str().unwrap_or_default(),
                if flag(&i["ro"]) { ", read-only" } else { "" },
                if flag(&i["encrypted"]) { ", encrypted" } else { "" }
            );
        }
        None => s.push_str(": [not inserted]\n"),
    }
    if let Some(qdev) = info.get("qdev").and_then(Value::as_str) {
        let _ = writeln!(s, "    Attached to:      {qdev}");
    }
    if let Some(status) = info.get("io-status").and_then(Value::as_str) {
        if status != "ok" {
            let _ = writeln!(s, "    I/O status:       {status}");
        }
    }
    if flag(&info["removable"]) {
        let _ = writeln!(
            s,
            "    Removable device: {}locked, tray {}",
            if flag(&info["locked"]) { "" } else { "not " },
            if flag(&info["tray_open"]) { "open" } else { "closed" }
        );
    }
    let Some(i) = inserted else { return };
    if let Some(cache) = i.get("cache") {
        let _ = writeln!(
            s,
            "    Cache mode:       {}{}{}",
            if flag(&cache["writeback"]) { "writeback" } else { "writethrough" },
            if flag(&cache["direct"]) { ", direct" } else { "" },
            if flag(&cache["no-flush"]) { ", ignore flushes" } else { "" }
        );
    }
    if let Some(backing) = i.get("backing_file").and_then(Value::as_str) {
        match i.get("backing_file_depth").and_then(Value::as_i64) {
            Some(depth) => {
                let _ = writeln!(s, "    Backing file:     {backing} (chain depth: {depth})");
            }
            None => {
                let _ = writeln!(s, "    Backing file:     {backing}");
            }
        }
    }
    let limits = ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"];
    if limits.iter().any(|k| int(&i[*k]) != 0) {
        let _ = writeln!(
            s,
            "    I/O throttling:   bps={} bps_rd={} bps_wr={} iops={} iops_rd={} iops_wr={}",
            int(&i["bps"]),
            int(&i["bps_rd"]),
            int(&i["bps_wr"]),
            int(&i["iops"]),
            int(&i["iops_rd"]),
            int(&i["iops_wr"])
        );
    }
}

/// `info blockstats`: hmp_info_blockstats(), one line per BlockStats with a device. Counters
/// 1.1's BlockDeviceStats does not have (merged requests, idle time) print as 0 when absent.
pub fn info_blockstats(list: &Value) -> String {
    let mut out = String::new();
    for stats in list.as_array().into_iter().flatten() {
        let Some(device) = stats.get("device").and_then(Value::as_str) else { continue };
        let st = &stats["stats"];
        let _ = writeln!(
            out,
            "{device}: rd_bytes={} wr_bytes={} rd_operations={} wr_operations={} flush_operations={} \
             wr_total_time_ns={} rd_total_time_ns={} flush_total_time_ns={} rd_merged={} wr_merged={} \
             idle_time_ns={}",
            int(&st["rd_bytes"]),
            int(&st["wr_bytes"]),
            int(&st["rd_operations"]),
            int(&st["wr_operations"]),
            int(&st["flush_operations"]),
            int(&st["wr_total_time_ns"]),
            int(&st["rd_total_time_ns"]),
            int(&st["flush_total_time_ns"]),
            int(&st["rd_merged"]),
            int(&st["wr_merged"]),
            int(&st["idle_time_ns"])
        );
    }
    out
}

/// `info balloon`: `balloon: actual=<MiB>`, then the guest's statistics the way QEMU 1.1's
/// hmp_info_balloon() appended them (7.2 no longer has them in query-balloon).
pub fn info_balloon(info: &Value) -> String {
    let mut s = format!("balloon: actual={}", int(&info["actual"]) >> 20);
    for key in ["mem_swapped_in", "mem_swapped_out", "major_page_faults", "minor_page_faults", "free_mem", "total_mem"]
    {
        if let Some(v) = info.get(key).and_then(Value::as_i64) {
            let _ = write!(s, " {key}={v}");
        }
    }
    s.push('\n');
    s
}

/// QEMU's `qemu_strtosz_MiB()` as HMP's `o` argument type uses it: a decimal number (a
/// fraction allowed) or a 0x hex integer, then an optional unit suffix
/// `B K M G T P E` (any case; none means MiB). Returns the byte count and the bytes consumed;
/// None where QEMU prints "invalid size".
pub fn parse_size_mib(s: &[u8]) -> Option<(u64, usize)> {
    let hex = s.len() > 2 && s[0] == b'0' && (s[1] | 0x20) == b'x';
    let (value, mut p): (f64, usize) = if hex {
        let digits = s[2..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if digits == 0 {
            return None;
        }
        let text = std::str::from_utf8(&s[2..2 + digits]).ok()?;
        (u64::from_str_radix(text, 16).ok()? as f64, 2 + digits)
    } else {
        let int_digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
        let mut end = int_digits;
        if s.get(end) == Some(&b'.') {
            end += 1 + s[end + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        }
        if int_digits == 0 {
            return None;
        }
        (std::str::from_utf8(&s[..end]).ok()?.parse::<f64>().ok()?, end)
    };
    let unit: u64 = match s.get(p).map(|c| c.to_ascii_uppercase()) {
        Some(b'B') => 1,
        Some(b'K') => 1 << 10,
        Some(b'M') => 1 << 20,
        Some(b'G') => 1 << 30,
        Some(b'T') => 1 << 40,
        Some(b'P') => 1 << 50,
        Some(b'E') => 1 << 60,
        _ => {
            // No suffix: the default unit, MiB.
            return whole_bytes(value * (1u64 << 20) as f64).map(|b| (b, p));
        }
    };
    p += 1;
    whole_bytes(value * unit as f64).map(|b| (b, p))
}

fn whole_bytes(bytes: f64) -> Option<u64> {
    // QEMU refuses sizes that do not fit an int64 (HMP checks val > INT64_MAX).
    if !bytes.is_finite() || !(0.0..i64::MAX as f64).contains(&bytes) {
        return None;
    }
    Some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn block_info_like_qemu() {
        // The shape of shared/qemu-7.2-qmp/x-human-monitor-command-info-block.txt, from the
        // fields 7.2's query-block carries.
        let list = json!([
            {"device": "drive0", "type": "unknown", "removable": false, "locked": false, "io-status": "ok",
             "qdev": "/machine/peripheral/vblk0/virtio-backend",
             "inserted": {"file": "/var/lib/vm/disk.raw", "ro": false, "drv": "raw", "encrypted": false,
                          "node-name": "#block146", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0,
                          "iops_wr": 0, "cache": {"writeback": true, "direct": true, "no-flush": false}}},
            {"device": "drive1", "type": "unknown", "removable": false, "locked": false,
             "qdev": "/machine/peripheral/vblk1/virtio-backend",
             "inserted": {"file": "/var/lib/vm/snap.qcow2", "ro": false, "drv": "qcow2", "encrypted": false,
                          "node-name": "#block847", "backing_file": "/var/lib/vm/disk.qcow2", "backing_file_depth": 1,
                          "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                          "cache": {"writeback": true, "direct": false, "no-flush": false}}}
        ]);
        let want = "drive0 (#block146): /var/lib/vm/disk.raw (raw)\n    Attached to:      \
                    /machine/peripheral/vblk0/virtio-backend\n    Cache mode:       writeback, direct\n\n\
                    drive1 (#block847): /var/lib/vm/snap.qcow2 (qcow2)\n    Attached to:      \
                    /machine/peripheral/vblk1/virtio-backend\n    Cache mode:       writeback\n    \
                    Backing file:     /var/lib/vm/disk.qcow2 (chain depth: 1)\n";
        assert_eq!(info_block(&list, None), want);
        assert!(info_block(&list, Some("drive1")).starts_with("drive1 (#block847)"));
        assert_eq!(info_block(&list, Some("nosuch")), "");
    }

    #[test]
    fn block_info_from_the_1_1_fields() {
        let list = json!([{"device": "virtio0", "type": "hd", "removable": false, "locked": false,
            "io-status": "nospace",
            "inserted": {"file": "/i.qcow2", "ro": true, "drv": "qcow2", "encrypted": false,
                         "backing_file": "/b.raw", "bps": 1, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0,
                         "iops_wr": 0}}]);
        assert_eq!(
            info_block(&list, None),
            "virtio0: /i.qcow2 (qcow2, read-only)\n    I/O status:       nospace\n    Backing file:     /b.raw\n    \
             I/O throttling:   bps=1 bps_rd=0 bps_wr=0 iops=0 iops_rd=0 iops_wr=0\n"
        );
        assert_eq!(
            info_block(&json!([{"device": "d", "removable": true, "locked": false}]), None),
            "d: [not inserted]\n    Removable device: not locked, tray closed\n"
        );
    }

    #[test]
    fn blockstats_line() {
        let list = json!([
            {"device": "virtio0", "stats": {"rd_bytes": 512, "wr_bytes": 1024, "rd_operations": 1,
             "wr_operations": 2, "flush_operations": 3, "wr_total_time_ns": 4, "rd_total_time_ns": 5,
             "flush_total_time_ns": 6, "wr_highest_offset": 7}, "parent": {"stats": {}}},
            {"stats": {}}
        ]);
        assert_eq!(
            info_blockstats(&list),
            "virtio0: rd_bytes=512 wr_bytes=1024 rd_operations=1 wr_operations=2 flush_operations=3 \
             wr_total_time_ns=4 rd_total_time_ns=5 flush_total_time_ns=6 rd_merged=0 wr_merged=0 idle_time_ns=0\n"
        );
    }

    #[test]
    fn balloon_line() {
        assert_eq!(info_balloon(&json!({"actual": 268435456})), "balloon: actual=256\n");
        assert_eq!(
            info_balloon(&json!({"actual": 1 << 30, "free_mem": 5, "total_mem": 6, "mem_swapped_in": 0})),
            "balloon: actual=1024 mem_swapped_in=0 free_mem=5 total_mem=6\n"
        );
    }

    #[test]
    fn sizes_default_to_mib() {
        assert_eq!(parse_size_mib(b"128"), Some((128 << 20, 3)));
        assert_eq!(parse_size_mib(b"128M"), Some((128 << 20, 4)));
        assert_eq!(parse_size_mib(b"1G rest"), Some((1 << 30, 2)));
        assert_eq!(parse_size_mib(b"4096b"), Some((4096, 5)));
        assert_eq!(parse_size_mib(b"1.5k"), Some((1536, 4)));
        assert_eq!(parse_size_mib(b"0x10K"), Some((16 << 10, 5)));
        assert_eq!(parse_size_mib(b"-1"), None);
        assert_eq!(parse_size_mib(b"abc"), None);
        assert_eq!(parse_size_mib(b"9E"), None);
        assert_eq!(parse_size_mib(b""), None);
    }
}
