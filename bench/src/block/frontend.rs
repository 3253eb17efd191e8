//! The bench's vhost-user-blk frontend: it plays the VMM and the guest driver at once, with no
//! guest CPU in the way. "Guest memory" is a memfd mapped here and handed to the backend with
//! SET_MEM_TABLE; the bench lays out one split virtqueue and its requests in it, kicks through
//! the eventfd given with SET_VRING_KICK and learns of completions from the eventfd given with
//! SET_VRING_CALL plus the used ring.
//!
//! Negotiated with every backend alike: VERSION_1, FLUSH (so both treat their cache as
//! write-back, as with Linux's driver), SIZE_MAX/SEG_MAX/BLK_SIZE when offered (to honour the
//! backend's limits), PROTOCOL_FEATURES with CONFIG and REPLY_ACK (every message acked:
//! NEED_REPLY). Not negotiated: EVENT_IDX, INDIRECT_DESC, MQ's extra queues. One queue of 256.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::error::BlockError;
use super::request::{header, Op, SlotPlan, SECTOR, STATUS_UNSET, VIRTIO_BLK_S_OK};
use super::ring::{DriverRing, Layout};
use super::workload::{Offsets, Rng, Workload};

pub const QUEUE_SIZE: u16 = 256;
const RING_BASE: u64 = 0;
const HDR_BASE: u64 = 0x4000;
/// Data buffers start here, page aligned, after the ring and headers.
pub const DATA_BASE: u64 = 1 << 20;
/// The largest data segment the bench puts in one descriptor (less when the backend's
/// SIZE_MAX says so): Linux's default segment size, and blockd's SIZE_MAX.
const MAX_SEG: u32 = 256 << 10;
/// How long the bench waits for any completion before it calls the backend stalled.
const STALL: Duration = Duration::from_secs(10);

const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const WANTED: u64 = VIRTIO_F_VERSION_1
    | VHOST_USER_F_PROTOCOL_FEATURES
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_SIZE_MAX
    | VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_BLK_SIZE;
/// Bytes of virtio_blk_config read: capacity .. num_queues. QEMU 7.2's export asserts the
/// length is within its struct (60 bytes), so ask for no more than what the bench uses.
const CONFIG_LEN: u32 = 36;

/// What the bench uses of the device's configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity_sectors: u64,
    pub size_max: Option<u32>,
    pub seg_max: Option<u32>,
    pub blk_size: Option<u32>,
}

/// Reads virtio_blk_config (virtio 1.x, 5.2.4); fields count only when their feature is
/// acked.
pub fn parse_config(b: &[u8], acked: u64) -> Option<BlkConfig> {
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let when = |bit: u64, o: usize| if acked & bit != 0 { u32_at(o) } else { None };
    Some(BlkConfig {
        capacity_sectors: u64::from_le_bytes(b.get(0..8)?.try_into().ok()?),
        size_max: when(VIRTIO_BLK_F_SIZE_MAX, 8).filter(|&v| v > 0),
        seg_max: when(VIRTIO_BLK_F_SEG_MAX, 12).filter(|&v| v > 0),
        blk_size: when(VIRTIO_BLK_F_BLK_SIZE, 20).filter(|&v| v > 0),
    })
}

/// The segment size the bench uses with a device: [`MAX_SEG`] or the device's SIZE_MAX,
/// whichever is smaller, rounded down to whole pages.
pub fn segment_size(cfg: &BlkConfig) -> u32 {
    let s = cfg.size_max.map_or(MAX_SEG, |m| m.min(MAX_SEG));
    if s >= 4096 {
        s / 4096 * 4096
    } else {
        s
    }
}

/// One timed run of a workload.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
    /// Submission to completion seen by the bench, of every request completed in the window.
    pub latencies_us: Vec<f64>,
}

/// A connected, started device.
pub struct Device {
    fe: Frontend,
    mem: GuestMemoryMmap,
    mem_size: u64,
    kick: EventFd,
    call: EventFd,
    ring: DriverRing,
    pub config: BlkConfig,
    pub acked: u64,
    pub seg: u32,
}

