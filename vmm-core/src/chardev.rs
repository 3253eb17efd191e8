//! Character-device backends behind the serial port, in QEMU's vocabulary: `stdio`, `file`, a
//! listening unix socket, `pty` and `null`.
//!
//! Output never blocks the caller (a vCPU thread emulating the UART) for long: bytes go into a
//! bounded queue drained by a writer thread. With no client on a unix socket (or nobody on the
//! pty's slave side) output is dropped, as QEMU does; a client that stops reading fills the
//! queue and further output is dropped until it reads again. Queued output is flushed (for a
//! bounded time) when the chardev is dropped and when the process exits.
//!
//! Input arrives on a background thread and is passed to the `on_input` callback.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};
use nix::sys::termios::{self, SetArg, Termios};
use vm_config::{ChardevBackend, ChardevConfig};

/// Callback for bytes arriving from the outside.
pub type InputFn = Box<dyn FnMut(&[u8]) + Send>;

/// Most bytes waiting to be written; beyond this, output is dropped.
const QUEUE_CAP: usize = 1 << 20;
/// Largest single write handed to the sink.
const CHUNK: usize = 64 << 10;
/// How long a write may wait for room when a stdio/file sink is slow before dropping.
const STALL_WAIT: Duration = Duration::from_millis(100);
/// How long dropping a chardev (or exiting the process) waits for queued output to drain.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);
/// Poll slice of the background threads; bounds how long shutting them down takes.
const POLL_SLICE_MS: u16 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    #[error("chardev '{id}': could not open file '{path}': {source}")]
    OpenFile { id: String, path: PathBuf, source: io::Error },
    #[error("chardev '{id}': '{path}' exists and is not a socket; not removing it")]
    NotASocket { id: String, path: PathBuf },
    #[error("chardev '{id}': could not remove stale socket '{path}': {source}")]
    RemoveStale { id: String, path: PathBuf, source: io::Error },
    #[error("chardev '{id}': could not listen on unix socket '{path}': {source}")]
    Listen { id: String, path: PathBuf, source: io::Error },
    #[error("chardev '{id}': waiting for a connection on '{path}': {source}")]
    Accept { id: String, path: PathBuf, source: io::Error },
    #[error("chardev '{id}': could not open a pseudo-terminal: {source}")]
    Pty { id: String, source: io::Error },
    #[error("chardev '{id}': cannot use stdio by multiple character devices")]
    StdioInUse { id: String },
    #[error("chardev '{id}': could not set up stdio: {source}")]
    Stdio { id: String, source: io::Error },
    #[error("chardev '{id}': could not start its I/O thread: {source}")]
    Thread { id: String, source: io::Error },
}

fn nix_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Output queue
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct QueueState {
    buf: VecDeque<u8>,
    /// The writer holds a chunk it has not finished writing.
    busy: bool,
    /// No more output is accepted; the writer drains what is left, until `deadline`.
    closed: bool,
    deadline: Option<Instant>,
    /// A stdio/file sink did not keep up; drop without waiting until the queue halves.
    stalled: bool,
}

#[derive(Default)]
struct OutQueue {
    state: Mutex<QueueState>,
    cv: Condvar,
    dropped: AtomicU64,
}

impl OutQueue {
    /// Queues `bytes`; waits up to `wait` for room, then drops what does not fit.
    fn push(&self, bytes: &[u8], wait: Duration) {
        let mut st = lock(&self.state);
        if st.closed {
            return;
        }
        let mut rest = bytes;
        let deadline = Instant::now() + wait;
        loop {
            let room = QUEUE_CAP.saturating_sub(st.buf.len());
            let n = room.min(rest.len());
            st.buf.extend(&rest[..n]);
            rest = &rest[n..];
            if n > 0 {
                self.cv.notify_all();
            }
            if rest.is_empty() {
                return;
            }
            let now = Instant::now();
            if st.stalled || wait.is_zero() || now >= deadline {
                break;
            }
            st = self.cv.wait_timeout(st, deadline - now).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
            if st.closed {
                break;
            }
        }
        if !wait.is_zero() && !st.stalled {
            st.stalled = true;
            tracing::warn!("chardev output is not draining; dropping output until it does");
        }
        self.dropped.fetch_add(rest.len() as u64, Ordering::Relaxed);
    }

