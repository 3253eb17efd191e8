//! The virtio-balloon configuration space (virtio 1.2 section 5.5.4) and the arithmetic that
//! turns a QMP `balloon` target into `num_pages`.
//!
//! Layout (little-endian): `num_pages` (le32, offset 0, written by the device: how many pages
//! the host wants in the balloon) and `actual` (le32, offset 4, written by the driver: how many
//! pages it holds). `free_page_hint_cmd_id` and `poison_val` follow only with features we do
//! not offer, so — as QEMU's `virtio_balloon_config_size` — the space is 8 bytes; reads past it
//! answer zero and writes past it are ignored.

/// The balloon's page size: PFNs and both config fields count 4 KiB pages whatever the guest's
/// own page size (VIRTIO_BALLOON_PFN_SHIFT).
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Bytes of config space we implement.
pub const CONFIG_LEN: usize = 8;
const ACTUAL_OFFSET: usize = 4;

/// The device's view of the config space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Pages the host asks the guest to give up.
    pub num_pages: u32,
    /// Pages the guest reports holding.
    pub actual: u32,
}

impl BalloonConfig {
    pub fn to_bytes(self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        b[4..8].copy_from_slice(&self.actual.to_le_bytes());
        b
    }

    /// GET_CONFIG: `size` bytes from `offset`; bytes past the space read as zero.
    pub fn read(self, offset: u32, size: u32) -> Vec<u8> {
        let b = self.to_bytes();
        (u64::from(offset)..u64::from(offset) + u64::from(size))
            .map(|i| usize::try_from(i).ok().and_then(|i| b.get(i)).copied().unwrap_or(0))
            .collect()
    }

    /// SET_CONFIG from the driver. Only `actual` is the driver's to write; bytes landing on
    /// `num_pages` or past the space are ignored, as a device ignores writes to read-only
    /// fields. A partial write of `actual` replaces just those bytes. Returns the new value of
    /// `actual`.
    pub fn write(&mut self, offset: u32, buf: &[u8]) -> u32 {
        let mut actual = self.actual.to_le_bytes();
        for (i, byte) in buf.iter().enumerate() {
            let at = u64::from(offset) + i as u64;
            if let Some(slot) = at
                .checked_sub(ACTUAL_OFFSET as u64)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| actual.get_mut(i))
            {
                *slot = *byte;
            }
        }
        self.actual = u32::from_le_bytes(actual);
        self.actual
    }
}

/// Why a `balloon` target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// QEMU: "Parameter 'target' expects a size" for a target of zero or less.
    #[error("the balloon target must be a positive size")]
    NotPositive,
}

/// `num_pages` for a QMP target of `target` bytes of guest RAM (not of balloon): as QEMU's
/// `virtio_balloon_to_target`, a target above the RAM size means an empty balloon, and the
/// difference is rounded down to whole pages (so the guest keeps at least the target).
/// A difference too large for le32 asks for the most pages the field can express.
pub fn num_pages_for_target(mem_bytes: u64, target: i64) -> Result<u32, TargetError> {
    let target = u64::try_from(target).ok().filter(|&t| t > 0).ok_or(TargetError::NotPositive)?;
    let pages = (mem_bytes - target.min(mem_bytes)) >> PAGE_SHIFT;
    Ok(u32::try_from(pages).unwrap_or(u32::MAX))
}

/// query-balloon's `actual` and BALLOON_CHANGE's `actual`: guest RAM less the balloon, in bytes.
pub fn actual_bytes(mem_bytes: u64, actual_pages: u32) -> i64 {
    let held = u64::from(actual_pages) << PAGE_SHIFT;
    i64::try_from(mem_bytes.saturating_sub(held)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn target_to_num_pages_as_qemu() {
        // The 7.2 transcript: 256 MiB guest, target 192 MiB -> 64 MiB of balloon.
        assert_eq!(num_pages_for_target(256 * MIB, 201326592), Ok(16384));
        // The whole RAM or more: empty balloon.
        assert_eq!(num_pages_for_target(256 * MIB, (256 * MIB) as i64), Ok(0));
        assert_eq!(num_pages_for_target(256 * MIB, i64::MAX), Ok(0));
        // Not page aligned: the difference rounds down (the guest keeps at least the target).
        assert_eq!(num_pages_for_target(256 * MIB, (192 * MIB + 1) as i64), Ok(16383));
        assert_eq!(num_pages_for_target(256 * MIB, (192 * MIB - 1) as i64), Ok(16384));
        // The smallest target: all but one page... rounded down.
        assert_eq!(num_pages_for_target(256 * MIB, 1), Ok(65535));
        // Zero and negative: refused.
        assert_eq!(num_pages_for_target(256 * MIB, 0), Err(TargetError::NotPositive));
        assert_eq!(num_pages_for_target(256 * MIB, -4096), Err(TargetError::NotPositive));
        // 32 TiB of RAM, target 1 byte: more pages than le32 holds.
        assert_eq!(num_pages_for_target(32 << 40, 1), Ok(u32::MAX));
    }

    #[test]
    fn actual_bytes_is_ram_less_balloon() {
        assert_eq!(actual_bytes(256 * MIB, 0), (256 * MIB) as i64);
        assert_eq!(actual_bytes(256 * MIB, 16384), 201326592);
        // A guest claiming more than the RAM: never negative.
        assert_eq!(actual_bytes(256 * MIB, u32::MAX), 0);
    }

    #[test]
    fn config_reads_le32_fields_and_zero_past_the_end() {
        let c = BalloonConfig { num_pages: 0x0102_0304, actual: 0x0a0b_0c0d };
        assert_eq!(c.read(0, 8), vec![4, 3, 2, 1, 0x0d, 0x0c, 0x0b, 0x0a]);
        assert_eq!(c.read(4, 4), vec![0x0d, 0x0c, 0x0b, 0x0a]);
        assert_eq!(c.read(6, 4), vec![0x0b, 0x0a, 0, 0]);
        assert_eq!(c.read(100, 2), vec![0, 0]);
        assert_eq!(c.read(u32::MAX, 2), vec![0, 0]);
    }

    #[test]
    fn config_writes_only_actual() {
        let mut c = BalloonConfig { num_pages: 7, actual: 0 };
        assert_eq!(c.write(4, &100u32.to_le_bytes()), 100);
        // The whole space written: num_pages stays the device's.
        let mut all = [0xffu8; 8];
        all[4..8].copy_from_slice(&5u32.to_le_bytes());
        assert_eq!(c.write(0, &all), 5);
        assert_eq!(c.num_pages, 7);
        // A partial write of actual's high bytes.
        assert_eq!(c.write(6, &[1, 0]), 0x1_0005);
        // Past the end: ignored.
        assert_eq!(c.write(8, &[9; 8]), 0x1_0005);
        assert_eq!(c.write(u32::MAX, &[9; 8]), 0x1_0005);
        assert_eq!(c, BalloonConfig { num_pages: 7, actual: 0x1_0005 });
    }
}
