/* SPDX-License-Identifier: GPL-2.0 */
/*
 * SYN cookies at XDP, compiled in only with -DXG_SYNCOOKIES=1 (the loader
 * sets it when a policy asks for them and the kernel has the helpers,
 * Linux >= 6.0; xdpguard/syncookies.py probes for them).
 *
 * A SYN is answered from XDP with a SYN-ACK whose sequence number is the
 * kernel's own cookie (bpf_tcp_raw_gen_syncookie_*, the kernel's secret),
 * with the client's window scale, SACK and ECN encoded in the low bits of
 * the timestamp as the kernel's cookies encode them. The client's ACK goes
 * on to netfilter's SYNPROXY (the nftables table xdpguard owns), which
 * checks the cookie, decodes those options and opens the connection to
 * the local listener. Nothing is remembered for a SYN. The model is the
 * kernel selftest xdp_synproxy.
 *
 * Only untagged IPv4 without options (not a fragment) and IPv6 without
 * extension headers take this path; any other frame takes the normal path
 * (nftables' SYNPROXY answers its SYN).
 *
 * No map access here (bcc rewrites maps in the main file only): the
 * caller passes its per-CPU scratch record.
 */
#ifndef XDPGUARD_SYNCOOKIE_H
#define XDPGUARD_SYNCOOKIE_H

#define XG_TCP_MAXLEN 60
#define XG_TCPOPT_MAXLEN 40
#define XG_SYNACK_MAXLEN 40   /* our SYN-ACK's TCP header, options included */
/* The timestamp cookie (the kernel's cookie_init_timestamp): low 6 bits
 * the options, the rest a millisecond clock. */
#define XG_TS_WSCALE_NONE 0xf
#define XG_TS_SACK (1 << 4)
#define XG_TS_ECN (1 << 5)
#define XG_TS_BITS 6
#define XG_TCP_MAX_WSCALE 14

/* Per-CPU scratch: the SYN's options, and the parser's state. Kept in map
 * memory, not on the stack, so that the verifier reads every field back as
 * an unknown value and the option loop's paths merge (xg_general says why). */
struct xg_cookiebuf {
	/* The SYN's TCP header, options included (XG_TCP_MAXLEN used): the
	 * cookie helper and the option parser read it here, so the frame
	 * need only hold the SYN-ACK, not the longest TCP header. */
	__u8 tcp[64];
	__u32 optlen;
	__u32 off;
	__u32 wscale;       /* XG_TS_WSCALE_NONE: no window scale option */
	__u32 sack;
	__u32 ts;           /* the SYN carried a timestamp */
	__u8 tsval[4];      /* its value: our echo (tsecr) */
	/* What xg_general decided, for the tail-called xg_cookie_prog. */
	__u32 rule;
	__u32 gen;
	__u32 slot;
	__u32 pad;
	__u64 len;
};

static __always_inline __u16 xg_csum_fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Move the first n bytes of the frame XG_SYNACK_MAXLEN bytes to the
 * front (after bpf_xdp_adjust_head made that room): ascending, so the
 * overlap is copied before it is overwritten. */
static __always_inline void xg_pull(__u8 *data, const int n)
{
	int i;

#pragma unroll
	for (i = 0; i < n; i += 2)
		*(__u16 *)(data + i) = *(__u16 *)(data + XG_SYNACK_MAXLEN + i);
}

