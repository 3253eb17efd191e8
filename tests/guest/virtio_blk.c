/*
 * virtio-blk driver (virtio 1.2 section 5.2) for the `blk*` commands of PROTOCOL.md: one
 * request queue (queue 0), requests polled to completion with a deadline, config changes
 * (capacity) followed through the config MSI-X vector, deliberately malformed chains
 * (`blkbad`) whose answer the guest survives whatever it is, and a soak (`blksoak`) that keeps
 * up to 32 requests of mixed sizes in flight and counts what a restarting backend gets wrong.
 */
#include "virtio.h"

#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_ID_BYTES 20

/* Device config offsets */
#define CFG_CAPACITY 0
#define CFG_SIZE_MAX 8
#define CFG_SEG_MAX 12
#define CFG_BLK_SIZE 20
#define CFG_NUM_QUEUES 34

#define BLK_CONFIG_VECTOR 0x40
#define BLK_QUEUE_VECTOR 0x41
#define REQ_TIMEOUT_US 10000000ull      /* one request: generous for TCG and a busy host */
#define BAD_TIMEOUT_US 2000000ull       /* a malformed chain may never come back */
#define CHUNK_BYTES 65536u              /* largest data transfer of one request */
#define QD_MAX 32
#define QD_CHUNK_SECTORS 8
#define STATUS_UNSET 0xff               /* status byte before the device writes it */
#define BAD_SECTOR 1                    /* where `blkbad` requests point */

struct blk_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

struct blk_dwz {        /* discard / write zeroes segment */
    u64 sector;
    u32 num_sectors;
    u32 flags;
};

/* One request's header and status, and its chain head while in flight. */
struct slot {
    struct blk_hdr hdr;
    struct blk_dwz dwz;
    volatile u8 status;
    int head;
    u64 sector;
    u32 count;
};

static struct virtio_dev vd;
static struct virtq q;
static int inited;
static int want_event_idx = 1;     /* `blk noeventidx` turns it off (then NO_NOTIFY is honoured) */
static u64 capacity, printed_capacity, seen_config_irqs;
static u8 seen_generation;
static u32 blk_size, seg_bytes, max_segs, num_queues;
static struct slot slots[QD_MAX + 1];
static u8 data_buf[CHUNK_BYTES] __attribute__((aligned(4096)));
static u8 qd_buf[QD_MAX][QD_CHUNK_SECTORS * 512] __attribute__((aligned(4096)));
static u8 bad_buf[4096] __attribute__((aligned(4096)));
static char id_buf[VIRTIO_BLK_ID_BYTES + 1];

/* Capacity, read consistently: config_generation unchanged around the two halves (4.1.4.3). */
static u64 read_capacity(void)
{
    u64 cap = 0;
    for (int tries = 0; tries < 100; tries++) {
        u8 g = virtio_generation(&vd);
        cap = virtio_cfg64(&vd, CFG_CAPACITY);
        if (virtio_generation(&vd) == g) {
            seen_generation = g;
            break;
        }
    }
    return cap;
}

static int blk_init(void)
{
    struct pci_dev p;
    if (virtio_find(VIRTIO_ID_BLOCK, &p)) {
        kprintf("ERR blk no-device\n");
        return -1;
    }
    u64 want = 1ull << VIRTIO_BLK_F_SIZE_MAX | 1ull << VIRTIO_BLK_F_SEG_MAX | 1ull << VIRTIO_BLK_F_RO |
               1ull << VIRTIO_BLK_F_BLK_SIZE | 1ull << VIRTIO_BLK_F_FLUSH | 1ull << VIRTIO_BLK_F_MQ |
               1ull << VIRTIO_BLK_F_DISCARD | 1ull << VIRTIO_BLK_F_WRITE_ZEROES;
    if (want_event_idx)
        want |= 1ull << VIRTIO_RING_F_EVENT_IDX;
    inited = 0;
    if (virtio_init(&vd, &p, want, BLK_CONFIG_VECTOR, "blk"))
        return -1;
    if (virtq_init(&vd, &q, 0, BLK_QUEUE_VECTOR, "blk"))
        return -1;
    virtio_driver_ok(&vd);
    blk_size = virtio_has(&vd, VIRTIO_BLK_F_BLK_SIZE) ? virtio_cfg32(&vd, CFG_BLK_SIZE) : 512;
    num_queues = virtio_has(&vd, VIRTIO_BLK_F_MQ) ? virtio_cfg16(&vd, CFG_NUM_QUEUES) : 1;
    /* Data segments: at most size_max bytes each and seg_max of them (5.2.6.1), and within
     * CHUNK_BYTES; a device giving 0 for either is taken as not limiting. */
    seg_bytes = CHUNK_BYTES;
    if (virtio_has(&vd, VIRTIO_BLK_F_SIZE_MAX)) {
        u32 sm = virtio_cfg32(&vd, CFG_SIZE_MAX) & ~511u;
        if (sm && sm < seg_bytes)
            seg_bytes = sm;
    }
    max_segs = VIRTQ_MAX_CHAIN - 2;
    if (virtio_has(&vd, VIRTIO_BLK_F_SEG_MAX)) {
        u32 sm = virtio_cfg32(&vd, CFG_SEG_MAX);
        if (sm && sm < max_segs)
            max_segs = sm;
    }
    capacity = printed_capacity = read_capacity();
    seen_config_irqs = vector_total(BLK_CONFIG_VECTOR);
    inited = 1;
    return 0;
}

