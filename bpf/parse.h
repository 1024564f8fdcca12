/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Frame parser: Ethernet, up to XG_MAX_VLANS tags, IPv4 (any IHL), IPv6
 * with up to XG_MAX_EXTHDRS extension headers, TCP/UDP ports and flags,
 * ICMPv6 type. No map access here (bcc rewrites maps in the main file
 * only). xdpguard/packet.py is the Python mirror of this file: the rules
 * are spelled out in docs/design.md and both must change together.
 */
#ifndef XDPGUARD_PARSE_H
#define XDPGUARD_PARSE_H

/* xg_parse's result: XG_PARSE_OK, XG_PARSE_NONIP, or for a malformed
 * frame the counter slot of its cause (XG_SLOT_TRUNCATED,
 * XG_SLOT_BAD_HEADER, XG_SLOT_VLANS, XG_SLOT_EXTHDRS), which the caller
 * counts the drop in. */
#define XG_PARSE_OK 0
#define XG_PARSE_NONIP 1
_Static_assert(XG_SLOT_TRUNCATED > XG_PARSE_NONIP && XG_SLOT_BAD_HEADER > XG_PARSE_NONIP &&
	       XG_SLOT_VLANS > XG_PARSE_NONIP && XG_SLOT_EXTHDRS > XG_PARSE_NONIP,
	       "a malformed frame's cause is never read as OK or non-IP");

#define XG_ETH_P_IP 0x0800
#define XG_ETH_P_IPV6 0x86DD
#define XG_ETH_P_8021Q 0x8100
#define XG_ETH_P_8021AD 0x88A8

struct xg_vlanhdr {
	__be16 tci;
	__be16 proto;
};

struct xg_pkt {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;       /* host order */
	__u16 dport;
	__u8 family;       /* 4 or 6 */
	__u8 proto;        /* IP protocol */
	__u8 l4;           /* XG_L4_* */
	__u8 has_ports;
	__u8 syn;          /* SYN without ACK */
	__u16 vlan;        /* outer VLAN id (drop log only) */
};

static __always_inline int xg_is_vlan(__u16 proto)
{
	return proto == bpf_htons(XG_ETH_P_8021Q) || proto == bpf_htons(XG_ETH_P_8021AD);
}

static __always_inline int xg_is_exthdr(__u8 nh)
{
	return nh == 0 || nh == 43 || nh == 60 || nh == 44;
}

/* The ports: the first 4 bytes of a TCP or UDP header, which the caller
 * has checked are present. */
static __always_inline void xg_ports(struct xg_pkt *pkt, const __u8 *l4)
{
	pkt->sport = (l4[0] << 8) | l4[1];
	pkt->dport = (l4[2] << 8) | l4[3];
	pkt->has_ports = 1;
}

static __always_inline int xg_parse(struct xdp_md *ctx, struct xg_pkt *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);
	__u16 h_proto;
	__u8 proto, nonfirst = 0;
	__u32 l4off;
	int i;

	if ((void *)(eth + 1) > data_end)
		return XG_SLOT_TRUNCATED;
	h_proto = eth->h_proto;

	/* The frame of most floods first: untagged IPv4 without options, not
	 * a later fragment, UDP or TCP, headers present. Constant offsets,
	 * the same fields as the general path below gives such a frame; any
	 * other frame takes that path. */
	if (h_proto == bpf_htons(XG_ETH_P_IP)) {
		__u8 *ip = data + sizeof(*eth);

		if ((void *)(ip + 28) <= data_end && ip[0] == 0x45 && !(((ip[6] << 8) | ip[7]) & 0x1fff)) {
			__u8 *l4 = ip + 20;

			proto = ip[9];
			if (proto == IPPROTO_UDP ||
			    (proto == IPPROTO_TCP && (void *)(l4 + 20) <= data_end)) {
				pkt->family = 4;
				__builtin_memcpy(pkt->src, ip + 12, 4);
				__builtin_memcpy(pkt->dst, ip + 16, 4);
				pkt->proto = proto;
				xg_ports(pkt, l4);
				if (proto == IPPROTO_UDP) {
					pkt->l4 = XG_L4_UDP;
				} else {
					pkt->syn = (l4[13] & 0x12) == 0x02;   /* SYN without ACK */
					pkt->l4 = pkt->syn ? XG_L4_TCP_SYN : XG_L4_TCP;
				}
				return XG_PARSE_OK;
			}
		}
	}

