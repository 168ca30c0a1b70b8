/*
 * compute.c - CPU-bound guest.  Every vCPU (sealvm.vcpus=N, default 1) runs
 * compute_loop(iters) and stores cycles and result in shared memory; the boot
 * CPU waits for all of them, prints one line per vCPU and checks that all
 * results agree.
 *
 *   iters=N   loop iterations (default 200000000)
 *   wait=S    seconds the boot CPU waits for the others after its own loop
 *             (default 60, plus four times its own run per vCPU)
 *
 * Output: compute cpu=I iters=N cycles=C result=0x...   (one per vCPU)
 *         compute vcpus=N results=equal | MISMATCH | MISSING cpu=I
 * Exit: 0 ok, 1 results differ or a vCPU did not report.
 */
#include "lib.h"
#include "compute_loop.h"

struct cpu_result {
    volatile u32 done;
    u64 cycles;
    u64 result;
} __attribute__((aligned(64)));

static struct cpu_result results[MAX_CPUS];

static void run(u32 cpu)
{
    u64 iters = param_u64("iters", COMPUTE_DEFAULT_ITERS);
    u64 t0 = rdtsc();
    u64 r = compute_loop(iters);
    u64 t1 = rdtsc();

    results[cpu].cycles = t1 - t0;
    results[cpu].result = r;
    __atomic_store_n(&results[cpu].done, 1, __ATOMIC_RELEASE);
}

void ap_main(u32 cpu)
{
    if (cpu < boot.vcpus && cpu < MAX_CPUS)
        run(cpu);
}

int main(void)
{
    u64 iters = param_u64("iters", COMPUTE_DEFAULT_ITERS);
    u32 n = boot.vcpus < MAX_CPUS ? boot.vcpus : MAX_CPUS;

    run(0);

    u64 wait = cycles_from_usecs(param_u64("wait", 60) * 1000000) + 4 * results[0].cycles * n;
    u64 deadline = rdtsc() + wait;
    for (u32 cpu = 1; cpu < n; cpu++) {
        while (!__atomic_load_n(&results[cpu].done, __ATOMIC_ACQUIRE)) {
            if ((s64)(rdtsc() - deadline) > 0) {
                printf("compute vcpus=%u MISSING cpu=%u\n", n, cpu);
                return 1;
            }
            cpu_relax();
        }
    }

    bool equal = true;
    for (u32 cpu = 0; cpu < n; cpu++) {
        printf("compute cpu=%u iters=%llu cycles=%llu result=0x%016llx\n", cpu, iters,
               results[cpu].cycles, results[cpu].result);
        if (results[cpu].result != results[0].result)
            equal = false;
    }
    if (n > 1)
        printf("compute vcpus=%u results=%s\n", n, equal ? "equal" : "MISMATCH");
    return equal ? 0 : 1;
}
