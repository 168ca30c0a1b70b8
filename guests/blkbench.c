/*
 * blkbench.c - virtio-blk guest: sequential and random reads and writes with a
 * data checker, any queue depth, over the first block device (DeviceID 2) named
 * by a virtio_mmio.device= word (or QEMU microvm's windows, as rng.c does).
 *
 *   tests=LIST  comma-separated phases, run in order (default seqwrite,seqread):
 *               seqwrite seqread randwrite randread, and sleep (sleep_ms=, default
 *               2000: the device stays open while the guest idles)
 *   bs=B        bytes per request, a multiple of 4096 (default 4096, at most 1M)
 *   qd=N        requests in flight (default 1, at most 64)
 *   size=B      bytes of the disk used, from offset 0 (default: the whole disk,
 *               at most 64M)
 *   count=N     requests per phase (default size/bs)
 *               (randread visits the same blocks, in the same order, as randwrite)
 *   seed=N      data generation: every 4 KiB unit holds a pattern of (seed, unit)
 *               so any read can be checked whatever wrote it (default 1)
 *   check=0|1   verify every read (default 1)
 *   flush=0|1   FLUSH after each write phase (default 1)
 *   canary=1    every unit starts with the text "SEALVM-CANARY-" (tests search the
 *               host's files for it); canary=rand: followed by 16 random hex digits
 *               drawn once per run (a canary the guest's image does not contain)
 *   indirect=1  one indirect descriptor per request (VIRTIO_F_INDIRECT_DESC)
 *
 * Output: blkbench device=0x.. queue=Q qd=N bs=B size=S
 *         blkbench PHASE ops=N bytes=B cycles=C kbps=K iops=I errors=E mismatches=M
 *         blkbench ioerr op=read sector=S status=1     (first 16)
 *         blkbench done errors=E mismatches=M
 * Exit: 0 all good; 4 an I/O error or a mismatch; 1 no device or bad setup;
 *       2 bad parameters or device broken; 3 timeout.
 */
#include "virtio.h"

#define F_BLK_SIZE              (1u << 6)
#define F_FLUSH                 (1u << 9)
#define F_INDIRECT              (1u << 28)

#define T_IN    0
#define T_OUT   1
#define T_FLUSH 4

#define MAX_QD          64
#define MAX_BS          (1u << 20)
#define UNIT            4096
#define MAX_SIZE        (64ull << 20)

struct blk_req { u32 type; u32 reserved; u64 sector; };

#define DESC_GPA        ((u64)FREE_RAM_BASE)
#define AVAIL_GPA       ((u64)FREE_RAM_BASE + 0x1000)
#define USED_GPA        ((u64)FREE_RAM_BASE + 0x2000)
#define REQ_GPA         ((u64)FREE_RAM_BASE + 0x4000)    /* MAX_QD headers */
#define STATUS_GPA      ((u64)FREE_RAM_BASE + 0x5000)    /* MAX_QD status bytes */
#define INDIRECT_GPA    ((u64)FREE_RAM_BASE + 0x6000)    /* MAX_QD x 3 descriptors */
#define BUFFERS_GPA     ((u64)FREE_RAM_BASE + 0x10000)

static u32 qsize, qd, bs, use_indirect;
static u64 timeout;
static u64 seed, units;
static bool do_check, canary;
static u64 errors, mismatches;
static u16 avail_idx, used_seen;

static volatile struct virtq_desc *desc = (void *)DESC_GPA;
static volatile struct virtq_avail *avail = (void *)AVAIL_GPA;
static volatile struct virtq_used *used = (void *)USED_GPA;

const char *virtio_guest = "blkbench";

static u64 device_setup(void)
{
    u32 lo = features_begin();
    if (use_indirect && !(lo & F_INDIRECT))
        init_failed("device does not offer indirect descriptors");
    features_end(lo & (F_FLUSH | F_BLK_SIZE | (use_indirect ? F_INDIRECT : 0)));
    u64 sectors = reg_read(VMMIO_CONFIG) | ((u64)reg_read(VMMIO_CONFIG + 4) << 32);
    qsize = queue_size(0, VIRTQ_MAX);
    memset((void *)DESC_GPA, 0, BUFFERS_GPA - DESC_GPA);
    queue_ready(qsize, DESC_GPA, AVAIL_GPA, USED_GPA);
    driver_ok();
    return sectors * 512;
}

