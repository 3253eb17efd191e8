//! Receive: frames from a pair's host port into the guest's receive buffers. With
//! MRG_RXBUF a frame spreads over as many buffers as it needs, the first buffer's header says
//! how many (`num_buffers`), and all of them reach the used ring with one index update (the
//! kit's `add_used_batch`: a driver that saw only the first would drop the frame). Without it
//! a frame must fit one buffer. A frame for which the guest has no buffers yet waits here (one
//! per pair, with the buffers already filled for it) until the guest adds some and kicks.

use std::io;
use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use vhost_backend_kit::queue::{Ticket, TrackedQueue};
use vhost_backend_kit::ratelimit::RateLimit;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::chain::{self, write_at};
use crate::features::{HDR_LEN, MAX_FRAME};
use crate::header::NUM_BUFFERS_AT;
use crate::nic::{add, Nic};
use crate::port::Port;

static RX_WARN: RateLimit = RateLimit::new(10, Duration::from_secs(10));

macro_rules! rx_warn {
    ($($arg:tt)*) => {
        if let Some(held_back) = RX_WARN.check() {
            tracing::warn!(held_back, $($arg)*);
        }
    };
}

/// One pair's receive state, kept between passes.
pub struct RxState {
    /// The frame being delivered, its virtio-net header first.
    buf: Vec<u8>,
    /// Bytes of `buf` that make the frame; 0 when there is none.
    frame_len: usize,
    /// Bytes of it already in guest buffers.
    written: usize,
    /// Those buffers, taken and filled, not yet in the used ring.
    held: Vec<(Ticket, u32)>,
    /// The first buffer's segments: its `num_buffers` is written once the count is known.
    first: Vec<(GuestAddress, usize)>,
    /// The used index at the last interrupt decision (EVENT_IDX), None after a ring start.
    old_used: Option<Wrapping<u16>>,
}

impl Default for RxState {
    fn default() -> Self {
        RxState {
            buf: vec![0; HDR_LEN + MAX_FRAME],
            frame_len: 0,
            written: 0,
            held: Vec::new(),
            first: Vec::new(),
            old_used: None,
        }
    }
}

impl RxState {
    /// The ring (re)starts: forget the interrupt bookkeeping.
    pub fn ring_started(&mut self) {
        self.old_used = None;
    }

    /// The ring stops (GET_VRING_BASE): the buffers held for an unfinished frame go back to
    /// the available side (they are the last ones taken), so the base the frontend keeps
    /// still offers them; the frame is dropped.
    pub fn ring_stopped(&mut self, vring: &VringRwLock) {
        if !self.held.is_empty() {
            let n = self.held.len() as u16;
            let next = vring.queue_next_avail();
            vring.set_queue_next_avail(next.wrapping_sub(n));
            tracing::debug!(buffers = n, "receive buffers of an unfinished frame handed back");
        }
        self.reset();
    }

    fn reset(&mut self) {
        self.frame_len = 0;
        self.written = 0;
        self.held.clear();
        self.first.clear();
    }

    /// Buffers taken and held for an unfinished frame.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// What one receive pass works with.
pub struct Rx<'a, M: Deref<Target = GuestMemoryMmap> + Clone> {
    pub nic: &'a Nic,
    pub port: &'a Port,
    pub queue: &'a TrackedQueue,
    pub vring: &'a VringRwLock,
    pub mem: M,
    pub hdr_len: usize,
    pub mergeable: bool,
    pub event_idx: bool,
}

enum Fill {
    /// The frame is in guest buffers, ready to publish.
    Done,
    /// No buffers left: wait for the guest.
    Starved,
    /// The frame was given up (bad buffer, too small); the buffers went back empty.
    Dropped,
}

