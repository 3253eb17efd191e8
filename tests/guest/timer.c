/*
 * The TSC is the only clock. Its rate comes from, in order: CPUID leaf 0x40000010 (hypervisor
 * timing leaf, TSC kHz in EAX) when the hypervisor range reaches it; the PIT (channel 2, gated by
 * port 0x61, output read back on bit 5); the ACPI PM timer from the FADT; else a guess. Every
 * calibration loop is bounded, so a machine without a PIT costs a few milliseconds, not a hang.
 */
#include "guest.h"

u64 tsc_khz;
static const char *tsc_source = "none";

static u64 from_cpuid(void)
{
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!(c & (1u << 31)))
        return 0;       /* no hypervisor: leaf 0x40000000 would alias the last basic leaf */
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a < 0x40000010 || a > 0x4000ffff)
        return 0;
    cpuid(0x40000010, 0, &a, &b, &c, &d);
    return a;
}

#define PIT_HZ 1193182ull
#define CAL_MS 20
/* Give up a calibration after what CAL_MS takes at 20 GHz (~150 ms at 2.6 GHz): a timer that
 * never fires costs that, not a hang, even where each port read is a slow exit. */
#define CAL_MAX_CYCLES (20000000ull * CAL_MS)
#define CAL_MAX_LOOPS 50000000u

static u64 from_pit(void)
{
    u8 old = inb(0x61);
    if (old == 0xff)
        return 0;       /* nothing decodes port 0x61 */
    u32 latch = (u32)(PIT_HZ * CAL_MS / 1000);
    outb(0x61, (old & ~0x02) | 0x01);       /* gate channel 2 on, speaker off */
    outb(0x43, 0xb0);                       /* channel 2, lo/hi byte, mode 0, binary */
    outb(0x42, latch & 0xff);
    outb(0x42, latch >> 8);
    u64 t0 = rdtsc(), t1;
    u32 loops = 0;
    /* Mode 0: OUT2 goes high when the count reaches zero. */
    while (!(inb(0x61) & 0x20)) {
        t1 = rdtsc();
        if (++loops > CAL_MAX_LOOPS || t1 - t0 > CAL_MAX_CYCLES) {
            outb(0x61, old);
            return 0;
        }
    }
    t1 = rdtsc();
    outb(0x61, old);
    if (loops < 2)
        return 0;       /* OUT2 high at once: no PIT behind port 0x61 */
    u64 khz = (t1 - t0) / CAL_MS;
    return khz;
}

static u64 from_pm_timer(void)
{
    if (!acpi.pm_tmr)
        return 0;
    u16 port = (u16)acpi.pm_tmr;
    u32 mask = acpi.pm_tmr_32bit ? 0xffffffffu : 0xffffffu;
    const u32 ticks = 3579545 * CAL_MS / 1000;
    u32 start = inl(port) & mask, now = start;
    u64 t0 = rdtsc();
    u32 loops = 0;
    while (((now - start) & mask) < ticks) {
        if (++loops > CAL_MAX_LOOPS || rdtsc() - t0 > CAL_MAX_CYCLES)
            return 0;
        now = inl(port) & mask;
    }
    u64 t1 = rdtsc();
    u64 elapsed_ticks = (now - start) & mask;
    return (t1 - t0) * 3579545ull / elapsed_ticks / 1000;
}

static int plausible(u64 khz) { return khz >= 100000 && khz <= 20000000; }  /* 100 MHz .. 20 GHz */

void tsc_calibrate(void)
{
    u64 khz = from_cpuid();
    tsc_source = "cpuid";
    if (!plausible(khz)) {
        khz = from_pit();
        tsc_source = "pit";
    }
    if (!plausible(khz)) {
        khz = from_pm_timer();
        tsc_source = "pmtimer";
    }
    if (!plausible(khz)) {
        khz = 2000000;
        tsc_source = "guess";
    }
    tsc_khz = khz;
}

void tsc_report(void) { kprintf("TSC khz=%lu source=%s\n", tsc_khz, tsc_source); }

u64 tsc_deadline_us(u64 us)
{
    u64 khz = tsc_khz ? tsc_khz : 2000000;
    return rdtsc() + us * khz / 1000;
}

int tsc_passed(u64 deadline) { return (i64)(rdtsc() - deadline) >= 0; }

void delay_us(u64 us)
{
    u64 end = tsc_deadline_us(us);
    while (!tsc_passed(end))
        pause();
}
