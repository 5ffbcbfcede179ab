/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Helpers shared by the iobridge BPF programs (BCC).  Structures live in
 * kmodule/iobridge_abi.h; this file holds only BPF-side code.
 */
#ifndef _IOBRIDGE_BPF_H
#define _IOBRIDGE_BPF_H

#include "iobridge_abi.h"

/* Log-linear histogram slot of a duration (layout: IOBRIDGE_LAT_* in the
 * ABI header; agent/histogram.py maps slots back to values). */
static __always_inline u32 iobridge_lat_slot(u64 ns)
{
	u32 sub = 1 << IOBRIDGE_LAT_SUB_BITS;
	u32 slot;

	if (ns < sub)
		return ns;
	u32 k = bpf_log2l(ns) - 1;	/* BCC's bpf_log2l is floor(log2) + 1 */
	slot = (k - IOBRIDGE_LAT_SUB_BITS + 1) * sub +
	       ((ns >> (k - IOBRIDGE_LAT_SUB_BITS)) & (sub - 1));
	return slot < IOBRIDGE_LAT_SLOTS ? slot : IOBRIDGE_LAT_SLOTS - 1;
}

#endif /* _IOBRIDGE_BPF_H */
