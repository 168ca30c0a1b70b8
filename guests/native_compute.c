/*
 * native_compute.c - host baseline for the compute guest: the same
 * compute_loop.c built for Linux with -O2 -mgeneral-regs-only.
 *
 * Usage: native_compute [iters=N | N]
 * Output: compute cpu=native iters=N cycles=C result=0x...
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compute_loop.c"

static u64 rdtsc(void)
{
    unsigned lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

int main(int argc, char **argv)
{
    u64 iters = COMPUTE_DEFAULT_ITERS;

    for (int i = 1; i < argc; i++) {
        const char *v = strncmp(argv[i], "iters=", 6) == 0 ? argv[i] + 6 : argv[i];
        char *end;
        iters = strtoull(v, &end, 0);
        if (*v == '\0' || *end != '\0') {
            fprintf(stderr, "usage: %s [iters=N]\n", argv[0]);
            return 2;
        }
    }
    u64 t0 = rdtsc();
    u64 r = compute_loop(iters);
    u64 t1 = rdtsc();
    printf("compute cpu=native iters=%llu cycles=%llu result=0x%016llx\n",
           (unsigned long long)iters, (unsigned long long)(t1 - t0), (unsigned long long)r);
    return 0;
}
