/*
 * rng.c - virtio-rng guest: a polling virtio-mmio (version 2) driver for the
 * first entropy device (DeviceID 4) named by a virtio_mmio.device= word.
 *
 * It posts `count` device-writable buffers of `chunk` bytes, up to the queue
 * size in flight, re-posting each as it completes, and polls the used ring
 * (parking on the sealvm.idle doorbell while it waits, if there is one).
 * Checks: no buffer is all zero, no two consecutive buffers are equal, and
 * the byte histogram over all data is roughly flat.
 *
 *   chunk=B   bytes per buffer (default 4096, at most 1 MiB)
 *   count=N   buffers to fill (default 256)
 *   timeout=S seconds without progress before giving up (default 10; only
 *             while spinning, a parked vCPU is woken by the device)
 *
 * Without any virtio_mmio.device= word and outside sealvm, QEMU microvm's
 * transport window (0xfeb00000, 24 x 512 bytes) is probed instead: QEMU only
 * writes those words when ACPI is off (-M microvm,acpi=off).
 *
 * Output: rng device=0x.. irq=I queue=Q inflight=K chunk=B count=N
 *         rng bytes=N cycles=C ok
 *         rng histogram min=.. max=.. expected=.. ok
 * Failures: rng no entropy device (exit 1), rng init failed: ... (exit 1),
 *         rng data check failed: ... (exit 1), rng device broken (exit 2),
 *         rng timeout (exit 3).
 */
#include "virtio.h"

#define MAX_CHUNK               (1u << 20)

/* Rings and buffers live in RAM above the image. */
#define DESC_GPA        (FREE_RAM_BASE)
#define AVAIL_GPA       (FREE_RAM_BASE + 0x1000)
#define USED_GPA        (FREE_RAM_BASE + 0x2000)
#define BUFFERS_GPA     (FREE_RAM_BASE + 0x10000)

const char *virtio_guest = "rng";

