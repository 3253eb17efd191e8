//! The backend kit: what every Flotilla vhost-user daemon (blockd, balloond, netd, displayd) is
//! built on, so each daemon holds only its device model.
//!
//! * [`cli`] — the program: the vhost-user spec's backend program conventions (`--socket-path`,
//!   `--fd`, `--print-capabilities`), the launcher's `--config-json/--dbus-address/--instance/
//!   --ready-fd`, and `main` ([`cli::run`]).
//! * [`serve`] — the serve loop: one thread per socket, a new daemon and backend for every
//!   frontend connection, for ever; the workers' exit events.
//! * [`signals`] — SIGTERM/SIGINT/SIGHUP: the daemon's cleanup under a deadline, a second signal
//!   ends at once, an exit that no thread blocked on stderr (or anything else) can hold up.
//! * [`logging`] — tracing to stderr without std's lock and without panicking on a closed pipe.
//! * [`daemon_start`] (re-exported) — D-Bus start-up on its own thread, `--ready-fd`.
//! * [`inflight`] — `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` for split rings: the shared region
//!   (GET/SET_INFLIGHT_FD), recording each request at pop and clearing it at completion as the
//!   vhost-user spec's algorithm says, and recovery after a reconnect (the requests to resubmit,
//!   in the spec's order).
//! * [`queue`] — the rings of a connection as a backend serves them: pop and complete through
//!   the region, what is in flight (GET_VRING_BASE waits for it), and a ring stopped with
//!   SET_VRING_ERR when its driver publishes an available index more than a queue size ahead.
//! * [`state_file`] — a small state file a restarted daemon reads back, written atomically and
//!   durably.
//! * [`config_change`] — CONFIG_CHANGE_MSG to the frontend from a thread of its own (REPLY_ACK
//!   waits for the frontend), requests folded into one, none owed to an earlier connection.
//! * [`ratelimit`] — at most a burst of the log lines a guest can trigger per window, the rest
//!   counted and reported with the next line.

pub mod cli;
pub mod config_change;
pub mod inflight;
pub mod logging;
pub mod queue;
pub mod ratelimit;
pub mod serve;
pub mod signals;
pub mod state_file;

pub use daemon_start;