    /// Blocks until there is output (returns up to CHUNK bytes) or the queue is closed and empty.
    fn pop(&self) -> Option<Vec<u8>> {
        let mut st = lock(&self.state);
        st.busy = false;
        self.cv.notify_all();
        loop {
            if !st.buf.is_empty() {
                if st.closed && st.deadline.is_some_and(|d| Instant::now() >= d) {
                    st.buf.clear();
                    return None;
                }
                let n = st.buf.len().min(CHUNK);
                let chunk: Vec<u8> = st.buf.drain(..n).collect();
                if st.stalled && st.buf.len() < QUEUE_CAP / 2 {
                    st.stalled = false;
                }
                st.busy = true;
                self.cv.notify_all();
                return Some(chunk);
            }
            if st.closed {
                return None;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Drops everything queued (a unix client went away).
    fn clear(&self) {
        let mut st = lock(&self.state);
        st.buf.clear();
        st.stalled = false;
        self.cv.notify_all();
    }

    /// True once the writer should give up on a blocked sink.
    fn abandon(&self) -> bool {
        let st = lock(&self.state);
        st.closed && st.deadline.is_none_or(|d| Instant::now() >= d)
    }

    /// Waits until everything queued has been written, or `timeout` passed.
    fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while !st.buf.is_empty() || st.busy {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.cv.wait_timeout(st, deadline - now).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    fn close(&self, drain_for: Duration) {
        let mut st = lock(&self.state);
        st.closed = true;
        st.deadline = Some(Instant::now() + drain_for);
        self.cv.notify_all();
    }
}

// Live chardevs, handled by an atexit handler: output written just before the process exits
// (a guest's last words before powering off) is flushed, and unix socket files are removed (as
// QEMU does), even when the Chardev itself is never dropped.
struct LiveEntry {
    queue: Weak<OutQueue>,
    socket: Option<PathBuf>,
}
static LIVE: Mutex<Vec<LiveEntry>> = Mutex::new(Vec::new());
static ATEXIT: Once = Once::new();

extern "C" fn flush_all_at_exit() {
    let (queues, sockets): (Vec<Arc<OutQueue>>, Vec<PathBuf>) = match LIVE.try_lock() {
        Ok(l) => (
            l.iter().filter_map(|e| e.queue.upgrade()).collect(),
            l.iter().filter(|e| e.queue.strong_count() > 0).filter_map(|e| e.socket.clone()).collect(),
        ),
        Err(_) => return,
    };
    let deadline = Instant::now() + FLUSH_ON_CLOSE;
    for q in queues {
        q.flush(deadline.saturating_duration_since(Instant::now()));
    }
    for p in sockets {
        let _ = std::fs::remove_file(p);
    }
}

fn register_live(q: &Arc<OutQueue>, socket: Option<PathBuf>) {
    ATEXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" fn with no arguments; it only touches statics and
        // Arc-owned data, and tolerates being called while other threads still run.
        let rc = unsafe { libc::atexit(flush_all_at_exit) };
        if rc != 0 {
            tracing::warn!("could not register the chardev exit flush");
        }
    });
    let mut live = lock(&LIVE);
    live.retain(|e| e.queue.strong_count() > 0);
    live.push(LiveEntry { queue: Arc::downgrade(q), socket });
}

/// Runs the writer: takes chunks off the queue and hands them to `sink`.
fn spawn_writer(
    id: &str,
    queue: Arc<OutQueue>,
    mut sink: impl FnMut(&[u8], &OutQueue) -> io::Result<()> + Send + 'static,
) -> Result<JoinHandle<()>, ChardevError> {
    let label = id.to_string();
    std::thread::Builder::new()
        .name(format!("chr-out-{id}"))
        .spawn(move || {
            let mut warned = false;
            while let Some(chunk) = queue.pop() {
                if let Err(e) = sink(&chunk, &queue) {
                    if !warned {
                        tracing::warn!(chardev = %label, "output error, dropping output: {e}");
                        warned = true;
                    }
                    queue.dropped.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        })
        .map_err(|source| ChardevError::Thread { id: id.to_string(), source })
}

/// Waits up to one poll slice for `events` on `fd`; returns the reported events (empty on timeout).
fn poll_one(fd: BorrowedFd<'_>, events: PollFlags) -> io::Result<PollFlags> {
    let mut fds = [PollFd::new(fd, events)];
    match poll(&mut fds, PollTimeout::from(POLL_SLICE_MS)) {
        Ok(0) | Err(Errno::EINTR) => Ok(PollFlags::empty()),
        Ok(_) => Ok(fds[0].revents().unwrap_or(PollFlags::empty())),
        Err(e) => Err(nix_io(e)),
    }
}

/// Writes all of `data` to a non-blocking fd, waiting in poll slices while it is full. Gives up
/// (dropping the rest) when the other side hung up or the queue is being abandoned.
fn write_nonblocking(file: &mut File, mut data: &[u8], queue: &OutQueue) -> io::Result<()> {
    while !data.is_empty() {
        match file.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let ev = poll_one(file.as_fd(), PollFlags::POLLOUT)?;
                if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                    return Ok(()); // nobody on the other side: drop, like QEMU
                }
                if queue.abandon() {
                    return Ok(());
                }
            }
            // EIO: a pty whose slave side is closed.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(nix_io)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(nix_io)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Chardev
// ---------------------------------------------------------------------------------------------

/// State a unix server's threads share with `write` and `filename`.
#[derive(Default)]
struct UnixState {
    client: Mutex<Option<Arc<UnixStream>>>,
}

enum Kind {
    Null,
    /// The terminal settings to restore (Termios is not Sync, hence the Mutex).
    Stdio {
        saved_termios: Mutex<Option<Termios>>,
    },
    File,
    Pty {
        slave_path: PathBuf,
    },
    Unix {
        path: PathBuf,
        state: Arc<UnixState>,
    },
}

/// A character device backend, as named by `-serial` (`serial0`, ...).
pub struct Chardev {
    label: String,
    kind: Kind,
    queue: Arc<OutQueue>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    frontend_open: AtomicBool,
}

static STDIO_TAKEN: AtomicBool = AtomicBool::new(false);

impl Chardev {
    /// Opens the backend; bytes the outside sends are passed to `on_input` from a background
    /// thread. A unix server with `wait: true` blocks here until its first client connects.
    pub fn open(cfg: &ChardevConfig, on_input: InputFn) -> Result<Chardev, ChardevError> {
        let mut chr = Chardev {
            label: cfg.id.clone(),
            kind: Kind::Null,
            queue: Arc::new(OutQueue::default()),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            frontend_open: AtomicBool::new(true),
        };
        match &cfg.backend {
            ChardevBackend::Null => {}
            ChardevBackend::Stdio => chr.open_stdio(on_input)?,
            ChardevBackend::File { path } => chr.open_file(path)?,
            ChardevBackend::Pty => chr.open_pty(on_input)?,
            ChardevBackend::UnixServer { path, wait } => chr.open_unix(path, *wait, on_input)?,
        }
        match &chr.kind {
            Kind::Null => {}
            Kind::Unix { path, .. } => register_live(&chr.queue, Some(path.clone())),
            _ => register_live(&chr.queue, None),
        }
        tracing::debug!(chardev = %chr.label, filename = %chr.filename(), "chardev open");
        Ok(chr)
    }

    fn open_file(&mut self, path: &Path) -> Result<(), ChardevError> {
        // QEMU's file backend: O_WRONLY | O_CREAT | O_TRUNC (no append unless asked).
        let file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(|source| {
                ChardevError::OpenFile { id: self.label.clone(), path: path.to_path_buf(), source }
            })?;
        let mut file = file;
        let w = spawn_writer(&self.label, self.queue.clone(), move |data, _| file.write_all(data))?;
        self.threads.push(w);
        self.kind = Kind::File;
        Ok(())
    }

    fn open_stdio(&mut self, on_input: InputFn) -> Result<(), ChardevError> {
        if STDIO_TAKEN.swap(true, Ordering::SeqCst) {
            return Err(ChardevError::StdioInUse { id: self.label.clone() });
        }
        match self.open_stdio_inner(on_input) {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Kind::Stdio { saved_termios } = &self.kind {
                    if let Some(t) = lock(saved_termios).as_ref() {
                        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, t);
                    }
                }
                self.kind = Kind::Null;
                STDIO_TAKEN.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn open_stdio_inner(&mut self, mut on_input: InputFn) -> Result<(), ChardevError> {
        let err = |source| ChardevError::Stdio { id: self.label.clone(), source };
        // Own descriptors for stdin/stdout: Rust's Stdout is line-buffered and we never change the
        // (shared) file status flags of fds 0 and 1.
        let out = io::stdout().as_fd().try_clone_to_owned().map_err(err)?;
        let input = io::stdin().as_fd().try_clone_to_owned().map_err(err)?;
        let mut saved = None;
        if io::stdin().is_terminal() {
            // QEMU's stdio chardev: raw input, output post-processing kept, signals (^C) kept.
            let orig = termios::tcgetattr(io::stdin().as_fd()).map_err(|e| err(nix_io(e)))?;
            let mut raw = orig.clone();
            use termios::{ControlFlags as C, InputFlags as I, LocalFlags as L, OutputFlags as O};
            raw.input_flags &=
                !(I::IGNBRK | I::BRKINT | I::PARMRK | I::ISTRIP | I::INLCR | I::IGNCR | I::ICRNL | I::IXON);
            raw.output_flags |= O::OPOST;
            raw.local_flags &= !(L::ECHO | L::ECHONL | L::ICANON | L::IEXTEN);
            raw.control_flags &= !(C::CSIZE | C::PARENB);
            raw.control_flags |= C::CS8;
            raw.control_chars[termios::SpecialCharacterIndices::VMIN as usize] = 1;
            raw.control_chars[termios::SpecialCharacterIndices::VTIME as usize] = 0;
            termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &raw).map_err(|e| err(nix_io(e)))?;
            saved = Some(orig);
        }
        self.kind = Kind::Stdio { saved_termios: Mutex::new(saved) };

        let mut out = File::from(out);
        let w = spawn_writer(&self.label, self.queue.clone(), move |data, _| out.write_all(data))?;
        self.threads.push(w);

        let stop = self.stop.clone();
        let label = self.label.clone();
        let r = std::thread::Builder::new()
            .name(format!("chr-in-{}", self.label))
            .spawn(move || {
                let mut input = File::from(input);
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match poll_one(input.as_fd(), PollFlags::POLLIN) {
                        Ok(ev) if ev.is_empty() => continue,
                        Ok(ev) if ev.contains(PollFlags::POLLNVAL) => break,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(chardev = %label, "stdin poll failed: {e}");
                            break;
                        }
                    }
                    match input.read(&mut buf) {
                        Ok(0) => break, // EOF: no more input, output continues
                        Ok(n) => on_input(&buf[..n]),
                        Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
                        Err(e) => {
                            tracing::warn!(chardev = %label, "stdin read failed: {e}");
                            break;
                        }
                    }
                }
            })
            .map_err(|source| ChardevError::Thread { id: self.label.clone(), source })?;
        self.threads.push(r);
        Ok(())
    }

    fn open_pty(&mut self, mut on_input: InputFn) -> Result<(), ChardevError> {
        let err = |source| ChardevError::Pty { id: self.label.clone(), source };
        let pty = nix::pty::openpty(None::<&nix::pty::Winsize>, None::<&Termios>).map_err(|e| err(nix_io(e)))?;
        let slave_path = nix::unistd::ttyname(&pty.slave).map_err(|e| err(nix_io(e)))?;
        // Raw mode on the slave side, as QEMU's qemu_openpty_raw() does; then close our slave fd
        // so that the master reports hang-up until someone opens the slave.
        let mut t = termios::tcgetattr(&pty.slave).map_err(|e| err(nix_io(e)))?;
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(&pty.slave, SetArg::TCSAFLUSH, &t).map_err(|e| err(nix_io(e)))?;
        drop(pty.slave);
        let master: OwnedFd = pty.master;
        set_nonblocking(&master).map_err(err)?;
        let reader_fd = master.try_clone().map_err(err)?;

        // Exactly QEMU's message.
        eprintln!("char device redirected to {} (label {})", slave_path.display(), self.label);

        let mut out = File::from(master);
        let w = spawn_writer(&self.label, self.queue.clone(), move |data, q| {
            // Nobody on the slave side: drop, as QEMU does while the pty is disconnected.
            match poll_one_now(out.as_fd()) {
                Some(ev) if ev.contains(PollFlags::POLLHUP) => return Ok(()),
                _ => {}
            }
            write_nonblocking(&mut out, data, q)
        })?;
        self.threads.push(w);

        let stop = self.stop.clone();
        let label = self.label.clone();
        let r = std::thread::Builder::new()
            .name(format!("chr-in-{}", self.label))
            .spawn(move || {
                let mut input = File::from(reader_fd);
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match poll_one(input.as_fd(), PollFlags::POLLIN) {
                        Ok(ev) if ev.contains(PollFlags::POLLIN) => {}
                        Ok(ev) if ev.contains(PollFlags::POLLHUP) => {
                            // No slave open yet (or any more): poll would return at once.
                            std::thread::sleep(Duration::from_millis(POLL_SLICE_MS.into()));
                            continue;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::warn!(chardev = %label, "pty poll failed: {e}");
                            break;
                        }
                    }
                    match input.read(&mut buf) {
                        Ok(0) => std::thread::sleep(Duration::from_millis(POLL_SLICE_MS.into())),
                        Ok(n) => on_input(&buf[..n]),
                        Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                            std::thread::sleep(Duration::from_millis(POLL_SLICE_MS.into()))
                        }
                        Err(e) => {
                            tracing::warn!(chardev = %label, "pty read failed: {e}");
                            break;
                        }
                    }
                }
            })
            .map_err(|source| ChardevError::Thread { id: self.label.clone(), source })?;
        self.threads.push(r);
        self.kind = Kind::Pty { slave_path };
        Ok(())
    }

