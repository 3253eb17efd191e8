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

/// Why the machine reset or shut down: QEMU 7.2's `reason` of the RESET and SHUTDOWN events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventReason {
    /// `quit` from the monitor.
    HostQmpQuit,
    /// `system_reset` from the monitor.
    HostQmpSystemReset,
    /// SIGTERM, SIGINT or SIGHUP to the process.
    HostSignal,
    /// The guest powered off (ACPI S5).
    GuestShutdown,
    /// The guest reset (reset register, keyboard controller, triple fault).
    GuestReset,
}

impl EventReason {
    /// The value as QEMU spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventReason::HostQmpQuit => "host-qmp-quit",
            EventReason::HostQmpSystemReset => "host-qmp-system-reset",
            EventReason::HostSignal => "host-signal",
            EventReason::GuestShutdown => "guest-shutdown",
            EventReason::GuestReset => "guest-reset",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    pub kind: VmEventKind,
    /// For RESET and SHUTDOWN: why (QEMU 7.2's `reason`); `None` for the other events.
    pub reason: Option<EventReason>,
    pub timestamp: SystemTime,
}

/// A subscriber called synchronously, in the emitting thread, while the machine's state lock
/// is held: it must only queue the event and return.
pub type EventCallback = Box<dyn Fn(&VmEvent) + Send>;

/// Fan-out of events to every subscriber; a channel subscriber that went away is dropped.
#[derive(Default)]
pub struct EventHub {
    subscribers: Mutex<Vec<Sender<VmEvent>>>,
    callbacks: Mutex<Vec<EventCallback>>,
}

impl EventHub {
    pub fn subscribe(&self) -> Receiver<VmEvent> {
        let (tx, rx) = channel();
        crate::devices::bus::lock(&self.subscribers).push(tx);
        rx
    }

    /// Calls `f` with every event from now on, before the state change that caused it returns
    /// to its caller (so a monitor can send the event ahead of the command's reply).
    pub fn subscribe_fn(&self, f: EventCallback) {
        crate::devices::bus::lock(&self.callbacks).push(f);
    }

    pub fn emit(&self, kind: VmEventKind) {
        self.emit_with(kind, None)
    }

    pub fn emit_with(&self, kind: VmEventKind, reason: Option<EventReason>) {
        tracing::info!(event = kind.name(), ?kind, ?reason, "vm event");
        let ev = VmEvent { kind, reason, timestamp: SystemTime::now() };
        for f in crate::devices::bus::lock(&self.callbacks).iter() {
            f(&ev);
        }
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

    #[test]
    fn callbacks_see_events_with_their_reason() {
        let hub = EventHub::default();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        hub.subscribe_fn(Box::new(move |e| s.lock().expect("lock").push((e.kind.clone(), e.reason))));
        hub.emit_with(VmEventKind::Shutdown { guest: false }, Some(EventReason::HostSignal));
        hub.emit(VmEventKind::Resume);
        let seen = seen.lock().expect("lock").clone();
        let want = [(VmEventKind::Shutdown { guest: false }, Some(EventReason::HostSignal)), (VmEventKind::Resume, None)];
        assert_eq!(seen, want);
        assert_eq!(EventReason::HostQmpSystemReset.as_str(), "host-qmp-system-reset");
    }
}