/* Initialises on first use, and again after the device asked for a reset (NEEDS_RESET, e.g.
 * QEMU after a malformed chain) or lost DRIVER_OK. */
static int blk_ensure(void)
{
    if (inited) {
        u8 st = virtio_status(&vd);
        if (!(st & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) && (st & VIRTIO_STATUS_DRIVER_OK))
            return 0;
        kprintf("WARN blk device status=0x%x: resetting it\n", st);
    }
    return blk_init();
}

static u32 bytes_per_request(void)
{
    u64 b = (u64)seg_bytes * max_segs;
    if (b > CHUNK_BYTES)
        b = CHUNK_BYTES;
    return (u32)b & ~511u;
}

/* Submits header + data (split in seg_bytes pieces) + status; returns the head or -1. */
static int submit(struct slot *s, u32 type, u64 sector, u8 *data, u32 len, int device_writes)
{
    struct vbuf b[VIRTQ_MAX_CHAIN];
    int n = 0;
    s->hdr.type = type;
    s->hdr.reserved = 0;
    s->hdr.sector = sector;
    s->status = STATUS_UNSET;
    b[n++] = (struct vbuf){(u64)&s->hdr, sizeof(s->hdr), 0};
    for (u32 off = 0; off < len && n < VIRTQ_MAX_CHAIN - 1;) {
        u32 piece = len - off < seg_bytes ? len - off : seg_bytes;
        b[n++] = (struct vbuf){(u64)data + off, piece, device_writes};
        off += piece;
    }
    b[n++] = (struct vbuf){(u64)&s->status, 1, 1};
    s->head = virtq_add(&q, b, n);
    return s->head;
}

/* Runs one request to completion; returns its status, or -1 after printing ERR timeout. */
static int run_one(u32 type, u64 sector, u8 *data, u32 len, int device_writes, const char *what)
{
    struct slot *s = &slots[0];
    if (submit(s, type, sector, data, len, device_writes) < 0) {
        kprintf("ERR blk %s no-descriptors\n", what);
        return -1;
    }
    virtq_kick(&q);
    if (virtq_wait(&q, s->head, REQ_TIMEOUT_US, 0)) {
        kprintf("ERR timeout blk %s sector=%lu\n", what, sector);
        return -1;
    }
    return s->status;
}

static void fill_sector(u8 *buf, u64 sector, u32 pattern) { fill32(buf, pattern ^ (u32)sector, 128); }

/* Returns the index of the first sector in buf[0..n) that differs from the pattern, or -1. */
static i64 check_sectors(const u8 *buf, u64 sector, u32 n, u32 pattern)
{
    for (u32 s = 0; s < n; s++)
        if (find32_ne(buf + 512ull * s, pattern ^ (u32)(sector + s), 128) != 128)
            return s;
    return -1;
}

static int parse_range(char **argv, u64 *sector, u64 *count)
{
    if (parse_u64(argv[1], 10, sector) || parse_u64(argv[2], 10, count) || *sector + *count < *sector ||
        *count > (1ull << 32))
        return -1;
    return 0;
}

