//! A daemon's small state file in the instance's runtime directory (blockd's current images
//! after a snapshot, balloond's target), which a restarted daemon reads back: written so that
//! a reader finds the old contents or the new, never a mix, and a host crash after the command
//! answered still finds the new.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path`: a temporary file beside it, fsynced, renamed over `path`, then the
/// directory fsynced (the rename itself is durable only then).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_contents_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("kit-state-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!path.with_extension("tmp").exists());
        // A directory that is not there: an error, not a panic.
        assert!(write_atomically(&dir.join("missing/state.json"), b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
