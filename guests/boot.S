/*
 * boot.S - entry code shared by all sealvm test guests.
 *
 * Three ways in, all ending in cpu_setup, which loads the GDT/TSS/IDT and the
 * SYSCALL MSRs for this vCPU and drops to CPL3 in cpu_start(cpu, start_info):
 *
 *   entry32     PVH entry (ELF note XEN_ELFNOTE_PHYS32_ENTRY): 32-bit flat
 *               protected mode, paging off, EBX = hvm_start_info.
 *   entry64     e_entry: 64-bit CPL0 with the loader's identity map,
 *               RBX = hvm_start_info.
 *   ap_entry64  secondary vCPUs: 64-bit CPL0, RDI = vCPU index (1..N-1),
 *               RBX = hvm_start_info.
 *
 * Everything after the drop runs at CPL3 (native speed under kvm_pvm).  Port
 * I/O from CPL3: IOPL=3 allows every port on TCG, VT-x and SVM; kvm_pvm
 * strips IOPL but honours the TSS I/O permission bitmap, which every vCPU's
 * TSS points at (iopb below: the exit port, COM1 and the 0x510 sink), so
 * those ports exit straight to the monitor with no fault.  The CPL0 pieces
 * left are the syscall gate, which performs port I/O for CPL3 code when a
 * plain in/out is not allowed and returns with a hand-built IRETQ frame
 * (SYSRETQ faults under kvm_pvm), and the exception entry stubs.
 *
 * Page tables are static: 4 GiB identity mapped with 2 MiB pages, U/S set at
 * every level so that CPL3 code can reach all of it (IDT, MMIO).  3-4 GiB
 * (device space) is mapped uncached.
 */
#include "layout.h"

#define MSR_EFER        0xc0000080
#define MSR_STAR        0xc0000081
#define MSR_LSTAR       0xc0000082
#define MSR_FMASK       0xc0000084
#define EFER_SCE        0x001
#define EFER_LME        0x100

/* ---------------------------------------------------------------- PVH note */
        .section .note.pvh, "a", @note
        .balign 4
        .long   4                       /* n_namesz: "Xen\0" */
        .long   8                       /* n_descsz: QEMU reads a 64-bit value */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .quad   entry32

/* ------------------------------------------------------------- entry code */
        .section .text.boot, "ax", @progbits

        .code32
        .globl  entry32
entry32:
        cli
        cld
        movl    %ebx, %esi              /* keep start_info across the switch */
        lgdt    gdt_desc                /* 6-byte form: limit + low 32 bits of base */
        movl    %cr4, %eax
        orl     $0x20, %eax             /* CR4.PAE */
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $(EFER_LME | EFER_SCE), %eax
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax       /* CR0.PG | CR0.PE */
        movl    %eax, %cr0
        ljmp    $SEL_KCODE, $from32

        .code64
from32:
        movl    %esi, %ebx              /* zero-extends: RBX = start_info */
        xorl    %edi, %edi              /* boot CPU */
        jmp     load_segments

        .globl  entry64
entry64:
        cli
        cld
        xorl    %edi, %edi              /* boot CPU; RBX = start_info already */
        jmp     reload

        .globl  ap_entry64
ap_entry64:
        cli
        cld
        /* RDI = vCPU index, RBX = start_info */

reload:                                 /* long mode, loader's GDT and tables, no stack */
        lgdt    gdt_desc(%rip)
        movl    $pml4, %eax
        movq    %rax, %cr3
        ljmpl   *load_segments_ptr(%rip) /* CS = SEL_KCODE (m16:32 far pointer) */

load_segments:
        movl    $SEL_KDATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs

/*
 * Per-CPU setup.  In: EDI = CPU index, RBX = start_info.  Clobbers RAX, RCX,
 * RDX, RSI, R8.
 */
