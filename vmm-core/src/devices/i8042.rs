//! Just enough of the i8042 keyboard controller for the reset line: command 0xFE on port 0x64
//! pulses the CPU reset. Status reads say "nothing to read, ready for input", so a reset path
//! that waits for the input buffer to drain (Linux's `kb_wait`, the test guest) goes straight on.
//!
//! It is not a keyboard controller, and the machine does not claim one: the FADT's IAPC_BOOT_ARCH
//! leaves "8042 present" clear and the DSDT has no PS/2 device, so Linux skips its direct probe
//! (which would fail: "Can't read CTR while initializing i8042") as it does on QEMU without an
//! i8042. The reset port works whatever the tables say.

use super::bus::BusDevice;
use super::{ActionSink, GuestAction};

pub struct I8042 {
    actions: ActionSink,
}

impl I8042 {
    pub fn new(actions: ActionSink) -> Self {
        I8042 { actions }
    }
}

const CMD_RESET_CPU: u8 = 0xfe;

impl BusDevice for I8042 {
    // Mapped at 0x60..0x65: offset 0 = data, offset 4 = status/command.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&CMD_RESET_CPU) {
            (self.actions)(GuestAction::Reset);
        }
    }
}
