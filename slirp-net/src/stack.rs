//! [`SlirpNet`]: one libslirp instance on its own thread, exchanging Ethernet frames over a unix
//! SOCK_SEQPACKET socketpair (one frame per datagram, no vnet header).

use std::cell::RefCell;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use libc::{c_int, c_void};

use crate::callbacks::{self, CallbackCtx, CALLBACKS};
use crate::config::{ConfigError, HostFwdProtocol, SlirpConfig};
use crate::ffi;
use crate::stats::{Counters, SlirpNetStats};
use crate::timers::{TimerAction, TimerTable};

/// The longest the loop sleeps without libslirp asking for less: only bounds how stale its
/// slow timers may get, since stopping wakes it through an eventfd.
const MAX_SLEEP_MS: u32 = 1000;
/// Frames read from the socket per loop round, so a flooding guest cannot starve the host sockets.
const FRAMES_PER_ROUND: usize = 64;
/// Room for an Ethernet header, a VLAN tag and a 64 KiB IP packet; anything longer is dropped.
const FRAME_BUFFER: usize = 14 + 4 + 65_535;
/// Socket buffer asked for on both ends (capped by net.core.wmem_max): room for bursts of full
/// TCP windows before a slow reader starts losing frames.
const SOCKET_BUFFER: c_int = 1 << 20;

/// Why a stack could not start.
#[derive(Debug, thiserror::Error)]
pub enum SlirpError {
    #[error("slirp-net: {0}")]
    Config(#[from] ConfigError),
    #[error("slirp-net: cannot {what}: {source}")]
    Os { what: &'static str, source: io::Error },
    #[error("slirp-net: libslirp refused the configuration (slirp_new returned NULL)")]
    SlirpNew,
    #[error("slirp-net: cannot set up hostfwd '{rule}': {source}")]
    HostFwd { rule: String, source: io::Error },
    #[error("slirp-net: the stack's thread ended before reporting it had started")]
    ThreadDied,
}

fn os_error(what: &'static str) -> SlirpError {
    SlirpError::Os { what, source: io::Error::last_os_error() }
}

/// A running user-mode network. Dropping it stops its thread and frees libslirp (closing the
/// forwarded ports); the peer then sees the socket hang up.
pub struct SlirpNet {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl SlirpNet {
    /// Starts libslirp for `config` on a thread of its own and returns the guest's end of the frame
    /// socket: a SOCK_SEQPACKET unix socket, one Ethernet frame per datagram, no vnet header.
    /// Frames written to it reach libslirp; frames libslirp sends arrive on it. The fd has
    /// FD_CLOEXEC set; clear it to hand the socket to another process across exec. The thread ends
    /// on drop, or by itself once the peer closes its end.
    pub fn spawn(config: SlirpConfig) -> Result<(SlirpNet, OwnedFd), SlirpError> {
        config.validate()?;
        let (stack_end, guest_end) = frame_socketpair()?;
        // SAFETY: eventfd() takes no pointers; the result is checked before use.
        let stop_raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop_raw < 0 {
            return Err(os_error("create the stop eventfd"));
        }
        // SAFETY: a fresh fd nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(stop_raw) };
        let stop_for_thread =
            stop.try_clone().map_err(|source| SlirpError::Os { what: "duplicate the stop eventfd", source })?;
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("slirp-net".to_owned())
            .spawn(move || run_stack(&config, stack_end, stop_for_thread, thread_counters, ready_tx))
            .map_err(|source| SlirpError::Os { what: "start the stack's thread", source })?;
        let started = ready_rx.recv();
        let net = SlirpNet { stop, thread: Some(thread), counters };
        match started {
            Ok(Ok(())) => Ok((net, guest_end)),
            Ok(Err(error)) => Err(error),
            Err(mpsc::RecvError) => Err(SlirpError::ThreadDied),
        }
    }

    pub fn stats(&self) -> SlirpNetStats {
        self.counters.snapshot()
    }

    /// False once the thread has ended (the peer closed its end, or libslirp failed to start).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|thread| !thread.is_finished())
    }
}

impl Drop for SlirpNet {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd this handle owns.
        let written = unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if written != 8 {
            tracing::warn!(error = %io::Error::last_os_error(), "slirp-net: cannot signal the stack to stop");
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("slirp-net: the stack's thread panicked");
            }
        }
    }
}

fn frame_socketpair() -> Result<(OwnedFd, OwnedFd), SlirpError> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: socketpair writes two fds into the two-element array.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(os_error("create the frame socketpair"));
    }
    // SAFETY: two fresh fds nothing else owns.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&ours, &theirs] {
        // Best effort: a smaller buffer only means drops come sooner.
        // SAFETY: passes a live c_int of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&SOCKET_BUFFER as *const c_int).cast(),
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        };
    }
    Ok((ours, theirs))
}

