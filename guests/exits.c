/*
 * exits.c - exit-cost guest: times n operations that each leave the guest.
 *
 *   kind=pio      outb to port 0x510 (through the syscall gate under kvm_pvm)
 *   kind=mmio     32-bit write to 0xd0200000, the monitor's MMIO test sink
 *   kind=ioevent  32-bit write to the sealvm.ioevent=0x... address
 *                 (skipped, exit 0, when the word is absent)
 *   kind=gate     syscall gate round trip without I/O (no exit at all)
 *   n=N           operations (default 20000)
 *
 * One untimed operation comes first, so a first-use fault (the port I/O
 * probe) is not counted.
 *
 * Output: exits kind=K n=N cycles=C
 * Exit: 0, or 2 for an unknown kind.
 */
#include "lib.h"

#define PIO_SINK        0x510
#define MMIO_SINK       0xd0200000ull

static bool kind_is(const char *v, u64 len, const char *name)
{
    return len == strlen(name) && memcmp(v, name, len) == 0;
}

int main(void)
{
    u64 n = param_u64("n", 20000);
    u64 klen;
    const char *kind = param_str("kind", &klen);
    if (!kind) {
        kind = "pio";
        klen = 3;
    }

    u64 t0, t1;
    if (kind_is(kind, klen, "pio")) {
        outb(PIO_SINK, 0);
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            outb(PIO_SINK, (u8)i);
        t1 = rdtsc();
    } else if (kind_is(kind, klen, "mmio")) {
        mmio_write32(MMIO_SINK, 0);
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            mmio_write32(MMIO_SINK, (u32)i);
        t1 = rdtsc();
    } else if (kind_is(kind, klen, "ioevent")) {
        u64 addr = param_u64("sealvm.ioevent", 0);
        if (!addr) {
            puts("exits kind=ioevent skipped (no sealvm.ioevent address)");
            return 0;
        }
        mmio_write32(addr, 0);
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            mmio_write32(addr, (u32)i);
        t1 = rdtsc();
    } else if (kind_is(kind, klen, "gate")) {
        gate_call(GATE_NOP, 0, 0, NULL, 0);
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            gate_call(GATE_NOP, 0, 0, NULL, 0);
        t1 = rdtsc();
    } else {
        printf("exits unknown kind=%.*s (pio|mmio|ioevent|gate)\n", (int)klen, kind);
        return 2;
    }
    printf("exits kind=%.*s n=%llu cycles=%llu\n", (int)klen, kind, n, t1 - t0);
    return 0;
}
