// SPDX-License-Identifier: GPL-2.0
/*
 * xdpguard kernel-probe statistics, tracepoint set.
 *
 * The fallback of the kprobe set (tcp_kprobe.c) where kprobes are not
 * available (CONFIG_KPROBES off); both count the same events into the same
 * maps (probes.h). Tracepoint arguments come from the running kernel's format
 * files (bcc generates `args` from them at compile time), not from the
 * installed headers, so their layout is always right.
 *
 * Events, and what each counter means with them:
 *
 *   handshakes      sock:inet_sock_set_state, TCP, SYN_RECV -> ESTABLISHED.
 *                   On a passive open the child socket is created by the
 *                   handshake's final ACK (LISTEN -> SYN_RECV, then at once
 *                   SYN_RECV -> ESTABLISHED in tcp_rcv_state_process()), or
 *                   by a valid SYN cookie; with TCP Fast Open the child
 *                   exists from the SYN and reaches ESTABLISHED on the ACK.
 *                   SYN_RECV -> ESTABLISHED is the one transition common to
 *                   all of them (also a simultaneous open, which is rare).
 *                   The socket's saddr/sport is the local end.
 *   synack_retrans  tcp:tcp_retransmit_synack, fired by tcp_rtx_synack()
 *                   when a SYN-ACK of a pending request is resent (the
 *                   peer did not complete the handshake: spoofed SYNs).
 *   rst_sent        tcp:tcp_send_reset: an RST sent by tcp_v4/v6_send_reset
 *                   (segment for no socket -- a closed port --, or invalid
 *                   for its socket) or tcp_send_active_reset (abort). src is
 *                   the local end, dest the peer, in both cases.
 *   rst_recv        tcp:tcp_receive_reset: an RST accepted on a full socket
 *                   (tcp_reset()). An RST for a request socket (answer to a
 *                   SYN-ACK sent to a spoofed address) is not reported by any
 *                   tracepoint.
 *   syns            No tcp: or sock: tracepoint fires for a SYN reaching a
 *                   listener on 6.18: the request socket is created without
 *                   a state-change event, inet_sock_set_state only sees the
 *                   child once the handshake completes, tcp_probe only runs
 *                   on established sockets. The SYN is, however, freed with
 *                   consume_skb() by tcp_rcv_state_process() (TCP_LISTEN,
 *                   after conn_request() accepted or dropped it), and the
 *                   skb:consume_skb tracepoint carries the skb and the
 *                   caller's address. A raw tracepoint on consume_skb whose
 *                   `location` lies inside tcp_rcv_state_process() (range
 *                   from /proc/kallsyms, passed as XG_SYN_LOC_START/END)
 *                   therefore sees exactly the SYNs a listener processed,
 *                   the same set the kprobe on tcp_conn_request() sees. The
 *                   source is read from the skb's IP header (sk_buff
 *                   offsets from BTF). Raw, not classic, tracepoint: it is
 *                   on every consumed skb of the machine, and the raw form
 *                   costs one compare when the location does not match.
 *                   Without the range (no kallsyms) syns stay 0; the XDP
 *                   program's per-source SYN counts (srcstat, when
 *                   mitigation is on) are then the only SYN source.
 *
 * Optional events the running kernel lacks (or whose format differs from
 * the one read here: tcp_send_reset with sockaddr fields, 6.x) are left out
 * with -DXG_NO_TP_RETRANSMIT_SYNACK / _RECEIVE_RESET / _SEND_RESET; the
 * collector then reports that counter as unsupported.
 *
 * Not measurable with tracepoints: SYNs dropped before TCP (XDP, netfilter,
 * no route), RSTs to request sockets, handshakes aborted between child
 * creation and ESTABLISHED.
 */
#include "probes.h"

#ifndef XG_SYN_LOC_START
#define XG_SYN_LOC_START 0ULL
#endif
#ifndef XG_SYN_LOC_END
#define XG_SYN_LOC_END 0ULL
#endif

/* tcp:tcp_send_reset has a field of type `enum sk_rst_reason` (6.10+);
 * bcc declares the args struct with that type, which must be complete.
 * The installed headers (6.1) do not have it, and nothing included here
 * pulls in net/rstreason.h of newer ones. Its size (4) is the format's. */
