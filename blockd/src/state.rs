//! The images blockd switched to, recorded across restarts. After blockdev-snapshot-sync the
//! drive's image is the overlay; the launcher restarts a blockd that died with the config the
//! VM started with, so blockd writes the current image of every drive to the config's
//! `state_file` (atomically: a temporary file renamed over it) and a starting blockd takes the
//! images from there for the drives it names. Without this a restarted blockd would reopen
//! the base image and write under the overlay.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_config::{DriveConfig, DriveFormat};

/// One drive's current image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveImage {
    pub id: String,
    pub file: PathBuf,
    pub format: DriveFormat,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub drives: Vec<DriveImage>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not blockd state: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

impl State {
    /// The recorded state, or None when nothing was recorded yet (no file).
    pub fn load(path: &Path) -> Result<Option<State>, StateError> {
        let shown = || path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path: shown(), source }),
        };
        serde_json::from_str(&text).map(Some).map_err(|source| StateError::Parse { path: shown(), source })
    }

    /// Writes the state so that a reader sees the old or the new one, never a mix, and a
    /// host crash after the command answered still finds the new one: the temporary file is
    /// fsynced before the rename, the directory after it.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let write = |source| StateError::Write { path: path.display().to_string(), source };
        let text = serde_json::to_string(self).map_err(|e| write(std::io::Error::other(e)))?;
        vhost_backend_kit::state_file::write_atomically(path, text.as_bytes()).map_err(write)
    }

    /// Points the drives it records at their recorded images; returns the ids it changed.
    pub fn apply(&self, drives: &mut [DriveConfig]) -> Vec<String> {
        let mut changed = Vec::new();
        for d in drives.iter_mut() {
            if let Some(img) = self.drives.iter().find(|i| i.id == d.id) {
                if img.file != d.file || img.format != d.format {
                    d.file = img.file.clone();
                    d.format = img.format;
                    changed.push(d.id.clone());
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_config::{CacheMode, ErrorAction};

    fn drive(id: &str, file: &str) -> DriveConfig {
        DriveConfig {
            id: id.into(),
            file: file.into(),
            format: DriveFormat::Raw,
            readonly: false,
            cache: CacheMode::Writeback,
            werror: ErrorAction::Enospc,
            rerror: ErrorAction::Report,
            serial: None,
            socket: None,
            num_queues: 1,
        }
    }

    #[test]
    fn saved_state_points_a_restart_at_the_overlay() {
        let dir = std::env::temp_dir().join(format!("blockd-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        assert_eq!(State::load(&path).unwrap(), None, "nothing recorded yet");
        let st =
            State { drives: vec![DriveImage { id: "d1".into(), file: "/o.qcow2".into(), format: DriveFormat::Qcow2 }] };
        st.save(&path).unwrap();
        let back = State::load(&path).unwrap().unwrap();
        assert_eq!(back, st);
        let mut drives = vec![drive("d0", "/a.raw"), drive("d1", "/b.raw")];
        assert_eq!(back.apply(&mut drives), ["d1"]);
        assert_eq!(drives[0].file, PathBuf::from("/a.raw"));
        assert_eq!((drives[1].file.clone(), drives[1].format), ("/o.qcow2".into(), DriveFormat::Qcow2));
        assert!(back.apply(&mut drives).is_empty(), "applying twice changes nothing");
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(State::load(&path), Err(StateError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
