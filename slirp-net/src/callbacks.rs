//! libslirp's callbacks (`SlirpCb`) and the per-stack state they reach through `opaque`.
//!
//! Everything here runs on the stack's own thread, inside a libslirp call the poll loop made; the
//! loop holds only shared references to [`CallbackCtx`] across those calls and every mutable part is
//! in a `RefCell` borrowed for a moment, so a callback never aliases a live `&mut`.

use std::cell::RefCell;
use std::ffi::CStr;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use libc::{c_char, c_int, c_void};

use crate::ffi::{self, SlirpTimerCb, SlirpTimerId};
use crate::stats::Counters;
use crate::timers::{TimerAction, TimerTable};

/// What libslirp's callbacks reach through their `opaque` argument.
pub(crate) struct CallbackCtx {
    /// The stack's end of the frame socket (owned by the poll loop, which outlives libslirp).
    pub(crate) frames_fd: RawFd,
    pub(crate) counters: Arc<Counters>,
    pub(crate) clock_start: Instant,
    pub(crate) timers: RefCell<TimerTable>,
    /// The poll set being built by `slirp_pollfds_fill` and read back by `slirp_pollfds_poll`.
    pub(crate) pollfds: RefCell<Vec<libc::pollfd>>,
}

impl CallbackCtx {
    pub(crate) fn now_ns(&self) -> i64 {
        i64::try_from(self.clock_start.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }

    pub(crate) fn now_ms(&self) -> i64 {
        self.now_ns() / 1_000_000
    }
}

/// The callback table handed to `slirp_new`; libslirp keeps the pointer, hence a static.
pub(crate) static CALLBACKS: ffi::SlirpCb = ffi::SlirpCb {
    send_packet: Some(send_packet),
    guest_error: Some(guest_error),
    clock_get_ns: Some(clock_get_ns),
    timer_new: Some(timer_new),
    timer_free: Some(timer_free),
    timer_mod: Some(timer_mod),
    // The poll loop asks libslirp for its fds every round (slirp_pollfds_fill), so it needs no
    // separate registry, and nothing outside the thread feeds libslirp, so there is nothing to wake.
    register_poll_fd: Some(ignore_fd),
    unregister_poll_fd: Some(ignore_fd),
    notify: Some(notify),
    init_completed: None,
    timer_new_opaque: Some(timer_new_opaque),
};

/// # Safety
/// `opaque` is the `CallbackCtx` pointer the poll loop gave libslirp, alive while libslirp is.
unsafe fn ctx<'a>(opaque: *mut c_void) -> &'a CallbackCtx {
    // SAFETY: the caller's contract above.
    unsafe { &*opaque.cast::<CallbackCtx>() }
}

/// A frame for the guest: one datagram on the socket, never waiting. A full socket drops the frame
/// (libslirp's contract allows it: TCP retransmits) and counts it.
unsafe extern "C" fn send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    // SAFETY: libslirp passes back the opaque given to slirp_new.
    let ctx = unsafe { ctx(opaque) };
    // SAFETY: libslirp hands a readable frame of `len` bytes; send() does not keep it.
    let sent = unsafe { libc::send(ctx.frames_fd, buf, len, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if sent >= 0 {
        ctx.counters.frames_to_guest.fetch_add(1, Ordering::Relaxed);
    } else {
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                ctx.counters.dropped_socket_full.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                ctx.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, len, "slirp-net: frame to the guest lost");
            }
        }
    }
    // Lost or not, the frame is gone: an error return would only make libslirp log it.
    isize::try_from(len).unwrap_or(isize::MAX)
}

unsafe extern "C" fn guest_error(msg: *const c_char, _opaque: *mut c_void) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libslirp passes a NUL-terminated message valid for the call.
    let msg = unsafe { CStr::from_ptr(msg) };
    tracing::warn!(message = %msg.to_string_lossy(), "slirp-net: guest error");
}

