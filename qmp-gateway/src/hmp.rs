//! `human-monitor-command`: the HMP subset, run over the VM's QMP commands, printing what QEMU
//! 7.2's HMP prints (`hmp-cmds.c`, `monitor/hmp.c`), with `\r\n` line ends as its monitor
//! writes them.
//!
//! Commands: `info version|name|uuid|status|kvm|cpus|pci|chardev|mice|balloon|block|blockstats|network`
//! (and `info` alone, the list), `stop`/`s`, `cont`/`c`, `system_reset`, `system_powerdown`,
//! `quit`/`q`, `nmi`, `memsave addr size file`, `pmemsave addr size file`, `balloon MiB`,
//! `block_resize device size` (size in MiB unless suffixed, as QEMU), `set_link name on|off`, and
//! `help`/`?` for these. `info network` is `hmp_net.rs`'s.
//! The device commands' output lives in `hmp_devices.rs`. Numbers are
//! HMP expressions (`0x1000`, `4*1024`, `-8`, arithmetic with `+ - * / % & | ^ ~` and
//! parentheses); as in QEMU, an unquoted `/path` after a number reads as a division, so quote
//! file names.
//! Anything else is `unknown command: '...'`, which is output, not a QMP error.
//! A failing command prints `Error: <desc>`, as `hmp_handle_error()` does.

use std::future::Future;

use flotilla_schema::check::QmpError;
use serde_json::{json, Value};

use crate::qerror;
use crate::{hmp_devices, hmp_net};

/// Running QMP commands for HMP.
pub trait Qmp: Sync {
    fn qmp(&self, name: &str, args: Value) -> impl Future<Output = Result<Value, QmpError>> + Send;
    /// The VM's NICs for `info network` (no QMP command of 1.1 lists them).
    fn nics(&self) -> &[hmp_net::Nic] {
        &[]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Balloon,
    BlockResize,
    Help,
    Info,
    Stop,
    Cont,
    Quit,
    SystemReset,
    SystemPowerdown,
    Nmi,
    Memsave,
    Pmemsave,
    SetLink,
}

/// Top-level commands: names (`|`-separated aliases), QEMU's `args_type`, `params` and help
/// text, sorted as QEMU sorts its table.
const COMMANDS: &[(&str, &str, Cmd, &str, &str)] = &[
    ("balloon", "value:M", Cmd::Balloon, "target", "request VM to change its memory allocation (in MB)"),
    ("block_resize", "device:B,size:o", Cmd::BlockResize, "device size", "resize a block image"),
    ("cont|c", "", Cmd::Cont, "", "resume emulation"),
    ("help|?", "name:S?", Cmd::Help, "[cmd]", "show the help"),
    ("info", "item:s?", Cmd::Info, "[subcommand]", "show various information about the system state"),
    (
        "memsave",
        "val:l,size:i,filename:s",
        Cmd::Memsave,
        "addr size file",
        "save to disk virtual memory dump starting at 'addr' of size 'size'",
    ),
    ("nmi", "", Cmd::Nmi, "", "inject an NMI"),
    (
        "pmemsave",
        "val:l,size:i,filename:s",
        Cmd::Pmemsave,
        "addr size file",
        "save to disk physical memory dump starting at 'addr' of size 'size'",
    ),
    ("q|quit", "", Cmd::Quit, "", "quit the emulator"),
    ("set_link", "name:s,up:b", Cmd::SetLink, "name on|off", "change the link status of a network adapter"),
    ("stop|s", "", Cmd::Stop, "", "stop emulation"),
    ("system_powerdown", "", Cmd::SystemPowerdown, "", "send system power down event"),
    ("system_reset", "", Cmd::SystemReset, "", "reset the system"),
];

/// `info` subcommands with their help texts, sorted as QEMU sorts its tables.
const INFO: &[(&str, &str)] = &[
    ("balloon", "show balloon information"),
    ("block", "show info of one block device or all block devices"),
    ("blockstats", "show block device statistics"),
    ("chardev", "show the character devices"),
    ("cpus", "show infos for each CPU"),
    ("kvm", "show KVM information"),
    ("mice", "show which guest mouse is receiving events"),
    ("name", "show the current VM name"),
    ("network", "show the network state"),
    ("pci", "show PCI info"),
    ("status", "show the current VM status (running|paused)"),
    ("uuid", "show the current VM UUID"),
    ("version", "show the version of QEMU"),
];

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

fn skip_spaces(s: &[u8], mut p: usize) -> usize {
    while p < s.len() && is_space(s[p]) {
        p += 1;
    }
    p
}

/// QEMU's `get_command_name()`: (name start, name end), or `None` for an empty line.
fn command_name(s: &[u8], p: usize) -> Option<(usize, usize)> {
    let start = skip_spaces(s, p);
    if start == s.len() {
        return None;
    }
    let mut end = start;
    while end < s.len() && s[end] != b'/' && !is_space(s[end]) {
        end += 1;
    }
    Some((start, end))
}

fn matches_name(names: &str, name: &str) -> bool {
    names.split('|').any(|n| n == name)
}

/// QEMU's HMP expression evaluator (`get_expr()`), without registers.
struct Expr<'a> {
    s: &'a [u8],
    p: usize,
}