cpu_setup:
        cmpl    $MAX_CPUS, %edi
        jae     too_many_cpus
        movl    %edi, %edi

        /* CPL0 stack: top of kstacks[cpu] */
        movq    %rdi, %rax
        shlq    $KSTACK_SHIFT, %rax
        leaq    kstacks + KSTACK_SIZE(%rax), %rsp

        /*
         * TSS: tss_area + cpu * 128; RSP0 = this stack.  Every TSS shares the
         * one I/O bitmap `iopb` that follows tss_area: the I/O map base
         * (offset 102) is iopb's distance from this TSS, and the TSS limit
         * runs to the bitmap's last byte (the 0xff terminator).
         */
        movq    %rdi, %rsi
        shlq    $TSS_SHIFT, %rsi
        movl    $(iopb - tss_area), %r8d
        subl    %esi, %r8d              /* R8 = I/O map base of this TSS */
        leaq    tss_area(%rsi), %rsi
        movq    %rsp, 4(%rsi)
        movw    %r8w, 102(%rsi)
        addl    $(iopb_end - iopb - 1), %r8d /* R8 = TSS limit (< 64 KiB) */

        /* 16-byte TSS descriptor at gdt + SEL_TSS0 + cpu * 16 */
        movq    %rdi, %rcx
        shlq    $4, %rcx
        leaq    gdt + SEL_TSS0(%rcx), %rcx
        movq    %rsi, %rax
        andl    $0xffffff, %eax         /* base 23:0 -> bits 39:16 */
        shlq    $16, %rax
        movq    %rsi, %rdx
        shrq    $24, %rdx               /* base 31:24 -> bits 63:56 */
        shlq    $56, %rdx
        orq     %rdx, %rax
        movabsq $0x0000890000000000, %rdx /* present, 64-bit TSS (available) */
        orq     %rdx, %rax
        orq     %r8, %rax               /* limit 15:0 */
        movq    %rax, (%rcx)
        movq    $0, 8(%rcx)             /* base 63:32 = 0 */
        movl    %edi, %eax
        shll    $4, %eax
        addl    $SEL_TSS0, %eax
        ltr     %ax

        lidt    idt_desc(%rip)          /* entries are filled at CPL3 by idt_init() */

        /* SYSCALL: EFER.SCE, selectors, entry, mask TF|IF|DF */
        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $EFER_SCE, %eax
        wrmsr
        movl    $MSR_STAR, %ecx
        xorl    %eax, %eax
        movl    $((SEL_KDATA << 16) | SEL_KCODE), %edx
        wrmsr
        movl    $MSR_LSTAR, %ecx
        movl    $syscall_entry, %eax
        xorl    %edx, %edx
        wrmsr
        movl    $MSR_FMASK, %ecx
        movl    $0x700, %eax
        wrmsr

        /* Drop to CPL3: cpu_start(cpu, start_info) on ustacks[cpu], IOPL=3 */
        movq    %rdi, %rax
        shlq    $USTACK_SHIFT, %rax
        leaq    ustacks + USTACK_SIZE - 8(%rax), %rax
        movq    $0, (%rax)              /* fake return address */
        movq    %rbx, %rsi
        pushq   $SEL_UDATA
        pushq   %rax
        pushq   $0x3002
        pushq   $SEL_UCODE
        pushq   $cpu_start
        iretq

too_many_cpus:                          /* no stack for this index: stay here */
        pause
        jmp     too_many_cpus

/*
 * The syscall gate (CPL0).  In: EDI = operation, EDX = port, EAX = value,
 * RSI = buffer and R8 = count for GATE_WRITE.  Out: EAX = value read.
 * Clobbers RCX, R11 (SYSCALL), RSI and R8.  Runs on the caller's stack.
 */
        .balign 16
syscall_entry:
        cmpq    $GATE_NOPS, %rdi
        jae     gate_return
        jmp     *gate_ops(, %rdi, 8)
gate_outb:
        outb    %al, %dx
        jmp     gate_return
gate_outw:
        outw    %ax, %dx
        jmp     gate_return
gate_outl:
        outl    %eax, %dx
        jmp     gate_return
gate_inb:
        inb     %dx, %al
        jmp     gate_return
gate_inw:
        inw     %dx, %ax
        jmp     gate_return
gate_inl:
        inl     %dx, %eax
        jmp     gate_return
gate_write:
        testq   %r8, %r8
        jz      gate_return
1:      movb    (%rsi), %al
        outb    %al, %dx
        incq    %rsi
        decq    %r8
        jnz     1b
gate_return:                            /* IRETQ back to CPL3 (SYSRETQ #GPs on kvm_pvm) */
        movq    %rsp, %rsi
        pushq   $SEL_UDATA
        pushq   %rsi
        pushq   %r11
        pushq   $SEL_UCODE
        pushq   %rcx
        iretq

        .section .rodata
        .balign 8
load_segments_ptr:
        .long   load_segments
        .word   SEL_KCODE

        .balign 8
gate_ops:
        .quad   gate_outb, gate_outw, gate_outl
        .quad   gate_inb, gate_inw, gate_inl
        .quad   gate_write, gate_return