    fn open_unix(&mut self, path: &Path, wait: bool, mut on_input: InputFn) -> Result<(), ChardevError> {
        let id = self.label.clone();
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)
                .map_err(|source| ChardevError::RemoveStale { id: id.clone(), path: path.to_path_buf(), source })?,
            Ok(_) => return Err(ChardevError::NotASocket { id, path: path.to_path_buf() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(ChardevError::RemoveStale { id, path: path.to_path_buf(), source }),
        }
        let listener = UnixListener::bind(path).map_err(|source| ChardevError::Listen {
            id: id.clone(),
            path: path.to_path_buf(),
            source,
        })?;
        let state = Arc::new(UnixState::default());
        self.kind = Kind::Unix { path: path.to_path_buf(), state: state.clone() };

        let mut first = None;
        if wait {
            eprintln!("flotilla: info: QEMU waiting for connection on: {}", self.filename());
            let (stream, _) = listener.accept().map_err(|source| ChardevError::Accept {
                id: id.clone(),
                path: path.to_path_buf(),
                source,
            })?;
            let stream = Arc::new(stream);
            *lock(&state.client) = Some(stream.clone());
            first = Some(stream);
        }
        listener.set_nonblocking(true).map_err(|source| ChardevError::Listen {
            id: id.clone(),
            path: path.to_path_buf(),
            source,
        })?;

        let st = state.clone();
        let w = spawn_writer(&id, self.queue.clone(), move |data, q| {
            let Some(client) = lock(&st.client).clone() else { return Ok(()) };
            send_nonblocking(&client, data, q, &st)
        })?;
        self.threads.push(w);

        let stop = self.stop.clone();
        let queue = self.queue.clone();
        let label = id.clone();
        let r = std::thread::Builder::new()
            .name(format!("chr-in-{id}"))
            .spawn(move || {
                let mut client = first;
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Some(stream) = client.clone() else {
                        // Listening: one client at a time; later ones wait in the backlog.
                        match poll_one(listener.as_fd(), PollFlags::POLLIN) {
                            Ok(ev) if ev.is_empty() => continue,
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(chardev = %label, "poll on listening socket failed: {e}");
                                std::thread::sleep(Duration::from_millis(POLL_SLICE_MS.into()));
                                continue;
                            }
                        }
                        match listener.accept() {
                            Ok((s, _)) => {
                                let s = Arc::new(s);
                                tracing::debug!(chardev = %label, "client connected");
                                *lock(&state.client) = Some(s.clone());
                                client = Some(s);
                            }
                            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                            Err(e) => {
                                tracing::warn!(chardev = %label, "accept failed: {e}");
                                std::thread::sleep(Duration::from_millis(POLL_SLICE_MS.into()));
                            }
                        }
                        continue;
                    };
                    let gone = match poll_one(stream.as_fd(), PollFlags::POLLIN) {
                        Ok(ev) if ev.is_empty() => false,
                        Ok(_) => match (&*stream).read(&mut buf) {
                            Ok(0) => true,
                            Ok(n) => {
                                on_input(&buf[..n]);
                                false
                            }
                            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                                false
                            }
                            Err(_) => true,
                        },
                        Err(_) => true,
                    };
                    if gone {
                        tracing::debug!(chardev = %label, "client disconnected");
                        *lock(&state.client) = None;
                        queue.clear();
                        client = None;
                    }
                }
            })
            .map_err(|source| ChardevError::Thread { id: id.clone(), source })?;
        self.threads.push(r);
        Ok(())
    }

    /// Sends guest output to the backend. Never blocks for long: output nobody can receive is
    /// dropped, and a slow consumer only delays the caller up to a short bound once.
    pub fn write(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match &self.kind {
            Kind::Null => {}
            Kind::Unix { state, .. } => {
                if lock(&state.client).is_some() {
                    self.queue.push(bytes, Duration::ZERO);
                }
            }
            Kind::Pty { .. } => self.queue.push(bytes, Duration::ZERO),
            Kind::Stdio { .. } | Kind::File => self.queue.push(bytes, STALL_WAIT),
        }
    }

    /// Waits (up to `timeout`) until queued output has been handed to the backend.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.queue.flush(timeout)
    }

    /// The chardev's id (`serial0`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// query-chardev's `filename`, as QEMU encodes it.
    pub fn filename(&self) -> String {
        match &self.kind {
            Kind::Null => "null".into(),
            Kind::Stdio { .. } => "stdio".into(),
            Kind::File => "file".into(),
            Kind::Pty { slave_path } => format!("pty:{}", slave_path.display()),
            Kind::Unix { path, state } => {
                let prefix = if lock(&state.client).is_some() { "" } else { "disconnected:" };
                format!("{prefix}unix:{},server=on", path.display())
            }
        }
    }

    /// query-chardev's `frontend-open`: whether a device (the UART) has the chardev open.
    pub fn frontend_open(&self) -> bool {
        self.frontend_open.load(Ordering::Relaxed)
    }

    pub fn set_frontend_open(&self, open: bool) {
        self.frontend_open.store(open, Ordering::Relaxed);
    }

    /// Output bytes dropped so far (no client, or a consumer that did not keep up).
    pub fn dropped_bytes(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// The slave device of a `pty` backend.
    pub fn pty_path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Pty { slave_path } => Some(slave_path),
            _ => None,
        }
    }
}

