//! Request handling over descriptor chains built in guest memory with virtio-queue's mock
//! (the vhost-device-template way): every request type, and every hostile chain we know of.

mod integrity;
mod locks;
mod snapshot;

use std::sync::Mutex;

use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::BlockBackend;
use crate::disk::{Disk, RawDisk};
use crate::engine::{DriveRuntime, Image};
use crate::policy::{Decision, IoOp};
use crate::request::{Completion, Drive, IoFailure, Limits, Outcome};

const MEM_SIZE: usize = 0x40_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;

/// A disk in memory, recording flushes.
struct MemDisk {
    bytes: Mutex<Vec<u8>>,
    flushes: std::sync::Arc<Mutex<u32>>,
}

impl MemDisk {
    fn new(size: usize) -> MemDisk {
        let bytes = (0..size).map(|i| (i / 512) as u8 ^ (i % 251) as u8).collect();
        MemDisk { bytes: Mutex::new(bytes), flushes: Default::default() }
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let b = self.bytes.lock().unwrap();
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.bytes.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> std::io::Result<()> {
        self.bytes.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn limits() -> Limits {
    Limits { seg_max: 4, max_discard_seg: 2, max_write_zeroes_seg: 2, ..Limits::default() }
}

fn drive(readonly: bool) -> Drive {
    Drive::new(Box::new(MemDisk::new(1 << 20)), readonly, b"blockd-test".to_vec(), limits())
}

fn runtime(d: Drive) -> std::sync::Arc<DriveRuntime> {
    DriveRuntime::new("drive0", d, Image { file: "mem".into(), format: crate::disk::Format::Raw }, false)
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn header(mem: &GuestMemoryMmap, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// Builds a chain of `(addr, len, flags)` descriptors and runs it.
fn run(drive: &Drive, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Completion {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let vq = MockSplitQueue::new(mem, 16);
    let raw: Vec<RawDescriptor> =
        descs.iter().map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0))).collect();
    let chain = vq.build_desc_chain(&raw).unwrap();
    drive.process(chain).completion().expect("completed, not held")
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn ok(len: u32) -> Completion {
    Completion { status: Some(VIRTIO_BLK_S_OK as u8), used_len: len }
}
fn ioerr() -> Completion {
    Completion { status: Some(VIRTIO_BLK_S_IOERR as u8), used_len: 1 }
}
fn skipped() -> Completion {
    Completion { status: None, used_len: 0 }
}

fn disk_bytes(d: &Drive, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    d.disk().read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn read_returns_disk_data() {
    let (d, m) = (drive(false), mem());
    header(&m, VIRTIO_BLK_T_IN, 3);
    let c = run(&d, &m, &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]);
    assert_eq!(c, ok(1025));
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    let mut got = vec![0u8; 1024];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk_bytes(&d, 3 * 512, 1024));
}

#[test]
fn read_and_write_span_several_descriptors() {
    let (d, m) = (drive(false), mem());
    m.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
    m.write_slice(&[0xcdu8; 1024], GuestAddress(DATA + 0x1000)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 10);
    let c = run(&d, &m, &[(HDR, 16, R), (DATA, 512, R), (DATA + 0x1000, 1024, R), (STATUS, 1, W)]);
    assert_eq!(c, ok(1));
    assert_eq!(disk_bytes(&d, 10 * 512, 512), vec![0xab; 512]);
    assert_eq!(disk_bytes(&d, 11 * 512, 1024), vec![0xcd; 1024]);

    header(&m, VIRTIO_BLK_T_IN, 10);
    let c = run(&d, &m, &[(HDR, 16, R), (DATA + 0x8000, 1024, W), (DATA + 0x9000, 512, W), (STATUS, 1, W)]);
    assert_eq!(c, ok(1537));
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA + 0x9000)).unwrap();
    assert_eq!(got, vec![0xcd; 512]);
}

#[test]
fn status_may_share_the_last_data_descriptor() {
    // The spec lets a driver frame a request any way it likes: data and status in one buffer.
    let (d, m) = (drive(false), mem());
    header(&m, VIRTIO_BLK_T_IN, 0);
    let c = run(&d, &m, &[(HDR, 16, R), (STATUS - 512, 513, W)]);
    assert_eq!(c, ok(513));
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn flush_reaches_the_disk() {
    let (d, m) = (drive(false), mem());
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (STATUS, 1, W)]), ok(1));
    // Flush with data is malformed.
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), ioerr());
}

