//! Hand-written declarations for the part of libslirp 4.7's `libslirp.h` this crate calls.
//!
//! Why not crates.io's `libslirp-sys` 4.2.1: its `SlirpCb` stops at `notify` (no
//! `init_completed`/`timer_new_opaque`, which libslirp reads once `SlirpConfig.version >= 4`),
//! its `SlirpConfig` has no `disable_dhcp`, it lacks `slirp_handle_timer`, and its build script
//! asks pkg-config for `slirp`, which fails on Debian unless libglib2.0-dev is installed too.
//! The layouts below follow `/usr/include/slirp/libslirp.h` (4.7.0) field by field.

use libc::{c_char, c_int, c_void, in6_addr, in_addr, sockaddr_in, sockaddr_in6};

/// libslirp's opaque stack state.
#[repr(C)]
pub struct Slirp {
    _private: [u8; 0],
}

pub const SLIRP_POLL_IN: c_int = 1 << 0;
pub const SLIRP_POLL_OUT: c_int = 1 << 1;
pub const SLIRP_POLL_PRI: c_int = 1 << 2;
pub const SLIRP_POLL_ERR: c_int = 1 << 3;
pub const SLIRP_POLL_HUP: c_int = 1 << 4;

/// `SlirpTimerId` (a C enum: int-sized).
pub type SlirpTimerId = c_int;

pub type SlirpWriteCb = unsafe extern "C" fn(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize;
pub type SlirpTimerCb = unsafe extern "C" fn(opaque: *mut c_void);
pub type SlirpAddPollCb = unsafe extern "C" fn(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int;
pub type SlirpGetREventsCb = unsafe extern "C" fn(idx: c_int, opaque: *mut c_void) -> c_int;

/// `SlirpCb`, through the fields of config version 4.
#[repr(C)]
pub struct SlirpCb {
    pub send_packet: Option<SlirpWriteCb>,
    pub guest_error: Option<unsafe extern "C" fn(msg: *const c_char, opaque: *mut c_void)>,
    pub clock_get_ns: Option<unsafe extern "C" fn(opaque: *mut c_void) -> i64>,
    pub timer_new:
        Option<unsafe extern "C" fn(cb: SlirpTimerCb, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void>,
    pub timer_free: Option<unsafe extern "C" fn(timer: *mut c_void, opaque: *mut c_void)>,
    pub timer_mod: Option<unsafe extern "C" fn(timer: *mut c_void, expire_time_ms: i64, opaque: *mut c_void)>,
    pub register_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    pub unregister_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    pub notify: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    // Version 4.
    pub init_completed: Option<unsafe extern "C" fn(slirp: *mut Slirp, opaque: *mut c_void)>,
    pub timer_new_opaque:
        Option<unsafe extern "C" fn(id: SlirpTimerId, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void>,
}

/// The `SlirpConfig.version` this layout describes.
pub const SLIRP_CONFIG_VERSION: u32 = 4;

/// `SlirpConfig`, through the fields of version 4.
#[repr(C)]
pub struct SlirpConfig {
    pub version: u32,
    // Version 1.
    pub restricted: c_int,
    pub in_enabled: bool,
    pub vnetwork: in_addr,
    pub vnetmask: in_addr,
    pub vhost: in_addr,
    pub in6_enabled: bool,
    pub vprefix_addr6: in6_addr,
    pub vprefix_len: u8,
    pub vhost6: in6_addr,
    pub vhostname: *const c_char,
    pub tftp_server_name: *const c_char,
    pub tftp_path: *const c_char,
    pub bootfile: *const c_char,
    pub vdhcp_start: in_addr,
    pub vnameserver: in_addr,
    pub vnameserver6: in6_addr,
    pub vdnssearch: *mut *const c_char,
    pub vdomainname: *const c_char,
    pub if_mtu: usize,
    pub if_mru: usize,
    pub disable_host_loopback: bool,
    pub enable_emu: bool,
    // Version 2.
    pub outbound_addr: *mut sockaddr_in,
    pub outbound_addr6: *mut sockaddr_in6,
    // Version 3.
    pub disable_dns: bool,
    // Version 4.
    pub disable_dhcp: bool,
}

extern "C" {
    pub fn slirp_new(cfg: *const SlirpConfig, callbacks: *const SlirpCb, opaque: *mut c_void) -> *mut Slirp;
    pub fn slirp_cleanup(slirp: *mut Slirp);
    pub fn slirp_pollfds_fill(slirp: *mut Slirp, timeout: *mut u32, add_poll: SlirpAddPollCb, opaque: *mut c_void);
    pub fn slirp_pollfds_poll(
        slirp: *mut Slirp,
        select_error: c_int,
        get_revents: SlirpGetREventsCb,
        opaque: *mut c_void,
    );
    pub fn slirp_input(slirp: *mut Slirp, pkt: *const u8, pkt_len: c_int);
    pub fn slirp_handle_timer(slirp: *mut Slirp, id: SlirpTimerId, cb_opaque: *mut c_void);
    pub fn slirp_add_hostfwd(
        slirp: *mut Slirp,
        is_udp: c_int,
        host_addr: in_addr,
        host_port: c_int,
        guest_addr: in_addr,
        guest_port: c_int,
    ) -> c_int;
    pub fn slirp_version_string() -> *const c_char;
}
