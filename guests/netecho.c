/*
 * netecho.c - virtio-net guest: a polling virtio-mmio (version 2) driver for
 * the first network device (DeviceID 1), and a tiny IPv4 host on it.
 *
 * It answers ARP requests for its address, ICMP echo requests, and UDP
 * datagrams to the echo port (sent back to the sender unchanged).  A UDP
 * datagram to the stream port reading "stream N SIZE" makes it send N
 * datagrams of SIZE bytes back to the sender (the first 8 bytes of each are
 * its sequence number), for throughput measurements.
 *
 *   ip=A.B.C.D     its address (default 10.77.0.2)
 *   echo=P         UDP echo port (default 7)
 *   stream=P       UDP stream port (default 9)
 *   peer=A.B.C.D   where the canary goes (default 10.77.0.1)
 *   canary=TEXT    if given: every second, a UDP datagram "CANARY:TEXT" from the
 *                  echo port to peer:7777 (ARP-resolved first); canary=rand: TEXT is
 *                  32 random hex digits drawn at start (only the guest knows them)
 *   secs=S         run time in seconds (default 0 = until stopped)
 *   spin=1         never park on the idle doorbell while waiting (lower latency,
 *                  one host CPU busy all the time, as under QEMU)
 *
 * Under QEMU (no virtio_mmio.device= word) microvm's transports are probed.
 * Checksums: IPv4 and ICMP computed; UDP sent with checksum 0 (none).
 *
 * Output: netecho device=0x.. mac=.. ip=.. mtu=..
 *         netecho ready
 *         netecho done rx=.. tx=.. arp=.. icmp=.. udp=.. (at secs=)
 * Failures: netecho no network device (exit 1), netecho init failed: ... (exit 1),
 *         netecho device broken (exit 2).
 */
#include "virtio.h"

#define VIRTIO_NET_F_MAC        (1u << 5)

#define QSIZE                   VIRTQ_MAX
#define BUF                     2048
#define NET_HDR                 12


struct vq {
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    u64 bufs;
    u32 size;
    u16 avail_idx, used_seen;
};

#define RXQ_GPA         (FREE_RAM_BASE)
#define TXQ_GPA         (FREE_RAM_BASE + 0x4000)
#define RXBUF_GPA       (FREE_RAM_BASE + 0x10000)
#define TXBUF_GPA       (RXBUF_GPA + QSIZE * BUF)
#define END_GPA         (TXBUF_GPA + QSIZE * BUF)

static struct vq rxq, txq;
static u8 mac[6], peer_mac[6];
static bool peer_known;
static u32 my_ip, peer_ip;
static u64 echo_port, stream_port;
static u32 tx_free;            /* TX descriptors not in flight */
static u16 tx_free_list[QSIZE];
static u64 n_rx, n_tx, n_arp, n_icmp, n_udp;

const char *virtio_guest = "netecho";

static bool parse_ip(const char *key, u32 def, u32 *out)
{
    u64 len;
    const char *s = param_str(key, &len);
    *out = def;
    if (!s)
        return true;
    u32 ip = 0, part = 0, dots = 0, digits = 0;
    for (u64 i = 0; i <= len; i++) {
        if (i == len || s[i] == '.') {
            if (!digits || part > 255)
                return false;
            ip = (ip << 8) | part;
            part = digits = 0;
            if (i < len)
                dots++;
        } else if (s[i] >= '0' && s[i] <= '9') {
            part = part * 10 + (u32)(s[i] - '0');
            digits++;
        } else {
            return false;
        }
    }
    if (dots != 3)
        return false;
    *out = ip;
    return true;
}

static void setup_queue(u32 index, struct vq *q, u64 rings, u64 bufs)
{
    u32 size = queue_size(index, QSIZE);
    q->size = size;
    q->desc = (void *)rings;
    q->avail = (void *)(rings + 0x1000);
    q->used = (void *)(rings + 0x2000);
    q->bufs = bufs;
    q->avail_idx = q->used_seen = 0;
    memset((void *)rings, 0, 0x3000);
    queue_ready(size, rings, rings + 0x1000, rings + 0x2000);
}