#pragma unroll
	for (i = 0; i < XG_MAX_VLANS; i++) {
		struct xg_vlanhdr *vh;

		if (!xg_is_vlan(h_proto))
			break;
		vh = data + off;
		if ((void *)(vh + 1) > data_end)
			return XG_SLOT_TRUNCATED;
		h_proto = vh->proto;
		if (i == 0)
			pkt->vlan = bpf_ntohs(vh->tci) & 0x0fff;
		off += sizeof(*vh);
	}
	if (xg_is_vlan(h_proto))
		return XG_SLOT_VLANS;   /* a third tag: we would not see the L3 */

	if (h_proto == bpf_htons(XG_ETH_P_IP)) {
		struct iphdr *iph = data + off;
		__u32 ihl;

		if ((void *)(iph + 1) > data_end)
			return XG_SLOT_TRUNCATED;
		if (iph->version != 4 || iph->ihl < 5)
			return XG_SLOT_BAD_HEADER;
		ihl = iph->ihl * 4;
		if (data + off + ihl > data_end)
			return XG_SLOT_TRUNCATED;
		pkt->family = 4;
		__builtin_memcpy(pkt->src, &iph->saddr, 4);
		__builtin_memcpy(pkt->dst, &iph->daddr, 4);
		nonfirst = (bpf_ntohs(iph->frag_off) & 0x1fff) != 0;
		proto = iph->protocol;
		l4off = off + ihl;
	} else if (h_proto == bpf_htons(XG_ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;

		if ((void *)(ip6 + 1) > data_end)
			return XG_SLOT_TRUNCATED;
		if (ip6->version != 6)
			return XG_SLOT_BAD_HEADER;
		pkt->family = 6;
		__builtin_memcpy(pkt->src, &ip6->saddr, 16);
		__builtin_memcpy(pkt->dst, &ip6->daddr, 16);
		proto = ip6->nexthdr;
		off += sizeof(*ip6);

#pragma unroll
		for (i = 0; i < XG_MAX_EXTHDRS; i++) {
			__u8 *h = data + off;

			if (!xg_is_exthdr(proto))
				break;
			if ((void *)(h + 8) > data_end)
				return XG_SLOT_TRUNCATED;
			if (proto == 44) {
				proto = h[0];
				if (((h[2] << 8) | h[3]) & 0xfff8) {
					nonfirst = 1;
					break;
				}
				off += 8;
			} else {
				proto = h[0];
				off += ((__u32)h[1] + 1) * 8;
			}
		}
		if (!nonfirst && xg_is_exthdr(proto))
			return XG_SLOT_EXTHDRS;
		l4off = off;
	} else {
		return XG_PARSE_NONIP;
	}
	pkt->proto = proto;

	if (nonfirst) {
		/* No L4 header here: no ports, no flags (docs/design.md). */
		if (proto == IPPROTO_TCP)
			pkt->l4 = XG_L4_TCP;
		else if (proto == IPPROTO_UDP)
			pkt->l4 = XG_L4_UDP;
		else if (proto == IPPROTO_ICMP)
			pkt->l4 = XG_L4_ICMP;
		else if (proto == IPPROTO_ICMPV6)
			pkt->l4 = XG_L4_ICMPV6;
		else
			pkt->l4 = XG_L4_OTHER;
		return XG_PARSE_OK;
	}

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = data + l4off;

		if ((void *)(th + 1) > data_end)
			return XG_SLOT_TRUNCATED;
		xg_ports(pkt, (const __u8 *)th);
		pkt->syn = th->syn && !th->ack;
		pkt->l4 = pkt->syn ? XG_L4_TCP_SYN : XG_L4_TCP;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh = data + l4off;

		if ((void *)(uh + 1) > data_end)
			return XG_SLOT_TRUNCATED;
		xg_ports(pkt, (const __u8 *)uh);
		pkt->l4 = XG_L4_UDP;
	} else if (proto == IPPROTO_ICMPV6) {
		__u8 *type = data + l4off;

		if ((void *)(type + 1) > data_end)
			return XG_SLOT_TRUNCATED;
		pkt->l4 = (pkt->family == 6 && *type >= 133 && *type <= 137) ? XG_L4_ND : XG_L4_ICMPV6;
	} else if (proto == IPPROTO_ICMP) {
		pkt->l4 = XG_L4_ICMP;
	} else {
		pkt->l4 = XG_L4_OTHER;
	}
	return XG_PARSE_OK;
}

#endif /* XDPGUARD_PARSE_H */
