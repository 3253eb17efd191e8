/* PCI configuration access, bus scan, BAR sizing, capabilities; and the PCI/ECAM report. */
#include "pci.h"

#define CF8_ADDR 0xcf8
#define CF8_DATA 0xcfc

u64 pci_ecam_base;
u8 pci_ecam_bus_start, pci_ecam_bus_end;

static u32 cf8_addr(u8 bus, u8 dev, u8 fn, u16 off)
{
    return 0x80000000u | (u32)bus << 16 | (u32)(dev & 0x1f) << 11 | (u32)(fn & 7) << 8 | (off & 0xfc);
}

u32 pci_cf8_read32(u8 bus, u8 dev, u8 fn, u16 off)
{
    outl(CF8_ADDR, cf8_addr(bus, dev, fn, off));
    return inl(CF8_DATA);
}

void pci_cf8_write32(u8 bus, u8 dev, u8 fn, u16 off, u32 v)
{
    outl(CF8_ADDR, cf8_addr(bus, dev, fn, off));
    outl(CF8_DATA, v);
}

void pci_cf8_write8(u8 bus, u8 dev, u8 fn, u16 off, u8 v)
{
    outl(CF8_ADDR, cf8_addr(bus, dev, fn, off));
    outb(CF8_DATA + (off & 3), v);
}

void pci_ecam_init(u64 base, u8 bus_start, u8 bus_end)
{
    /* The guest maps only the first 4 GiB. */
    if (!base || base >= (1ull << 32) || bus_end < bus_start)
        return;
    pci_ecam_base = base;
    pci_ecam_bus_start = bus_start;
    pci_ecam_bus_end = bus_end;
    u64 size = ((u64)bus_end + 1) << 20;
    if (base + size > (1ull << 32))
        size = (1ull << 32) - base;
    map_uncached(base, size);
}

int pci_ecam_present(u8 bus)
{
    return pci_ecam_base && bus >= pci_ecam_bus_start && bus <= pci_ecam_bus_end &&
           pci_ecam_base + (((u64)bus + 1) << 20) <= (1ull << 32);
}

static u64 ecam_addr(u8 bus, u8 dev, u8 fn, u16 off)
{
    /* The MCFG base address is the address of bus 0, whatever its start bus. */
    return pci_ecam_base + ((u64)bus << 20 | (u64)(dev & 0x1f) << 15 | (u64)(fn & 7) << 12 | (off & 0xffc));
}

u32 pci_ecam_read32(u8 bus, u8 dev, u8 fn, u16 off) { return mmio_read32(ecam_addr(bus, dev, fn, off)); }

void pci_ecam_write32(u8 bus, u8 dev, u8 fn, u16 off, u32 v) { mmio_write32(ecam_addr(bus, dev, fn, off), v); }

u32 pci_read32(const struct pci_dev *d, u16 off)
{
    if (pci_ecam_present(d->bus))
        return pci_ecam_read32(d->bus, d->dev, d->fn, off);
    return off < 256 ? pci_cf8_read32(d->bus, d->dev, d->fn, off) : 0xffffffffu;
}

void pci_write32(const struct pci_dev *d, u16 off, u32 v)
{
    if (pci_ecam_present(d->bus))
        pci_ecam_write32(d->bus, d->dev, d->fn, off, v);
    else if (off < 256)
        pci_cf8_write32(d->bus, d->dev, d->fn, off, v);
}

u16 pci_read16(const struct pci_dev *d, u16 off) { return (u16)(pci_read32(d, off & ~3) >> ((off & 2) * 8)); }

u8 pci_read8(const struct pci_dev *d, u16 off) { return (u8)(pci_read32(d, off & ~3) >> ((off & 3) * 8)); }

void pci_write16(const struct pci_dev *d, u16 off, u16 v)
{
    if (pci_ecam_present(d->bus)) {
        mmio_write16(ecam_addr(d->bus, d->dev, d->fn, off & ~3) + (off & 2), v);
    } else if (off < 256) {
        outl(CF8_ADDR, cf8_addr(d->bus, d->dev, d->fn, off));
        outw(CF8_DATA + (off & 2), v);
    }
}

void pci_write8(const struct pci_dev *d, u16 off, u8 v)
{
    if (pci_ecam_present(d->bus))
        mmio_write8(ecam_addr(d->bus, d->dev, d->fn, off & ~3) + (off & 3), v);
    else if (off < 256)
        pci_cf8_write8(d->bus, d->dev, d->fn, off, v);
}

int pci_scan_bus(u8 bus, struct pci_dev *out, int max)
{
    int n = 0;
    for (u8 dev = 0; dev < 32; dev++) {
        u8 nfn = 1;
        for (u8 fn = 0; fn < nfn; fn++) {
            u32 id = pci_cf8_read32(bus, dev, fn, 0);
            if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
                continue;
            u32 hdr = pci_cf8_read32(bus, dev, fn, 0x0c);
            if (fn == 0 && (hdr & 0x00800000))
                nfn = 8;    /* multi-function device */
            if (n < max) {
                struct pci_dev *d = &out[n];
                d->bus = bus;
                d->dev = dev;
                d->fn = fn;
                d->vendor = id & 0xffff;
                d->device = id >> 16;
                d->class_code = pci_cf8_read32(bus, dev, fn, 0x08) >> 8;
                d->header_type = (hdr >> 16) & 0x7f;
            }
            n++;
        }
    }
    return n < max ? n : max;
}