static void device_init(void)
{
    if (reg_read(VMMIO_VERSION) != 2)
        init_failed("virtio-mmio version is not 2");
    u32 lo = features_begin();
    if (!(lo & VIRTIO_NET_F_MAC))
        init_failed("device has no MAC address");
    features_end(VIRTIO_NET_F_MAC);
    for (u32 i = 0; i < 6; i++)
        mac[i] = *(volatile u8 *)(dev + VMMIO_CONFIG + i);
    if (!ram_contains(RXQ_GPA, END_GPA - RXQ_GPA))
        init_failed("not enough RAM for the rings and buffers");
    setup_queue(0, &rxq, RXQ_GPA, RXBUF_GPA);
    setup_queue(1, &txq, TXQ_GPA, TXBUF_GPA);
    for (u32 i = 0; i < rxq.size; i++) {      /* every receive buffer posted */
        rxq.desc[i].addr = rxq.bufs + (u64)i * BUF;
        rxq.desc[i].len = BUF;
        rxq.desc[i].flags = VIRTQ_DESC_F_WRITE;
        rxq.avail->ring[i] = (u16)i;
    }
    for (u32 i = 0; i < txq.size; i++) {
        txq.desc[i].addr = txq.bufs + (u64)i * BUF;
        tx_free_list[i] = (u16)i;
    }
    tx_free = txq.size;
    driver_ok();
    rxq.avail_idx = (u16)rxq.size;
    barrier();
    rxq.avail->idx = rxq.avail_idx;
    mfence();
    reg_write(VMMIO_QUEUE_NOTIFY, 0);
}

/* ------------------------------------------------------------ transmit */
static u32 tx_pending;          /* added to the ring since the last notify */

static void tx_reclaim(void)
{
    u16 idx = txq.used->idx;
    barrier();
    while (txq.used_seen != idx) {
        u32 id = txq.used->ring[txq.used_seen % txq.size].id;
        txq.used_seen++;
        if (id < txq.size)
            tx_free_list[tx_free++] = (u16)id;
    }
}

static void tx_kick(void)
{
    if (!tx_pending)
        return;
    barrier();
    txq.avail->idx = txq.avail_idx;
    mfence();
    if (!(txq.used->flags & VIRTQ_USED_F_NO_NOTIFY))
        reg_write(VMMIO_QUEUE_NOTIFY, 1);
    tx_pending = 0;
}

/* A frame buffer to fill (after the virtio-net header), or NULL if the ring is full. */
static u8 *tx_get(u16 *id)
{
    if (!tx_free)
        tx_reclaim();
    if (!tx_free)
        return NULL;
    *id = tx_free_list[--tx_free];
    u8 *buf = (u8 *)(txq.bufs + (u64)*id * BUF);
    memset(buf, 0, NET_HDR);
    return buf + NET_HDR;
}

static void tx_put(u16 id, u32 frame_len)
{
    txq.desc[id].len = NET_HDR + frame_len;
    txq.desc[id].flags = 0;
    txq.avail->ring[txq.avail_idx % txq.size] = id;
    txq.avail_idx++;
    tx_pending++;
    n_tx++;
    if (tx_pending >= 32)
        tx_kick();
}

/* ------------------------------------------------------------ protocols */
static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { put16(p, (u16)(v >> 16)); put16(p + 2, (u16)v); }

static u16 csum(const u8 *p, u32 n)
{
    u64 s = 0;
    for (u32 i = 0; i + 1 < n; i += 2)
        s += get16(p + i);
    if (n & 1)
        s += (u32)p[n - 1] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

static void eth_header(u8 *f, const u8 *dst, u16 type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, mac, 6);
    put16(f + 12, type);
}

static void ip_header(u8 *ip, u32 total, u8 proto, u32 dst)
{
    static u16 ident;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (u16)total);
    put16(ip + 4, ident++);
    put16(ip + 6, 0x4000);          /* don't fragment */
    ip[8] = 64;
    ip[9] = proto;
    put16(ip + 10, 0);
    put32(ip + 12, my_ip);
    put32(ip + 16, dst);
    put16(ip + 10, csum(ip, 20));
}

