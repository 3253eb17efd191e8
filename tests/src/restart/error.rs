//! Errors of the restart rig: each says what was being done and quotes the output that explains it.

#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}\n{detail}")]
    Process { what: String, detail: String },
    #[error("{what}; last console lines:\n{seen}")]
    Guest { what: String, seen: String },
}

impl RigError {
    /// For `map_err`: an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RigError {
        let what = what.into();
        move |source| RigError::Io { what, source }
    }
}