/*
 * Exception entry stubs, 16 bytes apart: exc_stubs + 16 * vector.  Each
 * pushes a zero error code where the CPU does not, then the vector number,
 * and joins exc_common, which saves the registers and calls
 * exc_handler(struct exc_frame *) at CPL0.
 */
        .section .text.boot, "ax", @progbits
        .balign 16
        .globl  exc_stubs
exc_stubs:
        .set    .Lvec, 0
        .rept   IDT_ENTRIES
        .balign 16
        .if (.Lvec == 8) || (.Lvec == 10) || (.Lvec == 11) || (.Lvec == 12) || (.Lvec == 13) || (.Lvec == 14) || (.Lvec == 17) || (.Lvec == 21) || (.Lvec == 29) || (.Lvec == 30)
        .else
        pushq   $0
        .endif
        pushq   $.Lvec
        jmp     exc_common
        .set    .Lvec, .Lvec + 1
        .endr

exc_common:
        pushq   %rax
        pushq   %rbx
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %rbp
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        movq    %rsp, %rdi
        call    exc_handler             /* returns only if the fault was handled */
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rbp
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rbx
        popq    %rax
        addq    $16, %rsp               /* vector, error code */
        iretq

/* ------------------------------------------------------------------- data */
        .data
        .balign 16
        .globl  gdt
gdt:
        .quad   0
        .quad   0x00af9a000000ffff      /* 0x08 kernel code, 64-bit */
        .quad   0x00cf92000000ffff      /* 0x10 kernel data */
        .quad   0x00cff2000000ffff      /* 0x18 user data, DPL3 */
        .quad   0x00affa000000ffff      /* 0x20 user code, 64-bit, DPL3 */
        .fill   MAX_CPUS * 2, 8, 0      /* 0x28 + 16 * cpu: TSS descriptors */
gdt_end:

        .balign 8
        .word   0
gdt_desc:
        .word   gdt_end - gdt - 1
        .quad   gdt

        .balign 8
        .word   0
idt_desc:
        .word   IDT_ENTRIES * 16 - 1
        .quad   idt

/* Static identity map of the first 4 GiB with 2 MiB pages. */
        .section .data.pagetables, "aw", @progbits
        .balign 4096
pml4:
        .quad   pdpt + 0x7              /* P | RW | US */
        .fill   511, 8, 0
pdpt:
        .quad   pd + 0x0000 + 0x7
        .quad   pd + 0x1000 + 0x7
        .quad   pd + 0x2000 + 0x7
        .quad   pd + 0x3000 + 0x7
        .fill   508, 8, 0
pd:
        .set    .Lpde, 0
        .rept   1536                    /* 0-3 GiB: RAM, write-back */
        .quad   (.Lpde << 21) | 0x87        /* P | RW | US | PS */
        .set    .Lpde, .Lpde + 1
        .endr
        .rept   512                     /* 3-4 GiB: device space, uncached */
        .quad   (.Lpde << 21) | 0x9f        /* P | RW | US | PWT | PCD | PS */
        .set    .Lpde, .Lpde + 1
        .endr

/*
 * Per-CPU TSSs and the I/O permission bitmap they share (static data, so the
 * bitmap is in place before any CPL3 code runs).  A 0 bit allows a port.
 * The bitmap covers ports 0-0x517; ports above it lie beyond the TSS limit
 * and are denied.  The CPU reads two bitmap bytes per access, hence the
 * trailing 0xff byte.  Keep the open ports in step with IOPB_* in layout.h.
 */
        .data
        .balign 128
tss_area:
        .fill   MAX_CPUS << TSS_SHIFT, 1, 0
iopb:
        .fill   IOPB_EXIT_PORT / 8, 1, 0xff                     /* 0x000-0x0ef */
        .byte   0x0f                                            /* 0xf4-0xf7 open */
        .fill   IOPB_COM1 / 8 - IOPB_EXIT_PORT / 8 - 1, 1, 0xff
        .byte   0x00                                            /* 0x3f8-0x3ff open */
        .fill   IOPB_SINK_PORT / 8 - IOPB_COM1 / 8 - 1, 1, 0xff
        .byte   0xfe                                            /* 0x510 open */
        .byte   0xff                                            /* terminator */
iopb_end:

/* Per-CPU stacks; the IDT (filled by idt_init at CPL3). */
        .bss
        .balign 4096
        .globl  kstacks, ustacks
kstacks:
        .skip   MAX_CPUS << KSTACK_SHIFT
ustacks:
        .skip   MAX_CPUS << USTACK_SHIFT
        .balign 16
        .globl  idt
idt:
        .skip   IDT_ENTRIES * 16

        .section .note.GNU-stack, "", @progbits
