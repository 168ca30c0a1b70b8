/*
 * hostprobe.c - host-side measurements for the sealvm benchmarks.
 *
 *   hostprobe tsc [ms]        TSC frequency: rdtsc against CLOCK_MONOTONIC_RAW
 *                             over `ms` milliseconds (default 200)
 *                             -> "tsc_hz=H ns=N cycles=C"
 *   hostprobe getppid [n]     cost of one getppid() system call, n calls
 *                             (default 1000000) -> "getppid n=N ns=T cycles=C"
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static unsigned long long rdtsc(void)
{
    unsigned lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((unsigned long long)hi << 32) | lo;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "tsc") == 0) {
        long long ms = argc > 2 ? atoll(argv[2]) : 200;
        long long n0 = now_ns();
        unsigned long long c0 = rdtsc();
        while (now_ns() - n0 < ms * 1000000LL)
            ;
        long long n1 = now_ns();
        unsigned long long c1 = rdtsc();
        double hz = (double)(c1 - c0) * 1e9 / (double)(n1 - n0);
        printf("tsc_hz=%.0f ns=%lld cycles=%llu\n", hz, n1 - n0, c1 - c0);
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "getppid") == 0) {
        long n = argc > 2 ? atol(argv[2]) : 1000000;
        syscall(SYS_getppid);
        long long n0 = now_ns();
        unsigned long long c0 = rdtsc();
        for (long i = 0; i < n; i++)
            syscall(SYS_getppid);      /* a real system call each time (no vDSO, no caching) */
        unsigned long long c1 = rdtsc();
        long long n1 = now_ns();
        printf("getppid n=%ld ns=%lld cycles=%llu\n", n, n1 - n0, c1 - c0);
        return 0;
    }
    fprintf(stderr, "usage: %s tsc [ms] | getppid [n]\n", argv[0]);
    return 2;
}
