/* A Linux guest's memory-writing process with a checksum: each pass checks every
 * 64-bit word the previous pass wrote (a function of the pass and the word's index),
 * then writes the next pass's values.  Every INTERVAL seconds (0.5) it prints
 *
 *   MEMCHECK pass=P bad=B up=SECONDS gap=MAXGAP back=N
 *
 * bad: words that did not hold what the previous pass wrote (memory lost or corrupted
 * across a snapshot or migration); up: CLOCK_MONOTONIC seconds since start; gap: the
 * longest time between two passes so far (a clock that jumped, or a long stop);
 * back: times the monotonic clock went backwards.  Static, no libraries: it runs from
 * the guest's initramfs.  Usage: memcheck [MIB [INTERVAL]]  (default 16 MiB, 0.5 s)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t value(uint64_t pass, size_t i)
{
    return (pass + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t)i * 0xBF58476D1CE4E5B9ull;
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? (size_t)atoi(argv[1]) : 16;
    double interval = argc > 2 ? atof(argv[2]) : 0.5;
    size_t words = mib << 17;
    uint64_t *buf = malloc(words * sizeof *buf);
    if (buf == NULL || mib == 0) {
        fprintf(stderr, "memcheck: cannot allocate %zu MiB\n", mib);
        return 1;
    }
    uint64_t pass = 0, bad = 0, back = 0;
    double start = now(), last = start, printed = 0, gap = 0;
    for (;;) {
        if (pass > 0)
            for (size_t i = 0; i < words; i++)
                bad += buf[i] != value(pass - 1, i);
        for (size_t i = 0; i < words; i++)
            buf[i] = value(pass, i);
        pass++;
        double t = now();
        if (t < last)
            back++;
        else if (t - last > gap)
            gap = t - last;
        last = t;
        if (t - printed >= interval) {
            printf("MEMCHECK pass=%llu bad=%llu up=%.2f gap=%.2f back=%llu\n",
                   (unsigned long long)pass, (unsigned long long)bad, t - start, gap,
                   (unsigned long long)back);
            fflush(stdout);
            printed = t;
        }
    }
}
