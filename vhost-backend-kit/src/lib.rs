//! The backend kit: what every Flotilla vhost-user daemon (blockd, balloond, netd, displayd) is
//! built on, so each daemon holds only its device model.
//!
//! * [`inflight`] — `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` for split rings: the shared region
//!   (GET/SET_INFLIGHT_FD), recording each request at pop and clearing it at completion as the
//!   vhost-user spec's algorithm says, and recovery after a reconnect (the requests to resubmit,
//!   in the spec's order).
//! * [`queue`] — the rings of a connection as a backend serves them: pop and complete through
//!   the region, what is in flight (GET_VRING_BASE waits for it), and a ring stopped with
//!   SET_VRING_ERR when its driver publishes an available index more than a queue size ahead.

pub mod inflight;
pub mod queue;
