//! Transmit: each chain the guest queues is one frame, its virtio-net header first, written to
//! the pair's host port whole (with the header to a tap that has IFF_VNET_HDR, without it to a
//! frame socket). Chains outside guest RAM, with writable parts, shorter than the header,
//! longer than a maximum frame, or claiming offloads not negotiated are dropped (and
//! completed: the guest gets its buffer back) with a rate-limited warning.

use std::io;
use std::ops::Deref;
use std::time::Duration;

use vhost_backend_kit::queue::TrackedQueue;
use vhost_backend_kit::ratelimit::RateLimit;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::GuestMemoryMmap;

use crate::chain;
use crate::features::MAX_FRAME;
use crate::header::NetHdr;
use crate::nic::{add, Nic};
use crate::port::Port;

static TX_WARN: RateLimit = RateLimit::new(10, Duration::from_secs(10));

macro_rules! tx_warn {
    ($($arg:tt)*) => {
        if let Some(held_back) = TX_WARN.check() {
            tracing::warn!(held_back, $($arg)*);
        }
    };
}

pub struct Tx<'a, M: Deref<Target = GuestMemoryMmap> + Clone> {
    pub nic: &'a Nic,
    pub port: &'a Port,
    pub queue: &'a TrackedQueue,
    pub vring: &'a VringRwLock,
    pub mem: M,
    pub features: u64,
    pub hdr_len: usize,
    pub event_idx: bool,
}

impl<M: Deref<Target = GuestMemoryMmap> + Clone> Tx<'_, M> {
    /// Sends every queued frame; interrupts the guest as EVENT_IDX says.
    pub fn pass(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut used = false;
        self.queue.drain(
            self.vring,
            self.mem.clone(),
            |taken| {
                self.send(&taken.chain, buf);
                used |= self.queue.add_used(self.vring, taken.ticket, 0);
            },
            || {},
        )?;
        if used && (!self.event_idx || self.vring.needs_notification().unwrap_or(true)) {
            self.vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn send(&self, chain: &virtio_queue::DescriptorChain<M>, buf: &mut Vec<u8>) {
        let c = &self.nic.counters;
        if let Err(e) = chain::read_all(chain, buf, self.hdr_len + MAX_FRAME) {
            add(&c.bad_chains, 1);
            add(&c.tx_dropped, 1);
            tx_warn!(nic = %self.nic.id, head = chain.head_index(), "transmit chain dropped: {e}");
            return;
        }
        let hdr = match NetHdr::parse(buf, self.hdr_len) {
            Ok(h) => h,
            Err(e) => {
                add(&c.bad_chains, 1);
                add(&c.tx_dropped, 1);
                tx_warn!(nic = %self.nic.id, "transmit chain dropped: {e}");
                return;
            }
        };
        let frame_len = buf.len() - self.hdr_len;
        if let Err(e) = hdr.check_tx(self.features, frame_len) {
            add(&c.tx_dropped, 1);
            tx_warn!(nic = %self.nic.id, "transmit frame dropped: {e}");
            return;
        }
        if frame_len == 0 || !self.nic.link_up() {
            add(&c.tx_dropped, 1);
            return;
        }
        let out = if self.port.vnet_hdr() { &buf[..] } else { &buf[self.hdr_len..] };
        match self.port.send(out) {
            Ok(()) => {
                add(&c.tx_frames, 1);
                add(&c.tx_bytes, frame_len as u64);
            }
            Err(e) => {
                add(&c.tx_dropped, 1);
                if e.kind() != io::ErrorKind::WouldBlock {
                    tx_warn!(nic = %self.nic.id, "the host side refused a frame: {e}");
                }
            }
        }
    }
}