/* blkwrite / blkcheck / blkread */
static void cmd_rw(int op, int argc, char **argv, const char *orig)
{
    u64 sector, count, pattern = 0;
    int need = op == 2 ? 3 : 4;
    if (argc != need || parse_range(argv, &sector, &count) ||
        (op != 2 && (parse_u64(argv[3], 16, &pattern) || pattern > 0xffffffffull))) {
        kprintf("ERR usage %s\n", orig);
        return;
    }
    static const char *names[] = {"BLKWROTE", "BLKCHECK", "BLKREAD"};
    u32 per = bytes_per_request() / 512;
    int status = 0;
    u32 crc = 0;
    i64 bad = -1;
    for (u64 done = 0; done < count;) {
        u32 n = count - done < per ? (u32)(count - done) : per;
        u64 s = sector + done;
        int st;
        if (op == 0) {
            for (u32 i = 0; i < n; i++)
                fill_sector(data_buf + 512ull * i, s + i, (u32)pattern);
            st = run_one(VIRTIO_BLK_T_OUT, s, data_buf, n * 512, 0, "write");
        } else {
            memset(data_buf, 0, n * 512);
            st = run_one(VIRTIO_BLK_T_IN, s, data_buf, n * 512, 1, "read");
        }
        if (st < 0)
            return;
        if (st && !status)
            status = st;
        if (op == 1 && !st && bad < 0) {
            i64 b = check_sectors(data_buf, s, n, (u32)pattern);
            if (b >= 0)
                bad = (i64)(s + b);
        }
        if (op == 2)
            crc = crc32_update(crc, data_buf, n * 512);
        done += n;
    }
    kprintf("%s %lu %lu status=%d", names[op], sector, count, status);
    if (op == 1) {
        if (bad >= 0 || status)
            kprintf(" bad sector=%ld\n", bad >= 0 ? bad : (i64)sector);
        else
            kprintf(" ok\n");
    } else if (op == 2) {
        kprintf(" crc=0x%08x\n", crc);
    } else {
        kprintf("\n");
    }
}

static void cmd_dwz(int zeroes, int argc, char **argv, const char *orig)
{
    u64 sector, count;
    if (argc != 3 || parse_range(argv, &sector, &count) || count > 0xffffffffull) {
        kprintf("ERR usage %s\n", orig);
        return;
    }
    struct slot *s = &slots[0];
    s->dwz.sector = sector;
    s->dwz.num_sectors = (u32)count;
    s->dwz.flags = 0;
    int st = run_one(zeroes ? VIRTIO_BLK_T_WRITE_ZEROES : VIRTIO_BLK_T_DISCARD, 0, (u8 *)&s->dwz,
                     sizeof(s->dwz), 0, zeroes ? "write-zeroes" : "discard");
    if (st >= 0)
        kprintf("%s %lu %lu status=%d\n", zeroes ? "BLKZEROES" : "BLKDISCARD", sector, count, st);
}

static void cmd_id(void)
{
    memset(id_buf, 0, sizeof(id_buf));
    int st = run_one(VIRTIO_BLK_T_GET_ID, 0, (u8 *)id_buf, VIRTIO_BLK_ID_BYTES, 1, "get-id");
    if (st < 0)
        return;
    /* At most 20 bytes, NUL-terminated only when shorter (5.2.6); printable ASCII only. */
    for (int i = 0; i < VIRTIO_BLK_ID_BYTES && id_buf[i]; i++)
        if (id_buf[i] <= ' ' || id_buf[i] > '~')
            id_buf[i] = '?';
    kprintf("BLKID status=%d id=%s\n", st, id_buf);
}