#[test]
fn get_id_returns_the_serial() {
    let (d, m) = (drive(false), mem());
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]), ok(21));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"blockd-test");
    assert!(id[11..].iter().all(|&b| b == 0));
    // A buffer shorter than 20 bytes gets an error.
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 8, W), (STATUS, 1, W)]), ioerr());
}

fn segment(m: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    m.write_slice(&s, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let (d, m) = (drive(false), mem());
    segment(&m, DATA, 4, 2, 0);
    segment(&m, DATA + 16, 100, 1, 0);
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)]), ok(1));
    assert_eq!(disk_bytes(&d, 4 * 512, 1024), vec![0; 1024]);
    assert_eq!(disk_bytes(&d, 100 * 512, 512), vec![0; 512]);
    assert_ne!(disk_bytes(&d, 6 * 512, 512), vec![0; 512]);

    segment(&m, DATA, 8, 1, 1); // unmap allowed
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]), ok(1));
    assert_eq!(disk_bytes(&d, 8 * 512, 512), vec![0; 512]);

    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    segment(&m, DATA, 20, 1, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]), ok(1));
    // Unknown flags on a discard: unsupported.
    segment(&m, DATA, 20, 1, 1);
    let c = run(&d, &m, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
    assert_eq!(c.status, Some(VIRTIO_BLK_S_UNSUPP as u8));
    // More segments than max_discard_seg, a partial segment, a range past the end.
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 48, R), (STATUS, 1, W)]), ioerr());
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 12, R), (STATUS, 1, W)]), ioerr());
    segment(&m, DATA, 2047, 2, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]), ioerr());
}

#[test]
fn readonly_drive_refuses_every_write() {
    let (d, m) = (drive(true), mem());
    let before = disk_bytes(&d, 0, 4096);
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]), ioerr());
    segment(&m, DATA, 0, 1, 0);
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]), ioerr());
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]), ioerr());
    assert_eq!(disk_bytes(&d, 0, 4096), before);
    // Reads still work.
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), ok(513));
}

#[test]
fn unknown_type_is_unsupported() {
    let (d, m) = (drive(false), mem());
    header(&m, 0x55, 0);
    let c = run(&d, &m, &[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(c.status, Some(VIRTIO_BLK_S_UNSUPP as u8));
    assert_eq!(status(&m), VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn hostile_data_descriptors_get_ioerr() {
    let (d, m) = (drive(false), mem());
    let before = disk_bytes(&d, 0, 1 << 20);
    header(&m, VIRTIO_BLK_T_IN, 0);
    // Data outside guest RAM, and straddling its end.
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (1 << 40, 512, W), (STATUS, 1, W)]), ioerr());
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (MEM_SIZE as u64 - 256, 512, W), (STATUS, 1, W)]), ioerr());
    // Length not a multiple of 512, and a huge length.
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)]), ioerr());
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 0x8000_0000, W), (STATUS, 1, W)]), ioerr());
    // A chain over 4 GiB in total: virtio-queue stops iterating it before the status
    // descriptor, so it cannot be answered; it is skipped.
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, u32::MAX, W), (STATUS, 1, W)]), skipped());
    // Past the end of the disk, and a sector number whose byte offset overflows.
    header(&m, VIRTIO_BLK_T_IN, 2047);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]), ioerr());
    header(&m, VIRTIO_BLK_T_OUT, u64::MAX / 256);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]), ioerr());
    // Wrong directions: a read whose buffer is device-readable, a write whose buffer is writable.
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]), ioerr());
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), ioerr());
    // A readable descriptor after a writable one.
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (DATA + 0x1000, 512, R), (STATUS, 1, W)]), ioerr());
    // Header too short, or writable.
    assert_eq!(run(&d, &m, &[(HDR, 8, R), (STATUS, 1, W)]), ioerr());
    assert_eq!(run(&d, &m, &[(HDR, 16, W), (STATUS, 1, W)]), ioerr());
    // Header outside guest RAM.
    assert_eq!(run(&d, &m, &[(1 << 40, 16, R), (STATUS, 1, W)]), ioerr());
    // Nothing reached the disk.
    assert_eq!(disk_bytes(&d, 0, 1 << 20), before);
}

