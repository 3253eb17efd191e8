//! The QMP block commands over the drives blockd serves, with the error classes the seed
//! schema names and QEMU 7.2's wording where the recorded transcripts show it. Plain blocking
//! methods: the D-Bus glue ([`crate::dbus`]) runs them off its async thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_schema::check::QmpError;
use flotilla_schema::commands::{BlockPasswdArgs, BlockResizeArgs, BlockdevSnapshotSyncArgs};
use flotilla_schema::types::{BlockDeviceInfo, BlockDeviceIoStatus, BlockDeviceStats, BlockInfo, BlockStats};
use serde_json::json;

use crate::disk::Format;
use crate::engine::{DriveRuntime, ResizeError, SnapshotError};
use crate::policy::IoStatus;
use crate::state::{DriveImage, State};
use crate::stats::Snapshot;

/// The commands blockd implements (its interface less the QOM commands).
pub const EXPORTED: &[&str] =
    &["query-block", "query-blockstats", "block_passwd", "block_resize", "blockdev-snapshot-sync"];

pub struct BlockService {
    pub drives: Vec<Arc<DriveRuntime>>,
    /// Where the drives' current images are recorded after a snapshot (see [`crate::state`]).
    state_file: Option<PathBuf>,
}

fn with_data(class: &str, desc: impl Into<String>, data: serde_json::Value) -> QmpError {
    QmpError { class: class.into(), desc: desc.into(), data: Some(data) }
}

/// DeviceNotFound (the seed's class) with QEMU 7.2's wording.
fn device_not_found(device: &str) -> QmpError {
    with_data("DeviceNotFound", format!("Cannot find device='{device}' nor node-name=''"), json!({ "device": device }))
}

fn stats_of(s: &Snapshot) -> BlockDeviceStats {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    BlockDeviceStats {
        rd_bytes: i(s.rd_bytes),
        wr_bytes: i(s.wr_bytes),
        rd_operations: i(s.rd_operations),
        wr_operations: i(s.wr_operations),
        flush_operations: i(s.flush_operations),
        flush_total_time_ns: i(s.flush_total_time_ns),
        wr_total_time_ns: i(s.wr_total_time_ns),
        rd_total_time_ns: i(s.rd_total_time_ns),
        wr_highest_offset: i(s.wr_highest_offset),
    }
}

impl BlockService {
    pub fn new(drives: Vec<Arc<DriveRuntime>>) -> BlockService {
        BlockService { drives, state_file: None }
    }

    /// Records every drive's image in `path` after each snapshot.
    pub fn with_state_file(mut self, path: Option<PathBuf>) -> BlockService {
        self.state_file = path;
        self
    }

    /// Writes the drives' current images to the state file, if there is one. A failure is
    /// logged: the snapshot stands, only a restarted blockd would not know about it.
    fn record_images(&self) {
        let Some(path) = &self.state_file else { return };
        let drives = self
            .drives
            .iter()
            .map(|d| {
                let image = d.image.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let format = match image.format {
                    Format::Raw => vm_config::DriveFormat::Raw,
                    Format::Qcow2 => vm_config::DriveFormat::Qcow2,
                };
                DriveImage { id: d.id.clone(), file: image.file, format }
            })
            .collect();
        if let Err(e) = (State { drives }).save(path) {
            tracing::error!("a restarted blockd would reopen the old images: {e}");
        }
    }

    fn find(&self, device: &str) -> Result<&Arc<DriveRuntime>, QmpError> {
        self.drives.iter().find(|d| d.id == device).ok_or_else(|| device_not_found(device))
    }

    pub fn query_block(&self) -> Vec<BlockInfo> {
        self.drives
            .iter()
            .map(|d| {
                let image = d.image.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let backing_file = d.drive.disk().backing_file();
                BlockInfo {
                    device: d.id.clone(),
                    type_: "hd".into(),
                    removable: false,
                    locked: false,
                    inserted: Some(BlockDeviceInfo {
                        file: image.file.display().to_string(),
                        ro: d.drive.readonly,
                        drv: image.format.name().into(),
                        backing_file,
                        encrypted: false,
                        bps: 0,
                        bps_rd: 0,
                        bps_wr: 0,
                        iops: 0,
                        iops_rd: 0,
                        iops_wr: 0,
                    }),
                    tray_open: None,
                    io_status: d.io_status().map(|s| match s {
                        IoStatus::Ok => BlockDeviceIoStatus::Ok,
                        IoStatus::Failed => BlockDeviceIoStatus::Failed,
                        IoStatus::Nospace => BlockDeviceIoStatus::Nospace,
                    }),
                }
            })
            .collect()
    }

