/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpguard kernel-probe statistics: shared map layout and helpers.
 *
 * Included by tcp_probes.c (the kprobe set and the tracepoint set). Both
 * sets count the same four kinds of event into the same two
 * maps, so the Python side (xdpguard/probes/collector.py) reads either the
 * same way, with the ctypes types bcc builds from these structs (Key/Leaf
 * of the tables); nothing here is redeclared in Python.
 *
 *   xg_psrc   per remote peer, address masked to XG_PROBE_PREFIX4 /
 *             XG_PROBE_PREFIX6 bits (an IPv4-mapped IPv6 peer of a
 *             dual-stack socket is counted as the IPv4 address, as XDP
 *             sees it on the wire)
 *   xg_pdst   per local address:port (the service side of the connection)
 *
 * Both are per-CPU LRU hashes: a SYN flood from many sources hits them on
 * every CPU at once, per-CPU values need no atomics, and LRU keeps them
 * bounded whatever the number of (spoofed) sources. User space sums the
 * CPUs and deletes idle entries (ProbeSet.clear_idle()).
 *
 * Compile-time parameters (-D):
 *   XG_PROBE_PREFIX4     0..32,  default 32
 *   XG_PROBE_PREFIX6     0..128, default 64
 *   XG_PROBE_SRC_ENTRIES default 65536
 *   XG_PROBE_DST_ENTRIES default 16384
 *   XG_OFF_*             offsets of the few raw kernel fields read, from
 *                        the running kernel's BTF (xdpguard/probes/btf.py);
 *                        without them offsetof() on the installed headers
 *                        is used, which is only right if those match.
 */
#ifndef XG_PROBES_H
#define XG_PROBES_H

#include <linux/types.h>

#ifndef XG_PROBE_PREFIX4
#define XG_PROBE_PREFIX4 32
#endif
#ifndef XG_PROBE_PREFIX6
#define XG_PROBE_PREFIX6 64
#endif
#ifndef XG_PROBE_SRC_ENTRIES
#define XG_PROBE_SRC_ENTRIES 65536
#endif
#ifndef XG_PROBE_DST_ENTRIES
#define XG_PROBE_DST_ENTRIES 16384
#endif

#if XG_PROBE_PREFIX4 < 0 || XG_PROBE_PREFIX4 > 32
#error "XG_PROBE_PREFIX4 must be 0..32"
#endif
#if XG_PROBE_PREFIX6 < 0 || XG_PROBE_PREFIX6 > 128
#error "XG_PROBE_PREFIX6 must be 0..128"
#endif

#define XG_AF_INET 2
#define XG_AF_INET6 10

/* TCP states (include/net/tcp_states.h, uapi-stable values) */
#define XG_TCP_ESTABLISHED 1
#define XG_TCP_SYN_RECV 3

/* TCP flag bits in byte 13 of the header */
#define XG_TH_FIN 0x01
#define XG_TH_SYN 0x02
#define XG_TH_RST 0x04
#define XG_TH_ACK 0x10

/* Remote peer, address masked to the configured prefix. IPv4: addr[0..3],
 * rest zero. */
struct xg_probe_src_key {
    __u8 family;            /* XG_AF_INET or XG_AF_INET6 */
    __u8 pad[3];
    __u8 addr[16];          /* network byte order */
};

/* Local service: full address and port. */
struct xg_probe_dst_key {
    __u8 family;
    __u8 pad;
    __u16 port;             /* host byte order */
    __u8 addr[16];
};

/* Cumulative per-CPU counts. */
struct xg_probe_counts {
    __u64 syns;             /* SYN segments that reached a listener */
    __u64 handshakes;       /* passive opens completed (child ESTABLISHED) */
    __u64 synack_retrans;   /* SYN-ACKs retransmitted (peer never ACKed) */
    __u64 rst_sent;         /* RSTs sent to the peer */
    __u64 rst_recv;         /* RSTs received from the peer (on a socket) */
};

/* Event kinds, index of the counter to bump. */
#define XG_EV_SYN 0
#define XG_EV_HANDSHAKE 1
#define XG_EV_SYNACK_RETRANS 2
#define XG_EV_RST_SENT 3
#define XG_EV_RST_RECV 4

BPF_TABLE("lru_percpu_hash", struct xg_probe_src_key, struct xg_probe_counts,
          xg_psrc, XG_PROBE_SRC_ENTRIES);
