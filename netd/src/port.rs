//! A NIC's host side, one per queue pair: a tap queue (frames with a virtio-net header when it
//! has IFF_VNET_HDR), or a frame socket from slirp-net (one whole Ethernet frame per message,
//! no header). Non-blocking both ways: a frame that cannot go now is dropped, as a full
//! link would drop it, and reading stops at EAGAIN.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::tap::Tap;

#[derive(Debug)]
pub enum Port {
    Tap(Tap),
    /// A SOCK_SEQPACKET or SOCK_DGRAM socket carrying plain frames.
    Frames(OwnedFd),
}

fn retry_eintr(mut f: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = f();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Port {
    /// Takes an inherited frame socket, made non-blocking.
    ///
    /// # Safety
    /// `fd` must be an open descriptor nothing else in this process owns.
    pub unsafe fn frames_from_fd(fd: RawFd) -> io::Result<Port> {
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `ty`.
        let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&mut ty as *mut libc::c_int).cast(), &mut len) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if ty != libc::SOCK_SEQPACKET && ty != libc::SOCK_DGRAM {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd}: not a SOCK_SEQPACKET or SOCK_DGRAM socket")));
        }
        // SAFETY: fcntl on the descriptor handed to us.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the caller hands the descriptor over.
        Ok(Port::Frames(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Frames carry a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        matches!(self, Port::Tap(t) if t.vnet_hdr)
    }

    pub fn raw_fd(&self) -> RawFd {
        match self {
            Port::Tap(t) => t.raw_fd(),
            Port::Frames(fd) => fd.as_raw_fd(),
        }
    }

    pub fn tap(&self) -> Option<&Tap> {
        match self {
            Port::Tap(t) => Some(t),
            Port::Frames(_) => None,
        }
    }

    /// Reads one frame into `buf`: Ok(None) when none waits. The length returned is the
    /// frame's whole length, which for a datagram may exceed `buf` (the rest was cut off:
    /// the caller drops it).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let fd = self.raw_fd();
        let r = match self {
            // SAFETY: read(2) into a buffer we own, at most its length.
            Port::Tap(_) => retry_eintr(|| unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }),
            // SAFETY: recv(2) into a buffer we own, at most its length; MSG_TRUNC reports the
            // datagram's real length.
            Port::Frames(_) => retry_eintr(|| unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) }),
        };
        match r {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one frame (`parts` concatenated), whole or not at all.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let fd = self.raw_fd();
        let n = match self {
            // SAFETY: write(2) from a buffer we own.
            Port::Tap(_) => retry_eintr(|| unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) })?,
            // SAFETY: send(2) from a buffer we own.
            Port::Frames(_) => retry_eintr(|| unsafe {
                libc::send(fd, frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            })?,
        };
        if n != frame.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, format!("{n} of {} bytes sent", frame.len())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_socket_carries_whole_frames() {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: both descriptors are ours and handed over once each.
        let (a, b) = unsafe { (Port::frames_from_fd(fds[0]).unwrap(), Port::frames_from_fd(fds[1]).unwrap()) };
        assert!(!a.vnet_hdr());
        let mut buf = [0u8; 64];
        assert_eq!(b.recv(&mut buf).unwrap(), None, "nothing yet, no blocking");
        a.send(&[7u8; 60]).unwrap();
        a.send(&[9u8; 100]).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
        assert_eq!(buf[59], 7);
        assert_eq!(b.recv(&mut buf).unwrap(), Some(100), "an oversize frame reports its length");
        // SAFETY: a stream socket is refused and closed by us.
        let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        // SAFETY: handed over; refused, so we close it.
        assert!(unsafe { Port::frames_from_fd(s) }.is_err());
        // SAFETY: our descriptor, refused above.
        unsafe { libc::close(s) };
    }
}
