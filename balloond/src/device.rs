//! The balloon device's state, shared by every connection and by the D-Bus side: the config
//! space, the guest's last stats, what reclaiming has done so far, where events go, and the
//! thread that tells the frontend about config changes.
//!
//! It lives for the whole process (a frontend that reconnects finds the target and the
//! guest's `actual` as they were); the per-connection parts are in [`crate::backend`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use flotilla_schema::types::BalloonInfo;
use serde_json::{json, Value};
use vhost::vhost_user::Backend;
use vhost_backend_kit::config_change::ConfigChangeNotifier;

use crate::config::{self, BalloonConfig, TargetError};
use crate::persist;
use crate::stats::{self, GuestStats};

/// A QMP event: name, `data`, when it happened.
pub type Event = (&'static str, Value, SystemTime);
/// Where events go (the D-Bus side, or a test).
pub type EventSink = Box<dyn Fn(Event) + Send + Sync>;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Running totals since the process started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Pages hole-punched.
    pub freed: AtomicU64,
    /// Inflated PFNs refused (outside guest RAM, in a hole, not whole in a region).
    pub refused: AtomicU64,
    /// Pages whose hole punch failed.
    pub punch_failed: AtomicU64,
    /// PFNs the guest took back (deflate).
    pub deflated: AtomicU64,
    /// Inflate/deflate chains refused whole (writable descriptor, outside memory, too long).
    pub chains_refused: AtomicU64,
    /// Stats buffers received.
    pub stats_buffers: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub freed: u64,
    pub refused: u64,
    pub punch_failed: u64,
    pub deflated: u64,
    pub chains_refused: u64,
    pub stats_buffers: u64,
}

impl Counters {
    pub fn values(&self) -> CounterValues {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            freed: l(&self.freed),
            refused: l(&self.refused),
            punch_failed: l(&self.punch_failed),
            deflated: l(&self.deflated),
            chains_refused: l(&self.chains_refused),
            stats_buffers: l(&self.stats_buffers),
        }
    }
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub struct Device {
    mem_bytes: u64,
    config: Mutex<BalloonConfig>,
    stats: Mutex<Option<GuestStats>>,
    events: Mutex<Option<EventSink>>,
    config_change: ConfigChangeNotifier,
    pub counters: Counters,
    /// Where the config space is recorded for a restarted balloond (see [`persist`]).
    state_file: Mutex<Option<PathBuf>>,
}

impl Device {
    /// A device for a guest of `mem_bytes` of RAM, with its notifier thread.
    pub fn new(mem_bytes: u64) -> std::io::Result<Arc<Device>> {
        let config_change = ConfigChangeNotifier::new("config-change".into())?;
        Ok(Arc::new(Device {
            mem_bytes,
            config: Mutex::new(BalloonConfig::default()),
            stats: Mutex::new(None),
            events: Mutex::new(None),
            config_change,
            counters: Counters::default(),
            state_file: Mutex::new(None),
        }))
    }

    /// Takes the target and the guest's balloon size a previous balloond recorded in `path`
    /// (none: the device starts empty, as a new VM's), and records them there from now on.
    /// Called before any frontend connects: a driver reads the restored config space itself.
    pub fn restore(&self, path: PathBuf) -> Result<(), persist::PersistError> {
        if let Some(saved) = persist::load(&path)? {
            tracing::info!(num_pages = saved.num_pages, actual_pages = saved.actual, "balloon state restored");
            *lock(&self.config) = saved;
        }
        *lock(&self.state_file) = Some(path);
        Ok(())
    }

    /// Records the config space, if there is a state file. A failure is logged: the device
    /// goes on, only a restarted balloond would not know the target.
    fn record(&self) {
        // The config is read under the file's lock: of two changes, the later is written last.
        let file = lock(&self.state_file);
        if let Some(path) = file.as_ref() {
            if let Err(e) = persist::save(path, self.config()) {
                tracing::error!("a restarted balloond would forget the balloon target: {e}");
            }
        }
    }

    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    pub fn config(&self) -> BalloonConfig {
        *lock(&self.config)
    }

    pub fn set_event_sink(&self, sink: Option<EventSink>) {
        *lock(&self.events) = sink;
    }

    /// QMP `balloon`: a new target (bytes of guest RAM). `num_pages` changes and the frontend
    /// is told (CONFIG_CHANGE_MSG, sent by the notifier thread: the command does not wait for
    /// the guest, as QEMU's does not). Returns the new `num_pages`.
    pub fn set_target(&self, target: i64) -> Result<u32, TargetError> {
        let pages = config::num_pages_for_target(self.mem_bytes, target)?;
        lock(&self.config).num_pages = pages;
        // Recorded before the guest is told: a balloond killed from here on restarts with it.
        self.record();
        tracing::info!(target, num_pages = pages, "new balloon target");
        self.config_change.request();
        Ok(pages)
    }

    /// SET_CONFIG from the driver; emits BALLOON_CHANGE when `actual` changed.
    pub fn write_config(&self, offset: u32, buf: &[u8]) {
        let (old, new) = {
            let mut c = lock(&self.config);
            let old = c.actual;
            (old, c.write(offset, buf))
        };
        if old != new {
            self.record();
            tracing::info!(actual_pages = new, "guest balloon size changed");
            self.emit("BALLOON_CHANGE", json!({ "actual": config::actual_bytes(self.mem_bytes, new) }));
        }
    }

    fn emit(&self, name: &'static str, data: Value) {
        if let Some(sink) = lock(&self.events).as_ref() {
            sink((name, data, SystemTime::now()));
        }
    }

    pub fn store_stats(&self, s: GuestStats) {
        *lock(&self.stats) = Some(s);
    }

    pub fn stats(&self) -> Option<GuestStats> {
        lock(&self.stats).clone()
    }

    /// query-balloon: `actual` always, the guest's numbers once it has reported them (each only
    /// if the guest sent its tag, as QEMU 1.1 did).
    pub fn info(&self) -> BalloonInfo {
        let actual = config::actual_bytes(self.mem_bytes, self.config().actual);
        let s = self.stats();
        let get = |tag| s.as_ref().and_then(|s| s.get(tag)).map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        BalloonInfo {
            actual,
            mem_swapped_in: get(stats::S_SWAP_IN),
            mem_swapped_out: get(stats::S_SWAP_OUT),
            major_page_faults: get(stats::S_MAJFLT),
            minor_page_faults: get(stats::S_MINFLT),
            free_mem: get(stats::S_MEMFREE),
            total_mem: get(stats::S_MEMTOT),
        }
    }

    /// A connection's backend-request channel (None when it ends). A config change owed to an
    /// earlier connection is dropped: a new driver reads the config space itself.
    pub fn set_backend(&self, backend: Option<Backend>) {
        self.config_change.set_backend(backend);
    }

    /// CONFIG_CHANGE_MSGs sent so far.
    pub fn config_changes_sent(&self) -> u64 {
        self.config_change.sent()
    }
}
