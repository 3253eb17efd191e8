//! One io_uring per raw drive: reads and writes of plain requests go to the kernel without an
//! I/O thread each, many in flight at once. There is no ring thread: the queue thread that
//! pops a chain submits it at once (one `io_uring_enter` per request, as qemu-storage-daemon
//! does: batching a whole popped batch into one enter made the first requests of the batch
//! wait for the last), and completions are reaped by the queue thread too — the ring signals
//! an eventfd ([`Uring::event_fd`]) that the backend registers with each vhost-user worker's
//! epoll — so a request never crosses threads between the frontend's kick and its interrupt
//! (the wake-up of a separate ring thread per batch cost more latency than the I/O at QD32).
//! Whoever reaps runs each request's completion, which writes the guest's data and status;
//! the caller sends the interrupts after the batch.
//!
//! Buffers are owned by the operation until its completion ([`AlignedBuf`], stable on the
//! heap); the file descriptor is kept open by the caller until every operation it submitted
//! completed (see `engine`'s in-flight count). Short transfers are continued; a read that
//! reaches the end of the file reads zeroes from there (as `disk::read_full`).

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::AlignedBuf;

/// Ring entries, and so operations in flight at most (the rest wait in a queue).
const ENTRIES: u32 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
}

/// Called on the reaping thread (a queue thread, or one draining the drive) with the transfer's result (bytes) and the buffer back.
pub type Done = Box<dyn FnOnce(io::Result<usize>, AlignedBuf) + Send>;

/// Memory the kernel transfers to or from directly (guest RAM: zero copy).
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the vectors point into guest memory that the operation's owner keeps mapped until
// its completion (the descriptor chain's memory guard travels in the `done` closure); only
// the ring's owner (under its lock) and the kernel use them meanwhile.
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
    cur: IoVecs,
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

/// The ring and what is in flight on it, behind [`Uring`]'s lock.
struct State {
    ring: IoUring,
    /// In-flight operations by user_data.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Operations waiting for room in the ring (more than `ENTRIES` in flight).
    backlog: VecDeque<Op>,
    in_flight: usize,
    /// Entries pushed to the submission queue since the last `io_uring_enter`.
    unsubmitted: bool,
}

/// A drive's ring. Submitting and reaping happen on the callers' threads, under a lock that
/// is never held while a completion runs.
pub struct Uring {
    state: Mutex<State>,
    /// Signalled by the kernel for every completion posted (`IORING_REGISTER_EVENTFD`).
    done_fd: EventFd,
}

impl Uring {
    /// Makes the ring; fails where io_uring is not available (old kernel, seccomp).
    pub fn new(name: &str) -> io::Result<Uring> {
        let ring = IoUring::new(ENTRIES)?;
        let done_fd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(done_fd.as_raw_fd())?;
        tracing::debug!(drive = name, entries = ENTRIES, "io_uring ready");
        let state = State {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            in_flight: 0,
            unsubmitted: false,
        };
        Ok(Uring { state: Mutex::new(state), done_fd })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The eventfd that becomes readable when completions wait to be reaped: register it
    /// with the epoll of every thread that submits, and call [`Uring::reap`] when it fires.
    pub fn event_fd(&self) -> RawFd {
        self.done_fd.as_raw_fd()
    }

    /// Queues `op` and submits it at once.
    pub fn submit(&self, op: Op) {
        self.queue(op);
        self.flush();
    }

    /// Queues `op` without entering the kernel: call [`Uring::flush`] after a batch.
    pub fn queue(&self, op: Op) {
        let mut s = self.lock();
        if s.in_flight < ENTRIES as usize {
            s.start(op);
        } else {
            s.backlog.push_back(op);
        }
    }

    /// Submits what is queued (one system call for the batch).
    pub fn flush(&self) {
        self.lock().enter();
    }

    /// Runs the completions the kernel has posted, without waiting; returns how many
    /// operations completed. Call [`crate::engine::flush_deferred_signals`] after it on the
    /// same thread.
    pub fn reap(&self) -> usize {
        // The counter only says "look" (and must be emptied for a level-triggered epoll):
        // the completion queue itself is read below.
        let _ = self.done_fd.read();
        let mut total = 0;
        loop {
            let done = self.lock().collect();
            if done.is_empty() {
                return total;
            }
            total += done.len();
            for (done, result, buf) in done {
                done(result, buf);
            }
        }
    }

    /// Waits up to `timeout` for a completion to be posted, then reaps (for callers with no
    /// epoll of their own: draining a drive, tests).
    pub fn wait_and_reap(&self, timeout: Duration) -> usize {
        let mut pfd = libc::pollfd { fd: self.done_fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, on the stack for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        self.reap()
    }
}

/// A finished operation: its completion, result and buffer.
type Finished = (Done, io::Result<usize>, AlignedBuf);

impl State {
    /// Puts `op` in a slot and its entry in the submission queue (there is room: the caller
    /// checked `in_flight`).
    fn start(&mut self, op: Op) {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let cur = IoVecs(op.iov.0.clone());
        let f = InFlight { op, moved: 0, cur };
        let e = sqe(&f, idx as u64);
        self.slots[idx] = Some(f);
        self.in_flight += 1;
        self.push(e);
    }

    fn push(&mut self, e: io_uring::squeue::Entry) {
        // SAFETY: every entry points into a buffer (or iovec array and guest memory) owned by
        // its slot until its completion, and at an fd the submitter keeps open until then.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            // Full of entries not yet submitted (at most ENTRIES are in flight, so this is a
            // batch waiting for `enter`): submit them and push again.
            self.unsubmitted = true;
            self.enter();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                tracing::error!("io_uring submission queue still full after submitting");
            }
        }
        self.unsubmitted = true;
    }

