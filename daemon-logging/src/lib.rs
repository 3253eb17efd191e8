//! Logging set-up shared by every Flotilla process (launcher, vmm-core, gateway, device
//! daemons), so they all log the same way: to stderr, filtered by an environment variable, with
//! terminal colours only when stderr is a terminal (under the launcher or systemd it is a pipe
//! or the journal, where escape codes are noise).

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber filtered by `RUST_LOG` (default `warn`). Call once, first
/// thing in `main`.
pub fn init() {
    init_from("RUST_LOG", "warn");
}

/// Like [`init`], with the filter read from `var`, or `default` when it is unset or invalid.
pub fn init_from(var: &str, default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env(var).unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