unsafe extern "C" fn clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: libslirp passes back the opaque given to slirp_new.
    unsafe { ctx(opaque) }.now_ns()
}

fn new_timer(opaque: *mut c_void, action: TimerAction) -> *mut c_void {
    // SAFETY: libslirp passes back the opaque given to slirp_new.
    let ctx = unsafe { ctx(opaque) };
    let handle = ctx.timers.borrow_mut().create(action);
    // A token, not an address: see timers.rs.
    handle as *mut c_void
}

unsafe extern "C" fn timer_new(cb: SlirpTimerCb, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void {
    new_timer(opaque, TimerAction::Callback { cb, cb_opaque })
}

unsafe extern "C" fn timer_new_opaque(id: SlirpTimerId, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void {
    new_timer(opaque, TimerAction::Handle { id, cb_opaque })
}

unsafe extern "C" fn timer_free(timer: *mut c_void, opaque: *mut c_void) {
    // SAFETY: libslirp passes back the opaque given to slirp_new.
    unsafe { ctx(opaque) }.timers.borrow_mut().remove(timer as usize);
}

unsafe extern "C" fn timer_mod(timer: *mut c_void, expire_time_ms: i64, opaque: *mut c_void) {
    // SAFETY: libslirp passes back the opaque given to slirp_new.
    unsafe { ctx(opaque) }.timers.borrow_mut().arm(timer as usize, expire_time_ms);
}

unsafe extern "C" fn ignore_fd(_fd: c_int, _opaque: *mut c_void) {}

unsafe extern "C" fn notify(_opaque: *mut c_void) {}

/// `slirp_pollfds_fill`'s callback: one more fd in the poll set; returns its index.
pub(crate) unsafe extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: the poll loop passes its CallbackCtx as this call's opaque.
    let ctx = unsafe { ctx(opaque) };
    let mut pollfds = ctx.pollfds.borrow_mut();
    pollfds.push(libc::pollfd { fd, events: to_poll_events(events), revents: 0 });
    c_int::try_from(pollfds.len() - 1).unwrap_or(c_int::MAX)
}

/// `slirp_pollfds_poll`'s callback: what poll() saw on the fd at `idx`.
pub(crate) unsafe extern "C" fn get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: the poll loop passes its CallbackCtx as this call's opaque.
    let ctx = unsafe { ctx(opaque) };
    let pollfds = ctx.pollfds.borrow();
    usize::try_from(idx).ok().and_then(|idx| pollfds.get(idx)).map_or(0, |pollfd| from_poll_events(pollfd.revents))
}

const FLAG_PAIRS: [(c_int, libc::c_short); 5] = [
    (ffi::SLIRP_POLL_IN, libc::POLLIN),
    (ffi::SLIRP_POLL_OUT, libc::POLLOUT),
    (ffi::SLIRP_POLL_PRI, libc::POLLPRI),
    (ffi::SLIRP_POLL_ERR, libc::POLLERR),
    (ffi::SLIRP_POLL_HUP, libc::POLLHUP),
];

fn to_poll_events(slirp: c_int) -> libc::c_short {
    FLAG_PAIRS.iter().filter(|(s, _)| slirp & s != 0).fold(0, |acc, (_, p)| acc | p)
}

fn from_poll_events(revents: libc::c_short) -> c_int {
    FLAG_PAIRS.iter().filter(|(_, p)| revents & p != 0).fold(0, |acc, (s, _)| acc | s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_flags_round_trip() {
        let all =
            ffi::SLIRP_POLL_IN | ffi::SLIRP_POLL_OUT | ffi::SLIRP_POLL_PRI | ffi::SLIRP_POLL_ERR | ffi::SLIRP_POLL_HUP;
        assert_eq!(from_poll_events(to_poll_events(all)), all);
        assert_eq!(to_poll_events(ffi::SLIRP_POLL_IN), libc::POLLIN);
        assert_eq!(from_poll_events(libc::POLLOUT | libc::POLLNVAL), ffi::SLIRP_POLL_OUT);
    }
}