/* blkqd: `depth` chains in flight (several added before each kick), writes then reads. */
static void cmd_qd(int argc, char **argv, const char *orig)
{
    u64 depth, sector, count, pattern = 0x51de0000;
    if ((argc != 4 && argc != 5) || parse_u64(argv[1], 10, &depth) || depth == 0 || depth > QD_MAX ||
        parse_range(argv + 1, &sector, &count) ||
        (argc == 5 && (parse_u64(argv[4], 16, &pattern) || pattern > 0xffffffffull))) {
        kprintf("ERR usage %s\n", orig);
        return;
    }
    /* Three descriptors per request: the queue must hold `depth` of them. */
    if (depth * 3 > q.size)
        depth = q.size / 3;
    int status = 0, bad = 0;
    for (int phase = 0; phase < 2; phase++) {
        int writing = phase == 0;
        u64 next = sector, end = sector + count;
        u32 inflight = 0;
        int used[QD_MAX] = {0};
        while (next < end || inflight) {
            int added = 0;
            for (u32 i = 0; i < depth && next < end; i++) {
                if (used[i])
                    continue;
                struct slot *s = &slots[i];
                u32 n = end - next < QD_CHUNK_SECTORS ? (u32)(end - next) : QD_CHUNK_SECTORS;
                s->sector = next;
                s->count = n;
                if (writing)
                    for (u32 k = 0; k < n; k++)
                        fill_sector(qd_buf[i] + 512 * k, next + k, (u32)pattern);
                else
                    memset(qd_buf[i], 0, n * 512);
                if (submit(s, writing ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, next, qd_buf[i], n * 512,
                           !writing) < 0) {
                    kprintf("ERR blk qd no-descriptors\n");
                    return;
                }
                used[i] = 1;
                inflight++;
                added++;
                next += n;
            }
            if (added)
                virtq_kick(&q);
            /* Wait for any one of them. */
            u64 deadline = tsc_deadline_us(REQ_TIMEOUT_US);
            int progressed = 0;
            while (!progressed) {
                virtq_reap(&q);
                for (u32 i = 0; i < depth; i++) {
                    if (!used[i] || !q.done[slots[i].head])
                        continue;
                    struct slot *s = &slots[i];
                    if (s->status && !status)
                        status = s->status;
                    if (!writing && !s->status && check_sectors(qd_buf[i], s->sector, s->count, (u32)pattern) >= 0)
                        bad = 1;
                    q.done[s->head] = 0;
                    used[i] = 0;
                    inflight--;
                    progressed = 1;
                }
                if (!progressed && tsc_passed(deadline)) {
                    kprintf("ERR timeout blk qd inflight=%u\n", inflight);
                    return;
                }
                if (!progressed)
                    virtq_idle(&q);
            }
        }
    }
    kprintf("BLKQD depth=%lu status=%d %s\n", depth, status, (bad || status) ? "bad" : "ok");
}

/*
 * blksoak: rounds of "write each piece of the range, read it back and compare" with up to
 * SOAK_MAX requests of mixed sizes in flight (a 256 KiB piece for every few 4 KiB ones). A
 * piece is read back as soon as its write completes, while later pieces are still being
 * written, so reads and writes of different sizes are in flight together and a device that
 * completes requests as they finish completes them out of order. Counted per round: requests
 * completed, completions out of submission order, used entries naming no request in flight (a
 * repeated completion), requests never completed (nothing at all completed for
 * SOAK_TIMEOUT_US: the round stops there, the command too), sectors read back wrong, and waits
 * in which nothing completed for SOAK_STALL_US (a backend gone while requests were in flight).
 * Round r writes pattern + r, so a write repeated from an earlier round shows.
 */
#define SOAK_MAX 32
#define SOAK_SMALL 8            /* sectors: 4 KiB */
#define SOAK_BIG 512            /* sectors: 256 KiB */
#define SOAK_BIG_ONE_IN 4
#define SOAK_STALL_US 50000ull
#define SOAK_TIMEOUT_US 30000000ull
#define SOAK_POISON 0xdeadf1e5u /* read buffers before the device fills them */

extern u8 __soak_start[], __soak_end[];

enum soak_state { SOAK_FREE, SOAK_WRITING, SOAK_READING };

struct soak_req {
    struct blk_hdr hdr;
    volatile u8 status;
    enum soak_state state;
    int head;
    u64 sector, seq;
    u32 count;
};

struct soak_stats {
    u64 done, ooo, dup, lost, mismatch, stalls, max_wait_us;
    int status;
};

static struct soak_req soak[SOAK_MAX];
/* `blkpulse`: one `C <completed> <in flight>` line per look at the used ring that found
 * completions (`E ...` when one had a non-zero status), so the host can time when I/O flows
 * again after a backend restart. One line per look, not per request: printing a line per
 * request makes the guest fall behind the ring by many lines, and a completion the killed
 * backend made would then reach the host long after the kill. */
static int soak_pulse;
static u64 soak_seen_tsc;   /* when the wait for the device ended: the completions were seen */

static u8 *soak_buf(u32 i) { return __soak_start + (u64)i * SOAK_BIG * 512; }

static u32 xorshift32(u32 *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    return *x;
}

static u64 tsc_us(u64 cycles) { return cycles * 1000 / (tsc_khz ? tsc_khz : 2000000); }

