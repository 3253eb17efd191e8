//! A vhost-user backend for the frontend's unit tests: it speaks the real protocol (the `vhost`
//! crate's backend side), records every message in order, keeps the fds it was given, and can
//! be slowed down or killed (its connection shut down, its socket removed) at any point.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::*;
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;

use crate::devices::bus::lock;

pub const VERSION_1: u64 = 1 << 32;
pub const EVENT_IDX: u64 = 1 << 29;
pub const PROTOCOL: u64 = 1 << 30;

/// One message as the mock saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    SetFeatures(u64),
    SetProtocol(u64),
    /// GET_INFLIGHT_FD(num_queues, queue_size); answered with a new memfd.
    GetInflight(u16, u16),
    /// SET_INFLIGHT_FD(num_queues, queue_size, mmap_size, inode of the file).
    SetInflight(u16, u16, u64, u64),
    Num(u32, u32),
    Base(u32, u32),
    Addr(u32),
    Kick(u8),
    Call(u8),
    Err(u8),
    Enable(u32, bool),
    GetBase(u32),
    ResetDevice,
    SetConfig(u32, Vec<u8>),
}

/// How the mock behaves.
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    pub inflight: bool,
    /// What GET_VRING_BASE answers, per ring (default: the base it was given).
    pub get_base: BTreeMap<u32, u32>,
    /// A pause before answering GET_VRING_BASE (a backend draining its rings).
    pub stop_delay: Duration,
}

/// What the mock saw; shared with the test.
#[derive(Debug, Default)]
pub struct MockState {
    pub msgs: Vec<(Instant, Msg)>,
    pub err_fds: BTreeMap<u8, File>,
    pub inflight_inodes: Vec<u64>,
    bases: BTreeMap<u32, u32>,
}

impl MockState {
    pub fn msgs(&self) -> Vec<Msg> {
        self.msgs.iter().map(|(_, m)| m.clone()).collect()
    }
}

struct Handler {
    cfg: MockConfig,
    state: Arc<Mutex<MockState>>,
    acked_protocol: u64,
}

impl Handler {
    fn log(&self, m: Msg) {
        lock(&self.state).msgs.push((Instant::now(), m));
    }
}

fn unsupported<T>() -> Result<T> {
    Err(Error::InvalidOperation("not supported by the mock"))
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> Result<()> {
        Ok(())
    }
    fn reset_owner(&mut self) -> Result<()> {
        Ok(())
    }
    fn reset_device(&mut self) -> Result<()> {
        self.log(Msg::ResetDevice);
        Ok(())
    }
    fn get_features(&mut self) -> Result<u64> {
        Ok(VERSION_1 | EVENT_IDX | PROTOCOL)
    }
    fn set_features(&mut self, features: u64) -> Result<()> {
        self.log(Msg::SetFeatures(features));
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        _ctx: &[VhostUserMemoryRegion],
        _files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        self.log(Msg::Num(index, num));
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        _descriptor: u64,
        _used: u64,
        _available: u64,
        _log: u64,
    ) -> Result<()> {
        self.log(Msg::Addr(index));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        lock(&self.state).bases.insert(index, base);
        self.log(Msg::Base(index, base));
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.log(Msg::GetBase(index));
        std::thread::sleep(self.cfg.stop_delay);
        let given = lock(&self.state).bases.get(&index).copied().unwrap_or(0);
        Ok(VhostUserVringState::new(index, self.cfg.get_base.get(&index).copied().unwrap_or(given)))
    }
    fn set_vring_kick(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.log(Msg::Kick(index));
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.log(Msg::Call(index));
        Ok(())
    }
    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.log(Msg::Err(index));
        if let Some(f) = fd {
            lock(&self.state).err_fds.insert(index, f);
        }
        Ok(())
    }
    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        let mut p = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE;
        if self.cfg.inflight {
            p |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        Ok(p)
    }
    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol = features;
        self.log(Msg::SetProtocol(features));
        Ok(())
    }
    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(8)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.log(Msg::Enable(index, enable));
        Ok(())
    }
    fn get_config(&mut self, _offset: u32, size: u32, _flags: VhostUserConfigFlags) -> Result<Vec<u8>> {
        Ok(vec![0; size as usize])
    }
    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        self.log(Msg::SetConfig(offset, buf.to_vec()));
        Ok(())
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        unsupported()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        unsupported()
    }
    fn get_inflight_fd(&mut self, inflight: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        self.log(Msg::GetInflight(inflight.num_queues, inflight.queue_size));
        // Any region will do for the frontend: it only keeps it and hands it back.
        let size = u64::from(inflight.num_queues) * (16 + 16 * u64::from(inflight.queue_size));
        let fd = nix::sys::memfd::memfd_create(c"mock-inflight", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| Error::ReqHandlerError(e.into()))?;
        let file = File::from(fd);
        file.set_len(size).map_err(Error::ReqHandlerError)?;
        let ino = file.metadata().map_err(Error::ReqHandlerError)?.ino();
        lock(&self.state).inflight_inodes.push(ino);
        let desc = VhostUserInflight { mmap_size: size, mmap_offset: 0, ..*inflight };
        Ok((desc, file))
    }
    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> Result<()> {
        let ino = file.metadata().map_err(Error::ReqHandlerError)?.ino();
        self.log(Msg::SetInflight(inflight.num_queues, inflight.queue_size, inflight.mmap_size, ino));
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> Result<u64> {
        unsupported()
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        unsupported()
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        unsupported()
    }
    fn check_device_state(&mut self) -> Result<()> {
        unsupported()
    }
    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        unsupported()
    }
}

/// A mock backend listening on a socket, serving one connection at a time.
pub struct MockBackend {
    path: PathBuf,
    pub state: Arc<Mutex<MockState>>,
    /// When it started listening.
    pub listening_at: Instant,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl MockBackend {
    pub fn start(path: &Path, cfg: MockConfig) -> MockBackend {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the mock's socket");
        let listening_at = Instant::now();
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(Mutex::new(MockState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let conn: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let (st, stp, cn) = (state.clone(), stop.clone(), conn.clone());
        let thread = std::thread::spawn(move || {
            while !stp.load(Ordering::SeqCst) {
                let mut p = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one live pollfd.
                if unsafe { libc::poll(&mut p, 1, 10) } != 1 {
                    continue;
                }
                let Ok((sock, _)) = listener.accept() else { continue };
                sock.set_nonblocking(false).expect("blocking");
                *lock(&cn) = Some(sock.try_clone().expect("dup"));
                let h = Handler { cfg: cfg.clone(), state: st.clone(), acked_protocol: 0 };
                let mut req = BackendReqHandler::from_stream(sock, Arc::new(Mutex::new(h)));
                while !stp.load(Ordering::SeqCst) && req.handle_request().is_ok() {}
            }
        });
        MockBackend { path: path.to_path_buf(), state, listening_at, stop, conn, thread: Some(thread) }
    }

    /// Dies as a SIGKILLed backend would: the connection closes, the socket file goes.
    pub fn kill(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = lock(&self.conn).take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }

    pub fn msgs(&self) -> Vec<Msg> {
        lock(&self.state).msgs()
    }

    /// Waits (bounded) until `pred` holds for the messages seen so far.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Msg]) -> bool) -> Vec<Msg> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.msgs();
            if pred(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; messages: {m:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// When the first message matching `pred` arrived.
    pub fn time_of(&self, pred: impl Fn(&Msg) -> bool) -> Option<Instant> {
        lock(&self.state).msgs.iter().find(|(_, m)| pred(m)).map(|(t, _)| *t)
    }
}

impl Drop for MockBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}
