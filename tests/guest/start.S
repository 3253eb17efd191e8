/*
 * PVH entry and the switch to long mode.
 *
 * The VMM (or QEMU's pvh.bin option ROM) enters pvh_start32 in 32-bit protected mode with paging
 * off and %ebx = physical address of struct hvm_start_info. The host KVM on our machines
 * (kvm_pvm) emulates 32-bit code slowly, so this stub does the minimum: the page tables are
 * built at link time (below), so only a handful of instructions run before 64-bit mode.
 */
#include "asm.h"

/* XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit physical entry point (as Linux: a pointer-sized value). */
    .section .note.Xen, "a"
    .balign 4
    .long 2f - 1f           /* namesz */
    .long 4f - 3f           /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
1:  .asciz "Xen"
2:  .balign 4
3:  .quad pvh_start32
4:  .balign 4

    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                 /* start_info, kept in %esi until kmain */
    lgdt gdt64_ptr                  /* 32-bit lgdt reads limit + low 32 bits of the base */
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $GDT_CODE64, $start64

    .code64
start64:
    movl $GDT_DATA, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    /* .bss is not in the file: clear it (after a reset it holds the previous boot's data). */
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl %esi, %edi                 /* kmain(start_info physical address) */
    call kmain
1:  cli
    hlt
    jmp 1b

/* GDT shared by the BSP and the APs (selectors in asm.h). Accessed bits preset: no writes. */
    .section .data, "aw"
    .balign 16
    .globl gdt64
gdt64:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff        /* 0x10: data */
gdt64_end:
    .balign 16
    .globl gdt64_ptr
gdt64_ptr:
    .word gdt64_end - gdt64 - 1
    .quad gdt64

/*
 * Page tables, filled at link time: the first 4 GiB identity mapped with 2 MiB pages, and the
 * same again at 0xffff800000000000 (PML4 slot 256 points at the same PDPT). 3..4 GiB (the PCI
 * hole: ECAM, IOAPIC, LAPIC, BARs) is mapped uncached (PCD|PWT); mem.c can mark more.
 */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + PTE_P + PTE_W
    .fill 255, 8, 0
    .quad pdpt + PTE_P + PTE_W       /* 0xffff800000000000 */
    .fill 255, 8, 0
    .globl pdpt
pdpt:
    .quad pd + 0x0000 + PTE_P + PTE_W
    .quad pd + 0x1000 + PTE_P + PTE_W
    .quad pd + 0x2000 + PTE_P + PTE_W
    .quad pd + 0x3000 + PTE_P + PTE_W
    .fill 508, 8, 0
    .globl pd
pd:
    .set addr, 0
    .rept 2048
    .if addr >= 0xc0000000
    .quad addr + PTE_P + PTE_W + PTE_PWT + PTE_PCD + PTE_PS
    .else
    .quad addr + PTE_P + PTE_W + PTE_PS
    .endif
    .set addr, addr + 0x200000
    .endr

    .section .bss, "aw", @nobits
    .balign 16
boot_stack:
    .skip BOOT_STACK_SIZE
    .globl boot_stack_top
boot_stack_top:

    .section .note.GNU-stack, "", @progbits
