//! vmm-core's internal-error run state, proven with the test guest: the guest jumps into the
//! unassigned MMIO hole (0xd0000000, identity-mapped by the guest, no memory slot behind it), KVM
//! cannot fetch the instruction, and the machine must stop in `internal-error` with the VM kept
//! for inspection until `system_reset`. Every wait is bounded.

use flotilla_tests::console::field;
use flotilla_tests::machine::{boot, guest_config, TempDir, BOOT_TIMEOUT, REPLY_TIMEOUT};
use std::time::{Duration, Instant};
use vmm_core::{RunState, VmError, VmEventKind};

const HOLE: u64 = 0xd000_0000;

fn boot_count(line: &str) -> u32 {
    field(line, "boot").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad boot line {line:?}"))
}

#[test]
fn instruction_fetch_from_the_mmio_hole_is_an_internal_error_until_reset() {
    let dir = TempDir::new("interr");
    let mut b = boot(guest_config(&dir, 2, 128), dir);
    let banner = b.console.history.iter().find(|l| l.starts_with("FLOTILLA-GUEST")).cloned().expect("banner");
    let first = boot_count(&banner);
    let events = b.vm.subscribe();
    assert_eq!(b.vm.internal_error(), None);

    b.console.command(&format!("jump {HOLE:x}"), &format!("JUMPING {HOLE:#x}"), REPLY_TIMEOUT).expect("jump");
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while b.vm.status().0 != RunState::InternalError {
        assert!(Instant::now() < deadline, "status stayed {:?}", b.vm.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(b.vm.status(), (RunState::InternalError, false));
    let ev = events.recv_timeout(REPLY_TIMEOUT).expect("an event").kind;
    assert_eq!(ev, VmEventKind::Stop);
    let (cpu, reason) = b.vm.internal_error().expect("the fault is recorded");
    eprintln!("KVM reported on vCPU {cpu}: {reason}");
    assert_eq!(cpu, 0, "{reason}");
    assert!(reason.contains(&format!("rip={HOLE:#x}")), "{reason}");

    // The machine is kept: it has not exited, and the vCPUs still answer, stopped at the target.
    assert_eq!(b.vm.wait_timeout(Duration::from_millis(200)), None, "the VM must stay");
    let cpus = b.vm.cpus().expect("query-cpus answers");
    assert_eq!(cpus.len(), 2);
    assert_eq!(cpus[0].pc, HOLE, "{cpus:?}");
    // Paused for inspection: the guest prints nothing, and a stop is harmless.
    assert!(b.console.drain_for(Duration::from_millis(300)).is_empty());
    b.vm.stop().expect("stop");
    assert_eq!(b.vm.status().0, RunState::InternalError);

    assert!(matches!(b.vm.cont(), Err(VmError::ResetRequired)));
    assert_eq!(b.vm.status().0, RunState::InternalError);
    b.vm.system_reset().expect("system_reset");
    assert_eq!(events.recv_timeout(REPLY_TIMEOUT).expect("event").kind, VmEventKind::Reset { guest: false });
    assert_eq!(b.vm.status(), (RunState::Prelaunch, false));
    assert_eq!(b.vm.internal_error(), None, "reset clears the fault");

    b.vm.cont().expect("cont after reset");
    assert_eq!(events.recv_timeout(REPLY_TIMEOUT).expect("event").kind, VmEventKind::Resume);
    let again = b.console.expect("FLOTILLA-GUEST", BOOT_TIMEOUT).expect("boots again");
    assert_eq!(boot_count(&again), first + 1);
    let cpus = b.console.expect("CPUS ", BOOT_TIMEOUT).expect("cpus");
    assert_eq!(field(&cpus, "online"), Some("2"), "{cpus}");
    b.console.expect("READY", BOOT_TIMEOUT).expect("ready");
    b.console.command("ping", "PONG", REPLY_TIMEOUT).expect("ping");
    assert_eq!(b.vm.status(), (RunState::Running, true));
}
