/*
 * lib.c - the freestanding runtime shared by the sealvm test guests.
 *
 * cpu_start() is where boot.S drops every vCPU at CPL3.  The boot CPU fills
 * the IDT, reads hvm_start_info and the command line, and runs the guest's
 * main(); secondary vCPUs wait for that and run ap_main().
 *
 * Port I/O: CPL3 code uses a plain in/out (io_mode IO_DIRECT).  IOPL=3 makes
 * that legal for every port on TCG, VT-x and SVM; kvm_pvm strips IOPL but
 * honours the TSS I/O permission bitmap (boot.S), which opens the exit port,
 * COM1 and the 0x510 sink, so those exit straight to the monitor.  If a plain
 * in/out raises #GP anyway, exc_handler() performs the access at CPL0, skips
 * the instruction and picks the cheapest mode that will not fault again:
 * IO_IOPB (the bitmap works, the port was outside it: such ports go through
 * the syscall gate from now on) or IO_GATE (a bitmap port faulted: every port
 * goes through the gate).
 */
#include "lib.h"

volatile u32 io_mode = IO_DIRECT;
struct boot_info boot;

/* ------------------------------------------------------ the syscall gate */
u64 gate_call(u64 op, u64 port, u64 value, const void *buf, u64 count)
{
    register u64 r8 __asm__("r8") = count;
    __asm__ volatile("syscall"
                     : "+a"(value), "+S"(buf), "+r"(r8)
                     : "D"(op), "d"(port)
                     : "rcx", "r11", "memory");
    return value;
}

/* Plain port instructions (CPL0, or CPL3 with IOPL=3). */
static inline void raw_outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void raw_outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void raw_outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 raw_inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 raw_inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 raw_inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* Ports the TSS I/O bitmap opens (boot.S iopb), for a `size`-byte access. */
static bool iopb_open(u16 port, u32 size)
{
    u32 last = (u32)port + size - 1;

    return (port >= IOPB_EXIT_PORT && last <= IOPB_EXIT_PORT + 3) ||
           (port >= IOPB_COM1 && last <= IOPB_COM1 + 7) ||
           (port == IOPB_SINK_PORT && size == 1);
}

/* May CPL3 use a plain in/out for this access (rather than the gate)? */
static inline bool port_direct(u16 port, u32 size)
{
    u32 mode = io_mode;

    return mode == IO_DIRECT || (mode == IO_IOPB && iopb_open(port, size));
}

void outb(u16 port, u8 v)
{
    if (port_direct(port, 1))
        raw_outb(port, v);
    else
        gate_call(GATE_OUTB, port, v, NULL, 0);
}

void outw(u16 port, u16 v)
{
    if (port_direct(port, 2))
        raw_outw(port, v);
    else
        gate_call(GATE_OUTW, port, v, NULL, 0);
}

void outl(u16 port, u32 v)
{
    if (port_direct(port, 4))
        raw_outl(port, v);
    else
        gate_call(GATE_OUTL, port, v, NULL, 0);
}

u8 inb(u16 port)
{
    if (port_direct(port, 1))
        return raw_inb(port);
    return (u8)gate_call(GATE_INB, port, 0, NULL, 0);
}

/* Writes count bytes to one port: one gate call for the whole buffer. */
void outsb(u16 port, const void *buf, u64 count)
{
    const u8 *p = buf;

    while (count && port_direct(port, 1)) {  /* re-checked: the first OUT may switch */
        raw_outb(port, *p++);
        count--;
    }
    if (count)
        gate_call(GATE_WRITE, port, 0, p, count);
}

/* --------------------------------------------------------------- console */
#define COM1            0x3f8
#define UART_LSR        5
#define UART_LSR_THRE   0x20
#define UART_FIFO       16

static struct spinlock console_lock;
static u32 tx_room = UART_FIFO;   /* bytes we may send before polling LSR again */

/*
 * Each port access is an exit (tens of microseconds under kvm_pvm), so LSR is
 * read only once per FIFO's worth of bytes: THRE means the transmit FIFO is
 * empty.  The emulated UARTs (QEMU, sealvm) transmit at once anyway.
 */