BPF_TABLE("lru_percpu_hash", struct xg_probe_dst_key, struct xg_probe_counts,
          xg_pdst, XG_PROBE_DST_ENTRIES);

/* One observed connection endpoint pair, as the probes extract it. */
struct xg_conn {
    __u16 family;
    __u16 lport;            /* host order */
    __u8 laddr[16];
    __u8 raddr[16];
};

static __always_inline void xg_bump(struct xg_probe_counts *c, int ev)
{
    switch (ev) {
    case XG_EV_SYN: c->syns++; break;
    case XG_EV_HANDSHAKE: c->handshakes++; break;
    case XG_EV_SYNACK_RETRANS: c->synack_retrans++; break;
    case XG_EV_RST_SENT: c->rst_sent++; break;
    case XG_EV_RST_RECV: c->rst_recv++; break;
    }
}

/* Mask of byte i of an address for a prefix of p bits (constant-folded). */
#define XG_BYTE_MASK(p, i) \
    ((p) >= 8 * ((i) + 1) ? 0xff : (p) <= 8 * (i) ? 0 : \
     (0xff << (8 * ((i) + 1) - (p))) & 0xff)

static __always_inline int xg_is_v4mapped(const __u8 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 &&
           a[4] == 0 && a[5] == 0 && a[6] == 0 && a[7] == 0 &&
           a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff;
}

/* IPv4-mapped IPv6 (dual-stack sockets) -> IPv4, in place. */
static __always_inline void xg_conn_normalize(struct xg_conn *cn)
{
    if (cn->family != XG_AF_INET6 || !xg_is_v4mapped(cn->raddr))
        return;
    cn->family = XG_AF_INET;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        cn->raddr[i] = cn->raddr[12 + i];
        cn->laddr[i] = cn->laddr[12 + i];
    }
#pragma unroll
    for (int i = 4; i < 16; i++) {
        cn->raddr[i] = 0;
        cn->laddr[i] = 0;
    }
}

/*
 * Map keys of a connection: the source key is the remote address masked to
 * the configured prefix, the destination key the local address:port.
 * Returns -1 for a family that is neither IPv4 nor IPv6.
 *
 * The map updates themselves are in tcp_probes.c (xg_count()): bcc
 * rewrites map method calls only in the main source file.
 */
static __always_inline int xg_keys(struct xg_conn *cn, struct xg_probe_src_key *sk,
                                   struct xg_probe_dst_key *dk)
{
    xg_conn_normalize(cn);
    if (cn->family == XG_AF_INET) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            sk->addr[i] = cn->raddr[i] & XG_BYTE_MASK(XG_PROBE_PREFIX4, i);
            dk->addr[i] = cn->laddr[i];
        }
    } else if (cn->family == XG_AF_INET6) {
#pragma unroll
        for (int i = 0; i < 16; i++) {
            sk->addr[i] = cn->raddr[i] & XG_BYTE_MASK(XG_PROBE_PREFIX6, i);
            dk->addr[i] = cn->laddr[i];
        }
    } else {
        return -1;
    }
    sk->family = cn->family;
    dk->family = cn->family;
    dk->port = cn->lport;
    return 0;
}

/* ---- raw kernel fields (offsets from BTF, see btf.py) ------------------ */

#ifndef XG_OFF_SKB_HEAD
#define XG_OFF_SKB_HEAD offsetof(struct sk_buff, head)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKB_NETWORK_HEADER
#define XG_OFF_SKB_NETWORK_HEADER offsetof(struct sk_buff, network_header)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKB_TRANSPORT_HEADER
#define XG_OFF_SKB_TRANSPORT_HEADER offsetof(struct sk_buff, transport_header)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKC_DADDR
#define XG_OFF_SKC_DADDR offsetof(struct sock_common, skc_daddr)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKC_RCV_SADDR
#define XG_OFF_SKC_RCV_SADDR offsetof(struct sock_common, skc_rcv_saddr)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKC_DPORT
#define XG_OFF_SKC_DPORT offsetof(struct sock_common, skc_dport)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKC_NUM
#define XG_OFF_SKC_NUM offsetof(struct sock_common, skc_num)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKC_FAMILY
#define XG_OFF_SKC_FAMILY offsetof(struct sock_common, skc_family)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKC_STATE
#define XG_OFF_SKC_STATE offsetof(struct sock_common, skc_state)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKC_V6_DADDR
#define XG_OFF_SKC_V6_DADDR offsetof(struct sock_common, skc_v6_daddr)
#define XG_NEED_KERNEL_HEADERS 1
#endif
#ifndef XG_OFF_SKC_V6_RCV_SADDR
#define XG_OFF_SKC_V6_RCV_SADDR offsetof(struct sock_common, skc_v6_rcv_saddr)
#define XG_NEED_KERNEL_HEADERS 1
#endif