/* Sectors of buf[0..n) that differ from the pattern. */
static u32 count_bad_sectors(const u8 *buf, u64 sector, u32 n, u32 pattern)
{
    u32 bad = 0;
    for (u32 s = 0; s < n; s++)
        if (find32_ne(buf + 512ull * s, pattern ^ (u32)(sector + s), 128) != 128)
            bad++;
    return bad;
}

/* Header, the data in seg_bytes pieces, status; the head, or -1 when descriptors are short. */
static int soak_submit(struct soak_req *r, u8 *data, int writing, u64 *seq)
{
    struct vbuf b[VIRTQ_MAX_CHAIN];
    int n = 0;
    u32 len = r->count * 512;
    r->hdr.type = writing ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    r->hdr.reserved = 0;
    r->hdr.sector = r->sector;
    r->status = STATUS_UNSET;
    b[n++] = (struct vbuf){(u64)&r->hdr, sizeof(r->hdr), 0};
    for (u32 off = 0; off < len;) {
        u32 piece = len - off < seg_bytes ? len - off : seg_bytes;
        b[n++] = (struct vbuf){(u64)data + off, piece, !writing};
        off += piece;
    }
    b[n++] = (struct vbuf){(u64)&r->status, 1, 1};
    r->head = virtq_add(&q, b, n);
    if (r->head >= 0) {
        r->seq = (*seq)++;
        r->state = writing ? SOAK_WRITING : SOAK_READING;
    }
    return r->head;
}

/* Takes every used entry there is (reads submitted for completed writes, compares completed
 * reads); returns how many requests completed. */
static u32 soak_reap(u32 depth, u32 pattern, u64 *seq, struct soak_stats *st, u32 *inflight)
{
    u32 got = 0;
    u8 batch_status = 0;
    int head;
    while (virtq_reap_one(&q, &head)) {
        if (head < 0) {
            st->dup++;
            continue;
        }
        struct soak_req *r = 0;
        u32 slot = 0;
        for (u32 i = 0; i < depth; i++)
            if (soak[i].state != SOAK_FREE && soak[i].head == head) {
                r = &soak[i];
                slot = i;
            }
        if (!r) {
            /* In flight, but not the soak's (none is): as repeated. */
            st->dup++;
            continue;
        }
        for (u32 i = 0; i < depth; i++)
            if (soak[i].state != SOAK_FREE && &soak[i] != r && soak[i].seq < r->seq) {
                st->ooo++;
                break;
            }
        u8 status = r->status;
        q.done[head] = 0;
        st->done++;
        got++;
        (*inflight)--;
        if (status && !batch_status)
            batch_status = status;
        if (status && !st->status)
            st->status = status;
        if (r->state == SOAK_WRITING && !status) {
            /* Written: read it back into the same (poisoned) buffer. */
            fill32(soak_buf(slot), SOAK_POISON, r->count * 128ull);
            if (soak_submit(r, soak_buf(slot), 0, seq) >= 0) {
                (*inflight)++;
                continue;
            }
            /* Descriptors held by chains lost earlier: unread, counted as wrong. */
            st->mismatch += r->count;
        } else if (r->state == SOAK_READING && !status) {
            st->mismatch += count_bad_sectors(soak_buf(slot), r->sector, r->count, pattern);
        }
        r->state = SOAK_FREE;
    }
    if (soak_pulse && got) {
        u64 after_us = tsc_us(rdtsc() - soak_seen_tsc);
        if (batch_status)
            kprintf("E %u %u %lu status=%u\n", got, *inflight, after_us, batch_status);
        else
            kprintf("C %u %u %lu\n", got, *inflight, after_us);
    }
    return got;
}

/* One round over [sector, sector + count); 0, or -1 when requests were lost (st->lost says
 * how many; they stay in flight). */