#[test]
fn chains_longer_than_seg_max_get_ioerr() {
    let (d, m) = (drive(false), mem());
    header(&m, VIRTIO_BLK_T_IN, 0);
    // seg_max 4: 4 data descriptors pass, 5 do not.
    let mut descs = vec![(HDR, 16, R)];
    descs.extend((0..4).map(|i| (DATA + i * 0x1000, 512, W)));
    descs.push((STATUS, 1, W));
    assert_eq!(run(&d, &m, &descs), ok(4 * 512 + 1));
    descs.insert(1, (DATA + 0x8000, 512, W));
    assert_eq!(run(&d, &m, &descs), ioerr());
    // Far longer: the status still goes to the chain's real last descriptor.
    let mut descs = vec![(HDR, 16, R)];
    descs.extend((0..12).map(|i| (DATA + i * 0x1000, 512, W)));
    descs.push((STATUS, 1, W));
    assert_eq!(run(&d, &m, &descs), ioerr());
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn unusable_status_descriptor_skips_the_chain() {
    let (d, m) = (drive(false), mem());
    header(&m, VIRTIO_BLK_T_IN, 0);
    // Status descriptor device-readable, empty, outside guest RAM.
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]), skipped());
    assert_eq!(status(&m), 0xff);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)]), skipped());
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (1 << 40, 1, W)]), skipped());
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (u64::MAX, 2, W)]), skipped());
    // The next good request is served.
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), ok(513));
}

#[test]
fn raw_file_round_trip() {
    let dir = std::env::temp_dir().join(format!("blockd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let d = Drive::new(Box::new(RawDisk::open(&path, false).unwrap()), false, vec![], limits());
    let m = mem();
    m.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 7);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 1024, R), (STATUS, 1, W)]), ok(1));
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (STATUS, 1, W)]), ok(1));
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[7 * 512..9 * 512], &[0x5a; 1024][..]);
    segment(&m, DATA, 7, 1, 1);
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]), ok(1));
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[7 * 512..8 * 512], &[0; 512][..]);
    assert_eq!(&file[8 * 512..9 * 512], &[0x5a; 512][..]);
    assert_eq!(file.len(), 1 << 20);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_space_and_features() {
    let b = BlockBackend::new(runtime(drive(false)), 3).unwrap();
    let c = b.config_space();
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), (1 << 20) / 512);
    assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), 256 << 10);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 4);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
    assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 2);
    // Reads past the struct are zero, and partial reads line up.
    assert_eq!(b.get_config(0, 64).len(), 64);
    assert_eq!(b.get_config(0, 64)[60..], [0; 4]);
    assert_eq!(b.get_config(34, 2), vec![3, 0]);
    assert_eq!(b.queues_per_thread(), vec![1, 2, 4]);
    let f = b.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_ne!(f & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_SIZE_MAX), 0);
    let limits = Limits::default();
    assert!(limits.seg_max as usize * limits.size_max as usize <= limits.max_data);
    assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);

    let ro = BlockBackend::new(runtime(drive(true)), 1).unwrap();
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn looping_chain_is_bounded_and_answered() {
    let (d, m) = (drive(false), mem());
    header(&m, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&m, 16);
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after the queue size (16) descriptors.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W | next, 0)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(&m).unwrap();
    assert_eq!(d.process(chain).completion(), Some(ioerr()));
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
}

