//! Which virtio-net features netd offers, and what the negotiated ones mean for the host side:
//! the virtio-net header's length, and the offloads the tap may use towards the guest
//! (TUNSETOFFLOAD). Checksum and segmentation offloads are offered only when the host side
//! carries the header (a tap opened with IFF_VNET_HDR); a frame socket gets plain frames.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The largest frame (Ethernet header on, virtio-net header off) carried either way: a 64 KiB
/// GSO frame plus its headers, QEMU's `NET_BUFSIZE` less the header. Longer ones are dropped.
pub const MAX_FRAME: usize = 65550;
/// The virtio-net header with `num_buffers` (VERSION_1 or MRG_RXBUF).
pub const HDR_LEN: usize = 12;
/// The legacy header without `num_buffers`.
pub const HDR_LEN_LEGACY: usize = 10;

// linux/if_tun.h: TUNSETOFFLOAD flags.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// What the host side of a NIC can do with offloaded frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCaps {
    /// Frames carry a virtio-net header (a tap with IFF_VNET_HDR).
    pub vnet_hdr: bool,
    /// The tap accepts TUN_F_UFO (kernels between 4.14 and 4.19 refuse it).
    pub ufo: bool,
}

/// The virtio features offered for a NIC with `queue_pairs` pairs on a host side that can do
/// `caps`. The frontend adds VHOST_USER_F_PROTOCOL_FEATURES.
pub fn offered(caps: HostCaps, queue_pairs: u16) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX);
    if queue_pairs > 1 {
        f |= bit(VIRTIO_NET_F_MQ);
    }
    if caps.vnet_hdr {
        f |= bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN);
        if caps.ufo {
            f |= bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_GUEST_UFO);
        }
    }
    f
}

pub fn has(features: u64, b: u32) -> bool {
    features & bit(b) != 0
}

/// The virtio-net header's length with `features` negotiated (virtio 1.2 5.1.6: 12 bytes with
/// VERSION_1 or MRG_RXBUF, else 10).
pub fn header_len(features: u64) -> usize {
    if has(features, VIRTIO_F_VERSION_1) || has(features, VIRTIO_NET_F_MRG_RXBUF) {
        HDR_LEN
    } else {
        HDR_LEN_LEGACY
    }
}

/// TUNSETOFFLOAD's flags for the guest offloads negotiated: what the tap may hand netd for
/// the guest (partial checksums, TSO, UFO frames). None negotiated: plain frames only.
pub fn tun_offloads(features: u64) -> u32 {
    if !has(features, VIRTIO_NET_F_GUEST_CSUM) {
        // Segmentation offloads need checksum offload (virtio 1.2 5.1.3.1).
        return 0;
    }
    let mut o = TUN_F_CSUM;
    if has(features, VIRTIO_NET_F_GUEST_TSO4) {
        o |= TUN_F_TSO4;
    }
    if has(features, VIRTIO_NET_F_GUEST_TSO6) {
        o |= TUN_F_TSO6;
    }
    if has(features, VIRTIO_NET_F_GUEST_ECN) && o & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
        o |= TUN_F_TSO_ECN;
    }
    if has(features, VIRTIO_NET_F_GUEST_UFO) {
        o |= TUN_F_UFO;
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_offloads_without_a_vnet_header() {
        let f = offered(HostCaps { vnet_hdr: false, ufo: true }, 1);
        for b in [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_GUEST_UFO] {
            assert!(!has(f, b), "bit {b} offered to a frame socket");
        }
        assert!(has(f, VIRTIO_NET_F_MRG_RXBUF) && has(f, VIRTIO_NET_F_STATUS) && !has(f, VIRTIO_NET_F_MQ));
        let f = offered(HostCaps { vnet_hdr: true, ufo: false }, 4);
        assert!(has(f, VIRTIO_NET_F_HOST_TSO4) && has(f, VIRTIO_NET_F_MQ) && !has(f, VIRTIO_NET_F_HOST_UFO));
    }

    #[test]
    fn header_length_and_tap_offloads_follow_the_negotiation() {
        assert_eq!(header_len(bit(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(header_len(bit(VIRTIO_NET_F_MRG_RXBUF)), 12);
        assert_eq!(header_len(0), 10);
        assert_eq!(tun_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0, "TSO without checksum offload");
        let f = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(tun_offloads(f), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN);
    }
}
