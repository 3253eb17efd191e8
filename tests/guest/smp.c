/*
 * AP start: INIT-SIPI-SIPI to every enabled LAPIC in the MADT but ours, all at once, with a
 * bounded wait. Each AP comes up through tramp.S into ap_main, marks itself online and parks in
 * hlt with interrupts on: nothing is routed to it but what the host sends (NMIs, MSIs on the test
 * vectors), which idt.c counts.
 */
#include "guest.h"

#define ICR_INIT 0x00000500
#define ICR_STARTUP 0x00000600
#define ICR_LEVEL_ASSERT 0x00004000
#define ICR_LEVEL_TRIGGER 0x00008000
#define AP_WAIT_US 1000000      /* after the last SIPI */

extern char tramp_start[], tramp_end[];
volatile u32 cpus_online;           /* set in smp_start (BSP included) */
static volatile u8 ap_up[256];      /* by APIC id (low byte) */
static u32 bsp_id;

void ap_main(void)
{
    idt_load();
    lapic_init();
    u32 id = lapic_id();
    ap_up[id & 0xff] = 1;
    __atomic_fetch_add(&cpus_online, 1, __ATOMIC_SEQ_CST);
    for (;;)
        sti_hlt();
}

void smp_start(void)
{
    /* Set here, not by an initializer: nothing may depend on .data being reloaded on reset. */
    cpus_online = 1;
    if (!lapic_base || n_madt_cpus < 2)
        return;
    bsp_id = lapic_id();
    memcpy((void *)TRAMPOLINE_PADDR, tramp_start, tramp_end - tramp_start);
    __asm__ volatile("mfence" ::: "memory");

    u32 expected = 1;
    for (u32 i = 0; i < n_madt_cpus; i++) {
        u32 id = madt_cpus[i].apic_id;
        if (id == bsp_id || id > 0xff || expected >= MAX_CPUS)
            continue;
        expected++;
        lapic_send_ipi(id, ICR_INIT | ICR_LEVEL_ASSERT | ICR_LEVEL_TRIGGER);
        lapic_send_ipi(id, ICR_INIT | ICR_LEVEL_TRIGGER);      /* deassert (old CPUs need it) */
    }
    delay_us(10000);
    for (int round = 0; round < 2; round++) {
        for (u32 i = 0, n = 1; i < n_madt_cpus && n < MAX_CPUS; i++) {
            u32 id = madt_cpus[i].apic_id;
            if (id == bsp_id || id > 0xff)
                continue;
            n++;
            if (!ap_up[id])
                lapic_send_ipi(id, ICR_STARTUP | (TRAMPOLINE_PADDR >> 12));
        }
        delay_us(round == 0 ? 200 : 0);
    }
    u64 end = tsc_deadline_us(AP_WAIT_US);
    while (cpus_online < expected && !tsc_passed(end))
        pause();
}

void cpus_report(void) { kprintf("CPUS madt=%u online=%u\n", n_madt_cpus, cpus_online); }
