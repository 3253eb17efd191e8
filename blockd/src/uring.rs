//! One io_uring per raw drive: reads and writes of plain requests go to the kernel without an
//! I/O thread each, many in flight at once; one thread submits and reaps (and runs each
//! request's completion, which writes the guest's data and status and interrupts it).
//!
//! Buffers are owned by the operation until its completion ([`AlignedBuf`], stable on the
//! heap); the file descriptor is kept open by the caller until every operation it submitted
//! completed (see `engine`'s in-flight count). Short transfers are continued; a read that
//! reaches the end of the file reads zeroes from there (as `disk::read_full`).

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::AlignedBuf;

/// Ring entries, and so operations in flight at most (the rest wait in a queue).
const ENTRIES: u32 = 256;
/// user_data of the read on the wake-up eventfd.
const WAKE: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
}

/// Called on the ring thread with the transfer's result (bytes) and the buffer back.
pub type Done = Box<dyn FnOnce(io::Result<usize>, AlignedBuf) + Send>;

/// Memory the kernel transfers to or from directly (guest RAM: zero copy).
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the vectors point into guest memory that the operation's owner keeps mapped until
// its completion (the descriptor chain's memory guard travels in the `done` closure); only
// the ring thread and the kernel use them meanwhile.
unsafe impl Send for IoVecs {}

/// One read or write of `len` bytes at `offset` of `fd`: into or out of `iov` when it is not
/// empty (zero copy), else of `buf`.
pub struct Op {
    pub kind: OpKind,
    pub fd: RawFd,
    pub offset: u64,
    pub buf: AlignedBuf,
    pub iov: IoVecs,
    pub len: usize,
    pub done: Done,
}

struct InFlight {
    op: Op,
    /// Bytes transferred so far (short transfers are continued).
    moved: usize,
    /// `op.iov` less the `moved` bytes (what the next submission covers).
    cur: Vec<libc::iovec>,
}

/// `iov` without its first `skip` bytes.
fn advance(iov: &[libc::iovec], mut skip: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iov.len());
    for v in iov {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        // SAFETY: `skip < iov_len`, so the pointer stays inside this vector's memory.
        let base = unsafe { (v.iov_base as *mut u8).add(skip) };
        out.push(libc::iovec { iov_base: base.cast(), iov_len: v.iov_len - skip });
        skip = 0;
    }
    out
}

struct Shared {
    queue: Mutex<VecDeque<Op>>,
    wake: EventFd,
}

/// A handle to a drive's ring thread. Dropping it does not stop the thread: drives live as
/// long as the process.
pub struct Uring {
    shared: Arc<Shared>,
}

impl Uring {
    /// Starts the ring thread; fails where io_uring is not available (old kernel, seccomp).
    pub fn new(name: &str) -> io::Result<Uring> {
        let ring = IoUring::new(ENTRIES)?;
        let shared = Arc::new(Shared { queue: Mutex::new(VecDeque::new()), wake: EventFd::new(EFD_NONBLOCK)? });
        let s = shared.clone();
        std::thread::Builder::new().name(format!("{name}-uring")).spawn(move || {
            if let Err(e) = run(ring, &s) {
                tracing::error!("the io_uring thread failed: {e}");
            }
        })?;
        Ok(Uring { shared })
    }

    pub fn submit(&self, op: Op) {
        self.queue(op);
        self.wake();
    }

    /// Queues `op` without waking the ring thread: call [`Uring::wake`] after a batch.
    pub fn queue(&self, op: Op) {
        self.shared.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(op);
    }

    /// Has the ring thread submit what is queued.
    pub fn wake(&self) {
        if let Err(e) = self.shared.wake.write(1) {
            tracing::error!("waking the io_uring thread: {e}");
        }
    }
}

fn sqe(f: &InFlight, user_data: u64) -> io_uring::squeue::Entry {
    let (op, moved) = (&f.op, f.moved);
    // A request's length is bounded by Limits::max_data (32 MiB), so it fits a u32.
    let left = u32::try_from(op.len - moved).unwrap_or(u32::MAX);
    let fd = types::Fd(op.fd);
    let offset = op.offset + moved as u64;
    if !op.iov.0.is_empty() {
        let (ptr, n) = (f.cur.as_ptr(), u32::try_from(f.cur.len()).unwrap_or(u32::MAX));
        return match op.kind {
            OpKind::Read => opcode::Readv::new(fd, ptr, n).offset(offset).build().user_data(user_data),
            OpKind::Write => opcode::Writev::new(fd, ptr, n).offset(offset).build().user_data(user_data),
        };
    }
    // SAFETY: `moved < len <= the buffer's size`, so the pointer stays inside the buffer.
    let ptr = unsafe { op.buf.as_ptr().add(moved) };
    match op.kind {
        OpKind::Read => opcode::Read::new(fd, ptr, left).offset(offset).build().user_data(user_data),
        OpKind::Write => opcode::Write::new(fd, ptr, left).offset(offset).build().user_data(user_data),
    }
}

