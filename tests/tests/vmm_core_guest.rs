//! vmm-core under KVM with the freestanding test guest: what the guest sees from inside, and
//! what the run-state API does to it. Every wait is bounded.

use flotilla_tests::console::field;
use flotilla_tests::machine::{boot, guest_config, Booted, TempDir, BOOT_TIMEOUT, REPLY_TIMEOUT};
use std::sync::mpsc::Receiver;
use std::time::Duration;
use vmm_core::{ExitReason, RunState, VmEvent, VmEventKind};

fn next_event(rx: &Receiver<VmEvent>) -> VmEventKind {
    rx.recv_timeout(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("no event: {e}")).kind
}

fn tick_number(line: &str) -> u64 {
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad TICK line {line:?}"))
}

fn boot_count(line: &str) -> u32 {
    field(line, "boot").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad boot line {line:?}"))
}

#[test]
fn guest_sees_cpus_memory_acpi_and_pci() {
    let dir = TempDir::new("report");
    let mut b = boot(guest_config(&dir, 3, 256), dir);
    let h = b.console.history.clone();
    let find = |p: &str| h.iter().find(|l| l.starts_with(p)).cloned().unwrap_or_else(|| panic!("no {p} line in {h:#?}"));
    let cpus = find("CPUS ");
    assert_eq!(field(&cpus, "madt"), Some("3"), "{cpus}");
    assert_eq!(field(&cpus, "online"), Some("3"), "all APs must come up: {cpus}");
    let mem = find("MEM ");
    let total: u64 = field(&mem, "total").and_then(|v| v.parse().ok()).expect("MEM total");
    // 256 MiB less the 384 KiB BIOS hole.
    assert_eq!(total, (256 << 20) - (0x10_0000 - 0x9_fc00), "{mem}");
    let acpi = find("ACPI ");
    assert_eq!(field(&acpi, "sci"), Some("9"), "{acpi}");
    assert_eq!(field(&acpi, "s5"), Some("5"), "{acpi}");
    let bridge = find("PCI 00:00.0");
    assert!(bridge.contains("vendor=8086") && bridge.contains("device=29c0") && bridge.contains("class=060000"), "{bridge}");
    let ecam = find("ECAM ");
    assert_eq!(field(&ecam, "match"), Some("yes"), "{ecam}");
    // The host side agrees.
    let pci = b.vm.pci();
    assert_eq!(pci.len(), 1);
    assert_eq!((pci[0].vendor, pci[0].device, pci[0].class), (0x8086, 0x29c0, 0x0600));
    b.console.command("ping", "PONG", REPLY_TIMEOUT).expect("ping");
}

#[test]
fn stop_freezes_the_guest_and_cont_resumes_it() {
    let dir = TempDir::new("stop");
    let mut b = boot(guest_config(&dir, 1, 128), dir);
    let events = b.vm.subscribe();
    b.console.send("spin").expect("spin");
    let t = tick_number(&b.console.expect("TICK", REPLY_TIMEOUT).expect("tick"));
    b.vm.stop().expect("stop");
    assert_eq!(next_event(&events), VmEventKind::Stop);
    assert_eq!(b.vm.status(), (RunState::Paused, false));
    // Drop what was already in flight, then nothing may arrive while paused.
    b.console.drain_for(Duration::from_millis(200));
    let while_paused = b.console.drain_for(Duration::from_millis(1500));
    assert!(while_paused.is_empty(), "guest ran while paused: {while_paused:?}");
    b.vm.cont().expect("cont");
    assert_eq!(next_event(&events), VmEventKind::Resume);
    assert_eq!(b.vm.status(), (RunState::Running, true));
    let after = tick_number(&b.console.expect("TICK", REPLY_TIMEOUT).expect("tick after cont"));
    assert!(after > t, "counter continues: {t} then {after}");
    // stop twice is harmless, and cont while running too.
    b.vm.cont().expect("cont while running");
    b.console.command("ping", "PONG", REPLY_TIMEOUT).expect("ping ends spin");
}