static bool send_udp(const u8 *dmac, u32 dst, u16 sport, u16 dport, const u8 *data, u32 n)
{
    u16 id;
    u8 *f = tx_get(&id);
    if (!f)
        return false;
    eth_header(f, dmac, 0x0800);
    ip_header(f + 14, 28 + n, 17, dst);
    u8 *u = f + 34;
    put16(u, sport);
    put16(u + 2, dport);
    put16(u + 4, (u16)(8 + n));
    put16(u + 6, 0);
    if (data)
        memcpy(u + 8, data, n);
    tx_put(id, 42 + n);
    return true;
}

static void send_arp(u16 op, const u8 *tmac, u32 tip)
{
    static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    u16 id;
    u8 *f = tx_get(&id);
    if (!f)
        return;
    eth_header(f, op == 1 ? bcast : tmac, 0x0806);
    u8 *a = f + 14;
    put16(a, 1);
    put16(a + 2, 0x0800);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, mac, 6);
    put32(a + 14, my_ip);
    memcpy(a + 18, tmac, 6);
    put32(a + 24, tip);
    tx_put(id, 42);
}

static void stream(const u8 *dmac, u32 dst, u16 dport, const u8 *cmd, u32 n)
{
    char text[64];
    u32 m = n < sizeof(text) - 1 ? n : (u32)sizeof(text) - 1;
    memcpy(text, cmd, m);
    text[m] = 0;
    u64 count = 0, size = 0;
    u32 i = 7, j;
    if (memcmp(text, "stream ", 7) != 0)
        return;
    for (j = i; text[j] >= '0' && text[j] <= '9'; j++)
        ;
    if (!parse_u64(text + i, j - i, &count) || text[j] != ' ')
        return;
    for (i = ++j; text[j] >= '0' && text[j] <= '9'; j++)
        ;
    if (!parse_u64(text + i, j - i, &size) || size < 8 || size > 1392)
        return;
    static u8 payload[1392];
    for (u64 seq = 0; seq < count; seq++) {
        memcpy(payload, &seq, 8);
        while (!send_udp(dmac, dst, (u16)stream_port, dport, payload, (u32)size)) {
            tx_kick();
            cpu_relax();
            check_status();
        }
    }
    tx_kick();
}

static void handle_frame(const u8 *f, u32 n)
{
    if (n < 14)
        return;
    u16 type = get16(f + 12);
    if (type == 0x0806 && n >= 42) {
        const u8 *a = f + 14;
        u32 sip = get32(a + 14), tip = get32(a + 24);
        if (sip == peer_ip) {
            memcpy(peer_mac, a + 8, 6);
            peer_known = true;
        }
        if (get16(a + 6) == 1 && tip == my_ip) {
            n_arp++;
            send_arp(2, a + 8, sip);
        }
        return;
    }
    if (type != 0x0800 || n < 34)
        return;
    const u8 *ip = f + 14;
    u32 ihl = (ip[0] & 0xf) * 4u, total = get16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < 20 || total < ihl || 14 + total > n || get32(ip + 16) != my_ip)
        return;
    if (get16(ip + 6) & 0x3fff)             /* fragments are not reassembled */
        return;
    u32 src = get32(ip + 12);
    const u8 *l4 = ip + ihl;
    u32 l4n = total - ihl;
    if (ip[9] == 1 && l4n >= 8 && l4[0] == 8) {          /* ICMP echo request */
        u16 id;
        u8 *r = tx_get(&id);
        if (!r)
            return;
        eth_header(r, f + 6, 0x0800);
        ip_header(r + 14, 20 + l4n, 1, src);
        u8 *ic = r + 34;
        memcpy(ic, l4, l4n);
        ic[0] = 0;
        put16(ic + 2, 0);
        put16(ic + 2, csum(ic, l4n));
        tx_put(id, 34 + l4n);
        n_icmp++;
    } else if (ip[9] == 17 && l4n >= 8) {
        u16 sport = get16(l4), dport = get16(l4 + 2), ulen = get16(l4 + 4);
        if (ulen < 8 || ulen > l4n)
            return;
        n_udp++;
        if (dport == echo_port)
            send_udp(f + 6, src, dport, sport, l4 + 8, ulen - 8u);
        else if (dport == stream_port)
            stream(f + 6, src, sport, l4 + 8, ulen - 8u);
    }
}

