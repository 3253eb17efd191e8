//! `/proc/PID/smaps`: per-mapping memory figures, and which mapping is the guest's RAM.
//!
//! Guest RAM is touched lazily, so "RSS minus the `-m` size" would be meaningless (often
//! negative). Instead the bench subtracts the resident pages *of the guest-RAM mapping itself*
//! from the process's total, which leaves what the VMM costs on top of the guest.

use std::fmt;

/// The figures of one mapping (kB in smaps are KiB).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    /// The pathname column: a file, `[heap]`, `/memfd:NAME (deleted)`, ...; `None` when empty
    /// (an anonymous mapping).
    pub path: Option<String>,
    pub size_kib: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub anonymous_kib: u64,
    pub swap_kib: u64,
}

impl Mapping {
    pub fn is_anonymous(&self) -> bool {
        self.path.is_none()
    }

    pub fn describe(&self) -> String {
        format!(
            "{:x}-{:x} {} {} size={}KiB rss={}KiB",
            self.start,
            self.end,
            self.perms,
            self.path.as_deref().unwrap_or("(anonymous)"),
            self.size_kib,
            self.rss_kib
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub text: String,
    pub why: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "smaps line {}: {} ({:?})", self.line, self.why, self.text)
    }
}

/// Parses the whole text of an smaps file.
pub fn parse(text: &str) -> Result<Vec<Mapping>, ParseError> {
    let mut maps: Vec<Mapping> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |why| ParseError { line: i + 1, text: line.to_string(), why };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(m) = parse_header(line) {
            maps.push(m);
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            return Err(err("neither a mapping header nor a 'Key: value' line"));
        };
        let Some(cur) = maps.last_mut() else {
            return Err(err("a field before the first mapping header"));
        };
        let slot = match key {
            "Size" => &mut cur.size_kib,
            "Rss" => &mut cur.rss_kib,
            "Pss" => &mut cur.pss_kib,
            "Anonymous" => &mut cur.anonymous_kib,
            "Swap" => &mut cur.swap_kib,
            _ => continue, // VmFlags, THPeligible, the other kB fields
        };
        *slot = parse_kib(rest).ok_or_else(|| err("expected '<n> kB'"))?;
    }
    Ok(maps)
}

/// `start-end perms offset dev inode [path]`; `None` when `line` is not a header.
fn parse_header(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut word = || {
        let t = rest.trim_start();
        let end = t.find(char::is_whitespace).unwrap_or(t.len());
        let (w, r) = t.split_at(end);
        rest = r;
        (!w.is_empty()).then_some(w)
    };
    let (start, end) = word()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = word()?.to_string();
    let offset = word()?;
    let dev = word()?;
    let inode = word()?;
    if perms.len() != 4
        || u64::from_str_radix(offset, 16).is_err()
        || !dev.contains(':')
        || inode.parse::<u64>().is_err()
    {
        return None;
    }
    let path = rest.trim();
    Some(Mapping { start, end, perms, path: (!path.is_empty()).then(|| path.to_string()), ..Default::default() })
}

fn parse_kib(s: &str) -> Option<u64> {
    let mut w = s.split_whitespace();
    let n = w.next()?.parse().ok()?;
    match (w.next(), w.next()) {
        (Some("kB"), None) => Some(n),
        _ => None,
    }
}

/// Sums of the figures the report uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size_kib: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub anonymous_kib: u64,
    pub swap_kib: u64,
}

impl Usage {
    pub fn add(&mut self, m: &Mapping) {
        self.size_kib += m.size_kib;
        self.rss_kib += m.rss_kib;
        self.pss_kib += m.pss_kib;
        self.anonymous_kib += m.anonymous_kib;
        self.swap_kib += m.swap_kib;
    }

    pub fn plus(self, o: Usage) -> Usage {
        Usage {
            size_kib: self.size_kib + o.size_kib,
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
            anonymous_kib: self.anonymous_kib + o.anonymous_kib,
            swap_kib: self.swap_kib + o.swap_kib,
        }
    }

    pub fn minus(self, o: Usage) -> Usage {
        Usage {
            size_kib: self.size_kib.saturating_sub(o.size_kib),
            rss_kib: self.rss_kib.saturating_sub(o.rss_kib),
            pss_kib: self.pss_kib.saturating_sub(o.pss_kib),
            anonymous_kib: self.anonymous_kib.saturating_sub(o.anonymous_kib),
            swap_kib: self.swap_kib.saturating_sub(o.swap_kib),
        }
    }
}

pub fn total(maps: &[Mapping]) -> Usage {
    let mut u = Usage::default();
    maps.iter().for_each(|m| u.add(m));
    u
}

