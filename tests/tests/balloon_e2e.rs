//! The balloon end to end on vmm-core under KVM: `flotilla -device virtio-balloon-pci` starts
//! balloond as the device's vhost-user backend; the test guest's virtio-balloon driver
//! (tests/guest, PROTOCOL.md) inflates to the target set over QMP, and the test measures on the
//! host that the guest-RAM memfd really lost those pages (its allocated blocks), that deflating
//! gives the guest usable memory back, that the guest's statistics reach query-balloon, that
//! BALLOON_CHANGE follows `actual`, and that a hostile PFN list is refused with balloond still
//! serving.
//!
//! Every wait is bounded; a failing test kills what it started.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use flotilla_tests::console::{field, Console};
use flotilla_tests::process::{wait_daemon_child, wait_gone};
use flotilla_tests::qmp::{class, QmpVm, VmOptions, BOOT, REPLY};
use serde_json::json;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// QmpVm boots every guest with -m 128.
const RAM: u64 = 128 * MIB;

/// Bytes allocated to vmm-core's guest-RAM memfds (distinct inodes), from /proc/PID/fd.
fn memfd_allocated(pid: i32) -> u64 {
    let mut by_inode = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd").flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        if !target.to_string_lossy().starts_with("/memfd:") {
            continue;
        }
        if let Ok(m) = std::fs::metadata(e.path()) {
            by_inode.insert(m.ino(), m.blocks() * 512);
        }
    }
    assert!(!by_inode.is_empty(), "vmm-core (pid {pid}) has no memfd open");
    by_inode.values().sum()
}


fn pages(line: &str, key: &str) -> u64 {
    field(line, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn daemon_pid(vm: &QmpVm, name: &str, timeout: Duration) -> Option<i32> {
    wait_daemon_child(vm.pid(), name, None, timeout)
}

/// Waits for `BALLOONED actual=<want>` from the guest.
fn wait_ballooned(con: &mut Console, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = con.expect("BALLOONED", left).expect("the guest reaches the balloon target");
        if pages(&l, "actual") == want {
            return;
        }
    }
}

#[test]
fn balloon_inflates_frees_host_memory_deflates_and_reports_stats() {
    let vm = QmpVm::start(
        "balloon-e2e",
        &VmOptions { name: "balloon-e2e", qmp: &[true], extra: &["-device", "virtio-balloon-pci,id=balloon0"] },
    );
    let mut con = vm.console_ready();
    let mut q = vm.raw(0);
    q.negotiate();
    let core = vm.vmm_core();
    assert!(daemon_pid(&vm, "balloond", BOOT).is_some(), "balloond is not running");

    let init = con.command("balloon", "BALLOON", REPLY).expect("balloon");
    assert_eq!(pages(&init, "num_pages"), 0, "{init}");
    assert_eq!(q.ok("query-balloon", json!({}))["actual"], RAM, "nothing inflated yet");

    // Make the guest's spare memory really allocated on the host, then give 64 MiB back.
    let touched = con.command("touch 80", "TOUCHED", REPLY).expect("touch");
    let touched_bytes: u64 = touched.split_whitespace().nth(1).and_then(|b| b.parse().ok()).unwrap_or(0);
    assert_eq!(touched_bytes, 80 * MIB, "{touched}");
    let before = memfd_allocated(core);
    let target = RAM - 64 * MIB;
    let t0 = Instant::now();
    assert_eq!(q.ok("balloon", json!({"value": target})), json!({}));
    wait_ballooned(&mut con, 64 * MIB / PAGE);
    let inflate_time = t0.elapsed();
    let change = q.wait_event("BALLOON_CHANGE", REPLY);
    let mut actual = change["data"]["actual"].as_u64().unwrap_or(0);
    while actual != target {
        actual = q.wait_event("BALLOON_CHANGE", REPLY)["data"]["actual"].as_u64().unwrap_or(0);
    }
    assert_eq!(q.ok("query-balloon", json!({}))["actual"], target);
    let after = memfd_allocated(core);
    let freed = before.saturating_sub(after);
    eprintln!("inflating 64 MiB took {inflate_time:?}; the memfd went from {before} to {after} bytes ({freed} freed)");
    assert!(freed >= 60 * MIB, "only {freed} bytes of guest RAM went back to the host (before {before}, after {after})");

    // HMP reads the same.
    let info = q.ok("human-monitor-command", json!({"command-line": "info balloon"}));
    assert!(info.as_str().unwrap_or_default().starts_with("balloon: actual=64"), "{info}");

    // Statistics reach query-balloon once the guest has sent them.
    con.command("balloonstats", "BALLOONSTATS", REPLY).expect("balloonstats");
    let deadline = Instant::now() + REPLY;
    let stats = loop {
        let b = q.ok("query-balloon", json!({}));
        if b.get("total_mem").is_some() {
            break b;
        }
        assert!(Instant::now() < deadline, "no guest statistics in query-balloon: {b}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(stats["free_mem"].as_u64().is_some() && stats["total_mem"].as_u64().unwrap_or(0) > 0, "{stats}");

    // A hostile PFN list is refused; balloond keeps serving.
    for kind in ["oob", "hole", "huge"] {
        let l = con.command(&format!("balloonbad {kind}"), "BALLOONBAD", REPLY).expect("balloonbad");
        assert!(l.contains(kind), "{l}");
    }
    let balloond = daemon_pid(&vm, "balloond", REPLY).expect("balloond still running");

    // Deflate, through HMP's `balloon <MiB>`: the pages come back and are usable.
    let r = q.ok("human-monitor-command", json!({"command-line": format!("balloon {}", RAM / MIB)}));
    assert_eq!(r, json!(""), "HMP balloon printed something");
    wait_ballooned(&mut con, 0);
    // The guest reads every deflated page whole (64 MiB at kvm_pvm's emulated speed: seconds).
    let check = con.command("touchcheck", "TOUCHCHECK", Duration::from_secs(60)).expect("touchcheck");
    assert!(check.starts_with("TOUCHCHECK ok "), "{check}");
    assert_eq!(q.ok("query-balloon", json!({}))["actual"], RAM);
    assert_eq!(daemon_pid(&vm, "balloond", REPLY), Some(balloond), "balloond restarted: it crashed");

    // The seed's errors.
    let r = q.execute("balloon", json!({"value": 0}));
    assert!(r.get("error").is_some(), "balloon 0 must fail: {r}");
    let r = q.execute("balloon", json!({"value": "x"}));
    assert_eq!(class(&r), "InvalidParameterType", "{r}");

    let mut vm = vm;
    q.ok("quit", json!({}));
    vm.assert_exits_0_and_cleaned_up(core);
    assert!(wait_gone(balloond, Duration::from_secs(2)), "balloond outlived the VM");
}

#[test]
fn without_a_balloon_device_the_commands_answer_device_not_active() {
    let vm = QmpVm::start("balloon-none", &VmOptions { name: "balloon-none", qmp: &[true], extra: &[] });
    let _con = vm.console_ready();
    let mut q = vm.raw(0);
    q.negotiate();
    for (name, args) in [("query-balloon", json!({})), ("balloon", json!({"value": 64 * MIB}))] {
        let r = q.execute(name, args);
        assert_eq!(class(&r), "DeviceNotActive", "{r}");
    }
}