/// POLLHUP check without waiting.
fn poll_one_now(fd: BorrowedFd<'_>) -> Option<PollFlags> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0].revents(),
        Err(_) => None,
    }
}

/// Sends to a unix client without blocking the socket for reads (MSG_DONTWAIT per call), waiting
/// in poll slices while its buffer is full; stops when the client changes or goes away.
fn send_nonblocking(client: &Arc<UnixStream>, mut data: &[u8], queue: &OutQueue, st: &UnixState) -> io::Result<()> {
    while !data.is_empty() {
        match send(client.as_raw_fd(), data, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let ev = poll_one(client.as_fd(), PollFlags::POLLOUT)?;
                if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) || queue.abandon() {
                    return Ok(());
                }
                let same = lock(&st.client).as_ref().is_some_and(|c| Arc::ptr_eq(c, client));
                if !same {
                    return Ok(());
                }
            }
            // The client went away; the reader notices and listens again.
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => return Ok(()),
            Err(e) => return Err(nix_io(e)),
        }
    }
    Ok(())
}

impl Drop for Chardev {
    fn drop(&mut self) {
        self.queue.close(FLUSH_ON_CLOSE);
        self.stop.store(true, Ordering::Relaxed);
        if let Kind::Unix { state, .. } = &self.kind {
            if let Some(c) = lock(&state.client).as_ref() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        match &self.kind {
            Kind::Stdio { saved_termios } => {
                if let Some(t) = lock(saved_termios).as_ref() {
                    if let Err(e) = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, t) {
                        tracing::warn!("could not restore the terminal: {e}");
                    }
                }
                STDIO_TAKEN.store(false, Ordering::SeqCst);
            }
            Kind::Unix { path, .. } => {
                let _ = std::fs::remove_file(path);
            }
            _ => {}
        }
        let dropped = self.dropped_bytes();
        if dropped > 0 {
            tracing::debug!(chardev = %self.label, dropped, "chardev closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "flotilla-chardev-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).expect("temp dir");
            TempDir(p)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(backend: ChardevBackend) -> ChardevConfig {
        ChardevConfig { id: "serial0".into(), backend }
    }

    fn input_channel() -> (InputFn, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel();
        (Box::new(move |b: &[u8]| drop(tx.send(b.to_vec()))), rx)
    }

    fn recv_exactly(rx: &mpsc::Receiver<Vec<u8>>, want: &[u8]) {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => got.extend(b),
                Err(_) => panic!("input timed out; got {:?}", String::from_utf8_lossy(&got)),
            }
        }
        assert_eq!(got, want);
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = vec![0; n];
        s.read_exact(&mut buf).expect("read from chardev");
        buf
    }