/// The stack's thread: libslirp is made, used and freed here only (it is not thread-safe).
fn run_stack(
    config: &SlirpConfig,
    frames: OwnedFd,
    stop: OwnedFd,
    counters: Arc<Counters>,
    ready: mpsc::SyncSender<Result<(), SlirpError>>,
) {
    let ctx = CallbackCtx {
        frames_fd: frames.as_raw_fd(),
        counters,
        clock_start: Instant::now(),
        timers: RefCell::new(TimerTable::default()),
        pollfds: RefCell::new(Vec::new()),
    };
    let stack = match Stack::new(config, &ctx) {
        Ok(stack) => stack,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    tracing::info!(
        libslirp = %crate::libslirp_version(),
        net = %config.net, host = %config.host, restrict = config.restrict, hostfwd = config.hostfwd.len(),
        "slirp-net: user network up"
    );
    let _ = ready.send(Ok(()));
    stack.run(&ctx, frames.as_raw_fd(), stop.as_raw_fd());
    // libslirp goes first: slirp_cleanup still calls back into `ctx` and sends on `frames`.
    drop(stack);
}

/// One libslirp instance, freed on drop. Must not outlive the `CallbackCtx` it was made with.
struct Stack {
    slirp: NonNull<ffi::Slirp>,
    opaque: *mut c_void,
}

impl Stack {
    fn new(config: &SlirpConfig, ctx: &CallbackCtx) -> Result<Stack, SlirpError> {
        let ffi_config = ffi_config(config);
        // Callbacks only ever take shared references through it (callbacks.rs).
        let opaque = (ctx as *const CallbackCtx).cast_mut().cast::<c_void>();
        // SAFETY: the config is complete for version 4 and read during the call only; CALLBACKS is
        // static; `opaque` stays valid while the Stack lives (its owner drops it before ctx).
        let slirp = unsafe { ffi::slirp_new(&ffi_config, &CALLBACKS, opaque) };
        let stack = Stack { slirp: NonNull::new(slirp).ok_or(SlirpError::SlirpNew)?, opaque };
        for rule in &config.hostfwd {
            let guest_addr = rule.guest_addr.unwrap_or(config.dhcp_start);
            let is_udp = c_int::from(rule.protocol == HostFwdProtocol::Udp);
            // SAFETY: a live Slirp; the addresses are passed by value.
            let rc = unsafe {
                ffi::slirp_add_hostfwd(
                    stack.slirp.as_ptr(),
                    is_udp,
                    in_addr(rule.host_addr),
                    c_int::from(rule.host_port),
                    in_addr(guest_addr),
                    c_int::from(rule.guest_port),
                )
            };
            if rc < 0 {
                // libslirp keeps bind()'s errno for its caller.
                return Err(SlirpError::HostFwd { rule: rule.to_string(), source: io::Error::last_os_error() });
            }
        }
        Ok(stack)
    }

    /// The poll loop: the stop eventfd, the frame socket and libslirp's own sockets in one poll(),
    /// bounded by libslirp's timeout and the earliest timer. Returns when told to stop or when the
    /// peer hangs up.
    fn run(&self, ctx: &CallbackCtx, frames_fd: RawFd, stop_fd: RawFd) {
        let mut frame = vec![0u8; FRAME_BUFFER];
        loop {
            {
                let mut pollfds = ctx.pollfds.borrow_mut();
                pollfds.clear();
                pollfds.push(libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 });
                pollfds.push(libc::pollfd { fd: frames_fd, events: libc::POLLIN, revents: 0 });
            }
            let mut timeout_ms = MAX_SLEEP_MS;
            // SAFETY: a live Slirp; add_poll takes `opaque` as the CallbackCtx it is.
            unsafe { ffi::slirp_pollfds_fill(self.slirp.as_ptr(), &mut timeout_ms, callbacks::add_poll, self.opaque) };
            let timer_wait = ctx.timers.borrow().next_due_in(ctx.now_ms()).unwrap_or(i64::MAX);
            let wait = c_int::try_from(i64::from(timeout_ms.min(MAX_SLEEP_MS)).min(timer_wait)).unwrap_or(0);
            let ready = {
                let mut pollfds = ctx.pollfds.borrow_mut();
                // SAFETY: poll reads and writes exactly pollfds.len() entries of a live Vec.
                unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, wait) }
            };
            let poll_failed = ready < 0;
            if poll_failed {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(%error, "slirp-net: poll failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            let (stop_revents, frames_revents) = {
                let pollfds = ctx.pollfds.borrow();
                (pollfds[0].revents, pollfds[1].revents)
            };
            if stop_revents & libc::POLLIN != 0 {
                tracing::debug!("slirp-net: stopping");
                return;
            }
            // SAFETY: a live Slirp; get_revents takes `opaque` as the CallbackCtx it is.
            unsafe {
                ffi::slirp_pollfds_poll(
                    self.slirp.as_ptr(),
                    c_int::from(poll_failed),
                    callbacks::get_revents,
                    self.opaque,
                )
            };
            if frames_revents & libc::POLLIN != 0 {
                self.take_frames(ctx, frames_fd, &mut frame);
            }
            if frames_revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                tracing::info!("slirp-net: the guest side closed its socket; stopping");
                return;
            }
            self.fire_timers(ctx);
        }
    }

    /// Up to FRAMES_PER_ROUND frames from the socket into libslirp.
    fn take_frames(&self, ctx: &CallbackCtx, frames_fd: RawFd, frame: &mut [u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        for _ in 0..FRAMES_PER_ROUND {
            // MSG_TRUNC: the datagram's real length comes back, so an oversize one is seen as such.
            // SAFETY: recv writes at most frame.len() bytes into the live buffer.
            let got = unsafe {
                libc::recv(frames_fd, frame.as_mut_ptr().cast(), frame.len(), libc::MSG_DONTWAIT | libc::MSG_TRUNC)
            };
            let len = match usize::try_from(got) {
                // Zero: an empty datagram or the peer gone (POLLHUP tells which); nothing to feed.
                Ok(0) => break,
                Ok(len) => len,
                Err(_) => {
                    let error = io::Error::last_os_error();
                    match error.kind() {
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::WouldBlock => {}
                        _ => tracing::warn!(%error, "slirp-net: reading a frame failed"),
                    }
                    break;
                }
            };
            if len > frame.len() {
                ctx.counters.dropped_oversize.fetch_add(1, Relaxed);
                continue;
            }
            ctx.counters.frames_from_guest.fetch_add(1, Relaxed);
            // SAFETY: a live Slirp; `len` bytes of `frame` are initialised, and len <= FRAME_BUFFER fits an int.
            unsafe { ffi::slirp_input(self.slirp.as_ptr(), frame.as_ptr(), len as c_int) };
        }
    }

    fn fire_timers(&self, ctx: &CallbackCtx) {
        let due = ctx.timers.borrow_mut().take_due(ctx.now_ms());
        for handle in due {
            // Looked up again: an earlier timer's callback may have freed this one.
            let Some(action) = ctx.timers.borrow().action(handle) else { continue };
            match action {
                // SAFETY: libslirp's own callback with the opaque it registered; no borrow is held.
                TimerAction::Callback { cb, cb_opaque } => unsafe { cb(cb_opaque) },
                // SAFETY: a live Slirp, and the id and opaque it gave timer_new_opaque.
                TimerAction::Handle { id, cb_opaque } => unsafe {
                    ffi::slirp_handle_timer(self.slirp.as_ptr(), id, cb_opaque)
                },
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: a live Slirp, freed once; its CallbackCtx outlives this call (run_stack).
        unsafe { ffi::slirp_cleanup(self.slirp.as_ptr()) };
    }
}

fn in_addr(addr: Ipv4Addr) -> libc::in_addr {
    libc::in_addr { s_addr: u32::from(addr).to_be() }
}

fn in6_addr(segments: [u16; 8]) -> libc::in6_addr {
    libc::in6_addr { s6_addr: std::net::Ipv6Addr::from(segments).octets() }
}

fn ffi_config(config: &SlirpConfig) -> ffi::SlirpConfig {
    ffi::SlirpConfig {
        version: ffi::SLIRP_CONFIG_VERSION,
        restricted: c_int::from(config.restrict),
        in_enabled: true,
        vnetwork: in_addr(config.net),
        vnetmask: in_addr(config.netmask),
        vhost: in_addr(config.host),
        // IPv6 off; QEMU's default prefix and addresses are still filled in, as QEMU passes them.
        in6_enabled: false,
        vprefix_addr6: in6_addr([0xfec0, 0, 0, 0, 0, 0, 0, 0]),
        vprefix_len: 64,
        vhost6: in6_addr([0xfec0, 0, 0, 0, 0, 0, 0, 2]),
        vhostname: std::ptr::null(),
        tftp_server_name: std::ptr::null(),
        tftp_path: std::ptr::null(),
        bootfile: std::ptr::null(),
        vdhcp_start: in_addr(config.dhcp_start),
        vnameserver: in_addr(config.dns),
        vnameserver6: in6_addr([0xfec0, 0, 0, 0, 0, 0, 0, 3]),
        vdnssearch: std::ptr::null_mut(),
        vdomainname: std::ptr::null(),
        // 0: libslirp's defaults (1500).
        if_mtu: 0,
        if_mru: 0,
        disable_host_loopback: false,
        enable_emu: false,
        outbound_addr: std::ptr::null_mut(),
        outbound_addr6: std::ptr::null_mut(),
        disable_dns: false,
        disable_dhcp: false,
    }
}
