/*
 * ACPI table discovery: RSDP (PVH start_info, else EBDA and 0xE0000..0xFFFFF), XSDT/RSDT, FADT
 * (fixed hardware ports, SCI, reset register), MADT (CPUs, IOAPICs, overrides, LAPIC NMIs),
 * MCFG (ECAM) and the DSDT's \_S5 package; plus the SCI handler, power off and reset.
 */
#include "guest.h"
#include "pci.h"

struct acpi_info acpi;
struct madt_cpu madt_cpus[MAX_CPUS];
u32 n_madt_cpus;
struct madt_ioapic madt_ioapics[MAX_IOAPICS];
u32 n_madt_ioapics;
struct madt_iso madt_isos[MAX_ISOS];
u32 n_madt_isos;
struct madt_nmi madt_nmis[MAX_LAPIC_NMIS];
u32 n_madt_nmis;
volatile int power_button_pending;

#define PM1_PWRBTN (1u << 8)
#define PM1_SCI_EN (1u << 0)
#define PM1_SLP_EN (1u << 13)
#define PM1_SLP_TYP_SHIFT 10
#define FADT_RESET_REG_SUP (1u << 10)
#define FADT_TMR_VAL_EXT (1u << 8)

static u8 rd8(u64 a) { return *(const volatile u8 *)a; }
static u16 rd16(u64 a) { return *(const volatile u16 *)a; }
static u32 rd32(u64 a) { return *(const volatile u32 *)a; }
static u64 rd64(u64 a) { return (u64)rd32(a) | ((u64)rd32(a + 4) << 32); }

static int checksum_ok(u64 a, u32 len)
{
    u8 sum = 0;
    for (u32 i = 0; i < len; i++)
        sum += rd8(a + i);
    return sum == 0;
}

static int rsdp_valid(u64 a)
{
    if (!a || a >= (1ull << 32) || memcmp((const void *)a, "RSD PTR ", 8) || !checksum_ok(a, 20))
        return 0;
    if (rd8(a + 15) >= 2) {
        u32 len = rd32(a + 20);
        if (len < 36 || len > 4096 || !checksum_ok(a, len))
            return 0;
    }
    return 1;
}

static u64 rsdp_scan(u64 start, u64 end)
{
    for (u64 a = start; a + 20 <= end; a += 16)
        if (rsdp_valid(a))
            return a;
    return 0;
}

static u64 find_rsdp(u64 hint)
{
    if (rsdp_valid(hint))
        return hint;
    u64 ebda = (u64)rd16(0x40e) << 4;
    if (ebda >= 0x80000 && ebda < 0xa0000) {
        u64 a = rsdp_scan(ebda, ebda + 1024);
        if (a)
            return a;
    }
    return rsdp_scan(0xe0000, 0x100000);
}

/* A table header at a (below 4 GiB, sane length, checksum right)? */
static u32 table_len(u64 a)
{
    if (!a || a >= (1ull << 32) - 36)
        return 0;
    u32 len = rd32(a + 4);
    if (len < 36 || len > (16u << 20) || !checksum_ok(a, len))
        return 0;
    return len;
}

/* Calls fn on every table the XSDT (else RSDT) lists. */
static void for_each_table(void (*fn)(u64 table, u32 len))
{
    u64 rsdp = acpi.rsdp;
    u64 root = 0;
    u32 entry_size = 4;
    if (rd8(rsdp + 15) >= 2 && rd64(rsdp + 24) && table_len(rd64(rsdp + 24))) {
        root = rd64(rsdp + 24);
        entry_size = 8;
    } else {
        root = rd32(rsdp + 16);
    }
    u32 len = table_len(root);
    if (!len)
        return;
    for (u32 off = 36; off + entry_size <= len; off += entry_size) {
        u64 t = entry_size == 8 ? rd64(root + off) : rd32(root + off);
        u32 tl = table_len(t);
        if (tl)
            fn(t, tl);
    }
}

/* The I/O port of a FADT block: the 32-bit field, else an I/O-space X_ GAS. */
static u32 fadt_block(u64 fadt, u32 len, u32 off32, u32 off_gas)
{
    u32 v = rd32(fadt + off32);
    if (!v && len >= off_gas + 12 && rd8(fadt + off_gas) == 1)
        v = (u32)rd64(fadt + off_gas + 4);
    return v;
}

