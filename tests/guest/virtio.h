/*
 * Virtio over PCI, modern interface only (virtio 1.2 section 4.1), and split virtqueues
 * (section 2.7). The drivers (virtio_blk.c, virtio_balloon.c) build on these.
 *
 * Every wait is bounded by the TSC: a device that never answers gives an error, not a hang.
 * Buffers are identity mapped (guest-virtual == guest-physical below 4 GiB), so a pointer is
 * its own DMA address.
 */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include "guest.h"
#include "pci.h"

#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_BALLOON 5

/* Device status bits */
#define VIRTIO_STATUS_ACK 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33

/* The device's "do not kick me" flag in the used ring (without EVENT_IDX). */
#define VRING_USED_F_NO_NOTIFY 1

/* Split virtqueue layout */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct vring_used_elem {
    u32 id;
    u32 len;
};

#define VIRTQ_MAX 256           /* largest queue size the guest uses (it asks for no more) */
#define VIRTQ_MAX_CHAIN 20      /* descriptors one chain may hold */
#define VIRTIO_NO_VECTOR 0xffff

struct virtio_dev;

struct virtq {
    struct virtio_dev *vd;
    u16 index, size;
    volatile struct vring_desc *desc;
    volatile u16 *avail;        /* flags, idx, ring[size], used_event */
    volatile u16 *used;         /* flags, idx, then vring_used_elem[size] */
    u64 notify;                 /* address of this queue's notify register */
    u16 avail_idx, last_used;
    u16 kicked_idx;             /* avail_idx at the last virtq_kick (EVENT_IDX's "old") */
    int event_idx;              /* VIRTIO_RING_F_EVENT_IDX negotiated */
    u8 vector;                  /* CPU vector its MSI-X entry sends (0: none) */
    /* Free descriptors (a FIFO, so a freed descriptor is reused as late as possible and a
     * used entry repeated by a faulty device is more likely to name a chain not in flight)
     * and, per chain head, the descriptors of that chain: chains are freed from this record,
     * never by following `next` (a hostile device cannot change it, and a looping chain the
     * guest built on purpose frees cleanly). */
    u16 free[VIRTQ_MAX];
    u16 nfree, free_head;       /* free[free_head .. free_head + nfree) (mod size) */
    u8 chain_len[VIRTQ_MAX];
    u16 chain[VIRTQ_MAX][VIRTQ_MAX_CHAIN];
    u8 inflight[VIRTQ_MAX];
    u8 done[VIRTQ_MAX];
    u32 done_len[VIRTQ_MAX];
    u64 completed, stray;       /* used entries taken / ones naming no chain in flight */
    u64 kicks, kicks_skipped;   /* notifies written / left out because the device said so */
};

struct virtio_dev {
    struct pci_dev pci;
    u32 type;                   /* virtio device ID (2 block, 5 balloon) */
    u64 common, notify_base, isr, devcfg;
    u32 notify_mult;
    u64 cfg_bar;                /* physical address of the BAR holding the common config */
    u16 msix_size;              /* MSI-X table entries, 0 without MSI-X */
    u64 msix_table;
    u8 config_vector;           /* CPU vector of config-change interrupts (0: none) */
    u64 offered, features;      /* device features, negotiated features */
    u16 num_queues;             /* the common config's num_queues */
    int ready;
};

/* A buffer of one request: address, length, device-writable or not. */
struct vbuf {
    u64 addr;
    u32 len;
    int write;
};

/* Type of a virtio PCI function (its device ID), 0 if it is not one. */
u32 virtio_pci_type(const struct pci_dev *p);
/* Prints one VIRTIO line per virtio function on bus 0 (the `virtio` command). */
void virtio_report(void);
/* Finds the first virtio function of `type` on bus 0; 0 on success. */
int virtio_find(u32 type, struct pci_dev *out);

