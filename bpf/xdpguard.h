/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpguard: the one definition of every constant, struct and map shared by
 * the XDP program and user space.
 *
 * Python reads the integer "#define XG_*" lines of this file
 * (xdpguard/layout.py) and takes struct layouts from bcc (table.Key /
 * table.Leaf), so nothing here is ever copied by hand into Python.
 * Only integer constants (decimal, U suffix allowed) may be defined with
 * "#define XG_" here.
 *
 * Numbers in this file are part of the pinned ABI: a number, once used,
 * is never reused for something else. Bump XG_LAYOUT_VERSION when a
 * pinned struct changes, so an old pin is never misread.
 */
#ifndef XDPGUARD_H
#define XDPGUARD_H

#define XG_LAYOUT_VERSION 9

/* Rule actions (struct xg_rule.action, default action). */
#define XG_ACT_ALLOW 0
#define XG_ACT_DENY 1
#define XG_ACT_LIMIT 2

/* Limiter modes (struct xg_rule.per). */
#define XG_PER_SOURCE 0
#define XG_PER_RULE 1

/* Limiter units (struct xg_rule.unit). */
#define XG_UNIT_PACKETS 0
#define XG_UNIT_BYTES 1

/*
 * Counter slots. Slots below XG_SLOT_FIRST_RULE, and from
 * XG_SLOT_END_RULES on, are fixed verdict reasons; rules get stable slots
 * between them, kept across re-apply by rule name, so counters and
 * per-rule buckets survive a policy change. A malformed IP frame is
 * dropped and counted by its cause (bpf/parse.h); until layout 9, slot 2
 * counted every malformed frame.
 */
#define XG_SLOT_DEFAULT 0    /* no rule matched: the policy default */
#define XG_SLOT_BAN 1        /* source is in the ban map */
#define XG_SLOT_TRUNCATED 2  /* malformed: the frame ends inside a header */
#define XG_SLOT_ND 3         /* IPv6 ND/RA passed because no rule names icmpv6 */
#define XG_SLOT_NEWSRC 4     /* per-source limit: a source without a bucket
			      * found its rule's new-source budget empty:
			      * dropped, no bucket inserted */
#define XG_SLOT_COOKIE 5     /* SYN answered with a cookie SYN-ACK (XDP_TX) */
#define XG_SLOT_BADCOOKIE 6  /* ACK for no known connection without a valid
			      * cookie, or SYN with RST or FIN: dropped */
#define XG_SLOT_FIRST_RULE 8
#define XG_MAX_RULES_LIMIT 4096  /* rules per policy */
#define XG_SLOT_END_RULES 8200   /* rule slots end here: 2 generations of rules */
#define XG_SLOT_BAD_HEADER 8200  /* malformed: IP version not the ethertype's, or IPv4 IHL under 5 */
#define XG_SLOT_VLANS 8201       /* malformed: a VLAN tag after XG_MAX_VLANS */
#define XG_SLOT_EXTHDRS 8202     /* malformed: an IPv6 extension header after XG_MAX_EXTHDRS */
/* Dropped for want of a map entry: a per-source bucket the LRU could not
 * insert (a limiter never fails open), or an array element the verifier
 * makes the program check for and which is always there. */
#define XG_SLOT_NO_ENTRY 8203
/* The SYN cookie path's drops that cannot happen (bpf/xdpguard.c:
 * xg_cookie): each a bound the verifier wants checked that the frame
 * always meets. Counted, so that one that does happen shows. */
#define XG_SLOT_COOKIE_MOVED 8204  /* the SYN's headers short after moving them for room */
#define XG_SLOT_COOKIE_ROOM4 8205  /* no room for the SYN-ACK's TCP header after growing, IPv4 */
#define XG_SLOT_COOKIE_ROOM6 8206  /* the same, IPv6 */
#define XG_SLOT_COOKIE_TRIM 8207   /* the SYN-ACK not cut to its size (bpf_xdp_adjust_tail) */
#define XG_MAX_SLOTS 8216        /* all slots; free: 7, 8208..8215 */
#define XG_NO_SLOT 4294967295U   /* a frame no slot counts: non-IP, passed */
#define XG_NO_RULE 4294967295U   /* no rule decided (xg_logev.rule, xg_debug.rule) */

