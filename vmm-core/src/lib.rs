//! vmm-core: Flotilla's machine process. It owns KVM, guest RAM (a shared memfd), the vCPU
//! threads, the legacy platform devices, the PCI root complex and the ACPI tables, and offers
//! the run-state API the monitor drives. Device data paths live in vhost-user daemons.
//!
//! Each `MachineConfig.vhost_user_devices` entry becomes a virtio-pci modern function
//! ([`virtio_pci`]: capabilities, BAR 4 layout, MSI-X, the corner cases QEMU's transport
//! defines) whose device model is a vhost-user backend reached through a frontend that
//! reconnects whenever the backend goes away ([`vhost_user`]: lifecycle, replay, inflight note).

pub mod acpi;
pub mod boot;
pub mod chardev;
pub mod cpuid;
pub mod dbus;
pub mod devices;
pub mod irq;
pub mod layout;
pub mod memory;
pub mod regs;
pub mod runstate;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio_pci;
pub mod vm;

pub use runstate::{EventReason, RunState, VmEvent, VmEventKind};
pub use vm::{ExitReason, Vm, VmError};
