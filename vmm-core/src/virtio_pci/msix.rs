//! The MSI-X table and PBA of one function, and their effect on the vectors: every vector is an
//! MSI route with an irqfd in [`crate::irq::IrqRouter`]; a vector is *effectively masked* when
//! its entry's mask bit, the function mask, MSI-X disable or bus-master off says so, and the
//! router then holds its signals as pending (the PBA bit).

use crate::devices::bus::lock;
use crate::irq::SharedIrqRouter;
use vmm_sys_util::eventfd::EventFd;

/// The interrupt side of the vectors: the router in the machine, a recorder in unit tests.
pub trait MsiVectors: Send {
    fn count(&self) -> u16;
    fn set_message(&mut self, v: u16, addr_lo: u32, addr_hi: u32, data: u32);
    fn set_masked(&mut self, v: u16, masked: bool);
    /// Signalled while masked.
    fn pending(&self, v: u16) -> bool;
    /// Drops a held signal (reset clears the PBA).
    fn clear_pending(&mut self, v: u16);
}

/// [`MsiVectors`] over the VM's router: one allocated GSI per vector.
pub struct RouterVectors {
    router: SharedIrqRouter,
    gsis: Vec<u32>,
    /// Copies of the vectors' eventfds, to drain a held signal.
    fds: Vec<EventFd>,
}

impl RouterVectors {
    pub fn new(router: SharedIrqRouter, vectors: Vec<crate::irq::MsiVector>) -> Self {
        let (gsis, fds) = vectors.into_iter().map(|v| (v.gsi, v.eventfd)).unzip();
        RouterVectors { router, gsis, fds }
    }
}

impl Drop for RouterVectors {
    fn drop(&mut self) {
        let mut r = lock(&self.router);
        for &gsi in &self.gsis {
            if let Err(e) = r.release(gsi) {
                tracing::debug!(gsi, error = %e, "releasing an MSI-X vector");
            }
        }
    }
}

impl MsiVectors for RouterVectors {
    fn count(&self) -> u16 {
        self.gsis.len() as u16
    }

    fn set_message(&mut self, v: u16, addr_lo: u32, addr_hi: u32, data: u32) {
        let Some(&gsi) = self.gsis.get(v as usize) else { return };
        if let Err(e) = lock(&self.router).set_msi(gsi, addr_lo, addr_hi, data) {
            tracing::warn!(vector = v, gsi, error = %e, "routing an MSI-X vector");
        }
    }

    fn set_masked(&mut self, v: u16, masked: bool) {
        let Some(&gsi) = self.gsis.get(v as usize) else { return };
        let mut r = lock(&self.router);
        let result = if masked { r.mask(gsi) } else { r.unmask(gsi).map(|_| ()) };
        if let Err(e) = result {
            tracing::warn!(vector = v, gsi, masked, error = %e, "masking an MSI-X vector");
        }
    }

    fn pending(&self, v: u16) -> bool {
        let Some(&gsi) = self.gsis.get(v as usize) else { return false };
        lock(&self.router).is_pending(gsi).unwrap_or(false)
    }

    fn clear_pending(&mut self, v: u16) {
        if self.pending(v) {
            if let Some(fd) = self.fds.get(v as usize) {
                // Non-blocking (the router's eventfds are EFD_NONBLOCK): drains the counter.
                let _ = fd.read();
            }
        }
    }
}

const ENTRY_SIZE: u64 = 16;
const CTRL_MASKED: u32 = 1;
/// Message Control bits of the capability.
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// The table (address low/high, data, vector control per entry), the control bits and the
/// masks last applied to the vectors.
pub struct MsixTable {
    entries: Vec<[u32; 4]>,
    enabled: bool,
    function_mask: bool,
    bus_master: bool,
    applied: Vec<Option<bool>>,
    vectors: Box<dyn MsiVectors>,
}

impl MsixTable {
    /// A table for every vector of `vectors`, in its reset state (all masked, MSI-X off).
    pub fn new(vectors: Box<dyn MsiVectors>) -> Self {
        let n = vectors.count() as usize;
        let mut t = MsixTable {
            entries: vec![[0, 0, 0, CTRL_MASKED]; n],
            enabled: false,
            function_mask: false,
            bus_master: false,
            applied: vec![None; n],
            vectors,
        };
        t.apply();
        t
    }