    fn enter(&mut self) {
        if !self.unsubmitted {
            return;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: the completion queue is full or the kernel is short of
                // memory; the entries stay queued and go with the next enter (every reap
                // enters again).
                Err(e) => {
                    tracing::warn!("io_uring submit: {e}");
                    return;
                }
            }
        }
        self.unsubmitted = !self.ring.submission().is_empty();
    }

    /// Takes the posted completions: continues short transfers, starts backlogged operations
    /// in the slots freed, submits, and returns the finished ones for the caller to run
    /// outside the lock.
    fn collect(&mut self) -> Vec<Finished> {
        let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        let mut out = Vec::with_capacity(cqes.len());
        for (ud, res) in cqes {
            let idx = ud as usize;
            let Some(mut f) = self.slots.get_mut(idx).and_then(Option::take) else { continue };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                let n = res as usize;
                f.moved += n;
                if f.moved < f.op.len && n > 0 {
                    // Short transfer: continue where it stopped.
                    f.cur = IoVecs(advance(&f.op.iov.0, f.moved));
                    let e = sqe(&f, ud);
                    self.slots[idx] = Some(f);
                    self.push(e);
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
            self.in_flight -= 1;
            self.free.push(idx);
            let Op { buf, done, .. } = f.op;
            out.push((done, result, buf));
        }
        while self.in_flight < ENTRIES as usize {
            let Some(op) = self.backlog.pop_front() else { break };
            self.start(op);
        }
        self.enter();
        out
    }
}

fn sqe(f: &InFlight, user_data: u64) -> io_uring::squeue::Entry {
    let (op, moved) = (&f.op, f.moved);
    // A request's length is bounded by Limits::max_data (32 MiB), so it fits a u32.
    let left = u32::try_from(op.len - moved).unwrap_or(u32::MAX);
    let fd = types::Fd(op.fd);
    let offset = op.offset + moved as u64;
    if !op.iov.0.is_empty() {
        let (ptr, n) = (f.cur.0.as_ptr(), u32::try_from(f.cur.0.len()).unwrap_or(u32::MAX));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};
    use std::time::{Duration, Instant};

    /// Reaps (as a queue worker would) until `rx` has a value; fails after 5 s.
    fn recv<T>(u: &Uring, rx: &Receiver<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(v) = rx.try_recv() {
                return v;
            }
            assert!(Instant::now() < deadline, "no completion within 5 s");
            u.wait_and_reap(Duration::from_millis(50));
        }
    }

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
        assert_eq!(recv(&u, &rx), Ok(4096));
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
        let (r, data) = recv(&u, &brx);
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
            assert_eq!(recv(&u, &rx), Ok(512));
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
        assert_eq!(recv(&u, &rx), Ok(1536));
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
        assert_eq!(recv(&u, &rx), Ok(1536));
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
        assert!(recv(&u, &rx).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
