//! balloond: Flotilla's virtio-balloon device as a vhost-user backend process, which really
//! gives inflated guest memory back to the host.
//!
//! - [`config`]: the config space (`num_pages`, `actual`) and target arithmetic.
//! - [`chain`]: reading the readable bytes of a descriptor chain, bounded.
//! - [`queues`]: what the inflate, deflate and stats queues' buffers mean.
//! - [`reclaim`]: PFN -> memfd offset translation and hole punching.
//! - [`stats`]: the stats buffer format.
//! - [`device`]: the process-wide device state, events and config-change notification.
//! - [`persist`]: the target and the guest's balloon size, recorded across restarts.
//! - [`backend`]: the `VhostUserBackend` of one connection.
//! - [`dbus`]: `org.flotilla.Balloon1` (balloon, query-balloon) and BALLOON_CHANGE.

pub mod backend;
pub mod chain;
pub mod config;
pub mod dbus;
pub mod device;
pub mod persist;
pub mod queues;
pub mod reclaim;
pub mod stats;

#[cfg(test)]
mod tests;
