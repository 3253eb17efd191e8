//! The virtio-net header (`struct virtio_net_hdr_v1`, little-endian) at the front of every
//! frame a driver sends and every buffer it receives: what a transmitted one may claim given
//! the negotiated features, and `num_buffers` of a merged receive.

use virtio_bindings::virtio_net::*;

use crate::features::has;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("{got} bytes, shorter than the {want}-byte virtio-net header")]
    Truncated { got: usize, want: usize },
    #[error("checksum offload asked for (flags {0:#x}) but VIRTIO_NET_F_CSUM not negotiated")]
    Csum(u8),
    #[error("GSO type {0:#x} not negotiated")]
    Gso(u8),
    #[error("GSO without checksum offload (flags {0:#x})")]
    GsoWithoutCsum(u8),
    #[error("checksum at {start}+{offset} outside a {len}-byte frame")]
    CsumOutside { start: u16, offset: u16, len: usize },
}

impl NetHdr {
    /// The fields of the header at the front of `bytes` (`hdr_len` bytes long).
    pub fn parse(bytes: &[u8], hdr_len: usize) -> Result<NetHdr, HeaderError> {
        if bytes.len() < hdr_len || hdr_len < 10 {
            return Err(HeaderError::Truncated { got: bytes.len(), want: hdr_len });
        }
        let le16 = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        Ok(NetHdr {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
        })
    }

    /// Whether a transmitted frame of `frame_len` bytes (after the header) may carry this
    /// header with `features` negotiated: offloads the driver did not negotiate, or a checksum
    /// position outside the frame, are refused (the kernel would refuse or mis-handle them).
    pub fn check_tx(&self, features: u64, frame_len: usize) -> Result<(), HeaderError> {
        let needs_csum = u32::from(self.flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        if needs_csum {
            if !has(features, VIRTIO_NET_F_CSUM) {
                return Err(HeaderError::Csum(self.flags));
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(HeaderError::CsumOutside { start: self.csum_start, offset: self.csum_offset, len: frame_len });
            }
        }
        let gso = u32::from(self.gso_type) & !VIRTIO_NET_HDR_GSO_ECN;
        if gso == VIRTIO_NET_HDR_GSO_NONE {
            return Ok(());
        }
        let feature = match gso {
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            _ => return Err(HeaderError::Gso(self.gso_type)),
        };
        if !has(features, feature) {
            return Err(HeaderError::Gso(self.gso_type));
        }
        if u32::from(self.gso_type) & VIRTIO_NET_HDR_GSO_ECN != 0 && !has(features, VIRTIO_NET_F_HOST_ECN) {
            return Err(HeaderError::Gso(self.gso_type));
        }
        if !needs_csum {
            return Err(HeaderError::GsoWithoutCsum(self.flags));
        }
        Ok(())
    }
}

/// Where `num_buffers` (le16) sits in a 12-byte receive header.
pub const NUM_BUFFERS_AT: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

    fn hdr(flags: u8, gso: u8, start: u16, off: u16) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[0] = flags;
        h[1] = gso;
        h[4..6].copy_from_slice(&1448u16.to_le_bytes());
        h[6..8].copy_from_slice(&start.to_le_bytes());
        h[8..10].copy_from_slice(&off.to_le_bytes());
        h
    }

    #[test]
    fn truncated_headers_are_refused() {
        assert_eq!(NetHdr::parse(&[0u8; 11], 12), Err(HeaderError::Truncated { got: 11, want: 12 }));
        assert!(NetHdr::parse(&[0u8; 10], 10).is_ok());
    }

    #[test]
    fn offloads_must_have_been_negotiated() {
        let v1 = 1u64 << VIRTIO_F_VERSION_1;
        let csum = v1 | 1 << VIRTIO_NET_F_CSUM;
        let tso = csum | 1 << VIRTIO_NET_F_HOST_TSO4;
        let plain = NetHdr::parse(&hdr(0, 0, 0, 0), 12).unwrap();
        assert_eq!(plain.check_tx(v1, 60), Ok(()));
        let partial = NetHdr::parse(&hdr(1, 0, 34, 16), 12).unwrap();
        assert_eq!(partial.check_tx(v1, 60), Err(HeaderError::Csum(1)));
        assert_eq!(partial.check_tx(csum, 60), Ok(()));
        assert!(matches!(partial.check_tx(csum, 40), Err(HeaderError::CsumOutside { .. })));
        let gso = NetHdr::parse(&hdr(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 34, 16), 12).unwrap();
        assert_eq!(gso.check_tx(csum, 9000), Err(HeaderError::Gso(1)));
        assert_eq!(gso.check_tx(tso, 9000), Ok(()));
        let gso_no_csum = NetHdr::parse(&hdr(0, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 0, 0), 12).unwrap();
        assert_eq!(gso_no_csum.check_tx(tso, 9000), Err(HeaderError::GsoWithoutCsum(0)));
        let ecn = NetHdr::parse(&hdr(1, (VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN) as u8, 34, 16), 12).unwrap();
        assert!(ecn.check_tx(tso, 9000).is_err());
        let bogus = NetHdr::parse(&hdr(1, 9, 34, 16), 12).unwrap();
        assert_eq!(bogus.check_tx(tso, 9000), Err(HeaderError::Gso(9)));
    }
}
