//! Frame counters, shared between the stack's thread and its [`crate::SlirpNet`] handle.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub(crate) frames_from_guest: AtomicU64,
    pub(crate) frames_to_guest: AtomicU64,
    pub(crate) dropped_socket_full: AtomicU64,
    pub(crate) dropped_oversize: AtomicU64,
    pub(crate) send_errors: AtomicU64,
}

/// A snapshot of a stack's frame counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlirpNetStats {
    /// Frames read from the socket and handed to libslirp.
    pub frames_from_guest: u64,
    /// Frames libslirp sent that went onto the socket.
    pub frames_to_guest: u64,
    /// Frames for the guest dropped because the socket was full (its reader is behind).
    pub dropped_socket_full: u64,
    /// Frames from the guest dropped for being larger than any Ethernet frame with a 64 KiB IP packet.
    pub dropped_oversize: u64,
    /// Frames for the guest lost to another socket error (the reader gone, typically).
    pub send_errors: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SlirpNetStats {
        SlirpNetStats {
            frames_from_guest: self.frames_from_guest.load(Ordering::Relaxed),
            frames_to_guest: self.frames_to_guest.load(Ordering::Relaxed),
            dropped_socket_full: self.dropped_socket_full.load(Ordering::Relaxed),
            dropped_oversize: self.dropped_oversize.load(Ordering::Relaxed),
            send_errors: self.send_errors.load(Ordering::Relaxed),
        }
    }
}
