//! A backend daemon's log: `daemon-logging`, the set-up every Flotilla process shares (tracing
//! to stderr through a writer that can neither panic nor hold a lock; its module doc says why).

pub use daemon_logging::{stderr_line, RawStderr};

/// Installs the global subscriber: the filter from `var`, or `default` when it is unset or
/// invalid. Call once, early in `main`.
pub fn init(var: &str, default: &str) {
    daemon_logging::init_from(var, default);
}
