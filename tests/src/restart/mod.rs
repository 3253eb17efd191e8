//! A Linux guest writing and verifying through a vhost-user-blk backend that is SIGKILLed and
//! restarted while its requests are in flight: QEMU TCG as the frontend (chardev `reconnect=1`),
//! the Linux guest kit, blockd or qemu-storage-daemon as the backend. Shared by the
//! `blockd_qemu_restart` test (which asserts) and `flotilla-bench restart` (which measures).
//!
//! - [`backend`]: the backend process, killed and restarted on one socket path.
//! - [`qemu`]: QEMU with the kit and a vhost-user-blk-pci on that socket; a timestamped console.
//! - [`workload`]: the guest's write-and-verify script, its output lines, and the bytes the
//!   image must hold afterwards.
//! - [`soak`]: the kill loop (kill right after the guest reports requests in flight, restart,
//!   wait until every writer and the probe made progress) and the final host-side check.

pub mod backend;
pub mod error;
pub mod qemu;
pub mod soak;
pub mod workload;

pub use error::RigError;
