//! blockd: Flotilla's vhost-user-blk backend. One drive (raw or qcow2) per socket; any
//! vhost-user-blk frontend (QEMU's `vhost-user-blk-pci`, later vmm-core) drives it.
//!
//! - [`disk`]: the image behind the socket (raw file I/O, qcow2 through imago).
//! - [`request`]: virtio-blk request parsing and execution over descriptor chains.
//! - [`backend`]: the `VhostUserBackend` (features, config space, queue workers).

pub mod backend;
pub mod disk;
pub mod request;

#[cfg(test)]
mod tests;