    /// The device layer's counters, and as `parent` the image file layer: QEMU 7.2 accounts
    /// requests only at the device, so the file layer's counters are 0 and only its
    /// `wr_highest_offset` moves — for raw the device's, for qcow2 the end of the image file
    /// once anything was written (the highest host offset qcow2 allocations reach).
    pub fn query_blockstats(&self) -> Vec<BlockStats> {
        self.drives
            .iter()
            .map(|d| {
                let s = d.drive.stats.snapshot();
                let format = d.image.lock().unwrap_or_else(|p| p.into_inner()).format;
                let file_highest = match format {
                    Format::Raw => s.wr_highest_offset,
                    Format::Qcow2 if s.wr_operations > 0 => d.drive.disk().file_len(),
                    Format::Qcow2 => 0,
                };
                let parent = Snapshot { wr_highest_offset: file_highest, ..Snapshot::default() };
                BlockStats {
                    device: Some(d.id.clone()),
                    stats: stats_of(&s),
                    parent: Some(Box::new(BlockStats { device: None, stats: stats_of(&parent), parent: None })),
                }
            })
            .collect()
    }

    /// QEMU 1.1's qmp_block_resize: size checked, then bdrv_truncate's errors mapped.
    pub fn block_resize(&self, args: &BlockResizeArgs) -> Result<(), QmpError> {
        let d = self.find(&args.device)?;
        let Ok(size) = u64::try_from(args.size) else {
            return Err(with_data(
                "InvalidParameterValue",
                "Parameter 'size' expects a >0 size",
                json!({"name": "size", "expected": "a >0 size"}),
            ));
        };
        d.resize(size).map_err(|e| match e {
            ResizeError::ReadOnly => with_data(
                "DeviceIsReadOnly",
                format!("Device '{}' is read only", args.device),
                json!({ "device": args.device }),
            ),
            // qcow2_co_truncate's check, in its words.
            ResizeError::Unaligned => QmpError::new("GenericError", "The new size must be a multiple of 512"),
            ResizeError::Io(io) if io.raw_os_error() == Some(libc::ENOTSUP) => {
                QmpError::new("Unsupported", "this feature or command is not currently supported")
            }
            ResizeError::Io(io) => {
                tracing::warn!(device = %args.device, "block_resize failed: {io}");
                QmpError::new("UndefinedError", "An undefined error has occurred")
            }
        })
    }

    /// QEMU 1.1's qmp_blockdev_snapshot_sync: format qcow2 unless given; an unknown format is
    /// InvalidBlockFormat; one that cannot hold a backing file (raw), or a file that cannot be
    /// created or opened, is OpenFileFailed.
    pub fn blockdev_snapshot_sync(&self, args: &BlockdevSnapshotSyncArgs) -> Result<(), QmpError> {
        let d = self.find(&args.device)?;
        let format = args.format.as_deref().unwrap_or("qcow2");
        let open_failed = || {
            with_data(
                "OpenFileFailed",
                format!("Could not open '{}'", args.snapshot_file),
                json!({ "filename": args.snapshot_file }),
            )
        };
        match format {
            "qcow2" => {}
            "raw" => return Err(open_failed()),
            other => {
                return Err(with_data(
                    "InvalidBlockFormat",
                    format!("Invalid block format '{other}'"),
                    json!({ "name": other }),
                ))
            }
        }
        d.snapshot(Path::new(&args.snapshot_file)).map_err(|e| {
            tracing::warn!(device = %args.device, "blockdev-snapshot-sync failed: {e}");
            match e {
                SnapshotError::Create { .. } | SnapshotError::Open { .. } | SnapshotError::InChain { .. } => {
                    open_failed()
                }
                // QERR_IO_ERROR, as QEMU reports a failed flush of the old image; its class is
                // IOError in QEMU 1.1's error set, which the seed uses (memsave names it).
                SnapshotError::Flush(_) => QmpError::new("IOError", "An IO error has occurred"),
            }
        })?;
        self.record_images();
        Ok(())
    }

    /// No drive here is encrypted (qcow2 AES and LUKS are not supported).
    pub fn block_passwd(&self, args: &BlockPasswdArgs) -> Result<(), QmpError> {
        self.find(&args.device)?;
        Err(with_data(
            "DeviceNotEncrypted",
            format!("Device '{}' is not encrypted", args.device),
            json!({ "device": args.device }),
        ))
    }

    /// The VM resumed: every drive retries what it held.
    pub fn resume(&self) {
        for d in &self.drives {
            d.resume();
        }
    }
}
