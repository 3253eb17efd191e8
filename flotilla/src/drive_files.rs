//! What QEMU checks on the host before it starts a VM with `-drive` and `-chardev socket`: the
//! image opens (read-write unless `readonly=on`), is a regular file or block device, and its
//! format is known (probed as QEMU probes when `format=` is absent: the qcow2 magic, else raw
//! with QEMU's warning); an external vhost-user backend's socket exists.
//!
//! Errors use QEMU's words; the caller prefixes the option (`-drive file=...: `).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use vm_config::DriveFormat;

use crate::devices::{format_option_error, ChardevSpec, DeviceSet, DriveSpec};

/// The first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// QEMU 7.2's warning when it probed an image and guessed raw (three lines).
pub fn raw_probe_warning(file: &Path) -> String {
    format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions.",
        file.display()
    )
}

/// A host-side check that failed: `location` is the option as typed.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct FileError {
    pub location: String,
    pub message: String,
}

fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// The format a drive's image has, from its first bytes.
pub fn probe(mut f: &File) -> io::Result<DriveFormat> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(if got == magic.len() && magic == QCOW2_MAGIC { DriveFormat::Qcow2 } else { DriveFormat::Raw })
}

/// Checks one drive's image; returns its format and, when it was probed as raw, QEMU's
/// warning to print.
pub fn check_drive(d: &DriveSpec) -> Result<(DriveFormat, Option<String>), FileError> {
    let fail = |message: String| FileError { location: d.location.clone(), message };
    let shown = d.file.display();
    if std::fs::metadata(&d.file).is_ok_and(|m| m.is_dir()) {
        return Err(fail(format!("'file' driver requires '{shown}' to be a regular file")));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(!d.readonly)
        .open(&d.file)
        .map_err(|e| fail(format!("Could not open '{shown}': {}", strerror(&e))))?;
    let meta = f.metadata().map_err(|e| fail(format!("Could not open '{shown}': {}", strerror(&e))))?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(fail(format!("'file' driver requires '{shown}' to be a regular file")));
    }
    let found = probe(&f).map_err(|e| fail(format!("Could not read '{shown}': {}", strerror(&e))))?;
    let (format, warning) = match d.format {
        Some(DriveFormat::Qcow2) if found != DriveFormat::Qcow2 => {
            return Err(fail("Image is not in qcow2 format".to_string()));
        }
        Some(f) => (f, None),
        None if found == DriveFormat::Raw => (found, Some(raw_probe_warning(&d.file))),
        None => (found, None),
    };
    if let Some(k) = &d.format_option {
        return Err(fail(format_option_error(format, k).message));
    }
    Ok((format, warning))
}

/// An external backend's socket must be there, as QEMU connects at start.
pub fn check_chardev(c: &ChardevSpec) -> Result<(), FileError> {
    let fail = |why: &str| FileError {
        location: c.location.clone(),
        message: format!("Failed to connect to '{}': {why}", c.path.display()),
    };
    match std::fs::metadata(&c.path) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(fail("Connection refused")),
        Err(e) => Err(fail(&strerror(&e))),
    }
}

/// Checks every drive and every chardev a device uses, in command-line order; returns the
/// drives' formats (in `set.drives` order) and the warnings to print.
pub fn check_all(set: &DeviceSet) -> Result<(Vec<DriveFormat>, Vec<String>), FileError> {
    let mut formats = Vec::with_capacity(set.drives.len());
    let mut warnings = Vec::new();
    for d in &set.drives {
        let (f, w) = check_drive(d)?;
        formats.push(f);
        warnings.extend(w);
    }
    for c in &set.chardevs {
        let used = set.devices.iter().any(|d| d.backend == crate::devices::Backend::External(c.path.clone()));
        if used {
            check_chardev(c)?;
        }
    }
    Ok((formats, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::DeviceSet;
    use std::io::Write;

    struct Scratch(std::path::PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!("flotilla-drive-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("scratch dir");
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn set(args: &[&str]) -> DeviceSet {
        let mut s = DeviceSet::default();
        for a in args {
            s.drive(a).expect(a);
        }
        s.finish().expect("finish");
        s
    }

    #[test]
    fn probes_like_qemu() {
        let dir = Scratch::new("probe");
        let raw = dir.0.join("a.img");
        std::fs::write(&raw, vec![0u8; 4096]).expect("raw");
        let qcow = dir.0.join("b.qcow2");
        let mut f = File::create(&qcow).expect("qcow2");
        f.write_all(b"QFI\xfb\0\0\0\x03").expect("magic");
        let tiny = dir.0.join("tiny.img");
        std::fs::write(&tiny, b"QF").expect("tiny");

        let s = set(&[
            &format!("file={},if=virtio", raw.display()),
            &format!("file={},if=virtio", qcow.display()),
            &format!("file={},if=none,id=t,format=raw", tiny.display()),
        ]);
        let (formats, warnings) = check_all(&s).expect("check");
        assert_eq!(formats, [DriveFormat::Raw, DriveFormat::Qcow2, DriveFormat::Raw]);
        assert_eq!(warnings, [raw_probe_warning(&raw)], "only the probed raw image warns");
        assert!(warnings[0].starts_with(&format!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         Automatically",
            raw.display()
        )));

        let e = check_all(&set(&[&format!("file={},if=virtio,format=qcow2", raw.display())])).expect_err("not qcow2");
        assert_eq!(
            e.to_string(),
            format!("-drive file={},if=virtio,format=qcow2: Image is not in qcow2 format", raw.display())
        );
        // A key QEMU leaves to the format driver fails once the format is probed.
        let e = check_all(&set(&[&format!("file={},if=virtio,bogus=1", qcow.display())])).expect_err("bogus");
        assert_eq!(
            e.to_string(),
            format!(
                "-drive file={},if=virtio,bogus=1: Block format 'qcow2' does not support the option 'bogus'",
                qcow.display()
            )
        );
    }

    #[test]
    fn missing_and_odd_files() {
        let dir = Scratch::new("missing");
        let gone = dir.0.join("nonexistent.img");
        let e = check_all(&set(&[&format!("file={},if=virtio,format=raw", gone.display())])).expect_err("missing");
        assert_eq!(
            e.to_string(),
            format!(
                "-drive file={0},if=virtio,format=raw: Could not open '{0}': No such file or directory",
                gone.display()
            )
        );
        let e = check_all(&set(&[&format!("file={},if=virtio,format=raw", dir.0.display())])).expect_err("a dir");
        assert!(
            e.to_string().ends_with(&format!(": 'file' driver requires '{}' to be a regular file", dir.0.display())),
            "{e}"
        );
    }

    #[test]
    fn external_backend_socket_must_exist() {
        let dir = Scratch::new("chardev");
        let sock = dir.0.join("qsd.sock");
        let mut s = DeviceSet::default();
        s.chardev(&format!("socket,id=c,path={}", sock.display())).expect("chardev");
        s.device("vhost-user-blk-pci,chardev=c").expect("device");
        s.finish().expect("finish");
        let e = check_all(&s).expect_err("no socket");
        assert_eq!(
            e.to_string(),
            format!(
                "-chardev socket,id=c,path={0}: Failed to connect to '{0}': No such file or directory",
                sock.display()
            )
        );
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        check_all(&s).expect("socket there");
        // A chardev no device uses is not looked at (QEMU would connect; vmm-core does not).
        let mut s = DeviceSet::default();
        s.chardev("socket,id=c,path=/nonexistent/x.sock").expect("chardev");
        s.finish().expect("finish");
        check_all(&s).expect("unused chardev");
    }
}