static int soak_round(u64 sector, u64 count, u32 pattern, u32 seed, u32 depth, u32 big, struct soak_stats *st)
{
    u64 next = sector, end = sector + count, seq = 0;
    u32 inflight = 0, rng = seed | 1;
    for (u32 i = 0; i < depth; i++)
        soak[i].state = SOAK_FREE;
    u64 timeout = SOAK_TIMEOUT_US * (tsc_khz ? tsc_khz : 2000000) / 1000;
    u64 last_progress = rdtsc();
    while (next < end || inflight) {
        /* New pieces in every free slot, then one kick for the lot (and for the reads the
         * last reap submitted). */
        for (u32 i = 0; i < depth && next < end; i++) {
            struct soak_req *r = &soak[i];
            if (r->state != SOAK_FREE)
                continue;
            u32 n = xorshift32(&rng) % SOAK_BIG_ONE_IN == 0 ? big : SOAK_SMALL;
            if (n > end - next)
                n = (u32)(end - next);
            r->sector = next;
            r->count = n;
            u8 *buf = soak_buf(i);
            for (u32 k = 0; k < n; k++)
                fill_sector(buf + 512ull * k, next + k, pattern);
            if (soak_submit(r, buf, 1, &seq) < 0)
                break;  /* descriptors held by lost chains: wait for the ones in flight */
            next += n;
            inflight++;
        }
        if (q.avail_idx != q.kicked_idx)
            virtq_kick(&q);
        if (!inflight) {
            /* Nothing in flight and nothing could be added: descriptors held by chains an
             * earlier command lost. */
            kprintf("ERR blk soak no-descriptors free=%u\n", q.nfree);
            return -1;
        }
        /* Until the device uses something (the wait, timed), then every completion there is.
         * Interrupt-driven, as Linux's driver: once asleep, the used ring is looked at again only
         * after the queue's vector fired (the timer tick only bounds the wait), so a device, or
         * a frontend after a backend restart, that leaves an interrupt out stalls the soak. */
        u64 wait_start = rdtsc();
        u64 irqs = q.vector ? vector_total(q.vector) : 0;
        int ready = virtq_arm(&q);
        while (!ready) {
            if (rdtsc() - last_progress > timeout) {
                st->lost += inflight;
                return -1;
            }
            if (!q.vector) {
                pause();
                ready = virtq_has_used(&q);
                continue;
            }
            cli();
            if (vector_total(q.vector) == irqs)
                sti_hlt();
            else
                sti();
            u64 now_irqs = vector_total(q.vector);
            if (now_irqs != irqs) {
                irqs = now_irqs;
                ready = virtq_arm(&q);
            }
        }
        soak_seen_tsc = rdtsc();
        u64 waited = tsc_us(soak_seen_tsc - wait_start);
        if (waited > st->max_wait_us)
            st->max_wait_us = waited;
        if (waited >= SOAK_STALL_US)
            st->stalls++;
        if (soak_reap(depth, pattern, &seq, st, &inflight))
            last_progress = rdtsc();
    }
    return 0;
}

static void cmd_soak(int pulse, int argc, char **argv, const char *orig)
{
    u64 depth, sector, count, rounds, pattern = 0x50a40000;
    if ((argc != 5 && argc != 6) || parse_u64(argv[1], 10, &depth) || depth == 0 || depth > SOAK_MAX ||
        parse_range(argv + 1, &sector, &count) || count == 0 || parse_u64(argv[4], 10, &rounds) || rounds == 0 ||
        (argc == 6 && (parse_u64(argv[5], 16, &pattern) || pattern > 0xffffffffull)) || sector + count > capacity) {
        kprintf("ERR usage %s\n", orig);
        return;
    }
    if ((u64)(__soak_end - __soak_start) < (u64)SOAK_MAX * SOAK_BIG * 512) {
        kprintf("ERR blk soak buffers too small\n");
        return;
    }
    /* The big requests: 256 KiB, or what the device's segment limits allow in one request. */
    u32 segs = max_segs < VIRTQ_MAX_CHAIN - 2 ? max_segs : VIRTQ_MAX_CHAIN - 2;
    u64 big_bytes = (u64)seg_bytes * segs;
    u32 big = big_bytes >= SOAK_BIG * 512 ? SOAK_BIG : (u32)(big_bytes / 512);
    if (big < SOAK_SMALL)
        big = SOAK_SMALL;
    /* Every slot may hold a big request: header + data + status descriptors each. */
    u32 per = 2 + (big * 512 + seg_bytes - 1) / seg_bytes;
    if (depth * per > q.size)
        depth = q.size / per;
    u64 stray0 = q.stray;
    u64 total_bad = 0;
    soak_pulse = pulse;
    for (u64 r = 0; r < rounds; r++) {
        struct soak_stats st = {0};
        u64 kicks0 = q.kicks, skipped0 = q.kicks_skipped;
        u32 pat = (u32)(pattern + r);
        int failed = soak_round(sector, count, pat, (u32)(r + 1) * 0x9e3779b9u, (u32)depth, big, &st);
        st.dup += q.stray - stray0;
        stray0 = q.stray;
        int bad = failed || st.dup || st.lost || st.mismatch || st.status;
        total_bad += bad;
        kprintf("BLKSOAK round=%lu done=%lu ooo=%lu dup=%lu lost=%lu status=%d mismatch=%lu stalls=%lu "
                "maxwait=%lu kicks=%lu skipped=%lu depth=%lu big=%u %s\n",
                r, st.done, st.ooo, st.dup, st.lost, st.status, st.mismatch, st.stalls, st.max_wait_us / 1000,
                q.kicks - kicks0, q.kicks_skipped - skipped0, depth, big, bad ? "bad" : "ok");
        if (failed) {
            if (st.lost)
                kprintf("ERR timeout blk soak round=%lu inflight=%lu\n", r, st.lost);
            soak_pulse = 0;
            return;
        }
    }
    soak_pulse = 0;
    kprintf("BLKSOAKED rounds=%lu bad=%lu pattern=0x%08x\n", rounds, total_bad, (u32)(pattern + rounds - 1));
}