static u64 fnv1a(const u8 *p, u64 n)
{
    u64 h = 0xcbf29ce484222325ull;
    for (u64 i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static u64 histogram[256];

int main(void)
{
    u64 chunk = param_u64("chunk", 4096);
    u64 count = param_u64("count", 256);
    u64 timeout = cycles_from_usecs(param_u64("timeout", 10) * 1000000);
    u32 irq;

    if (chunk == 0 || chunk > MAX_CHUNK || count == 0) {
        puts("rng error: need 0 < chunk <= 1M and count > 0");
        return 2;
    }
    if (!find_device(VIRTIO_ID_ENTROPY, &irq)) {
        puts("rng no entropy device");
        return 1;
    }

    u32 version = reg_read(VMMIO_VERSION);
    if (version != 2) {                 /* QEMU: -global virtio-mmio.force-legacy=false */
        printf("rng init failed: virtio-mmio version %u at 0x%llx (need 2)\n", version, dev);
        return 1;
    }
    features_begin();
    features_end(0);                    /* only VIRTIO_F_VERSION_1 */
    u32 qsize = queue_size(0, VIRTQ_MAX);
    u32 inflight = count < qsize ? (u32)count : qsize;
    if (!ram_contains(DESC_GPA, BUFFERS_GPA - DESC_GPA + inflight * chunk))
        init_failed("not enough RAM for the buffers");
    printf("rng device=0x%llx irq=%u queue=%u inflight=%u chunk=%llu count=%llu\n",
           dev, irq, qsize, inflight, chunk, count);

    volatile struct virtq_desc *desc = (void *)DESC_GPA;
    volatile struct virtq_avail *avail = (void *)AVAIL_GPA;
    volatile struct virtq_used *used = (void *)USED_GPA;
    memset((void *)DESC_GPA, 0, BUFFERS_GPA - DESC_GPA);

    /* One writable descriptor per in-flight buffer. */
    for (u32 i = 0; i < inflight; i++) {
        memset((void *)(BUFFERS_GPA + i * chunk), 0, chunk);
        desc[i].addr = BUFFERS_GPA + i * chunk;
        desc[i].len = (u32)chunk;
        desc[i].flags = VIRTQ_DESC_F_WRITE;
        desc[i].next = 0;
        avail->ring[i] = (u16)i;
    }
    queue_ready(qsize, DESC_GPA, AVAIL_GPA, USED_GPA);
    driver_ok();
    u16 avail_idx = (u16)inflight, used_seen = 0;
    u64 posted = inflight, completed = 0, bytes = 0;
    u64 prev_hash = 0, prev_len = 0;
    const char *fail = NULL;

    u64 t0 = rdtsc();
    barrier();
    avail->idx = avail_idx;
    mfence();
    reg_write(VMMIO_QUEUE_NOTIFY, 0);

    u64 last_progress = rdtsc(), last_status = last_progress;
    while (completed < count) {
        u16 used_idx = used->idx;
        if (used_idx == used_seen) {
            if (boot.idle_addr) {
                idle_wait(0);           /* the device's completion wakes us */
                if (used->idx == used_seen)
                    check_status();     /* woken without progress: broken? */
                continue;
            }
            cpu_relax();
            u64 now = rdtsc();
            if (now - last_status > timeout / 1000) {   /* check now and then */
                check_status();
                last_status = now;
            }
            if (now - last_progress > timeout) {
                printf("rng timeout completed=%llu of %llu\n", completed, count);
                return 3;
            }
            continue;
        }
        barrier();                      /* read the ring after its index */
        while (used_seen != used_idx) {
            volatile struct virtq_used_elem *e = &used->ring[used_seen % qsize];
            u32 id = e->id, len = e->len;
            used_seen++;
            if (id >= inflight || len > chunk) {
                printf("rng bad used element id=%u len=%u\n", id, len);
                return 1;
            }
            const u8 *buf = (const u8 *)(BUFFERS_GPA + id * chunk);
            bool nonzero = false;
            for (u32 i = 0; i < len; i++) {
                histogram[buf[i]]++;
                nonzero |= buf[i] != 0;
            }
            u64 h = fnv1a(buf, len);
            if (len && !nonzero && !fail)
                fail = "a buffer is all zero";
            if (completed && len == prev_len && h == prev_hash && !fail)
                fail = "two consecutive buffers are equal";
            prev_hash = h;
            prev_len = len;
            bytes += len;
            completed++;
            if (posted < count) {       /* refill and hand the buffer back */
                memset((void *)buf, 0, chunk);
                avail->ring[avail_idx % qsize] = (u16)id;
                avail_idx++;
                posted++;
            }
        }
        barrier();
        if (avail->idx != avail_idx) {
            avail->idx = avail_idx;
            mfence();
            reg_write(VMMIO_QUEUE_NOTIFY, 0);
        }
        last_progress = rdtsc();
    }
    u64 t1 = rdtsc();
    check_status();

    if (bytes == 0 && !fail)
        fail = "no bytes received";
    if (fail) {
        printf("rng data check failed: %s\n", fail);
        return 1;
    }
    printf("rng bytes=%llu cycles=%llu ok\n", bytes, t1 - t0);

    u64 lo = ~0ull, hi = 0;
    for (u32 i = 0; i < 256; i++) {
        lo = histogram[i] < lo ? histogram[i] : lo;
        hi = histogram[i] > hi ? histogram[i] : hi;
    }
    u64 expected = bytes / 256;
    if (expected < 64) {
        printf("rng histogram min=%llu max=%llu expected=%llu skipped (too few bytes)\n",
               lo, hi, expected);
    } else {
        bool flat = lo >= expected / 2 && hi <= expected * 2;
        printf("rng histogram min=%llu max=%llu expected=%llu %s\n", lo, hi, expected,
               flat ? "ok" : "SKEWED");
        if (!flat)
            return 1;
    }
    return 0;
}
