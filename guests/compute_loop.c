/*
 * compute_loop.c - the hot loop of the compute guest: xorshift64 state
 * update plus a multiply-accumulate, registers only, no memory traffic.
 * In the guest it sits alone in the .hottext page (see guest.ld).
 */
#include "compute_loop.h"

HOT u64 compute_loop(u64 iters)
{
    u64 x = 0x9e3779b97f4a7c15ull;      /* xorshift64 state */
    u64 acc = 0;

    for (u64 i = 0; i < iters; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc += x * 0x2545f4914f6cdd1dull;
        acc ^= acc >> 29;
    }
    return acc ^ x;
}
