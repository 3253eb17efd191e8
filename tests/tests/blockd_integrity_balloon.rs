//! Issue 9's last integrity item, end to end on vmm-core under KVM: a balloond SIGKILLed and
//! restarted by the launcher gets back the target the `balloon` command set (and the size the
//! guest reported), instead of starting empty. Without that, vmm-core's reconnect finds the
//! config space changed to `num_pages` 0 and the guest is told to give its balloon back.
//!
//! Every wait is bounded; a failing test kills what it started.

use std::time::{Duration, Instant};

use flotilla_tests::console::{field, Console};
use flotilla_tests::process::{wait_daemon_child, wait_gone};
use flotilla_tests::qmp::{QmpVm, VmOptions, BOOT, REPLY};
use serde_json::json;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// QmpVm boots every guest with -m 128.
const RAM: u64 = 128 * MIB;


fn pages(line: &str, key: &str) -> u64 {
    field(line, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// The launcher's balloond child other than `not`.
fn balloond_pid(vm: &QmpVm, not: Option<i32>, timeout: Duration) -> Option<i32> {
    wait_daemon_child(vm.pid(), "balloond", not, timeout)
}

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
fn a_restarted_balloond_gets_the_target_back() {
    let vm = QmpVm::start(
        "balloon-restart",
        &VmOptions { name: "balloon-restart", qmp: &[true], extra: &["-device", "virtio-balloon-pci,id=balloon0"] },
    );
    let mut con = vm.console_ready();
    let mut q = vm.raw(0);
    q.negotiate();
    let core = vm.vmm_core();
    let first = balloond_pid(&vm, None, BOOT).expect("balloond is running");

    // The test guest's driver starts with its first `balloon` command.
    let init = con.command("balloon", "BALLOON", REPLY).expect("balloon");
    assert_eq!(pages(&init, "num_pages"), 0, "{init}");
    let want = 32 * MIB / PAGE;
    let target = RAM - 32 * MIB;
    assert_eq!(q.ok("balloon", json!({"value": target})), json!({}));
    wait_ballooned(&mut con, want);
    let deadline = Instant::now() + REPLY;
    while q.ok("query-balloon", json!({}))["actual"] != target {
        assert!(Instant::now() < deadline, "the guest's balloon size never reached balloond");
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGKILL: no exit path runs; the launcher starts a new balloond with the same config.
    // SAFETY: a signal to a process this test's VM started.
    assert_eq!(unsafe { libc::kill(first, libc::SIGKILL) }, 0);
    assert!(wait_gone(first, Duration::from_secs(5)), "balloond survived SIGKILL");
    let second = balloond_pid(&vm, Some(first), Duration::from_secs(10)).expect("the launcher restarted balloond");

    // The new balloond answers query-balloon with the size the guest had reported.
    let deadline = Instant::now() + Duration::from_secs(10);
    let actual = loop {
        let r = q.execute("query-balloon", json!({}));
        if let Some(a) = r.get("return").and_then(|b| b.get("actual")) {
            break a.clone();
        }
        assert!(Instant::now() < deadline, "query-balloon never answered after the restart: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(actual, json!(target), "the restarted balloond forgot the guest's balloon size");

    // vmm-core has reconnected by now (milliseconds); the guest reads the target it had, and
    // was not told to deflate.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        let l = con.command("balloon", "BALLOON", REPLY).expect("balloon");
        assert_eq!(pages(&l, "num_pages"), want, "the restarted balloond lost the target: {l}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(q.ok("query-balloon", json!({}))["actual"], target);
    // A new target still reaches the guest through the new balloond.
    assert_eq!(q.ok("balloon", json!({"value": RAM})), json!({}));
    wait_ballooned(&mut con, 0);
    assert_eq!(balloond_pid(&vm, Some(first), REPLY), Some(second), "balloond restarted again: it crashed");

    let mut vm = vm;
    q.ok("quit", json!({}));
    vm.assert_exits_0_and_cleaned_up(core);
    assert!(wait_gone(second, Duration::from_secs(2)), "balloond outlived the VM");
}
