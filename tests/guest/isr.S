/*
 * Interrupt entry stubs: one 16-byte stub per vector (isr_stubs + 16 * vector), each pushing
 * a zero error code where the CPU pushes none, then the vector, then jumping to isr_common,
 * which saves the general registers and calls isr_dispatch(struct isr_frame *) (idt.c).
 * The C code is built with -mgeneral-regs-only, so no FPU/SSE state needs saving.
 */
    .text
    .code64
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cld
    movq %rsp, %rdi
    /* 64-bit interrupt delivery aligns the stack to 16 before pushing 5 words; with the error
     * code, vector and 15 registers the frame is 22 words: %rsp is 16-byte aligned here. */
    call isr_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

    .section .note.GNU-stack, "", @progbits