static void parse_fadt(u64 f, u32 len)
{
    if (len < 116)
        return;
    acpi.have_fadt = 1;
    acpi.sci_int = rd16(f + 46);
    acpi.smi_cmd = (u16)rd32(f + 48);
    acpi.acpi_enable = rd8(f + 52);
    acpi.pm1a_evt = fadt_block(f, len, 56, 148);
    acpi.pm1b_evt = fadt_block(f, len, 60, 160);
    acpi.pm1a_cnt = fadt_block(f, len, 64, 172);
    acpi.pm1b_cnt = fadt_block(f, len, 68, 184);
    acpi.pm_tmr = fadt_block(f, len, 76, 208);
    acpi.gpe0 = fadt_block(f, len, 80, 220);
    acpi.pm1_evt_len = rd8(f + 88);
    acpi.pm1_cnt_len = rd8(f + 89);
    acpi.gpe0_len = rd8(f + 92);
    if (!acpi.gpe0_len && len >= 232 && rd8(f + 220) == 1)
        acpi.gpe0_len = rd8(f + 221) / 8;      /* X_GPE0_BLK bit width */
    u32 flags = rd32(f + 112);
    acpi.pm_tmr_32bit = !!(flags & FADT_TMR_VAL_EXT);
    if (len >= 129 && (flags & FADT_RESET_REG_SUP) && rd64(f + 120)) {
        acpi.have_reset = 1;
        acpi.reset_space = rd8(f + 116);
        acpi.reset_addr = rd64(f + 120);
        acpi.reset_value = rd8(f + 128);
    }
    u64 dsdt = 0;
    if (len >= 148)
        dsdt = rd64(f + 140);
    if (!dsdt)
        dsdt = rd32(f + 40);
    acpi.dsdt = dsdt;
}

static void parse_madt(u64 m, u32 len)
{
    acpi.have_madt = 1;
    acpi.madt_lapic_addr = rd32(m + 36);
    for (u32 off = 44; off + 2 <= len;) {
        u8 type = rd8(m + off), elen = rd8(m + off + 1);
        if (elen < 2 || off + elen > len)
            break;
        u64 e = m + off;
        switch (type) {
        case 0:     /* processor local APIC */
            if (elen >= 8 && (rd32(e + 4) & 1) && n_madt_cpus < MAX_CPUS) {
                madt_cpus[n_madt_cpus].uid = rd8(e + 2);
                madt_cpus[n_madt_cpus].apic_id = rd8(e + 3);
                n_madt_cpus++;
            }
            break;
        case 9:     /* processor local x2APIC */
            if (elen >= 16 && (rd32(e + 8) & 1) && n_madt_cpus < MAX_CPUS) {
                madt_cpus[n_madt_cpus].apic_id = rd32(e + 4);
                madt_cpus[n_madt_cpus].uid = rd32(e + 12);
                n_madt_cpus++;
            }
            break;
        case 1:     /* IOAPIC */
            if (elen >= 12 && n_madt_ioapics < MAX_IOAPICS) {
                madt_ioapics[n_madt_ioapics].id = rd8(e + 2);
                madt_ioapics[n_madt_ioapics].addr = rd32(e + 4);
                madt_ioapics[n_madt_ioapics].gsi_base = rd32(e + 8);
                n_madt_ioapics++;
            }
            break;
        case 2:     /* interrupt source override */
            if (elen >= 10 && n_madt_isos < MAX_ISOS) {
                madt_isos[n_madt_isos].source = rd8(e + 3);
                madt_isos[n_madt_isos].gsi = rd32(e + 4);
                madt_isos[n_madt_isos].flags = rd16(e + 8);
                n_madt_isos++;
            }
            break;
        case 4:     /* local APIC NMI */
            if (elen >= 6 && n_madt_nmis < MAX_LAPIC_NMIS) {
                madt_nmis[n_madt_nmis].uid = rd8(e + 2);
                madt_nmis[n_madt_nmis].flags = rd16(e + 3);
                madt_nmis[n_madt_nmis].lint = rd8(e + 5);
                n_madt_nmis++;
            }
            break;
        case 0xa:   /* local x2APIC NMI */
            if (elen >= 12 && n_madt_nmis < MAX_LAPIC_NMIS) {
                madt_nmis[n_madt_nmis].flags = rd16(e + 2);
                madt_nmis[n_madt_nmis].uid = rd32(e + 4);
                madt_nmis[n_madt_nmis].lint = rd8(e + 8);
                n_madt_nmis++;
            }
            break;
        case 5:     /* local APIC address override */
            if (elen >= 12)
                acpi.madt_lapic_addr = rd64(e + 4);
            break;
        }
        off += elen;
    }
}

