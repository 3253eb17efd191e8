//! The tap side: opening an existing tap by name (TUNSETIFF on /dev/net/tun; a tap the user
//! owns needs no CAP_NET_ADMIN), taking inherited descriptors, and the per-descriptor ioctls
//! netd uses once the guest negotiated: the header size and the offloads, and attaching or
//! detaching a queue of a multiqueue tap.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// linux/if_tun.h
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("tap '{name}': {source} (netd opens an existing tap the user may use; it creates none)")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    Name(String),
    #[error("descriptor {fd} is not a tap: {source}")]
    NotTap {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd} is a tun (layer 3) device, not a tap")]
    Tun { fd: RawFd },
    #[error("descriptor {fd}: {source}")]
    Fd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_short) -> Result<IfReq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::Name(name.to_string()));
    }
    let mut r = IfReq { name: [0; libc::IFNAMSIZ], flags, _pad: [0; 22] };
    r.name[..bytes.len()].copy_from_slice(bytes);
    Ok(r)
}

/// One queue of a tap.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    /// IFF_VNET_HDR was set on it: frames carry a virtio-net header both ways.
    pub vnet_hdr: bool,
    /// Its name, when known.
    pub ifname: Option<String>,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; F_GETFL/F_SETFL touch no memory.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Tap {
    /// Opens `queues` queues of the existing tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
    /// with IFF_MULTI_QUEUE for more than one).
    pub fn open(name: &str, queues: u16) -> Result<Vec<Tap>, TapError> {
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        (0..queues.max(1))
            .map(|_| {
                let file = File::options()
                    .read(true)
                    .write(true)
                    .custom_flags_nonblock()
                    .open("/dev/net/tun")
                    .map_err(TapError::OpenTun)?;
                let mut req = ifreq(name, flags)?;
                // SAFETY: TUNSETIFF reads (and writes back) one ifreq we own.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
                if rc < 0 {
                    return Err(TapError::SetIff { name: name.to_string(), source: io::Error::last_os_error() });
                }
                Ok(Tap { fd: file.into(), vnet_hdr: true, ifname: Some(name.to_string()) })
            })
            .collect()
    }

    /// Takes an inherited tap descriptor (the launcher's, or `--tap-fd`): checks that it is a
    /// tap, learns whether it has IFF_VNET_HDR, and makes it non-blocking.
    ///
    /// # Safety
    /// `fd` must be an open descriptor nothing else in this process owns.
    pub unsafe fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        // SAFETY: TUNGETIFF writes one ifreq we own; a descriptor of another kind is an error.
        let rc = unsafe { libc::ioctl(fd, TUNGETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(TapError::NotTap { fd, source: io::Error::last_os_error() });
        }
        if req.flags & IFF_TAP == 0 {
            return Err(TapError::Tun { fd });
        }
        set_nonblocking(fd).map_err(|source| TapError::Fd { fd, source })?;
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(req.name.len());
        let ifname = String::from_utf8_lossy(&req.name[..end]).into_owned();
        // SAFETY: the caller hands the descriptor over.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Tap { fd, vnet_hdr: req.flags & IFF_VNET_HDR != 0, ifname: Some(ifname) })
    }

    fn ioctl_int(&self, request: libc::c_ulong, value: libc::c_int) -> io::Result<()> {
        // SAFETY: these tun ioctls read one int from the pointer we pass.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request, &value as *const libc::c_int) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// TUNSETVNETHDRSZ: the header length the guest negotiated (10 or 12).
    pub fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        self.ioctl_int(TUNSETVNETHDRSZ, len as libc::c_int)
    }

    /// TUNSETOFFLOAD: what the tap may hand us (TUN_F_* flags).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // TUNSETOFFLOAD takes its argument by value, not through a pointer.
        // SAFETY: an ioctl with an integer argument on a descriptor we own.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// TUNSETQUEUE: attach (true) or detach this queue of a multiqueue tap.
    pub fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: if attached { IFF_ATTACH_QUEUE } else { IFF_DETACH_QUEUE },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads one ifreq we own.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETQUEUE, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

trait NonBlockOpen {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlockOpen for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_fit_ifreq() {
        assert!(matches!(ifreq("", 0), Err(TapError::Name(_))));
        assert!(matches!(ifreq("a-very-long-name0", 0), Err(TapError::Name(_))));
        assert_eq!(&ifreq("tap0", IFF_TAP).unwrap().name[..5], b"tap0\0");
    }

    #[test]
    fn a_pipe_is_not_a_tap() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fds[0] is ours; on error it is not taken, so close both after.
        let r = unsafe { Tap::from_fd(fds[0]) };
        assert!(matches!(r, Err(TapError::NotTap { .. })));
        // SAFETY: closing the two descriptors we made.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
