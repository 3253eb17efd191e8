//! Opening a NIC's tap for netd, which holds no CAP_NET_ADMIN: the launcher opens
//! `/dev/net/tun` once per queue pair and attaches each descriptor to the interface with
//! TUNSETIFF (IFF_TAP | IFF_NO_PI, IFF_VNET_HDR unless `vnet_hdr=off`, IFF_MULTI_QUEUE for a
//! multiqueue tap), or takes a descriptor it inherited (`fd=`). The descriptors stay open in the
//! launcher for the VM's life (a tap the launcher made goes with them) and netd inherits them at
//! every start, under the same numbers.
//!
//! This runs before anything else starts, so a tap that cannot be had fails the launch with
//! nothing left running.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUN_DEVICE: &str = "/dev/net/tun";
/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOR('T', 210, unsigned int)`
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_VNET_HDR: i16 = 0x4000;
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF / TUNGETIFF use it (name, then the flags of the union).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> IfReq {
        let mut r = IfReq { name: [0; IFNAMSIZ], flags, _pad: [0; 22] };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// A tap's descriptors, one per queue pair.
#[derive(Debug)]
pub struct TapQueues {
    /// The interface's name as the kernel reports it.
    pub ifname: String,
    pub fds: Vec<OwnedFd>,
    /// Opened with IFF_VNET_HDR.
    pub vnet_hdr: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("interface name '{0}' is too long (at most 15 bytes)")]
    NameTooLong(String),
    #[error("could not open {TUN_DEVICE} for the tap '{ifname}': {}{}", strerror(.source), hint(.ifname, .source, *.exists))]
    Open {
        ifname: String,
        exists: bool,
        #[source]
        source: io::Error,
    },
    #[error("could not configure {TUN_DEVICE} ({ifname}): {}{}", strerror(.source), hint(.ifname, .source, *.exists))]
    SetIff {
        ifname: String,
        exists: bool,
        #[source]
        source: io::Error,
    },
    #[error("fd={fd}: {what}: {source}")]
    BadFd {
        fd: RawFd,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("fd={0}: not a tap descriptor (a tun device, IFF_TUN)")]
    NotTap(RawFd),
}

/// An OS error in QEMU's words (strerror, without Rust's "(os error N)").
fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// What the user can do about a failed open or TUNSETIFF.
fn hint(ifname: &str, e: &io::Error, exists: bool) -> String {
    let shown = if ifname.is_empty() { "a new tap" } else { ifname };
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) if !exists => format!(
            "\nthe tap '{shown}' does not exist and this user may not create it (that needs CAP_NET_ADMIN); \
             create it first: ip tuntap add dev {} mode tap user $USER",
            if ifname.is_empty() { "NAME" } else { ifname }
        ),
        Some(libc::EPERM | libc::EACCES) => format!(
            "\nthe tap '{shown}' exists but this user may not attach to it; make it yours: \
             ip tuntap add dev {shown} mode tap user $USER"
        ),
        Some(libc::EINVAL) if exists => format!(
            "\n'{shown}' is not a tap, or it was made with a different multi_queue setting than queues= asks for"
        ),
        Some(libc::EBUSY) => format!("\nthe tap '{shown}' is in use by another process"),
        _ => String::new(),
    }
}

/// Whether a network interface of this name exists in this process's network namespace
/// (if_nametoindex asks the kernel; /sys/class/net would show the namespace sysfs was mounted in).
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else { return false };
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    !name.is_empty() && unsafe { libc::if_nametoindex(c.as_ptr()) } != 0
}

/// Opens `queues` descriptors of the tap `ifname` (a new `tap%d` when None), creating it when
/// it does not exist and this process may.
pub fn open(ifname: Option<&str>, queues: u16, multi_queue: bool, vnet_hdr: bool) -> Result<TapQueues, TapError> {
    let requested = ifname.unwrap_or("");
    if requested.len() >= IFNAMSIZ {
        return Err(TapError::NameTooLong(requested.to_string()));
    }
    let exists = interface_exists(requested);
    let mut flags = IFF_TAP | IFF_NO_PI;
    if vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    if multi_queue || queues > 1 {
        flags |= IFF_MULTI_QUEUE;
    }
    let mut name = requested.to_string();
    let mut fds = Vec::with_capacity(usize::from(queues));
    for _ in 0..queues.max(1) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(TUN_DEVICE)
            .map_err(|source| TapError::Open { ifname: name.clone(), exists, source })?;
        let mut req = IfReq::new(&name, flags);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (40 bytes, C
        // layout); the descriptor is open.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(TapError::SetIff { ifname: name, exists, source: io::Error::last_os_error() });
        }
        // The kernel names a new tap; every further queue attaches to that one.
        name = req.name();
        fds.push(OwnedFd::from(f));
    }
    tracing::info!(ifname = %name, queues, vnet_hdr, "tap opened");
    Ok(TapQueues { ifname: name, fds, vnet_hdr })
}

/// Takes over an inherited tap descriptor (`fd=N`): checks it is a tap, learns its name and
/// whether it carries the vnet header, and marks it close-on-exec (netd gets it explicitly).
pub fn adopt(fd: RawFd) -> Result<TapQueues, TapError> {
    // SAFETY: F_GETFD only reads the descriptor's flags; an unopened number fails with EBADF.
    let fdflags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if fdflags < 0 {
        return Err(TapError::BadFd { fd, what: "not an open descriptor", source: io::Error::last_os_error() });
    }
    let mut req = IfReq::new("", 0);
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`; `fd` is open (checked above).
    let rc = unsafe { libc::ioctl(fd, TUNGETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(TapError::BadFd { fd, what: "not a tun/tap descriptor", source: io::Error::last_os_error() });
    }
    if req.flags & IFF_TAP == 0 {
        return Err(TapError::NotTap(fd));
    }
    // SAFETY: as for F_GETFD; setting FD_CLOEXEC keeps it out of children that are not netd.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, fdflags | libc::FD_CLOEXEC) } < 0 {
        return Err(TapError::BadFd { fd, what: "setting close-on-exec", source: io::Error::last_os_error() });
    }
    // SAFETY: the descriptor is open and, from here on, owned by the launcher alone (QEMU's
    // fd= contract: the caller handed it over).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(TapQueues { ifname: req.name(), fds: vec![owned], vnet_hdr: req.flags & IFF_VNET_HDR != 0 })
}

