/* Common types, port/MMIO/CPU helpers and the small library the guest uses. */
#ifndef GUEST_H
#define GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "asm.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define NORETURN __attribute__((noreturn))
#define PACKED __attribute__((packed))

/* Higher-half direct map: physical memory again at this offset (start.S). */
#define HIGH_HALF_BASE 0xffff800000000000ull

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u16 inw(u16 port)
{
    u16 v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u16 mmio_read16(u64 addr) { return *(volatile u16 *)addr; }
static inline void mmio_write16(u64 addr, u16 v) { *(volatile u16 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline u64 read_cr3(void)
{
    u64 v;
    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void pause(void) { __asm__ volatile("pause" ::: "memory"); }
/* sti takes effect after the next instruction: an interrupt pending at sti wakes the hlt. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline void cli_hlt(void) { __asm__ volatile("cli; hlt" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* lib.c */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
/* Parse an unsigned number (base 16 accepts an optional 0x); returns 0 on success. */
int parse_u64(const char *s, int base, u64 *out);
NORETURN void halt_forever(void);
/* Fills n u32s at d with v (rep stosl). */
static inline void fill32(void *d, u32 v, size_t n)
{
    __asm__ volatile("rep stosl" : "+D"(d), "+c"(n) : "a"(v) : "memory");
}
/* Index of the first u32 in p[0..n) that is not v, or n (repe scasl). */
static inline size_t find32_ne(const void *p, u32 v, size_t n)
{
    if (!n)
        return 0;
    size_t left = n;
    int equal;
    __asm__ volatile("repe scasl" : "+D"(p), "+c"(left), "=@ccz"(equal) : "a"(v) : "memory");
    return equal ? n : n - left - 1;
}
/* CRC-32 (IEEE 802.3, as zlib's crc32()): crc32_update(0, ...) starts one. */
u32 crc32_update(u32 crc, const void *data, size_t n);

/* serial.c: COM1 console */
void serial_init(void);
void serial_enable_rx_irq(void);
void serial_putc(char c);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kvprintf(const char *fmt, va_list ap);
void serial_irq(void);
void serial_poll(void);
/* Copies the next complete line (without the newline) into buf; returns its length or -1. */
int serial_getline(char *buf, size_t size);
#define COM1_BASE 0x3f8
#define COM1_ISA_IRQ 4

/* timer.c: the TSC */
extern u64 tsc_khz;
void tsc_calibrate(void);
void tsc_report(void);
u64 tsc_deadline_us(u64 us);
int tsc_passed(u64 deadline);
void delay_us(u64 us);

/* bootinfo.c: PVH start_info, memory map, boot counter */
#define MAX_MEMMAP 64
struct memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};
struct bootinfo {
    int pvh;                /* start_info magic was right */
    u64 rsdp_paddr;
    u32 n_memmap;
    struct memmap_entry memmap[MAX_MEMMAP];
    char cmdline[256];
};
extern struct bootinfo bootinfo;
void bootinfo_copy(u32 start_info_paddr);
u32 boot_counter_bump(void);
void mem_report(void);

/* mem.c: page tables */
/* Walks the live page tables; returns 0 and the physical address if vaddr is mapped. */
int virt_to_phys(u64 vaddr, u64 *paddr);
/* Marks [paddr, paddr + size) below 4 GiB uncached in both mappings. */
void map_uncached(u64 paddr, u64 size);
/* Identity-maps an MMIO range uncached, above 4 GiB too (up to 128 TiB); 0 on success. */
int map_mmio(u64 paddr, u64 size);

/* idt.c */
void idt_init(void);
void idt_load(void);
void nmi_report(void);
void vectors_report(void);
extern volatile u64 nmi_counts[256];
/* Interrupts taken so far on test vector v (0x40..0x4f), all CPUs together. */
u64 vector_total(u8 v);
#define VEC_PIC_BASE 0x20       /* the masked 8259s, remapped out of the exception range */
#define VEC_UART 0x30
#define VEC_SCI 0x31
#define VEC_TIMER 0x32          /* LAPIC timer: only a wake-up for the command loop */
#define VEC_TEST_BASE 0x40      /* 0x40..0x4f: counted per CPU and EOIed (the `vectors` command) */
#define VEC_TEST_COUNT 16
#define VEC_SPURIOUS 0xff

/* apic.c */
extern u64 lapic_base;
void pic_disable(void);
void lapic_init(void);      /* this CPU's LAPIC: software enable, LINT NMI, others masked */
u32 lapic_id(void);
void lapic_eoi(void);
int lapic_send_ipi(u32 apic_id, u32 icr_low);
/* Periodic LAPIC timer on VEC_TIMER, about every `ms` milliseconds (a wake-up, not a clock). */
void lapic_timer_periodic(u32 ms);
void ioapic_init(void);
/* Routes an ISA IRQ (applying MADT overrides) to vector on the BSP. */
int ioapic_route_isa(u32 isa_irq, u8 vector, int default_level, int default_active_low);

/* acpi.c */
struct acpi_info {
    u64 rsdp;
    int have_fadt, have_madt;
    u32 sci_int;
    u16 smi_cmd;
    u8 acpi_enable;
    u32 pm1a_evt, pm1a_cnt, pm1b_evt, pm1b_cnt, pm_tmr, gpe0;
    u8 pm1_evt_len, pm1_cnt_len, gpe0_len;
    int pm_tmr_32bit;
    int have_reset;
    u8 reset_space;
    u64 reset_addr;
    u8 reset_value;
    u64 dsdt;
    int s5_found;
    u32 s5_typ;
    u64 madt_lapic_addr;
    u64 mcfg_base;
    u8 mcfg_bus_start, mcfg_bus_end;
};
extern struct acpi_info acpi;
struct madt_cpu {
    u32 apic_id;
    u32 uid;
};
struct madt_ioapic {
    u32 id;
    u64 addr;
    u32 gsi_base;
};
struct madt_iso {
    u8 source;
    u32 gsi;
    u16 flags;
};
struct madt_nmi {
    u32 uid;        /* 0xff / 0xffffffff: all processors */
    u16 flags;
    u8 lint;
};
#define MAX_IOAPICS 8
#define MAX_ISOS 16
#define MAX_LAPIC_NMIS 16
extern struct madt_cpu madt_cpus[MAX_CPUS];
extern u32 n_madt_cpus;
extern struct madt_ioapic madt_ioapics[MAX_IOAPICS];
extern u32 n_madt_ioapics;
extern struct madt_iso madt_isos[MAX_ISOS];
extern u32 n_madt_isos;
extern struct madt_nmi madt_nmis[MAX_LAPIC_NMIS];
extern u32 n_madt_nmis;
void acpi_init(u64 rsdp_hint);
void acpi_report(void);
void acpi_enable_events(void);
void acpi_sci_irq(void);
extern volatile int power_button_pending;
void acpi_poweroff(void);
void acpi_reset(void);

/* pci.c */
void pci_report(void);

/* smp.c */
extern volatile u32 cpus_online;
void smp_start(void);
void cpus_report(void);

#endif