#[test]
fn system_reset_reboots_the_guest() {
    let dir = TempDir::new("reset");
    let mut b = boot(guest_config(&dir, 2, 128), dir);
    let first = boot_count(&b.console.history.iter().find(|l| l.starts_with("FLOTILLA-GUEST")).cloned().expect("banner"));
    let events = b.vm.subscribe();
    b.vm.system_reset().expect("reset");
    assert_eq!(next_event(&events), VmEventKind::Reset { guest: false });
    let again = b.console.expect("FLOTILLA-GUEST", BOOT_TIMEOUT).expect("rebooted");
    assert_eq!(boot_count(&again), first + 1);
    let cpus = b.console.expect("CPUS ", BOOT_TIMEOUT).expect("cpus");
    assert_eq!(field(&cpus, "online"), Some("2"), "APs restart after reset: {cpus}");
    b.console.expect("READY", BOOT_TIMEOUT).expect("ready");
    assert_eq!(b.vm.status().0, RunState::Running);
}

#[test]
fn guest_initiated_resets_reboot() {
    let dir = TempDir::new("greset");
    let mut b = boot(guest_config(&dir, 1, 128), dir);
    let events = b.vm.subscribe();
    let mut count = 1;
    for cmd in ["reset", "kbdreset", "triplefault"] {
        b.console.send(cmd).expect("send");
        assert_eq!(next_event(&events), VmEventKind::Reset { guest: true }, "{cmd}");
        let banner = b.console.expect("FLOTILLA-GUEST", BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{cmd}: {e}"));
        count += 1;
        assert_eq!(boot_count(&banner), count, "{cmd}");
        b.console.expect("READY", BOOT_TIMEOUT).expect("ready");
    }
}

#[test]
fn no_reboot_turns_a_guest_reset_into_exit() {
    let dir = TempDir::new("noreboot");
    let mut cfg = guest_config(&dir, 1, 64);
    cfg.no_reboot = true;
    let mut b = boot(cfg, dir);
    let events = b.vm.subscribe();
    b.console.send("triplefault").expect("send");
    assert_eq!(next_event(&events), VmEventKind::Shutdown { guest: true });
    assert_eq!(b.vm.wait_timeout(REPLY_TIMEOUT), Some(ExitReason::GuestReset));
}

#[test]
fn power_button_runs_the_guest_acpi_poweroff() {
    let dir = TempDir::new("powerdown");
    let mut b = boot(guest_config(&dir, 2, 128), dir);
    let events = b.vm.subscribe();
    b.vm.system_powerdown();
    assert_eq!(next_event(&events), VmEventKind::Powerdown);
    b.console.expect("POWER-BUTTON", REPLY_TIMEOUT).expect("guest saw the button");
    b.console.expect("POWEROFF", REPLY_TIMEOUT).expect("guest powers off");
    assert_eq!(next_event(&events), VmEventKind::Shutdown { guest: true });
    assert_eq!(b.vm.wait_timeout(REPLY_TIMEOUT), Some(ExitReason::GuestPoweroff));
}

#[test]
fn no_shutdown_keeps_the_vm_in_shutdown_until_reset() {
    let dir = TempDir::new("noshutdown");
    let mut cfg = guest_config(&dir, 1, 64);
    cfg.no_shutdown = true;
    let mut b = boot(cfg, dir);
    let events = b.vm.subscribe();
    b.vm.system_powerdown();
    assert_eq!(next_event(&events), VmEventKind::Powerdown);
    b.console.expect("POWEROFF", REPLY_TIMEOUT).expect("guest powers off");
    assert_eq!(next_event(&events), VmEventKind::Shutdown { guest: true });
    assert_eq!(next_event(&events), VmEventKind::Stop);
    assert_eq!(b.vm.status(), (RunState::Shutdown, false));
    assert_eq!(b.vm.wait_timeout(Duration::from_millis(300)), None, "the VM must stay");
    assert!(matches!(b.vm.cont(), Err(vmm_core::VmError::ResetRequired)));
    b.vm.system_reset().expect("reset");
    assert_eq!(b.vm.status().0, RunState::Prelaunch);
    b.vm.cont().expect("cont after reset");
    b.console.expect("READY", BOOT_TIMEOUT).expect("boots again");
}

/// Asks the guest for its NMI counts until `want` is reached (an NMI is delivered
/// asynchronously) or the deadline passes; returns the last report.
fn nmis_until(b: &mut Booted, want: &str) -> String {
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let line = b.console.command("nmis", "NMIS", REPLY_TIMEOUT).expect("nmis");
        if field(&line, "total") == Some(want) || std::time::Instant::now() > deadline {
            return line;
        }
    }
}

