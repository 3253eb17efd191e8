/*
 * Virtio PCI modern transport (virtio 1.2 section 4.1): capability walk, BAR mapping, MSI-X,
 * the initialisation sequence of section 3.1.1, and split virtqueues (section 2.7).
 */
#include "virtio.h"

/* Virtio PCI capability (vendor-specific, ID 0x09) */
#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_MSIX 0x11
#define VIRTIO_PCI_CAP_COMMON 1
#define VIRTIO_PCI_CAP_NOTIFY 2
#define VIRTIO_PCI_CAP_ISR 3
#define VIRTIO_PCI_CAP_DEVICE 4
#define PCI_COMMAND_INTX_DISABLE 0x400

/* Common configuration structure offsets */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0c
#define CC_MSIX_CONFIG 0x10
#define CC_NUM_QUEUES 0x12
#define CC_STATUS 0x14
#define CC_GENERATION 0x15
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_MSIX 0x1a
#define CC_Q_ENABLE 0x1c
#define CC_Q_NOFF 0x1e
#define CC_Q_DESC 0x20
#define CC_Q_DRIVER 0x28
#define CC_Q_DEVICE 0x30

#define RESET_TIMEOUT_US 1000000
#define MSI_ADDR_BASE 0xfee00000u
#define WAKE_MS 10

/* Ring memory per queue: one page each for the descriptor table (16 * 256 bytes), the
 * available ring (6 + 2 * 256) and the used ring (6 + 8 * 256). */
#define MAX_QUEUES 8
static u8 ring_pages[MAX_QUEUES][3][4096] __attribute__((aligned(4096)));
static u32 rings_used;

u32 virtio_pci_type(const struct pci_dev *p)
{
    if (p->vendor != VIRTIO_VENDOR)
        return 0;
    if (p->device >= 0x1040 && p->device <= 0x107f)
        return p->device - 0x1040;
    if (p->device >= 0x1000 && p->device <= 0x103f)
        return pci_read16(p, 0x2e);     /* transitional: the subsystem ID is the type */
    return 0;
}

static const char *type_name(u32 t)
{
    return t == VIRTIO_ID_BLOCK ? "blk" : t == VIRTIO_ID_BALLOON ? "balloon" : "other";
}

/* BAR n's address, without sizing it (so reading it disturbs nothing). */
static u64 bar_addr(const struct pci_dev *p, int n)
{
    if (n < 0 || n > 5)
        return 0;
    u32 lo = pci_read32(p, PCI_BAR0 + 4 * n);
    if (lo & 1)
        return lo & ~3u;
    u64 a = lo & ~0xfull;
    if (((lo >> 1) & 3) == 2 && n < 5)
        a |= (u64)pci_read32(p, PCI_BAR0 + 4 * (n + 1)) << 32;
    return a;
}

/* The first virtio capability of cfg_type; 0 if none. */
static u8 find_vcap(const struct pci_dev *p, u8 cfg_type)
{
    /* Bounded: a capability list that loops must not hang the guest. */
    u8 c = pci_find_cap(p, PCI_CAP_VENDOR, 0);
    for (int guard = 0; c && guard < 48; guard++, c = pci_find_cap(p, PCI_CAP_VENDOR, c))
        if (pci_read8(p, c + 3) == cfg_type && pci_read8(p, c + 4) <= 5)
            return c;
    return 0;
}

void virtio_report(void)
{
    struct pci_dev devs[64];
    int n = pci_scan_bus(0, devs, 64);
    for (int i = 0; i < n; i++) {
        u32 t = virtio_pci_type(&devs[i]);
        if (!t && devs[i].vendor != VIRTIO_VENDOR)
            continue;
        if (devs[i].vendor == VIRTIO_VENDOR && !(devs[i].device >= 0x1000 && devs[i].device <= 0x107f))
            continue;
        u8 c = find_vcap(&devs[i], VIRTIO_PCI_CAP_COMMON);
        u64 bar = c ? bar_addr(&devs[i], pci_read8(&devs[i], c + 4)) : 0;
        u8 m = pci_find_cap(&devs[i], PCI_CAP_MSIX, 0);
        u32 msix = m ? (pci_read16(&devs[i], m + 2) & 0x7ff) + 1 : 0;
        kprintf("VIRTIO %02x:%02x.%u type=%s devid=%u bar=0x%lx msix=%u\n", devs[i].bus, devs[i].dev, devs[i].fn,
                type_name(t), t, bar, msix);
    }
}

