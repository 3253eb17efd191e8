//! ACPI fixed hardware as the FADT describes it: the PM1a event and control blocks, GPE0, and
//! the reset register. The power button is a DSDT control-method button (`\_SB.PWRB`) raised
//! through GPE0 bit 0, so `system_powerdown` runs the guest's own ACPI path: SCI -> `_E00` ->
//! `Notify(PWRB, 0x80)` -> the OS writes S5 to PM1a_CNT.

use super::bus::BusDevice;
use super::{ActionSink, GuestAction, IrqLevel};
use crate::layout;

/// PM1 status/enable bits we implement.
const PM1_PWRBTN: u16 = 1 << 8;
/// PM1_CNT.SCI_EN: always set, there is no SMI_CMD to switch out of legacy mode.
const PM1_CNT_SCI_EN: u16 = 1;

/// Offsets inside the block mapped at `layout::PM1A_EVT_BLK`.
const OFF_PM1_STS: u64 = 0;
const OFF_PM1_EN: u64 = 2;
const OFF_PM1_CNT: u64 = (layout::PM1A_CNT_BLK - layout::PM1A_EVT_BLK) as u64;
const OFF_GPE0_STS: u64 = (layout::GPE0_BLK - layout::PM1A_EVT_BLK) as u64;
const OFF_GPE0_EN: u64 = OFF_GPE0_STS + (layout::GPE0_BLK_LEN as u64) / 2;
/// Length of the port range covering PM1a_EVT .. end of GPE0.
pub const PM_BLOCK_LEN: u64 = OFF_GPE0_STS + layout::GPE0_BLK_LEN as u64;

pub struct AcpiPm {
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    gpe0_sts: u16,
    gpe0_en: u16,
    sci: IrqLevel,
    sci_level: bool,
    actions: ActionSink,
}

impl AcpiPm {
    pub fn new(sci: IrqLevel, actions: ActionSink) -> Self {
        AcpiPm {
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: PM1_CNT_SCI_EN,
            gpe0_sts: 0,
            gpe0_en: 0,
            sci,
            sci_level: false,
            actions,
        }
    }

    /// `system_powerdown`: latch the button event; the SCI fires once the guest enables it.
    pub fn press_power_button(&mut self) {
        self.gpe0_sts |= layout::GPE_POWER_BUTTON;
        self.update_sci();
    }

    /// Machine reset: status and enables go back to their power-on values.
    pub fn reset(&mut self) {
        self.pm1_sts = 0;
        self.pm1_en = 0;
        self.pm1_cnt = PM1_CNT_SCI_EN;
        self.gpe0_sts = 0;
        self.gpe0_en = 0;
        self.update_sci();
    }

    fn update_sci(&mut self) {
        let level = (self.pm1_sts & self.pm1_en & PM1_PWRBTN) != 0 || (self.gpe0_sts & self.gpe0_en) != 0;
        if level != self.sci_level {
            self.sci_level = level;
            (self.sci)(level);
        }
    }

    fn reg_read(&self, off: u64) -> Option<u16> {
        Some(match off {
            OFF_PM1_STS => self.pm1_sts,
            OFF_PM1_EN => self.pm1_en,
            OFF_PM1_CNT => self.pm1_cnt,
            OFF_GPE0_STS => self.gpe0_sts,
            OFF_GPE0_EN => self.gpe0_en,
            _ => return None,
        })
    }

    fn reg_write(&mut self, off: u64, value: u16, mask: u16) {
        match off {
            // Status registers are write-one-to-clear.
            OFF_PM1_STS => self.pm1_sts &= !(value & mask),
            OFF_PM1_EN => self.pm1_en = (self.pm1_en & !mask) | (value & mask),
            OFF_GPE0_STS => self.gpe0_sts &= !(value & mask),
            OFF_GPE0_EN => self.gpe0_en = (self.gpe0_en & !mask) | (value & mask),
            OFF_PM1_CNT => {
                let v = (self.pm1_cnt & !mask) | (value & mask) | PM1_CNT_SCI_EN;
                if v & layout::SLP_EN != 0 {
                    let slp_typ = (v >> 10) & 7;
                    if slp_typ == layout::SLP_TYP_S5 {
                        (self.actions)(GuestAction::PowerOff);
                    } else {
                        tracing::warn!(slp_typ, "guest asked for a sleep state this machine does not offer");
                    }
                }
                // SLP_EN is write-only.
                self.pm1_cnt = v & !layout::SLP_EN;
            }
            _ => {}
        }
        self.update_sci();
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            *b = match self.reg_read(off & !1) {
                Some(v) => (v >> ((off & 1) * 8)) as u8,
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let off = offset + i as u64;
            let shift = (off & 1) * 8;
            self.reg_write(off & !1, (*b as u16) << shift, 0xff << shift);
        }
    }
}

/// The FADT reset register (port 0xCF9, PIIX/ICH "reset control"): bit 2 starts the reset.
pub struct ResetControl {
    actions: ActionSink,
}

impl ResetControl {
    pub fn new(actions: ActionSink) -> Self {
        ResetControl { actions }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first().is_some_and(|v| v & 0x04 != 0) {
            (self.actions)(GuestAction::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log<T> = Arc<Mutex<Vec<T>>>;

    fn pm() -> (AcpiPm, Log<bool>, Log<GuestAction>) {
        let levels = Arc::new(Mutex::new(Vec::new()));
        let acts = Arc::new(Mutex::new(Vec::new()));
        let l = levels.clone();
        let a = acts.clone();
        let pm = AcpiPm::new(
            Arc::new(move |v| l.lock().expect("lock").push(v)),
            Arc::new(move |x| a.lock().expect("lock").push(x)),
        );
        (pm, levels, acts)
    }

    #[test]
    fn power_button_raises_sci_only_when_enabled_and_clears_w1c() {
        let (mut pm, levels, _) = pm();
        pm.press_power_button();
        assert!(levels.lock().expect("lock").is_empty(), "GPE not enabled yet");
        pm.write(OFF_GPE0_EN, &[1]);
        assert_eq!(*levels.lock().expect("lock"), vec![true]);
        let mut b = [0u8; 2];
        pm.read(OFF_GPE0_STS, &mut b);
        assert_eq!(b, [1, 0]);
        pm.write(OFF_GPE0_STS, &[1]);
        assert_eq!(*levels.lock().expect("lock"), vec![true, false]);
    }

    #[test]
    fn s5_write_powers_off_and_other_states_do_not() {
        let (mut pm, _, acts) = pm();
        let v = (3u16 << 10) | layout::SLP_EN;
        pm.write(OFF_PM1_CNT, &v.to_le_bytes());
        assert!(acts.lock().expect("lock").is_empty());
        let v = (layout::SLP_TYP_S5 << 10) | layout::SLP_EN;
        pm.write(OFF_PM1_CNT, &v.to_le_bytes());
        assert_eq!(*acts.lock().expect("lock"), vec![GuestAction::PowerOff]);
        let mut b = [0u8; 2];
        pm.read(OFF_PM1_CNT, &mut b);
        assert_eq!(u16::from_le_bytes(b) & layout::SLP_EN, 0, "SLP_EN reads back 0");
        assert_eq!(u16::from_le_bytes(b) & PM1_CNT_SCI_EN, 1);
    }
}
