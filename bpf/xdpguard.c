/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpguard XDP program: ban map, bit-vector classifier, GCRA limiter,
 * per-rule counters. Policy lives in maps; the only -D flags are integers
 * chosen by the loader (xdpguard/loader.py):
 *   XG_NWORDS        64-bit words of a rule vector, a power of two
 *                    (rules per generation = 64 x this)
 *   XG_VEC_PER_GEN   vector table rows per generation
 *   XG_DIR4_NODES, XG_DIR6_NODES   nodes per generation of the IPv4 and
 *                    IPv6 source tables
 *   XG_STAGE         pid of the loader: maps are pinned (or reused) under
 *                    /sys/fs/bpf/xdpguard/@stage/<XG_STAGE>/
 *   XG_TEST          build for BPF_PROG_TEST_RUN: record the deciding rule
 *   XG_SYNCOOKIES    1: SYN cookies for rules that ask (bpf/syncookie.h;
 *                    the helpers need Linux >= 6.0)
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "xdpguard.h"
#include "parse.h"
#include "gcra.h"
#ifdef XG_SYNCOOKIES
#include "syncookie.h"
#endif

#define XG_RULES_PER_GEN (64 * XG_NWORDS)

/* A source-table entry carries a rule and its slot (XG_DIR_FAST), or a
 * vector index, which must stay below the markers. */
_Static_assert(XG_MAX_SLOTS <= XG_DIR_SLOT_MASK + 1, "counter slots fit a srctab entry");
_Static_assert(XG_RULES_PER_GEN <= XG_DIR_RULE_MASK + 1, "rules fit a srctab entry");
_Static_assert(XG_VEC_PER_GEN <= XG_DIR_TRIE, "vector indexes stay below XG_DIR_TRIE");

