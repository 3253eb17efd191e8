//! The balloon's state across restarts of balloond. The target the host set (`balloon`) and
//! the size the guest last reported would be lost with the process: the launcher restarts
//! balloond with the config the VM started with, and the guest would be told to give all its
//! memory back. So balloond records both in the config's `state_file` (in the instance's
//! runtime directory) each time they change, atomically and durably, and a starting balloond
//! takes them from there.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::BalloonConfig;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not balloond state: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The recorded `num_pages` and `actual`, or None when nothing was recorded yet.
pub fn load(path: &Path) -> Result<Option<BalloonConfig>, PersistError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Read { path: path.into(), source }),
    };
    let parse = |why: String| PersistError::Parse { path: path.into(), why };
    let v: Value = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
    let field = |name: &str| {
        v.get(name)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| parse(format!("no 32-bit '{name}'")))
    };
    Ok(Some(BalloonConfig { num_pages: field("num_pages")?, actual: field("actual")? }))
}

/// Writes the state: a temporary file fsynced and renamed over the old one, then the directory
/// fsynced, so a reader finds the old state or the new one, never a mix.
pub fn save(path: &Path, c: BalloonConfig) -> Result<(), PersistError> {
    let text = json!({"num_pages": c.num_pages, "actual": c.actual}).to_string();
    vhost_backend_kit::state_file::write_atomically(path, text.as_bytes())
        .map_err(|source| PersistError::Write { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_loads_back() {
        let dir = std::env::temp_dir().join(format!("balloond-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        assert!(load(&path).unwrap().is_none());
        let c = BalloonConfig { num_pages: 16384, actual: 8000 };
        save(&path, c).unwrap();
        assert_eq!(load(&path).unwrap(), Some(c));
        std::fs::write(&path, "{\"num_pages\": -1}").unwrap();
        assert!(matches!(load(&path), Err(PersistError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
