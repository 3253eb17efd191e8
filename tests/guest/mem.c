/* Page-table helpers over the tables built in start.S (4-level, 2 MiB pages below 4 GiB). */
#include "guest.h"

#define PTE_ADDR_MASK 0x000ffffffffff000ull

extern u64 pd[2048];

int virt_to_phys(u64 vaddr, u64 *paddr)
{
    /* Canonical addresses only. */
    u64 top = vaddr >> 47;
    if (top != 0 && top != 0x1ffff)
        return -1;
    const u64 *table = (const u64 *)(read_cr3() & PTE_ADDR_MASK);
    for (int level = 3; level >= 0; level--) {
        u64 e = table[(vaddr >> (12 + 9 * level)) & 511];
        if (!(e & PTE_P))
            return -1;
        if (level == 0 || ((level == 1 || level == 2) && (e & PTE_PS))) {
            u64 page_mask = (1ull << (12 + 9 * level)) - 1;
            *paddr = ((e & PTE_ADDR_MASK) & ~page_mask) | (vaddr & page_mask);
            return 0;
        }
        u64 next = e & PTE_ADDR_MASK;
        if (next >= (1ull << 32))
            return -1;  /* only the identity-mapped 4 GiB can be walked */
        table = (const u64 *)next;
    }
    return -1;
}

void map_uncached(u64 paddr, u64 size)
{
    if (!size || paddr >= (1ull << 32))
        return;
    u64 end = paddr + size;
    if (end > (1ull << 32))
        end = 1ull << 32;
    for (u64 i = paddr >> 21; i < (end + (1 << 21) - 1) >> 21; i++)
        pd[i] |= PTE_PWT | PTE_PCD;
    write_cr3(read_cr3());      /* flush the TLB */
}

/*
 * Identity-maps [paddr, paddr + size) uncached for MMIO (a BAR). Below 4 GiB the boot tables
 * already map it: only the cache bits change. Above 4 GiB (SeaBIOS may put a 64-bit BAR there)
 * page-table pages come from a small static pool and 2 MiB pages are added, so the BAR is
 * reached at its physical address like everything else.
 */
#define PT_POOL_PAGES 16
static u64 pt_pool[PT_POOL_PAGES][512] __attribute__((aligned(4096)));
static u32 pt_pool_used;

static u64 *pt_next_level(u64 *table, u32 index)
{
    if (!(table[index] & PTE_P)) {
        if (pt_pool_used >= PT_POOL_PAGES)
            return 0;
        u64 *page = pt_pool[pt_pool_used++];
        memset(page, 0, 4096);
        table[index] = (u64)page | PTE_P | PTE_W;
    } else if (table[index] & PTE_PS) {
        return 0;       /* a large page already covers it: not ours to split */
    }
    u64 next = table[index] & PTE_ADDR_MASK;
    if (next >= (1ull << 32))
        return 0;
    return (u64 *)next;
}

int map_mmio(u64 paddr, u64 size)
{
    if (!size || paddr + size < paddr)
        return -1;
    if (paddr + size <= (1ull << 32)) {
        map_uncached(paddr, size);
        return 0;
    }
    if (paddr < (1ull << 32) || paddr + size > (1ull << 47))
        return -1;      /* straddles 4 GiB, or beyond the lower canonical half */
    u64 *pml4 = (u64 *)(read_cr3() & PTE_ADDR_MASK);
    for (u64 a = paddr & ~0x1fffffull; a < paddr + size; a += 0x200000) {
        u64 *pdpt = pt_next_level(pml4, (a >> 39) & 511);
        if (!pdpt)
            return -1;
        u64 *pdir = pt_next_level(pdpt, (a >> 30) & 511);
        if (!pdir)
            return -1;
        pdir[(a >> 21) & 511] = a | PTE_P | PTE_W | PTE_PWT | PTE_PCD | PTE_PS;
    }
    write_cr3(read_cr3());
    return 0;
}
