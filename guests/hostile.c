/*
 * hostile.c - a guest that attacks its own core through the virtio-rng device
 * and the CPU.  One attack per run, chosen by mode=; each prints
 *
 *   hostile MODE start
 *   hostile MODE result=R          R: needs_reset (the device refused the ring and
 *                                  said so), refused (the request came back used
 *                                  with no bytes), served (it was answered with
 *                                  bytes), nothing (no answer before the deadline)
 *   hostile MODE after=A           A: served (a fresh, valid request after a device
 *                                  reset is answered) or dead
 *
 * so a test can see that the attack ran, what the core did, and that the device
 * (and the core) still work.
 *
 *   mode=loop     a descriptor chain whose next pointers form a cycle
 *   mode=oob      a buffer far outside guest RAM
 *   mode=hole     a buffer in the MMIO hole (the device windows themselves)
 *   mode=huge     a buffer of almost 4 GiB
 *   mode=long     a chain longer than the queue (every entry chained to the next,
 *                 the last back to the first)
 *   mode=avail    the available index jumps 1000 entries ahead of the ring
 *   mode=head     a head index outside the descriptor table
 *   mode=storm    notify=N queue notifications (default 200000) with nothing new
 *                 posted, then one valid request
 *   mode=status   DRIVER_OK before FEATURES_OK, a queue size that is not a power
 *                 of two, queue registers rewritten after DRIVER_OK
 *   mode=triple   wipe the IDT and raise an exception: a triple fault (the VM must
 *                 stop with that reason; nothing is printed after "start")
 *   wait=MS       how long to wait for an answer (default 2000)
 */
#include "virtio.h"

#define DESC_GPA        (FREE_RAM_BASE)
#define AVAIL_GPA       (FREE_RAM_BASE + 0x1000)
#define USED_GPA        (FREE_RAM_BASE + 0x2000)
#define BUF_GPA         (FREE_RAM_BASE + 0x10000)

const char *virtio_guest = "hostile";

static volatile struct virtq_desc *desc = (void *)DESC_GPA;
static volatile struct virtq_avail *avail = (void *)AVAIL_GPA;
static volatile struct virtq_used *used = (void *)USED_GPA;
static u32 qsize;
static u16 next_avail;
static u64 wait_us;

static void setup(void)
{
    features_begin();
    features_end(0);
    qsize = queue_size(0, VIRTQ_MAX);
    memset((void *)DESC_GPA, 0, BUF_GPA - DESC_GPA);
    queue_ready(qsize, DESC_GPA, AVAIL_GPA, USED_GPA);
    driver_ok();
    next_avail = 0;
}

static void post(u16 head, u16 count)
{
    avail->ring[next_avail % qsize] = head;
    next_avail += count;
    barrier();
    avail->idx = next_avail;
    mfence();
    reg_write(VMMIO_QUEUE_NOTIFY, 0);
}

/* What the device did with what was posted: needs_reset, served or nothing. */
static const char *outcome(u16 used_before)
{
    u64 deadline = rdtsc() + cycles_from_usecs(wait_us);
    while (rdtsc() < deadline) {
        if (reg_read(VMMIO_STATUS) & STATUS_NEEDS_RESET)
            return "needs_reset";
        if (used->idx != used_before)
            return used->ring[used_before % qsize].len ? "served" : "refused";
        if (boot.idle_addr)
            idle_wait(1000);
        else
            cpu_relax();
    }
    return "nothing";
}

static void valid_desc(u16 i)
{
    desc[i].addr = BUF_GPA;
    desc[i].len = 64;
    desc[i].flags = VIRTQ_DESC_F_WRITE;
    desc[i].next = 0;
}

/* Reset the device, set it up again and make one valid request. */
static const char *after(void)
{
    reg_write(VMMIO_STATUS, 0);
    setup();
    valid_desc(0);
    u16 before = used->idx;
    post(0, 1);
    return outcome(before);
}

extern unsigned char idt[];

int main(void)
{
    u64 len;
    const char *mode = param_str("mode", &len);
    u64 notify = param_u64("notify", 200000);
    wait_us = param_u64("wait", 2000) * 1000;
    char name[16];
    u32 irq;

    if (!mode || len == 0 || len >= sizeof(name)) {
        puts("hostile error: need mode=loop|oob|hole|huge|long|avail|head|storm|status|triple");
        return 2;
    }
    memcpy(name, mode, len);
    name[len] = 0;
    if (!find_device(VIRTIO_ID_ENTROPY, &irq)) {
        puts("hostile no entropy device");
        return 1;
    }
    setup();
    printf("hostile %s start\n", name);
    u16 before = used->idx;
    const char *r = NULL;

#define IS(m) (len == sizeof(m) - 1 && memcmp(mode, m, len) == 0)
    if (IS("loop")) {
        /* empty buffers: no length cap ever stops the walk, only the loop bound */
        desc[0] = (struct virtq_desc){BUF_GPA, 0, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1};
        desc[1] = (struct virtq_desc){BUF_GPA, 0, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0};
        post(0, 1);
    } else if (IS("oob")) {
        desc[0] = (struct virtq_desc){1ull << 40, 4096, VIRTQ_DESC_F_WRITE, 0};
        post(0, 1);
    } else if (IS("hole")) {
        desc[0] = (struct virtq_desc){dev & ~0xfffull, 4096, VIRTQ_DESC_F_WRITE, 0};
        post(0, 1);
    } else if (IS("huge")) {
        desc[0] = (struct virtq_desc){BUF_GPA, 0xfffff000u, VIRTQ_DESC_F_WRITE, 0};
        post(0, 1);
    } else if (IS("long")) {
        for (u32 i = 0; i < qsize; i++)
            desc[i] = (struct virtq_desc){BUF_GPA, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                                          (u16)((i + 1) % qsize)};
        post(0, 1);
    } else if (IS("avail")) {
        valid_desc(0);
        post(0, 1000);
    } else if (IS("head")) {
        valid_desc(0);
        post((u16)(qsize + 7), 1);
    } else if (IS("storm")) {
        for (u64 i = 0; i < notify; i++)
            reg_write(VMMIO_QUEUE_NOTIFY, 0);
        printf("hostile storm notified=%llu\n", notify);
        valid_desc(0);
        post(0, 1);
    } else if (IS("status")) {
        reg_write(VMMIO_STATUS, 0);
        reg_write(VMMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        reg_write(VMMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
        u32 s1 = reg_read(VMMIO_STATUS);
        reg_write(VMMIO_QUEUE_SEL, 0);
        reg_write(VMMIO_QUEUE_NUM, 3);
        reg_write(VMMIO_QUEUE_READY, 1);
        reg_write(VMMIO_QUEUE_DESC_LO, 0xdead000);
        u32 s2 = reg_read(VMMIO_STATUS);
        printf("hostile status driver_ok_first=0x%x after_queue_writes=0x%x\n", s1, s2);
        valid_desc(0);
        post(0, 1);
    } else if (IS("triple")) {
        memset(idt, 0, 256 * 16);   /* every gate not present */
        mfence();
        __asm__ volatile("ud2");
        puts("hostile triple survived");
        return 1;
    } else {
        puts("hostile error: unknown mode");
        return 2;
    }
    r = outcome(before);
    printf("hostile %s result=%s\n", name, r);
    const char *a = after();
    printf("hostile %s after=%s\n", name, a[0] == 's' ? "served" : "dead");
    return 0;
}
