/*
 * virtio-balloon driver (virtio 1.2 section 5.5) for `balloon`, `balloonstats`, `touch`,
 * `touchcheck` and `balloonbad` (PROTOCOL.md).
 *
 * The balloon's pages come from a pool the guest never uses otherwise: the largest RAM region
 * below 4 GiB, above the guest image. The balloon grows from the pool's top down (a stack), so
 * the pages in it are always [pool_hi - count * 4 KiB, pool_hi) and no per-page record is kept.
 * The command loop follows the device: after `balloon` and on every config change it inflates
 * or deflates towards num_pages, writes `actual`, and prints BALLOONED.
 */
#include "virtio.h"

#define VIRTIO_BALLOON_F_MUST_TELL_HOST 0
#define VIRTIO_BALLOON_F_STATS_VQ 1
#define VIRTIO_BALLOON_F_DEFLATE_ON_OOM 2

#define CFG_NUM_PAGES 0
#define CFG_ACTUAL 4

#define Q_INFLATE 0
#define Q_DEFLATE 1
#define Q_STATS 2

#define BALLOON_CONFIG_VECTOR 0x42
#define BALLOON_INFLATE_VECTOR 0x43
#define BALLOON_DEFLATE_VECTOR 0x44
#define BALLOON_STATS_VECTOR 0x45

#define PAGE 4096ull
#define PFNS_PER_BUF 256        /* as Linux (VIRTIO_BALLOON_ARRAY_PFNS_MAX) */
#define BUFS_IN_FLIGHT 8
#define BATCH_TIMEOUT_US 10000000ull
#define BAD_TIMEOUT_US 2000000ull
#define TOUCH_MAGIC 0x70c4ed0000000000ull

enum { STAT_SWAP_IN, STAT_SWAP_OUT, STAT_MAJFLT, STAT_MINFLT, STAT_MEMFREE, STAT_MEMTOT, N_STATS };
struct stat {
    u16 tag;
    u64 val;
} PACKED;

static struct virtio_dev vd;
static struct virtq inflq, deflq, statq;
static int inited, broken, have_stats;
static u64 pool_lo, pool_hi;    /* page-aligned, [pool_lo, pool_hi) */
static u64 count;               /* pages in the balloon */
static u32 target, warned_target;
static u64 seen_config_irqs;
static u64 stats_sent;
static int stats_head = -1;
static struct stat stats[N_STATS];
static u32 pfns[BUFS_IN_FLIGHT][PFNS_PER_BUF] __attribute__((aligned(4096)));
static u64 touch_lo, touch_hi;

extern char __image_end[];

static u64 pool_pages(void) { return (pool_hi - pool_lo) / PAGE; }
static u64 balloon_floor(void) { return pool_hi - count * PAGE; }      /* lowest ballooned page */

static void find_pool(void)
{
    /* Above the image (its bss included), with 1 MiB to spare, page aligned. */
    u64 image_end = (((u64)__image_end + PAGE - 1) & ~(PAGE - 1)) + (1ull << 20);
    pool_lo = pool_hi = 0;
    for (u32 i = 0; i < bootinfo.n_memmap; i++) {
        const struct memmap_entry *e = &bootinfo.memmap[i];
        if (e->type != 1)
            continue;
        u64 lo = (e->addr + PAGE - 1) & ~(PAGE - 1), hi = (e->addr + e->size) & ~(PAGE - 1);
        if (hi > (1ull << 32))
            hi = 1ull << 32;    /* only the identity-mapped 4 GiB */
        if (lo < image_end)
            lo = image_end;
        if (hi > lo && hi - lo > pool_hi - pool_lo) {
            pool_lo = lo;
            pool_hi = hi;
        }
    }
}

static u64 mem_total(void)
{
    u64 t = 0;
    for (u32 i = 0; i < bootinfo.n_memmap; i++)
        if (bootinfo.memmap[i].type == 1)
            t += bootinfo.memmap[i].size;
    return t;
}

static void stats_fill(void)
{
    static const u16 tags[N_STATS] = {0, 1, 2, 3, 4, 5};
    for (int i = 0; i < N_STATS; i++)
        stats[i].tag = tags[i];
    stats[STAT_SWAP_IN].val = 0;
    stats[STAT_SWAP_OUT].val = 0;
    stats[STAT_MAJFLT].val = 0;
    stats[STAT_MINFLT].val = stats_sent;
    stats[STAT_MEMFREE].val = (pool_pages() - count) * PAGE;
    stats[STAT_MEMTOT].val = mem_total();
}

/* Puts the one stats buffer (back) on the stats queue (5.5.6.3). */
static void stats_post(void)
{
    stats_fill();
    struct vbuf b = {(u64)stats, sizeof(stats), 0};
    stats_head = virtq_add(&statq, &b, 1);
    if (stats_head >= 0) {
        stats_sent++;
        virtq_kick(&statq);
    }
}

