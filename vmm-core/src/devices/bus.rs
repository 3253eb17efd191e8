//! Address-range dispatch for port I/O and MMIO exits, and [`MmioWindow`]: a range of the
//! fixed bus whose contents change at run time (PCI BARs that the guest moves).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on the I/O or MMIO bus; `offset` is relative to the range it was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct OverlapError {
    pub base: u64,
    pub len: u64,
}

#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), OverlapError> {
        let end = base + len;
        let clash = self.ranges.range(..end).next_back().is_some_and(|(b, (l, _))| b + l > base);
        if clash || len == 0 {
            return Err(OverlapError { base, len });
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    /// Removes the device inserted at `base`; returns whether there was one.
    pub fn remove(&mut self, base: u64) -> bool {
        self.ranges.remove(&base).is_some()
    }

    /// The device covering `addr` and the offset into its range (a clone of its handle, so the
    /// caller can drop any lock around the bus before locking the device).
    pub fn lookup(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        self.find(addr).map(|(off, dev)| (off, dev.clone()))
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr < base + len).then_some((addr - base, dev))
    }

    /// Returns false when nothing is mapped at `addr` (reads then see all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                lock(dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                lock(dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// A window of the fixed bus (the 32-bit PCI MMIO aperture) whose devices come and go while
/// vCPUs run: BARs are inserted at absolute addresses and moved when the guest reprograms them.
///
/// Lock order: a device may update the window while holding its own lock (a BAR write), so the
/// dispatch path clones the device handle under the window's read lock and releases it before
/// locking the device.
#[derive(Clone)]
pub struct MmioWindow {
    base: u64,
    len: u64,
    inner: Arc<RwLock<Bus>>,
}

impl MmioWindow {
    pub fn new(base: u64, len: u64) -> Self {
        MmioWindow { base, len, inner: Arc::new(RwLock::new(Bus::default())) }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `[addr, addr + len)` lies inside the window.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base && addr.checked_add(len).is_some_and(|end| end <= self.base + self.len)
    }

    /// Maps `dev` at absolute address `addr` (inside the window, not overlapping another).
    pub fn insert(&self, addr: u64, len: u64, dev: SharedDevice) -> Result<(), OverlapError> {
        if !self.contains(addr, len) {
            return Err(OverlapError { base: addr, len });
        }
        self.inner.write().unwrap_or_else(|e| e.into_inner()).insert(addr, len, dev)
    }

    pub fn remove(&self, addr: u64) -> bool {
        self.inner.write().unwrap_or_else(|e| e.into_inner()).remove(addr)
    }

    /// Unmaps everything (machine teardown: devices hold the window, the window holds them).
    pub fn clear(&self) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Bus::default();
    }

    fn lookup(&self, offset: u64) -> Option<(u64, SharedDevice)> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).lookup(self.base + offset)
    }
}

impl BusDevice for MmioWindow {
    // Inserted on the fixed bus at `base`, so `offset` is relative to it.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.lookup(offset) {
            Some((off, dev)) => lock(&dev).read(off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((off, dev)) = self.lookup(offset) {
            lock(&dev).write(off, data);
        }
    }
}

/// A device mutex is only poisoned if a device panicked; keep serving with its state as is.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = self.0 + offset as u8;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Reg(1)))).expect("insert");
        assert!(bus.insert(0x12, 4, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(0x0e, 4, Arc::new(Mutex::new(Reg(0)))).is_err());
        bus.insert(0x14, 1, Arc::new(Mutex::new(Reg(9)))).expect("adjacent");
        let mut b = [0u8];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x10, &[7]));
        assert!(bus.read(0x10, &mut b));
        assert_eq!(b[0], 7);
        assert!(!bus.read(0x20, &mut b));
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn a_window_maps_and_moves_devices_at_run_time() {
        let mut fixed = Bus::default();
        let window = MmioWindow::new(0x1000, 0x1000);
        fixed.insert(0x1000, 0x1000, Arc::new(Mutex::new(window.clone()))).expect("window");
        let dev: SharedDevice = Arc::new(Mutex::new(Reg(5)));
        assert!(window.insert(0x0800, 0x10, dev.clone()).is_err(), "outside the window");
        assert!(window.insert(0x1ff8, 0x10, dev.clone()).is_err(), "runs past the window");
        window.insert(0x1100, 0x10, dev.clone()).expect("insert");
        let mut b = [0u8];
        assert!(fixed.read(0x1102, &mut b));
        assert_eq!(b[0], 7, "offset is relative to the device's range");
        assert!(window.remove(0x1100));
        assert!(!window.remove(0x1100));
        fixed.read(0x1102, &mut b);
        assert_eq!(b[0], 0xff, "nothing mapped any more");
        window.insert(0x1200, 0x10, dev).expect("moved");
        fixed.read(0x1200, &mut b);
        assert_eq!(b[0], 5);
    }
}