#define XG_STR2(x) #x
#define XG_STR(x) XG_STR2(x)
#ifdef XG_STAGE
#define XG_MAP(type, key, leaf, name, size, flags) \
	BPF_TABLE_PINNED(type, key, leaf, name, size, \
		"/sys/fs/bpf/xdpguard/@stage/" XG_STR(XG_STAGE) "/" #name, flags)
#else
#define XG_MAP(type, key, leaf, name, size, flags) \
	BPF_F_TABLE(type, key, leaf, name, size, flags)
#endif

/* Policy: two generations, switched by `active` (docs/design.md). */
XG_MAP("array", __u32, __u64, active, 1, 0);
XG_MAP("array", __u32, struct xg_gen, gens, 2, 0);
/* Classifier tries: an array of two (one per generation) per family. A
 * re-apply puts a new trie, sized for its policy, in the inactive slot
 * (xdpguard/loader.py) instead of deleting the old generation's entries
 * one by one. The *_inner maps are the tries' template (and, for user
 * space, their key and value types): never looked up themselves. */
XG_MAP("lpm_trie", struct xg_lpm4_key, struct xg_class, lpm4_inner, 1, BPF_F_NO_PREALLOC);
XG_MAP("lpm_trie", struct xg_lpm6_key, struct xg_class, lpm6_inner, 1, BPF_F_NO_PREALLOC);
BPF_ARRAY_OF_MAPS(lpm4, "lpm4_inner", 2);
BPF_ARRAY_OF_MAPS(lpm6, "lpm6_inner", 2);
XG_MAP("array", __u32, struct xg_vec, vecs, 2 * XG_VEC_PER_GEN, 0);
XG_MAP("array", __u32, struct xg_class, ports, 2 * 2 * XG_NPORTS, 0);
XG_MAP("array", __u32, struct xg_rule, rules, 2 * XG_RULES_PER_GEN, 0);
/* Written through mmap: tens of MiB would take seconds as map updates. */
XG_MAP("array", __u32, struct xg_dirnode, srctab, 2 * (XG_DIR4_NODES + XG_DIR6_NODES), BPF_F_MMAPABLE);

/* State that outlives a policy: fixed sizes, reused across reloads. */
XG_MAP("percpu_array", __u32, struct xg_counter, counters, XG_MAX_SLOTS, 0);
XG_MAP("array", __u32, struct xg_bucket, rbuckets, XG_MAX_SLOTS, 0);
XG_MAP("array", __u32, struct xg_bucket, nbuckets, XG_MAX_SLOTS, 0);
XG_MAP("lru_hash", struct xg_sbucket_key, struct xg_bucket, sbuckets, XG_SBUCKET_MAX, 0);
XG_MAP("array", __u32, __u64, seen, XG_SEEN_WORDS, 0);
XG_MAP("lpm_trie", struct xg_ban4_key, struct xg_ban, ban4, XG_BAN_MAX, BPF_F_NO_PREALLOC);
XG_MAP("lpm_trie", struct xg_ban6_key, struct xg_ban, ban6, XG_BAN_MAX, BPF_F_NO_PREALLOC);
XG_MAP("array", __u32, struct xg_banstate, banstate, 1, 0);
XG_MAP("lru_percpu_hash", struct xg_srcstat_key, struct xg_srcstat, srcstat, XG_SRCSTAT_MAX, 0);
XG_MAP("array", __u32, struct xg_bucket, logbuckets, XG_MAX_SLOTS, 0);
/* [mitigation] syncookies = "auto" (xg_cookies_on): the ports `watch`
 * has turned cookies on for, one bit each; the SYNs per port it reads;
 * why it turned them on (for `status` only). */
XG_MAP("array", __u32, __u64, cookieports, XG_COOKIEPORT_WORDS, 0);
XG_MAP("lru_percpu_hash", __u32, __u64, synports, XG_SYNPORTS_MAX, 0);
XG_MAP("hash", __u32, struct xg_cookiewhy, cookiewhy, XG_COOKIEWHY_MAX, 0);
BPF_RINGBUF_OUTPUT(droplog, XG_DROPLOG_BYTES / 4096);
/* Never used by the program: it carries struct xg_logev to user space as a
 * bcc leaf type, so `xdpguard log` reads events without a second layout. */
BPF_ARRAY(logfmt, struct xg_logev, 1);
/* The packet record of the general path (xg_general explains why). */
BPF_PERCPU_ARRAY(pktbuf, struct xg_pkt, 1);
/* The fast lane's last source per family (struct xg_lastsrc). Not
 * pinned: a new program starts with it empty. */
BPF_PERCPU_ARRAY(lastsrc, struct xg_lastsrc, 1);

#ifdef XG_SYNCOOKIES
BPF_PERCPU_ARRAY(cookiebuf, struct xg_cookiebuf, 1);
/* xg_cookie_prog, the SYN cookie path, as a tail call: verified once on
 * its own, where inlined it would be explored once per path that reaches
 * a rule (4x the verifier's work without option parsing, past its limit
 * with it). Filled by the loader, pinned with the program's maps. */
BPF_PROG_ARRAY(cookieprog, 1);
#endif

#ifdef XG_TEST
BPF_ARRAY(debug, struct xg_debug, 1);
#endif

/* Sample a drop into the ring buffer, at most log rate per slot. */
static __always_inline void xg_log(struct xg_pkt *pkt, __u32 gen, struct xg_counter *c,
				   __u32 slot, __u32 rule, __u64 len)
{
	struct xg_bucket *b = logbuckets.lookup(&slot);
	struct xg_gen *g = gens.lookup(&gen);
	struct xg_logev ev = {};

	if (!g || !b || !xg_gcra(b, bpf_ktime_get_ns(), 1, g->log_cost_fp, g->log_burst_ns)) {
		if (c)
			c->log_suppressed++;
		return;
	}
	ev.ts_ns = bpf_ktime_get_boot_ns();
	ev.slot = slot;
	ev.rule = rule;
	ev.len = len;
	ev.sport = pkt->sport;
	ev.dport = pkt->dport;
	ev.vlan = pkt->vlan;
	ev.family = pkt->family;
	ev.proto = pkt->proto;
	__builtin_memcpy(ev.src, pkt->src, 16);
	__builtin_memcpy(ev.dst, pkt->dst, 16);
	droplog.ringbuf_output(&ev, sizeof(ev), 0);
}

/* pkt is NULL in the fast lane, which never logs. */
static __always_inline int xg_finish(struct xg_pkt *pkt, __u32 slot, __u32 rule,
				     __u32 gen, __u64 len, int drop, int log)
{
	struct xg_counter *c = counters.lookup(&slot);

	if (c) {
		c->packets++;
		c->bytes += len;
		if (drop) {
			c->dropped_packets++;
			c->dropped_bytes += len;
		}
	}
	if (drop && log)
		xg_log(pkt, gen, c, slot, rule, len);
#ifdef XG_TEST
	{
		__u32 zero = 0;
		struct xg_debug d = { .slot = slot, .rule = rule, .gen = gen,
				      .verdict = drop ? XG_V_DROP : XG_V_PASS, .fast = !pkt };
		debug.update(&zero, &d);
	}
#endif
	return drop ? XDP_DROP : XDP_PASS;
}

/* The verdict an XG_DIR_FAST source-table entry carries (never logged). */
static __always_inline int xg_finish_fast(struct xg_pkt *pkt, __u32 e, __u32 gen, __u64 len)
{
	return xg_finish(pkt, e & XG_DIR_SLOT_MASK, (e >> XG_DIR_RULE_SHIFT) & XG_DIR_RULE_MASK,
			 gen, len, !!(e & XG_DIR_DROP), 0);
}

/* Count a packet against its ban, if the ban holds. */
static __always_inline int xg_ban_hit(struct xg_ban *b, __u64 len)
{
	if (!b)
		return 0;
	if (b->expires_ns && b->expires_ns <= bpf_ktime_get_boot_ns())
		return 0;   /* expired: the daemon removes it soon */
	__sync_fetch_and_add(&b->packets, 1);
	__sync_fetch_and_add(&b->bytes, len);
	return 1;
}

static __always_inline int xg_banned4(__u8 *src, __u64 len)
{
	struct xg_ban4_key k = { .prefixlen = 32 };

	__builtin_memcpy(k.addr, src, 4);
	return xg_ban_hit(ban4.lookup(&k), len);
}

static __always_inline int xg_banned6(__u8 *src, __u64 len)
{
	struct xg_ban6_key k = { .prefixlen = 128 };

	__builtin_memcpy(k.addr, src, 16);
	return xg_ban_hit(ban6.lookup(&k), len);
}

static __always_inline int xg_banned(struct xg_pkt *pkt, __u64 len)
{
	__u32 zero = 0;
	struct xg_banstate *st = banstate.lookup(&zero);

	/* An array lookup (inlined by the verifier) instead of a trie walk
	 * while the family has no bans at all. */
	if (st && !(pkt->family == 4 ? st->v4 : st->v6))
		return 0;
	if (pkt->family == 4)
		return xg_banned4(pkt->src, len);
	return xg_banned6(pkt->src, len);
}

static __always_inline void xg_srcstat(struct xg_pkt *pkt, struct xg_gen *g, __u64 len)
{
	struct xg_srcstat_key k __attribute__((aligned(4))) = { .family = pkt->family };   /* xg_mask */
	struct xg_srcstat *s;

	__builtin_memcpy(k.addr, pkt->src, 16);
	if (pkt->family == 4)
		xg_mask(k.addr, g->mit_prefix4);
	else
		xg_mask(k.addr, g->mit_prefix6);
	s = srcstat.lookup(&k);
	if (s) {
		s->packets++;
		s->bytes += len;
		s->syns += pkt->syn;
	} else {
		struct xg_srcstat init = { .packets = 1, .bytes = len, .syns = pkt->syn };

		srcstat.update(&k, &init);
	}
}

/* The source-table entry of an address (XG_DIR_* in xdpguard.h), or
 * XG_DIR_TRIE. base is the region's first node; node n of a region holds
 * entries for one address byte: the root's 256 nodes take bytes 0 and 1,
 * a node below it the next byte, down to byte nbytes - 1. */
static __always_inline __u32 xg_srctab(__u32 base, __u8 *addr, const int nbytes)
{
	__u32 node = addr[0], e;
	struct xg_dirnode *n;
	int i;

#pragma unroll
	for (i = 1; i < nbytes; i++) {
		__u32 idx = base + node;

		n = srctab.lookup(&idx);
		if (!n)
			return XG_DIR_TRIE;
		e = n->e[addr[i]];
		if (!(e & XG_DIR_NODE))
			return e;
		node = e & (XG_DIR_NODE - 1);
	}
	return XG_DIR_TRIE;   /* a node past the table's last byte: cannot be; the trie decides */
}

#define xg_srctab4(gen, addr) xg_srctab((gen) * XG_DIR4_NODES, (addr), XG_DIR_V4_BYTES)
#define xg_srctab6(gen, addr) \
	xg_srctab(2 * XG_DIR4_NODES + (gen) * XG_DIR6_NODES, (addr), XG_DIR_V6_BYTES)

static __always_inline __u32 xg_remember(struct xg_last *l, __u64 w, __u32 e)
{
	l->word = w;
	l->e = e;
	return e;
}

/* The source-table entry of a frame's source, for the fast lane: from the
 * CPU's last-source memory when the source is the one looked up last
 * under the same active word (struct xg_lastsrc), else from the table,
 * and remembered. A hit leaves nothing after the frame's read but
 * compares, whose outcome the CPU predicts: the entry, and the counter
 * it names, are at hand before the frame arrives. */
static __always_inline __u32 xg_lane4(struct xg_last *l, __u64 w, __u32 gen, __u8 *src)
{
	__u32 a = *(__u32 *)src;

	if (l->word == w && *(__u32 *)l->addr == a)
		return l->e;
	*(__u32 *)l->addr = a;
	return xg_remember(l, w, xg_srctab4(gen, src));
}

static __always_inline __u32 xg_lane6(struct xg_last *l, __u64 w, __u32 gen, __u8 *src)
{
	__u64 a = *(__u64 *)src, b = *(__u64 *)(src + 8);

	if (l->word == w && *(__u64 *)l->addr == a && *(__u64 *)(l->addr + 8) == b)
		return l->e;
	*(__u64 *)l->addr = a;
	*(__u64 *)(l->addr + 8) = b;
	return xg_remember(l, w, xg_srctab6(gen, src));
}

/* Class vector index of an address in a dimension, from the trie. */
static __always_inline __u32 xg_trie_vec(struct xg_pkt *pkt, __u32 gen, __u8 dim, __u8 *addr)
{
	struct xg_class *cl = NULL;
	void *trie;

	if (pkt->family == 4) {
		struct xg_lpm4_key k = { .prefixlen = 8 + 32, .dim = dim };

		__builtin_memcpy(k.addr, addr, 4);
		trie = lpm4.lookup(&gen);
		if (trie)
			cl = bpf_map_lookup_elem(trie, &k);
	} else {
		struct xg_lpm6_key k = { .prefixlen = 8 + 128, .dim = dim };

		__builtin_memcpy(k.addr, addr, 16);
		trie = lpm6.lookup(&gen);
		if (trie)
			cl = bpf_map_lookup_elem(trie, &k);
	}
	return cl ? cl->vec : XG_VEC_PER_GEN;   /* out of range: empty vector */
}

/* The source-table entry of a source (a vector index or a verdict code,
 * XG_DIR_FAST), or the class vector index of a destination or of a
 * source the table leaves to the trie. */
static __always_inline __u32 xg_addr_vec(struct xg_pkt *pkt, __u32 gen, __u8 dim, __u8 *addr)
{
	if (dim == XG_DIM_SRC) {
		__u32 vec = pkt->family == 4 ? xg_srctab4(gen, addr) : xg_srctab6(gen, addr);

		if (vec != XG_DIR_TRIE)
			return vec;
	}
	return xg_trie_vec(pkt, gen, dim, addr);
}

static __always_inline __u32 xg_port_vec(__u32 gen, __u32 dim, __u16 port)
{
	__u32 idx = (gen * 2 + dim) * XG_NPORTS + port;
	struct xg_class *cl = ports.lookup(&idx);

	return cl ? cl->vec : XG_VEC_PER_GEN;
}

static __always_inline struct xg_vec *xg_vec(__u32 gen, __u32 vec)
{
	__u32 idx;

	if (vec >= XG_VEC_PER_GEN)
		return 0;
	idx = gen * XG_VEC_PER_GEN + vec;
	return vecs.lookup(&idx);
}

/* Where a per-source bucket's key lives in map seen (XG_SEEN_* in
 * xdpguard.h): multiply-shift of the slot, family and masked source, so
 * that the top bits of the product (the pair) and the next ones (the bit
 * of its words) depend on every address bit. The key is 4-byte aligned on
 * the stack: word loads only. */
static __always_inline __u32 xg_seen_pair(struct xg_sbucket_key *k, __u64 *mask)
{
	__u32 *a = (__u32 *)k->addr;
	__u64 x = ((__u64)(k->slot * 8 + k->family) << 32) | a[0];
	__u64 h;

	if (k->family != 4)
		x ^= ((((__u64)a[1] << 32) | a[2]) ^ ((__u64)a[3] << 17)) * 0xc2b2ae3d27d4eb4fULL;
	h = x * 0x9e3779b97f4a7c15ULL;
	*mask = 1ULL << ((((h >> 16) & 0xffffffffULL) * XG_SEEN_BITS) >> 32);
	return h >> (64 - XG_SEEN_PAIRS_LOG2);
}

/* The tag a word of map seen carries in epoch `epoch`. */
static __always_inline __u64 xg_seen_tag(__u64 epoch)
{
	return (epoch & ((1ULL << XG_SEEN_TAG_BITS) - 1)) << XG_SEEN_BITS;
}

/* Whether a word of map seen (its value `w`) is of the epoch tagged `tag`:
 * its bits count only then. */
static __always_inline int xg_seen_of(__u64 w, __u64 tag)
{
	return (w & ~((1ULL << XG_SEEN_BITS) - 1)) == tag;
}

/* Sets bit `m` in the current epoch's word `w` (tag `tag`). A word still
 * of an older epoch is started afresh by one CAS; if another CPU got there
 * first, its word is now current and takes the bit by an OR, which cannot
 * fail: so a bucket never lacks its bit. */
static __always_inline void xg_seen_set(__u64 *w, __u64 tag, __u64 m)
{
	__u64 old = *w;

	if (!xg_seen_of(old, tag) &&
	    __sync_val_compare_and_swap(w, old, tag | m) == old)
		return;
	__sync_fetch_and_or(w, m);
}

/* A limit rule's verdict: its bucket (per rule, or per source group
 * with the new-source budget before any insert), then rate_total.
 * Returns -1 for a packet admitted (not yet counted: a SYN cookie may
 * still answer it), else the counted drop. */
static __always_inline int xg_limit(struct xg_pkt *pkt, __u8 family, __u8 *src, struct xg_rule *r,
				    __u32 rule, __u32 gen, __u64 len)
{
	/* pkt is NULL in the fast lane, which takes no rule that logs. */
	__u8 log = pkt ? r->log : 0;
	__u64 units = r->unit == XG_UNIT_BYTES ? len : 1;
	__u64 now = xg_now(r->coarse);
	struct xg_bucket *b;
	__u32 slot = r->slot;

	if (r->per == XG_PER_RULE) {
		b = rbuckets.lookup(&slot);
	} else {
		struct xg_sbucket_key k = { .slot = slot, .family = family };

		if (family == 4)
			__builtin_memcpy(k.addr, src, 4);
		else
			__builtin_memcpy(k.addr, src, 16);
		__u64 m, epoch, tag, ptag, c, p, *cw, *pw;
		__u32 wi, pi;
		int cur, prev;

		xg_mask(k.addr, family == 4 ? r->prefix4 : r->prefix6);
		/* The epoch from the limit's own clock: precise and coarse
		 * differ by a tick, which at an epoch's end costs at most a
		 * budget token, never a verdict. */
		epoch = now >> XG_SEEN_EPOCH_LOG2;
		tag = xg_seen_tag(epoch);
		ptag = xg_seen_tag(epoch - 1);
		wi = xg_seen_pair(&k, &m) * 2 + (epoch & 1);
		pi = wi ^ 1;
		cw = seen.lookup(&wi);
		pw = seen.lookup(&pi);
		if (!cw || !pw)
			return xg_finish(pkt, XG_SLOT_NO_ENTRY, rule, gen, len, 1, 0);
		c = *cw;
		p = *pw;
		cur = xg_seen_of(c, tag) && (c & m);
		prev = xg_seen_of(p, ptag) && (p & m);
		/* A clear bit: certainly no bucket, so no lookup (a miss in
		 * the bucket map's table is what a forged source cost). */
		b = (cur || prev) ? sbuckets.lookup(&k) : 0;
		/* Found through the previous epoch's word: carried into this
		 * one's, once an epoch, so that a source that keeps sending
		 * keeps its bit. */
		if (b && !cur)
			xg_seen_set(cw, tag, m);
		if (!b) {
			struct xg_bucket fresh = {};
			struct xg_bucket *nb = nbuckets.lookup(&slot);

			if (!nb)
				return xg_finish(pkt, XG_SLOT_NO_ENTRY, rule, gen, len, 1, 0);
			/* A source the rule has not seen (or whose bucket the
			 * LRU evicted) costs one token of the budget; without
			 * it, nothing is inserted. An empty budget is a read
			 * of its word, which only a token's CAS writes: the
			 * CPUs share its cache line through a flood. */
			if (!xg_gcra(nb, now, 1, r->new_cost_fp, r->new_burst_ns))
				return xg_finish(pkt, XG_SLOT_NEWSRC, rule, gen, len, 1, log);
			/* The bit before the bucket: a set bit may have no
			 * bucket, a bucket never lacks its bit. */
			if (!cur)
				xg_seen_set(cw, tag, m);
			/* NOEXIST: a bucket another CPU just inserted stays. */
			sbuckets.insert(&k, &fresh);
			b = sbuckets.lookup(&k);
		}
	}
	/* No bucket (map full and racing): drop, never fail open, and
	 * count it apart from the rule's own drops over its rate. */
	if (!b)
		return xg_finish(pkt, XG_SLOT_NO_ENTRY, rule, gen, len, 1, 0);
	if (!xg_gcra(b, now, units, r->cost_fp, r->burst_ns))
		return xg_finish(pkt, slot, rule, gen, len, 1, log);
	if (r->total_cost_fp) {
		/* Second line: what the sources' own buckets admitted, capped
		 * in aggregate. Checked after the source's bucket, so sources
		 * over their own rate spend none of the aggregate. */
		b = rbuckets.lookup(&slot);
		if (!b)
			return xg_finish(pkt, XG_SLOT_NO_ENTRY, rule, gen, len, 1, 0);
		if (!xg_gcra(b, now, units, r->total_cost_fp, r->total_burst_ns))
			return xg_finish(pkt, slot, rule, gen, len, 1, log);
	}
	return -1;
}

/* What the fast lane found of a frame it leaves to the general path: the
 * source-table entry of its source under the active word `word` (0: none
 * looked up). The general path takes it instead of walking the table a
 * second time, while the active word is still the same. */
struct xg_hint {
	__u64 word;
	__u32 e;
};

/* The record of the limit rule a source's vector decides alone (the
 * general path's `decides`), for the fast lane: NULL for any other, and
 * for one that logs or may answer with SYN cookies, which need the
 * packet record. */
static __always_inline struct xg_rule *xg_lane_rule(__u32 gen, __u32 e, __u32 *rule)
{
	struct xg_vec *v = xg_vec(gen, e);
	struct xg_rule *r;
	__u32 idx;

	if (!v || !v->decides || v->daction != XG_ACT_LIMIT)
		return 0;
	*rule = v->decides - 1;
	idx = gen * XG_RULES_PER_GEN + (*rule & (XG_RULES_PER_GEN - 1));
	r = rules.lookup(&idx);
	if (!r || r->action != XG_ACT_LIMIT || r->log || r->cookies)
		return 0;
	return r;
}

/*
 * The fast lane: the frame of most floods, decided by its source alone.
 * An untagged IPv4 frame without options, or an untagged IPv6 frame
 * without extension headers that is not ICMPv6 (so never ND), whose L4
 * header the general parser would accept, while the generation counts no
 * per-source stats, whose source decides an allow or deny that does not
 * log (its source table entry says so: XG_DIR_FAST), or a limit rule
 * that neither logs nor answers with cookies (its source vector decides:
 * a per-source limit on a block of sources, what a spoofed flood meets),
 * and which no ban holds (checked while bans of its family exist, unless
 * banned drops log). Such a frame gets the verdict and the counters the
 * general path gives it (the fixture and fuzz tests hold the two to the
 * same answers) in about a third of the instructions: no packet record,
 * no second parse, no vector (a limit: one).
 * On a flood the instruction count is what costs: the first read of a
 * frame is a cache miss, and the work queued behind it decides how much
 * of the next frames' misses the CPU can overlap (docs/design.md).
 * Returns -1 for a frame the general path must take, with nothing
 * written but the hint.
 */
static __always_inline int xg_fast(struct xdp_md *ctx, struct xg_hint *hint)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *ip = data + sizeof(struct ethhdr);
	__u64 len = data_end - data;
	__u32 zero = 0, word, gen, logbans, e, rule = XG_NO_RULE;
	int banned, rc = -1;
	struct xg_rule *r = 0;
	struct xg_banstate *st;
	struct xg_lastsrc *last;
	__u64 *ap, w;
	__u16 h_proto;

	/* What does not depend on the frame comes first: instructions behind
	 * the frame's first (missing) read wait in the reorder buffer. */
	ap = active.lookup(&zero);
	st = banstate.lookup(&zero);
	last = lastsrc.lookup(&zero);
	if (!ap || !st || !last)
		return -1;
	w = *ap;
	word = w;
	gen = word & 1;
	if ((word >> XG_ACTIVE_FLAGS_SHIFT) & XG_GEN_MITIGATE)
		return -1;
	/* Banned drops that log need the packet record. */
	logbans = (word >> XG_ACTIVE_FLAGS_SHIFT) & XG_GEN_LOG_BANS;
	/* 8 bytes of L4 header: what the general parser requires of UDP
	 * (and of ICMPv6); TCP needs 20. */
	if ((void *)(ip + 28) > data_end)
		return -1;
	h_proto = *(__u16 *)(data + 12);
	if (h_proto == bpf_htons(XG_ETH_P_IP)) {
		if (ip[0] != 0x45 || (st->v4 && logbans))
			return -1;
		if (ip[9] == IPPROTO_TCP && (void *)(ip + 40) > data_end)
			return -1;
		/* The table entry itself holds the verdict (XG_DIR_FAST): no vector. */
		e = xg_lane4(&last->v4, w, gen, ip + 12);
		if (!(e & XG_DIR_FAST))
			r = xg_lane_rule(gen, e, &rule);
		/* A ban comes before any rule, as on the general path; looked
		 * up only for a frame the lane keeps, so no frame walks the
		 * trie twice. */
		banned = ((e & XG_DIR_FAST) || r) && st->v4 && xg_banned4(ip + 12, len);
		if (r && !banned)
			rc = xg_limit(0, 4, ip + 12, r, rule, gen, len);
	} else if (h_proto == bpf_htons(XG_ETH_P_IPV6)) {
		__u8 nh;

		if ((void *)(ip + 48) > data_end || (ip[0] & 0xf0) != 0x60 || (st->v6 && logbans))
			return -1;
		nh = ip[6];
		if (nh == IPPROTO_ICMPV6 || xg_is_exthdr(nh) ||
		    (nh == IPPROTO_TCP && (void *)(ip + 60) > data_end))
			return -1;
		e = xg_lane6(&last->v6, w, gen, ip + 8);
		if (!(e & XG_DIR_FAST))
			r = xg_lane_rule(gen, e, &rule);
		banned = ((e & XG_DIR_FAST) || r) && st->v6 && xg_banned6(ip + 8, len);
		if (r && !banned)
			rc = xg_limit(0, 6, ip + 8, r, rule, gen, len);
	} else {
		return -1;
	}
	if (!(e & XG_DIR_FAST) && !r) {
		hint->word = w;
		hint->e = e;
		return -1;
	}
	if (banned)
		return xg_finish(0, XG_SLOT_BAN, XG_NO_RULE, gen, len, 1, 0);
	if (!r)
		return xg_finish_fast(0, e, gen, len);
	if (rc >= 0)
		return rc;
	return xg_finish(0, r->slot, rule, gen, len, 0, 0);
}