int virtio_find(u32 type, struct pci_dev *out)
{
    struct pci_dev devs[64];
    int n = pci_scan_bus(0, devs, 64);
    for (int i = 0; i < n; i++)
        if (virtio_pci_type(&devs[i]) == type) {
            *out = devs[i];
            return 0;
        }
    return -1;
}

/* Maps the region a virtio capability points at; returns its address, 0 on failure. */
static u64 map_vcap(const struct pci_dev *p, u8 cap, u64 *bar_out)
{
    u8 bar = pci_read8(p, cap + 4);
    u32 off = pci_read32(p, cap + 8), len = pci_read32(p, cap + 12);
    struct pci_bar b;
    pci_bar_probe(p, bar, &b);
    if (!b.addr || b.is_io || !b.size || (u64)off + len > b.size)
        return 0;
    if (map_mmio(b.addr, b.size))
        return 0;
    if (bar_out)
        *bar_out = b.addr;
    return b.addr + off;
}

static u8 cc8(const struct virtio_dev *vd, u32 o) { return mmio_read8(vd->common + o); }
static u16 cc16(const struct virtio_dev *vd, u32 o) { return mmio_read16(vd->common + o); }
static u32 cc32(const struct virtio_dev *vd, u32 o) { return mmio_read32(vd->common + o); }
static void cc_w8(const struct virtio_dev *vd, u32 o, u8 v) { mmio_write8(vd->common + o, v); }
static void cc_w16(const struct virtio_dev *vd, u32 o, u16 v) { mmio_write16(vd->common + o, v); }
static void cc_w32(const struct virtio_dev *vd, u32 o, u32 v) { mmio_write32(vd->common + o, v); }
static void cc_w64(const struct virtio_dev *vd, u32 o, u64 v)
{
    /* 64-bit fields are written as two 32-bit halves, low first (4.1.3.1). */
    cc_w32(vd, o, (u32)v);
    cc_w32(vd, o + 4, (u32)(v >> 32));
}

u8 virtio_status(const struct virtio_dev *vd) { return cc8(vd, CC_STATUS); }
u8 virtio_generation(const struct virtio_dev *vd) { return cc8(vd, CC_GENERATION); }

u8 virtio_cfg8(const struct virtio_dev *vd, u32 off) { return mmio_read8(vd->devcfg + off); }
u16 virtio_cfg16(const struct virtio_dev *vd, u32 off) { return mmio_read16(vd->devcfg + off); }
u32 virtio_cfg32(const struct virtio_dev *vd, u32 off) { return mmio_read32(vd->devcfg + off); }
u64 virtio_cfg64(const struct virtio_dev *vd, u32 off)
{
    /* Two 32-bit reads; callers check config_generation around them (4.1.3.1). */
    return virtio_cfg32(vd, off) | (u64)virtio_cfg32(vd, off + 4) << 32;
}
void virtio_cfg_write32(const struct virtio_dev *vd, u32 off, u32 v) { mmio_write32(vd->devcfg + off, v); }

void virtio_reset(struct virtio_dev *vd)
{
    cc_w8(vd, CC_STATUS, 0);
    /* The reset is done when status reads 0 again (4.1.4.3.2). */
    u64 end = tsc_deadline_us(RESET_TIMEOUT_US);
    while (cc8(vd, CC_STATUS) != 0 && !tsc_passed(end))
        pause();
    vd->ready = 0;
}

