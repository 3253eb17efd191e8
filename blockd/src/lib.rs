//! blockd: Flotilla's vhost-user-blk backend. It serves every drive of a VM, each on its own
//! socket (any vhost-user-blk frontend drives it: vmm-core, QEMU's `vhost-user-blk-pci`), and
//! the QMP block commands on D-Bus.
//!
//! - [`disk`]: the image behind a drive (raw file I/O with optional O_DIRECT, qcow2 through
//!   imago), resize, qcow2 overlay creation.
//! - [`request`]: virtio-blk request parsing and execution over descriptor chains, the cache
//!   mode and the error policy's decision.
//! - [`policy`]: werror/rerror (QEMU's BlockdevOnError) and io-status.
//! - [`stats`]: query-blockstats counters.
//! - [`pool`]: the I/O threads that keep the guest's queue depth.
//! - [`engine`]: one drive at run time: submission, completion, held requests, resize and
//!   snapshot switching, config-change notification.
//! - [`backend`]: the `VhostUserBackend` (features, config space, queue workers).
//! - [`service`] and [`dbus`]: the QMP block commands, BLOCK_IO_ERROR, RESUME.
//! - [`state`]: the images drives were switched to, kept for a restarted blockd.

pub mod backend;
pub mod dbus;
pub mod disk;
pub mod engine;
pub mod policy;
pub mod pool;
pub mod request;
pub mod service;
pub mod state;
pub mod stats;
pub mod uring;

#[cfg(test)]
mod tests;
