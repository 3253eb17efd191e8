//! Errors of the block bench: each says what was being done and keeps its cause as `source()`.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A bad command line; the message includes the usage.
    #[error("{0}")]
    Usage(String),
    /// Something the host lacks (a tool, a binary, a suitable directory).
    #[error("{0}")]
    Setup(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A vhost-user message the backend refused or did not answer as the spec says.
    #[error("vhost-user {what}")]
    Vhost {
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("bench memory: {what}")]
    Memory {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend did something a correct virtio-blk device does not (bad used id, error
    /// status, silence past the deadline).
    #[error("{what}: {detail}")]
    Backend { what: String, detail: String },
    #[error("fio: {0}")]
    Fio(String),
    /// From the helpers the block part shares with the rest of the bench (running a tool).
    #[error(transparent)]
    Bench(#[from] crate::error::BenchError),
}

impl BlockError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> BlockError {
        let what = what.into();
        move |source| BlockError::Io { what, source }
    }

    pub fn vhost(what: &'static str) -> impl FnOnce(vhost::Error) -> BlockError {
        move |source| BlockError::Vhost { what, source }
    }

    pub fn mem<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> BlockError {
        let what = what.into();
        move |source| BlockError::Memory { what, source: Box::new(source) }
    }
}
