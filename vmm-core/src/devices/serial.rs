//! COM1: vm-superio's 8250 model on the I/O bus, its interrupt an eventfd wired as an irqfd, its
//! bytes going to a chardev. Input is queued here so a paste longer than the 64-byte FIFO is not
//! lost: the FIFO is topped up whenever the guest reads a byte.

use super::bus::BusDevice;
use std::collections::VecDeque;
use std::io::Write;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// vm-superio's interrupt hook as an eventfd (registered with KVM as an irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Input bytes waiting for room in the UART's FIFO are capped, so a flood on the chardev cannot
/// grow vmm-core without bound while the guest is not reading.
const MAX_PENDING_INPUT: usize = 1 << 20;

pub struct SerialDevice<W: Write + Send> {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, W>,
    pending: VecDeque<u8>,
}

impl<W: Write + Send> SerialDevice<W> {
    pub fn new(irq: EventFd, out: W) -> Self {
        SerialDevice { uart: Serial::new(EventFdTrigger(irq), out), pending: VecDeque::new() }
    }

    /// Bytes from the outside world for the guest.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        if room < bytes.len() {
            tracing::warn!(dropped = bytes.len() - room, "serial input dropped: guest is not reading");
        }
        self.pending.extend(&bytes[..bytes.len().min(room)]);
        self.fill_fifo();
    }

    fn fill_fifo(&mut self) {
        let n = self.uart.fifo_capacity().min(self.pending.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.drain(..n).collect();
        if let Err(e) = self.uart.enqueue_raw_bytes(&chunk) {
            tracing::warn!(error = ?e, "serial: could not queue input");
        }
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
        if offset == 0 {
            self.fill_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            tracing::debug!(error = ?e, "serial write");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    #[test]
    fn output_reaches_the_writer_and_long_input_is_not_lost() {
        let irq = EventFd::new(0).expect("eventfd");
        let mut dev = SerialDevice::new(irq.try_clone().expect("clone"), Vec::new());
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(dev.uart.writer(), b"hi");
        // Enable the RX interrupt and send more than the FIFO holds.
        dev.write(1, &[1]);
        let input: Vec<u8> = (0..200u8).collect();
        dev.queue_input(&input);
        assert!(irq.read().expect("irq") >= 1);
        let mut got = Vec::new();
        loop {
            let mut lsr = [0u8];
            dev.read(LSR, &mut lsr);
            if lsr[0] & LSR_DATA_READY == 0 {
                break;
            }
            let mut b = [0u8];
            dev.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
    }
}