impl Expr<'_> {
    fn peek(&self) -> u8 {
        self.s.get(self.p).copied().unwrap_or(0)
    }

    fn next(&mut self) {
        if self.p < self.s.len() {
            self.p += 1;
            self.p = skip_spaces(self.s, self.p);
        }
    }

    fn sum(&mut self) -> Result<i64, String> {
        let mut v = self.logic()?;
        loop {
            let op = self.peek();
            if op != b'+' && op != b'-' {
                return Ok(v);
            }
            self.next();
            let v2 = self.logic()?;
            v = if op == b'+' { v.wrapping_add(v2) } else { v.wrapping_sub(v2) };
        }
    }

    fn logic(&mut self) -> Result<i64, String> {
        let mut v = self.prod()?;
        loop {
            let op = self.peek();
            if !matches!(op, b'&' | b'|' | b'^') {
                return Ok(v);
            }
            self.next();
            let v2 = self.prod()?;
            v = match op {
                b'&' => v & v2,
                b'|' => v | v2,
                _ => v ^ v2,
            };
        }
    }

    fn prod(&mut self) -> Result<i64, String> {
        let mut v = self.unary()?;
        loop {
            let op = self.peek();
            if !matches!(op, b'*' | b'/' | b'%') {
                return Ok(v);
            }
            self.next();
            let v2 = self.unary()?;
            v = match op {
                b'*' => v.wrapping_mul(v2),
                _ if v2 == 0 => return Err("division by zero".into()),
                b'/' => v.wrapping_div(v2),
                _ => v.wrapping_rem(v2),
            };
        }
    }

    fn unary(&mut self) -> Result<i64, String> {
        match self.peek() {
            b'+' => {
                self.next();
                self.unary()
            }
            b'-' => {
                self.next();
                Ok(self.unary()?.wrapping_neg())
            }
            b'~' => {
                self.next();
                Ok(!self.unary()?)
            }
            b'(' => {
                self.next();
                let v = self.sum()?;
                if self.peek() != b')' {
                    return Err("')' expected".into());
                }
                self.next();
                Ok(v)
            }
            b'\'' => {
                self.p += 1;
                if self.p >= self.s.len() {
                    return Err("character constant expected".into());
                }
                let v = self.s[self.p] as i64;
                self.p += 1;
                if self.peek() != b'\'' {
                    return Err("missing terminating ' character".into());
                }
                self.next();
                Ok(v)
            }
            b'$' => Err("unknown register".into()),
            0 if self.p >= self.s.len() => Err("unexpected end of expression".into()),
            c => {
                let (v, len) = strtoull(&self.s[self.p..])?;
                if len == 0 {
                    return Err(format!("invalid char '{}' in expression", c as char));
                }
                self.p = skip_spaces(self.s, self.p + len);
                Ok(v as i64)
            }
        }
    }
}

/// `strtoull(s, &end, 0)` on a string that starts with no sign or space: (value, bytes used).
fn strtoull(s: &[u8]) -> Result<(u64, usize), String> {
    let (radix, start) = if s.len() > 2 && s[0] == b'0' && (s[1] | 0x20) == b'x' && s[2].is_ascii_hexdigit() {
        (16, 2)
    } else if s.first() == Some(&b'0') {
        (8, 0)
    } else {
        (10, 0)
    };
    let digits = s[start..].iter().take_while(|c| (**c as char).is_digit(radix)).count();
    if digits == 0 {
        return Ok((0, 0));
    }
    let text = std::str::from_utf8(&s[start..start + digits]).expect("digits are ASCII");
    let v = u64::from_str_radix(text, radix).map_err(|_| "number too large".to_string())?;
    Ok((v, start + digits))
}