/// How the guest-RAM mapping is recognised in a VMM's address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRamRule {
    /// Flotilla: every mapping of the named memfd, e.g. `/memfd:flotilla-guest-ram (deleted)`.
    Memfd(String),
    /// QEMU (`-m` without a memory backend): the one anonymous, read-write mapping whose size is
    /// exactly the guest RAM size; failing that, the one closest above it within `slack_kib`
    /// (room for an alignment or guard page).
    AnonymousOfSize { ram_kib: u64, slack_kib: u64 },
}

impl GuestRamRule {
    pub fn describe(&self) -> String {
        match self {
            GuestRamRule::Memfd(name) => format!("every mapping whose path is '/memfd:{name} (deleted)'"),
            GuestRamRule::AnonymousOfSize { ram_kib, slack_kib } => format!(
                "the anonymous rw mapping of exactly {ram_kib} KiB (the -m size); else the one nearest above it \
                 within {slack_kib} KiB; more than one equally good candidate is an error"
            ),
        }
    }
}

/// The indices of the guest-RAM mappings in `maps` (possibly none: a process without guest RAM).
pub fn select_guest_ram(maps: &[Mapping], rule: &GuestRamRule) -> Result<Vec<usize>, String> {
    match rule {
        GuestRamRule::Memfd(name) => {
            let want = format!("/memfd:{name} (deleted)");
            let alive = format!("/memfd:{name}");
            Ok(maps
                .iter()
                .enumerate()
                .filter(|(_, m)| matches!(m.path.as_deref(), Some(p) if p == want || p == alive))
                .map(|(i, _)| i)
                .collect())
        }
        GuestRamRule::AnonymousOfSize { ram_kib, slack_kib } => {
            let cands: Vec<(usize, u64)> = maps
                .iter()
                .enumerate()
                .filter(|(_, m)| m.is_anonymous() && m.perms.starts_with("rw"))
                .filter(|(_, m)| m.size_kib >= *ram_kib && m.size_kib - ram_kib <= *slack_kib)
                .map(|(i, m)| (i, m.size_kib - ram_kib))
                .collect();
            let Some(best) = cands.iter().map(|c| c.1).min() else { return Ok(Vec::new()) };
            let at_best: Vec<usize> = cands.iter().filter(|c| c.1 == best).map(|c| c.0).collect();
            if at_best.len() > 1 {
                return Err(format!(
                    "{} anonymous mappings fit the guest RAM size equally well: {}",
                    at_best.len(),
                    at_best.iter().map(|i| maps[*i].describe()).collect::<Vec<_>>().join("; ")
                ));
            }
            Ok(at_best)
        }
    }
}

/// One process's memory, split into guest RAM and the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounting {
    pub total: Usage,
    pub guest_ram: Usage,
    /// The guest-RAM mappings found, for the report.
    pub guest_ram_mappings: Vec<String>,
}

impl Accounting {
    pub fn overhead(&self) -> Usage {
        self.total.minus(self.guest_ram)
    }
}

