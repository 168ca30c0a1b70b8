/*
 * idle.c - idle guest: calls idle_wait(1000000) `secs` times.  Under sealvm
 * each call parks the vCPU for one second on the idle doorbell (the monitor
 * uses no CPU meanwhile); under QEMU it spins with pause for one second.
 *
 *   secs=S   number of one-second waits (default 10)
 *
 * Output: idle secs=S cycles=C
 *         idle done
 */
#include "lib.h"

int main(void)
{
    u64 secs = param_u64("secs", 10);
    u64 t0 = rdtsc();

    for (u64 i = 0; i < secs; i++)
        idle_wait(1000000);
    u64 t1 = rdtsc();
    printf("idle secs=%llu cycles=%llu doorbell=0x%llx\n", secs, t1 - t0, boot.idle_addr);
    puts("idle done");
    return 0;
}