/// QEMU's `get_str()`: a bare word or a double-quoted string with `\n \r \\ \' \"` escapes.
fn get_str(s: &[u8], p: &mut usize) -> Option<String> {
    let mut i = skip_spaces(s, *p);
    let mut out = Vec::new();
    if i == s.len() {
        *p = i;
        return None;
    }
    if s[i] == b'"' {
        i += 1;
        while i < s.len() && s[i] != b'"' {
            if s[i] == b'\\' {
                let c = *s.get(i + 1)?;
                out.push(match c {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b'\\' | b'\'' | b'"' => c,
                    _ => return None,
                });
                i += 2;
            } else {
                out.push(s[i]);
                i += 1;
            }
        }
        if i >= s.len() {
            return None; // unterminated string
        }
        i += 1;
    } else {
        while i < s.len() && !is_space(s[i]) {
            out.push(s[i]);
            i += 1;
        }
    }
    *p = i;
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// A parsed argument.
enum Arg {
    Int(i64),
    Str(String),
}

/// QEMU's `monitor_parse_arguments()` for the types used here (`l`, `i`, `s`); the error text
/// is what QEMU prints before "Try \"help ...\"".
fn parse_args(cmd_name: &str, args_type: &str, s: &[u8], p: &mut usize) -> Result<Vec<Arg>, String> {
    let mut out = Vec::new();
    for spec in args_type.split(',').filter(|a| !a.is_empty()) {
        let (_, ty) = spec.split_once(':').expect("args_type is name:type");
        match ty {
            "l" | "i" | "M" => {
                let mut e = Expr { s, p: skip_spaces(s, *p) };
                let v = e.sum().map_err(|m| format!("{m}\n"))?;
                *p = e.p;
                if ty == "i" && ((v >> 32) & 0xffff_ffff) != 0 {
                    return Err(format!("'{cmd_name}' has failed: integer is for 32-bit values\n"));
                }
                if ty == "M" {
                    if v < 0 {
                        return Err("enter a positive value\n".to_string());
                    }
                    out.push(Arg::Int(v.wrapping_mul(1 << 20)));
                } else {
                    out.push(Arg::Int(v));
                }
            }
            "o" => {
                let start = skip_spaces(s, *p);
                let Some((v, used)) = hmp_devices::parse_size_mib(&s[start..]) else {
                    return Err("invalid size\n".to_string());
                };
                *p = start + used;
                out.push(Arg::Int(v as i64));
            }
            "B?" if skip_spaces(s, *p) == s.len() => {}
            "b" => {
                // QEMU's 'b': exactly `on` or `off`.
                let start = skip_spaces(s, *p);
                let mut end = start;
                while end < s.len() && s[end].is_ascii_graphic() {
                    end += 1;
                }
                *p = end;
                match &s[start..end] {
                    b"on" => out.push(Arg::Int(1)),
                    b"off" => out.push(Arg::Int(0)),
                    _ => return Err("Expected 'on' or 'off'\n".to_string()),
                }
            }
            "s" | "B" | "B?" => match get_str(s, p) {
                Some(v) => out.push(Arg::Str(v)),
                None if ty == "s" => return Err(format!("{cmd_name}: string expected\n")),
                None => return Err(format!("{cmd_name}: block device name expected\n")),
            },
            other => unreachable!("args type {other} is not used"),
        }
    }
    if skip_spaces(s, *p) != s.len() {
        return Err(format!("{cmd_name}: extraneous characters at the end of line\n"));
    }
    Ok(out)
}

/// Runs one HMP command line; the output uses `\r\n` line ends.
pub async fn run<Q: Qmp>(q: &Q, line: &str, cpu_index: Option<i64>) -> Result<String, QmpError> {
    if let Some(cpu) = cpu_index {
        let cpus = q.qmp("query-cpus", json!({})).await?;
        let known = cpus.as_array().is_some_and(|l| l.iter().any(|c| c["CPU"].as_i64() == Some(cpu)));
        if !known {
            return Err(qerror::invalid_parameter_expects("cpu-index", "a CPU number"));
        }
    }
    let out = run_line(q, line, cpu_index.unwrap_or(0)).await;
    Ok(out.replace('\n', "\r\n"))
}

async fn run_line<Q: Qmp>(q: &Q, line: &str, cpu: i64) -> String {
    let s = line.as_bytes();
    let Some((start, end)) = command_name(s, 0) else { return String::new() };
    let name = &line[start..end];
    let Some(&(names, args_type, cmd, _, _)) = COMMANDS.iter().find(|c| matches_name(c.0, name)) else {
        return format!("unknown command: '{}'\n", &line[..end]);
    };
    let mut p = skip_spaces(s, end);
    let try_help = |upto: usize| format!("Try \"help {}\" for more information\n", line[..upto].trim_end());
    if cmd == Cmd::Help {
        return help(&line[p..]);
    }
    if cmd == Cmd::Info {
        if p == s.len() {
            return help("info");
        }
        let Some((sub_start, sub_end)) = command_name(s, p) else { return String::new() };
        let sub = &line[sub_start..sub_end];
        let Some((sub, _)) = INFO.iter().find(|(n, _)| *n == sub) else {
            return format!("unknown command: '{}'\n", &line[..sub_end]);
        };
        p = skip_spaces(s, sub_end);
        let after_name = p;
        let args_type = if *sub == "block" { "device:B?" } else { "" };
        let args = match parse_args(sub, args_type, s, &mut p) {
            Ok(a) => a,
            Err(msg) => return format!("{msg}{}", try_help(after_name)),
        };
        let device = match args.first() {
            Some(Arg::Str(d)) => Some(d.as_str()),
            _ => None,
        };
        return info(q, sub, cpu, device).await;
    }
    let after_name = p;
    let args = match parse_args(names, args_type, s, &mut p) {
        Ok(a) => a,
        Err(msg) => return format!("{msg}{}", try_help(after_name)),
    };
    let result = match (cmd, &args[..]) {
        (Cmd::Stop, _) => q.qmp("stop", json!({})).await,
        (Cmd::Cont, _) => q.qmp("cont", json!({})).await,
        (Cmd::Quit, _) => q.qmp("quit", json!({})).await,
        (Cmd::SystemReset, _) => q.qmp("system_reset", json!({})).await,
        (Cmd::SystemPowerdown, _) => q.qmp("system_powerdown", json!({})).await,
        (Cmd::Nmi, _) => q.qmp("inject-nmi", json!({})).await,
        (Cmd::Memsave, [Arg::Int(val), Arg::Int(size), Arg::Str(file)]) => {
            q.qmp("memsave", json!({"val": val, "size": size, "filename": file, "cpu-index": cpu})).await
        }
        (Cmd::Pmemsave, [Arg::Int(val), Arg::Int(size), Arg::Str(file)]) => {
            q.qmp("pmemsave", json!({"val": val, "size": size, "filename": file})).await
        }
        (Cmd::Balloon, [Arg::Int(value)]) => q.qmp("balloon", json!({"value": value})).await,
        (Cmd::SetLink, [Arg::Str(name), Arg::Int(up)]) => {
            q.qmp("set_link", json!({"name": name, "up": *up != 0})).await
        }
        (Cmd::BlockResize, [Arg::Str(device), Arg::Int(size)]) => {
            q.qmp("block_resize", json!({"device": device, "size": size})).await
        }
        _ => unreachable!("arguments parsed per args_type"),
    };
    match result {
        Ok(_) => String::new(),
        Err(e) => format!("Error: {}\n", e.desc),
    }
}

/// `help [cmd]` (QEMU's `help_cmd()`): every command, or the one named, as
/// `name params -- help`; `help info` lists the info subcommands.
fn help(args: &str) -> String {
    let words: Vec<&str> = args.split_whitespace().collect();
    let line = |name: &str, params: &str, text: &str| format!("{name} {params} -- {text}\n");
    match words.as_slice() {
        [] => COMMANDS.iter().map(|c| line(c.0, c.3, c.4)).collect(),
        ["info", rest @ ..] => INFO
            .iter()
            .filter(|(n, _)| rest.first().is_none_or(|r| r == n))
            .map(|(n, text)| line(&format!("info {n}"), "", text))
            .collect(),
        [name, ..] => COMMANDS.iter().filter(|c| matches_name(c.0, name)).map(|c| line(c.0, c.3, c.4)).collect(),
    }
}

async fn info<Q: Qmp>(q: &Q, sub: &str, cpu: i64, device: Option<&str>) -> String {
    if sub == "network" {
        return hmp_net::info_network(q.nics());
    }
    let command = match sub {
        "balloon" => "query-balloon",
        "block" => "query-block",
        "blockstats" => "query-blockstats",
        "version" => "query-version",
        "name" => "query-name",
        "uuid" => "query-uuid",
        "status" => "query-status",
        "kvm" => "query-kvm",
        "cpus" => "query-cpus",
        "pci" => "query-pci",
        "chardev" => "query-chardev",
        "mice" => "query-mice",
        _ => unreachable!("INFO lists only these"),
    };
    match q.qmp(command, json!({})).await {
        Ok(v) if sub == "block" => hmp_devices::info_block(&v, device),
        Ok(v) => format_info(sub, &v, cpu),
        Err(e) => format!("Error: {}\n", e.desc),
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_default()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The output of `info <sub>` for the QMP answer `v`.
fn format_info(sub: &str, v: &Value, cpu: i64) -> String {
    let empty = Vec::new();
    let list = |v: &Value| v.as_array().unwrap_or(&empty).clone();
    match sub {
        "balloon" => hmp_devices::info_balloon(v),
        "blockstats" => hmp_devices::info_blockstats(v),
        "version" => {
            let q = &v["qemu"];
            format!("{}.{}.{}{}\n", int(&q["major"]), int(&q["minor"]), int(&q["micro"]), text(&v["package"]))
        }
        "name" => v.get("name").map(|n| format!("{}\n", text(n))).unwrap_or_default(),
        "uuid" => format!("{}\n", text(&v["UUID"])),
        "status" => {
            let running = v["running"].as_bool().unwrap_or_default();
            let mut s = format!(
                "VM status: {}{}",
                if running { "running" } else { "paused" },
                if v["singlestep"].as_bool().unwrap_or_default() { " (single step mode)" } else { "" }
            );
            let status = text(&v["status"]);
            if !running && status != "paused" {
                s.push_str(&format!(" ({status})"));
            }
            s.push('\n');
            s
        }
        "kvm" => {
            let state = if !v["present"].as_bool().unwrap_or_default() {
                "not compiled"
            } else if v["enabled"].as_bool().unwrap_or_default() {
                "enabled"
            } else {
                "disabled"
            };
            format!("kvm support: {state}\n")
        }
        "cpus" => list(v)
            .iter()
            .map(|c| {
                let index = int(&c["CPU"]);
                format!("{} CPU #{index}: thread_id={}\n", if index == cpu { '*' } else { ' ' }, int(&c["thread_id"]))
            })
            .collect(),
        "chardev" => {
            list(v).iter().map(|c| format!("{}: filename={}\n", text(&c["label"]), text(&c["filename"]))).collect()
        }
        "mice" => {
            let mice = list(v);
            if mice.is_empty() {
                return "No mouse devices connected\n".to_string();
            }
            mice.iter()
                .map(|m| {
                    format!(
                        "{} Mouse #{}: {}{}\n",
                        if m["current"].as_bool().unwrap_or_default() { '*' } else { ' ' },
                        int(&m["index"]),
                        text(&m["name"]),
                        if m["absolute"].as_bool().unwrap_or_default() { " (absolute)" } else { "" }
                    )
                })
                .collect()
        }
        "pci" => {
            let mut s = String::new();
            for bus in list(v) {
                for dev in list(&bus["devices"]) {
                    pci_device(&mut s, &dev);
                }
            }
            s
        }
        _ => unreachable!("INFO lists only these"),
    }
}

/// `hmp_info_pci_device()`; the IRQ line is QEMU 1.1's (its PciDeviceInfo has no pin).
fn pci_device(s: &mut String, dev: &Value) {
    use std::fmt::Write as _;
    let _ = writeln!(
        s,
        "  Bus {:2}, device {:3}, function {}:",
        int(&dev["bus"]),
        int(&dev["slot"]),
        int(&dev["function"])
    );
    s.push_str("    ");
    match dev["class_info"].get("desc").and_then(Value::as_str) {
        Some(d) => s.push_str(d),
        None => {
            let _ = write!(s, "Class {:04}", int(&dev["class_info"]["class"]));
        }
    }
    let _ = writeln!(s, ": PCI device {:04x}:{:04x}", int(&dev["id"]["vendor"]), int(&dev["id"]["device"]));
    if let Some(irq) = dev.get("irq") {
        let _ = writeln!(s, "      IRQ {}.", int(irq));
    }
    if let Some(bridge) = dev.get("pci_bridge") {
        let b = &bridge["bus"];
        let _ = writeln!(s, "      BUS {}.", int(&b["number"]));
        let _ = writeln!(s, "      secondary bus {}.", int(&b["secondary"]));
        let _ = writeln!(s, "      subordinate bus {}.", int(&b["subordinate"]));
        let _ = writeln!(
            s,
            "      IO range [0x{:04x}, 0x{:04x}]",
            int(&b["io_range"]["base"]),
            int(&b["io_range"]["limit"])
        );
        let _ = writeln!(
            s,
            "      memory range [0x{:08x}, 0x{:08x}]",
            int(&b["memory_range"]["base"]),
            int(&b["memory_range"]["limit"])
        );
        let _ = writeln!(
            s,
            "      prefetchable memory range [0x{:08x}, 0x{:08x}]",
            int(&b["prefetchable_range"]["base"]),
            int(&b["prefetchable_range"]["limit"])
        );
    }
    for r in dev["regions"].as_array().into_iter().flatten() {
        let (addr, size) = (int(&r["address"]) as u64, int(&r["size"]) as u64);
        let end = addr.wrapping_add(size).wrapping_sub(1);
        let _ = write!(s, "      BAR{}: ", int(&r["bar"]));
        if text(&r["type"]) == "io" {
            let _ = writeln!(s, "I/O at 0x{addr:04x} [0x{end:04x}].");
        } else {
            let _ = writeln!(
                s,
                "{} bit{} memory at 0x{addr:08x} [0x{end:08x}].",
                if r["mem_type_64"].as_bool().unwrap_or_default() { 64 } else { 32 },
                if r["prefetch"].as_bool().unwrap_or_default() { " prefetchable" } else { "" }
            );
        }
    }
    let _ = writeln!(s, "      id \"{}\"", text(&dev["qdev_id"]));
    if let Some(devices) = dev.get("pci_bridge").and_then(|b| b.get("devices")).and_then(Value::as_array) {
        for d in devices {
            pci_device(s, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Answers from a table and records what was run.
    struct Fake {
        calls: Mutex<Vec<(String, Value)>>,
        fail: Option<&'static str>,
    }

    impl Qmp for Fake {
        async fn qmp(&self, name: &str, args: Value) -> Result<Value, QmpError> {
            self.calls.lock().unwrap().push((name.to_string(), args));
            if self.fail == Some(name) {
                return Err(qerror::generic("Invalid addr 0x0000000000000000/size 4096 specified"));
            }
            Ok(match name {
                "query-version" => json!({"qemu": {"major": 1, "minor": 1, "micro": 0}, "package": "flotilla-0.1.0"}),
                "query-name" => json!({"name": "lab-guest"}),
                "query-uuid" => json!({"UUID": "6b2f4c3e-8d1a-4c7b-9f10-2a3b4c5d6e7f"}),
                "query-status" => json!({"running": false, "singlestep": false, "status": "internal-error"}),
                "query-kvm" => json!({"enabled": true, "present": true}),
                "query-cpus" => json!([
                    {"CPU": 0, "current": true, "halted": false, "thread_id": 101},
                    {"CPU": 1, "current": false, "halted": true, "thread_id": 102}
                ]),
                "query-chardev" => json!([{"label": "serial0", "filename": "stdio"},
                                          {"label": "compat_monitor0", "filename": "unix:/q.sock,server=on"}]),
                "query-mice" => json!([]),
                "query-pci" => json!([{"bus": 0, "devices": [
                    {"bus": 0, "slot": 0, "function": 0, "class_info": {"class": 1536, "desc": "Host bridge"},
                     "id": {"device": 10688, "vendor": 32902}, "qdev_id": "", "regions": []},
                    {"bus": 0, "slot": 1, "function": 0, "class_info": {"class": 256},
                     "id": {"device": 4097, "vendor": 6900}, "irq": 10, "qdev_id": "vblk0",
                     "regions": [{"bar": 0, "type": "io", "address": 49152, "size": 128},
                                 {"bar": 4, "type": "memory", "address": 4261412864u64, "size": 16384,
                                  "prefetch": true, "mem_type_64": true}]}]}]),
                _ => json!({}),
            })
        }
    }

    fn fake() -> Fake {
        Fake { calls: Mutex::new(Vec::new()), fail: None }
    }

    fn hmp(line: &str) -> String {
        hmp_with(&fake(), line, None)
    }

    fn hmp_with(f: &Fake, line: &str, cpu: Option<i64>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(run(f, line, cpu)).unwrap()
    }

    #[test]
    fn info_outputs() {
        // shared/qemu-7.2-qmp/human-monitor-command.txt: "7.2.22Debian ...\r\n"
        assert_eq!(hmp("info version"), "1.1.0flotilla-0.1.0\r\n");
        assert_eq!(hmp("info name"), "lab-guest\r\n");
        assert_eq!(hmp("info uuid"), "6b2f4c3e-8d1a-4c7b-9f10-2a3b4c5d6e7f\r\n");
        assert_eq!(hmp("info status"), "VM status: paused (internal-error)\r\n");
        assert_eq!(hmp("info kvm"), "kvm support: enabled\r\n");
        assert_eq!(hmp("info cpus"), "* CPU #0: thread_id=101\r\n  CPU #1: thread_id=102\r\n");
        assert_eq!(hmp_with(&fake(), "info cpus", Some(1)), "  CPU #0: thread_id=101\r\n* CPU #1: thread_id=102\r\n");
        assert_eq!(
            hmp("info chardev"),
            "serial0: filename=stdio\r\ncompat_monitor0: filename=unix:/q.sock,server=on\r\n"
        );
        assert_eq!(hmp("info mice"), "No mouse devices connected\r\n");
        assert_eq!(
            hmp("info pci"),
            "  Bus  0, device   0, function 0:\r\n    Host bridge: PCI device 8086:29c0\r\n      id \"\"\r\n\
             \x20 Bus  0, device   1, function 0:\r\n    Class 0256: PCI device 1af4:1001\r\n      IRQ 10.\r\n\
             \x20     BAR0: I/O at 0xc000 [0xc07f].\r\n\
             \x20     BAR4: 64 bit prefetchable memory at 0xfe000000 [0xfe003fff].\r\n      id \"vblk0\"\r\n"
        );
        assert!(hmp("info").starts_with(
            "info balloon  -- show balloon information\r\ninfo block  -- show info of one block device or all block \
             devices\r\ninfo blockstats  -- show block device statistics\r\ninfo chardev  -- "
        ));
        assert_eq!(hmp("info").matches("\r\n").count(), INFO.len());
    }

    #[test]
    fn help_lists_the_subset() {
        let all = hmp("help");
        assert!(
            all.starts_with(
                "balloon target -- request VM to change its memory allocation (in MB)\r\nblock_resize device size \
                 -- resize a block image\r\ncont|c  -- resume emulation\r\nhelp|? [cmd] -- show the help\r\n"
            ),
            "{all}"
        );
        assert_eq!(all.matches("\r\n").count(), COMMANDS.len());
        assert_eq!(hmp("? stop"), "stop|s  -- stop emulation\r\n");
        assert_eq!(hmp("help info kvm"), "info kvm  -- show KVM information\r\n");
        assert_eq!(hmp("help info"), hmp("info"));
        assert_eq!(hmp("help nosuch"), "");
    }

    #[test]
    fn status_texts() {
        let fmt = |v: Value| format_info("status", &v, 0);
        assert_eq!(fmt(json!({"running": true, "singlestep": false, "status": "running"})), "VM status: running\n");
        assert_eq!(fmt(json!({"running": false, "singlestep": false, "status": "paused"})), "VM status: paused\n");
        assert_eq!(
            fmt(json!({"running": false, "singlestep": false, "status": "shutdown"})),
            "VM status: paused (shutdown)\n"
        );
        let mice = json!([{"index": 2, "name": "QEMU PS/2 Mouse", "current": false, "absolute": false},
                          {"index": 3, "name": "QEMU Virtio Tablet", "current": true, "absolute": true}]);
        assert_eq!(
            format_info("mice", &mice, 0),
            "  Mouse #2: QEMU PS/2 Mouse\n* Mouse #3: QEMU Virtio Tablet (absolute)\n"
        );
        assert_eq!(format_info("name", &json!({}), 0), "");
        assert_eq!(format_info("kvm", &json!({"enabled": false, "present": false}), 0), "kvm support: not compiled\n");
    }

    #[test]
    fn unknown_and_malformed() {
        // errors/human-monitor-command-unknown.txt
        assert_eq!(hmp("nosuchhmp"), "unknown command: 'nosuchhmp'\r\n");
        assert_eq!(hmp("info nosuch"), "unknown command: 'info nosuch'\r\n");
        assert_eq!(hmp(""), "");
        assert_eq!(hmp("   "), "");
        // QEMU prints the table's name, aliases and all.
        assert_eq!(
            hmp("stop now"),
            "stop|s: extraneous characters at the end of line\r\nTry \"help stop\" for more information\r\n"
        );
        assert_eq!(
            hmp("info status x"),
            "status: extraneous characters at the end of line\r\nTry \"help info status\" for more information\r\n"
        );
        assert_eq!(hmp("memsave"), "unexpected end of expression\r\nTry \"help memsave\" for more information\r\n");
        assert_eq!(hmp("memsave 0 16"), "memsave: string expected\r\nTry \"help memsave\" for more information\r\n");
        assert_eq!(
            hmp("memsave 0 0x100000000 \"/f\""),
            "'memsave' has failed: integer is for 32-bit values\r\nTry \"help memsave\" for more information\r\n"
        );
        assert_eq!(
            hmp("pmemsave x 1 f"),
            "invalid char 'x' in expression\r\nTry \"help pmemsave\" for more information\r\n"
        );
        assert_eq!(hmp("pmemsave 1/0 1 f"), "division by zero\r\nTry \"help pmemsave\" for more information\r\n");
        assert_eq!(hmp("pmemsave $pc 1 f"), "unknown register\r\nTry \"help pmemsave\" for more information\r\n");
    }

    #[test]
    fn commands_run_their_qmp_commands() {
        let f = fake();
        for (line, cmd) in [
            ("stop", "stop"),
            ("s", "stop"),
            ("cont", "cont"),
            ("c", "cont"),
            ("system_reset", "system_reset"),
            ("system_powerdown", "system_powerdown"),
            ("nmi", "inject-nmi"),
            ("quit", "quit"),
            ("q", "quit"),
        ] {
            assert_eq!(hmp_with(&f, line, None), "");
            assert_eq!(f.calls.lock().unwrap().pop().unwrap().0, cmd, "{line}");
        }
        assert_eq!(hmp_with(&f, "memsave 0x1000 4*1024 \"/tmp/a b\"", Some(1)), "");
        let calls = f.calls.lock().unwrap().clone();
        assert_eq!(calls[calls.len() - 2].0, "query-cpus", "cpu-index is checked");
        assert_eq!(
            calls.last().unwrap(),
            &("memsave".to_string(), json!({"val": 4096, "size": 4096, "filename": "/tmp/a b", "cpu-index": 1}))
        );
        assert_eq!(hmp_with(&f, "pmemsave -(2+2) 010 x.bin", None), "");
        assert_eq!(
            f.calls.lock().unwrap().last().unwrap(),
            &("pmemsave".to_string(), json!({"val": -4, "size": 8, "filename": "x.bin"}))
        );
        // As in QEMU, an unquoted absolute path after a number is a division.
        assert_eq!(
            hmp_with(&f, "pmemsave 0 8 /tmp/x", None),
            "invalid char 't' in expression\r\nTry \"help pmemsave\" for more information\r\n"
        );
    }

    #[test]
    fn device_commands() {
        let f = fake();
        let last = |f: &Fake| f.calls.lock().unwrap().last().unwrap().clone();
        assert_eq!(hmp_with(&f, "balloon 512", None), "");
        assert_eq!(last(&f), ("balloon".to_string(), json!({"value": 512u64 << 20})));
        assert_eq!(hmp_with(&f, "balloon 2*64", None), "");
        assert_eq!(last(&f), ("balloon".to_string(), json!({"value": 128u64 << 20})));
        assert_eq!(hmp("balloon -1"), "enter a positive value\r\nTry \"help balloon\" for more information\r\n");
        // QEMU's 'o' type: MiB unless a suffix says otherwise.
        assert_eq!(hmp_with(&f, "block_resize virtio0 128", None), "");
        assert_eq!(last(&f), ("block_resize".to_string(), json!({"device": "virtio0", "size": 128u64 << 20})));
        assert_eq!(hmp_with(&f, "block_resize \"drive 1\" 1G", None), "");
        assert_eq!(last(&f), ("block_resize".to_string(), json!({"device": "drive 1", "size": 1u64 << 30})));
        assert_eq!(
            hmp("block_resize"),
            "block_resize: block device name expected\r\nTry \"help block_resize\" for more information\r\n"
        );
        assert_eq!(
            hmp("block_resize virtio0 lots"),
            "invalid size\r\nTry \"help block_resize\" for more information\r\n"
        );
        assert_eq!(hmp_with(&f, "info block", None), "");
        assert_eq!(last(&f).0, "query-block");
        assert_eq!(hmp_with(&f, "info block virtio0", None), "");
        assert_eq!(
            hmp("info block a b"),
            "block: extraneous characters at the end of line\r\nTry \"help info block\" for more information\r\n"
        );
        let nb = Fake { calls: Mutex::new(Vec::new()), fail: Some("query-balloon") };
        assert_eq!(
            hmp_with(&nb, "info balloon", None),
            "Error: Invalid addr 0x0000000000000000/size 4096 specified\r\n"
        );
    }

    #[test]
    fn set_link_and_info_network() {
        let f = Fake { calls: Mutex::new(Vec::new()), fail: Some("set_link") };
        let ok = fake();
        let last = |f: &Fake| f.calls.lock().unwrap().last().unwrap().clone();
        assert_eq!(hmp_with(&ok, "set_link nic0 off", None), "");
        assert_eq!(last(&ok), ("set_link".to_string(), json!({"name": "nic0", "up": false})));
        assert_eq!(hmp_with(&ok, "set_link \"net0\" on", None), "");
        assert_eq!(last(&ok), ("set_link".to_string(), json!({"name": "net0", "up": true})));
        // The daemon's error (DeviceNotFound for an unknown name) prints as HMP prints errors.
        assert_eq!(
            hmp_with(&f, "set_link nosuch on", None),
            "Error: Invalid addr 0x0000000000000000/size 4096 specified\r\n"
        );
        assert_eq!(
            hmp("set_link nic0 maybe"),
            "Expected 'on' or 'off'\r\nTry \"help set_link\" for more information\r\n"
        );
        assert_eq!(hmp("set_link nic0"), "Expected 'on' or 'off'\r\nTry \"help set_link\" for more information\r\n");
        assert_eq!(hmp("set_link"), "set_link: string expected\r\nTry \"help set_link\" for more information\r\n");
        assert_eq!(hmp("help set_link"), "set_link name on|off -- change the link status of a network adapter\r\n");
        // No NICs: nothing, as QEMU with none.
        assert_eq!(hmp("info network"), "");
        assert_eq!(hmp("help info network"), "info network  -- show the network state\r\n");
        struct WithNics(Fake, Vec<hmp_net::Nic>);
        impl Qmp for WithNics {
            async fn qmp(&self, name: &str, args: Value) -> Result<Value, QmpError> {
                self.0.qmp(name, args).await
            }
            fn nics(&self) -> &[hmp_net::Nic] {
                &self.1
            }
        }
        let nic = hmp_net::parse_nic(
            r#"{"name":"nic0","model":"virtio-net-pci","macaddr":"52:54:00:12:34:56","peer":{"name":"net0","type":"user","info":"net=10.0.2.0,restrict=on"}}"#,
        )
        .unwrap();
        let w = WithNics(fake(), vec![nic]);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(
            rt.block_on(run(&w, "info network", None)).unwrap(),
            "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ net0: index=0,type=user,net=10.0.2.0,restrict=on\r\n"
        );
    }

    #[test]
    fn errors_print_as_hmp_does() {
        let f = Fake { calls: Mutex::new(Vec::new()), fail: Some("memsave") };
        assert_eq!(
            hmp_with(&f, "memsave 0 4096 \"/x\"", None),
            "Error: Invalid addr 0x0000000000000000/size 4096 specified\r\n"
        );
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let e = rt.block_on(run(&fake(), "info cpus", Some(7))).unwrap_err();
        assert_eq!(
            (e.class.as_str(), e.desc.as_str()),
            ("InvalidParameterValue", "Parameter 'cpu-index' expects a CPU number")
        );
    }

    #[test]
    fn expressions() {
        let eval = |s: &str| {
            let mut e = Expr { s: s.as_bytes(), p: 0 };
            e.sum()
        };
        assert_eq!(eval("0x10 + 8"), Ok(24));
        assert_eq!(eval("010"), Ok(8));
        assert_eq!(eval("(1+2)*3"), Ok(9));
        assert_eq!(eval("~0"), Ok(-1));
        assert_eq!(eval("7 % 4 | 8"), Ok(11));
        assert_eq!(eval("'A'"), Ok(65));
        assert_eq!(eval("0xffffffffffffffff"), Ok(-1));
        assert_eq!(eval("99999999999999999999"), Err("number too large".into()));
        assert_eq!(eval("(1"), Err("')' expected".into()));
    }
}