/* Programs MSI-X entry `entry` to send `vector` to this CPU, unmasked. */
static void msix_entry(const struct virtio_dev *vd, u16 entry, u8 vector)
{
    u64 e = vd->msix_table + 16ull * entry;
    mmio_write32(e + 0, MSI_ADDR_BASE | (lapic_id() & 0xff) << 12);
    mmio_write32(e + 4, 0);
    mmio_write32(e + 8, vector);        /* fixed delivery, edge */
    mmio_write32(e + 12, 0);            /* unmasked */
}

static int setup_msix(struct virtio_dev *vd)
{
    const struct pci_dev *p = &vd->pci;
    u8 m = pci_find_cap(p, PCI_CAP_MSIX, 0);
    vd->msix_size = 0;
    if (!m)
        return 0;
    u16 ctrl = pci_read16(p, m + 2);
    u32 table = pci_read32(p, m + 4);
    struct pci_bar b;
    pci_bar_probe(p, table & 7, &b);
    u64 off = table & ~7u;
    u16 size = (ctrl & 0x7ff) + 1;
    if (!b.addr || b.is_io || off + 16ull * size > b.size || map_mmio(b.addr, b.size))
        return -1;
    vd->msix_table = b.addr + off;
    vd->msix_size = size;
    /* Mask every entry until it is programmed, then enable MSI-X with the function unmasked. */
    for (u16 i = 0; i < size; i++)
        mmio_write32(vd->msix_table + 16ull * i + 12, 1);
    pci_write16(p, m + 2, (ctrl & ~0x4000) | 0x8000);
    return 0;
}