static void cmd_stat(void)
{
    kprintf("BLKSTAT completed=%lu stray=%lu kicks=%lu skipped=%lu event_idx=%d free=%u\n", q.completed, q.stray,
            q.kicks, q.kicks_skipped, q.event_idx, q.nfree);
}

static void cmd_cap(void)
{
    capacity = read_capacity();
    kprintf("BLKCAP capacity=%lu config_irqs=%lu generation=%u\n", capacity, vector_total(BLK_CONFIG_VECTOR),
            seen_generation);
}

/*
 * blkbad: one malformed chain (see PROTOCOL.md). Descriptors of a chain that never comes back
 * stay out of the free list (the device may still own them); a chain that does come back is
 * freed from the guest's own record of it.
 */
static void cmd_bad(int argc, char **argv, const char *orig)
{
    static const char *kinds[] = {"oob", "huge", "loop", "badnext", "dir", "nostatus", "short"};
    int kind = -1;
    for (u32 i = 0; argc == 2 && i < ARRAY_SIZE(kinds); i++)
        if (!strcmp(argv[1], kinds[i]))
            kind = i;
    if (kind < 0) {
        kprintf("ERR usage %s\n", orig);
        return;
    }
    struct slot *s = &slots[QD_MAX];
    s->hdr.type = VIRTIO_BLK_T_IN;
    s->hdr.reserved = 0;
    s->hdr.sector = BAD_SECTOR;
    s->status = STATUS_UNSET;
    u16 ids[3];
    int n = 3;
    if (kind == 5)
        n = 2;
    if (virtq_alloc(&q, n, ids)) {
        kprintf("ERR blk bad no-descriptors\n");
        return;
    }
    volatile struct vring_desc *d = q.desc;
    /* Default: IN request, header (R) -> 512-byte data (W) -> status (W). */
    d[ids[0]] = (struct vring_desc){(u64)&s->hdr, sizeof(s->hdr), VRING_DESC_F_NEXT, ids[1]};
    d[ids[1]] = (struct vring_desc){(u64)bad_buf, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, n > 2 ? ids[2] : 0};
    if (n > 2)
        d[ids[2]] = (struct vring_desc){(u64)&s->status, 1, VRING_DESC_F_WRITE, 0};
    switch (kind) {
    case 0:     /* oob: the data buffer is neither RAM nor a BAR */
        d[ids[1]].addr = unbacked_address();
        break;
    case 1:     /* huge: a 4 GiB - 1 data buffer, device-readable (OUT) so nothing is written */
        s->hdr.type = VIRTIO_BLK_T_OUT;
        d[ids[1]].len = 0xffffffffu;
        d[ids[1]].flags = VRING_DESC_F_NEXT;
        break;
    case 2:     /* loop: the status descriptor chains back to the header */
        d[ids[2]].flags = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
        d[ids[2]].next = ids[0];
        break;
    case 3:     /* badnext: the status descriptor's next is out of the table */
        d[ids[2]].flags = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
        d[ids[2]].next = q.size;
        break;
    case 4:     /* dir: IN whose data buffer the device may only read */
        d[ids[1]].flags = VRING_DESC_F_NEXT;
        break;
    case 5:     /* nostatus: OUT, header -> data, nothing device-writable */
        s->hdr.type = VIRTIO_BLK_T_OUT;
        d[ids[1]].flags = 0;
        d[ids[1]].next = 0;
        break;
    case 6:     /* short: an 8-byte header */
        d[ids[0]].len = 8;
        break;
    }
    struct blk_hdr before = s->hdr;
    virtq_publish(&q, ids, n);
    virtq_kick(&q);
    u32 len = 0;
    int used = virtq_wait(&q, ids[0], BAD_TIMEOUT_US, &len) == 0;
    /* A device must never write a device-readable buffer: say so if it did (the header). */
    if (memcmp(&before, &s->hdr, sizeof(before)))
        kprintf("WARN blkbad %s: the device wrote into the device-readable header\n", kinds[kind]);
    kprintf("BLKBAD %s used=%s status=", kinds[kind], used ? "yes" : "no");
    if (used && kind != 5 && s->status != STATUS_UNSET)
        kprintf("%u", s->status);
    else
        kprintf("none");
    kprintf(" len=%u\n", used ? len : 0);
}

