//! The few /proc reads the bench needs: a process's parent and name, and its descendants.

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
