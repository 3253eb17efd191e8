//! The COMMON_CFG structure (virtio 1.2 4.1.4.3) as a plain state machine: register reads and
//! writes in, [`StatusChange`]s out for the transport to act on. No I/O, so it is tested alone.

use super::{features, status, QueueConfig, NO_VECTOR};

/// Register offsets inside COMMON_CFG.
pub mod off {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX: u64 = 0x10;
    pub const NUMQ: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const CFGGENERATION: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOFF: u64 = 0x1e;
    pub const Q_DESCLO: u64 = 0x20;
    pub const Q_DESCHI: u64 = 0x24;
    pub const Q_AVAILLO: u64 = 0x28;
    pub const Q_AVAILHI: u64 = 0x2c;
    pub const Q_USEDLO: u64 = 0x30;
    pub const Q_USEDHI: u64 = 0x34;
    pub const Q_NDATA: u64 = 0x38;
    pub const Q_RESET: u64 = 0x3a;
}

/// One queue's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub size: u16,
    pub vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        QueueState { size: max_size, vector: NO_VECTOR, enabled: false, desc: 0, avail: 0, used: 0 }
    }
}

/// What a status write asks of the transport, in the order it must happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// 0 was written: the device resets.
    Reset,
    /// FEATURES_OK was accepted with these driver features.
    FeaturesOk(u64),
    /// DRIVER_OK was set.
    DriverOk,
    /// DRIVER_OK was cleared without a reset.
    DriverOkCleared,
}

/// COMMON_CFG's state.
#[derive(Debug, Clone)]
pub struct CommonCfg {
    num_queues: u16,
    max_queue_size: u16,
    nvectors: u16,
    dfselect: u32,
    gfselect: u32,
    driver_features: u64,
    status: u8,
    msix_config: u16,
    queue_select: u16,
    queues: Vec<QueueState>,
}

impl CommonCfg {
    pub fn new(num_queues: u16, max_queue_size: u16, nvectors: u16) -> Self {
        CommonCfg {
            num_queues,
            max_queue_size,
            nvectors,
            dfselect: 0,
            gfselect: 0,
            driver_features: 0,
            status: 0,
            msix_config: NO_VECTOR,
            queue_select: 0,
            queues: vec![QueueState::new(max_queue_size); num_queues as usize],
        }
    }