    #[test]
    fn null_discards_and_reports_null() {
        let (f, _rx) = input_channel();
        let c = Chardev::open(&cfg(ChardevBackend::Null), f).expect("open");
        c.write(b"anything");
        assert_eq!(c.filename(), "null");
        assert_eq!(c.label(), "serial0");
        assert!(c.frontend_open());
        c.set_frontend_open(false);
        assert!(!c.frontend_open());
    }

    #[test]
    fn file_output_truncates_and_receives_bytes() {
        let d = TempDir::new("file");
        let p = d.path("out.log");
        std::fs::write(&p, b"stale contents that must go").expect("seed");
        let (f, _rx) = input_channel();
        let c = Chardev::open(&cfg(ChardevBackend::File { path: p.clone() }), f).expect("open");
        assert_eq!(c.filename(), "file");
        c.write(b"hello ");
        c.write(b"file\n");
        assert!(c.flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read(&p).expect("read"), b"hello file\n");
        c.write(b"more");
        drop(c); // flushes on close
        assert_eq!(std::fs::read(&p).expect("read"), b"hello file\nmore");
    }

    #[test]
    fn file_open_error_names_the_path() {
        let (f, _rx) = input_channel();
        let Err(e) = Chardev::open(&cfg(ChardevBackend::File { path: "/nonexistent-dir/x".into() }), f) else {
            panic!("opening a file in a missing directory succeeded")
        };
        let msg = e.to_string();
        assert!(msg.contains("serial0") && msg.contains("/nonexistent-dir/x"), "{msg}");
    }