/*
 * L4 classes: the proto/flags dimension of the classifier. The vector
 * table holds one bit vector per class at index (class) in every
 * generation. A non-first fragment has no ports or flags: TCP fragments
 * are XG_L4_TCP, never XG_L4_TCP_SYN.
 */
#define XG_L4_OTHER 0
#define XG_L4_TCP 1
#define XG_L4_TCP_SYN 2   /* SYN set, ACK clear: a new connection */
#define XG_L4_UDP 3
#define XG_L4_ICMP 4
#define XG_L4_ICMPV6 5
#define XG_L4_ND 6        /* ICMPv6 types 133..137 (RS, RA, NS, NA, redirect) */
#define XG_L4_NCLASSES 8

/* Fixed vector indexes inside a generation (after the l4 classes). */
#define XG_VEC_NOPORT_SPORT 8  /* packet has no ports: rules without sport */
#define XG_VEC_NOPORT_DPORT 9  /* packet has no ports: rules without dport */
#define XG_VEC_FIRST_FREE 10

/*
 * Source tables (map srctab): for each family, a multibit trie of arrays
 * with strides 16-8-8-..., one region per generation: XG_DIR4_NODES nodes
 * (a -D flag) for IPv4, then XG_DIR6_NODES for IPv6. Regions in the map:
 * IPv4 gen 0, IPv4 gen 1, IPv6 gen 0, IPv6 gen 1. A node is 256 entries;
 * nodes 0..255 of a region are the root (indexed by the first address
 * byte, then the second). An IPv4 table resolves all 4 address bytes,
 * an IPv6 table the first XG_DIR_V6_BYTES (a /64): a longer IPv6 prefix
 * leaves its /64 slot to the trie. An entry is one of:
 *   XG_DIR_NODE | n   look the next address byte up in node n;
 *   XG_DIR_FAST | ... the source alone decides an allow or deny that does
 *                     not log (its vector's xg_vec.decides): the rule's
 *                     counter slot in bits 0-13, the rule in bits 14-28,
 *                     XG_DIR_DROP for a deny. No vector is read;
 *   XG_DIR_TRIE       the region ran out of nodes (or an IPv6 prefix is
 *                     longer than the table): the classifier trie decides;
 *   anything else     a vector index.
 * At most 3 array loads for IPv4 and 7 for IPv6, whatever the policy's size.
 */
#define XG_DIR_ROOT_NODES 256
#define XG_DIR_MAX_NODES 65536     /* per generation and family: 64 MiB */
#define XG_DIR_V4_BYTES 4
#define XG_DIR_V6_BYTES 8
#define XG_DIR_NODE 2147483648
#define XG_DIR_FAST 1073741824
#define XG_DIR_DROP 536870912
#define XG_DIR_RULE_SHIFT 14
#define XG_DIR_SLOT_MASK 16383
#define XG_DIR_RULE_MASK 32767
#define XG_DIR_TRIE 1073741823     /* below XG_DIR_FAST: vector indexes are smaller */

/* Dimensions of the address tries (byte 1 of the key data). */
#define XG_DIM_SRC 0
#define XG_DIM_DST 1

/* Port dimensions (row of the ports array). */
#define XG_PORT_SPORT 0
#define XG_PORT_DPORT 1
#define XG_NPORTS 65536

/* Parser bounds. */
#define XG_MAX_VLANS 2
#define XG_MAX_EXTHDRS 6

/* Ban reasons (struct xg_ban.reason). */
#define XG_BAN_MANUAL 0
#define XG_BAN_SYN_RATE 1
#define XG_BAN_CONN_RATE 2
#define XG_BAN_PPS 3
#define XG_BAN_BPS 4