#ifdef XG_NEED_KERNEL_HEADERS
#include <linux/skbuff.h>
#include <net/sock.h>
#endif

/*
 * Connection of a TCP segment: from the IP and TCP headers of an skb
 * (head + network_header / transport_header, valid on the receive path
 * once IP has set them). The segment came from the peer: its source is the
 * remote side, its destination the local service.
 * Returns the TCP flags byte, or -1 if the skb is not TCP over IPv4/IPv6.
 */
static __always_inline int xg_conn_from_skb(const void *skb, struct xg_conn *cn)
{
    const unsigned char *head = NULL;
    __u16 nh = 0, th = 0;
    __u8 vbyte = 0, proto = 0, flags = 0;
    __u16 dport = 0;

    if (bpf_probe_read_kernel(&head, sizeof(head), (const char *)skb + XG_OFF_SKB_HEAD) ||
        bpf_probe_read_kernel(&nh, sizeof(nh), (const char *)skb + XG_OFF_SKB_NETWORK_HEADER) ||
        bpf_probe_read_kernel(&th, sizeof(th), (const char *)skb + XG_OFF_SKB_TRANSPORT_HEADER))
        return -1;
    if (!head || nh == 0xffff || th == 0xffff)
        return -1;
    if (bpf_probe_read_kernel(&vbyte, 1, head + nh))
        return -1;
    if ((vbyte >> 4) == 4) {
        if (bpf_probe_read_kernel(&proto, 1, head + nh + 9) || proto != 6)
            return -1;
        cn->family = XG_AF_INET;
        if (bpf_probe_read_kernel(cn->raddr, 4, head + nh + 12) ||
            bpf_probe_read_kernel(cn->laddr, 4, head + nh + 16))
            return -1;
    } else if ((vbyte >> 4) == 6) {
        /* Extension headers were walked by the stack: transport_header
         * points at TCP. The callers only run on TCP receive paths. */
        cn->family = XG_AF_INET6;
        if (bpf_probe_read_kernel(cn->raddr, 16, head + nh + 8) ||
            bpf_probe_read_kernel(cn->laddr, 16, head + nh + 24))
            return -1;
    } else {
        return -1;
    }
    if (bpf_probe_read_kernel(&dport, 2, head + th + 2) ||
        bpf_probe_read_kernel(&flags, 1, head + th + 13))
        return -1;
    cn->lport = bpf_ntohs(dport);
    return flags;
}

/* Connection of a socket or request socket (both start with sock_common):
 * skc_daddr/skc_v6_daddr is the peer, skc_rcv_saddr/skc_num the local end. */
static __always_inline int xg_conn_from_sk(const void *sk, struct xg_conn *cn)
{
    const char *p = (const char *)sk;
    __u16 family = 0, num = 0;

    if (!sk || bpf_probe_read_kernel(&family, 2, p + XG_OFF_SKC_FAMILY) ||
        bpf_probe_read_kernel(&num, 2, p + XG_OFF_SKC_NUM))
        return -1;
    cn->family = family;
    cn->lport = num;
    if (family == XG_AF_INET) {
        if (bpf_probe_read_kernel(cn->raddr, 4, p + XG_OFF_SKC_DADDR) ||
            bpf_probe_read_kernel(cn->laddr, 4, p + XG_OFF_SKC_RCV_SADDR))
            return -1;
    } else if (family == XG_AF_INET6) {
        if (bpf_probe_read_kernel(cn->raddr, 16, p + XG_OFF_SKC_V6_DADDR) ||
            bpf_probe_read_kernel(cn->laddr, 16, p + XG_OFF_SKC_V6_RCV_SADDR))
            return -1;
    } else {
        return -1;
    }
    return 0;
}

static __always_inline int xg_sk_state(const void *sk)
{
    __u8 state = 0;

    if (!sk || bpf_probe_read_kernel(&state, 1, (const char *)sk + XG_OFF_SKC_STATE))
        return -1;
    return state;
}

#endif /* XG_PROBES_H */
