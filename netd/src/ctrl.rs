//! The control queue's commands (virtio 1.2 5.1.6.5): what each is acked with and what it
//! changes. Served: MQ's VQ_PAIRS_SET (the guest picks how many queue pairs it uses); RX mode
//! commands (promiscuous, all-multicast, ...) and the MAC filter table are acked without
//! filtering (a tap or slirp sees every frame anyway, as QEMU's tap does in promiscuous mode);
//! ANNOUNCE_ACK is acked. Anything else, or a command whose feature was not negotiated,
//! answers VIRTIO_NET_ERR.

use virtio_bindings::virtio_net::*;

use crate::features::has;

/// What a command changes besides its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Use this many queue pairs from now on.
    SetPairs(u16),
}

// Classes and commands missing from virtio-bindings' list.
const CTRL_MAC: u8 = 1;
const CTRL_ANNOUNCE: u8 = 3;

/// The ack (VIRTIO_NET_OK / VIRTIO_NET_ERR) and effect of one command: `req` is the readable
/// part of the chain (class, command, data).
pub fn handle(req: &[u8], features: u64, max_pairs: u16) -> (u8, Effect) {
    const OK: u8 = VIRTIO_NET_OK as u8;
    const ERR: u8 = VIRTIO_NET_ERR as u8;
    let (Some(&class), Some(&cmd)) = (req.first(), req.get(1)) else { return (ERR, Effect::None) };
    let data = &req[2..];
    match class {
        c if u32::from(c) == VIRTIO_NET_CTRL_RX => {
            // PROMISC, ALLMULTI, ALLUNI, NOMULTI, NOUNI, NOBCAST: one byte on/off. 0 and 1
            // need CTRL_RX; the others CTRL_RX_EXTRA, which is not offered.
            if has(features, VIRTIO_NET_F_CTRL_RX) && cmd <= 1 && data.len() == 1 {
                (OK, Effect::None)
            } else {
                (ERR, Effect::None)
            }
        }
        CTRL_MAC => {
            // MAC_TABLE_SET (0): two tables, each le32 entries then 6 bytes an entry. Checked
            // for shape, not applied.
            if has(features, VIRTIO_NET_F_CTRL_RX) && cmd == 0 && mac_tables_well_formed(data) {
                (OK, Effect::None)
            } else {
                (ERR, Effect::None)
            }
        }
        CTRL_ANNOUNCE => (if cmd == 0 { OK } else { ERR }, Effect::None),
        c if u32::from(c) == VIRTIO_NET_CTRL_MQ => {
            if !has(features, VIRTIO_NET_F_MQ) || u32::from(cmd) != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET || data.len() != 2 {
                return (ERR, Effect::None);
            }
            let pairs = u16::from_le_bytes([data[0], data[1]]);
            if pairs == 0 || pairs > max_pairs {
                return (ERR, Effect::None);
            }
            (OK, Effect::SetPairs(pairs))
        }
        _ => (ERR, Effect::None),
    }
}

fn mac_tables_well_formed(mut data: &[u8]) -> bool {
    for _ in 0..2 {
        let Some(count) = data.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize) else {
            return false;
        };
        let Some(len) = count.checked_mul(6).and_then(|l| l.checked_add(4)) else { return false };
        let Some(rest) = data.get(len..) else { return false };
        data = rest;
    }
    data.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = 1 << VIRTIO_NET_F_CTRL_RX | 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CTRL_VQ;

    #[test]
    fn queue_pairs_within_the_maximum() {
        let set = |n: u16| {
            let mut r = vec![VIRTIO_NET_CTRL_MQ as u8, 0];
            r.extend_from_slice(&n.to_le_bytes());
            r
        };
        assert_eq!(handle(&set(2), ALL, 4), (0, Effect::SetPairs(2)));
        assert_eq!(handle(&set(4), ALL, 4), (0, Effect::SetPairs(4)));
        assert_eq!(handle(&set(5), ALL, 4), (1, Effect::None));
        assert_eq!(handle(&set(0), ALL, 4), (1, Effect::None));
        assert_eq!(handle(&set(2), ALL & !(1 << VIRTIO_NET_F_MQ), 4), (1, Effect::None), "MQ not negotiated");
        assert_eq!(handle(&set(2)[..3], ALL, 4), (1, Effect::None), "short data");
    }

    #[test]
    fn rx_mode_and_mac_table_acked() {
        assert_eq!(handle(&[0, 0, 1], ALL, 1), (0, Effect::None), "promisc on");
        assert_eq!(handle(&[0, 1, 0], ALL, 1), (0, Effect::None), "allmulti off");
        assert_eq!(handle(&[0, 2, 0], ALL, 1), (1, Effect::None), "CTRL_RX_EXTRA not offered");
        assert_eq!(handle(&[0, 0, 1], 0, 1), (1, Effect::None), "CTRL_RX not negotiated");
        let mut t = vec![1, 0];
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        t.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(handle(&t, ALL, 1), (0, Effect::None));
        assert_eq!(handle(&t[..t.len() - 1], ALL, 1), (1, Effect::None), "truncated table");
        let mut huge = vec![1, 0];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(handle(&huge, ALL, 1), (1, Effect::None));
    }

    #[test]
    fn unknown_and_short_commands_fail() {
        assert_eq!(handle(&[], ALL, 1).0, 1);
        assert_eq!(handle(&[0], ALL, 1).0, 1);
        assert_eq!(handle(&[2, 0, 0, 0], ALL, 1).0, 1, "VLAN not offered");
        assert_eq!(handle(&[9, 9], ALL, 1).0, 1);
        assert_eq!(handle(&[3, 0], ALL, 1).0, 0, "announce ack");
    }
}