/* Persistent map sizes: fixed, because these maps outlive a policy shape. */
#define XG_BAN_MAX 1048576
#define XG_SBUCKET_MAX 262144
/*
 * Seen sources (map seen): one bit per hash of a per-source bucket's key
 * (rule slot, family, masked source), set before the bucket is inserted.
 * A clear bit means the key has no bucket, so a source whose bit is clear
 * goes to its rule's new-source budget without the bucket map's lookup:
 * under a spoofed flood that lookup was a miss in a 2 MiB hash table (and
 * in the TLB) per frame, where these 256 KiB stay in the L2 cache. A set
 * bit only says "look it up": hash collisions and the bits of buckets the
 * LRU evicted cost that lookup, never a verdict.
 *
 * The bits age out, so that a long flood's admitted forged sources (one a
 * new-source token) do not fill the filter: a key hashes to a pair of
 * words, one per parity of the epoch (monotonic ns >> XG_SEEN_EPOCH_LOG2,
 * ~137 s); each word keeps XG_SEEN_BITS bits and, above them, the low
 * bits of the epoch it was written in. A bit counts while its word's tag
 * is the current or the previous epoch; a source found through the
 * previous epoch's word sets its bit in the current one. So the bits of
 * sources silent for two epochs (137-275 s) are gone without anyone
 * clearing them, and such a source is new again: under a flood its bucket
 * would have been evicted in about as long (XG_SBUCKET_MAX buckets at the
 * budget's 1,000 inserts a second). Fixed sizes, like the bucket map it
 * summarises, because it must outlive a program: an empty filter beside
 * old buckets would send established sources to the budget.
 */
#define XG_SEEN_PAIRS_LOG2 14
#define XG_SEEN_PAIRS 16384      /* 2^XG_SEEN_PAIRS_LOG2 */
#define XG_SEEN_WORDS 32768      /* map entries: 64-bit words, two a pair */
#define XG_SEEN_BITS 48          /* bits a word; its epoch tag above them */
#define XG_SEEN_TAG_BITS 16      /* 64 - XG_SEEN_BITS */
#ifndef XG_SEEN_EPOCH_LOG2
#define XG_SEEN_EPOCH_LOG2 37    /* tests shorten it (-D, an integer) */
#endif
#define XG_SRCSTAT_MAX 65536
#define XG_DROPLOG_BYTES 262144

/* The `active` word (64 bits, written in one store): bit 0 the
 * generation, from XG_ACTIVE_FLAGS_SHIFT its flags, from
 * XG_ACTIVE_EPOCH_SHIFT a count of the writes (never 0 once a policy is
 * active), so that a word names one fill of its generation's maps: the
 * fast lane's last-source memory (struct xg_lastsrc) trusts an entry only
 * under the word it was made under. */
#define XG_ACTIVE_FLAGS_SHIFT 8
#define XG_ACTIVE_EPOCH_SHIFT 32

/* struct xg_gen.flags (also in the `active` word) */
#define XG_GEN_HAS_DST 1     /* some rule names dst: look up the dst tries */
#define XG_GEN_MITIGATE 2    /* count per-source stats for the daemon */
#define XG_GEN_LOG_DEFAULT 4 /* drop log for default-deny drops */
#define XG_GEN_LOG_BANS 8    /* drop log for banned sources */

/* A limit rule whose bursts (rate, new_sources, rate_total) all span at
 * least this long reads the coarse clock, a tick's resolution (1-10 ms
 * for CONFIG_HZ 1000-100): at least 5 ticks (bpf/gcra.h). */
#define XG_COARSE_BURST_NS 50000000

/* xg_debug.verdict values (test builds only) */
#define XG_V_PASS 0
#define XG_V_DROP 1

/* Our cookie SYN-ACK (bpf/syncookie.h): MSS, window scale and TTL, as
 * the SYNPROXY rule of xdpguard's nftables table says them too. */
#define XG_COOKIE_MSS4 1460
#define XG_COOKIE_MSS6 1440
#define XG_COOKIE_WSCALE 7
#define XG_COOKIE_TTL 64

