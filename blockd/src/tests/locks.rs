//! Image locks as QEMU's: qemu-img and qemu-io see blockd's locks, blockd sees theirs, and a
//! snapshot leaves the old image locked as a backing file. The other party is the real qemu
//! tools (skipped where they are not installed).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_schema::commands::BlockdevSnapshotSyncArgs;

use super::integrity::scratch;
use crate::disk::{self, Format, OpenFlags};
use crate::engine::{DriveRuntime, Image};
use crate::request::{Drive, Limits};
use crate::service::BlockService;

fn have_qemu_tools() -> bool {
    Command::new("qemu-io").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Runs a qemu tool; (success, stdout + stderr).
fn tool(args: &[&str], image: &Path) -> (bool, String) {
    let out = Command::new(args[0]).args(&args[1..]).arg(image).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The lock bytes held on `path` by anyone (from /proc/locks), sorted.
fn locked_bytes(path: &Path) -> Vec<u64> {
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
    let mut v = Vec::new();
    for l in std::fs::read_to_string("/proc/locks").unwrap().lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: OFDLCK ADVISORY READ -1 fe:00:INODE START END"
        let Some(i) = f.iter().position(|x| x.ends_with(&format!(":{ino}"))) else { continue };
        if let (Some(a), Some(b)) =
            (f.get(i + 1).and_then(|x| x.parse::<u64>().ok()), f.get(i + 2).and_then(|x| x.parse().ok()))
        {
            v.extend(a..=b);
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn rw() -> OpenFlags {
    OpenFlags { readonly: false, direct: false }
}

#[test]
fn qemu_tools_and_blockd_see_each_others_locks() {
    if !have_qemu_tools() {
        eprintln!("no qemu-io: skipped");
        return;
    }
    let dir = scratch("locks");
    for (fmt, format) in [("raw", Format::Raw), ("qcow2", Format::Qcow2)] {
        let img = dir.join(format!("disk.{fmt}"));
        let st = Command::new("qemu-img").args(["create", "-q", "-f", fmt]).arg(&img).arg("1M").status().unwrap();
        assert!(st.success());

        // blockd writes the image: QEMU's tools refuse to use it without -U.
        let d = disk::open(&img, format, rw()).unwrap();
        assert_eq!(locked_bytes(&img), [100, 101, 103, 201, 203], "{fmt}: QEMU's bytes for a writer");
        if format == Format::Qcow2 {
            // qemu-img info on a qcow2 refuses writers (raw shares them, in QEMU too).
            let (ok, out) = tool(&["qemu-img", "info", "-f", fmt], &img);
            assert!(!ok && out.contains("Failed to get shared \"write\" lock"), "{fmt}: qemu-img info: {out}");
        }
        let (ok, out) = tool(&["qemu-io", "-f", fmt, "-c", "write 0 512"], &img);
        assert!(
            out.contains("Failed to get \"write\" lock"),
            "{fmt}: qemu-io wrote an image blockd writes ({ok}): {out}"
        );
        assert!(tool(&["qemu-img", "info", "-U", "-f", fmt], &img).0, "{fmt}: -U shares");
        // A second blockd drive on the same image is refused too, naming the file.
        let e = disk::open(&img, format, rw()).err().expect("a second writer");
        let msg = e.to_string();
        assert!(msg.contains("lock") && msg.contains(&img.display().to_string()), "{msg}");
        drop(d);
        assert!(locked_bytes(&img).is_empty(), "{fmt}: released with the disk: {:?}", locked_bytes(&img));
        assert!(tool(&["qemu-io", "-f", fmt, "-c", "write 0 512"], &img).0, "{fmt}: writable once released");

        // qemu-io writes the image: blockd refuses to open it, saying why and which file.
        let mut holder = Command::new("qemu-io")
            .args(["-f", fmt])
            .arg(&img)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match disk::open(&img, format, rw()) {
                Err(e) => break e,
                Ok(d) => drop(d),
            }
            assert!(Instant::now() < deadline, "{fmt}: blockd opened an image qemu-io holds");
            std::thread::sleep(Duration::from_millis(20));
        };
        let msg = err.to_string();
        assert!(msg.contains("Failed to get") && msg.contains(&img.display().to_string()), "{msg}");
        assert!(disk::open(&img, format, OpenFlags { readonly: true, direct: false }).is_err(), "read-only too");
        let _ = holder.stdin.take().map(|mut s| s.write_all(b"quit\n"));
        holder.wait().unwrap();
        drop(disk::open(&img, format, rw()).expect("free again"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn args(file: &Path) -> BlockdevSnapshotSyncArgs {
    serde_json::from_value(serde_json::json!({"device": "d0", "snapshot-file": file.display().to_string()})).unwrap()
}

#[test]
fn a_snapshot_relocks_the_chain_and_spares_a_file_another_process_uses() {
    if !have_qemu_tools() {
        eprintln!("no qemu-io: skipped");
        return;
    }
    let dir = scratch("snap-locks");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x5au8; 1 << 20]).unwrap();
    let d = disk::open(&base, Format::Raw, rw()).unwrap();
    let rt = DriveRuntime::new(
        "d0",
        Drive::new(d, false, vec![], Limits::default()),
        Image { file: base.clone(), format: Format::Raw },
        false,
    );
    let svc = BlockService::new(vec![rt.clone()]);

    // A file qemu-io holds is neither overwritten nor switched to.
    let busy = dir.join("busy.raw");
    std::fs::write(&busy, vec![0x11u8; 4096]).unwrap();
    let mut holder = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(&busy)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .contains(&format!(":{} 100 ", std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&busy).unwrap())))
    {
        assert!(Instant::now() < deadline, "qemu-io never locked {}", busy.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = svc.blockdev_snapshot_sync(&args(&busy)).unwrap_err();
    assert_eq!(e.class, "OpenFileFailed");
    assert_eq!(std::fs::read(&busy).unwrap(), vec![0x11u8; 4096], "the busy file is untouched");
    assert_eq!(rt.image.lock().unwrap().file, base);
    let _ = holder.stdin.take().map(|mut s| s.write_all(b"quit\n"));
    holder.wait().unwrap();
    // The drive still holds its image for writing after the refused snapshot.
    assert_eq!(locked_bytes(&base), [100, 101, 103, 201, 203], "the drive keeps its write lock");

    // After a snapshot the old image is a backing file: readable by others, not writable.
    let top = dir.join("top.qcow2");
    svc.blockdev_snapshot_sync(&args(&top)).expect("snapshot");
    assert_eq!(locked_bytes(&base), [100, 201, 203], "the old image is held as a backing file");
    assert!(tool(&["qemu-io", "-r", "-f", "raw", "-c", "read 0 512"], &base).0, "readers may share a backing file");
    let (ok, out) = tool(&["qemu-io", "-f", "raw", "-c", "write 0 512"], &base);
    assert!(out.contains("Failed to get \"write\" lock"), "qemu-io wrote under the overlay ({ok}): {out}");
    assert_eq!(locked_bytes(&top), [100, 101, 103, 201, 203]);
    let (ok, out) = tool(&["qemu-img", "info", "-f", "qcow2"], &top);
    assert!(!ok && out.contains("write"), "the overlay is locked for writing: {out}");
    // Locks released before the files go (a freed inode is soon another test's file).
    drop((svc, rt));
    std::fs::remove_dir_all(&dir).unwrap();
}