static void uart_send(const char *s, u64 n)
{
    while (n) {
        if (tx_room == 0) {
            while (!(inb(COM1 + UART_LSR) & UART_LSR_THRE))
                cpu_relax();
            tx_room = UART_FIFO;
        }
        u64 k = n < tx_room ? n : tx_room;
        outsb(COM1, s, k);
        s += k;
        n -= k;
        tx_room -= k;
    }
}

void console_write(const char *s, u64 n)
{
    spin_lock(&console_lock);
    uart_send(s, n);
    spin_unlock(&console_lock);
}

void puts(const char *s)
{
    spin_lock(&console_lock);
    uart_send(s, strlen(s));
    uart_send("\n", 1);
    spin_unlock(&console_lock);
}

int printf(const char *fmt, ...)
{
    char buf[256];
    __builtin_va_list ap;

    __builtin_va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    __builtin_va_end(ap);
    if (n > (int)sizeof(buf) - 1)
        n = sizeof(buf) - 1;      /* longer output is cut; use console_write */
    console_write(buf, n);
    return n;
}

noreturn void exit(u32 status)
{
    outl(0xf4, status);           /* sealvm: exit(status); QEMU isa-debug-exit */
    for (;;)                      /* no exit device: stay parked */
        idle_wait(1000000);
}

/* ------------------------------------------------------- printf engine */
struct out {
    char *buf;
    u64 size;
    u64 len;
};

static void emit(struct out *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void emit_num(struct out *o, u64 v, u32 base, bool upper, bool neg,
                     int width, bool zero, bool left)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    int n = 0;

    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    int len = n + (neg ? 1 : 0);
    if (neg && zero)
        emit(o, '-');
    if (!left)
        for (; width > len; width--)
            emit(o, zero ? '0' : ' ');
    if (neg && !zero)
        emit(o, '-');
    while (n)
        emit(o, tmp[--n]);
    if (left)
        for (; width > len; width--)
            emit(o, ' ');
}

/* %[-0][width][.prec][hh|h|l|ll|z](d|i|u|x|X|p|s|c|%) */
int vsnprintf(char *buf, u64 size, const char *fmt, __builtin_va_list ap)
{
    struct out o = { buf, size, 0 };

    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            emit(&o, *fmt);
            continue;
        }
        fmt++;
        bool left = false, zero = false;
        for (;; fmt++) {
            if (*fmt == '-')
                left = true;
            else if (*fmt == '0')
                zero = true;
            else
                break;
        }
        int width = 0, prec = -1;
        if (*fmt == '*') {
            width = __builtin_va_arg(ap, int);
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = __builtin_va_arg(ap, int);
                fmt++;
            }
            while (*fmt >= '0' && *fmt <= '9')
                prec = prec * 10 + (*fmt++ - '0');
        }
        int lng = 0;                      /* 0 int, 1 long / long long / size_t */
        while (*fmt == 'l' || *fmt == 'h' || *fmt == 'z') {
            if (*fmt != 'h')
                lng = 1;
            fmt++;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            s64 v = lng ? __builtin_va_arg(ap, s64) : __builtin_va_arg(ap, int);
            emit_num(&o, v < 0 ? -(u64)v : (u64)v, 10, false, v < 0, width, zero, left);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            u64 v = lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32);
            emit_num(&o, v, *fmt == 'u' ? 10 : 16, *fmt == 'X', false, width, zero, left);
            break;
        }
        case 'p':
            emit(&o, '0');
            emit(&o, 'x');
            emit_num(&o, (u64)__builtin_va_arg(ap, void *), 16, false, false, width, zero, left);
            break;
        case 's': {
            const char *s = __builtin_va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int n = 0;
            while (s[n] && (prec < 0 || n < prec))
                n++;
            if (!left)
                for (int w = width; w > n; w--)
                    emit(&o, ' ');
            for (int i = 0; i < n; i++)
                emit(&o, s[i]);
            if (left)
                for (int w = width; w > n; w--)
                    emit(&o, ' ');
            break;
        }
        case 'c':
            emit(&o, (char)__builtin_va_arg(ap, int));
            break;
        case '%':
            emit(&o, '%');
            break;
        case '\0':
            fmt--;
            break;
        default:
            emit(&o, '%');
            emit(&o, *fmt);
            break;
        }
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = '\0';
    return (int)o.len;
}

