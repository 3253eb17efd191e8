//! What a failed request does, as QEMU's `-drive werror=`/`rerror=` (BlockdevOnError) decide it,
//! and the io-status a failure leaves behind.

use vm_config::ErrorAction;

/// Which side of the drive's policy a request falls under: reads use `rerror`; writes,
/// flushes, discards and write-zeroes use `werror` (QEMU's virtio-blk does the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
}

impl IoOp {
    /// BLOCK_IO_ERROR's `operation`.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
        }
    }
}

/// What happens to one failed request (QEMU's BlockErrorAction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Fail it to the guest (VIRTIO_BLK_S_IOERR).
    Report,
    /// Complete it as if it had succeeded.
    Ignore,
    /// Hold it (not completed), stop the VM; retried on resume.
    Stop,
}

impl Decision {
    /// BLOCK_IO_ERROR's `action`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Report => "report",
            Decision::Ignore => "ignore",
            Decision::Stop => "stop",
        }
    }
}

/// QEMU's blk_get_error_action: `enospc` stops on ENOSPC and reports anything else.
pub fn decide(action: ErrorAction, errno: i32) -> Decision {
    match action {
        ErrorAction::Report => Decision::Report,
        ErrorAction::Ignore => Decision::Ignore,
        ErrorAction::Stop => Decision::Stop,
        ErrorAction::Enospc if errno == libc::ENOSPC => Decision::Stop,
        ErrorAction::Enospc => Decision::Report,
    }
}

/// The seed's BlockDeviceIoStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    Failed,
    Nospace,
}

impl IoStatus {
    /// The status a stopping error sets (QEMU sets it only while the status is still ok).
    pub fn after_stop(self, errno: i32) -> IoStatus {
        match self {
            IoStatus::Ok if errno == libc::ENOSPC => IoStatus::Nospace,
            IoStatus::Ok => IoStatus::Failed,
            other => other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

/// Whether query-block shows `io-status` for a drive: QEMU 1.1's bdrv_iostatus_is_enabled
/// (werror stop or enospc, or rerror stop). rerror=enospc stops on ENOSPC too, so it counts.
pub fn io_status_enabled(werror: ErrorAction, rerror: ErrorAction) -> bool {
    matches!(werror, ErrorAction::Stop | ErrorAction::Enospc)
        || matches!(rerror, ErrorAction::Stop | ErrorAction::Enospc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_decide_as_qemu() {
        for errno in [libc::EIO, libc::ENOSPC] {
            assert_eq!(decide(ErrorAction::Report, errno), Decision::Report);
            assert_eq!(decide(ErrorAction::Ignore, errno), Decision::Ignore);
            assert_eq!(decide(ErrorAction::Stop, errno), Decision::Stop);
        }
        assert_eq!(decide(ErrorAction::Enospc, libc::ENOSPC), Decision::Stop);
        assert_eq!(decide(ErrorAction::Enospc, libc::EIO), Decision::Report);
        assert_eq!(decide(ErrorAction::Enospc, libc::EDQUOT), Decision::Report);
    }

    #[test]
    fn io_status_keeps_the_first_error() {
        assert_eq!(IoStatus::Ok.after_stop(libc::ENOSPC), IoStatus::Nospace);
        assert_eq!(IoStatus::Ok.after_stop(libc::EIO), IoStatus::Failed);
        assert_eq!(IoStatus::Nospace.after_stop(libc::EIO), IoStatus::Nospace);
        assert_eq!(IoStatus::Failed.after_stop(libc::ENOSPC), IoStatus::Failed);
    }

    #[test]
    fn io_status_shows_only_with_stopping_policies() {
        assert!(io_status_enabled(ErrorAction::Enospc, ErrorAction::Report));
        assert!(io_status_enabled(ErrorAction::Stop, ErrorAction::Report));
        assert!(io_status_enabled(ErrorAction::Report, ErrorAction::Stop));
        assert!(!io_status_enabled(ErrorAction::Report, ErrorAction::Report));
        assert!(!io_status_enabled(ErrorAction::Ignore, ErrorAction::Ignore));
    }
}
