/*
 * layout.h - constants shared by boot.S, guest.ld users and the C runtime:
 * segment selectors, per-CPU stack sizes, syscall-gate operation numbers and
 * I/O modes.  Usable from both assembly and C.
 */
#ifndef GUEST_LAYOUT_H
#define GUEST_LAYOUT_H

/* GDT selectors (see gdt in boot.S). */
#define SEL_KCODE       0x08    /* 64-bit kernel code, DPL0 */
#define SEL_KDATA       0x10    /* kernel data, DPL0 */
#define SEL_UDATA       0x1b    /* user data, DPL3 (0x18 | RPL 3) */
#define SEL_UCODE       0x23    /* 64-bit user code, DPL3 (0x20 | RPL 3) */
#define SEL_TSS0        0x28    /* first TSS descriptor; CPU i uses 0x28 + 16*i */

/* Per-CPU resources, chosen by the vCPU index (0 = boot CPU). */
#define MAX_CPUS        64      /* sealvm's limit; the stacks must fit below 2 MiB */
#define KSTACK_SHIFT    12      /* 4 KiB CPL0 stack per CPU (exceptions only) */
#define USTACK_SHIFT    13      /* 8 KiB CPL3 stack per CPU */
#define KSTACK_SIZE     4096
#define USTACK_SIZE     8192
#define TSS_SHIFT       7       /* 128-byte slot per TSS (104 used) */

/* The number of IDT entries filled (CPU exceptions only; IF is never set). */
#define IDT_ENTRIES     32

/* Syscall gate operations (EDI); port in EDX, value in EAX, buffer RSI, count R8. */
#define GATE_OUTB       0
#define GATE_OUTW       1
#define GATE_OUTL       2
#define GATE_INB        3
#define GATE_INW        4
#define GATE_INL        5
#define GATE_WRITE      6       /* outb each of R8 bytes at RSI to port DX */
#define GATE_NOP        7       /* round trip only (for measurements) */
#define GATE_NOPS       8

/* io_mode: how CPL3 code reaches I/O ports. */
#define IO_DIRECT       0       /* plain in/out at CPL3: IOPL=3 (TCG, VT-x, SVM) or the
                                   TSS I/O bitmap (kvm_pvm strips IOPL but honours it) */
#define IO_GATE         1       /* syscall gate for every port (the bitmap is not honoured) */
#define IO_IOPB         2       /* plain in/out for the bitmap's ports, the gate for others */

/*
 * Ports the TSS I/O permission bitmap opens to CPL3 (iopb in boot.S; keep the
 * two in step): the isa-debug-exit / sealvm exit port, COM1, and the exits
 * guest's port sink.  Every other port is denied by the bitmap.
 */
#define IOPB_EXIT_PORT  0xf4    /* 0xf4-0xf7 */
#define IOPB_COM1       0x3f8   /* 0x3f8-0x3ff */
#define IOPB_SINK_PORT  0x510   /* 0x510 only */

/* Lowest guest-physical address the guests use for data outside the image. */
#define FREE_RAM_BASE   0x200000

#endif
