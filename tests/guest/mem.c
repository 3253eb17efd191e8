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
