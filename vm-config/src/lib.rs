//! The machine description that the `flotilla` launcher builds from a QEMU-style command line and
//! hands to `vmm-core` (as JSON on its command line). It lives in its own crate because both
//! processes need it and daemons never import each other.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where a character device's bytes go, in QEMU's `-serial` / `-chardev` vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ChardevBackend {
    /// The process's own stdin/stdout.
    Stdio,
    /// Output appended to a file; no input.
    File { path: PathBuf },
    /// A listening unix socket (`unix:PATH,server,nowait`); one client at a time.
    UnixServer { path: PathBuf, wait: bool },
    /// A fresh pseudo-terminal; its slave path is logged and reported by query-chardev.
    Pty,
    /// Discard output, no input.
    Null,
}

/// One character device as QEMU names it (`serial0`, `compat_monitor0`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChardevConfig {
    pub id: String,
    pub backend: ChardevBackend,
}

/// Everything vmm-core needs to build and run one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// `-name`; None when not given (query-name then returns `{}`).
    pub name: Option<String>,
    /// `-uuid`, canonical lower-case text; None means the null UUID.
    pub uuid: Option<String>,
    /// Guest RAM in bytes (`-m`).
    pub mem_bytes: u64,
    /// Number of vCPUs (`-smp`).
    pub cpus: u8,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The chardev behind COM1, if any (`-serial`).
    pub serial: Option<ChardevConfig>,
    /// `-S`: stay in `prelaunch` until `cont`.
    pub start_paused: bool,
    /// `-no-shutdown`: a guest power-off leaves the VM in `shutdown` instead of exiting.
    pub no_shutdown: bool,
    /// `-no-reboot`: a guest reset (or triple fault) exits instead of resetting.
    pub no_reboot: bool,
}

pub const NULL_UUID: &str = "00000000-0000-0000-0000-000000000000";

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            name: None,
            uuid: None,
            // QEMU's default -m is 128 MiB.
            mem_bytes: 128 << 20,
            cpus: 1,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            serial: None,
            start_paused: false,
            no_shutdown: false,
            no_reboot: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("machine config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl MachineConfig {
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(s)?)
    }

    pub fn uuid_or_null(&self) -> &str {
        self.uuid.as_deref().unwrap_or(NULL_UUID)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let cfg = MachineConfig {
            name: Some("vm1".into()),
            serial: Some(ChardevConfig {
                id: "serial0".into(),
                backend: ChardevBackend::UnixServer { path: "/tmp/s".into(), wait: false },
            }),
            ..Default::default()
        };
        let back = MachineConfig::from_json(&cfg.to_json()).expect("parse");
        assert_eq!(back, cfg);
    }

    #[test]
    fn rejects_garbage() {
        assert!(MachineConfig::from_json("{\"name\": 3").is_err());
    }
}