fn memfd(size: u64) -> Result<File, BlockError> {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1; nothing
    // else is touched.
    let fd = unsafe { libc::memfd_create(c"flotilla-bench-blk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(BlockError::Io { what: "memfd_create".into(), source: std::io::Error::last_os_error() });
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(BlockError::io(format!("sizing the memfd to {size} bytes")))?;
    Ok(file)
}

impl Device {
    /// Connects to the backend's socket and brings queue 0 up with `mem_size` bytes of
    /// shared memory (enough for [`DATA_BASE`] plus the largest workload's buffers).
    pub fn connect(socket: &Path, mem_size: u64) -> Result<Device, BlockError> {
        let mut fe = Frontend::connect(socket, 1).map_err(BlockError::vhost("connect"))?;
        fe.set_owner().map_err(BlockError::vhost("SET_OWNER"))?;
        let offered = fe.get_features().map_err(BlockError::vhost("GET_FEATURES"))?;
        for (bit, name) in [(VIRTIO_F_VERSION_1, "VERSION_1"), (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES")] {
            if offered & bit == 0 {
                return Err(BlockError::Backend {
                    what: "feature negotiation".into(),
                    detail: format!("the backend does not offer {name} (features {offered:#x})"),
                });
            }
        }
        let pf = fe.get_protocol_features().map_err(BlockError::vhost("GET_PROTOCOL_FEATURES"))?;
        if !pf.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(BlockError::Backend {
                what: "feature negotiation".into(),
                detail: "the backend does not offer the CONFIG protocol feature".into(),
            });
        }
        let want = pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(want).map_err(BlockError::vhost("SET_PROTOCOL_FEATURES"))?;
        if want.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let acked = offered & WANTED;
        fe.set_features(acked).map_err(BlockError::vhost("SET_FEATURES"))?;
        let (_, cfg) = fe
            .get_config(0, CONFIG_LEN, VhostUserConfigFlags::empty(), &[0u8; CONFIG_LEN as usize])
            .map_err(BlockError::vhost("GET_CONFIG"))?;
        let config = parse_config(&cfg, acked).ok_or_else(|| BlockError::Backend {
            what: "GET_CONFIG".into(),
            detail: format!("{} bytes of configuration space", cfg.len()),
        })?;

        let file = memfd(mem_size)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            mem_size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(BlockError::mem("mapping the memfd"))?;
        let region = mem.find_region(GuestAddress(0)).ok_or_else(|| BlockError::Setup("no memory region".into()))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).map_err(BlockError::vhost("memory region"))?;
        fe.set_mem_table(&[info]).map_err(BlockError::vhost("SET_MEM_TABLE"))?;

        let layout = Layout::new(RING_BASE, QUEUE_SIZE).ok_or_else(|| BlockError::Setup("bad ring layout".into()))?;
        let ring = DriverRing::new(&mem, layout).map_err(BlockError::mem("clearing the ring"))?;
        let host = |gpa: u64| {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(BlockError::mem(format!("host address of {gpa:#x}")))
        };
        let vring = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: host(layout.desc)?,
            used_ring_addr: host(layout.used)?,
            avail_ring_addr: host(layout.avail)?,
            log_addr: None,
        };
        let kick = EventFd::new(EFD_NONBLOCK).map_err(BlockError::io("kick eventfd"))?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(BlockError::io("call eventfd"))?;
        fe.set_vring_num(0, QUEUE_SIZE).map_err(BlockError::vhost("SET_VRING_NUM"))?;
        fe.set_vring_addr(0, &vring).map_err(BlockError::vhost("SET_VRING_ADDR"))?;
        fe.set_vring_base(0, 0).map_err(BlockError::vhost("SET_VRING_BASE"))?;
        fe.set_vring_call(0, &call).map_err(BlockError::vhost("SET_VRING_CALL"))?;
        fe.set_vring_kick(0, &kick).map_err(BlockError::vhost("SET_VRING_KICK"))?;
        fe.set_vring_enable(0, true).map_err(BlockError::vhost("SET_VRING_ENABLE"))?;
        let seg = segment_size(&config);
        Ok(Device { fe, mem, mem_size, kick, call, ring, config, acked, seg })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity_sectors.saturating_mul(SECTOR)
    }

    fn plan(&self, qd: u16, bs: u32) -> Result<SlotPlan, BlockError> {
        let plan = SlotPlan::new(qd, u64::from(bs), self.seg, QUEUE_SIZE, HDR_BASE, DATA_BASE).ok_or_else(|| {
            BlockError::Setup(format!("{qd} requests of {bs} bytes in {} byte segments do not fit the queue", self.seg))
        })?;
        if plan.end() > self.mem_size {
            return Err(BlockError::Setup(format!("{qd} x {bs} bytes need {} bytes of memory", plan.end())));
        }
        if let Some(m) = self.config.seg_max {
            if u32::from(plan.descs_per_slot - 2) > m {
                return Err(BlockError::Setup(format!("{bs} bytes need more than SEG_MAX = {m} segments")));
            }
        }
        Ok(plan)
    }

    fn write_chains(&self, plan: &SlotPlan, op: Op, bs: u32) -> Result<(), BlockError> {
        for slot in 0..plan.qd {
            for (i, d) in plan.chain(slot, op, bs) {
                self.ring.write_desc(&self.mem, i, d).map_err(BlockError::mem("writing a descriptor"))?;
            }
        }
        Ok(())
    }

    fn submit(&mut self, plan: &SlotPlan, slot: u16, op: Op, offset: u64) -> Result<(), BlockError> {
        self.mem
            .write_slice(&header(op, offset / SECTOR), GuestAddress(plan.header_addr(slot)))
            .and_then(|()| self.mem.write_obj(STATUS_UNSET, GuestAddress(plan.status_addr(slot))))
            .and_then(|()| self.ring.push(&self.mem, plan.head(slot)))
            .map_err(BlockError::mem("queueing a request"))
    }

    fn publish_and_kick(&mut self) -> Result<(), BlockError> {
        self.ring.publish(&self.mem).map_err(BlockError::mem("publishing the available index"))?;
        if self.ring.needs_kick(&self.mem).map_err(BlockError::mem("reading the used flags"))? {
            self.kick.write(1).map_err(BlockError::io("kicking the backend"))?;
        }
        Ok(())
    }

    /// Blocks until the backend signals the call eventfd, then clears it.
    fn wait_call(&self, timeout: Duration) -> Result<(), BlockError> {
        let mut pfd = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, and the count says one.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(BlockError::Io { what: "waiting for the call eventfd".into(), source: e });
        }
        if n == 0 {
            return Err(BlockError::Backend {
                what: "waiting for completions".into(),
                detail: format!("nothing used for {timeout:?} with {} requests in flight", self.ring.in_flight()),
            });
        }
        match self.call.read() {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(BlockError::Io { what: "reading the call eventfd".into(), source: e }),
        }
    }

    /// Takes one used element and checks it names a request in flight that ended well.
    fn complete(
        &mut self,
        plan: &SlotPlan,
        started: &mut [Option<Instant>],
    ) -> Result<Option<(u16, Instant)>, BlockError> {
        let Some(u) = self.ring.pop_used(&self.mem).map_err(BlockError::mem("reading the used ring"))? else {
            return Ok(None);
        };
        let bad = |detail: String| BlockError::Backend { what: "used ring".into(), detail };
        let slot = plan.slot_of(u.id).ok_or_else(|| bad(format!("id {} is not the head of a request", u.id)))?;
        let t = started
            .get_mut(usize::from(slot))
            .and_then(Option::take)
            .ok_or_else(|| bad(format!("id {} used while not in flight", u.id)))?;
        let status: u8 =
            self.mem.read_obj(GuestAddress(plan.status_addr(slot))).map_err(BlockError::mem("reading a status"))?;
        if status != VIRTIO_BLK_S_OK {
            return Err(BlockError::Backend {
                what: "request".into(),
                detail: format!("status {status:#x} (slot {slot}, used len {})", u.len),
            });
        }
        Ok(Some((slot, t)))
    }

    /// Runs `w` over the first `size` bytes of the disk: `warmup` untimed, then `runtime`
    /// during which completions are counted; then stops submitting and lets the queue drain.
    pub fn run(
        &mut self,
        w: &Workload,
        size: u64,
        warmup: Duration,
        runtime: Duration,
        seed: u64,
    ) -> Result<Measured, BlockError> {
        let plan = self.plan(w.qd, w.bs)?;
        self.write_chains(&plan, w.op, w.bs)?;
        let size = size.min(self.capacity_bytes());
        let mut offsets = Offsets::new(w, size, seed).ok_or_else(|| {
            BlockError::Setup(format!("the disk ({size} bytes) is smaller than one {} byte block", w.bs))
        })?;
        let mut started: Vec<Option<Instant>> = vec![None; usize::from(w.qd)];
        let mut m = Measured::default();
        let t0 = Instant::now();
        let (from, until) = (t0 + warmup, t0 + warmup + runtime);
        for slot in 0..w.qd {
            self.submit(&plan, slot, w.op, offsets.next_offset())?;
            started[usize::from(slot)] = Some(Instant::now());
        }
        self.publish_and_kick()?;
        loop {
            let mut any = false;
            while let Some((slot, t)) = self.complete(&plan, &mut started)? {
                any = true;
                let now = Instant::now();
                if t >= from && now <= until {
                    m.ops += 1;
                    m.latencies_us.push(now.duration_since(t).as_secs_f64() * 1e6);
                }
                if now < until {
                    self.submit(&plan, slot, w.op, offsets.next_offset())?;
                    started[usize::from(slot)] = Some(Instant::now());
                }
            }
            if any {
                self.publish_and_kick()?;
            }
            if self.ring.in_flight() == 0 {
                break;
            }
            if !any {
                self.wait_call(STALL)?;
            }
        }
        m.bytes = m.ops * u64::from(w.bs);
        m.secs = runtime.as_secs_f64();
        Ok(m)
    }

    /// One request, waited for: used by the data check.
    fn one(&mut self, op: Op, offset: u64, len: u32) -> Result<(), BlockError> {
        let plan = self.plan(1, len)?;
        self.write_chains(&plan, op, len)?;
        let mut started = [Some(Instant::now())];
        self.submit(&plan, 0, op, offset)?;
        self.publish_and_kick()?;
        let deadline = Instant::now() + STALL;
        loop {
            if self.complete(&plan, &mut started)?.is_some() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_call(left.max(Duration::from_millis(1)))?;
        }
    }

    /// Writes `len` bytes of a pattern from `seed` at `offset` and reads them back through the
    /// backend into a buffer first filled with something else: proof that requests really
    /// move data, before any figure is trusted. Returns the pattern written.
    pub fn check_data(&mut self, offset: u64, len: u32, seed: u64) -> Result<Vec<u8>, BlockError> {
        let mut pattern = vec![0u8; len as usize];
        Rng::new(seed).fill(&mut pattern);
        let data = GuestAddress(DATA_BASE);
        self.mem.write_slice(&pattern, data).map_err(BlockError::mem("writing the pattern"))?;
        self.one(Op::Write, offset, len)?;
        self.mem.write_slice(&vec![0x5a; len as usize], data).map_err(BlockError::mem("clearing the buffer"))?;
        self.one(Op::Read, offset, len)?;
        let mut back = vec![0u8; len as usize];
        self.mem.read_slice(&mut back, data).map_err(BlockError::mem("reading the buffer"))?;
        if back != pattern {
            let at = back.iter().zip(&pattern).position(|(a, b)| a != b).unwrap_or(0);
            return Err(BlockError::Backend {
                what: "data check".into(),
                detail: format!("{len} bytes written at {offset} read back different from byte {at}"),
            });
        }
        Ok(pattern)
    }

    /// Fills the data buffers with random bytes, so writes carry data, not zeroes.
    pub fn fill_buffers(&self, seed: u64) -> Result<(), BlockError> {
        let mut buf = vec![0u8; (self.mem_size - DATA_BASE) as usize];
        Rng::new(seed).fill(&mut buf);
        self.mem.write_slice(&buf, GuestAddress(DATA_BASE)).map_err(BlockError::mem("filling the data buffers"))
    }

    /// Stops the queue (GET_VRING_BASE) and closes the connection.
    pub fn close(self) -> Result<(), BlockError> {
        self.fe.get_vring_base(0).map_err(BlockError::vhost("GET_VRING_BASE"))?;
        Ok(())
    }
}

