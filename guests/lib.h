/*
 * lib.h - the freestanding runtime shared by the sealvm test guests:
 * port I/O (direct or through the syscall gate), the serial console and a
 * small printf, exit, command-line parameters, TSC helpers, idle_wait, and
 * the hooks each guest provides (main, and optionally ap_main).
 */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long s64;
typedef unsigned long size_t;
typedef int bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define noreturn __attribute__((noreturn))
#define printf_like(f, a) __attribute__((format(printf, f, a)))

/*
 * Code that must not share or cross a 4 KiB page with other code: TCG does not
 * chain translation blocks across pages, so a hot loop crossing a page
 * boundary runs several times slower there.  guest.ld places .hottext alone
 * in its own page(s).
 */
#define HOT __attribute__((section(".hottext"), noinline, aligned(64)))

/* ------------------------------------------------------------- guest hooks */
int main(void);                 /* boot CPU; the return value is the exit status */
void ap_main(u32 cpu);          /* secondary vCPUs (weak default: park) */

/* ------------------------------------------------------------ CPU helpers */
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }

static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }

/* ------------------------------------------------------------------ ports */
extern volatile u32 io_mode;    /* IO_DIRECT, IO_GATE or IO_IOPB (layout.h) */

u64 gate_call(u64 op, u64 port, u64 value, const void *buf, u64 count);

void outb(u16 port, u8 v);
void outw(u16 port, u16 v);
void outl(u16 port, u32 v);
u8 inb(u16 port);
void outsb(u16 port, const void *buf, u64 count);

/* ---------------------------------------------------------------- console */
void console_write(const char *s, u64 n);
void puts(const char *s);       /* writes s and a newline */
int printf(const char *fmt, ...) printf_like(1, 2);
int snprintf(char *buf, u64 size, const char *fmt, ...) printf_like(3, 4);
int vsnprintf(char *buf, u64 size, const char *fmt, __builtin_va_list ap);

noreturn void exit(u32 status);

/* --------------------------------------------------------- command line */
#define MAX_VIRTIO_MMIO 16

struct virtio_mmio_entry {
    u64 base;
    u64 size;
    u32 irq;
};

struct boot_info {
    u64 start_info;             /* GPA of hvm_start_info (0 if none) */
    const char *cmdline;        /* never NULL ("" if none) */
    bool sealvm;                /* a sealvm.* word is present (running under sealvm) */
    u32 vcpus;                  /* sealvm.vcpus=, 1 if absent */
    u64 idle_addr;              /* sealvm.idle=, 0 if absent */
    u64 tsc_hz;                 /* tsc_hz=, default 2596000000 */
    u32 n_virtio;
    struct virtio_mmio_entry virtio[MAX_VIRTIO_MMIO];
};
extern struct boot_info boot;

/* Last occurrence of "key=value" on the command line, or NULL. */
const char *param_str(const char *key, u64 *len);
/* Numeric parameter: decimal or 0x hex, optional K/M/G suffix (x1024^n). */
u64 param_u64(const char *key, u64 def);
bool parse_u64(const char *s, u64 len, u64 *out);

/* True if [base, base+size) is RAM by the start-info memory map
 * (true if the loader gave no map). */
bool ram_contains(u64 base, u64 size);
extern char _end[];             /* end of the loaded image (linker) */

/* ----------------------------------------------------------------- time */
/* Park for usecs (0: until a device event) via the sealvm.idle doorbell;
 * without it, spin with pause for usecs (or once, for 0). */
void idle_wait(u32 usecs);
u64 cycles_from_usecs(u64 usecs);

/* 64 random bits from the CPU (RDRAND, retried): nothing the host relays.  False if
 * the CPU never gave any. */
bool rdrand64(u64 *out);
/* A secret only the guest knows: `n` random bytes as 2n lowercase hex digits in out
 * (no terminator).  False without RDRAND. */
bool random_hex(char *out, u32 n);

/* ------------------------------------------------------------------ misc */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

struct spinlock { volatile u32 v; };
void spin_lock(struct spinlock *l);
void spin_unlock(struct spinlock *l);

#endif
