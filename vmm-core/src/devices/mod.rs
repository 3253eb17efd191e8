//! Devices that vmm-core emulates itself: the legacy platform (serial, i8042 reset, ACPI PM
//! registers, the boot marker) and the PCI root complex. Everything with a data path lives in a
//! vhost-user daemon instead.

pub mod bus;
pub mod i8042;
pub mod marker;
pub mod pci;
pub mod pm;
pub mod serial;

use std::sync::Arc;

/// Something the guest asked the machine to do by touching a device register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAction {
    /// Reset register, keyboard-controller pulse, or triple fault.
    Reset,
    /// ACPI S5 written to PM1a_CNT.
    PowerOff,
}

/// Where devices deliver [`GuestAction`]s (the VM's controller).
pub type ActionSink = Arc<dyn Fn(GuestAction) + Send + Sync>;

/// A level-triggered interrupt line into the in-kernel irqchip.
pub type IrqLevel = Arc<dyn Fn(bool) + Send + Sync>;
