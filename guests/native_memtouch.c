/*
 * native_memtouch.c - host baseline for the memtouch guest: first touch and
 * second pass over a fresh anonymous mapping of M MiB, with the same pass
 * code (memtouch_pass.c) and the same output lines.
 *
 * Usage: native_memtouch [mib=M]   (default 64)
 * Output: memtouch first_touch_cycles=C pages=N
 *         memtouch second_pass_cycles=C
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "memtouch_pass.c"

static u64 rdtsc(void)
{
    unsigned lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

int main(int argc, char **argv)
{
    u64 mib = 64;

    for (int i = 1; i < argc; i++) {
        const char *v = strncmp(argv[i], "mib=", 4) == 0 ? argv[i] + 4 : argv[i];
        char *end;
        mib = strtoull(v, &end, 0);
        if (*v == '\0' || *end != '\0' || mib == 0) {
            fprintf(stderr, "usage: %s [mib=M]\n", argv[0]);
            return 2;
        }
    }
    u64 pages = mib << 20 >> 12;
    u64 *region = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    u64 t0 = rdtsc();
    touch_pass(region, pages);
    u64 t1 = rdtsc();
    touch_pass(region, pages);
    u64 t2 = rdtsc();
    printf("memtouch first_touch_cycles=%llu pages=%llu\n",
           (unsigned long long)(t1 - t0), (unsigned long long)pages);
    printf("memtouch second_pass_cycles=%llu\n", (unsigned long long)(t2 - t1));
    return 0;
}