impl<M: Deref<Target = GuestMemoryMmap> + Clone> Rx<'_, M> {
    /// Delivers frames until the port has none or the guest has no buffers; interrupts the
    /// guest if anything was published and it wants to know.
    pub fn pass(&self, st: &mut RxState) -> io::Result<()> {
        let before = Wrapping(self.vring.get_ref().get_queue().next_used());
        let mut published = false;
        loop {
            if st.frame_len == 0 && !self.read_frame(st)? {
                break;
            }
            match self.fill(st)? {
                Fill::Starved => break,
                Fill::Dropped => {
                    published = true;
                    st.reset();
                }
                Fill::Done => {
                    let n = st.held.len() as u16;
                    if self.hdr_len == HDR_LEN {
                        write_at(&*self.mem, &st.first, NUM_BUFFERS_AT, &n.to_le_bytes());
                    }
                    if self.queue.add_used_batch(self.vring, &*self.mem, &st.held) {
                        add(&self.nic.counters.rx_frames, 1);
                        add(&self.nic.counters.rx_bytes, (st.frame_len - self.hdr_len) as u64);
                        published = true;
                    } else {
                        add(&self.nic.counters.rx_dropped, 1);
                    }
                    st.reset();
                }
            }
        }
        if published {
            self.signal(st, before)?;
        }
        Ok(())
    }

    /// Reads the next frame from the port into `st`; false when none waits. Frames that
    /// cannot be delivered (link down, oversize, empty) are dropped here.
    fn read_frame(&self, st: &mut RxState) -> io::Result<bool> {
        let vnet = self.port.vnet_hdr();
        let hdr = self.hdr_len;
        loop {
            let (off, room) = if vnet { (0, hdr + MAX_FRAME) } else { (hdr, MAX_FRAME) };
            let n = match self.port.recv(&mut st.buf[off..off + room]) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(false),
                Err(e) => {
                    rx_warn!(nic = %self.nic.id, "reading from the host side: {e}");
                    return Ok(false);
                }
            };
            if !self.nic.link_up() {
                add(&self.nic.counters.rx_dropped, 1);
                continue;
            }
            let total = off + n;
            if n > room || total > hdr + MAX_FRAME {
                add(&self.nic.counters.rx_dropped, 1);
                rx_warn!(nic = %self.nic.id, len = n, "oversize frame from the host side dropped");
                continue;
            }
            if total <= hdr {
                add(&self.nic.counters.rx_dropped, 1);
                continue;
            }
            if !vnet {
                // No offload claimed: a plain header.
                st.buf[..hdr].fill(0);
            }
            st.frame_len = total;
            st.written = 0;
            return Ok(true);
        }
    }

    fn fill(&self, st: &mut RxState) -> io::Result<Fill> {
        while st.written < st.frame_len {
            let Some(taken) = self.queue.pop(self.vring, self.mem.clone()) else {
                if self.queue.enable_notification(self.vring)? {
                    continue;
                }
                return Ok(Fill::Starved);
            };
            let left = st.frame_len - st.written;
            let segs = match chain::writable_segments(&taken.chain, left) {
                Ok(s) => s,
                Err(e) => {
                    add(&self.nic.counters.bad_chains, 1);
                    rx_warn!(nic = %self.nic.id, head = taken.ticket.head(), "receive buffer refused: {e}");
                    return Ok(self.give_up(st, taken.ticket));
                }
            };
            let cap: usize = segs.iter().map(|s| s.1).sum();
            if cap == 0 || (!self.mergeable && cap < left) || (st.written == 0 && cap < self.hdr_len) {
                add(&self.nic.counters.rx_dropped, 1);
                rx_warn!(nic = %self.nic.id, frame = st.frame_len, buffer = cap, "receive buffer too small: frame dropped");
                return Ok(self.give_up(st, taken.ticket));
            }
            let n = cap.min(left);
            let done = write_at(&*self.mem, &segs, 0, &st.buf[st.written..st.written + n]);
            if done != n {
                add(&self.nic.counters.bad_chains, 1);
                return Ok(self.give_up(st, taken.ticket));
            }
            if st.written == 0 {
                st.first = segs;
            }
            st.held.push((taken.ticket, n as u32));
            st.written += n;
        }
        Ok(Fill::Done)
    }

    /// Returns the frame's buffers and `last` to the guest empty (a driver drops a buffer
    /// shorter than a header as a runt), and drops the frame.
    fn give_up(&self, st: &mut RxState, last: Ticket) -> Fill {
        let mut items: Vec<(Ticket, u32)> = st.held.iter().map(|&(t, _)| (t, 0)).collect();
        items.push((last, 0));
        // Each an element of its own for the driver, all published at once.
        self.queue.add_used_batch(self.vring, &*self.mem, &items);
        add(&self.nic.counters.rx_dropped, 1);
        st.reset();
        Fill::Dropped
    }

    /// Interrupts the guest unless EVENT_IDX says it does not want it: with a batch counted
    /// as one element by the ring, the decision is taken here from the used index of the last
    /// decision and the driver's `used_event`.
    fn signal(&self, st: &mut RxState, before: Wrapping<u16>) -> io::Result<()> {
        let notify = if self.event_idx {
            let (new, used_event) = {
                let state = self.vring.get_ref();
                let q = state.get_queue();
                fence(Ordering::SeqCst);
                let at = q.avail_ring() + 4 + 2 * u64::from(q.size());
                let ev: u16 = self.mem.read_obj(GuestAddress(at)).map(u16::from_le).unwrap_or(0);
                (Wrapping(q.next_used()), Wrapping(ev))
            };
            let old = st.old_used.unwrap_or(before);
            st.old_used = Some(new);
            // Reset the ring's own count; its answer knows nothing of batches.
            let _ = self.vring.needs_notification();
            (new - used_event - Wrapping(1)) < (new - old)
        } else {
            true
        };
        if notify {
            self.vring.signal_used_queue()?;
        }
        Ok(())
    }
}