    #[test]
    fn unix_server_round_trip_drop_and_reconnect() {
        let d = TempDir::new("unix");
        let p = d.path("serial.sock");
        // A stale socket file from an earlier run is replaced.
        drop(UnixListener::bind(&p).expect("stale socket"));
        assert!(p.exists());
        let (f, rx) = input_channel();
        let c = Chardev::open(&cfg(ChardevBackend::UnixServer { path: p.clone(), wait: false }), f).expect("open");
        let disconnected = format!("disconnected:unix:{},server=on", p.display());
        let connected = format!("unix:{},server=on", p.display());
        assert_eq!(c.filename(), disconnected);

        // No client: output is dropped, not queued for a later one.
        c.write(b"lost");
        assert!(c.flush(Duration::from_secs(5)));

        let mut s = UnixStream::connect(&p).expect("connect");
        wait_until("connected filename", || c.filename() == connected);
        c.write(b"seen");
        assert_eq!(read_exactly(&mut s, 4), b"seen");
        s.write_all(b"typed").expect("send");
        recv_exactly(&rx, b"typed");

        // Disconnect, then a new client gets the new output only.
        drop(s);
        wait_until("disconnected filename", || c.filename() == disconnected);
        c.write(b"gone");
        let mut s2 = UnixStream::connect(&p).expect("reconnect");
        wait_until("reconnected filename", || c.filename() == connected);
        c.write(b"again");
        assert_eq!(read_exactly(&mut s2, 5), b"again");
        s2.write_all(b"second").expect("send");
        recv_exactly(&rx, b"second");

        drop(c);
        assert!(!p.exists(), "socket file removed on close");
    }