static bool rx_poll(void)
{
    u16 idx = rxq.used->idx;
    if (idx == rxq.used_seen)
        return false;
    barrier();
    while (rxq.used_seen != idx) {
        volatile struct virtq_used_elem *e = &rxq.used->ring[rxq.used_seen % rxq.size];
        u32 id = e->id, len = e->len;
        rxq.used_seen++;
        if (id < rxq.size && len > NET_HDR && len <= BUF) {
            n_rx++;
            handle_frame((const u8 *)(rxq.bufs + (u64)id * BUF + NET_HDR), len - NET_HDR);
        }
        rxq.avail->ring[rxq.avail_idx % rxq.size] = (u16)(id < rxq.size ? id : 0);
        rxq.avail_idx++;
    }
    barrier();
    rxq.avail->idx = rxq.avail_idx;
    mfence();
    if (!(rxq.used->flags & VIRTQ_USED_F_NO_NOTIFY))
        reg_write(VMMIO_QUEUE_NOTIFY, 0);
    return true;
}

int main(void)
{
    u64 len;
    const char *canary = param_str("canary", &len);
    u64 canary_len = canary ? len : 0;
    static char secret[32];
    if (canary_len == 4 && memcmp(canary, "rand", 4) == 0) {
        if (!random_hex(secret, 16)) {
            puts("netecho error: canary=rand needs RDRAND");
            return 2;
        }
        canary = secret;
        canary_len = sizeof(secret);
    }
    u64 secs = param_u64("secs", 0);
    bool spin = param_u64("spin", 0) != 0;
    echo_port = param_u64("echo", 7);
    stream_port = param_u64("stream", 9);
    if (!parse_ip("ip", 0x0a4d0002, &my_ip) || !parse_ip("peer", 0x0a4d0001, &peer_ip) ||
        echo_port == 0 || echo_port > 65535 || stream_port == 0 || stream_port > 65535 ||
        canary_len > 200) {
        puts("netecho error: bad ip=, peer=, echo=, stream= or canary= (at most 200 bytes)");
        return 2;
    }
    u32 irq;
    if (!find_device(VIRTIO_ID_NET, &irq)) {
        puts("netecho no network device");
        return 1;
    }
    device_init();
    printf("netecho device=0x%llx mac=%02x:%02x:%02x:%02x:%02x:%02x ip=%u.%u.%u.%u\n", dev,
           mac[0], mac[1], mac[2], mac[3], mac[4], mac[5],
           my_ip >> 24, (my_ip >> 16) & 255, (my_ip >> 8) & 255, my_ip & 255);
    puts("netecho ready");

    u64 second = cycles_from_usecs(1000000);
    u64 start = rdtsc(), next_tick = start;
    u8 msg[208];
    while (!secs || rdtsc() - start < secs * second) {
        bool busy = rx_poll();
        tx_kick();
        tx_reclaim();
        u64 now = rdtsc();
        if (canary_len && now >= next_tick) {
            next_tick = now + second;
            if (!peer_known) {
                send_arp(1, (const u8 *)"\0\0\0\0\0\0", peer_ip);
            } else {
                memcpy(msg, "CANARY:", 7);
                memcpy(msg + 7, canary, canary_len);
                send_udp(peer_mac, peer_ip, (u16)echo_port, 7777, msg, 7 + (u32)canary_len);
            }
            tx_kick();
        }
        if (!busy) {
            check_status();
            if (boot.idle_addr && !spin)
                idle_wait(canary_len ? 200000 : 500000);
            else
                cpu_relax();
        }
    }
    printf("netecho done rx=%llu tx=%llu arp=%llu icmp=%llu udp=%llu\n",
           n_rx, n_tx, n_arp, n_icmp, n_udp);
    return 0;
}