int virtio_init(struct virtio_dev *vd, const struct pci_dev *p, u64 wanted, u8 config_vector, const char *who)
{
    memset(vd, 0, sizeof(*vd));
    vd->pci = *p;
    vd->type = virtio_pci_type(p);
    u8 c_common = find_vcap(p, VIRTIO_PCI_CAP_COMMON), c_notify = find_vcap(p, VIRTIO_PCI_CAP_NOTIFY);
    u8 c_isr = find_vcap(p, VIRTIO_PCI_CAP_ISR), c_dev = find_vcap(p, VIRTIO_PCI_CAP_DEVICE);
    if (!c_common || !c_notify || !c_isr || !c_dev) {
        kprintf("ERR %s no-modern-caps common=%u notify=%u isr=%u device=%u\n", who, c_common, c_notify, c_isr,
                c_dev);
        return -1;
    }
    /* Memory decoding off while the BARs are sized, on (with bus mastering) afterwards;
     * INTx off: the guest uses MSI-X or polls. */
    vd->common = map_vcap(p, c_common, &vd->cfg_bar);
    vd->notify_base = map_vcap(p, c_notify, 0);
    vd->isr = map_vcap(p, c_isr, 0);
    vd->devcfg = map_vcap(p, c_dev, 0);
    if (!vd->common || !vd->notify_base || !vd->isr || !vd->devcfg) {
        kprintf("ERR %s bar-unmapped bar=0x%lx\n", who, bar_addr(p, pci_read8(p, c_common + 4)));
        return -1;
    }
    vd->notify_mult = pci_read32(p, c_notify + 16);
    pci_enable(p, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE);
    if (setup_msix(vd)) {
        kprintf("ERR %s msix-table-unmapped\n", who);
        return -1;
    }

    /* The wake-up that bounds every sleeping wait (virtq_idle) and lets the command loop see
     * config changes of devices without MSI-X. */
    lapic_timer_periodic(WAKE_MS);

    virtio_reset(vd);
    if (cc8(vd, CC_STATUS) != 0) {
        kprintf("ERR timeout %s reset status=0x%x\n", who, cc8(vd, CC_STATUS));
        return -1;
    }
    cc_w8(vd, CC_STATUS, VIRTIO_STATUS_ACK);
    cc_w8(vd, CC_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER);
    cc_w32(vd, CC_DFSELECT, 0);
    u64 offered = cc32(vd, CC_DF);
    cc_w32(vd, CC_DFSELECT, 1);
    offered |= (u64)cc32(vd, CC_DF) << 32;
    vd->offered = offered;
    if (!(offered & (1ull << VIRTIO_F_VERSION_1))) {
        kprintf("ERR %s no-version-1 offered=0x%lx\n", who, offered);
        cc_w8(vd, CC_STATUS, VIRTIO_STATUS_FAILED);
        return -1;
    }
    u64 feat = offered & (wanted | (1ull << VIRTIO_F_VERSION_1));
    cc_w32(vd, CC_GFSELECT, 0);
    cc_w32(vd, CC_GF, (u32)feat);
    cc_w32(vd, CC_GFSELECT, 1);
    cc_w32(vd, CC_GF, (u32)(feat >> 32));
    cc_w8(vd, CC_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(cc8(vd, CC_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
        kprintf("ERR %s features-refused offered=0x%lx asked=0x%lx\n", who, offered, feat);
        cc_w8(vd, CC_STATUS, VIRTIO_STATUS_FAILED);
        return -1;
    }
    vd->features = feat;
    vd->num_queues = cc16(vd, CC_NUM_QUEUES);

    vd->config_vector = 0;
    if (vd->msix_size && config_vector) {
        msix_entry(vd, 0, config_vector);
        cc_w16(vd, CC_MSIX_CONFIG, 0);
        if (cc16(vd, CC_MSIX_CONFIG) == 0)
            vd->config_vector = config_vector;
        else
            kprintf("WARN %s msix config vector refused\n", who);
    }
    return 0;
}

int virtq_init(struct virtio_dev *vd, struct virtq *q, u16 index, u8 vector, const char *who)
{
    memset(q, 0, sizeof(*q));
    q->vd = vd;
    q->index = index;
    if (index >= vd->num_queues) {
        kprintf("ERR %s queue %u missing num_queues=%u\n", who, index, vd->num_queues);
        return -1;
    }
    cc_w16(vd, CC_Q_SELECT, index);
    u16 max = cc16(vd, CC_Q_SIZE);
    if (max == 0 || cc16(vd, CC_Q_ENABLE)) {
        kprintf("ERR %s queue %u unavailable size=%u\n", who, index, max);
        return -1;
    }
    /* The largest power of two within both the device's maximum and VIRTQ_MAX. */
    u16 size = VIRTQ_MAX;
    while (size > max)
        size >>= 1;
    q->size = size;
    cc_w16(vd, CC_Q_SIZE, size);
    /* Rings are reused by a re-initialised device (same index within the same driver):
     * allocate a slot per (device, queue) once. */
    static struct {
        struct virtio_dev *vd;
        u16 index;
    } owners[MAX_QUEUES];
    u32 slot = rings_used;
    for (u32 i = 0; i < rings_used; i++)
        if (owners[i].vd == vd && owners[i].index == index)
            slot = i;
    if (slot == rings_used) {
        if (rings_used >= MAX_QUEUES) {
            kprintf("ERR %s out of ring memory\n", who);
            return -1;
        }
        owners[slot].vd = vd;
        owners[slot].index = index;
        rings_used++;
    }
    memset(ring_pages[slot], 0, sizeof(ring_pages[slot]));
    q->desc = (volatile struct vring_desc *)ring_pages[slot][0];
    q->avail = (volatile u16 *)ring_pages[slot][1];
    q->used = (volatile u16 *)ring_pages[slot][2];
    for (u16 i = 0; i < size; i++)
        q->free[i] = i;
    q->nfree = size;
    q->free_head = 0;
    q->event_idx = virtio_has(vd, VIRTIO_RING_F_EVENT_IDX);

    q->vector = 0;
    if (vector && vd->msix_size > 1u + index) {
        msix_entry(vd, 1 + index, vector);
        cc_w16(vd, CC_Q_MSIX, 1 + index);
        if (cc16(vd, CC_Q_MSIX) == 1 + index)
            q->vector = vector;
        else
            kprintf("WARN %s queue %u msix vector refused\n", who, index);
    } else {
        cc_w16(vd, CC_Q_MSIX, VIRTIO_NO_VECTOR);
    }
    cc_w64(vd, CC_Q_DESC, (u64)q->desc);
    cc_w64(vd, CC_Q_DRIVER, (u64)q->avail);
    cc_w64(vd, CC_Q_DEVICE, (u64)q->used);
    q->notify = vd->notify_base + (u64)cc16(vd, CC_Q_NOFF) * vd->notify_mult;
    cc_w16(vd, CC_Q_ENABLE, 1);
    return 0;
}

void virtio_driver_ok(struct virtio_dev *vd)
{
    cc_w8(vd, CC_STATUS,
          VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
    vd->ready = 1;
}

int virtq_alloc(struct virtq *q, int n, u16 *ids)
{
    if (n <= 0 || n > VIRTQ_MAX_CHAIN || n > q->nfree)
        return -1;
    for (int i = 0; i < n; i++) {
        ids[i] = q->free[q->free_head];
        q->free_head = (q->free_head + 1) % q->size;
        q->nfree--;
    }
    return 0;
}

void virtq_publish(struct virtq *q, const u16 *ids, int n)
{
    u16 head = ids[0];
    q->chain_len[head] = n;
    for (int i = 0; i < n; i++)
        q->chain[head][i] = ids[i];
    q->inflight[head] = 1;
    q->done[head] = 0;
    q->avail[2 + (q->avail_idx % q->size)] = head;
    /* The ring entry (and the descriptors) before the index the device reads (2.7.13.3);
     * x86 keeps stores in order, the compiler must too. */
    barrier();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    barrier();
}

int virtq_add(struct virtq *q, const struct vbuf *bufs, int n)
{
    u16 ids[VIRTQ_MAX_CHAIN];
    if (virtq_alloc(q, n, ids))
        return -1;
    for (int i = 0; i < n; i++) {
        volatile struct vring_desc *d = &q->desc[ids[i]];
        d->addr = bufs[i].addr;
        d->len = bufs[i].len;
        d->flags = (bufs[i].write ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0);
        d->next = i + 1 < n ? ids[i + 1] : 0;
    }
    virtq_publish(q, ids, n);
    return ids[0];
}

/* The used ring's avail_event (EVENT_IDX): right after the ring's `size` elements. */
static u16 avail_event(const struct virtq *q) { return q->used[2 + 4 * q->size]; }

/* virtio 1.2 section 2.7.10.1 (Linux's vring_need_event): whether the device asked to be
 * notified when the available index moves from old to new. */
static int vring_need_event(u16 event, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

void virtq_kick(struct virtq *q)
{
    u16 old = q->kicked_idx, new_idx = q->avail_idx;
    q->kicked_idx = new_idx;
    /* The published index before reading what the device asked for (a store then a load:
     * only mfence orders them), and before the notify (an uncached MMIO write). */
    __asm__ volatile("mfence" ::: "memory");
    int need = q->event_idx ? vring_need_event(avail_event(q), new_idx, old)
                            : !(q->used[0] & VRING_USED_F_NO_NOTIFY);
    if (!need) {
        q->kicks_skipped++;
        return;
    }
    q->kicks++;
    mmio_write16(q->notify, q->index);
}

int virtq_has_used(const struct virtq *q) { return q->size && q->used[1] != q->last_used; }

int virtq_reap_one(struct virtq *q, int *head)
{
    if (q->used[1] == q->last_used)
        return 0;
    /* The entry after the index that published it (2.7.14). */
    barrier();
    volatile struct vring_used_elem *ring = (volatile struct vring_used_elem *)(q->used + 2);
    volatile struct vring_used_elem *e = &ring[q->last_used % q->size];
    u32 id = e->id, len = e->len;
    q->last_used++;
    *head = -1;
    if (id >= q->size || !q->inflight[id]) {
        q->stray++;
        return 1;
    }
    q->inflight[id] = 0;
    q->done[id] = 1;
    q->done_len[id] = len;
    q->completed++;
    for (int i = 0; i < q->chain_len[id]; i++)
        q->free[(q->free_head + q->nfree++) % q->size] = q->chain[id][i];
    q->chain_len[id] = 0;
    *head = (int)id;
    return 1;
}

int virtq_reap(struct virtq *q)
{
    int n = 0, head;
    /* At most one ring's worth per call, whatever index a device writes. */
    while (n < q->size && virtq_reap_one(q, &head))
        n++;
    return n;
}

/*
 * Sleeps until the device may have used something on q. With a queue vector the CPU halts
 * (an MSI wakes it; the periodic LAPIC timer started by virtio_init bounds the sleep), so a
 * waiting guest costs the host nothing: spinning with `pause` was measured 7x slower on
 * kvm_pvm, where PAUSE and the polling exit. Without a vector, one pause. Interrupts are on
 * at return (callers run from the command loop, with interrupts on).
 */
int virtq_arm(struct virtq *q)
{
    if (q->event_idx) {
        /* Interrupt at the next used entry (2.7.10): used_event, then a fresh look at the
         * used index (a store then a load: mfence), so an entry used in between is seen. */
        q->avail[2 + q->size] = q->last_used;
        __asm__ volatile("mfence" ::: "memory");
    }
    return virtq_has_used(q);
}

void virtq_idle(struct virtq *q)
{
    cli();
    if (virtq_arm(q)) {
        sti();
        return;
    }
    if (q->vector) {
        sti_hlt();
    } else {
        sti();
        pause();
    }
}

int virtq_wait(struct virtq *q, int head, u64 timeout_us, u32 *len)
{
    u64 end = tsc_deadline_us(timeout_us);
    for (;;) {
        virtq_reap(q);
        if (q->done[head]) {
            if (len)
                *len = q->done_len[head];
            return 0;
        }
        if (tsc_passed(end))
            return -1;
        virtq_idle(q);
    }
}

u64 ram_top(void)
{
    u64 top = 0;
    for (u32 i = 0; i < bootinfo.n_memmap; i++)
        if (bootinfo.memmap[i].type == 1 && bootinfo.memmap[i].addr + bootinfo.memmap[i].size > top)
            top = bootinfo.memmap[i].addr + bootinfo.memmap[i].size;
    return top;
}

/* True if [a, a + 1 GiB) overlaps a memory map entry or a memory BAR of a bus-0 function. */
static int window_used(u64 a)
{
    const u64 len = 1ull << 30;
    for (u32 i = 0; i < bootinfo.n_memmap; i++) {
        const struct memmap_entry *e = &bootinfo.memmap[i];
        if (e->addr < a + len && a < e->addr + e->size)
            return 1;
    }
    struct pci_dev devs[64];
    int n = pci_scan_bus(0, devs, 64);
    for (int i = 0; i < n; i++) {
        if (devs[i].header_type != 0)
            continue;
        for (int b = 0; b < 6; b++) {
            u32 lo = pci_read32(&devs[i], PCI_BAR0 + 4 * b);
            if (lo & 1)
                continue;
            u64 addr = bar_addr(&devs[i], b);
            int is64 = ((lo >> 1) & 3) == 2;
            /* BAR sizes are not needed: a BAR never spans a whole GiB here; compare
             * generously by its GiB. */
            if (addr && (addr >> 30) == (a >> 30))
                return 1;
            if (is64)
                b++;
        }
    }
    return 0;
}

u64 unbacked_address(void)
{
    u64 a = ram_top() > (1ull << 32) ? ram_top() : (1ull << 32);
    a = (a + (1ull << 30) - 1) & ~((1ull << 30) - 1);
    for (int i = 0; i < 64 && window_used(a); i++)
        a += 1ull << 30;
    return a + 0x1000;
}
