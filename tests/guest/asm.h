/* Constants shared by the assembly files (and C, where guarded). */
#ifndef GUEST_ASM_H
#define GUEST_ASM_H

#define CR0_PE          0x00000001
#define CR0_PG          0x80000000
#define CR4_PAE         0x00000020
#define MSR_EFER        0xc0000080
#define EFER_LME        0x00000100

#define GDT_CODE64      0x08
#define GDT_DATA        0x10

#define PTE_P           0x001
#define PTE_W           0x002
#define PTE_PWT         0x008
#define PTE_PCD         0x010
#define PTE_PS          0x080

#define BOOT_STACK_SIZE 0x10000

/* AP start: trampoline page (SIPI vector 0x08), per-AP stacks. */
#define TRAMPOLINE_PADDR 0x8000
#define MAX_CPUS        64
#define AP_STACK_SHIFT  14              /* 16 KiB per AP */

#endif
