// SPDX-License-Identifier: GPL-2.0-only
/*
 * iobridge read routing policy (BCC program).
 *
 * Attached as BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE to the module's
 * "iobridge_route" tracepoint.  For each read bio it looks up the decision
 * table entries of every healthy leg for the bio's size bucket and, among
 * the legs whose entry is valid (not expired) and says admit, picks the one
 * with the fewest bios in flight (ties: higher score, then lower index).
 * If every valid entry says avoid, it picks the highest score (the leg
 * least likely to be slow; ties: fewer in flight, then lower index).  With
 * no valid entry it leaves chosen_leg at -1 and the module's default
 * policy decides.  While the agent's heartbeat is older than its
 * max_silence_ns the whole table is ignored (the agent is stalled), and
 * every routing the table makes records the table's age in a histogram.  agent/decision.py route() is the reference for these
 * semantics; the replay simulator runs that code.
 *
 * Compiled by agent/routing.py with -I kmodule (for iobridge_abi.h).
 */
#include "iobridge_bpf.h"

/* Written by the agent through mmap(); see agent/routing.py. */
BPF_F_TABLE("array", u32, struct iobridge_decision, iobridge_decisions,
	    IOBRIDGE_DECISION_ENTRIES, BPF_F_MMAPABLE);

/* The agent's heartbeat, also written through mmap(). */
BPF_F_TABLE("array", u32, struct iobridge_agent_state, iobridge_agent,
	    1, BPF_F_MMAPABLE);

/* Per-CPU counters, one lookup per call (calls = routed + fallback). */
BPF_PERCPU_ARRAY(iobridge_route_stats, struct iobridge_route_stats, 1);

/* Age of the table (now - published_ns) at each routing it decided. */
BPF_PERCPU_ARRAY(iobridge_decision_age, u64, IOBRIDGE_LAT_SLOTS);

static __always_inline int agent_silent(u64 now, u64 *published)
{
	u32 zero = 0;
	struct iobridge_agent_state *a = iobridge_agent.lookup(&zero);

	if (!a)
		return 1;
	*published = a->published_ns;
	return a->max_silence_ns && now > a->heartbeat_ns + a->max_silence_ns;
}

int iobridge_route(struct bpf_raw_tracepoint_args *args)
{
	/* Through an integer: keeps BCC from rewriting the stores below. */
	u64 addr = args->args[0];
	struct iobridge_route_ctx *ctx = (struct iobridge_route_ctx *)addr;
	u32 target = ctx->target_id;
	u32 nr_legs = ctx->nr_legs;
	u64 now = ctx->now_ns;
	u32 bucket = iobridge_size_bucket(ctx->bio_bytes);
	s32 best = IOBRIDGE_NO_LEG, fallback = IOBRIDGE_NO_LEG;
	s32 best_score = 0, fallback_score = 0;
	u32 best_load = 0, fallback_load = 0;
	u64 published = 0;
	u32 zero = 0;
	struct iobridge_route_stats *stats = iobridge_route_stats.lookup(&zero);

	if (target >= IOBRIDGE_MAX_TARGETS) {
		if (stats)
			stats->fallback++;
		return 0;
	}
	if (agent_silent(now, &published)) {
		if (stats) {
			stats->fallback++;
			stats->silent++;
		}
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
		if (!d || d->expires_ns <= now)
			continue;
		load = ctx->inflight[leg];
		if (d->admit == IOBRIDGE_DECISION_ADMIT) {
			if (best < 0 || load < best_load ||
			    (load == best_load && d->score > best_score)) {
				best = leg;
				best_score = d->score;
				best_load = load;
			}
		} else if (fallback < 0 || d->score > fallback_score ||
			   (d->score == fallback_score && load < fallback_load)) {
			fallback = leg;
			fallback_score = d->score;
			fallback_load = load;
		}
	}
	/* Every valid entry says avoid: the least likely to be slow. */
	if (best < 0)
		best = fallback;

	if (best >= 0) {
		u32 slot = iobridge_lat_slot(now > published ? now - published : 0);
		u64 *age;

		ctx->chosen_leg = best;
		/* Keep the bounds check visible to the verifier. */
		asm volatile("" : "+r"(slot));
		if (slot < IOBRIDGE_LAT_SLOTS) {
			age = iobridge_decision_age.lookup(&slot);
			if (age)
				(*age)++;
		}
	}
	if (stats) {
		if (best >= 0)
			stats->routed++;
		else
			stats->fallback++;
	}
	return 0;
}
