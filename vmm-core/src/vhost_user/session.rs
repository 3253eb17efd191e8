//! One connection to a vhost-user backend, and the messages vmm-core sends on it: the
//! handshake (owner, features, protocol features, queue count, backend-request channel, memory
//! table, config), starting and stopping vrings, config access. Every call is bounded by the
//! socket's timeouts, so a hung backend becomes an error here, never a hang.

use super::backend_req::ConfigChangeFlag;
use crate::virtio_pci::{features, DeviceSignals, QueueConfig, NO_VECTOR};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How long one request may wait for the backend's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Protocol features vmm-core uses when the backend offers them.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::RESET_DEVICE
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-user {what}: {source}")]
    Request {
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("the backend serves {have} queues, the device has {want}")]
    TooFewQueues { have: u64, want: u16 },
    #[error("queue {queue}: ring address {gpa:#x} is not in guest RAM")]
    RingAddress { queue: u16, gpa: u64 },
    #[error("reading queue {queue}'s used index at {gpa:#x}: {source}")]
    UsedIndex {
        queue: u16,
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("setting up the backend-request channel: {0}")]
    BackendReq(#[source] vhost::vhost_user::Error),
    #[error("describing guest RAM for SET_MEM_TABLE: {0}")]
    MemTable(#[source] vhost::Error),
}

fn req<T>(what: &'static str, r: Result<T, vhost::Error>) -> Result<T, SessionError> {
    r.map_err(|source| SessionError::Request { what, source })
}

/// An established connection.
pub struct Session {
    fe: Frontend,
    /// Everything the backend offers (with the vhost-user protocol bit).
    pub backend_features: u64,
    pub protocol: VhostUserProtocolFeatures,
    /// The backend-request channel, when BACKEND_REQ was negotiated.
    pub backend_req: Option<FrontendReqHandler<ConfigChangeFlag>>,
    pub config_flag: Arc<ConfigChangeFlag>,
    /// Queues handed to the backend since the last stop.
    started: Vec<u16>,
}

impl Session {
    /// Connects and runs the handshake up to and including SET_MEM_TABLE.
    pub fn connect(path: &Path, num_queues: u16, mem: &GuestMemoryMmap) -> Result<Session, SessionError> {
        let connect_err = |source| SessionError::Connect { path: path.display().to_string(), source };
        let sock = UnixStream::connect(path).map_err(connect_err)?;
        sock.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(connect_err)?;
        sock.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(connect_err)?;
        let mut fe = Frontend::from_stream(sock, u64::from(num_queues));
        req("SET_OWNER", fe.set_owner())?;
        let backend_features = req("GET_FEATURES", fe.get_features())?;
        if backend_features & features::VERSION_1 == 0 {
            return Err(SessionError::NoVersion1(backend_features));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = req("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
            protocol = offered & wanted_protocol_features();
            req("SET_PROTOCOL_FEATURES", fe.set_protocol_features(protocol))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Without NEED_REPLY the acks are never awaited and errors go unnoticed.
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let have = req("GET_QUEUE_NUM", fe.get_queue_num())?;
                if have < u64::from(num_queues) {
                    return Err(SessionError::TooFewQueues { have, want: num_queues });
                }
            }
        }
        let config_flag = Arc::new(ConfigChangeFlag::default());
        let mut backend_req = None;
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let mut h = FrontendReqHandler::new(config_flag.clone()).map_err(SessionError::BackendReq)?;
            h.set_reply_ack_flag(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
            // A backend that sends half a message must not stall the worker either.
            set_receive_timeout(h.as_raw_fd(), REQUEST_TIMEOUT).map_err(connect_err)?;
            let tx: RawFd = h.get_tx_raw_fd();
            req("SET_BACKEND_REQ_FD", fe.set_backend_request_fd(&tx))?;
            backend_req = Some(h);
        }
        let regions = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(SessionError::MemTable))
            .collect::<Result<Vec<_>, _>>()?;
        req("SET_MEM_TABLE", fe.set_mem_table(&regions))?;
        Ok(Session { fe, backend_features, protocol, backend_req, config_flag, started: Vec::new() })
    }

    /// The main socket, to watch for hang-ups.
    pub fn raw_fd(&self) -> RawFd {
        self.fe.as_raw_fd()
    }

    pub fn has(&self, f: VhostUserProtocolFeatures) -> bool {
        self.protocol.contains(f)
    }

    /// The features vmm-core acks for the driver's `guest` features (plus the protocol bit).
    pub fn set_features(&mut self, guest: u64) -> Result<(), SessionError> {
        let pf = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        req("SET_FEATURES", self.fe.set_features(guest | pf))
    }

    /// GET_CONFIG of `len` bytes.
    pub fn get_config(&mut self, len: usize) -> Result<Vec<u8>, SessionError> {
        let buf = vec![0u8; len];
        let (_, bytes) = req("GET_CONFIG", self.fe.get_config(0, len as u32, VhostUserConfigFlags::WRITABLE, &buf))?;
        Ok(bytes)
    }

    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), SessionError> {
        req("SET_CONFIG", self.fe.set_config(offset, VhostUserConfigFlags::WRITABLE, data))
    }

    /// Hands the rings to the backend. `base_from_used`: each ring restarts at the used ring's
    /// idx in guest memory (a replay after reconnect; requests taken but not completed are run
    /// again), instead of 0 (a fresh start after the driver set the rings up).
    ///
    /// Inflight tracking (GET/SET_INFLIGHT_FD) would go here, before SET_VRING_BASE, once
    /// backends offer it: it gives the exact set of requests to resubmit.
    pub fn start_queues(
        &mut self,
        queues: &[QueueConfig],
        max_size: u16,
        base_from_used: bool,
        mem: &GuestMemoryMmap,
        kicks: &[EventFd],
        signals: &DeviceSignals,
    ) -> Result<(), SessionError> {
        let enable = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        for q in queues {
            let i = q.index as usize;
            let hva = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| SessionError::RingAddress { queue: q.index, gpa })
            };
            let config = VringConfigData {
                queue_max_size: max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: hva(q.desc)?,
                used_ring_addr: hva(q.used)?,
                avail_ring_addr: hva(q.avail)?,
                log_addr: None,
            };
            let base = if base_from_used {
                let gpa = q.used + 2;
                mem.read_obj::<u16>(GuestAddress(gpa)).map_err(|source| SessionError::UsedIndex {
                    queue: q.index,
                    gpa,
                    source,
                })?
            } else {
                0
            };
            req("SET_VRING_NUM", self.fe.set_vring_num(i, q.size))?;
            req("SET_VRING_BASE", self.fe.set_vring_base(i, base))?;
            req("SET_VRING_ADDR", self.fe.set_vring_addr(i, &config))?;
            if let Some(kick) = kicks.get(i) {
                req("SET_VRING_KICK", self.fe.set_vring_kick(i, kick))?;
            }
            if q.vector != NO_VECTOR {
                if let Some(call) = signals.vector_fd(q.vector) {
                    req("SET_VRING_CALL", self.fe.set_vring_call(i, &call))?;
                }
            }
            self.started.push(q.index);
            if enable {
                req("SET_VRING_ENABLE", self.fe.set_vring_enable(i, true))?;
            }
            tracing::debug!(queue = q.index, size = q.size, base, "vring started");
        }
        Ok(())
    }

    /// Stops every started ring (GET_VRING_BASE stops a ring in the backend).
    pub fn stop_queues(&mut self) -> Result<(), SessionError> {
        for q in std::mem::take(&mut self.started) {
            let base = req("GET_VRING_BASE", self.fe.get_vring_base(q as usize))?;
            tracing::debug!(queue = q, base, "vring stopped");
        }
        Ok(())
    }

    /// RESET_DEVICE when negotiated (the backend forgets the acked features, keeps the rest).
    pub fn reset_device(&mut self) -> Result<(), SessionError> {
        if self.has(VhostUserProtocolFeatures::RESET_DEVICE) {
            req("RESET_DEVICE", self.fe.reset_device())?;
        }
        Ok(())
    }

    /// Serves one message on the backend-request channel; returns whether the backend
    /// reported a configuration change.
    pub fn handle_backend_request(&mut self) -> Result<bool, SessionError> {
        if let Some(h) = self.backend_req.as_mut() {
            h.handle_request().map_err(|e| SessionError::Request {
                what: "backend request",
                source: vhost::Error::VhostUserProtocol(e),
            })?;
        }
        Ok(self.config_flag.take())
    }

    pub fn backend_req_fd(&self) -> Option<RawFd> {
        self.backend_req.as_ref().map(|h| h.as_raw_fd())
    }
}

/// SO_RCVTIMEO on a socket this process owns.
fn set_receive_timeout(fd: RawFd, t: Duration) -> std::io::Result<()> {
    let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
    // SAFETY: `fd` is a live socket owned by the caller; the option value is a timeval on the
    // stack whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
