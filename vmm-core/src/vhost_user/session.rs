//! One connection to a vhost-user backend, and the messages vmm-core sends on it: the
//! handshake (owner, features, protocol features, queue count, backend-request channel, memory
//! table, config), starting and stopping vrings, config access. Every call is bounded by the
//! socket's timeouts, so a hung backend becomes an error here, never a hang.

use super::backend_req::ConfigChangeFlag;
use crate::virtio_pci::{features, DeviceSignals, QueueConfig, NO_VECTOR};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
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
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// The inflight region a backend described at GET_INFLIGHT_FD: kept by the worker for the
/// device's lifetime (until a reset) and handed to every later connection.
pub struct Inflight {
    pub desc: VhostUserInflight,
    pub file: File,
}

/// One ring to hand to the backend, with the index it starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingStart {
    pub queue: QueueConfig,
    pub base: u16,
}

/// Host addresses of a ring's three parts, once each part was found whole inside one region of
/// guest RAM (descriptor table 16 * size bytes, avail ring 6 + 2 * size, used ring 6 + 8 * size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingHva {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Checks a ring's extents against guest RAM and translates its addresses.
pub fn ring_hva(q: &QueueConfig, mem: &GuestMemoryMmap) -> Result<RingHva, SessionError> {
    let size = u64::from(q.size);
    let part = |gpa: u64, len: u64| -> Result<u64, SessionError> {
        let bad = || SessionError::RingAddress { queue: q.index, gpa, len };
        let region = mem.find_region(GuestAddress(gpa)).ok_or_else(bad)?;
        let offset = gpa - region.start_addr().0;
        if offset.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(bad());
        }
        mem.get_host_address(GuestAddress(gpa)).map(|p| p as u64).map_err(|_| bad())
    };
    Ok(RingHva { desc: part(q.desc, 16 * size)?, avail: part(q.avail, 6 + 2 * size)?, used: part(q.used, 6 + 8 * size)? })
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
    #[error("queue {queue}: ring part at {gpa:#x} ({len} bytes) is not inside one region of guest RAM")]
    RingAddress { queue: u16, gpa: u64, len: u64 },
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

/// The used ring's idx in guest memory: where a ring restarts when the backend that ran it is
/// gone (requests it took but never completed are run again).
pub fn used_idx(q: &QueueConfig, mem: &GuestMemoryMmap) -> Result<u16, SessionError> {
    let gpa = q.used + 2;
    mem.read_obj::<u16>(GuestAddress(gpa)).map_err(|source| SessionError::UsedIndex { queue: q.index, gpa, source })
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

    /// GET_INFLIGHT_FD for `num_queues` rings of `queue_size` (the device's maximum, as QEMU
    /// asks). `None` when the backend did not negotiate INFLIGHT_SHMFD or describes an empty
    /// region (QEMU's vhost_dev_get_inflight treats that as no tracking).
    pub fn get_inflight(&mut self, num_queues: u16, queue_size: u16) -> Result<Option<Inflight>, SessionError> {
        if !self.has(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            return Ok(None);
        }
        let ask = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues, queue_size };
        let (desc, file) = req("GET_INFLIGHT_FD", self.fe.get_inflight_fd(&ask))?;
        Ok((desc.mmap_size != 0).then_some(Inflight { desc, file }))
    }

    /// SET_INFLIGHT_FD: hands a kept region back (before any ring starts).
    pub fn set_inflight(&mut self, inflight: &Inflight) -> Result<(), SessionError> {
        req("SET_INFLIGHT_FD", self.fe.set_inflight_fd(&inflight.desc, inflight.file.as_raw_fd()))
    }

    /// Hands the rings to the backend, each at its `base` (the caller decides: 0 after the
    /// driver set the rings up, the index GET_VRING_BASE gave at a stop, or the used ring's idx
    /// after a crash). `errs[i]` becomes queue i's SET_VRING_ERR eventfd. Every ring is checked
    /// against guest RAM before the first message, so a bad ring starts none.
    #[allow(clippy::too_many_arguments)]
    pub fn start_queues(
        &mut self,
        rings: &[RingStart],
        max_size: u16,
        mem: &GuestMemoryMmap,
        kicks: &[EventFd],
        errs: &[EventFd],
        signals: &DeviceSignals,
    ) -> Result<(), SessionError> {
        let hvas = rings.iter().map(|r| ring_hva(&r.queue, mem)).collect::<Result<Vec<_>, _>>()?;
        let enable = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        for (r, hva) in rings.iter().zip(hvas) {
            let q = &r.queue;
            let i = q.index as usize;
            let config = VringConfigData {
                queue_max_size: max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: hva.desc,
                used_ring_addr: hva.used,
                avail_ring_addr: hva.avail,
                log_addr: None,
            };
            req("SET_VRING_NUM", self.fe.set_vring_num(i, q.size))?;
            req("SET_VRING_BASE", self.fe.set_vring_base(i, r.base))?;
            req("SET_VRING_ADDR", self.fe.set_vring_addr(i, &config))?;
            if let Some(kick) = kicks.get(i) {
                req("SET_VRING_KICK", self.fe.set_vring_kick(i, kick))?;
            }
            if q.vector != NO_VECTOR {
                if let Some(call) = signals.vector_fd(q.vector) {
                    req("SET_VRING_CALL", self.fe.set_vring_call(i, &call))?;
                }
            }
            if let Some(err) = errs.get(i) {
                req("SET_VRING_ERR", self.fe.set_vring_err(i, err))?;
            }
            self.started.push(q.index);
            if enable {
                req("SET_VRING_ENABLE", self.fe.set_vring_enable(i, true))?;
            }
            tracing::debug!(queue = q.index, size = q.size, base = r.base, "vring started");
        }
        Ok(())
    }

    /// The queues handed to the backend since the last stop.
    pub fn started(&self) -> &[u16] {
        &self.started
    }

    /// Stops every started ring (GET_VRING_BASE stops a ring in the backend) and returns each
    /// ring's next avail index as the backend reported it.
    pub fn stop_queues(&mut self) -> Result<Vec<(u16, u16)>, SessionError> {
        let mut bases = Vec::with_capacity(self.started.len());
        for q in std::mem::take(&mut self.started) {
            let base = req("GET_VRING_BASE", self.fe.get_vring_base(q as usize))?;
            tracing::debug!(queue = q, base, "vring stopped");
            // The split ring's index is 16 bits; the upper half is the packed ring's wrap bit.
            bases.push((q, base as u16));
        }
        Ok(bases)
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
