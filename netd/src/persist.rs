//! Link states across restarts of netd: a NIC the host took down (set_link) must stay down
//! when the launcher restarts netd with the config the VM started with. Recorded in the
//! config's `state_file` as `{"links": {"<nic id>": false}}`, written atomically and durably
//! at every change, read at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not netd state: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Every NIC's link state as set by the host, and where it is recorded.
#[derive(Debug, Default)]
pub struct LinkStore {
    path: Option<PathBuf>,
    links: Mutex<BTreeMap<String, bool>>,
}

fn load(path: &Path) -> Result<BTreeMap<String, bool>, PersistError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(PersistError::Read { path: path.into(), source }),
    };
    let parse = |why: String| PersistError::Parse { path: path.into(), why };
    let v: Value = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
    let links = v.get("links").and_then(Value::as_object).ok_or_else(|| parse("no 'links' object".into()))?;
    links
        .iter()
        .map(|(id, up)| up.as_bool().map(|up| (id.clone(), up)).ok_or_else(|| parse(format!("'{id}' is not a boolean"))))
        .collect()
}

impl LinkStore {
    /// The states recorded in `path` (none yet: every link up), recorded there from now on;
    /// without a path nothing outlives the process.
    pub fn open(path: Option<PathBuf>) -> Result<LinkStore, PersistError> {
        let links = match &path {
            Some(p) => load(p)?,
            None => BTreeMap::new(),
        };
        Ok(LinkStore { path, links: Mutex::new(links) })
    }

    /// The recorded state of NIC `id`; None when the host never set it.
    pub fn get(&self, id: &str) -> Option<bool> {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).get(id).copied()
    }

    /// Records NIC `id`'s state (and writes the file, under the lock: of two changes the
    /// later is written last).
    pub fn set(&self, id: &str, up: bool) -> Result<(), PersistError> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.insert(id.to_string(), up);
        let Some(path) = &self.path else { return Ok(()) };
        let text = json!({ "links": &*links }).to_string();
        vhost_backend_kit::state_file::write_atomically(path, text.as_bytes())
            .map_err(|source| PersistError::Write { path: path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_load_back() {
        let dir = std::env::temp_dir().join(format!("netd-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let s = LinkStore::open(Some(path.clone())).unwrap();
        assert_eq!(s.get("nic0"), None);
        s.set("nic0", false).unwrap();
        s.set("nic1", true).unwrap();
        let back = LinkStore::open(Some(path.clone())).unwrap();
        assert_eq!((back.get("nic0"), back.get("nic1")), (Some(false), Some(true)));
        std::fs::write(&path, "{\"links\": {\"nic0\": 1}}").unwrap();
        assert!(matches!(LinkStore::open(Some(path)), Err(PersistError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