static int balloon_init(void)
{
    struct pci_dev p;
    if (virtio_find(VIRTIO_ID_BALLOON, &p)) {
        kprintf("ERR balloon no-device\n");
        return -1;
    }
    u64 want = 1ull << VIRTIO_BALLOON_F_MUST_TELL_HOST | 1ull << VIRTIO_BALLOON_F_STATS_VQ |
               1ull << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
    if (virtio_init(&vd, &p, want, BALLOON_CONFIG_VECTOR, "balloon"))
        return -1;
    if (virtq_init(&vd, &inflq, Q_INFLATE, BALLOON_INFLATE_VECTOR, "balloon") ||
        virtq_init(&vd, &deflq, Q_DEFLATE, BALLOON_DEFLATE_VECTOR, "balloon"))
        return -1;
    have_stats = virtio_has(&vd, VIRTIO_BALLOON_F_STATS_VQ);
    if (have_stats && virtq_init(&vd, &statq, Q_STATS, BALLOON_STATS_VECTOR, "balloon"))
        return -1;
    virtio_driver_ok(&vd);
    find_pool();
    count = 0;
    broken = 0;
    seen_config_irqs = vector_total(BALLOON_CONFIG_VECTOR);
    target = virtio_cfg32(&vd, CFG_NUM_PAGES);
    if (have_stats)
        stats_post();
    inited = 1;
    return 0;
}

/* Posts up to BUFS_IN_FLIGHT buffers of PFNs [first, first + n) (PFN indexes counted from the
 * pool's top down) on q, then waits for all of them. 0 on success. */
static int move_pages(struct virtq *vq, u64 first, u64 n, const char *what)
{
    int heads[BUFS_IN_FLIGHT];
    int nb = 0;
    u64 top_pfn = pool_hi / PAGE - 1;
    for (u64 done = 0; done < n && nb < BUFS_IN_FLIGHT; nb++) {
        u32 k = n - done < PFNS_PER_BUF ? (u32)(n - done) : PFNS_PER_BUF;
        for (u32 i = 0; i < k; i++)
            pfns[nb][i] = (u32)(top_pfn - (first + done + i));
        struct vbuf b = {(u64)pfns[nb], 4 * k, 0};
        heads[nb] = virtq_add(vq, &b, 1);
        if (heads[nb] < 0) {
            kprintf("ERR balloon %s no-descriptors\n", what);
            return -1;
        }
        done += k;
    }
    virtq_kick(vq);
    for (int i = 0; i < nb; i++)
        if (virtq_wait(vq, heads[i], BATCH_TIMEOUT_US, 0)) {
            kprintf("ERR timeout balloon %s\n", what);
            return -1;
        }
    return 0;
}

/* Inflates or deflates to the device's target (within the pool), then reports. */
static void follow(void)
{
    u64 goal = target;
    if (goal > pool_pages()) {
        if (warned_target != target)
            kprintf("WARN balloon target=%u beyond the pool: stopping at %lu pages\n", target, pool_pages());
        warned_target = target;
        goal = pool_pages();
    }
    if (goal == count)
        return;
    while (count < goal) {
        u64 n = goal - count;
        if (n > (u64)PFNS_PER_BUF * BUFS_IN_FLIGHT)
            n = (u64)PFNS_PER_BUF * BUFS_IN_FLIGHT;
        if (move_pages(&inflq, count, n, "inflate")) {
            broken = 1;
            return;
        }
        count += n;
    }
    while (count > goal) {
        u64 n = count - goal;
        if (n > (u64)PFNS_PER_BUF * BUFS_IN_FLIGHT)
            n = (u64)PFNS_PER_BUF * BUFS_IN_FLIGHT;
        /* The most recently inflated pages; with MUST_TELL_HOST nothing touches them before the
         * device has used the buffer (move_pages waits), and the guest waits without it too. */
        if (move_pages(&deflq, count - n, n, "deflate")) {
            broken = 1;
            return;
        }
        count -= n;
    }
    virtio_cfg_write32(&vd, CFG_ACTUAL, (u32)count);
    kprintf("BALLOONED actual=%lu\n", count);
}

int balloon_pending(void)
{
    if (!inited || broken || !vd.ready)
        return 0;
    if (have_stats && virtq_has_used(&statq))
        return 1;
    if (vd.config_vector)
        return vector_total(BALLOON_CONFIG_VECTOR) != seen_config_irqs;
    return virtio_cfg32(&vd, CFG_NUM_PAGES) != target;
}

void balloon_poll(void)
{
    if (!balloon_pending())
        return;
    if (have_stats && virtq_has_used(&statq)) {
        virtq_reap(&statq);
        if (stats_head >= 0 && statq.done[stats_head]) {
            statq.done[stats_head] = 0;
            stats_post();
        }
    }
    seen_config_irqs = vector_total(BALLOON_CONFIG_VECTOR);
    target = virtio_cfg32(&vd, CFG_NUM_PAGES);
    follow();
}

