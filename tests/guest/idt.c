/*
 * IDT and interrupt dispatch. Exceptions print `EXCEPTION <vec> rip=<hex>` (and a FAULT-INFO
 * line) and halt that CPU; NMIs are counted per LAPIC id without printing; the test vectors
 * VEC_TEST_BASE.. (MSIs the host sends) are counted per LAPIC id and get an EOI; device IRQs go
 * to their drivers and get an EOI.
 */
#include "guest.h"

struct isr_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

struct idt_entry {
    u16 offset_lo;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 offset_mid;
    u32 offset_hi;
    u32 zero;
} PACKED;

struct idt_ptr {
    u16 limit;
    u64 base;
} PACKED;

extern char isr_stubs[];
static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct idt_ptr idtr;
volatile u64 nmi_counts[256];
/* Test vector counts by LAPIC id (low byte) and vector - VEC_TEST_BASE. */
static volatile u64 vec_counts[256][VEC_TEST_COUNT];
/* The same, all CPUs together: drivers look at these on every wake-up, so O(1). */
static volatile u64 vec_totals[VEC_TEST_COUNT];

void idt_init(void)
{
    for (int v = 0; v < 256; v++) {
        u64 addr = (u64)isr_stubs + 16 * v;
        idt[v].offset_lo = addr & 0xffff;
        idt[v].selector = GDT_CODE64;
        idt[v].ist = 0;
        idt[v].type_attr = 0x8e;        /* present, DPL 0, 64-bit interrupt gate */
        idt[v].offset_mid = (addr >> 16) & 0xffff;
        idt[v].offset_hi = addr >> 32;
        idt[v].zero = 0;
    }
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (u64)idt;
    idt_load();
}

void idt_load(void) { __asm__ volatile("lidt %0" ::"m"(idtr)); }

static void nmi(void)
{
    u32 id = lapic_base ? lapic_id() : 0;
    __atomic_fetch_add(&nmi_counts[id & 0xff], 1, __ATOMIC_RELAXED);
}

void nmi_report(void)
{
    u64 total = 0;
    for (int i = 0; i < 256; i++)
        total += nmi_counts[i];
    kprintf("NMIS total=%lu", total);
    if (n_madt_cpus) {
        for (u32 i = 0; i < n_madt_cpus; i++) {
            u32 id = madt_cpus[i].apic_id & 0xff;
            kprintf(" cpu%u=%lu", id, nmi_counts[id]);
        }
    } else {
        u32 id = lapic_base ? lapic_id() & 0xff : 0;
        kprintf(" cpu%u=%lu", id, nmi_counts[id]);
    }
    kprintf("\n");
}

static void test_vector(u64 v)
{
    u32 id = lapic_base ? lapic_id() : 0;
    __atomic_fetch_add(&vec_counts[id & 0xff][v - VEC_TEST_BASE], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&vec_totals[v - VEC_TEST_BASE], 1, __ATOMIC_RELAXED);
    lapic_eoi();
}

void vectors_report(void)
{
    /* One snapshot, so the totals and the per-CPU counts agree while other CPUs keep counting
     * (static: too big for the stack; only the BSP runs commands). */
    static u64 snap[256][VEC_TEST_COUNT];
    u64 total = 0, per_vec[VEC_TEST_COUNT] = {0};
    for (int c = 0; c < 256; c++)
        for (int i = 0; i < VEC_TEST_COUNT; i++) {
            snap[c][i] = __atomic_load_n(&vec_counts[c][i], __ATOMIC_RELAXED);
            per_vec[i] += snap[c][i];
            total += snap[c][i];
        }
    kprintf("VECTORS total=%lu", total);
    for (int i = 0; i < VEC_TEST_COUNT; i++)
        if (per_vec[i])
            kprintf(" v%02x=%lu", VEC_TEST_BASE + i, per_vec[i]);
    for (int c = 0; c < 256; c++)
        for (int i = 0; i < VEC_TEST_COUNT; i++)
            if (snap[c][i])
                kprintf(" cpu%d.v%02x=%lu", c, VEC_TEST_BASE + i, snap[c][i]);
    kprintf("\n");
}

static u64 read_cr2(void)
{
    u64 v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}

void isr_dispatch(struct isr_frame *f)
{
    u64 v = f->vector;
    if (v == 2) {
        nmi();
        return;
    }
    if (v < 32) {
        kprintf("EXCEPTION %lu rip=0x%lx\n", v, f->rip);
        kprintf("FAULT-INFO vec=%lu err=0x%lx cr2=0x%lx rsp=0x%lx cs=0x%lx rflags=0x%lx apic=%u\n", v,
                f->error, read_cr2(), f->rsp, f->cs, f->rflags, lapic_base ? lapic_id() : 0);
        halt_forever();
    }
    switch (v) {
    case VEC_UART:
        serial_irq();
        lapic_eoi();
        break;
    case VEC_SCI:
        acpi_sci_irq();
        lapic_eoi();
        break;
    case VEC_SPURIOUS:
        break;      /* spurious LAPIC interrupts take no EOI */
    default:
        if (v >= VEC_TEST_BASE && v < VEC_TEST_BASE + VEC_TEST_COUNT) {
            test_vector(v);
            break;
        }
        if (v >= VEC_PIC_BASE && v < VEC_PIC_BASE + 16)
            break;  /* a spurious 8259 IRQ (they are all masked): no EOI anywhere */
        lapic_eoi();
    }
}

u64 vector_total(u8 v)
{
    if (v < VEC_TEST_BASE || v >= VEC_TEST_BASE + VEC_TEST_COUNT)
        return 0;
    return __atomic_load_n(&vec_totals[v - VEC_TEST_BASE], __ATOMIC_RELAXED);
}
