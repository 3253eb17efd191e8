//! blockdev-snapshot-sync's failures leave the drive as it was: a flush error (the overlay is
//! neither created nor switched to, QEMU's IO error returned), and a snapshot file that is an
//! image of the chain (refused, the image untouched).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use flotilla_schema::commands::BlockdevSnapshotSyncArgs;

use super::integrity::scratch;
use crate::disk::{self, create_qcow2_overlay, Disk, Format, OpenFlags};
use crate::engine::{DriveRuntime, Image};
use crate::request::{Drive, Limits};
use crate::service::BlockService;

fn args(device: &str, file: &std::path::Path) -> BlockdevSnapshotSyncArgs {
    serde_json::from_value(serde_json::json!({"device": device, "snapshot-file": file.display().to_string()})).unwrap()
}

/// A disk over a real image whose flush fails while `failing` is set.
struct FlushFails {
    inner: Box<dyn Disk>,
    failing: Arc<AtomicBool>,
}

impl Disk for FlushFails {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn locks(&self) -> Option<&std::sync::Mutex<crate::disk::lock::ChainLocks>> {
        self.inner.locks()
    }
}

#[test]
fn a_flush_error_fails_the_snapshot_before_anything_changes() {
    let dir = scratch("snap-flush");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    let failing = Arc::new(AtomicBool::new(true));
    let inner = disk::open(&base, Format::Raw, OpenFlags::default()).unwrap();
    let drive = Drive::new(Box::new(FlushFails { inner, failing: failing.clone() }), false, vec![], Limits::default());
    let rt = DriveRuntime::new("d0", drive, Image { file: base.clone(), format: Format::Raw }, false);
    let state = dir.join("state.json");
    let svc = BlockService::new(vec![rt.clone()]).with_state_file(Some(state.clone()));
    let overlay = dir.join("over.qcow2");
    let err = svc.blockdev_snapshot_sync(&args("d0", &overlay)).unwrap_err();
    assert_eq!((err.class.as_str(), err.desc.as_str()), ("IOError", "An IO error has occurred"));
    assert!(!overlay.exists(), "no overlay created");
    assert_eq!(rt.image.lock().unwrap().file, base, "no switch");
    assert!(!state.exists(), "nothing recorded");
    failing.store(false, Ordering::SeqCst);
    svc.blockdev_snapshot_sync(&args("d0", &overlay)).expect("with the flush working");
    assert_eq!(rt.image.lock().unwrap().file, overlay);
    let recorded = crate::state::State::load(&state).unwrap().unwrap();
    assert_eq!(recorded.drives[0].file, overlay);
    // Locks released before the files go (a freed inode is soon another test's file).
    drop((svc, rt));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_snapshot_file_that_is_any_image_of_the_chain_is_refused() {
    let dir = scratch("snap-chain");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x22u8; 1 << 20]).unwrap();
    let mid = dir.join("mid.qcow2");
    create_qcow2_overlay(&mid, 1 << 20, "base.raw", Format::Raw).unwrap();
    let top = dir.join("top.qcow2");
    create_qcow2_overlay(&top, 1 << 20, &mid.display().to_string(), Format::Qcow2).unwrap();
    assert_eq!(disk::chain_files(&top, Format::Qcow2), vec![top.clone(), mid.clone(), base.clone()]);
    let d = disk::open(&top, Format::Qcow2, OpenFlags::default()).unwrap();
    let rt = DriveRuntime::new(
        "d0",
        Drive::new(d, false, vec![], Limits::default()),
        Image { file: top.clone(), format: Format::Qcow2 },
        false,
    );
    let svc = BlockService::new(vec![rt.clone()]);
    let before: Vec<Vec<u8>> = [&base, &mid, &top].iter().map(|p| std::fs::read(p).unwrap()).collect();
    // Another name for the base (a hard link) is the base too.
    let alias = dir.join("alias.raw");
    std::fs::hard_link(&base, &alias).unwrap();
    for f in [&top, &mid, &base, &alias] {
        let err = svc.blockdev_snapshot_sync(&args("d0", f)).unwrap_err();
        assert_eq!(err.class, "OpenFileFailed", "{}", f.display());
        assert_eq!(rt.image.lock().unwrap().file, top, "no switch");
    }
    let after: Vec<Vec<u8>> = [&base, &mid, &top].iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(before == after, "no image of the chain was touched");
    drop((svc, rt));
    std::fs::remove_dir_all(&dir).unwrap();
}