static void parse_mcfg(u64 m, u32 len)
{
    for (u32 off = 44; off + 16 <= len; off += 16) {
        if (rd16(m + off + 8) != 0)
            continue;       /* segment 0 only */
        acpi.mcfg_base = rd64(m + off);
        acpi.mcfg_bus_start = rd8(m + off + 10);
        acpi.mcfg_bus_end = rd8(m + off + 11);
        return;
    }
}

/*
 * \_S5: find the NameString "_S5_" in AML, check it is a Name() of a Package, and decode the
 * package's first element (SLP_TYPa) as ZeroOp, OneOp, OnesOp or a Byte/Word/DWordPrefix
 * constant.
 */
static int find_s5(u64 t, u32 len, u32 *typ)
{
    for (u32 i = 36 + 1; i + 4 + 3 < len; i++) {
        if (rd8(t + i) != '_' || rd8(t + i + 1) != 'S' || rd8(t + i + 2) != '5' || rd8(t + i + 3) != '_')
            continue;
        u8 before = rd8(t + i - 1);
        if (!(before == 0x08 || (before == '\\' && rd8(t + i - 2) == 0x08)))
            continue;       /* not Name(_S5, ...) */
        u32 p = i + 4;
        if (rd8(t + p) != 0x12)
            continue;       /* PackageOp */
        p++;
        u8 lead = rd8(t + p);
        p += 1 + (lead >> 6);   /* PkgLength: 0..3 more bytes */
        p++;                    /* NumElements */
        if (p + 5 > len)
            return 0;
        u8 op = rd8(t + p);
        switch (op) {
        case 0x00: *typ = 0; return 1;
        case 0x01: *typ = 1; return 1;
        case 0xff: *typ = 0xffffffff; return 1;
        case 0x0a: *typ = rd8(t + p + 1); return 1;
        case 0x0b: *typ = rd16(t + p + 1); return 1;
        case 0x0c: *typ = rd32(t + p + 1); return 1;
        default: return 0;
        }
    }
    return 0;
}

static void visit_table(u64 t, u32 len)
{
    if (!memcmp((const void *)t, "FACP", 4))
        parse_fadt(t, len);
    else if (!memcmp((const void *)t, "APIC", 4))
        parse_madt(t, len);
    else if (!memcmp((const void *)t, "MCFG", 4))
        parse_mcfg(t, len);
}

static void visit_ssdt(u64 t, u32 len)
{
    if (!acpi.s5_found && !memcmp((const void *)t, "SSDT", 4) && find_s5(t, len, &acpi.s5_typ))
        acpi.s5_found = 1;
}

void acpi_init(u64 rsdp_hint)
{
    acpi.rsdp = find_rsdp(rsdp_hint);
    if (!acpi.rsdp)
        return;
    for_each_table(visit_table);
    u32 dlen = table_len(acpi.dsdt);
    if (dlen && find_s5(acpi.dsdt, dlen, &acpi.s5_typ))
        acpi.s5_found = 1;
    if (!acpi.s5_found)
        for_each_table(visit_ssdt);
    if (acpi.madt_lapic_addr) {
        lapic_base = acpi.madt_lapic_addr;
        map_uncached(lapic_base, 0x1000);
    }
}

void acpi_report(void)
{
    kprintf("ACPI rsdp=0x%lx sci=%u pm1a_evt=0x%x pm1a_cnt=0x%x gpe0=0x%x reset=0x%lx:0x%x s5=%u\n",
            acpi.rsdp, acpi.sci_int, acpi.pm1a_evt, acpi.pm1a_cnt, acpi.gpe0,
            acpi.have_reset ? acpi.reset_addr : 0, acpi.have_reset ? acpi.reset_value : 0, acpi.s5_typ);
}

static u16 pm1_en_port(u32 evt) { return (u16)(evt + acpi.pm1_evt_len / 2); }
static u16 gpe0_en_port(void) { return (u16)(acpi.gpe0 + acpi.gpe0_len / 2); }

/*
 * Switch to ACPI mode if the firmware left SCI_EN clear, clear stale status, enable the power
 * button (PM1 PWRBTN_EN and GPE0 bit 0) and route the SCI (level, active-low unless the MADT
 * overrides it, as ACPI specifies).
 */
