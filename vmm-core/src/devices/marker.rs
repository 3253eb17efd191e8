//! The boot-time marker (after firecracker's boot timer): the guest writes a byte to port 0x80
//! and the VMM records the time since the process started, for the boot benchmark.

use super::bus::BusDevice;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct BootMarker {
    start: Instant,
    pub first: Arc<Mutex<Option<Duration>>>,
}

impl BootMarker {
    pub fn new(start: Instant) -> Self {
        BootMarker { start, first: Arc::new(Mutex::new(None)) }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let elapsed = self.start.elapsed();
        tracing::info!(value = data.first().copied().unwrap_or(0), elapsed_us = elapsed.as_micros() as u64, "guest boot marker");
        let mut first = super::bus::lock(&self.first);
        if first.is_none() {
            *first = Some(elapsed);
        }
    }
}
