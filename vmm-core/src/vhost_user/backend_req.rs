//! The frontend's side of the backend-request channel: the backend tells vmm-core that its
//! configuration space changed (CONFIG_CHANGE_MSG). The handler only records it; the device's
//! worker then re-reads the config with GET_CONFIG on the main channel (after the ack has gone
//! back, so a backend waiting for the ack is never blocked on us).

use std::sync::atomic::{AtomicBool, Ordering};
use vhost::vhost_user::{HandlerResult, VhostUserFrontendReqHandler};

#[derive(Debug, Default)]
pub struct ConfigChangeFlag(AtomicBool);

impl ConfigChangeFlag {
    /// Whether a change was reported since the last call.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

impl VhostUserFrontendReqHandler for ConfigChangeFlag {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.store(true, Ordering::SeqCst);
        Ok(0)
    }
}
