/*
 * canary.c - a secret that only the guest knows, spread over its memory.
 *
 * The guest draws 16 random bytes with RDRAND (nothing the host relays),
 * writes them, repeated, over `mib` MiB of RAM starting at 2 MiB, and then
 * idles for `secs` seconds so a test can search everything the host side can
 * reach for those bytes.  It never prints the secret.
 *
 *   mib=M    MiB to fill (default 16)
 *   secs=S   seconds to stay up after filling (default 30)
 *
 * Output: canary ready mib=M
 *         canary done
 */
#include "lib.h"

#define CANARY_BASE 0x200000ULL

int main(void)
{
    u64 mib = param_u64("mib", 16), secs = param_u64("secs", 30);
    u64 secret[2];

    if (!rdrand64(&secret[0]) || !rdrand64(&secret[1])) {
        puts("canary no-rdrand");
        return 3;
    }
    volatile u64 *p = (volatile u64 *)CANARY_BASE;
    for (u64 i = 0; i < mib * (1024 * 1024 / 8); i += 2) {
        p[i] = secret[0];
        p[i + 1] = secret[1];
    }
    secret[0] = secret[1] = 0;
    printf("canary ready mib=%llu\n", mib);
    for (u64 i = 0; i < secs; i++)
        idle_wait(1000000);
    puts("canary done");
    return 0;
}