    #[test]
    fn unix_server_second_client_waits_for_the_first() {
        let d = TempDir::new("unix2");
        let p = d.path("s.sock");
        let (f, rx) = input_channel();
        let c = Chardev::open(&cfg(ChardevBackend::UnixServer { path: p.clone(), wait: false }), f).expect("open");
        let mut a = UnixStream::connect(&p).expect("a");
        wait_until("a connected", || !c.filename().starts_with("disconnected:"));
        let mut b = UnixStream::connect(&p).expect("b sits in the backlog");
        b.write_all(b"B").expect("b send");
        a.write_all(b"A").expect("a send");
        recv_exactly(&rx, b"A");
        c.write(b"to-a");
        assert_eq!(read_exactly(&mut a, 4), b"to-a");
        drop(a);
        recv_exactly(&rx, b"B"); // b is served once a left
        c.write(b"to-b");
        assert_eq!(read_exactly(&mut b, 4), b"to-b");
    }

    #[test]
    fn unix_server_client_that_does_not_read_does_not_wedge_writes() {
        let d = TempDir::new("unix3");
        let p = d.path("s.sock");
        let (f, _rx) = input_channel();
        let c = Chardev::open(&cfg(ChardevBackend::UnixServer { path: p.clone(), wait: false }), f).expect("open");
        let _s = UnixStream::connect(&p).expect("connect");
        wait_until("connected", || !c.filename().starts_with("disconnected:"));
        let block = vec![b'x'; 64 << 10];
        let start = Instant::now();
        for _ in 0..64 {
            c.write(&block); // 4 MiB: far beyond socket buffer + queue
        }
        assert!(start.elapsed() < Duration::from_secs(2), "writes blocked for {:?}", start.elapsed());
        wait_until("drops counted", || c.dropped_bytes() > 0);
        let start = Instant::now();
        drop(c);
        assert!(start.elapsed() < Duration::from_secs(3), "close took {:?}", start.elapsed());
    }