    pub fn count(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Power-on state: entries masked and zeroed, MSI-X off, pending bits dropped.
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = [0, 0, 0, CTRL_MASKED];
        }
        self.enabled = false;
        self.function_mask = false;
        self.apply();
        self.clear_pending();
    }

    /// Drops every held signal.
    pub fn clear_pending(&mut self) {
        for v in 0..self.count() {
            self.vectors.clear_pending(v);
        }
    }

    /// Message Control as the capability shows it.
    pub fn control(&self) -> u16 {
        let mut c = self.count().saturating_sub(1) & 0x7ff;
        if self.enabled {
            c |= MSIX_ENABLE;
        }
        if self.function_mask {
            c |= MSIX_FUNCTION_MASK;
        }
        c
    }

    pub fn set_control(&mut self, value: u16) {
        self.enabled = value & MSIX_ENABLE != 0;
        self.function_mask = value & MSIX_FUNCTION_MASK != 0;
        self.apply();
    }

    pub fn set_bus_master(&mut self, on: bool) {
        self.bus_master = on;
        self.apply();
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn masked(&self, v: usize) -> bool {
        !self.enabled || self.function_mask || !self.bus_master || self.entries[v][3] & CTRL_MASKED != 0
    }

    /// Pushes each vector's effective mask to the router where it changed.
    fn apply(&mut self) {
        for v in 0..self.entries.len() {
            let m = self.masked(v);
            if self.applied[v] != Some(m) {
                self.vectors.set_masked(v as u16, m);
                self.applied[v] = Some(m);
            }
        }
    }

    /// A dword of the table at byte `offset` into it (unaligned or out-of-range reads 0).
    pub fn read_table(&self, offset: u64) -> u32 {
        let (v, word) = ((offset / ENTRY_SIZE) as usize, ((offset % ENTRY_SIZE) / 4) as usize);
        match self.entries.get(v) {
            Some(e) if offset.is_multiple_of(4) => e[word],
            _ => 0,
        }
    }

    pub fn write_table(&mut self, offset: u64, value: u32) {
        let (v, word) = ((offset / ENTRY_SIZE) as usize, ((offset % ENTRY_SIZE) / 4) as usize);
        if !offset.is_multiple_of(4) || v >= self.entries.len() {
            return;
        }
        let old = self.entries[v];
        // Only the mask bit of Vector Control is writable.
        self.entries[v][word] = if word == 3 { value & CTRL_MASKED } else { value };
        let e = self.entries[v];
        if word < 3 && e != old {
            self.vectors.set_message(v as u16, e[0], e[1], e[2]);
        }
        self.apply();
    }

    /// A dword of the PBA at byte `offset` into it.
    pub fn read_pba(&self, offset: u64) -> u32 {
        if !offset.is_multiple_of(4) {
            return 0;
        }
        let first = offset * 8;
        (0..32u64)
            .filter(|b| {
                let v = first + b;
                (v as usize) < self.entries.len() && self.masked(v as usize) && self.vectors.pending(v as u16)
            })
            .fold(0, |acc, b| acc | 1 << b)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What the table asked of the interrupt side, and pending bits to report.
    #[derive(Default)]
    pub struct Record {
        pub messages: Vec<(u16, u32, u32, u32)>,
        pub masked: Vec<bool>,
        pub pending: Vec<bool>,
    }

    pub struct FakeVectors(pub Arc<Mutex<Record>>, pub u16);

    impl FakeVectors {
        pub fn new(n: u16) -> (Self, Arc<Mutex<Record>>) {
            let r = Arc::new(Mutex::new(Record {
                masked: vec![false; n as usize],
                pending: vec![false; n as usize],
                ..Default::default()
            }));
            (FakeVectors(r.clone(), n), r)
        }
    }

    impl MsiVectors for FakeVectors {
        fn count(&self) -> u16 {
            self.1
        }
        fn set_message(&mut self, v: u16, lo: u32, hi: u32, data: u32) {
            lock(&self.0).messages.push((v, lo, hi, data));
        }
        fn set_masked(&mut self, v: u16, masked: bool) {
            lock(&self.0).masked[v as usize] = masked;
        }
        fn pending(&self, v: u16) -> bool {
            lock(&self.0).pending[v as usize]
        }
        fn clear_pending(&mut self, v: u16) {
            lock(&self.0).pending[v as usize] = false;
        }
    }

    #[test]
    fn vectors_are_masked_until_enabled_unmasked_and_bus_master() {
        let (fake, rec) = FakeVectors::new(3);
        let mut t = MsixTable::new(Box::new(fake));
        assert_eq!(t.control(), 2, "table size - 1, off");
        assert_eq!(lock(&rec).masked, vec![true; 3]);
        t.write_table(16, 0xfee0_0000);
        t.write_table(20, 0);
        t.write_table(24, 0x41);
        assert_eq!(lock(&rec).messages.last(), Some(&(1, 0xfee0_0000, 0, 0x41)));
        assert_eq!(t.read_table(24), 0x41);
        t.write_table(28, 0xffff_fff0);
        assert_eq!(t.read_table(28), 0, "only the mask bit is writable");
        t.set_control(MSIX_ENABLE);
        assert_eq!(lock(&rec).masked, vec![true, true, true], "bus master is off");
        t.set_bus_master(true);
        assert_eq!(lock(&rec).masked, vec![true, false, true]);
        t.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert_eq!(t.control(), 2 | MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert_eq!(lock(&rec).masked, vec![true; 3], "function mask");
        t.set_control(MSIX_ENABLE);
        t.write_table(28, 1);
        assert!(lock(&rec).masked[1]);
        // Pending shows in the PBA only for masked vectors.
        lock(&rec).pending[1] = true;
        lock(&rec).pending[2] = true;
        assert_eq!(t.read_pba(0), 0b110);
        t.write_table(28, 0);
        assert_eq!(t.read_pba(0), 0b100);
        assert_eq!(t.read_pba(4), 0);
        t.reset();
        assert_eq!(t.control(), 2);
        assert_eq!(t.read_table(16), 0);
        assert_eq!(t.read_table(28), 1);
        assert_eq!(lock(&rec).pending, vec![false; 3], "reset clears the PBA");
        // Out of range and unaligned accesses are harmless.
        t.write_table(48, 5);
        t.write_table(2, 5);
        assert_eq!(t.read_table(48), 0);
        assert_eq!(t.read_table(2), 0);
    }
}
