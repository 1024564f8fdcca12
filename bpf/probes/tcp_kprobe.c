// SPDX-License-Identifier: GPL-2.0
/*
 * xdpguard kernel-probe statistics, kprobe set.
 *
 * Preferred when the kernel has kprobes: it sees every SYN a listener
 * processes with a probe on the SYN path itself instead of a filter on a
 * machine-wide tracepoint. Where kprobes are missing (CONFIG_KPROBES off)
 * the tracepoint set (tcp_tracepoint.c) counts the same events into the
 * same maps (probes.h). Each probe here sits on the function that fires the
 * corresponding tracepoint, so both sets count the same thing.
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
 */
#include <uapi/linux/ptrace.h>
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
    struct xg_conn cn = {};
    const void *sk = (const void *)PT_REGS_PARM1(ctx);

    if ((int)PT_REGS_PARM2(ctx) != XG_TCP_ESTABLISHED)
        return 0;
    if (xg_sk_state(sk) != XG_TCP_SYN_RECV)
        return 0;
    if (xg_conn_from_sk(sk, &cn))
        return 0;
    xg_count(&cn, XG_EV_HANDSHAKE);
    return 0;
}

/* tcp_rtx_synack(const struct sock *sk, struct request_sock *req) */
int xg_kp_tcp_rtx_synack(struct pt_regs *ctx)
{
    struct xg_conn cn = {};

    if (xg_conn_from_sk((const void *)PT_REGS_PARM2(ctx), &cn))
        return 0;
    xg_count(&cn, XG_EV_SYNACK_RETRANS);
    return 0;
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
    struct xg_conn cn = {};

    if (xg_conn_from_sk((const void *)PT_REGS_PARM1(ctx), &cn))
        return 0;
    xg_count(&cn, XG_EV_RST_SENT);
    return 0;
}

/* tcp_reset(struct sock *sk, struct sk_buff *skb) */
int xg_kp_tcp_reset(struct pt_regs *ctx)
{
    struct xg_conn cn = {};

    if (xg_conn_from_sk((const void *)PT_REGS_PARM1(ctx), &cn))
        return 0;
    xg_count(&cn, XG_EV_RST_RECV);
    return 0;
}
