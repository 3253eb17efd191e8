/*
 * AP start trampoline. smp.c copies [tramp_start, tramp_end) to TRAMPOLINE_PADDR (0x8000) and
 * sends INIT-SIPI-SIPI with vector 0x08: the AP starts in real mode at 0800:0000. It goes
 * straight to long mode (CR0.PE and CR0.PG set together) with the BSP's page tables (pml4 is
 * below 4 GiB, so a 32-bit immediate), then jumps to ap_entry64 in the loaded image.
 */
#include "asm.h"

#define TR(sym) ((sym) - tramp_start)
#define TRP(sym) ((sym) - tramp_start + TRAMPOLINE_PADDR)

    .section .rodata.tramp, "a"
    .code16
    .globl tramp_start
tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl TR(tramp_gdt_ptr)
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmpl $GDT_CODE64, $TRP(tramp64)

    .code64
tramp64:
    movl $GDT_DATA, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movabsq $ap_entry64, %rax
    jmp *%rax

    .balign 8
tramp_gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* GDT_CODE64 */
    .quad 0x00cf93000000ffff        /* GDT_DATA */
tramp_gdt_end:
tramp_gdt_ptr:
    .word tramp_gdt_end - tramp_gdt - 1
    .long TRP(tramp_gdt)
    .globl tramp_end
tramp_end:

    .text
    .code64
    .globl ap_entry64
ap_entry64:
    lgdt gdt64_ptr
    movl $1, %eax
    lock xaddl %eax, ap_stack_next
    cmpl $(MAX_CPUS - 1), %eax
    jae 1f
    incl %eax
    shlq $AP_STACK_SHIFT, %rax
    addq $ap_stacks, %rax
    movq %rax, %rsp
    xorl %ebp, %ebp
    call ap_main
1:  cli
    hlt
    jmp 1b

    .section .bss, "aw", @nobits
    .balign 4
ap_stack_next:
    .skip 4
    .balign 4096
ap_stacks:
    .skip (MAX_CPUS - 1) << AP_STACK_SHIFT

    .section .note.GNU-stack, "", @progbits