/* Read the SYN's options: window scale, SACK permitted, timestamp. */
static __always_inline void xg_synopts(struct xg_cookiebuf *cb)
{
	int i;

	cb->off = 0;
	cb->wscale = XG_TS_WSCALE_NONE;
	cb->sack = 0;
	cb->ts = 0;
	for (i = 0; i < XG_TCPOPT_MAXLEN; i++) {
		/* Read back from map memory (volatile: not the value clang
		 * kept in a register), so the verifier knows no offset and
		 * the paths of an iteration merge: with the offsets known,
		 * it walked every sequence of option lengths. */
		__u32 off = *(volatile __u32 *)&cb->off, optlen = *(volatile __u32 *)&cb->optlen, kind, len;

		if (off >= optlen)
			break;
		kind = cb->tcp[(20 + off) & 63];
		if (kind == 0)                  /* end of options */
			break;
		if (kind == 1) {                /* NOP */
			cb->off = off + 1;
			continue;
		}
		if (off + 1 >= optlen)
			break;
		len = cb->tcp[(21 + off) & 63];
		if (len < 2 || off + len > optlen)
			break;
		if (kind == 3 && len == 3) {
			__u32 ws = cb->tcp[(22 + off) & 63];

			cb->wscale = ws < XG_TCP_MAX_WSCALE ? ws : XG_TCP_MAX_WSCALE;
		} else if (kind == 4 && len == 2) {
			cb->sack = 1;
		} else if (kind == 8 && len == 10) {
			cb->ts = 1;
			cb->tsval[0] = cb->tcp[(22 + off) & 63];
			cb->tsval[1] = cb->tcp[(23 + off) & 63];
			cb->tsval[2] = cb->tcp[(24 + off) & 63];
			cb->tsval[3] = cb->tcp[(25 + off) & 63];
		}
		cb->off = off + len;
	}
}

/*
 * Turn the SYN at th (TCP header, XG_SYNACK_MAXLEN bytes writable)
 * into our SYN-ACK's TCP header: ports swapped, the cookie as sequence
 * number, MSS and, when the SYN had a timestamp, SACK permitted,
 * timestamp (the option cookie, the client's value echoed) and window
 * scale. Returns the new header's length. Window 0, as SYNPROXY's own
 * SYN-ACK: the client learns the window from the listener's first segment.
 */
static __always_inline __u32 xg_synack_tcp(__u8 *th, __u32 cookie, struct xg_cookiebuf *cb,
					   __u16 mss, __u32 tsval, __u32 ecn)
{
	__u32 seq = ((__u32)th[4] << 24) | ((__u32)th[5] << 16) | ((__u32)th[6] << 8) | th[7];
	__u8 p0 = th[0], p1 = th[1];
	__u32 len = 24;

	th[0] = th[2];
	th[1] = th[3];
	th[2] = p0;
	th[3] = p1;
	seq += 1;
	th[8] = seq >> 24;
	th[9] = seq >> 16;
	th[10] = seq >> 8;
	th[11] = seq;
	th[4] = cookie >> 24;
	th[5] = cookie >> 16;
	th[6] = cookie >> 8;
	th[7] = cookie;
	th[13] = 0x12 | (ecn ? 0x40 : 0);   /* SYN, ACK (, ECE) */
	th[14] = 0;                          /* window */
	th[15] = 0;
	th[16] = 0;                          /* checksum: later */
	th[17] = 0;
	th[18] = 0;                          /* urgent pointer */
	th[19] = 0;
	th[20] = 2;                          /* MSS */
	th[21] = 4;
	th[22] = mss >> 8;
	th[23] = mss;
	if (cb->ts) {
		th[24] = cb->sack ? 4 : 1;   /* SACK permitted, or NOP NOP */
		th[25] = cb->sack ? 2 : 1;
		th[26] = 8;                  /* timestamp */
		th[27] = 10;
		th[28] = tsval >> 24;
		th[29] = tsval >> 16;
		th[30] = tsval >> 8;
		th[31] = tsval;
		th[32] = cb->tsval[0];
		th[33] = cb->tsval[1];
		th[34] = cb->tsval[2];
		th[35] = cb->tsval[3];
		len = 36;
		if (cb->wscale != XG_TS_WSCALE_NONE) {
			th[36] = 1;          /* NOP, window scale */
			th[37] = 3;
			th[38] = 3;
			th[39] = XG_COOKIE_WSCALE;
			len = 40;
		}
	}
	th[12] = (len / 4) << 4;
	return len;
}

#endif /* XDPGUARD_SYNCOOKIE_H */