    #[test]
    fn unix_server_wait_blocks_until_a_client_connects() {
        let d = TempDir::new("unix4");
        let p = d.path("w.sock");
        let p2 = p.clone();
        let client = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match UnixStream::connect(&p2) {
                    Ok(s) => return s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => panic!("connect: {e}"),
                }
            }
        });
        let (f, rx) = input_channel();
        let c = Chardev::open(&cfg(ChardevBackend::UnixServer { path: p.clone(), wait: true }), f).expect("open");
        // open() returned, so the client is already attached: output is not dropped.
        assert_eq!(c.filename(), format!("unix:{},server=on", p.display()));
        c.write(b"hi");
        let mut s = client.join().expect("client thread");
        assert_eq!(read_exactly(&mut s, 2), b"hi");
        s.write_all(b"yo").expect("send");
        recv_exactly(&rx, b"yo");
    }

    #[test]
    fn unix_refuses_to_remove_a_regular_file() {
        let d = TempDir::new("unix5");
        let p = d.path("not-a-socket");
        std::fs::write(&p, b"keep me").expect("seed");
        let (f, _rx) = input_channel();
        assert!(matches!(
            Chardev::open(&cfg(ChardevBackend::UnixServer { path: p.clone(), wait: false }), f),
            Err(ChardevError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&p).expect("still there"), b"keep me");
    }

    #[test]
    fn pty_slave_exists_and_carries_both_directions() {
        let (f, rx) = input_channel();
        let c = Chardev::open(&cfg(ChardevBackend::Pty), f).expect("open");
        let slave = c.pty_path().expect("pty path").to_path_buf();
        assert!(slave.starts_with("/dev/pts/"), "{}", slave.display());
        assert!(slave.exists());
        assert_eq!(c.filename(), format!("pty:{}", slave.display()));

        // Nobody on the slave: output is dropped without blocking.
        c.write(b"nobody");
        assert!(c.flush(Duration::from_secs(5)));

        let mut s = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(&slave)
                .expect("open slave")
        };
        s.write_all(b"in").expect("write slave");
        recv_exactly(&rx, b"in");
        c.write(b"out");
        let mut buf = [0u8; 3];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = 0;
        set_nonblocking(&s).expect("nonblocking");
        while got < 3 {
            match s.read(&mut buf[got..]) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "pty output timed out");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("read slave: {e}"),
            }
        }
        assert_eq!(&buf, b"out");
    }
}
