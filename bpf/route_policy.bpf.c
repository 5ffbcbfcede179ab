// SPDX-License-Identifier: GPL-2.0-only
/*
 * iobridge read routing policy (BCC program).
 *
 * Attached as BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE to the module's
 * "iobridge_route" tracepoint.  For each read bio it looks up the decision
 * table entries of every healthy leg for the bio's size bucket and, among
 * the legs whose entry is valid (not expired) and says admit, picks the one
 * with the fewest bios in flight (ties: higher score, then lower index).
 * With no such leg it leaves chosen_leg at -1 and the module's default
 * policy decides.  agent/decision.py route() is the reference for these
 * semantics; the replay simulator runs that code.
 *
 * Compiled by agent/routing.py with -I kmodule (for iobridge_abi.h).
 */
#include "iobridge_abi.h"

/* Written by the agent through mmap(); see agent/routing.py. */
BPF_F_TABLE("array", u32, struct iobridge_decision, iobridge_decisions,
	    IOBRIDGE_DECISION_ENTRIES, BPF_F_MMAPABLE);

/*
 * Per-CPU counters, one lookup per call: reads routed by the table and
 * reads left to the module default (calls = routed + fallback).
 */
struct iobridge_route_stats {
	u64 routed;
	u64 fallback;
};
BPF_PERCPU_ARRAY(iobridge_route_stats, struct iobridge_route_stats, 1);

int iobridge_route(struct bpf_raw_tracepoint_args *args)
{
	/* Through an integer: keeps BCC from rewriting the stores below. */
	u64 addr = args->args[0];
	struct iobridge_route_ctx *ctx = (struct iobridge_route_ctx *)addr;
	u32 target = ctx->target_id;
	u32 nr_legs = ctx->nr_legs;
	u64 now = ctx->now_ns;
	u32 bucket = iobridge_size_bucket(ctx->bio_bytes);
	s32 best = IOBRIDGE_NO_LEG;
	s32 best_score = 0;
	u32 best_load = 0;
	u32 zero = 0;
	struct iobridge_route_stats *stats = iobridge_route_stats.lookup(&zero);

	if (target >= IOBRIDGE_MAX_TARGETS) {
		if (stats)
			stats->fallback++;
		return 0;
	}

#pragma unroll
	for (u32 leg = 0; leg < IOBRIDGE_MAX_LEGS; leg++) {
		struct iobridge_decision *d;
		u32 key, load;

		if (leg >= nr_legs)
			break;
		if (!ctx->healthy[leg])
			continue;
		key = iobridge_decision_index(target, leg, bucket);
		d = iobridge_decisions.lookup(&key);
		if (!d || d->expires_ns <= now || d->admit != IOBRIDGE_DECISION_ADMIT)
			continue;
		load = ctx->inflight[leg];
		if (best < 0 || load < best_load ||
		    (load == best_load && d->score > best_score)) {
			best = leg;
			best_score = d->score;
			best_load = load;
		}
	}

	if (best >= 0)
		ctx->chosen_leg = best;
	if (stats) {
		if (best >= 0)
			stats->routed++;
		else
			stats->fallback++;
	}
	return 0;
}