fn run(mut ring: IoUring, shared: &Shared) -> io::Result<()> {
    let mut slots: Vec<Option<InFlight>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut pending: VecDeque<(usize, io_uring::squeue::Entry)> = VecDeque::new();
    // Leaked (8 bytes per drive): the kernel may write into it until the ring is gone.
    let wake_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let wake_ptr = wake_buf.as_mut_ptr();
    let wake_fd = shared.wake.as_raw_fd();
    let wake_sqe = || opcode::Read::new(types::Fd(wake_fd), wake_ptr, 8).build().user_data(WAKE);
    // SAFETY: the eventfd lives in `shared`, which outlives this function; the buffer is
    // leaked, so it outlives the ring.
    unsafe { ring.submission().push(&wake_sqe()).map_err(|_| io::Error::other("ring full"))? };
    let in_flight_max = (ENTRIES - 1) as usize;
    let mut in_flight = 0usize;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        let cqes: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        let mut rearm = false;
        for (ud, res) in cqes {
            if ud == WAKE {
                rearm = true;
                continue;
            }
            let idx = ud as usize;
            let Some(mut f) = slots.get_mut(idx).and_then(Option::take) else { continue };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                let n = res as usize;
                f.moved += n;
                if f.moved < f.op.len && n > 0 {
                    // Short transfer: continue where it stopped.
                    f.cur = advance(&f.op.iov.0, f.moved);
                    pending.push_back((idx, sqe(&f, ud)));
                    slots[idx] = Some(f);
                    continue;
                }
                if f.moved < f.op.len {
                    match f.op.kind {
                        // End of file: the rest reads as zeroes.
                        OpKind::Read => {
                            let len = f.op.len;
                            if f.op.iov.0.is_empty() {
                                f.op.buf.as_mut_slice(len)[f.moved..].fill(0);
                            } else {
                                for v in advance(&f.op.iov.0, f.moved) {
                                    // SAFETY: the vector is guest memory the owner keeps
                                    // mapped (see IoVecs), `iov_len` bytes long.
                                    unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
                                }
                            }
                            Ok(len)
                        }
                        OpKind::Write => Err(io::Error::from_raw_os_error(libc::EIO)),
                    }
                } else {
                    Ok(f.op.len)
                }
            };
            in_flight -= 1;
            free.push(idx);
            let Op { buf, done, .. } = f.op;
            done(result, buf);
        }
        // One interrupt per queue for the whole batch of completions.
        crate::engine::flush_deferred_signals();
        if rearm {
            // The read consumed the eventfd's counter; wait for the next wake-up.
            // SAFETY: as above.
            unsafe { ring.submission().push(&wake_sqe()).map_err(|_| io::Error::other("ring full"))? };
        }
        {
            // New operations, as many as the ring has room for; the rest stay queued until
            // completions free slots (this loop runs again on every completion).
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            while in_flight < in_flight_max {
                let Some(op) = q.pop_front() else { break };
                let idx = free.pop().unwrap_or_else(|| {
                    slots.push(None);
                    slots.len() - 1
                });
                let cur = op.iov.0.clone();
                let f = InFlight { op, moved: 0, cur };
                let e = sqe(&f, idx as u64);
                slots[idx] = Some(f);
                pending.push_back((idx, e));
                in_flight += 1;
            }
        }
        let mut sq = ring.submission();
        while let Some((_, e)) = pending.front() {
            // SAFETY: every entry points into a buffer (or iovec array and guest memory) owned
            // by its slot until its completion, and at an fd the submitter keeps open until then.
            if unsafe { sq.push(e) }.is_err() {
                break;
            }
            pending.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn writes_reads_and_reads_zeroes_past_the_end() {
        let dir = std::env::temp_dir().join(format!("blockd-uring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let u = Uring::new("t").unwrap();
        let (tx, rx) = channel();
        let mut buf = AlignedBuf::new(4096, 512).unwrap();
        buf.as_mut_slice(4096).fill(0x42);
        let t = tx.clone();
        u.submit(Op {
            kind: OpKind::Write,
            fd: file.as_raw_fd(),
            offset: 4096,
            buf,
            iov: IoVecs(Vec::new()),
            len: 4096,
            done: Box::new(move |r, _| t.send(r.map_err(|e| e.to_string())).unwrap()),
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(4096));
        assert!(std::fs::read(&path).unwrap()[4096..].iter().all(|&b| b == 0x42));
        // 4 KiB from 6 KiB: 2 KiB of data, then end of file, read as zeroes.
        let (btx, brx) = channel();
        let buf = AlignedBuf::new(4096, 512).unwrap();
        u.submit(Op {
            kind: OpKind::Read,
            fd: file.as_raw_fd(),
            offset: 6144,
            buf,
            iov: IoVecs(Vec::new()),
            len: 4096,
            done: Box::new(move |r, mut b| {
                btx.send((r.map_err(|e| e.to_string()), b.as_mut_slice(4096).to_vec())).unwrap()
            }),
        });
        let (r, data) = brx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(r, Ok(4096));
        assert!(data[..2048].iter().all(|&b| b == 0x42) && data[2048..].iter().all(|&b| b == 0));
        // Many at once, more than the ring holds: all complete.
        for i in 0..600u64 {
            let t = tx.clone();
            u.submit(Op {
                kind: OpKind::Read,
                fd: file.as_raw_fd(),
                offset: (i % 16) * 512,
                buf: AlignedBuf::new(512, 512).unwrap(),
                iov: IoVecs(Vec::new()),
                len: 512,
                done: Box::new(move |r, _| t.send(r.map_err(|e| e.to_string())).unwrap()),
            });
        }
        for _ in 0..600 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(512));
        }
        // Zero copy: two iovecs written, then read back past the end (zeroes there).
        let (a, b) = (AlignedBuf::new(512, 512).unwrap(), AlignedBuf::new(1024, 512).unwrap());
        // SAFETY: both buffers are 512 and 1024 bytes long and live until the reads below.
        unsafe {
            std::ptr::write_bytes(a.as_ptr(), 0x61, 512);
            std::ptr::write_bytes(b.as_ptr(), 0x62, 1024);
        }
        let iov = |x: &AlignedBuf, y: &AlignedBuf| {
            IoVecs(vec![
                libc::iovec { iov_base: x.as_ptr().cast(), iov_len: 512 },
                libc::iovec { iov_base: y.as_ptr().cast(), iov_len: 1024 },
            ])
        };
        let (t, v) = (tx.clone(), iov(&a, &b));
        u.submit(Op {
            kind: OpKind::Write,
            fd: file.as_raw_fd(),
            offset: 7168,
            buf: AlignedBuf::new(0, 1).unwrap(),
            iov: v,
            len: 1536,
            done: Box::new(move |r, _| t.send(r.map_err(|e| e.to_string())).unwrap()),
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(1536));
        let f = std::fs::read(&path).unwrap();
        assert_eq!(f.len(), 8704);
        assert!(f[7168..7680].iter().all(|&x| x == 0x61) && f[7680..].iter().all(|&x| x == 0x62));
        let (c, d) = (AlignedBuf::new(512, 512).unwrap(), AlignedBuf::new(1024, 512).unwrap());
        let (t, v) = (tx.clone(), iov(&c, &d));
        u.submit(Op {
            kind: OpKind::Read,
            fd: file.as_raw_fd(),
            offset: 8192,
            buf: AlignedBuf::new(0, 1).unwrap(),
            iov: v,
            len: 1536,
            done: Box::new(move |r, _| t.send(r.map_err(|e| e.to_string())).unwrap()),
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(1536));
        let (mut c, mut d) = (c, d);
        assert!(c.as_mut_slice(512).iter().all(|&x| x == 0x62), "data up to the end");
        assert!(d.as_mut_slice(1024).iter().all(|&x| x == 0), "zeroes past it");
        // A bad descriptor fails cleanly.
        u.submit(Op {
            kind: OpKind::Read,
            fd: -1,
            offset: 0,
            buf: AlignedBuf::new(512, 512).unwrap(),
            iov: IoVecs(Vec::new()),
            len: 512,
            done: Box::new(move |r, _| tx.send(r.map_err(|e| e.to_string())).unwrap()),
        });
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
