/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Token bucket as GCRA: one 64-bit theoretical arrival time per bucket,
 * advanced with compare-and-swap, so any number of CPUs can share a bucket
 * without a lock (bpf_spin_lock is not allowed in LRU maps). A CAS that
 * keeps losing the race drops: limiting never fails open.
 */
#ifndef XDPGUARD_GCRA_H
#define XDPGUARD_GCRA_H

#define XG_GCRA_TRIES 4

/*
 * The clock of a limit rule's buckets. bpf_ktime_get_ns costs ~25 ns a
 * packet on a VM's TSC, a quarter of a limited packet's cost; the coarse
 * clock (CLOCK_MONOTONIC_COARSE, Linux >= 5.11) a load or two, but it
 * moves in ticks. A bucket on it still admits exactly its rate when its
 * burst spans a tick or more: each tick refills a tick's worth, the
 * bucket may run a burst ahead of the tick's time, so nothing is lost at
 * the step. A shorter burst would admit less than the rate, so such a rule
 * keeps the precise clock (struct xg_rule.coarse, set by the compiler
 * against XG_COARSE_BURST_NS, 5 ticks at HZ=100). Coarse time lags real
 * time by under a tick and never leads it: it cannot admit more than
 * burst + rate x (elapsed + a tick), so it never fails open.
 */
static __always_inline __u64 xg_now(__u8 coarse)
{
	return coarse ? bpf_ktime_get_coarse_ns() : bpf_ktime_get_ns();
}

/* Returns 1 when the units fit in the bucket (and charges them), else 0. */
static __always_inline int xg_gcra(struct xg_bucket *b, __u64 now, __u64 units,
				   __u64 cost_fp, __u64 burst_ns)
{
	__u64 inc = (units * cost_fp) >> 16;
	int i;

#pragma unroll
	for (i = 0; i < XG_GCRA_TRIES; i++) {
		__u64 old = b->tat;
		__u64 t = old > now ? old : now;
		__u64 next = t + inc;

		if (next - now > burst_ns)
			return 0;
		if (__sync_val_compare_and_swap(&b->tat, old, next) == old)
			return 1;
	}
	return 0;
}

/* Keep the first plen bits of a 16-byte address, zero the rest. addr is
 * 4-byte aligned: 4 steps of a word, where bytes took 16 (on every
 * packet of a per-source limit). */
static __always_inline void xg_mask(__u8 *addr, __u32 plen)
{
	__u32 *a = (__u32 *)addr;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		if (plen >= (__u32)(i + 1) * 32)
			continue;
		if (plen <= (__u32)i * 32)
			a[i] = 0;
		else
			a[i] &= bpf_htonl(0xffffffffU << ((i + 1) * 32 - plen));
	}
}

/*
 * Index of the lowest set bit of a non-zero word. BPF has no ctz; a
 * branchless popcount of the bits below it keeps the verifier from
 * exploring 2^6 paths per word of the rule vector.
 */
static __always_inline __u32 xg_ctz64(__u64 x)
{
	__u64 v = (x & -x) - 1;

	/*
	 * Opaque to the optimiser: LLVM 17+ folds popcount((x & -x) - 1) into
	 * cttz and lowers that through a de Bruijn table in .rodata, which
	 * bcc does not relocate (bcc 0.31 on Debian 13: "R4 invalid mem
	 * access 'scalar'" at the table load).
	 */
	asm volatile("" : "+r"(v));
	v = v - ((v >> 1) & 0x5555555555555555ULL);
	v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
	v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (__u32)((v * 0x0101010101010101ULL) >> 56);
}

#endif /* XDPGUARD_GCRA_H */