int snprintf(char *buf, u64 size, const char *fmt, ...)
{
    __builtin_va_list ap;

    __builtin_va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    __builtin_va_end(ap);
    return n;
}

/* ------------------------------------------------------------ exceptions */
struct exc_frame {                      /* as pushed by exc_common in boot.S */
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;       /* pushed by the CPU */
};

struct idt_entry {
    u16 off0, sel;
    u8 ist, type;
    u16 off1;
    u32 off2, reserved;
};

extern struct idt_entry idt[IDT_ENTRIES];
extern char exc_stubs[];
extern char kstacks[];

/* Fills the IDT from CPL3 (native speed); idempotent, so every CPU may call it. */
static void idt_init(void)
{
    for (u32 v = 0; v < IDT_ENTRIES; v++) {
        u64 a = (u64)exc_stubs + 16 * v;
        struct idt_entry e = {
            .off0 = (u16)a, .sel = SEL_KCODE, .ist = 0, .type = 0x8e, /* P, DPL0, interrupt gate */
            .off1 = (u16)(a >> 16), .off2 = (u32)(a >> 32), .reserved = 0,
        };
        idt[v] = e;
    }
}

/*
 * Emulates a port instruction that faulted at CPL3 (kvm_pvm ignores IOPL).
 * Handles in/out with DX or an 8-bit immediate, 8/16/32-bit.  Runs at CPL0.
 * Returns the port's I/O mode for the future: IO_IOPB if the port is outside
 * the TSS I/O bitmap (the bitmap may still work for its own ports), IO_GATE
 * if the bitmap allowed it and it faulted all the same; 0 if not port I/O.
 */
static u32 emulate_port_io(struct exc_frame *f)
{
    const u8 *ip = (const u8 *)f->rip;
    u32 len = 0;
    bool opsize16 = false;

    if (ip[0] == 0x66) {
        opsize16 = true;
        len++;
    }
    u8 op = ip[len++];
    u16 port;
    if (op >= 0xe4 && op <= 0xe7)
        port = ip[len++];
    else if (op >= 0xec && op <= 0xef)
        port = (u16)f->rdx;
    else
        return 0;

    bool out = op & 2, byte = !(op & 1);
    if (out) {
        if (byte)
            raw_outb(port, (u8)f->rax);
        else if (opsize16)
            raw_outw(port, (u16)f->rax);
        else
            raw_outl(port, (u32)f->rax);
    } else {
        if (byte)
            f->rax = (f->rax & ~0xffull) | raw_inb(port);
        else if (opsize16)
            f->rax = (f->rax & ~0xffffull) | raw_inw(port);
        else
            f->rax = raw_inl(port);   /* 32-bit result zero-extends */
    }
    f->rip += len;
    return iopb_open(port, byte ? 1 : opsize16 ? 2 : 4) ? IO_GATE : IO_IOPB;
}

static void fault_print(const char *fmt, ...)
{
    char buf[200];
    __builtin_va_list ap;

    __builtin_va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    __builtin_va_end(ap);
    if (n > (int)sizeof(buf) - 1)
        n = sizeof(buf) - 1;
    for (int i = 0; i < n; i++)
        raw_outb(COM1, buf[i]);     /* CPL0: direct, no lock (may be held) */
}

