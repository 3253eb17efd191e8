//! The seed schema's `RunState`, the events a state change emits, and which transitions the
//! monitor commands may make.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::SystemTime;

/// The seed's `RunState` enum, in its order; [`RunState::as_str`] gives the wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Watchdog,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Debug => "debug",
            RunState::Inmigrate => "inmigrate",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Paused => "paused",
            RunState::Postmigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
            RunState::FinishMigrate => "finish-migrate",
            RunState::RestoreVm => "restore-vm",
            RunState::Running => "running",
            RunState::SaveVm => "save-vm",
            RunState::Shutdown => "shutdown",
            RunState::Watchdog => "watchdog",
        }
    }

    /// States `cont` cannot leave without a `system_reset` first (QEMU's runstate_needs_reset).
    pub fn needs_reset(self) -> bool {
        matches!(self, RunState::InternalError | RunState::Shutdown)
    }
}

/// What happened, as the QMP events of the same names report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEventKind {
    Stop,
    Resume,
    /// `guest`: the guest asked (reset register, triple fault) rather than the host.
    Reset { guest: bool },
    Powerdown,
    Shutdown { guest: bool },
}

impl VmEventKind {
    pub fn name(&self) -> &'static str {
        match self {
            VmEventKind::Stop => "STOP",
            VmEventKind::Resume => "RESUME",
            VmEventKind::Reset { .. } => "RESET",
            VmEventKind::Powerdown => "POWERDOWN",
            VmEventKind::Shutdown { .. } => "SHUTDOWN",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    pub kind: VmEventKind,
    pub timestamp: SystemTime,
}

/// Fan-out of events to every subscriber; a subscriber that went away is dropped.
#[derive(Default)]
pub struct EventHub {
    subscribers: Mutex<Vec<Sender<VmEvent>>>,
}

impl EventHub {
    pub fn subscribe(&self) -> Receiver<VmEvent> {
        let (tx, rx) = channel();
        crate::devices::bus::lock(&self.subscribers).push(tx);
        rx
    }

    pub fn emit(&self, kind: VmEventKind) {
        tracing::info!(event = kind.name(), ?kind, "vm event");
        let ev = VmEvent { kind, timestamp: SystemTime::now() };
        crate::devices::bus::lock(&self.subscribers).retain(|s| s.send(ev.clone()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_schema() {
        let schema = include_str!("../../../shared/seed/qapi-schema.json");
        let all = [
            RunState::Debug, RunState::Inmigrate, RunState::InternalError, RunState::IoError,
            RunState::Paused, RunState::Postmigrate, RunState::Prelaunch, RunState::FinishMigrate,
            RunState::RestoreVm, RunState::Running, RunState::SaveVm, RunState::Shutdown,
            RunState::Watchdog,
        ];
        let list: Vec<String> = all.iter().map(|s| format!("'{}'", s.as_str())).collect();
        let start = schema.find("'enum': 'RunState'").expect("RunState in seed");
        let body = &schema[start..start + 400];
        let mut pos = 0;
        for name in &list {
            let at = body[pos..].find(name.as_str()).unwrap_or_else(|| panic!("{name} missing or out of order"));
            pos += at + name.len();
        }
    }

    #[test]
    fn hub_drops_gone_subscribers() {
        let hub = EventHub::default();
        let rx = hub.subscribe();
        drop(hub.subscribe());
        hub.emit(VmEventKind::Stop);
        assert_eq!(rx.recv().expect("event").kind, VmEventKind::Stop);
        assert_eq!(hub.subscribers.lock().expect("lock").len(), 1);
    }
}