/// Memory the bench maps for a set of workloads: the metadata area plus the largest
/// `qd * bs`, page rounded.
pub fn memory_for(workloads: &[Workload]) -> u64 {
    let data = workloads.iter().map(|w| u64::from(w.qd) * u64::from(w.bs).div_ceil(4096) * 4096).max().unwrap_or(0);
    DATA_BASE + data.max(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::workload::WORKLOADS;

    fn config_bytes() -> Vec<u8> {
        let mut b = vec![0u8; 36];
        b[0..8].copy_from_slice(&(2_097_152u64).to_le_bytes());
        b[8..12].copy_from_slice(&(256u32 << 10).to_le_bytes());
        b[12..16].copy_from_slice(&126u32.to_le_bytes());
        b[20..24].copy_from_slice(&512u32.to_le_bytes());
        b
    }

    #[test]
    fn config_fields_count_only_when_acked() {
        let all = VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE;
        let c = parse_config(&config_bytes(), all).unwrap();
        assert_eq!(
            c,
            BlkConfig {
                capacity_sectors: 2_097_152,
                size_max: Some(256 << 10),
                seg_max: Some(126),
                blk_size: Some(512)
            }
        );
        let c = parse_config(&config_bytes(), 0).unwrap();
        assert_eq!((c.size_max, c.seg_max, c.blk_size), (None, None, None));
        assert_eq!(parse_config(&[0u8; 7], all), None);
        // a field cut off by a short reply reads as absent, not as garbage
        assert_eq!(parse_config(&config_bytes()[..10], all).unwrap().size_max, None);
    }

    #[test]
    fn segments_follow_size_max() {
        let mut c = parse_config(&config_bytes(), 0).unwrap();
        assert_eq!(segment_size(&c), 256 << 10);
        c.size_max = Some(64 << 10);
        assert_eq!(segment_size(&c), 64 << 10);
        c.size_max = Some((64 << 10) + 100);
        assert_eq!(segment_size(&c), 64 << 10);
        c.size_max = Some(1 << 30);
        assert_eq!(segment_size(&c), 256 << 10);
    }

    #[test]
    fn memory_covers_the_largest_workload() {
        assert_eq!(memory_for(&WORKLOADS), DATA_BASE + 8 * (1 << 20));
        assert_eq!(memory_for(&WORKLOADS[..2]), DATA_BASE + (1 << 20));
        // and every workload's plan fits the queue
        for w in WORKLOADS {
            let p = SlotPlan::new(w.qd, u64::from(w.bs), MAX_SEG, QUEUE_SIZE, HDR_BASE, DATA_BASE).unwrap();
            assert!(p.end() <= memory_for(&WORKLOADS), "{}", w.key);
            assert!(HDR_BASE + 32 * u64::from(w.qd) <= DATA_BASE);
        }
        assert!(Layout::new(RING_BASE, QUEUE_SIZE).unwrap().end <= HDR_BASE);
    }
}
