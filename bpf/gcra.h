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

/* Keep the first plen bits of an address, zero the rest. */
static __always_inline void xg_mask(__u8 *addr, __u32 plen)
{
	int i;

#pragma unroll
	for (i = 0; i < 16; i++) {
		if (plen >= (__u32)(i + 1) * 8)
			continue;
		if (plen <= (__u32)i * 8)
			addr[i] = 0;
		else
			addr[i] &= (__u8)(0xff << (8 - (plen - i * 8)));
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