int pci_find_device(u16 vendor, u16 device, int index, struct pci_dev *out)
{
    struct pci_dev devs[64];
    int n = pci_scan_bus(0, devs, 64);
    for (int i = 0; i < n; i++) {
        if ((vendor == 0xffff || devs[i].vendor == vendor) && (device == 0xffff || devs[i].device == device)) {
            if (index-- == 0) {
                *out = devs[i];
                return 0;
            }
        }
    }
    return -1;
}

int pci_bar_probe(const struct pci_dev *d, int n, struct pci_bar *bar)
{
    memset(bar, 0, sizeof(*bar));
    if (n < 0 || n > 5)
        return 1;
    u16 off = PCI_BAR0 + 4 * n;
    u32 lo = pci_read32(d, off);
    u16 cmd = pci_read16(d, PCI_COMMAND);
    pci_write16(d, PCI_COMMAND, cmd & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));
    int used = 1;
    if (lo & 1) {
        bar->is_io = 1;
        pci_write32(d, off, 0xffffffffu);
        u32 mask = pci_read32(d, off) & ~3u & 0xffff;
        pci_write32(d, off, lo);
        bar->addr = lo & ~3u;
        bar->size = mask ? (~mask + 1) & 0xffff : 0;
    } else {
        bar->prefetchable = !!(lo & 8);
        pci_write32(d, off, 0xffffffffu);
        u32 mask_lo = pci_read32(d, off) & ~0xfu;
        pci_write32(d, off, lo);
        bar->addr = lo & ~0xfull;
        if (((lo >> 1) & 3) == 2 && n < 5) {
            bar->is_64 = 1;
            used = 2;
            u32 hi = pci_read32(d, off + 4);
            pci_write32(d, off + 4, 0xffffffffu);
            u64 mask = (u64)pci_read32(d, off + 4) << 32 | mask_lo;
            pci_write32(d, off + 4, hi);
            bar->addr |= (u64)hi << 32;
            bar->size = mask ? ~mask + 1 : 0;
        } else {
            bar->size = mask_lo ? (u32)(~mask_lo + 1) : 0;
        }
    }
    pci_write16(d, PCI_COMMAND, cmd);
    return used;
}

void pci_bar_set(const struct pci_dev *d, int n, u64 addr)
{
    u16 off = PCI_BAR0 + 4 * n;
    u32 lo = pci_read32(d, off);
    pci_write32(d, off, (u32)addr | (lo & 0xf));
    if (!(lo & 1) && ((lo >> 1) & 3) == 2)
        pci_write32(d, off + 4, (u32)(addr >> 32));
}

u8 pci_find_cap(const struct pci_dev *d, u8 id, u8 start)
{
    if (!(pci_read16(d, PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return 0;
    u8 p = start ? pci_read8(d, start + 1) : pci_read8(d, PCI_CAP_PTR);
    for (int guard = 0; p >= 0x40 && guard < 48; guard++) {
        p &= 0xfc;
        if (pci_read8(d, p) == id)
            return p;
        p = pci_read8(d, p + 1);
    }
    return 0;
}

void pci_enable(const struct pci_dev *d, u16 command_bits)
{
    pci_write16(d, PCI_COMMAND, pci_read16(d, PCI_COMMAND) | command_bits);
}

/*
 * The report: every bus-0 function found through 0xcf8, then whether ECAM agrees: the first 64
 * bytes of every found function, and all-ones vendor IDs for every absent slot 0 function.
 */
void pci_report(void)
{
    struct pci_dev devs[64];
    int n = pci_scan_bus(0, devs, 64);
    for (int i = 0; i < n; i++)
        kprintf("PCI %02x:%02x.%u vendor=%04x device=%04x class=%06x\n", devs[i].bus, devs[i].dev,
                devs[i].fn, devs[i].vendor, devs[i].device, devs[i].class_code);
    int match = 0;
    if (pci_ecam_present(0)) {
        match = 1;
        for (int i = 0; i < n && match; i++)
            for (u16 off = 0; off < 64; off += 4)
                if (pci_ecam_read32(0, devs[i].dev, devs[i].fn, off) !=
                    pci_cf8_read32(0, devs[i].dev, devs[i].fn, off))
                    match = 0;
        for (u8 dev = 0; dev < 32 && match; dev++)
            if ((pci_cf8_read32(0, dev, 0, 0) & 0xffff) == 0xffff &&
                (pci_ecam_read32(0, dev, 0, 0) & 0xffff) != 0xffff)
                match = 0;
    }
    kprintf("ECAM base=0x%lx match=%s\n", pci_ecam_base, match ? "yes" : "no");
}
