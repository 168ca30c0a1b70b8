/*
 * virtio.h - the virtio-mmio (version 2) driver core the device test guests
 * share (rng, blkbench, netecho): registers, status bits, split-ring layout,
 * finding the device (the virtio_mmio.device= words, else QEMU microvm's
 * transports), feature negotiation up to FEATURES_OK, queue setup, DRIVER_OK.
 * One device per guest: its register base is `dev`, and messages name the
 * guest (`virtio_guest`), e.g. "blkbench init failed: ...".
 */
#pragma once
#include "lib.h"

#define VMMIO_MAGIC             0x000
#define VMMIO_VERSION           0x004
#define VMMIO_DEVICE_ID         0x008
#define VMMIO_DEVICE_FEATURES   0x010
#define VMMIO_DEVICE_FEAT_SEL   0x014
#define VMMIO_DRIVER_FEATURES   0x020
#define VMMIO_DRIVER_FEAT_SEL   0x024
#define VMMIO_QUEUE_SEL         0x030
#define VMMIO_QUEUE_NUM_MAX     0x034
#define VMMIO_QUEUE_NUM         0x038
#define VMMIO_QUEUE_READY       0x044
#define VMMIO_QUEUE_NOTIFY      0x050
#define VMMIO_STATUS            0x070
#define VMMIO_QUEUE_DESC_LO     0x080
#define VMMIO_QUEUE_DESC_HI     0x084
#define VMMIO_QUEUE_DRIVER_LO   0x090
#define VMMIO_QUEUE_DRIVER_HI   0x094
#define VMMIO_QUEUE_DEVICE_LO   0x0a0
#define VMMIO_QUEUE_DEVICE_HI   0x0a4
#define VMMIO_CONFIG            0x100

#define VIRTIO_MAGIC            0x74726976      /* "virt" */
#define VIRTIO_ID_NET           1
#define VIRTIO_ID_BLOCK         2
#define VIRTIO_ID_ENTROPY       4

#define STATUS_ACKNOWLEDGE      0x01
#define STATUS_DRIVER           0x02
#define STATUS_DRIVER_OK        0x04
#define STATUS_FEATURES_OK      0x08
#define STATUS_NEEDS_RESET      0x40
#define STATUS_FAILED           0x80

#define VIRTQ_DESC_F_NEXT       1
#define VIRTQ_DESC_F_WRITE      2
#define VIRTQ_DESC_F_INDIRECT   4
#define VIRTQ_USED_F_NO_NOTIFY  1
#define VIRTQ_MAX               256             /* the largest queue a guest uses */

/* QEMU microvm's virtio-mmio transports (probed only if the cmdline names none) */
#define MICROVM_VIRTIO_BASE     0xfeb00000ull
#define MICROVM_VIRTIO_COUNT    24
#define MICROVM_VIRTIO_STRIDE   512

struct virtq_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct virtq_avail { u16 flags; u16 idx; u16 ring[VIRTQ_MAX]; };
struct virtq_used_elem { u32 id; u32 len; };
struct virtq_used { u16 flags; u16 idx; struct virtq_used_elem ring[VIRTQ_MAX]; };

extern u64 dev;                         /* the device's register base */
extern const char *virtio_guest;        /* the guest's name, for messages */

u32 reg_read(u32 off);
void reg_write(u32 off, u32 v);
noreturn void broken(void);             /* "<guest> device broken", exit 2 */
noreturn void init_failed(const char *why);   /* marks the device FAILED, exit 1 */
void check_status(void);                /* NEEDS_RESET: broken() */

/* The first device of `device_id`; its IRQ into *irq (0 under QEMU microvm). */
bool find_device(u32 device_id, u32 *irq);
/* Reset, ACKNOWLEDGE, DRIVER; requires VIRTIO_F_VERSION_1; returns the low
 * 32 feature bits the device offers. */
u32 features_begin(void);
/* Accept `lo` (low bits) and VERSION_1, then FEATURES_OK (checked). */
void features_end(u32 lo);
/* Select queue `index`: it must not be live; the largest power of two both
 * the device and `cap` allow. */
u32 queue_size(u32 index, u32 cap);
/* Queue `index` (selected) of `size` entries with its three rings; READY. */
void queue_ready(u32 size, u64 desc, u64 avail, u64 used);
void driver_ok(void);                   /* DRIVER_OK, then check_status() */
