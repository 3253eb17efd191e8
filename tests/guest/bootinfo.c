/*
 * PVH start_info: copied into the image first thing, before the guest writes anything below
 * 1 MiB (boot counter at 0x5000, AP trampoline at 0x8000), wherever the loader put it.
 */
#include "guest.h"

#define HVM_START_MAGIC 0x336ec578
#define BOOT_COUNTER_PADDR 0x5000
#define BOOT_COUNTER_MAGIC 0xf10771a5

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    /* version >= 1 */
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct bootinfo bootinfo;

void bootinfo_copy(u32 start_info_paddr)
{
    const struct hvm_start_info *si = (const void *)(u64)start_info_paddr;
    if (!start_info_paddr || si->magic != HVM_START_MAGIC)
        return;
    bootinfo.pvh = 1;
    bootinfo.rsdp_paddr = si->rsdp_paddr;
    if (si->cmdline_paddr && si->cmdline_paddr < (1ull << 32)) {
        const char *c = (const char *)si->cmdline_paddr;
        u32 i;
        for (i = 0; i < sizeof(bootinfo.cmdline) - 1 && c[i]; i++)
            bootinfo.cmdline[i] = c[i];
        bootinfo.cmdline[i] = 0;
    }
    if (si->version >= 1 && si->memmap_paddr && si->memmap_paddr < (1ull << 32)) {
        u32 n = si->memmap_entries;
        if (n > MAX_MEMMAP)
            n = MAX_MEMMAP;
        memcpy(bootinfo.memmap, (const void *)si->memmap_paddr, n * sizeof(struct memmap_entry));
        bootinfo.n_memmap = n;
    }
}

/* Boots since power-on: RAM survives a reset, so the counter at 0x5000 keeps counting. */
u32 boot_counter_bump(void)
{
    volatile u32 *bc = (volatile u32 *)BOOT_COUNTER_PADDR;
    if (bc[0] != BOOT_COUNTER_MAGIC) {
        bc[0] = BOOT_COUNTER_MAGIC;
        bc[1] = 0;
    }
    bc[1] = bc[1] + 1;
    return bc[1];
}

void mem_report(void)
{
    u64 total = 0;
    for (u32 i = 0; i < bootinfo.n_memmap; i++)
        if (bootinfo.memmap[i].type == 1)
            total += bootinfo.memmap[i].size;
    kprintf("MEM total=%lu entries=%u\n", total, bootinfo.n_memmap);
    for (u32 i = 0; i < bootinfo.n_memmap; i++) {
        const struct memmap_entry *e = &bootinfo.memmap[i];
        kprintf("E820 0x%lx 0x%lx %u\n", e->addr, e->addr + e->size, e->type);
    }
}