/// A NIC's tap, opened.
#[derive(Debug)]
pub struct NicTap {
    /// The NIC's net client name ([`crate::net_opts::NicSpec::name`]).
    pub nic: String,
    pub queues: TapQueues,
}

/// A tap that could not be had: `location` is the `-netdev`/`-net` as typed.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {source}")]
pub struct NicTapError {
    pub location: String,
    #[source]
    pub source: TapError,
}

/// Opens the tap of every NIC netd serves on one, with as many descriptors as the NIC has
/// queue pairs.
pub fn open_all(set: &crate::devices::DeviceSet) -> Result<Vec<NicTap>, NicTapError> {
    use crate::net_opts::NetdevKind;
    let mut out = Vec::new();
    for nic in &set.nics {
        let Some(d) = set.net.netdev_of(nic) else { continue };
        let NetdevKind::Tap { ifname, fd, queues, vnet_hdr } = &d.kind else { continue };
        let at = |source| NicTapError { location: d.location.clone(), source };
        let q = match fd {
            Some(fd) => adopt(*fd).map_err(at)?,
            None => open(ifname.as_deref(), nic.queue_pairs, *queues > 1, vnet_hdr.unwrap_or(true)).map_err(at)?,
        };
        out.push(NicTap { nic: nic.name.clone(), queues: q });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let r = IfReq::new("tap0", IFF_TAP | IFF_NO_PI);
        assert_eq!(r.name(), "tap0");
        assert_eq!(r.flags, 0x1002);
    }

    #[test]
    fn overlong_names_are_refused_before_any_syscall() {
        let e = open(Some("a-very-long-tap-name"), 1, false, true).expect_err("too long");
        assert_eq!(e.to_string(), "interface name 'a-very-long-tap-name' is too long (at most 15 bytes)");
    }

    #[test]
    fn an_inherited_descriptor_must_be_a_tap() {
        let e = adopt(987_654).expect_err("not open");
        assert!(e.to_string().starts_with("fd=987654: not an open descriptor"), "{e}");
        let f = std::fs::File::open("/dev/null").expect("null");
        let e = adopt(f.as_raw_fd()).expect_err("not a tap");
        assert!(e.to_string().contains("not a tun/tap descriptor"), "{e}");
    }

    #[test]
    fn interfaces_are_looked_up_in_this_namespace() {
        assert!(interface_exists("lo"));
        assert!(!interface_exists("no-such-if0"));
        assert!(!interface_exists(""));
    }

    #[test]
    fn permission_hints_name_the_tap() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let e = TapError::SetIff { ifname: "tapx".into(), exists: false, source: eperm };
        let text = e.to_string();
        assert!(text.starts_with("could not configure /dev/net/tun (tapx): Operation not permitted"), "{text}");
        assert!(text.contains("the tap 'tapx' does not exist") && text.contains("ip tuntap add dev tapx"), "{text}");
    }
}