/* struct xg_rule.cookies: off, on (syncookies = true), or per port as
 * `watch` switches them ([mitigation] syncookies = "auto"): the bit of
 * the destination port in map cookieports (XG_COOKIEPORT_WORDS words of
 * 64 ports), which `watch` sets while the port's SYN rate (map synports,
 * SYNs such a rule passes, per port) is over syn_rate_total. */
#define XG_COOKIES_OFF 0
#define XG_COOKIES_ON 1
#define XG_COOKIES_AUTO 2
#define XG_COOKIEPORT_WORDS 1024
#define XG_SYNPORTS_MAX 4096
#define XG_COOKIEWHY_MAX 1024   /* ports with cookies on at once */

/* ---- structs (bcc turns these into table.Key / table.Leaf) ---- */

/* Key of an IPv4 classifier trie (one trie per generation): prefixlen
 * covers dim+addr. */
struct xg_lpm4_key {
	__u32 prefixlen;
	__u8 dim;
	__u8 addr[4];
};

struct xg_lpm6_key {
	__u32 prefixlen;
	__u8 dim;
	__u8 addr[16];
};

/* One node of a source table: an entry per value of an address byte
 * (XG_DIR_* above). */
struct xg_dirnode {
	__u32 e[256];
};

/* LPM value: index of the class bit vector in the vector table. */
struct xg_class {
	__u32 vec;
};

/* Which ban tries may hold entries (map `banstate`, one element). Set
 * before a ban is inserted and cleared once its trie is empty again, by
 * writers holding the pin lock (xdpguard/bans.py): while nothing is
 * banned, a packet skips the ban trie, the costliest lookup of an empty
 * policy (~45 ns on the flood path). */
struct xg_banstate {
	__u32 v4;
	__u32 v6;
};

struct xg_ban4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct xg_ban6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct xg_ban {
	__u64 expires_ns;   /* CLOCK_BOOTTIME; 0 = never */
	__u64 packets;      /* dropped under this ban (atomic adds) */
	__u64 bytes;
	__u32 reason;       /* XG_BAN_* */
	__u32 pad;
};

struct xg_rule {
	__u32 slot;        /* counter / per-rule bucket slot */
	__u8 action;       /* XG_ACT_* */
	__u8 per;          /* XG_PER_* */
	__u8 unit;         /* XG_UNIT_* */
	__u8 prefix4;      /* source grouping for per-source buckets */
	__u8 prefix6;
	__u8 log;          /* sample drops into the drop log */
	__u8 cookies;      /* XG_COOKIES_*: what the rule passes: SYNs answered
			    * with a cookie, ACKs checked (bpf/syncookie.h) */
	__u8 coarse;       /* 1: the rule's buckets run on the coarse clock
			    * (bpf/gcra.h): every burst of the rule spans at
			    * least XG_COARSE_BURST_NS. Once padding: 0,
			    * the precise clock, is what old records say. */
	__u64 cost_fp;     /* ns per unit << 16 (GCRA emission interval) */
	__u64 burst_ns;    /* burst x cost: how far ahead the bucket may run */
	/* XG_PER_SOURCE only. The new-source budget (map nbuckets, at the
	 * rule's slot): a source without a bucket takes one token (one
	 * source) before its bucket is inserted, so forged sources cannot
	 * churn the bucket map. ns per source << 16, and its burst. */
	__u64 new_cost_fp;
	__u64 new_burst_ns;
	/* rate_total: an aggregate cap over all the rule's sources (map
	 * rbuckets at the rule's slot, which a per-source rule has no other
	 * use for), in the rule's unit. 0: none. */
	__u64 total_cost_fp;
	__u64 total_burst_ns;
};

/* Per-generation settings. */
struct xg_gen {
	__u32 nwords;          /* 64-bit words of the rule vector in use */
	__u32 flags;           /* XG_GEN_* */
	__u8 default_action;   /* XG_ACT_ALLOW or XG_ACT_DENY */
	__u8 mit_prefix4;      /* per-source stats grouping (XG_GEN_MITIGATE) */
	__u8 mit_prefix6;
	__u8 pad[5];
	__u64 log_cost_fp;     /* drop log: GCRA per slot, events/s ... */
	__u64 log_burst_ns;    /* ... so logging cannot add load in a flood */
};

