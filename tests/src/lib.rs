//! Shared pieces of Flotilla's end-to-end tests and benchmarks: the freestanding test guest
//! (built from `tests/guest/` by build.rs), the serial console client that drives it, and a
//! helper that boots it on vmm-core.

pub mod blkio;
pub mod bus;
pub mod console;
pub mod guest;
pub mod killer;
pub mod linux_kit;
pub mod machine;
pub mod process;
pub mod pvm_kernel;
pub mod pyqmp;
pub mod qemu_guest;
pub mod qmp;
pub mod restart;
pub mod stamped;
pub mod tmpfs;
pub mod vhost_frontend;
