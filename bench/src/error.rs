//! The bench's errors: each says what was being done, and wraps its cause as `source()`.
//! (Written out by hand rather than with thiserror to keep the bench's dependencies, and so
//! the workspace's Cargo.lock, as they are.)

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum BenchError {
    /// A bad command line; the message includes the usage.
    Usage(String),
    /// Something the host lacks (QEMU, /dev/kvm, the release binaries).
    Setup(String),
    Spawn {
        what: String,
        source: io::Error,
    },
    /// A VM did not do what the bench waited for (timeout, early exit, unexpected output).
    Guest {
        what: String,
        detail: String,
    },
    Io {
        what: String,
        source: io::Error,
    },
    Smaps {
        pid: i32,
        source: crate::smaps::ParseError,
    },
    GuestRam {
        what: String,
        detail: String,
    },
    /// A monitor (QMP) or bus peer that did not answer as expected.
    Qmp {
        what: String,
        detail: String,
    },
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Usage(m) | BenchError::Setup(m) => f.write_str(m),
            BenchError::Spawn { what, .. } => write!(f, "starting {what}"),
            BenchError::Guest { what, detail } | BenchError::Qmp { what, detail } => write!(f, "{what}: {detail}"),
            BenchError::Io { what, .. } => f.write_str(what),
            BenchError::Smaps { pid, .. } => write!(f, "parsing /proc/{pid}/smaps"),
            BenchError::GuestRam { what, detail } => write!(f, "finding the guest RAM of {what}: {detail}"),
        }
    }
}

impl std::error::Error for BenchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BenchError::Spawn { source, .. } | BenchError::Io { source, .. } => Some(source),
            BenchError::Smaps { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl std::error::Error for crate::smaps::ParseError {}

/// The error and its causes on one line: `what: cause: cause`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