static void cmd_touch(int argc, char **argv, const char *orig)
{
    u64 mib;
    if (argc != 2 || parse_u64(argv[1], 10, &mib) || mib > (1ull << 20)) {
        kprintf("ERR usage %s\n", orig);
        return;
    }
    u64 hi = balloon_floor();
    u64 lo = mib << 20 > hi - pool_lo ? pool_lo : hi - (mib << 20);
    /* One store per page is what makes the host allocate it; a store per word would cost
     * seconds per MiB where the guest's instructions are emulated (kvm_pvm). */
    for (u64 a = lo; a < hi; a += PAGE)
        *(volatile u64 *)a = a ^ TOUCH_MAGIC;
    if (hi > lo) {
        if (!touch_hi || lo < touch_lo)
            touch_lo = lo;
        if (hi > touch_hi)
            touch_hi = hi;
    }
    kprintf("TOUCHED %lu\n", hi - lo);
}

/* Touched pages outside the balloon must read back as written, or zero (given back by the host
 * after a deflate): the word `touch` wrote, and for a zero page the rest of it too. */
static void cmd_touchcheck(void)
{
    u64 checked = 0, zero = 0;
    int bad = 0;
    u64 end = touch_hi < balloon_floor() ? touch_hi : balloon_floor();
    for (u64 page = touch_lo; page < end && !bad; page += PAGE) {
        u64 v = *(volatile u64 *)page;
        if (v == 0 && find32_ne((const void *)page, 0, PAGE / 4) == PAGE / 4) {
            zero++;
        } else if (v != (page ^ TOUCH_MAGIC)) {
            kprintf("WARN touchcheck page=0x%lx reads 0x%lx: neither written nor zero\n", page, v);
            bad = 1;
        }
        checked++;
    }
    kprintf("TOUCHCHECK %s checked=%lu zero=%lu\n", bad ? "bad" : "ok", checked, zero);
}

static void cmd_bad(int argc, char **argv, const char *orig)
{
    static const char *kinds[] = {"oob", "hole", "huge"};
    int kind = -1;
    for (u32 i = 0; argc == 2 && i < ARRAY_SIZE(kinds); i++)
        if (!strcmp(argv[1], kinds[i]))
            kind = i;
    if (kind < 0) {
        kprintf("ERR usage %s\n", orig);
        return;
    }
    static u32 bad[16];
    u64 base = kind == 0 ? unbacked_address() >> 12 : kind == 1 ? 0xc0000000ull >> 12 : 0;
    for (int i = 0; i < 16; i++)
        bad[i] = kind == 2 ? 0xffffffffu : (u32)(base + i);
    struct vbuf b = {(u64)bad, sizeof(bad), 0};
    int head = virtq_add(&inflq, &b, 1);
    if (head < 0) {
        kprintf("ERR balloon bad no-descriptors\n");
        return;
    }
    virtq_kick(&inflq);
    int used = virtq_wait(&inflq, head, BAD_TIMEOUT_US, 0) == 0;
    kprintf("BALLOONBAD %s used=%s\n", kinds[kind], used ? "yes" : "no");
}

int balloon_command(int argc, char **argv, const char *orig)
{
    const char *c = argv[0];
    int k;
    if (!strcmp(c, "balloon"))
        k = 0;
    else if (!strcmp(c, "balloonstats"))
        k = 1;
    else if (!strcmp(c, "touch"))
        k = 2;
    else if (!strcmp(c, "touchcheck"))
        k = 3;
    else if (!strcmp(c, "balloonbad"))
        k = 4;
    else
        return 0;
    if (k == 2 || k == 3) {
        /* The pool is known without the device. */
        if (!pool_hi)
            find_pool();
        if (k == 2)
            cmd_touch(argc, argv, orig);
        else
            cmd_touchcheck();
        return 1;
    }
    if (!inited || (virtio_status(&vd) & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED))) {
        if (inited)
            kprintf("WARN balloon device status=0x%x: resetting it\n", virtio_status(&vd));
        if (balloon_init())
            return 1;
    }
    switch (k) {
    case 0:
        kprintf("BALLOON %02x:%02x.%u num_pages=%u actual=%u features=0x%lx\n", vd.pci.bus, vd.pci.dev, vd.pci.fn,
                virtio_cfg32(&vd, CFG_NUM_PAGES), virtio_cfg32(&vd, CFG_ACTUAL), vd.features);
        target = virtio_cfg32(&vd, CFG_NUM_PAGES);
        seen_config_irqs = vector_total(BALLOON_CONFIG_VECTOR);
        if (!broken)
            follow();
        break;
    case 1:
        kprintf("BALLOONSTATS sent=%lu\n", stats_sent);
        break;
    case 4:
        cmd_bad(argc, argv, orig);
        break;
    }
    return 1;
}