/* Called at CPL0 by exc_common; returns only if the fault was handled. */
void exc_handler(struct exc_frame *f)
{
    if (f->vector == 13 && (f->cs & 3) == 3) {
        u32 mode = emulate_port_io(f);
        if (mode) {
            if (mode == IO_GATE || io_mode == IO_DIRECT)  /* never back from IO_GATE */
                io_mode = mode;
            return;
        }
    }
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    u64 cpu = ((u64)f - (u64)kstacks) >> KSTACK_SHIFT;
    fault_print("\nEXCEPTION vector=%llu rip=0x%llx error=0x%llx cpu=%llu cs=0x%llx "
                "rsp=0x%llx cr2=0x%llx\n", f->vector, f->rip, f->error, cpu, f->cs,
                f->rsp, cr2);
    raw_outl(0xf4, 0x7f);
    for (;;)
        cpu_relax();
}

/* ----------------------------------------------------------- command line */
#define HVM_START_MAGIC 0x336ec578

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};

struct hvm_memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};

static const struct hvm_memmap_entry *memmap;
static u32 memmap_entries;

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Iterates words: returns the next word start (and its length), or NULL. */
static const char *next_word(const char **pos, u64 *len)
{
    const char *p = *pos;

    while (*p && is_space(*p))
        p++;
    if (!*p)
        return NULL;
    const char *w = p;
    while (*p && !is_space(*p))
        p++;
    *len = p - w;
    *pos = p;
    return w;
}

/* If word is "key=value", returns value (and its length). */
static const char *match_key(const char *w, u64 wlen, const char *key, u64 *vlen)
{
    u64 k = strlen(key);

    if (wlen <= k || w[k] != '=' || memcmp(w, key, k) != 0)
        return NULL;
    *vlen = wlen - k - 1;
    return w + k + 1;
}

const char *param_str(const char *key, u64 *len)
{
    const char *pos = boot.cmdline, *w, *found = NULL;
    u64 wlen, vlen;

    while ((w = next_word(&pos, &wlen))) {
        const char *v = match_key(w, wlen, key, &vlen);
        if (v) {
            found = v;                  /* the last occurrence wins */
            *len = vlen;
        }
    }
    return found;
}

bool parse_u64(const char *s, u64 len, u64 *out)
{
    u64 v = 0, base = 10, i = 0;

    if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        i = 2;
    }
    u64 start = i;
    for (; i < len; i++) {
        char c = s[i];
        u64 d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            break;
        if (v > (~0ull - d) / base)
            return false;               /* overflow */
        v = v * base + d;
    }
    if (i == start)
        return false;
    if (i < len) {                      /* one optional binary suffix */
        u32 shift;
        switch (s[i]) {
        case 'k': case 'K': shift = 10; break;
        case 'm': case 'M': shift = 20; break;
        case 'g': case 'G': shift = 30; break;
        default: return false;
        }
        if (i + 1 != len || v > (~0ull >> shift))
            return false;
        v <<= shift;
    }
    *out = v;
    return true;
}

u64 param_u64(const char *key, u64 def)
{
    u64 len, v;
    const char *s = param_str(key, &len);

    if (!s)
        return def;
    if (!parse_u64(s, len, &v)) {
        printf("warning: bad number %s=%.*s, using %llu\n", key, (int)len, s, def);
        return def;
    }
    return v;
}

/* virtio_mmio.device=<size>@<base>:<irq>[:<id>], as Linux parses it */
static void parse_virtio_mmio(const char *v, u64 len)
{
    u64 at = 0, colon;

    while (at < len && v[at] != '@')
        at++;
    colon = at;
    while (colon < len && v[colon] != ':')
        colon++;
    u64 end = colon + 1;
    while (end < len && v[end] != ':')
        end++;

    struct virtio_mmio_entry e;
    u64 irq;
    if (at >= len || colon >= len || !parse_u64(v, at, &e.size) ||
        !parse_u64(v + at + 1, colon - at - 1, &e.base) ||
        !parse_u64(v + colon + 1, end - colon - 1, &irq)) {
        printf("warning: bad virtio_mmio.device=%.*s\n", (int)len, v);
        return;
    }
    e.irq = (u32)irq;
    if (boot.n_virtio < MAX_VIRTIO_MMIO)
        boot.virtio[boot.n_virtio++] = e;
}

