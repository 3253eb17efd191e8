//! Inflight tracking (vhost-user spec, split rings).