pub fn account(maps: &[Mapping], rule: &GuestRamRule) -> Result<Accounting, String> {
    let sel = select_guest_ram(maps, rule)?;
    let mut guest = Usage::default();
    for i in &sel {
        guest.add(&maps[*i]);
    }
    Ok(Accounting {
        total: total(maps),
        guest_ram: guest,
        guest_ram_mappings: sel.iter().map(|i| maps[*i].describe()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOTILLA: &str = "\
55d0c0a00000-55d0c0a40000 r--p 00000000 fe:00 1234                       /work/target/release/vmm-core
Size:                256 kB
KernelPageSize:        4 kB
Rss:                 256 kB
Pss:                 256 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd mr mw me dw sd
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  40 kB
Pss:                  40 kB
Anonymous:            40 kB
Swap:                  0 kB
THPeligible:    0
7f0000000000-7f0010000000 rw-s 00000000 00:01 2049                       /memfd:flotilla-guest-ram (deleted)
Size:             262144 kB
Rss:                2048 kB
Pss:                2048 kB
Anonymous:             0 kB
Swap:                  0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  12 kB
Pss:                  12 kB
Anonymous:            12 kB
Swap:                  0 kB
";

    fn anon(start: u64, size_kib: u64, perms: &str, rss: u64) -> Mapping {
        Mapping {
            start,
            end: start + size_kib * 1024,
            perms: perms.into(),
            path: None,
            size_kib,
            rss_kib: rss,
            pss_kib: rss,
            anonymous_kib: rss,
            swap_kib: 0,
        }
    }

    #[test]
    fn parses_headers_paths_and_fields() {
        let m = parse(FLOTILLA).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].start, 0x55d0c0a00000);
        assert_eq!(m[0].end, 0x55d0c0a40000);
        assert_eq!(m[0].path.as_deref(), Some("/work/target/release/vmm-core"));
        assert_eq!(m[1].path.as_deref(), Some("[heap]"));
        assert_eq!((m[1].size_kib, m[1].rss_kib, m[1].anonymous_kib), (132, 40, 40));
        assert_eq!(m[2].path.as_deref(), Some("/memfd:flotilla-guest-ram (deleted)"));
        assert_eq!(m[2].perms, "rw-s");
        assert_eq!(total(&m).rss_kib, 256 + 40 + 2048 + 12);
    }

    #[test]
    fn anonymous_mapping_has_no_path() {
        let m = parse("7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \nRss: 4 kB\n").unwrap();
        assert_eq!(m[0].path, None);
        assert!(m[0].is_anonymous());
        assert_eq!(m[0].rss_kib, 4);
    }

    #[test]
    fn path_with_spaces_is_kept_whole() {
        let m = parse("1000-2000 r--p 00000000 fe:00 7    /tmp/a b/c (deleted)\n").unwrap();
        assert_eq!(m[0].path.as_deref(), Some("/tmp/a b/c (deleted)"));
    }

    #[test]
    fn malformed_input_is_an_error_with_its_line() {
        let e = parse("1000-2000 r--p 00000000 fe:00 7 /x\nRss: lots\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(parse("Rss: 4 kB\n").is_err(), "field before any header");
        assert!(parse("garbage\n").is_err());
    }

    #[test]
    fn flotilla_guest_ram_is_the_memfd() {
        let m = parse(FLOTILLA).unwrap();
        let rule = GuestRamRule::Memfd("flotilla-guest-ram".into());
        assert_eq!(select_guest_ram(&m, &rule).unwrap(), vec![2]);
        let a = account(&m, &rule).unwrap();
        assert_eq!(a.guest_ram.size_kib, 262144);
        assert_eq!(a.guest_ram.rss_kib, 2048);
        assert_eq!(a.overhead().rss_kib, 256 + 40 + 12);
        assert_eq!(a.overhead().pss_kib, 256 + 40 + 12);
        assert_eq!(a.guest_ram_mappings.len(), 1);
    }

    #[test]
    fn a_process_without_the_memfd_has_no_guest_ram() {
        let m = parse(FLOTILLA).unwrap();
        let launcher: Vec<Mapping> =
            m.into_iter().filter(|m| !m.path.as_deref().unwrap_or("").contains("memfd")).collect();
        let a = account(&launcher, &GuestRamRule::Memfd("flotilla-guest-ram".into())).unwrap();
        assert_eq!(a.guest_ram, Usage::default());
        assert_eq!(a.overhead(), a.total);
    }

    #[test]
    fn qemu_guest_ram_is_the_anonymous_mapping_of_the_ram_size() {
        let rule = GuestRamRule::AnonymousOfSize { ram_kib: 262144, slack_kib: 4096 };
        let maps = vec![
            anon(0x1000_0000, 65404, "---p", 0),  // a malloc arena reservation
            anon(0x2000_0000, 262144, "---p", 0), // a reservation of the same size, not rw
            anon(0x3000_0000, 2048, "rw-p", 2048),
            anon(0x4000_0000, 262144, "rw-p", 8192),
            anon(0x5000_0000, 8192, "rw-p", 12),
        ];
        assert_eq!(select_guest_ram(&maps, &rule).unwrap(), vec![3]);
        let a = account(&maps, &rule).unwrap();
        assert_eq!(a.guest_ram.rss_kib, 8192);
        assert_eq!(a.overhead().rss_kib, 2048 + 12);
    }

    #[test]
    fn qemu_guest_ram_may_carry_a_guard_page() {
        let rule = GuestRamRule::AnonymousOfSize { ram_kib: 262144, slack_kib: 4096 };
        let maps = vec![anon(0x1000, 262144 + 4, "rw-p", 10), anon(0x2000_0000, 262144 + 2048, "rw-p", 10)];
        assert_eq!(select_guest_ram(&maps, &rule).unwrap(), vec![0]);
        let too_big = vec![anon(0x1000, 262144 + 8192, "rw-p", 10)];
        assert_eq!(select_guest_ram(&too_big, &rule).unwrap(), Vec::<usize>::new());
        let too_small = vec![anon(0x1000, 262140, "rw-p", 10)];
        assert_eq!(select_guest_ram(&too_small, &rule).unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn two_equally_good_candidates_are_refused() {
        let rule = GuestRamRule::AnonymousOfSize { ram_kib: 262144, slack_kib: 4096 };
        let maps = vec![anon(0x1000_0000, 262144, "rw-p", 1), anon(0x4000_0000, 262144, "rw-p", 1)];
        let e = select_guest_ram(&maps, &rule).unwrap_err();
        assert!(e.contains("2 anonymous mappings"), "{e}");
    }

    #[test]
    fn file_backed_mapping_of_the_ram_size_is_not_guest_ram_for_qemu() {
        let rule = GuestRamRule::AnonymousOfSize { ram_kib: 262144, slack_kib: 0 };
        let mut m = anon(0x1000, 262144, "rw-s", 5);
        m.path = Some("/dev/shm/x".into());
        assert!(select_guest_ram(&[m], &rule).unwrap().is_empty());
    }
}
