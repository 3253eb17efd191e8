//! MSI routing through irqfd under KVM, proven with the test guest: vmm-core's `IrqRouter`
//! allocates a GSI with an eventfd registered as its irqfd, routes it as an MSI, and a write to
//! the eventfd from the host (as a vhost-user backend's call would) reaches the vector and CPU
//! the message names; masking holds the signal as pending and unmasking delivers it.
//! The guest counts vectors 0x40..0x4f per CPU (`vectors`). Every wait is bounded.

use flotilla_tests::console::field;
use flotilla_tests::machine::{boot, guest_config, Booted, TempDir, REPLY_TIMEOUT};
use std::time::{Duration, Instant};

/// Fixed delivery, edge, physical destination `apic_id`: the MSI address and data.
fn msi(apic_id: u32, vector: u32) -> (u32, u32, u32) {
    (0xfee0_0000 | (apic_id << 12), 0, vector)
}

fn count(line: &str, key: &str) -> u64 {
    field(line, key).map(|n| n.parse().unwrap_or_else(|_| panic!("bad {key} in {line:?}"))).unwrap_or(0)
}

/// Asks the guest for its vector counts until `key` reaches `want` (delivery is asynchronous)
/// or the deadline passes; returns the last report.
fn vectors_until(b: &mut Booted, key: &str, want: u64) -> String {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let line = b.console.command("vectors", "VECTORS", REPLY_TIMEOUT).expect("vectors");
        if count(&line, key) >= want || Instant::now() > deadline {
            return line;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn msi_through_irqfd_reaches_the_named_cpu_and_vector_and_masking_keeps_it_pending() {
    let dir = TempDir::new("msi");
    let mut b = boot(guest_config(&dir, 2, 128), dir);
    let line = b.console.command("vectors", "VECTORS", REPLY_TIMEOUT).expect("vectors");
    assert_eq!(line, "VECTORS total=0", "nothing fired yet");
    let router = b.vm.irq_router();

    // APIC 0, vector 0x45.
    let v = router.lock().unwrap().allocate_msi().expect("allocate");
    assert!(v.gsi >= 24, "MSI GSIs come after the irqchip pins: {}", v.gsi);
    let (lo, hi, data) = msi(0, 0x45);
    router.lock().unwrap().set_msi(v.gsi, lo, hi, data).expect("route");
    v.eventfd.write(1).expect("signal");
    let line = vectors_until(&mut b, "v45", 1);
    assert_eq!((count(&line, "total"), count(&line, "cpu0.v45")), (1, 1), "{line}");

    // Masked: the signal is held, not delivered, and shows as pending.
    router.lock().unwrap().mask(v.gsi).expect("mask");
    v.eventfd.write(1).expect("signal while masked");
    v.eventfd.write(1).expect("signal while masked");
    std::thread::sleep(Duration::from_millis(300));
    let line = b.console.command("vectors", "VECTORS", REPLY_TIMEOUT).expect("vectors");
    assert_eq!(count(&line, "v45"), 1, "delivered while masked: {line}");
    assert!(router.lock().unwrap().is_pending(v.gsi).expect("pending"), "the pending bit is set");

    // Unmasked: exactly one message for the signals while masked.
    assert!(router.lock().unwrap().unmask(v.gsi).expect("unmask"), "something was pending");
    assert!(!router.lock().unwrap().is_pending(v.gsi).expect("pending"));
    let line = vectors_until(&mut b, "v45", 2);
    assert_eq!(count(&line, "cpu0.v45"), 2, "{line}");
    std::thread::sleep(Duration::from_millis(200));
    let line = b.console.command("vectors", "VECTORS", REPLY_TIMEOUT).expect("vectors");
    assert_eq!(count(&line, "v45"), 2, "one message for two masked signals: {line}");

    // Unmasked again, delivery is direct.
    v.eventfd.write(1).expect("signal");
    let line = vectors_until(&mut b, "v45", 3);
    assert_eq!(count(&line, "cpu0.v45"), 3, "{line}");

    // Re-pointed at APIC 1, another vector: the AP counts it, the BSP does not.
    let (lo, hi, data) = msi(1, 0x46);
    router.lock().unwrap().set_msi(v.gsi, lo, hi, data).expect("re-route");
    v.eventfd.write(1).expect("signal");
    let line = vectors_until(&mut b, "cpu1.v46", 1);
    assert_eq!((count(&line, "cpu1.v46"), count(&line, "cpu0.v46"), count(&line, "total")), (1, 0, 4), "{line}");

    // A second vector alongside (every commit re-sends the whole table): both work.
    let w = router.lock().unwrap().allocate_msi().expect("allocate second");
    assert_ne!(w.gsi, v.gsi);
    let (lo, hi, data) = msi(0, 0x47);
    router.lock().unwrap().set_msi(w.gsi, lo, hi, data).expect("route second");
    w.eventfd.write(1).expect("signal");
    v.eventfd.write(1).expect("signal");
    let line = vectors_until(&mut b, "total", 6);
    assert_eq!((count(&line, "cpu0.v47"), count(&line, "cpu1.v46")), (1, 2), "{line}");

    // Released: the eventfd raises nothing any more, and the GSI is handed out again.
    router.lock().unwrap().release(v.gsi).expect("release");
    v.eventfd.write(1).expect("signal after release");
    std::thread::sleep(Duration::from_millis(300));
    let line = b.console.command("vectors", "VECTORS", REPLY_TIMEOUT).expect("vectors");
    assert_eq!(count(&line, "total"), 6, "a released vector fired: {line}");
    assert_eq!(router.lock().unwrap().allocate_msi().expect("allocate").gsi, v.gsi);

    // The legacy path through the same table still works: COM1 (GSI 4, the router's pin irqfd)
    // carries this command's input.
    b.console.command("ping", "PONG", REPLY_TIMEOUT).expect("serial input IRQ still works");
}
