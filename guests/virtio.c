/* virtio.c - the shared virtio-mmio driver core (see virtio.h). */
#include "virtio.h"

u64 dev;

u32 reg_read(u32 off) { return mmio_read32(dev + off); }
void reg_write(u32 off, u32 v) { mmio_write32(dev + off, v); }

noreturn void broken(void)
{
    printf("%s device broken\n", virtio_guest);
    exit(2);
}

noreturn void init_failed(const char *why)
{
    printf("%s init failed: %s\n", virtio_guest, why);
    reg_write(VMMIO_STATUS, reg_read(VMMIO_STATUS) | STATUS_FAILED);
    exit(1);
}

void check_status(void)
{
    if (reg_read(VMMIO_STATUS) & STATUS_NEEDS_RESET)
        broken();
}

static bool is_device(u64 base, u32 device_id)
{
    return mmio_read32(base + VMMIO_MAGIC) == VIRTIO_MAGIC &&
           mmio_read32(base + VMMIO_DEVICE_ID) == device_id;
}

bool find_device(u32 device_id, u32 *irq)
{
    for (u32 i = 0; i < boot.n_virtio; i++)
        if (is_device(boot.virtio[i].base, device_id)) {
            dev = boot.virtio[i].base;
            *irq = boot.virtio[i].irq;
            return true;
        }
    if (boot.n_virtio == 0 && !boot.sealvm)
        for (u32 i = 0; i < MICROVM_VIRTIO_COUNT; i++) {
            u64 base = MICROVM_VIRTIO_BASE + i * MICROVM_VIRTIO_STRIDE;
            if (is_device(base, device_id)) {
                dev = base;
                *irq = 0;
                return true;
            }
        }
    return false;
}

u32 features_begin(void)
{
    reg_write(VMMIO_STATUS, 0);                 /* reset */
    for (u32 i = 0; reg_read(VMMIO_STATUS) != 0; i++)
        if (i > 1000)
            init_failed("device does not reset");
    reg_write(VMMIO_STATUS, STATUS_ACKNOWLEDGE);
    reg_write(VMMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    reg_write(VMMIO_DEVICE_FEAT_SEL, 0);
    u32 lo = reg_read(VMMIO_DEVICE_FEATURES);
    reg_write(VMMIO_DEVICE_FEAT_SEL, 1);
    if (!(reg_read(VMMIO_DEVICE_FEATURES) & 1))  /* VIRTIO_F_VERSION_1 = bit 32 */
        init_failed("device does not offer VIRTIO_F_VERSION_1");
    return lo;
}

void features_end(u32 lo)
{
    reg_write(VMMIO_DRIVER_FEAT_SEL, 0);
    reg_write(VMMIO_DRIVER_FEATURES, lo);
    reg_write(VMMIO_DRIVER_FEAT_SEL, 1);
    reg_write(VMMIO_DRIVER_FEATURES, 1);
    reg_write(VMMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    u32 st = reg_read(VMMIO_STATUS);
    if (st & STATUS_NEEDS_RESET)
        broken();
    if (!(st & STATUS_FEATURES_OK))
        init_failed("FEATURES_OK not accepted");
}

u32 queue_size(u32 index, u32 cap)
{
    reg_write(VMMIO_QUEUE_SEL, index);
    if (reg_read(VMMIO_QUEUE_READY) != 0)
        init_failed("queue already live");
    u32 qmax = reg_read(VMMIO_QUEUE_NUM_MAX);
    if (qmax == 0)
        init_failed("queue not available");
    u32 size = 1;
    while (size * 2 <= qmax && size * 2 <= cap)
        size *= 2;
    return size;
}

void queue_ready(u32 size, u64 desc, u64 avail, u64 used)
{
    reg_write(VMMIO_QUEUE_NUM, size);
    reg_write(VMMIO_QUEUE_DESC_LO, (u32)desc);
    reg_write(VMMIO_QUEUE_DESC_HI, (u32)(desc >> 32));
    reg_write(VMMIO_QUEUE_DRIVER_LO, (u32)avail);
    reg_write(VMMIO_QUEUE_DRIVER_HI, (u32)(avail >> 32));
    reg_write(VMMIO_QUEUE_DEVICE_LO, (u32)used);
    reg_write(VMMIO_QUEUE_DEVICE_HI, (u32)(used >> 32));
    reg_write(VMMIO_QUEUE_READY, 1);
}

void driver_ok(void)
{
    reg_write(VMMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK |
                            STATUS_DRIVER_OK);
    check_status();
}
