// SPDX-License-Identifier: GPL-2.0
/*
 * xdpguard kernel-probe statistics: the kprobe set (compiled with
 * -DXG_SET_KPROBE) and the tracepoint set (without it) count the same
 * events into the same maps (probes.h). The collector
 * (xdpguard/probes/collector.py) compiles the kprobe set where the kernel
 * has kprobes, the tracepoint set where it does not (CONFIG_KPROBES off).
 * Both sets are in this one file because bcc rewrites map calls
 * (xg_count()) only in the main source file.
 *
 * THE KPROBE SET sees every SYN a listener processes with a probe on the
 * SYN path itself instead of a filter on a machine-wide tracepoint. Each
 * probe sits on the function that fires the corresponding tracepoint, so
 * both sets count the same thing.
 *
 * Choice of functions (all exist on 4.x..6.18 under these names, and are
 * real functions: exported or called through a pointer, so never inlined
 * away):
 *
 *   syns            kprobe tcp_conn_request(rsk_ops, af_ops, sk, skb):
 *                   called by tcp_v4/v6_conn_request for every SYN a
 *                   listener processes (before the SYN queue / accept queue
 *                   / syncookie decisions). The peer is the skb's IP source.
 *   handshakes      kprobe tcp_set_state(sk, state) with state ESTABLISHED
 *                   while sk is in SYN_RECV: the child of a passive open
 *                   becoming established (what sock:inet_sock_set_state
 *                   reports, from the same function). Not a kretprobe on
 *                   inet_csk_accept(): that counts accept() calls of the
 *                   application, which lag or stop when the application is
 *                   slow or its accept queue overflows -- exactly during a
 *                   flood -- and kretprobes cost more than kprobes.
 *   synack_retrans  kprobe tcp_rtx_synack(sk, req): SYN-ACK retransmission
 *                   of a request socket (fires tcp:tcp_retransmit_synack;
 *                   there is no function named tcp_retransmit_synack). The
 *                   request socket starts with sock_common.
 *   rst_sent        kprobes tcp_v4_send_reset / tcp_v6_send_reset (sk, skb,
 *                   reason): the RST answers the segment in skb, whose
 *                   source is the peer (closed port, invalid segment); an
 *                   incoming RST is never answered and is skipped here. And
 *                   tcp_send_active_reset(sk, ...): abort of a socket.
 *   rst_recv        kprobe tcp_reset(sk, skb): an RST accepted on a socket.
 *
 * Raw kernel fields (sk_buff head/network_header/transport_header,
 * sock_common addresses/ports/state) are read at offsets taken from the
 * running kernel's BTF (-DXG_OFF_*), not from the installed headers.
 * Programs have explicit names (no kprobe__ prefix) and are attached by
 * xdpguard/probes/collector.py, so the set can be loaded -- compiled and
 * verified -- without attaching on a kernel without kprobes.
 *
 * THE TRACEPOINT SET takes tracepoint arguments from the running kernel's
 * format files (bcc generates `args` from them at compile time), not from
 * the installed headers, so their layout is always right.
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
#ifdef XG_SET_KPROBE
#include <uapi/linux/ptrace.h>
#endif
#include "probes.h"

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

#ifdef XG_SET_KPROBE

/* One event on the connection of a socket or request socket. */
static __always_inline int xg_count_sk(const void *sk, int ev)
{
    struct xg_conn cn = {};

    if (!xg_conn_from_sk(sk, &cn))
        xg_count(&cn, ev);
    return 0;
}

/* tcp_conn_request(struct request_sock_ops *, const struct
 * tcp_request_sock_ops *, struct sock *sk, struct sk_buff *skb) */
int xg_kp_tcp_conn_request(struct pt_regs *ctx)
{
    struct xg_conn cn = {};
    int flags = xg_conn_from_skb((const void *)PT_REGS_PARM4(ctx), &cn);

    if (flags < 0 || (flags & (XG_TH_SYN | XG_TH_ACK | XG_TH_RST)) != XG_TH_SYN)
        return 0;
    xg_count(&cn, XG_EV_SYN);
    return 0;
}

/* tcp_set_state(struct sock *sk, int state) */
int xg_kp_tcp_set_state(struct pt_regs *ctx)
{
    const void *sk = (const void *)PT_REGS_PARM1(ctx);

    if ((int)PT_REGS_PARM2(ctx) != XG_TCP_ESTABLISHED)
        return 0;
    if (xg_sk_state(sk) != XG_TCP_SYN_RECV)
        return 0;
    return xg_count_sk(sk, XG_EV_HANDSHAKE);
}

/* tcp_rtx_synack(const struct sock *sk, struct request_sock *req) */
int xg_kp_tcp_rtx_synack(struct pt_regs *ctx)
{
    return xg_count_sk((const void *)PT_REGS_PARM2(ctx), XG_EV_SYNACK_RETRANS);
}

/* tcp_v4_send_reset / tcp_v6_send_reset(const struct sock *sk,
 * struct sk_buff *skb, enum sk_rst_reason reason); the reason argument
 * does not exist before 6.10 and is not used. */
int xg_kp_tcp_send_reset_skb(struct pt_regs *ctx)
{
    struct xg_conn cn = {};
    int flags = xg_conn_from_skb((const void *)PT_REGS_PARM2(ctx), &cn);

    if (flags < 0 || (flags & XG_TH_RST))
        return 0;
    xg_count(&cn, XG_EV_RST_SENT);
    return 0;
}

/* tcp_send_active_reset(struct sock *sk, gfp_t priority, ...) */
int xg_kp_tcp_send_active_reset(struct pt_regs *ctx)
{
    return xg_count_sk((const void *)PT_REGS_PARM1(ctx), XG_EV_RST_SENT);
}

/* tcp_reset(struct sock *sk, struct sk_buff *skb) */
int xg_kp_tcp_reset(struct pt_regs *ctx)
{
    return xg_count_sk((const void *)PT_REGS_PARM1(ctx), XG_EV_RST_RECV);
}

#else /* the tracepoint set */

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

/* One event on the socket of a tracepoint that stores (family, sport,
 * saddr, daddr, saddr_v6, daddr_v6): s = local, d = peer. A macro: each
 * tracepoint's `args` is a struct of its own. */
#define XG_COUNT_TP(a, ev)                                                  \
    do {                                                                    \
        struct xg_conn cn = {};                                             \
        cn.family = (a)->family;                                            \
        cn.lport = (a)->sport;                                              \
        if ((a)->family == XG_AF_INET) {                                    \
            __builtin_memcpy(cn.laddr, (a)->saddr, 4);                      \
            __builtin_memcpy(cn.raddr, (a)->daddr, 4);                      \
        } else {                                                            \
            __builtin_memcpy(cn.laddr, (a)->saddr_v6, 16);                  \
            __builtin_memcpy(cn.raddr, (a)->daddr_v6, 16);                  \
        }                                                                   \
        xg_count(&cn, ev);                                                  \
    } while (0)

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != 6 /* IPPROTO_TCP */)
        return 0;
    if (args->oldstate != XG_TCP_SYN_RECV || args->newstate != XG_TCP_ESTABLISHED)
        return 0;
    XG_COUNT_TP(args, XG_EV_HANDSHAKE);
    return 0;
}

#ifndef XG_NO_TP_RETRANSMIT_SYNACK
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    XG_COUNT_TP(args, XG_EV_SYNACK_RETRANS);
    return 0;
}
#endif

#ifndef XG_NO_TP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    XG_COUNT_TP(args, XG_EV_RST_RECV);
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

#endif /* XG_SET_KPROBE */
