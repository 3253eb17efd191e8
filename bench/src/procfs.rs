//! The few /proc reads the bench needs: a process's parent and name, its descendants, its
//! command line, and the CPU time and context switches it has used.

/// `(comm, ppid)` from the text of `/proc/PID/stat`. The name is in parentheses and may itself
/// contain spaces and parentheses, so the fields are read after the *last* `)`.
pub fn parse_stat(stat: &str) -> Option<(String, i32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, ppid))
}

pub fn comm_and_ppid(pid: i32) -> Option<(String, i32)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `utime + stime` (clock ticks, all threads, dead ones included) from `/proc/PID/stat`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let close = stat.rfind(')')?;
    // After the name: state (field 3), ..., utime (14), stime (15).
    let mut rest = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Voluntary plus involuntary context switches of one thread, from its `status` text.
pub fn parse_ctxt_switches(status: &str) -> Option<u64> {
    let field = |key: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().parse().ok())
    };
    Some(field("voluntary_ctxt_switches")? + field("nonvoluntary_ctxt_switches")?)
}

/// `se.sum_exec_runtime` (milliseconds, nanosecond precision) and `nr_switches` of one
/// thread, from its `/proc/PID/task/TID/sched` text (present with CONFIG_SCHED_DEBUG).
pub fn parse_sched(sched: &str) -> Option<(f64, u64)> {
    let field = |key: &str| {
        sched.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    Some((field("se.sum_exec_runtime")?.parse().ok()?, field("nr_switches")?.parse().ok()?))
}

/// How [`cpu_usage`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuSource {
    /// Sum over the live threads of their scheduler run time (ns precision).
    Sched,
    /// utime + stime of the whole process (clock ticks, statistical).
    StatTicks,
}

/// A process's CPU use so far: `(cpu microseconds, context switches, how)`. Threads that
/// exited are not counted by the precise [`CpuSource::Sched`] figures.
pub fn cpu_usage(pid: i32) -> Option<(f64, u64, CpuSource)> {
    let mut ms = 0.0;
    let mut sched_switches = 0;
    let mut status_switches = 0;
    let mut all_sched = true;
    let mut threads = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        threads += 1;
        match std::fs::read_to_string(t.path().join("sched")).ok().as_deref().and_then(parse_sched) {
            Some((m, n)) => {
                ms += m;
                sched_switches += n;
            }
            None => all_sched = false,
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        status_switches += parse_ctxt_switches(&status).unwrap_or(0);
    }
    if threads > 0 && all_sched {
        return Some((ms * 1e3, sched_switches, CpuSource::Sched));
    }
    let ticks = parse_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((ticks as f64 * 1e6 / hz, status_switches, CpuSource::StatTicks))
}

/// The host's CPU time so far, from the `cpu` line of `/proc/stat` (clock ticks, all CPUs):
/// `(busy, steal)`, busy being user + nice + system + irq + softirq (guest time is in user).
pub fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    if v.len() < 4 {
        return None;
    }
    Some((at(0) + at(1) + at(2) + at(5) + at(6), at(7)))
}

/// [`parse_proc_stat`] of this host now, in microseconds.
pub fn host_cpu_us() -> Option<(f64, f64)> {
    let (busy, steal) = parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((busy as f64 * 1e6 / hz, steal as f64 * 1e6 / hz))
}

/// The bench's own CPU use so far, all threads (exited ones included): `(cpu µs, context
/// switches)` from `getrusage(RUSAGE_SELF)`.
pub fn own_cpu_usage() -> Option<(f64, u64)> {
    // SAFETY: rusage is plain data; all-zero is a valid value for an out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return None;
    }
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    Some((us(ru.ru_utime) + us(ru.ru_stime), (ru.ru_nvcsw + ru.ru_nivcsw) as u64))
}

/// A process's arguments (argv[0] included), from `/proc/PID/cmdline`.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(split_cmdline(&raw))
}

/// The NUL-separated arguments of a `cmdline` file.
pub fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// Every live process (pid, ppid) on the host.
fn all_processes() -> Vec<(i32, i32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, comm_and_ppid(pid)?.1)))
        .collect()
}

/// `root`'s descendants (children, grandchildren, ...), from a (pid, ppid) table.
pub fn descendants_in(table: &[(i32, i32)], root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in table {
            if ppid == p && pid != root && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out.sort_unstable();
    out
}

/// `root` and its descendants now.
pub fn process_tree(root: i32) -> Vec<i32> {
    let mut v = vec![root];
    v.extend(descendants_in(&all_processes(), root));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_an_awkward_name() {
        let s = "4242 (vmm-core) S 4241 4241 31386 0 -1 4194560 1234 0 0 0";
        assert_eq!(parse_stat(s), Some(("vmm-core".into(), 4241)));
        let s = "7 (a) b) (c) R 1 7 7 0";
        assert_eq!(parse_stat(s), Some(("a) b) (c".into(), 1)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S notanumber"), None);
    }

    #[test]
    fn cpu_ticks_and_context_switches() {
        let s = "4242 (qmp gateway) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 2 0 123";
        assert_eq!(parse_cpu_ticks(s), Some(22));
        assert_eq!(parse_cpu_ticks("1 (x) S 1 2"), None);
        let status = "Name:\tvmm-core\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(parse_ctxt_switches(status), Some(123));
        assert_eq!(parse_ctxt_switches("Name: x\n"), None);
        let (cpu, _, _) = cpu_usage(std::process::id() as i32).unwrap();
        assert!(cpu >= 0.0);
        let (cpu, _) = own_cpu_usage().unwrap();
        assert!(cpu > 0.0);
        let sched = "cat (9094, #threads: 1)\n---------\nse.exec_start   :   7355245.207409\n\
                     se.sum_exec_runtime                          :             0.666030\n\
                     nr_switches                                  :                    12\n\
                     nr_voluntary_switches                        :                    11\n";
        assert_eq!(parse_sched(sched), Some((0.666030, 12)));
        assert_eq!(parse_sched("se.sum_exec_runtime : x\nnr_switches : 1\n"), None);
    }

    #[test]
    fn host_cpu_times() {
        let s = "cpu  100 5 50 1000 7 3 2 11 0 0\ncpu0 50 2 25 500 3 1 1 5 0 0\nintr 1\n";
        assert_eq!(parse_proc_stat(s), Some((160, 11)));
        assert_eq!(parse_proc_stat("cpu  1 2\n"), None);
        assert_eq!(parse_proc_stat("intr 1\n"), None);
        assert!(host_cpu_us().is_some());
    }

    #[test]
    fn command_lines() {
        assert_eq!(split_cmdline(b"vmm-core\0--instance\0vm1\0"), ["vmm-core", "--instance", "vm1"]);
        assert!(split_cmdline(b"").is_empty());
        assert!(!cmdline(std::process::id() as i32).unwrap().is_empty());
    }

    #[test]
    fn descendants_walk_the_whole_tree() {
        let t = [(1, 0), (10, 1), (11, 10), (12, 11), (13, 10), (20, 1), (21, 20)];
        assert_eq!(descendants_in(&t, 10), vec![11, 12, 13]);
        assert_eq!(descendants_in(&t, 12), Vec::<i32>::new());
        assert_eq!(descendants_in(&t, 1), vec![10, 11, 12, 13, 20, 21]);
    }

    #[test]
    fn this_process_has_a_parent() {
        let me = std::process::id() as i32;
        let (_, ppid) = comm_and_ppid(me).expect("our own /proc stat");
        assert_eq!(ppid, std::os::unix::process::parent_id() as i32);
        assert_eq!(process_tree(me)[0], me);
    }
}