void acpi_enable_events(void)
{
    if (!acpi.have_fadt || !acpi.pm1a_evt)
        return;
    if (acpi.pm1a_cnt && !(inw((u16)acpi.pm1a_cnt) & PM1_SCI_EN) && acpi.smi_cmd && acpi.acpi_enable) {
        outb(acpi.smi_cmd, acpi.acpi_enable);
        u64 end = tsc_deadline_us(1000000);
        while (!(inw((u16)acpi.pm1a_cnt) & PM1_SCI_EN) && !tsc_passed(end))
            pause();
    }
    u32 evts[2] = {acpi.pm1a_evt, acpi.pm1b_evt};
    for (int i = 0; i < 2; i++) {
        if (!evts[i])
            continue;
        outw((u16)evts[i], 0xffff);                        /* clear all status bits */
        outw(pm1_en_port(evts[i]), PM1_PWRBTN);             /* only the power button */
    }
    if (acpi.gpe0 && acpi.gpe0_len >= 2) {
        for (u32 i = 0; i < acpi.gpe0_len / 2u; i++) {
            outb((u16)(gpe0_en_port() + i), 0);
            outb((u16)(acpi.gpe0 + i), 0xff);
        }
        outb(gpe0_en_port(), 0x01);                         /* GPE0 bit 0: power button */
    }
    if (acpi.sci_int < 256)
        ioapic_route_isa(acpi.sci_int, VEC_SCI, 1, 1);
}

void acpi_sci_irq(void)
{
    u32 evts[2] = {acpi.pm1a_evt, acpi.pm1b_evt};
    for (int i = 0; i < 2; i++) {
        if (!evts[i])
            continue;
        u16 sts = inw((u16)evts[i]) & inw(pm1_en_port(evts[i]));
        if (sts) {
            outw((u16)evts[i], sts);        /* write 1 to clear */
            if (sts & PM1_PWRBTN)
                power_button_pending = 1;
        }
    }
    if (acpi.gpe0 && acpi.gpe0_len >= 2) {
        for (u32 i = 0; i < acpi.gpe0_len / 2u; i++) {
            u8 sts = inb((u16)(acpi.gpe0 + i)) & inb((u16)(gpe0_en_port() + i));
            if (!sts)
                continue;
            outb((u16)(acpi.gpe0 + i), sts);
            if (i == 0 && (sts & 1))
                power_button_pending = 1;
        }
    }
}

void acpi_poweroff(void)
{
    kprintf("POWEROFF\n");
    if (!acpi.pm1a_cnt) {
        kprintf("ERR poweroff no-pm1a-cnt\n");
        return;
    }
    cli();
    u32 cnts[2] = {acpi.pm1a_cnt, acpi.pm1b_cnt};
    for (int i = 0; i < 2; i++) {
        if (!cnts[i])
            continue;
        u16 v = inw((u16)cnts[i]) & ~(7u << PM1_SLP_TYP_SHIFT);
        v |= (u16)((acpi.s5_typ & 7) << PM1_SLP_TYP_SHIFT);
        outw((u16)cnts[i], v);
        outw((u16)cnts[i], v | PM1_SLP_EN);
    }
    delay_us(1000000);
    sti();
    kprintf("ERR poweroff still-running\n");
}

void acpi_reset(void)
{
    kprintf("RESETTING\n");
    cli();
    if (acpi.have_reset) {
        switch (acpi.reset_space) {
        case 0:     /* system memory */
            if (acpi.reset_addr < (1ull << 32))
                mmio_write8(acpi.reset_addr, acpi.reset_value);
            break;
        case 1:     /* system I/O */
            outb((u16)acpi.reset_addr, acpi.reset_value);
            break;
        case 2: {   /* PCI config space of bus 0: device << 32 | function << 16 | offset */
            u8 dev = (acpi.reset_addr >> 32) & 0x1f, fn = (acpi.reset_addr >> 16) & 7;
            pci_cf8_write8(0, dev, fn, acpi.reset_addr & 0xff, acpi.reset_value);
            break;
        }
        }
    } else {
        outb(0x64, 0xfe);   /* no ACPI reset register: the keyboard controller, as Linux does */
    }
    delay_us(1000000);
    sti();
    kprintf("ERR reset still-running\n");
}
