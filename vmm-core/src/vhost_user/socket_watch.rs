//! Notices a backend's socket appearing (inotify on the socket's directory), so a restarted
//! backend is connected as soon as it binds, instead of at the next backoff tick: the retry
//! delay alone (50 ms doubling to 1 s) would add hundreds of ms to a restart. Costs nothing
//! while no backend comes: the worker sleeps in poll on the inotify descriptor.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The events that mean "a socket may be there now": bind() creates the file; a launcher may
/// also move one into place or change its mode.
const MASK: u32 = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB;

pub struct SocketWatch {
    fd: OwnedFd,
    dir: PathBuf,
    name: OsString,
    /// The watch on `dir`, while there is one.
    wd: Option<i32>,
}

impl SocketWatch {
    /// A watch for `socket`. The directory may not exist yet: [`SocketWatch::rearm`] adds the
    /// watch once it does.
    pub fn new(socket: &Path) -> std::io::Result<SocketWatch> {
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor or -1.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just created and own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let dir = match socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = socket.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        let mut w = SocketWatch { fd, dir, name, wd: None };
        w.rearm();
        Ok(w)
    }

    /// Adds the directory watch if it is not in place (the directory appeared, or was removed
    /// and made again).
    pub fn rearm(&mut self) {
        if self.wd.is_some() {
            return;
        }
        let Ok(path) = std::ffi::CString::new(self.dir.as_os_str().as_bytes()) else { return };
        let mask = MASK | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;
        // SAFETY: a live inotify descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        self.wd = (wd >= 0).then_some(wd);
    }

    /// Removes the watch (while connected: events in a busy directory would only wake the
    /// worker for nothing) and drops the events queued so far.
    pub fn disarm(&mut self) {
        if let Some(wd) = self.wd.take() {
            // SAFETY: a live inotify descriptor and a watch it returned.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
            self.drain();
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads every pending event; true when one names the socket.
    pub fn drain(&mut self) -> bool {
        let mut seen = false;
        // inotify_event is 4-byte aligned; a u32 buffer keeps the headers aligned.
        let mut buf = [0u32; 1024];
        loop {
            // SAFETY: reading into a buffer we own, of the length given.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), std::mem::size_of_val(&buf)) };
            if n <= 0 {
                return seen;
            }
            // SAFETY: the kernel wrote `n` bytes into `buf`; viewing them as bytes is sound.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            let mut at = 0;
            let head = std::mem::size_of::<libc::inotify_event>();
            while at + head <= bytes.len() {
                let word = |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
                let (mask, len) = (word(at + 4), word(at + 12) as usize);
                let name = bytes.get(at + head..at + head + len).unwrap_or(&[]);
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                let wd = i32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
                if mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 && self.wd == Some(wd) {
                    self.wd = None;
                }
                if mask & MASK != 0 && name == self.name.as_bytes() {
                    seen = true;
                }
                at += head + len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-core-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn readable(fd: RawFd, ms: i32) -> bool {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, ms) == 1 }
    }

    #[test]
    fn binding_the_socket_is_seen_and_other_files_are_not() {
        let d = tempdir("bind");
        let sock = d.join("be.sock");
        let mut w = SocketWatch::new(&sock).expect("watch");
        assert!(!readable(w.raw_fd(), 0));
        std::fs::write(d.join("other"), b"x").expect("write");
        assert!(readable(w.raw_fd(), 1000));
        assert!(!w.drain(), "another file's events do not count");
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(readable(w.raw_fd(), 1000));
        assert!(w.drain());
        assert!(!w.drain(), "drained");
        // Disarmed, nothing is seen; rearmed, it is again.
        w.disarm();
        std::fs::remove_file(&sock).expect("rm");
        let _l2 = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(!readable(w.raw_fd(), 50));
        w.rearm();
        std::fs::remove_file(&sock).expect("rm");
        let _l3 = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(readable(w.raw_fd(), 1000));
        assert!(w.drain());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_directory_made_later_is_watched_once_rearmed() {
        let d = tempdir("late");
        let sub = d.join("later");
        let sock = sub.join("be.sock");
        let mut w = SocketWatch::new(&sock).expect("watch");
        std::fs::create_dir(&sub).expect("mkdir");
        w.rearm();
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(readable(w.raw_fd(), 1000));
        assert!(w.drain());
        let _ = std::fs::remove_dir_all(&d);
    }
}