/*
 * Brings a device from reset to FEATURES_OK: maps its capabilities, enables memory space and
 * bus mastering, programs MSI-X (entry 0 -> config_vector, entry 1 + q -> queue q's vector),
 * negotiates `wanted & offered` plus VERSION_1. Returns 0, or -1 after printing
 * `ERR <who> <why>`.
 */
int virtio_init(struct virtio_dev *vd, const struct pci_dev *p, u64 wanted, u8 config_vector, const char *who);
/* Sets up queue `index` with the given MSI-X vector (0: none); 0 on success, else prints ERR. */
int virtq_init(struct virtio_dev *vd, struct virtq *q, u16 index, u8 vector, const char *who);
/* Sets DRIVER_OK. */
void virtio_driver_ok(struct virtio_dev *vd);
/* Resets the device (bounded wait for status 0). */
void virtio_reset(struct virtio_dev *vd);
u8 virtio_status(const struct virtio_dev *vd);
u8 virtio_generation(const struct virtio_dev *vd);
static inline int virtio_has(const struct virtio_dev *vd, int bit) { return (vd->features >> bit) & 1; }

/* Device config space accessors (offsets into the device-specific configuration). */
u8 virtio_cfg8(const struct virtio_dev *vd, u32 off);
u16 virtio_cfg16(const struct virtio_dev *vd, u32 off);
u32 virtio_cfg32(const struct virtio_dev *vd, u32 off);
u64 virtio_cfg64(const struct virtio_dev *vd, u32 off);
void virtio_cfg_write32(const struct virtio_dev *vd, u32 off, u32 v);

/* Adds a chain of n buffers; returns its head, or -1 when descriptors are short. Does not
 * notify the device (virtq_kick does). */
int virtq_add(struct virtq *q, const struct vbuf *bufs, int n);
/* For hand-built (possibly invalid) chains: takes n free descriptors, their indexes in ids. */
int virtq_alloc(struct virtq *q, int n, u16 *ids);
/* Makes the chain whose descriptors are ids[0..n) (head ids[0]) available. */
void virtq_publish(struct virtq *q, const u16 *ids, int n);
/* Notifies the device of what was published since the last kick, unless it said it needs
 * no notify: with EVENT_IDX when vring_need_event(avail_event, new, old) is false, without it
 * while the used ring's VRING_USED_F_NO_NOTIFY is set (2.7.10). */
void virtq_kick(struct virtq *q);
/* Takes every new used entry (at most a ring's worth); returns how many. */
int virtq_reap(struct virtq *q);
/* Takes the next used entry, if any (returns 1): *head is the chain it completed, or -1 when
 * it named no chain in flight (counted in `stray`: e.g. a completion repeated). */
int virtq_reap_one(struct virtq *q, int *head);
/* Asks for an interrupt at the next used entry (with EVENT_IDX: used_event = last_used; without,
 * the device interrupts anyway), then returns whether there are used entries already. */
int virtq_arm(struct virtq *q);
/* Sleeps (briefly, bounded) until the device may have used something on q; with EVENT_IDX
 * it first asks for an interrupt at the next used entry (used_event = last_used). */
void virtq_idle(struct virtq *q);
/* Waits (bounded) until the chain at `head` is used; 0 and its used length, or -1. */
int virtq_wait(struct virtq *q, int head, u64 timeout_us, u32 *len);
/* Whether the device has put new entries in the used ring. */
int virtq_has_used(const struct virtq *q);

/* The guest's RAM bounds as the drivers need them. */
u64 ram_top(void);              /* end of the highest RAM entry */
/* A physical address that is neither RAM nor a BAR of a bus-0 function, above 4 GiB. */
u64 unbacked_address(void);

/* virtio_blk.c / virtio_balloon.c: command handlers and the command loop's hooks. */
int blk_command(int argc, char **argv, const char *orig);
int balloon_command(int argc, char **argv, const char *orig);
/* Whether a driver has something to do (checked with interrupts off before sleeping). */
int blk_pending(void);
int balloon_pending(void);
void blk_poll(void);
void balloon_poll(void);

#endif