#ifdef XG_SYNCOOKIES
/*
 * A packet a `syncookies` rule passes (bpf/syncookie.h). A SYN is
 * answered with a cookie SYN-ACK (XDP_TX). An ACK of no connection the
 * host knows (no socket, or only the listener: the handshake's last ACK)
 * must carry a valid cookie, or it is dropped. Returns -1 for the normal
 * path: a frame this path does not take (VLAN-tagged, IPv4 options or
 * fragment, IPv6 extension headers), any other packet, an ACK of a known
 * connection or with a valid cookie.
 */
static __always_inline int xg_cookie(struct xdp_md *ctx, struct xg_pkt *pkt, __u32 rule,
				     __u32 gen, __u64 len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0, iplen, cookie, tcplen, frame, ts = 0;
	struct xg_cookiebuf *cb;
	struct bpf_sock_tuple tup = {};
	struct bpf_sock *sk;
	__u8 *ip, *th, flags;
	__s64 v;
	__u64 sum;

	ip = (__u8 *)data + 14;
	if (pkt->proto != IPPROTO_TCP || (void *)(ip + 20 + 20) > data_end)
		return -1;
	if (*(__u16 *)((__u8 *)data + 12) == bpf_htons(XG_ETH_P_IP)) {
		if (ip[0] != 0x45 || (((ip[6] << 8) | ip[7]) & 0x3fff) || ip[9] != IPPROTO_TCP)
			return -1;
		iplen = 20;
	} else if (*(__u16 *)((__u8 *)data + 12) == bpf_htons(XG_ETH_P_IPV6)) {
		if ((void *)(ip + 40) > data_end || ip[6] != IPPROTO_TCP)
			return -1;
		iplen = 40;
	} else {
		return -1;
	}
	th = ip + iplen;
	if ((void *)(th + 20) > data_end)
		return -1;
	flags = th[13];
	if (!(flags & 0x02)) {                       /* no SYN */
		if ((flags & 0x14) != 0x10)          /* ACK without RST: check it */
			return -1;
		if (iplen == 20) {
			__builtin_memcpy(&tup.ipv4.saddr, ip + 12, 4);
			__builtin_memcpy(&tup.ipv4.daddr, ip + 16, 4);
			__builtin_memcpy(&tup.ipv4.sport, th, 4);
			sk = (struct bpf_sock *)bpf_skc_lookup_tcp(ctx, &tup, sizeof(tup.ipv4),
								   BPF_F_CURRENT_NETNS, 0);
		} else {
			__builtin_memcpy(tup.ipv6.saddr, ip + 8, 16);
			__builtin_memcpy(tup.ipv6.daddr, ip + 24, 16);
			__builtin_memcpy(&tup.ipv6.sport, th, 4);
			sk = (struct bpf_sock *)bpf_skc_lookup_tcp(ctx, &tup, sizeof(tup.ipv6),
								   BPF_F_CURRENT_NETNS, 0);
		}
		if (sk) {
			__u32 state = sk->state;

			bpf_sk_release(sk);
			if (state != BPF_TCP_LISTEN)
				return -1;           /* a connection the host knows */
		}
		if (iplen == 20)
			v = bpf_tcp_raw_check_syncookie_ipv4((void *)ip, (void *)th);
		else
			v = bpf_tcp_raw_check_syncookie_ipv6((void *)ip, (void *)th);
		if (v == 0)
			return -1;                   /* SYNPROXY opens it */
		return xg_finish(pkt, XG_SLOT_BADCOOKIE, rule, gen, len, 1, 0);
	}
	if (flags & 0x10)                            /* SYN-ACK: not ours to answer */
		return -1;
	if (flags & 0x05)                            /* SYN with RST or FIN */
		return xg_finish(pkt, XG_SLOT_BADCOOKIE, rule, gen, len, 1, 0);

	cb = cookiebuf.lookup(&zero);
	if (!cb)
		return -1;
	tcplen = (th[12] >> 4) * 4;
	if (tcplen < 20)
		return -1;
	if (bpf_xdp_load_bytes(ctx, 14 + iplen, cb->tcp, tcplen & 0x3c))
		return -1;
	if (iplen == 20)
		v = bpf_tcp_raw_gen_syncookie_ipv4((void *)ip, (void *)cb->tcp, tcplen & 0x3c);
	else
		v = bpf_tcp_raw_gen_syncookie_ipv6((void *)ip, (void *)cb->tcp, tcplen & 0x3c);
	if (v < 0)
		return -1;
	cookie = (__u32)v;
	cb->optlen = tcplen - 20;
	xg_synopts(cb);
	/* Room for our SYN-ACK's header (a SYN without options is shorter):
	 * at the tail, or, where the driver left too little tailroom there
	 * (veth, for an skb of a raw socket), at the head, with the headers
	 * moved to the front; the tail is cut to size below. */
	frame = data_end - data;
	if (frame < 14 + iplen + XG_SYNACK_MAXLEN &&
	    bpf_xdp_adjust_tail(ctx, (int)(14 + iplen + XG_SYNACK_MAXLEN - frame))) {
		if (bpf_xdp_adjust_head(ctx, -XG_SYNACK_MAXLEN))
			return -1;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if ((void *)((__u8 *)data + XG_SYNACK_MAXLEN + 14 + 40 + 20) > data_end) {
			if ((void *)((__u8 *)data + XG_SYNACK_MAXLEN + 14 + 20 + 20) > data_end || iplen != 20)
				/* cannot be: the SYN had them */
				return xg_finish(pkt, XG_SLOT_COOKIE_MOVED, rule, gen, len, 1, 0);
			xg_pull(data, 14 + 20 + 20);
		} else if (iplen == 20) {
			xg_pull(data, 14 + 20 + 20);
		} else {
			xg_pull(data, 14 + 40 + 20);
		}
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	ip = (__u8 *)data + 14;
	if (iplen == 20) {
		th = ip + 20;
		if ((void *)(th + XG_SYNACK_MAXLEN) > data_end)   /* cannot be: grown above */
			return xg_finish(pkt, XG_SLOT_COOKIE_ROOM4, rule, gen, len, 1, 0);
	} else {
		th = ip + 40;
		if ((void *)(th + XG_SYNACK_MAXLEN) > data_end)
			return xg_finish(pkt, XG_SLOT_COOKIE_ROOM6, rule, gen, len, 1, 0);
	}
	if (cb->ts) {
		ts = (__u32)(bpf_ktime_get_ns() / 1000000) & ~((1U << XG_TS_BITS) - 1);
		ts |= cb->wscale | (cb->sack ? XG_TS_SACK : 0);
		if ((cb->tcp[13] & 0xc0) == 0xc0)    /* ECE and CWR: ECN setup */
			ts |= XG_TS_ECN;
	}
	tcplen = xg_synack_tcp(th, cookie, cb, iplen == 20 ? XG_COOKIE_MSS4 : XG_COOKIE_MSS6, ts,
			       ts & XG_TS_ECN) & 0x3c;
	{
		__u8 mac[6];

		__builtin_memcpy(mac, data, 6);
		__builtin_memcpy(data, (__u8 *)data + 6, 6);
		__builtin_memcpy((__u8 *)data + 6, mac, 6);
	}
	/* The pseudo header, summed in network order as 16-bit words. */
	v = bpf_csum_diff(0, 0, (void *)th, tcplen, 0);
	if (v < 0)
		return -1;
	sum = (__u32)v;
	if (iplen == 20) {
		__u8 a[4];

		__builtin_memcpy(a, ip + 12, 4);
		__builtin_memcpy(ip + 12, ip + 16, 4);
		__builtin_memcpy(ip + 16, a, 4);
		sum += *(__u32 *)(ip + 12) + *(__u32 *)(ip + 16);
		sum += bpf_htonl(tcplen) + bpf_htonl(IPPROTO_TCP);
		*(__u16 *)(th + 16) = xg_csum_fold(sum);
		ip[1] = 0;                           /* TOS */
		*(__u16 *)(ip + 2) = bpf_htons(20 + tcplen);
		*(__u16 *)(ip + 4) = 0;              /* id */
		*(__u16 *)(ip + 6) = bpf_htons(0x4000);   /* DF */
		ip[8] = XG_COOKIE_TTL;
		*(__u16 *)(ip + 10) = 0;
		v = bpf_csum_diff(0, 0, (void *)ip, 20, 0);
		if (v < 0)
			return -1;
		*(__u16 *)(ip + 10) = xg_csum_fold((__u32)v);
	} else {
		__u8 a[16];
		int i;

		__builtin_memcpy(a, ip + 8, 16);
		__builtin_memcpy(ip + 8, ip + 24, 16);
		__builtin_memcpy(ip + 24, a, 16);
#pragma unroll
		for (i = 0; i < 8; i++)
			sum += *(__u32 *)(ip + 8 + 4 * i);
		sum += bpf_htonl(tcplen) + bpf_htonl(IPPROTO_TCP);
		*(__u16 *)(th + 16) = xg_csum_fold(sum);
		*(__u32 *)ip = bpf_htonl(0x60000000);     /* no traffic class, no flow label */
		*(__u16 *)(ip + 4) = bpf_htons(tcplen);
		ip[7] = XG_COOKIE_TTL;
	}
	frame = data_end - data;
	/* A number from here on: clang may not fold it into pointer math on
	 * data_end, which the verifier refuses. */
	asm volatile("" : "+r"(frame));
	if (bpf_xdp_adjust_tail(ctx, (int)(14 + iplen + tcplen) - (int)frame))
		/* cannot be (it only shrinks); the frame is ours now: never pass it on */
		return xg_finish(pkt, XG_SLOT_COOKIE_TRIM, rule, gen, len, 1, 0);
	xg_finish(pkt, XG_SLOT_COOKIE, rule, gen, len, 0, 0);
	return XDP_TX;
}

/* Whether the cookie path takes a packet a rule with cookies passes: a
 * syncookies = true rule's always; an "auto" rule's when `watch` has set
 * its destination port's bit, and its SYNs are counted per port for
 * `watch` to see the rate, cookies on or off. */
static __always_inline int xg_cookies_on(struct xg_pkt *pkt, struct xg_rule *r)
{
	__u32 port = pkt->dport, w = port / 64;
	__u64 *bits, one = 1, *n;

	if (r->cookies != XG_COOKIES_AUTO)
		return 1;
	if (pkt->syn) {
		n = synports.lookup(&port);
		if (n)
			*n += 1;      /* per CPU */
		else
			synports.update(&port, &one);
	}
	bits = cookieports.lookup(&w);
	return bits && ((*bits >> (port & 63)) & 1);
}

/* Tail-called by xg_general for a packet a `syncookies` rule passes, with
 * the packet record in pktbuf and the rule's verdict in cookiebuf. */
int xg_cookie_prog(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct xg_pkt *pkt = pktbuf.lookup(&zero);
	struct xg_cookiebuf *cb = cookiebuf.lookup(&zero);
	int rc;

	if (!pkt || !cb)
		return XDP_PASS;
	rc = xg_cookie(ctx, pkt, cb->rule, cb->gen, cb->len);
	if (rc >= 0)
		return rc;
	return xg_finish(pkt, cb->slot, cb->rule, cb->gen, cb->len, 0, 0);
}
#endif

/* Every frame the fast lane leaves: parse, bans, stats, classify. */
static __always_inline int xg_general(struct xdp_md *ctx, struct xg_hint *hint)
{
	struct xg_pkt *pkt;
	__u64 len = ctx->data_end - ctx->data;
	__u32 zero = 0, gen, rule = XG_NO_RULE, idx, i;
	struct xg_vec *vl, *vs, *vd, *vsp, *vdp;
	struct xg_rule *r;
	__u64 *genp, w;
	__u32 word, flags, svec;
	int rc;

	/* The packet record lives in a per-CPU map, not on the stack: the
	 * verifier tracks constants on the stack (each parse path sets its own
	 * family, l4 class and ports flag), and every later branch on one of
	 * them kept the paths apart, so it explored the classifier once per
	 * parse path: 690,000 instructions at 16 rule words, past its limit
	 * of 1,000,000 at 32. From map memory the fields read back as unknown
	 * values and the paths merge: 72,000 at 16 words, 131,000 at 64. An
	 * XDP program runs to its end on one CPU, with softirqs off, so no
	 * other packet shares the record meanwhile. */
	pkt = pktbuf.lookup(&zero);
	if (!pkt)
		return XDP_PASS;
	__builtin_memset(pkt, 0, sizeof(*pkt));
	rc = xg_parse(ctx, pkt);
	if (rc == XG_PARSE_NONIP)
		return XDP_PASS;

	/* The active word: generation in bit 0, that generation's flags
	 * (XG_GEN_*) from bit 8, written together in one store (with the
	 * epoch in the upper half, which only the fast lane uses). The
	 * gens record itself is read only where its other fields are needed
	 * (default action, logging, mitigation), which a packet a rule
	 * decides never is: one cache line fewer on the hot path. */
	genp = active.lookup(&zero);
	if (!genp)
		return xg_finish(pkt, XG_SLOT_NO_ENTRY, rule, 0, len, 1, 0);
	w = *genp;
	word = w;
	gen = word & 1;
	flags = word >> XG_ACTIVE_FLAGS_SHIFT;
	if (rc != XG_PARSE_OK)   /* malformed: rc is its cause's slot */
		return xg_finish(pkt, rc, rule, gen, len, 1, 0);
	if (xg_banned(pkt, len))
		return xg_finish(pkt, XG_SLOT_BAN, rule, gen, len, 1, flags & XG_GEN_LOG_BANS);
	if (flags & XG_GEN_MITIGATE) {
		struct xg_gen *g = gens.lookup(&gen);

		if (g)
			xg_srcstat(pkt, g, len);
	}

	/* Classify: AND the five dimension vectors, the lowest bit wins. */
	if (hint->word && hint->word == w)
		svec = hint->e == XG_DIR_TRIE ? xg_trie_vec(pkt, gen, XG_DIM_SRC, pkt->src) : hint->e;
	else
		svec = xg_addr_vec(pkt, gen, XG_DIM_SRC, pkt->src);
	if (svec & XG_DIR_FAST) {   /* a source that decides */
		if (pkt->l4 != XG_L4_ND)
			return xg_finish_fast(pkt, svec, gen, len);
		/* No rule that decides alone matches ND (IPv6 only): ND needs
		 * the vector, and the IPv6 trie holds every source prefix. */
		svec = xg_trie_vec(pkt, gen, XG_DIM_SRC, pkt->src);
	}
	vs = xg_vec(gen, svec);
	if (vs && vs->decides && pkt->l4 != XG_L4_ND) {
		rule = vs->decides - 1;
		if (vs->daction != XG_ACT_LIMIT)
			return xg_finish(pkt, vs->dslot, rule, gen, len,
					 vs->daction != XG_ACT_ALLOW, vs->dlog);
		goto decided;
	}
	vl = xg_vec(gen, pkt->l4);
	vd = vs;   /* no rule names dst: AND with itself */
	if (flags & XG_GEN_HAS_DST)
		vd = xg_vec(gen, xg_addr_vec(pkt, gen, XG_DIM_DST, pkt->dst));
	if (pkt->has_ports) {
		vsp = xg_vec(gen, xg_port_vec(gen, XG_PORT_SPORT, pkt->sport));
		vdp = xg_vec(gen, xg_port_vec(gen, XG_PORT_DPORT, pkt->dport));
	} else {
		vsp = xg_vec(gen, XG_VEC_NOPORT_SPORT);
		vdp = xg_vec(gen, XG_VEC_NOPORT_DPORT);
	}
	if (vl && vs && vd && vsp && vdp) {
		/* Words that are non-zero in all five vectors, lowest first. */
		__u64 cand = vl->summary & vs->summary & vd->summary & vsp->summary & vdp->summary;

		for (i = 0; i < XG_NWORDS; i++) {
			__u32 w;
			__u64 m;

			if (!cand)
				break;
			/* XG_NWORDS is a power of two. The empty asm hides w
			 * from clang, so the mask survives and the verifier
			 * sees the bound whatever clang does to the loop. */
			w = xg_ctz64(cand);
			asm volatile("" : "+r"(w));
			w &= XG_NWORDS - 1;
			m = vl->w[w] & vs->w[w] & vd->w[w] & vsp->w[w] & vdp->w[w];
			if (m) {
				rule = w * 64 + xg_ctz64(m);
				break;
			}
			cand &= cand - 1;
		}
	}

	if (rule == XG_NO_RULE) {
		if (pkt->l4 == XG_L4_ND)
			return xg_finish(pkt, XG_SLOT_ND, rule, gen, len, 0, 0);
		{
			struct xg_gen *g = gens.lookup(&gen);

			if (!g)
				return xg_finish(pkt, XG_SLOT_NO_ENTRY, rule, gen, len, 1, 0);
			return xg_finish(pkt, XG_SLOT_DEFAULT, rule, gen, len,
					 g->default_action != XG_ACT_ALLOW, flags & XG_GEN_LOG_DEFAULT);
		}
	}

decided:
	idx = gen * XG_RULES_PER_GEN + (rule & (XG_RULES_PER_GEN - 1));
	r = rules.lookup(&idx);
	if (!r)
		return xg_finish(pkt, XG_SLOT_NO_ENTRY, rule, gen, len, 1, 0);
	if (r->action != XG_ACT_ALLOW && r->action != XG_ACT_LIMIT)
		return xg_finish(pkt, r->slot, rule, gen, len, 1, r->log);
	if (r->action == XG_ACT_LIMIT) {
		rc = xg_limit(pkt, pkt->family, pkt->src, r, rule, gen, len);
		if (rc >= 0)
			return rc;
	}
#ifdef XG_SYNCOOKIES
	if (r->cookies && xg_cookies_on(pkt, r)) {
		struct xg_cookiebuf *cb = cookiebuf.lookup(&zero);

		if (cb) {
			cb->rule = rule;
			cb->gen = gen;
			cb->slot = r->slot;
			cb->len = len;
			cookieprog.call(ctx, 0);
		}
		/* No cookie program: the packet passes, as the rule says. */
	}
#endif
	return xg_finish(pkt, r->slot, rule, gen, len, 0, 0);
}
int xdpguard_prog(struct xdp_md *ctx)
{
	struct xg_hint hint = {};
	int rc = xg_fast(ctx, &hint);

	if (rc >= 0)
		return rc;
	return xg_general(ctx, &hint);
}