/// A disk whose reads and writes fail with `errno` while `failing` is set.
struct FailDisk {
    inner: MemDisk,
    errno: i32,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Disk for FailDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(self.errno));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(self.errno));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

fn failing_drive(errno: i32, werror: vm_config::ErrorAction, rerror: vm_config::ErrorAction) -> Drive {
    failing_drive_with_switch(errno, werror, rerror).0
}

/// The drive and the switch that makes its disk fail.
fn failing_drive_with_switch(
    errno: i32,
    werror: vm_config::ErrorAction,
    rerror: vm_config::ErrorAction,
) -> (Drive, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let disk = FailDisk { inner: MemDisk::new(1 << 20), errno, failing: failing.clone() };
    let mut d = Drive::new(Box::new(disk), false, vec![], limits());
    d.werror = werror;
    d.rerror = rerror;
    (d, failing)
}

fn outcome(drive: &Drive, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Outcome {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let vq = MockSplitQueue::new(mem, 16);
    let raw: Vec<RawDescriptor> =
        descs.iter().map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0))).collect();
    drive.process(vq.build_desc_chain(&raw).unwrap())
}

#[test]
fn error_policies_report_ignore_and_hold() {
    use vm_config::ErrorAction::*;
    let m = mem();
    let write = [(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)];
    let read = [(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)];
    let failure = |op, errno, decision| IoFailure {
        op,
        errno,
        decision,
        reason: std::io::Error::from_raw_os_error(errno).to_string().split(" (os error").next().unwrap().to_string(),
    };

    // werror=enospc (QEMU's default): ENOSPC holds the write, untouched; EIO is reported.
    let d = failing_drive(libc::ENOSPC, Enospc, Report);
    header(&m, VIRTIO_BLK_T_OUT, 1);
    let o = outcome(&d, &m, &write);
    assert_eq!(o, Outcome::Hold(failure(IoOp::Write, libc::ENOSPC, Decision::Stop)));
    assert_eq!(status(&m), 0xff, "a held request gets no status");
    assert_eq!(failure(IoOp::Write, libc::ENOSPC, Decision::Stop).reason, "No space left on device");
    let d = failing_drive(libc::EIO, Enospc, Report);
    let o = outcome(&d, &m, &write);
    assert_eq!(
        o,
        Outcome::Done { completion: ioerr(), failure: Some(failure(IoOp::Write, libc::EIO, Decision::Report)) }
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);

    // werror=ignore completes OK; reads follow rerror, not werror.
    let d = failing_drive(libc::EIO, Ignore, Stop);
    let o = outcome(&d, &m, &write);
    assert_eq!(
        o,
        Outcome::Done { completion: ok(1), failure: Some(failure(IoOp::Write, libc::EIO, Decision::Ignore)) }
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    header(&m, VIRTIO_BLK_T_IN, 1);
    assert_eq!(outcome(&d, &m, &read), Outcome::Hold(failure(IoOp::Read, libc::EIO, Decision::Stop)));

    // The held chain runs again once the image works: the data lands, status OK.
    let (d, failing) = failing_drive_with_switch(libc::ENOSPC, Stop, Report);
    m.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 5);
    assert!(matches!(outcome(&d, &m, &write), Outcome::Hold(_)));
    // (A new chain over the same descriptors stands in for the held one.)
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(outcome(&d, &m, &write).completion(), Some(ok(1)));
    assert_eq!(disk_bytes(&d, 5 * 512, 512), vec![0x77; 512]);
    let s = d.stats.snapshot();
    assert_eq!((s.wr_operations, s.wr_bytes, s.wr_highest_offset), (1, 512, 6 * 512));
}