/* ------------------------------------------------------------- data */
static u64 mix(u64 x)
{
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static char CANARY[] = "SEALVM-CANARY-................";
static u32 canary_len = 14;

static void fill_unit(u64 *p, u64 unit)
{
    u64 x = mix(seed * 0x9e3779b97f4a7c15ull + unit);
    for (u32 i = 0; i < UNIT / 8; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = x;
    }
    if (canary)
        memcpy(p, CANARY, canary_len);
}

static u64 expect_buf[UNIT / 8];

static bool check_unit(const u64 *p, u64 unit)
{
    fill_unit(expect_buf, unit);
    return memcmp(p, expect_buf, UNIT) == 0;
}

/* ------------------------------------------------------------- requests */
static u64 rng_state = 0x2545f4914f6cdd1dull;

static u64 next_rand(void)
{
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return rng_state;
}

struct slot { u32 type; u64 unit; };
static struct slot slots[MAX_QD];

static u8 *buffer(u32 i) { return (u8 *)(BUFFERS_GPA + (u64)i * bs); }

/* Build request i (descriptors at 3i..3i+2 or the indirect table i) and publish it. */
static void submit(u32 i, u32 type, u64 unit, u32 len)
{
    volatile struct blk_req *req = (void *)(REQ_GPA + 16 * i);
    volatile u8 *st = (u8 *)(STATUS_GPA + i);
    req->type = type;
    req->reserved = 0;
    req->sector = unit * (UNIT / 512);
    *st = 0xff;
    slots[i].type = type;
    slots[i].unit = unit;
    volatile struct virtq_desc *t = use_indirect ? (void *)(INDIRECT_GPA + 48 * i) : &desc[3 * i];
    u16 base = use_indirect ? 0 : (u16)(3 * i);
    t[0].addr = REQ_GPA + 16 * i; t[0].len = 16; t[0].flags = VIRTQ_DESC_F_NEXT; t[0].next = base + 1;
    if (len) {
        t[1].addr = (u64)buffer(i); t[1].len = len;
        t[1].flags = VIRTQ_DESC_F_NEXT | (type == T_IN ? VIRTQ_DESC_F_WRITE : 0); t[1].next = base + 2;
        t[2].addr = STATUS_GPA + i; t[2].len = 1; t[2].flags = VIRTQ_DESC_F_WRITE; t[2].next = 0;
        t[0].next = base + 1;
    } else {
        t[0].next = base + 1;
        t[1].addr = STATUS_GPA + i; t[1].len = 1; t[1].flags = VIRTQ_DESC_F_WRITE; t[1].next = 0;
    }
    u16 head = (u16)(3 * i);
    if (use_indirect) {
        head = (u16)i;
        desc[i].addr = INDIRECT_GPA + 48 * i;
        desc[i].len = len ? 48 : 32;
        desc[i].flags = VIRTQ_DESC_F_INDIRECT;
        desc[i].next = 0;
    }
    avail->ring[avail_idx % qsize] = head;
    avail_idx++;
}

static void kick(void)
{
    barrier();
    avail->idx = avail_idx;
    mfence();
    reg_write(VMMIO_QUEUE_NOTIFY, 0);
}

/* Wait for one completion; returns its slot. */
static u32 reap(void)
{
    u64 start = rdtsc(), last_status = start;
    if (used->idx == used_seen && avail->idx != avail_idx)
        kick();                 /* batch: publish new requests once nothing is left to reap */
    while (used->idx == used_seen) {
        if (boot.idle_addr) {
            idle_wait(0);
            if (used->idx == used_seen && (reg_read(VMMIO_STATUS) & STATUS_NEEDS_RESET))
                broken();
            continue;
        }
        cpu_relax();
        u64 now = rdtsc();
        if (now - last_status > timeout / 1000) {
            if (reg_read(VMMIO_STATUS) & STATUS_NEEDS_RESET)
                broken();
            last_status = now;
        }
        if (now - start > timeout) {
            printf("blkbench timeout used=%u seen=%u avail=%u\n", used->idx, used_seen, avail_idx);
            exit(3);
        }
    }
    barrier();
    u32 id = used->ring[used_seen % qsize].id;
    used_seen++;
    u32 i = use_indirect ? id : id / 3;
    if (i >= qd) {
        printf("blkbench bad used id %u\n", id);
        exit(1);
    }
    return i;
}

static void complete(u32 i)
{
    u8 st = *(volatile u8 *)(STATUS_GPA + i);
    const char *op = slots[i].type == T_IN ? "read" : slots[i].type == T_OUT ? "write" : "flush";
    if (st != 0) {
        if (errors < 16)
            printf("blkbench ioerr op=%s sector=%llu status=%u\n", op,
                   slots[i].unit * (UNIT / 512), st);
        errors++;
        return;
    }
    if (slots[i].type == T_IN && do_check) {
        for (u32 u = 0; u < bs / UNIT; u++)
            if (!check_unit((const u64 *)(buffer(i) + u * UNIT), slots[i].unit + u)) {
                if (mismatches < 16)
                    printf("blkbench mismatch sector=%llu\n", (slots[i].unit + u) * (UNIT / 512));
                mismatches++;
            }
    }
}

static void flush(void)
{
    submit(0, T_FLUSH, 0, 0);
    kick();
    complete(reap());
}

/* One phase: `count` requests of bs bytes, sequential or random, qd in flight. */
static void phase(const char *name, bool write, bool random, u64 count)
{
    u64 per = bs / UNIT, nreq = units / per, next = 0, done = 0, issued = 0;
    u64 e0 = errors, m0 = mismatches;
    if (nreq == 0)
        return;
    rng_state = 0x2545f4914f6cdd1dull;  /* randread visits the blocks randwrite wrote */
    u64 t0 = rdtsc();
    for (u32 i = 0; i < qd && issued < count; i++, issued++) {
        u64 r = random ? next_rand() % nreq : next++ % nreq;
        if (write)
            for (u32 u = 0; u < per; u++)
                fill_unit((u64 *)(buffer(i) + u * UNIT), r * per + u);
        submit(i, write ? T_OUT : T_IN, r * per, bs);
    }
    kick();
    while (done < count) {
        u32 i = reap();
        complete(i);
        done++;
        if (issued < count) {
            u64 r = random ? next_rand() % nreq : next++ % nreq;
            if (write)
                for (u32 u = 0; u < per; u++)
                    fill_unit((u64 *)(buffer(i) + u * UNIT), r * per + u);
            submit(i, write ? T_OUT : T_IN, r * per, bs);
            issued++;
        }
    }
    if (write && param_u64("flush", 1))
        flush();
    u64 cycles = rdtsc() - t0;
    u64 bytes = count * bs;
    u64 usecs = cycles * 1000000 / boot.tsc_hz;
    if (usecs == 0)
        usecs = 1;
    printf("blkbench %s ops=%llu bytes=%llu cycles=%llu kbps=%llu iops=%llu errors=%llu "
           "mismatches=%llu\n", name, count, bytes, cycles, bytes * 1000000 / 1024 / usecs,
           count * 1000000 / usecs, errors - e0, mismatches - m0);
}

static bool word_is(const char *s, u64 n, const char *w)
{
    return strlen(w) == n && memcmp(s, w, n) == 0;
}

int main(void)
{
    bs = (u32)param_u64("bs", 4096);
    qd = (u32)param_u64("qd", 1);
    seed = param_u64("seed", 1);
    do_check = param_u64("check", 1) != 0;
    u64 clen;
    const char *cv = param_str("canary", &clen);
    canary = cv && !(clen == 1 && cv[0] == '0');
    if (cv && clen == 4 && memcmp(cv, "rand", 4) == 0) {
        if (!random_hex(CANARY + 14, 8)) {
            puts("blkbench error: canary=rand needs RDRAND");
            return 2;
        }
        canary_len = 30;
    }
    use_indirect = param_u64("indirect", 0) != 0;
    timeout = cycles_from_usecs(param_u64("timeout", 30) * 1000000);
    if (bs == 0 || bs % UNIT || bs > MAX_BS || qd == 0 || qd > MAX_QD) {
        puts("blkbench error: need bs a multiple of 4096 up to 1M and 1 <= qd <= 64");
        return 2;
    }
    u32 irq;
    if (!find_device(VIRTIO_ID_BLOCK, &irq)) {
        puts("blkbench no block device");
        return 1;
    }
    if (reg_read(VMMIO_VERSION) != 2)
        init_failed("virtio-mmio version is not 2");
    u64 capacity = device_setup();
    if (!use_indirect && qd * 3 > qsize)
        init_failed("queue too small for that qd (use indirect=1)");
    u64 size = param_u64("size", capacity < MAX_SIZE ? capacity : MAX_SIZE);
    if (size > capacity || size < bs) {
        printf("blkbench error: size %llu outside %u..%llu\n", size, bs, capacity);
        return 2;
    }
    if (!ram_contains(BUFFERS_GPA, (u64)qd * bs))
        init_failed("not enough RAM for the buffers");
    units = size / UNIT;
    u64 count = param_u64("count", size / bs);
    printf("blkbench device=0x%llx queue=%u qd=%u bs=%u size=%llu capacity=%llu\n",
           dev, qsize, qd, bs, size, capacity);

    u64 len;
    const char *tests = param_str("tests", &len);
    if (!tests) {
        tests = "seqwrite,seqread";
        len = strlen(tests);
    }
    for (u64 i = 0; i < len;) {
        u64 j = i;
        while (j < len && tests[j] != ',')
            j++;
        const char *w = tests + i;
        u64 n = j - i;
        if (word_is(w, n, "seqwrite"))
            phase("seqwrite", true, false, count);
        else if (word_is(w, n, "seqread"))
            phase("seqread", false, false, count);
        else if (word_is(w, n, "randwrite"))
            phase("randwrite", true, true, count);
        else if (word_is(w, n, "randread"))
            phase("randread", false, true, count);
        else if (word_is(w, n, "sleep")) {
            u64 ms = param_u64("sleep_ms", 2000);
            printf("blkbench sleeping ms=%llu\n", ms);
            u64 end = rdtsc() + cycles_from_usecs(ms * 1000);
            while (rdtsc() < end)
                idle_wait(10000);
        }
        else {
            printf("blkbench error: unknown test in '%s'\n", tests);
            return 2;
        }
        i = j + 1;
    }
    printf("blkbench done errors=%llu mismatches=%llu\n", errors, mismatches);
    return errors || mismatches ? 4 : 0;
}