#[test]
fn nmis_reach_every_cpu() {
    let dir = TempDir::new("nmi");
    let mut b = boot(guest_config(&dir, 2, 128), dir);
    assert!(b.vm.nmi_supported(), "KVM here supports NMI injection");
    // Two NMIs sent back to back may merge into one (x86 latches one pending NMI), so wait for
    // the first to be counted before sending the second.
    b.vm.inject_nmi().expect("nmi");
    let line = nmis_until(&mut b, "2");
    assert_eq!((field(&line, "cpu0"), field(&line, "cpu1")), (Some("1"), Some("1")), "{line}");
    b.vm.inject_nmi().expect("nmi");
    let line = nmis_until(&mut b, "4");
    assert_eq!(field(&line, "total"), Some("4"), "{line}");
    assert_eq!((field(&line, "cpu0"), field(&line, "cpu1")), (Some("2"), Some("2")), "{line}");
}

#[test]
fn memsave_reads_what_the_guest_wrote_through_its_page_tables() {
    let dir = TempDir::new("memsave");
    let mut b = boot(guest_config(&dir, 1, 128), dir);
    let vaddr: u64 = 0xffff_8000_0030_0000;
    let wrote = b.console.command("write ffff800000300000 a5a5f00d 8192", "WROTE", REPLY_TIMEOUT).expect("write");
    let paddr = u64::from_str_radix(wrote.split_whitespace().nth(2).expect("paddr").trim_start_matches("0x"), 16).expect("hex");
    assert_eq!(paddr, 0x30_0000, "{wrote}");
    let expected: Vec<u8> = 0xa5a5_f00du32.to_le_bytes().iter().copied().cycle().take(8192).collect();
    let out = b.dir.path("mem.bin");
    b.vm.memsave(vaddr, 8192, &out, 0).expect("memsave");
    assert_eq!(std::fs::read(&out).expect("read"), expected);
    let pout = b.dir.path("pmem.bin");
    b.vm.pmemsave(paddr, 8192, &pout).expect("pmemsave");
    assert_eq!(std::fs::read(&pout).expect("read"), expected);
    // An address the guest has not mapped fails as QEMU words it.
    let err = b.vm.memsave(0x0000_7000_0000_0000, 4096, &out, 0).expect_err("unmapped");
    assert_eq!(err.to_string(), "Invalid addr 0x0000700000000000/size 4096 specified");
    assert!(b.vm.memsave(vaddr, 16, &out, 7).is_err(), "no such cpu");
}

#[test]
fn query_cpus_reports_halted_pc_and_real_threads() {
    let dir = TempDir::new("cpus");
    let mut b = boot(guest_config(&dir, 2, 128), dir);
    b.console.command("halt", "HALTING", REPLY_TIMEOUT).expect("halt");
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    let cpus = loop {
        let cpus = b.vm.cpus().expect("cpus");
        if cpus[0].halted || std::time::Instant::now() > deadline {
            break cpus;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(cpus.len(), 2);
    assert!(cpus[0].halted, "BSP sits in hlt: {cpus:?}");
    assert!(cpus[0].pc >= 0x10_0000 && cpus[0].pc < 0x100_0000, "pc inside the guest image: {cpus:?}");
    assert_ne!(cpus[0].thread_id, cpus[1].thread_id);
    for c in &cpus {
        let task = format!("/proc/self/task/{}", c.thread_id);
        assert!(std::path::Path::new(&task).exists(), "{task} is a thread of this process");
    }
    // An NMI is still counted while halted.
    b.vm.inject_nmi().expect("nmi");
}

#[test]
fn dash_s_waits_in_prelaunch() {
    let dir = TempDir::new("prelaunch");
    let mut cfg = guest_config(&dir, 1, 64);
    cfg.start_paused = true;
    let mut b: Booted = boot(cfg, dir);
    assert_eq!(b.vm.status(), (RunState::Prelaunch, false));
    assert!(b.console.drain_for(Duration::from_millis(500)).is_empty(), "nothing runs in prelaunch");
    let events = b.vm.subscribe();
    b.vm.cont().expect("cont");
    assert_eq!(next_event(&events), VmEventKind::Resume);
    b.console.expect("READY", BOOT_TIMEOUT).expect("boots after cont");
}