#[test]
fn stats_count_what_completed() {
    let (d, m) = (drive(false), mem());
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]), ok(1025));
    header(&m, VIRTIO_BLK_T_OUT, 10);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]), ok(1));
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (STATUS, 1, W)]), ok(1));
    // Out of range: an error, not counted.
    header(&m, VIRTIO_BLK_T_IN, 1 << 30);
    assert_eq!(run(&d, &m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), ioerr());
    let s = d.stats.snapshot();
    assert_eq!((s.rd_operations, s.rd_bytes), (1, 1024));
    assert_eq!((s.wr_operations, s.wr_bytes, s.wr_highest_offset), (1, 512, 11 * 512));
    assert_eq!(s.flush_operations, 1);
}

#[test]
fn cache_modes_flush_as_qemu() {
    let m = mem();
    let mem_drive = || {
        let disk = MemDisk::new(1 << 20);
        let flushes = disk.flushes.clone();
        (Drive::new(Box::new(disk), false, vec![], limits()), flushes)
    };
    let count = |f: &std::sync::Arc<Mutex<u32>>| *f.lock().unwrap();
    let (mut wt, wt_flushes) = mem_drive();
    wt.cache = vm_config::CacheMode::Writethrough;
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(run(&wt, &m, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]), ok(1));
    assert_eq!(count(&wt_flushes), 1, "writethrough flushes after a write");
    let (mut un, un_flushes) = mem_drive();
    un.cache = vm_config::CacheMode::Unsafe;
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&un, &m, &[(HDR, 16, R), (STATUS, 1, W)]), ok(1));
    assert_eq!(count(&un_flushes), 0, "unsafe ignores flushes");
}

#[test]
fn raw_resize_rounds_capacity_up_and_reads_zero_past_the_end() {
    let dir = std::env::temp_dir().join(format!("blockd-resize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![0x11u8; 4096]).unwrap();
    let rt = runtime(Drive::new(Box::new(RawDisk::open(&path, false).unwrap()), false, vec![], limits()));
    rt.resize(12345).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 12345);
    let b = BlockBackend::new(rt.clone(), 1).unwrap();
    assert_eq!(u64::from_le_bytes(b.config_space()[0..8].try_into().unwrap()), 25);
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 24);
    m.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(run(&rt.drive, &m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), ok(513));
    let mut buf = [0u8; 512];
    m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    rt.resize(1 << 20).unwrap();
    assert_eq!(u64::from_le_bytes(b.config_space()[0..8].try_into().unwrap()), 2048);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn qcow2_overlay_over_raw_with_o_direct_round_trips() {
    use crate::disk::{create_qcow2_overlay, open, Format, OpenFlags};
    // /var/tmp: a real file system (tmpfs may refuse O_DIRECT).
    let dir = std::path::Path::new("/var/tmp").join(format!("blockd-unit-q2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x33u8; 1 << 20]).unwrap();
    let top = dir.join("top.qcow2");
    create_qcow2_overlay(&top, 1 << 20, &base.display().to_string(), Format::Raw).unwrap();
    let d = open(&top, Format::Qcow2, OpenFlags { readonly: false, direct: true }).unwrap();
    assert_eq!(d.size(), 1 << 20);
    assert_eq!(d.backing_file(), Some(base.display().to_string()));
    // Unaligned Vec buffers, sector-sized requests: what the request path hands it.
    let mut buf = vec![0u8; 1536];
    d.read_at(&mut buf, 512).unwrap();
    assert!(buf.iter().all(|&b| b == 0x33), "backing data through the overlay");
    d.write_at(&[0x44; 1024], 4096).unwrap();
    d.flush().unwrap();
    d.read_at(&mut buf[..1024], 4096).unwrap();
    assert!(buf[..1024].iter().all(|&b| b == 0x44));
    d.resize(2 << 20).unwrap();
    assert_eq!(d.size(), 2 << 20);
    drop(d);
    assert!(std::fs::read(&base).unwrap().iter().all(|&b| b == 0x33), "the base is untouched");
    let out = std::process::Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&top).output();
    if let Ok(out) = out {
        assert!(out.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&out.stdout));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