    /// Back to the state after reset (every register, every queue).
    pub fn reset(&mut self) {
        *self = CommonCfg::new(self.num_queues, self.max_queue_size, self.nvectors);
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn msix_config(&self) -> u16 {
        self.msix_config
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn queue(&self, index: u16) -> Option<&QueueState> {
        self.queues.get(index as usize)
    }

    /// The enabled queues, as the model starts them.
    pub fn enabled_queues(&self) -> Vec<QueueConfig> {
        self.queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(i, q)| QueueConfig {
                index: i as u16,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                vector: q.vector,
            })
            .collect()
    }

    /// Clears DRIVER_OK (the transport stopped the device, e.g. bus-master went off).
    pub fn clear_driver_ok(&mut self) {
        self.status &= !status::DRIVER_OK;
    }

    fn selected(&self) -> Option<&QueueState> {
        self.queues.get(self.queue_select as usize)
    }

    fn selected_mut(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// The register at `offset`; `offered` is the feature set the device offers, `generation`
    /// the current config generation. Offsets that start no field read 0.
    pub fn read(&self, offset: u64, offered: u64, generation: u8) -> u32 {
        let q = self.selected();
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match offset {
            off::DFSELECT => self.dfselect,
            off::DF => match self.dfselect {
                0 => lo(offered),
                1 => hi(offered),
                _ => 0,
            },
            off::GFSELECT => self.gfselect,
            off::GF => match self.gfselect {
                0 => lo(self.driver_features),
                1 => hi(self.driver_features),
                _ => 0,
            },
            off::MSIX => self.msix_config.into(),
            off::NUMQ => self.num_queues.into(),
            off::STATUS => self.status.into(),
            off::CFGGENERATION => generation.into(),
            off::Q_SELECT => self.queue_select.into(),
            off::Q_SIZE => q.map_or(0, |q| q.size.into()),
            off::Q_MSIX => q.map_or(NO_VECTOR.into(), |q| q.vector.into()),
            off::Q_ENABLE => q.map_or(0, |q| q.enabled.into()),
            // queue_notify_off is the queue's index, as in QEMU (notify at index * multiplier).
            off::Q_NOFF => q.map_or(0, |_| self.queue_select.into()),
            off::Q_DESCLO => q.map_or(0, |q| lo(q.desc)),
            off::Q_DESCHI => q.map_or(0, |q| hi(q.desc)),
            off::Q_AVAILLO => q.map_or(0, |q| lo(q.avail)),
            off::Q_AVAILHI => q.map_or(0, |q| hi(q.avail)),
            off::Q_USEDLO => q.map_or(0, |q| lo(q.used)),
            off::Q_USEDHI => q.map_or(0, |q| hi(q.used)),
            _ => 0,
        }
    }

    /// Writes `value` to the register at `offset`; returns what the transport must do.
    pub fn write(&mut self, offset: u64, value: u32, offered: u64) -> Vec<StatusChange> {
        let vector = |v: u32, n: u16| if v < u32::from(n) { v as u16 } else { NO_VECTOR };
        let set_lo = |f: &mut u64, v: u32| *f = (*f & !0xffff_ffff) | u64::from(v);
        let set_hi = |f: &mut u64, v: u32| *f = (*f & 0xffff_ffff) | (u64::from(v) << 32);
        let max = self.max_queue_size;
        let nvectors = self.nvectors;
        match offset {
            off::DFSELECT => self.dfselect = value,
            off::GFSELECT => self.gfselect = value,
            off::GF => match self.gfselect {
                0 => set_lo(&mut self.driver_features, value),
                1 => set_hi(&mut self.driver_features, value),
                _ => {}
            },
            off::MSIX => self.msix_config = vector(value, nvectors),
            off::STATUS => return self.write_status(value as u8, offered),
            off::Q_SELECT => self.queue_select = value as u16,
            off::Q_MSIX => {
                if let Some(q) = self.selected_mut() {
                    q.vector = vector(value, nvectors);
                }
            }
            off::Q_SIZE | off::Q_ENABLE | off::Q_DESCLO..=off::Q_USEDHI => {
                let Some(q) = self.selected_mut().filter(|q| !q.enabled) else {
                    // Nothing selected, or the queue is live: its layout is frozen.
                    return Vec::new();
                };
                match offset {
                    off::Q_SIZE => {
                        let v = value as u16;
                        if v != 0 && v <= max && v.is_power_of_two() {
                            q.size = v;
                        }
                    }
                    // Only 1 is defined (0 needs VIRTIO_F_RING_RESET, not offered).
                    off::Q_ENABLE => q.enabled = value == 1,
                    off::Q_DESCLO => set_lo(&mut q.desc, value),
                    off::Q_DESCHI => set_hi(&mut q.desc, value),
                    off::Q_AVAILLO => set_lo(&mut q.avail, value),
                    off::Q_AVAILHI => set_hi(&mut q.avail, value),
                    off::Q_USEDLO => set_lo(&mut q.used, value),
                    off::Q_USEDHI => set_hi(&mut q.used, value),
                    _ => {}
                }
            }
            // DF, NUMQ, CFGGENERATION, Q_NOFF, Q_NDATA are read-only; Q_RESET is not offered.
            _ => {}
        }
        Vec::new()
    }

    fn write_status(&mut self, value: u8, offered: u64) -> Vec<StatusChange> {
        if value == 0 {
            self.reset();
            return vec![StatusChange::Reset];
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET is the device's to set.
        let mut new = value & !status::DEVICE_NEEDS_RESET;
        let mut out = Vec::new();
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let f = self.driver_features;
            if f & !offered == 0 && f & features::VERSION_1 != 0 {
                out.push(StatusChange::FeaturesOk(f));
            } else {
                tracing::debug!(
                    driver = format_args!("{f:#x}"),
                    offered = format_args!("{offered:#x}"),
                    "FEATURES_OK refused"
                );
                new &= !status::FEATURES_OK;
            }
        }
        if old & status::FEATURES_OK != 0 && new & status::FEATURES_OK == 0 {
            // FEATURES_OK cannot be taken back without a reset.
            new |= status::FEATURES_OK;
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                new &= !status::DRIVER_OK;
            } else {
                out.push(StatusChange::DriverOk);
            }
        } else if old & status::DRIVER_OK != 0 && new & status::DRIVER_OK == 0 {
            out.push(StatusChange::DriverOkCleared);
        }
        self.status = new;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: u64 = features::VERSION_1 | features::RING_EVENT_IDX | 1 << 9;

    fn driver_init(c: &mut CommonCfg, feats: u64) -> Vec<StatusChange> {
        assert!(c.write(off::STATUS, 1, OFFER).is_empty());
        assert!(c.write(off::STATUS, 3, OFFER).is_empty());
        c.write(off::GFSELECT, 0, OFFER);
        c.write(off::GF, feats as u32, OFFER);
        c.write(off::GFSELECT, 1, OFFER);
        c.write(off::GF, (feats >> 32) as u32, OFFER);
        c.write(off::STATUS, 0xb, OFFER)
    }

    #[test]
    fn device_features_are_read_in_two_halves() {
        let mut c = CommonCfg::new(2, 256, 3);
        assert_eq!(c.read(off::DF, OFFER, 0), (1 << 29) | (1 << 9));
        c.write(off::DFSELECT, 1, OFFER);
        assert_eq!(c.read(off::DFSELECT, OFFER, 0), 1);
        assert_eq!(c.read(off::DF, OFFER, 0), 1, "VERSION_1 is bit 0 of the high half");
        c.write(off::DFSELECT, 2, OFFER);
        assert_eq!(c.read(off::DF, OFFER, 0), 0);
        assert_eq!(c.read(off::NUMQ, OFFER, 0), 2);
        assert_eq!(c.read(off::CFGGENERATION, OFFER, 7), 7);
        c.write(off::NUMQ, 9, OFFER);
        assert_eq!(c.read(off::NUMQ, OFFER, 0), 2, "read-only");
    }

    #[test]
    fn features_ok_needs_a_subset_of_the_offer_with_version_1() {
        let mut c = CommonCfg::new(1, 256, 2);
        assert_eq!(driver_init(&mut c, 1 << 9), Vec::new(), "no VERSION_1");
        assert_eq!(c.status() & status::FEATURES_OK, 0);
        let mut c = CommonCfg::new(1, 256, 2);
        assert_eq!(driver_init(&mut c, features::VERSION_1 | 1 << 10), Vec::new(), "bit 10 not offered");
        assert_eq!(c.status(), 3);
        let mut c = CommonCfg::new(1, 256, 2);
        let f = features::VERSION_1 | 1 << 9;
        assert_eq!(driver_init(&mut c, f), vec![StatusChange::FeaturesOk(f)]);
        assert_eq!(c.status(), 0xb);
        assert_eq!(c.driver_features(), f);
        c.write(off::GFSELECT, 0, OFFER);
        assert_eq!(c.read(off::GF, OFFER, 0), 1 << 9);
        // FEATURES_OK stays once accepted.
        assert!(c.write(off::STATUS, 3, OFFER).is_empty());
        assert_eq!(c.status(), 0xb);
    }

    #[test]
    fn queue_registers_follow_qemu() {
        let mut c = CommonCfg::new(2, 256, 3);
        c.write(off::Q_SELECT, 1, OFFER);
        assert_eq!(c.read(off::Q_SIZE, OFFER, 0), 256, "max size until the driver shrinks it");
        assert_eq!(c.read(off::Q_NOFF, OFFER, 0), 1, "notify offset = queue index");
        assert_eq!(c.read(off::Q_MSIX, OFFER, 0), u32::from(NO_VECTOR));
        c.write(off::Q_SIZE, 100, OFFER);
        c.write(off::Q_SIZE, 512, OFFER);
        c.write(off::Q_SIZE, 0, OFFER);
        assert_eq!(c.read(off::Q_SIZE, OFFER, 0), 256, "not a power of two, too large, zero: ignored");
        c.write(off::Q_SIZE, 64, OFFER);
        assert_eq!(c.read(off::Q_SIZE, OFFER, 0), 64);
        c.write(off::Q_MSIX, 2, OFFER);
        assert_eq!(c.read(off::Q_MSIX, OFFER, 0), 2);
        c.write(off::Q_MSIX, 3, OFFER);
        assert_eq!(c.read(off::Q_MSIX, OFFER, 0), u32::from(NO_VECTOR), "no such vector");
        c.write(off::Q_MSIX, 1, OFFER);
        c.write(off::MSIX, 0, OFFER);
        assert_eq!(c.msix_config(), 0);
        c.write(off::MSIX, 40, OFFER);
        assert_eq!(c.msix_config(), NO_VECTOR);
        c.write(off::Q_DESCLO, 0x1000, OFFER);
        c.write(off::Q_DESCHI, 0x1, OFFER);
        c.write(off::Q_AVAILLO, 0x2000, OFFER);
        c.write(off::Q_USEDLO, 0x3000, OFFER);
        assert_eq!(c.read(off::Q_DESCHI, OFFER, 0), 1);
        c.write(off::Q_ENABLE, 0, OFFER);
        assert_eq!(c.read(off::Q_ENABLE, OFFER, 0), 0);
        c.write(off::Q_ENABLE, 1, OFFER);
        assert_eq!(c.read(off::Q_ENABLE, OFFER, 0), 1);
        c.write(off::Q_SIZE, 32, OFFER);
        c.write(off::Q_DESCLO, 0x5000, OFFER);
        assert_eq!(c.read(off::Q_SIZE, OFFER, 0), 64, "frozen while enabled");
        assert_eq!(
            c.enabled_queues(),
            vec![QueueConfig { index: 1, size: 64, desc: 0x1_0000_1000, avail: 0x2000, used: 0x3000, vector: 1 }]
        );
        // Out-of-range selection: reads 0, writes dropped.
        c.write(off::Q_SELECT, 5, OFFER);
        assert_eq!(c.read(off::Q_SIZE, OFFER, 0), 0);
        assert_eq!(c.read(off::Q_NOFF, OFFER, 0), 0);
        c.write(off::Q_ENABLE, 1, OFFER);
        assert_eq!(c.enabled_queues().len(), 1);
    }

    #[test]
    fn driver_ok_and_reset() {
        let mut c = CommonCfg::new(1, 256, 2);
        // DRIVER_OK without FEATURES_OK is not taken.
        assert!(c.write(off::STATUS, 7, OFFER).is_empty());
        assert_eq!(c.status(), 3);
        let f = features::VERSION_1;
        assert_eq!(driver_init(&mut c, f), vec![StatusChange::FeaturesOk(f)]);
        c.write(off::Q_ENABLE, 1, OFFER);
        assert_eq!(c.write(off::STATUS, 0xf, OFFER), vec![StatusChange::DriverOk]);
        assert_eq!(c.write(off::STATUS, 0xf, OFFER), vec![], "already live");
        assert_eq!(c.write(off::STATUS, u32::from(0xf | status::DEVICE_NEEDS_RESET), OFFER), vec![]);
        assert_eq!(c.status(), 0xf, "NEEDS_RESET is the device's bit");
        assert_eq!(c.write(off::STATUS, 0x8b, OFFER), vec![StatusChange::DriverOkCleared]);
        assert_eq!(c.write(off::STATUS, 0, OFFER), vec![StatusChange::Reset]);
        assert_eq!(c.status(), 0);
        assert_eq!(c.driver_features(), 0);
        assert_eq!(c.queue(0).map(|q| q.enabled), Some(false));
        assert_eq!(c.msix_config(), NO_VECTOR);
        // FEATURES_OK and DRIVER_OK in one write: both, in order.
        c.write(off::GF, 0, OFFER);
        c.write(off::GFSELECT, 1, OFFER);
        c.write(off::GF, 1, OFFER);
        assert_eq!(c.write(off::STATUS, 0xf, OFFER), vec![StatusChange::FeaturesOk(f), StatusChange::DriverOk]);
    }
}
