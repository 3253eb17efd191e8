/*
 * 8259 PICs (remapped and masked), the local APIC (xAPIC MMIO at the MADT's address) and the
 * IOAPICs listed in the MADT.
 */
#include "guest.h"

#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_ESR 0x280
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_PERF 0x340
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define LVT_TIMER_PERIODIC (1u << 17)
#define LVT_MASKED (1u << 16)
#define LVT_NMI (4u << 8)
#define LVT_LEVEL (1u << 15)
#define LVT_ACTIVE_LOW (1u << 13)
#define ICR_PENDING (1u << 12)
#define MSR_APIC_BASE 0x1b
#define APIC_BASE_ENABLE (1ull << 11)

u64 lapic_base;

void pic_disable(void)
{
    /* ICW1..4: vectors 0x20..0x2f (so a spurious one is not taken for an exception), then
     * mask everything: the IOAPIC delivers all our interrupts. */
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, VEC_PIC_BASE);
    outb(0xa1, VEC_PIC_BASE + 8);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

static u32 lapic_read(u32 reg) { return mmio_read32(lapic_base + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(lapic_base + reg, v); }

u32 lapic_id(void) { return lapic_base ? lapic_read(LAPIC_ID) >> 24 : 0; }

void lapic_eoi(void)
{
    if (lapic_base)
        lapic_write(LAPIC_EOI, 0);
}

static u32 nmi_lvt_flags(u16 madt_flags)
{
    u32 v = LVT_NMI;
    if ((madt_flags & 3) == 3)
        v |= LVT_ACTIVE_LOW;
    if (((madt_flags >> 2) & 3) == 3)
        v |= LVT_LEVEL;
    return v;
}

void lapic_init(void)
{
    if (!lapic_base)
        return;
    u64 msr = rdmsr(MSR_APIC_BASE);
    if (!(msr & APIC_BASE_ENABLE))
        wrmsr(MSR_APIC_BASE, msr | APIC_BASE_ENABLE);
    lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);      /* software enable */
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    lapic_write(LAPIC_LVT_PERF, LVT_MASKED);
    lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    /* LINT1 carries NMI (QEMU's inject-nmi goes through it under TCG); the MADT's LAPIC NMI
     * entries say which LINT and its polarity; LINT1 edge active-high if none. */
    u32 lint1 = LVT_NMI;
    u32 my_uid = ~0u;
    u32 id = lapic_id();
    for (u32 i = 0; i < n_madt_cpus; i++)
        if (madt_cpus[i].apic_id == id)
            my_uid = madt_cpus[i].uid;
    for (u32 i = 0; i < n_madt_nmis; i++) {
        const struct madt_nmi *n = &madt_nmis[i];
        if (n->uid != 0xff && n->uid != 0xffffffff && n->uid != my_uid)
            continue;
        if (n->lint == 0)
            lapic_write(LAPIC_LVT_LINT0, nmi_lvt_flags(n->flags));
        else
            lint1 = nmi_lvt_flags(n->flags);
    }
    lapic_write(LAPIC_LVT_LINT1, lint1);
    lapic_write(LAPIC_ESR, 0);
    lapic_eoi();
}

int lapic_send_ipi(u32 apic_id, u32 icr_low)
{
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, icr_low);
    u64 end = tsc_deadline_us(10000);
    while (lapic_read(LAPIC_ICR_LO) & ICR_PENDING) {
        if (tsc_passed(end))
            return -1;
        pause();
    }
    return 0;
}

/* The timer's input clock is unknown (QEMU and KVM both tick at 1 GHz); a wake-up only needs
 * the order of magnitude, so no calibration. */
void lapic_timer_periodic(u32 ms)
{
    if (!lapic_base)
        return;
    lapic_write(LAPIC_TIMER_DIV, 0xb);      /* divide by 1 */
    lapic_write(LAPIC_LVT_TIMER, VEC_TIMER | LVT_TIMER_PERIODIC);
    lapic_write(LAPIC_TIMER_INIT, ms * 1000000u);
}

/* IOAPIC */
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_VER 0x01
#define REDIR_MASKED (1u << 16)
#define REDIR_LEVEL (1u << 15)
#define REDIR_ACTIVE_LOW (1u << 13)

static u32 ioapic_read(u64 base, u32 reg)
{
    mmio_write32(base + IOAPIC_REGSEL, reg);
    return mmio_read32(base + IOAPIC_WIN);
}

static void ioapic_write(u64 base, u32 reg, u32 v)
{
    mmio_write32(base + IOAPIC_REGSEL, reg);
    mmio_write32(base + IOAPIC_WIN, v);
}

static u32 ioapic_entries(u64 base) { return ((ioapic_read(base, IOAPIC_VER) >> 16) & 0xff) + 1; }

void ioapic_init(void)
{
    for (u32 i = 0; i < n_madt_ioapics; i++) {
        u64 base = madt_ioapics[i].addr;
        map_uncached(base, 0x1000);
        u32 n = ioapic_entries(base);
        for (u32 e = 0; e < n; e++) {
            ioapic_write(base, 0x10 + 2 * e, REDIR_MASKED);
            ioapic_write(base, 0x11 + 2 * e, 0);
        }
    }
}

int ioapic_route_isa(u32 isa_irq, u8 vector, int level, int active_low)
{
    u32 gsi = isa_irq;
    for (u32 i = 0; i < n_madt_isos; i++) {
        const struct madt_iso *o = &madt_isos[i];
        if (o->source != isa_irq)
            continue;
        gsi = o->gsi;
        u16 pol = o->flags & 3, trig = (o->flags >> 2) & 3;
        if (pol == 1)
            active_low = 0;
        else if (pol == 3)
            active_low = 1;
        if (trig == 1)
            level = 0;
        else if (trig == 3)
            level = 1;
    }
    for (u32 i = 0; i < n_madt_ioapics; i++) {
        u64 base = madt_ioapics[i].addr;
        u32 first = madt_ioapics[i].gsi_base;
        if (gsi < first || gsi >= first + ioapic_entries(base))
            continue;
        u32 pin = gsi - first;
        u32 lo = vector | (level ? REDIR_LEVEL : 0) | (active_low ? REDIR_ACTIVE_LOW : 0);
        ioapic_write(base, 0x11 + 2 * pin, lapic_id() << 24);     /* physical dest: this CPU */
        ioapic_write(base, 0x10 + 2 * pin, lo);
        return 0;
    }
    kprintf("WARN no IOAPIC pin for GSI %u (ISA IRQ %u)\n", gsi, isa_irq);
    return -1;
}