int blk_command(int argc, char **argv, const char *orig)
{
    const char *c = argv[0];
    if (c[0] != 'b' || c[1] != 'l' || c[2] != 'k')
        return 0;
    static const char *known[] = {"blk",        "blkwrite",  "blkcheck", "blkread", "blkflush", "blkid",
                                  "blkdiscard", "blkzeroes", "blkqd",    "blkcap",  "blkbad",   "blksoak",
                                  "blkstat",    "blkpulse"};
    int k = -1;
    for (u32 i = 0; i < ARRAY_SIZE(known); i++)
        if (!strcmp(c, known[i]))
            k = i;
    if (k < 0)
        return 0;
    if (k == 0 && argc == 2) {
        /* `blk eventidx|noeventidx`: (re)initialises the device with or without EVENT_IDX. */
        int want = !strcmp(argv[1], "eventidx") ? 1 : !strcmp(argv[1], "noeventidx") ? 0 : -1;
        if (want < 0) {
            kprintf("ERR usage %s\n", orig);
            return 1;
        }
        if (want != want_event_idx || (inited && virtio_has(&vd, VIRTIO_RING_F_EVENT_IDX) != want)) {
            want_event_idx = want;
            if (inited)
                virtio_reset(&vd);
            inited = 0;
        }
    } else if (k == 0 && argc != 1) {
        kprintf("ERR usage %s\n", orig);
        return 1;
    }
    if (blk_ensure())
        return 1;
    switch (k) {
    case 0:
        kprintf("BLK %02x:%02x.%u capacity=%lu ro=%d queues=%u features=0x%lx blk_size=%u\n", vd.pci.bus,
                vd.pci.dev, vd.pci.fn, read_capacity(), virtio_has(&vd, VIRTIO_BLK_F_RO), num_queues, vd.features,
                blk_size);
        break;
    case 1:
    case 2:
    case 3:
        cmd_rw(k - 1, argc, argv, orig);
        break;
    case 4: {
        int st = run_one(VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0, "flush");
        if (st >= 0)
            kprintf("BLKFLUSH status=%d\n", st);
        break;
    }
    case 5:
        cmd_id();
        break;
    case 6:
    case 7:
        cmd_dwz(k == 7, argc, argv, orig);
        break;
    case 8:
        cmd_qd(argc, argv, orig);
        break;
    case 9:
        cmd_cap();
        break;
    case 10:
        cmd_bad(argc, argv, orig);
        break;
    case 11:
    case 13:
        cmd_soak(k == 13, argc, argv, orig);
        break;
    case 12:
        cmd_stat();
        break;
    }
    return 1;
}

/* A config change to look at: a config interrupt (MSI-X), or a new generation (no MSI-X). */
int blk_pending(void)
{
    if (!inited || !vd.ready)
        return 0;
    if (vd.config_vector)
        return vector_total(BLK_CONFIG_VECTOR) != seen_config_irqs;
    return virtio_generation(&vd) != seen_generation;
}

void blk_poll(void)
{
    if (!blk_pending())
        return;
    seen_config_irqs = vector_total(BLK_CONFIG_VECTOR);
    capacity = read_capacity();
    if (capacity != printed_capacity) {
        printed_capacity = capacity;
        kprintf("BLKCONFIG capacity=%lu\n", capacity);
    }
}