static void boot_init(u64 start_info)
{
    const struct hvm_start_info *si = (const void *)start_info;

    boot.start_info = start_info;
    boot.cmdline = "";
    if (si && si->magic == HVM_START_MAGIC) {
        if (si->cmdline_paddr)
            boot.cmdline = (const char *)si->cmdline_paddr;
        if (si->version >= 1 && si->memmap_paddr) {
            memmap = (const void *)si->memmap_paddr;
            memmap_entries = si->memmap_entries;
        }
    }

    const char *pos = boot.cmdline, *w;
    u64 wlen, vlen;
    while ((w = next_word(&pos, &wlen))) {
        const char *v = match_key(w, wlen, "virtio_mmio.device", &vlen);
        if (v)
            parse_virtio_mmio(v, vlen);
        if (wlen > 7 && memcmp(w, "sealvm.", 7) == 0)
            boot.sealvm = true;
    }
    boot.vcpus = (u32)param_u64("sealvm.vcpus", 1);
    if (boot.vcpus < 1)
        boot.vcpus = 1;
    boot.idle_addr = param_u64("sealvm.idle", 0);
    boot.tsc_hz = param_u64("tsc_hz", 2596000000ull);
    if (boot.tsc_hz < 1000000)
        boot.tsc_hz = 1000000;
}

bool ram_contains(u64 base, u64 size)
{
    if (!memmap || !memmap_entries)
        return true;
    for (u32 i = 0; i < memmap_entries; i++) {
        const struct hvm_memmap_entry *e = &memmap[i];
        if (e->type == 1 && base >= e->addr && base + size >= base &&
            base + size <= e->addr + e->size)
            return true;
    }
    return false;
}

/* ------------------------------------------------------------------ time */
u64 cycles_from_usecs(u64 usecs)
{
    return usecs * (boot.tsc_hz / 1000) / 1000;
}

void idle_wait(u32 usecs)
{
    if (boot.idle_addr) {
        mmio_write32(boot.idle_addr, usecs);
        return;
    }
    if (!usecs) {
        cpu_relax();
        return;
    }
    u64 end = rdtsc() + cycles_from_usecs(usecs);
    while ((s64)(rdtsc() - end) < 0)
        cpu_relax();
}

/* ------------------------------------------------------------- start-up */
static volatile u32 boot_done;

__attribute__((weak)) void ap_main(u32 cpu)
{
    (void)cpu;
}

/* Entered at CPL3 from boot.S on every vCPU, on that vCPU's own stack. */
noreturn void cpu_start(u32 cpu, u64 start_info)
{
    idt_init();
    if (cpu == 0) {
        boot_init(start_info);
        __atomic_store_n(&boot_done, 1, __ATOMIC_RELEASE);
        exit((u32)main());
    }
    while (!__atomic_load_n(&boot_done, __ATOMIC_ACQUIRE))
        cpu_relax();
    ap_main(cpu);
    for (;;)
        idle_wait(1000000);
}

/* ------------------------------------------------------------------ misc */
void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

void spin_lock(struct spinlock *l)
{
    while (__atomic_exchange_n(&l->v, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&l->v, __ATOMIC_RELAXED))
            cpu_relax();
}

void spin_unlock(struct spinlock *l)
{
    __atomic_store_n(&l->v, 0, __ATOMIC_RELEASE);
}

bool rdrand64(u64 *out)
{
    for (int i = 0; i < 32; i++) {
        u8 ok;
        __asm__ volatile("rdrand %0; setc %1" : "=r"(*out), "=qm"(ok));
        if (ok)
            return true;
    }
    return false;
}

bool random_hex(char *out, u32 n)
{
    static const char digits[] = "0123456789abcdef";
    u64 r = 0;
    for (u32 i = 0; i < n; i++) {
        if (i % 8 == 0 && !rdrand64(&r))
            return false;
        out[2 * i] = digits[(r >> 4) & 15];
        out[2 * i + 1] = digits[r & 15];
        r >>= 8;
    }
    return true;
}