struct xg_counter {
	__u64 packets;
	__u64 bytes;
	__u64 dropped_packets;
	__u64 dropped_bytes;
	__u64 log_suppressed;   /* drop-log events over the log rate */
};

/* One sampled drop (ring buffer `droplog`). */
struct xg_logev {
	__u64 ts_ns;        /* CLOCK_BOOTTIME */
	__u32 slot;
	__u32 rule;         /* rule index in the generation, or XG_NO_RULE */
	__u32 len;
	__u16 sport;
	__u16 dport;
	__u16 vlan;         /* outer VLAN id, 0 = untagged */
	__u8 family;
	__u8 proto;
	__u8 src[16];
	__u8 dst[16];
};

/* GCRA state: theoretical arrival time of the next unit. */
struct xg_bucket {
	__u64 tat;
};

struct xg_sbucket_key {
	__u32 slot;
	__u8 family;       /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16];     /* source masked to prefix4 / prefix6 */
};

struct xg_srcstat_key {
	__u8 family;       /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16];     /* source masked to mit_prefix4 / mit_prefix6 */
};

/* Per-source traffic seen at XDP while mitigation is on (per-CPU). */
struct xg_srcstat {
	__u64 packets;
	__u64 bytes;
	__u64 syns;
};

/* Why `watch` turned on the cookies of a port (map cookiewhy, by port;
 * [mitigation] syncookies = "auto"): for `status`, never read at XDP. */
struct xg_cookiewhy {
	__u64 since;       /* wall clock, seconds */
	__u64 syn_rate;    /* the port's SYNs per second then */
	__u64 threshold;   /* syn_rate_total, per second */
};

/* The fast lane's memory of the last source it looked up, per CPU and
 * family (map lastsrc): a flood from one source, or a burst of frames
 * from one, skips the source table's walk, whose loads wait on the
 * frame's first (missing) read. Valid only while the active word is the
 * one it was made under: a re-apply writes the table of the generation
 * it is about to switch to, and every switch counts in the word's epoch. */
struct xg_last {
	__u64 word;        /* the active word (with its epoch); 0: empty */
	__u8 addr[16];     /* IPv4: the first 4 bytes; 8-byte aligned, so
			    * compared in two loads */
	__u32 e;           /* the source table's entry for addr */
	__u32 pad;
};

struct xg_lastsrc {
	struct xg_last v4;
	struct xg_last v6;
};

/* Which rule decided, for BPF_PROG_TEST_RUN (test builds only). The
 * test rig fills it with XG_NO_SLOT before a run: a frame that no slot
 * counts leaves it so. */
struct xg_debug {
	__u32 slot;
	__u32 rule;        /* rule index in the generation, or XG_NO_RULE */
	__u32 verdict;     /* XG_V_* */
	__u32 gen;
	__u32 fast;        /* 1: decided in the fast lane (xg_fast) */
};

#ifdef XG_NWORDS
/*
 * One rule bit vector; the width is a -D flag from the compiled policy.
 * summary has bit j set when w[j] is not zero: ANDing the five summaries
 * first lets the program visit only words that can hold a match, so a
 * packet that matches no rule costs the same with 1,000 rules as with 10.
 */
struct xg_vec {
	__u64 summary;
	/* rule + 1 when this vector, found as the source vector, decides the
	 * match alone: its lowest rule matches every protocol (but ND), port
	 * and destination, so the AND of all five vectors has that rule as
	 * its lowest bit too. A blocklist rule decides this way: such packets
	 * skip the other four lookups. 0 otherwise. */
	__u32 decides;
	/* That rule's slot, action and log flag (its struct xg_rule's): an
	 * allow or deny it decides needs no rule record. */
	__u16 dslot;
	__u8 daction;
	__u8 dlog;
	__u64 w[XG_NWORDS];
};
#endif

#endif /* XDPGUARD_H */