enum sk_rst_reason { XG_SK_RST_REASON_ANY = 0 };

static __always_inline void xg_count(struct xg_conn *cn, int ev)
{
    struct xg_probe_src_key sk = {};
    struct xg_probe_dst_key dk = {};
    struct xg_probe_counts zero = {};
    struct xg_probe_counts *c;

    if (xg_keys(cn, &sk, &dk))
        return;
    c = xg_psrc.lookup_or_try_init(&sk, &zero);
    if (c)
        xg_bump(c, ev);
    c = xg_pdst.lookup_or_try_init(&dk, &zero);
    if (c)
        xg_bump(c, ev);
}

/* Tracepoints that store (family, sport, saddr, daddr, saddr_v6, daddr_v6)
 * of a socket: s = local, d = peer. */
#define XG_CONN_FROM_TP(cn, a)                                              \
    do {                                                                    \
        (cn).family = (a)->family;                                          \
        (cn).lport = (a)->sport;                                            \
        if ((a)->family == XG_AF_INET) {                                    \
            __builtin_memcpy((cn).laddr, (a)->saddr, 4);                    \
            __builtin_memcpy((cn).raddr, (a)->daddr, 4);                    \
        } else {                                                            \
            __builtin_memcpy((cn).laddr, (a)->saddr_v6, 16);                \
            __builtin_memcpy((cn).raddr, (a)->daddr_v6, 16);                \
        }                                                                   \
    } while (0)

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    struct xg_conn cn = {};

    if (args->protocol != 6 /* IPPROTO_TCP */)
        return 0;
    if (args->oldstate != XG_TCP_SYN_RECV || args->newstate != XG_TCP_ESTABLISHED)
        return 0;
    XG_CONN_FROM_TP(cn, args);
    xg_count(&cn, XG_EV_HANDSHAKE);
    return 0;
}

#ifndef XG_NO_TP_RETRANSMIT_SYNACK
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    struct xg_conn cn = {};

    XG_CONN_FROM_TP(cn, args);
    xg_count(&cn, XG_EV_SYNACK_RETRANS);
    return 0;
}
#endif

#ifndef XG_NO_TP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    struct xg_conn cn = {};

    XG_CONN_FROM_TP(cn, args);
    xg_count(&cn, XG_EV_RST_RECV);
    return 0;
}
#endif

#ifndef XG_NO_TP_SEND_RESET
/* saddr/daddr are a sockaddr_in or sockaddr_in6 (28 bytes): family at 0,
 * port (network order) at 2, IPv4 address at 4, IPv6 address at 8. */
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    struct xg_conn cn = {};
    __u16 family = 0, port = 0;

    __builtin_memcpy(&family, &args->saddr[0], 2);
    __builtin_memcpy(&port, &args->saddr[2], 2);
    cn.family = family;
    cn.lport = bpf_ntohs(port);
    if (family == XG_AF_INET) {
        __builtin_memcpy(cn.laddr, &args->saddr[4], 4);
        __builtin_memcpy(cn.raddr, &args->daddr[4], 4);
    } else if (family == XG_AF_INET6) {
        __builtin_memcpy(cn.laddr, &args->saddr[8], 16);
        __builtin_memcpy(cn.raddr, &args->daddr[8], 16);
    } else {
        return 0;
    }
    xg_count(&cn, XG_EV_RST_SENT);
    return 0;
}
#endif

/* Raw tracepoint skb:consume_skb(struct sk_buff *skb, void *location). */
int xg_rtp_consume_skb(struct bpf_raw_tracepoint_args *ctx)
{
    struct xg_conn cn = {};
    __u64 loc = ctx->args[1];
    int flags;

    if (loc < XG_SYN_LOC_START || loc >= XG_SYN_LOC_END)
        return 0;
    flags = xg_conn_from_skb((const void *)ctx->args[0], &cn);
    if (flags < 0 || (flags & (XG_TH_SYN | XG_TH_ACK | XG_TH_RST)) != XG_TH_SYN)
        return 0;
    xg_count(&cn, XG_EV_SYN);
    return 0;
}
