// SPDX-License-Identifier: GPL-2.0-only
/*
 * iobridge read routing policy (BCC program), ABI 7: feature-keyed table.
 *
 * Attached as BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE to the module's
 * "iobridge_route" tracepoint.  For each read bio:
 *
 * 1. While the agent's heartbeat is older than its max_silence_ns the whole
 *    table is ignored (the agent is stalled): fallback (counted also as
 *    silent), chosen_leg stays -1 and the module's default policy decides.
 * 2. A leg is valid when it is < nr_legs, healthy, and its
 *    struct iobridge_leg_decisions (index iobridge_leg_index(target, leg))
 *    has expires_ns > now.  For each valid leg:
 *      key  = iobridge_key_index(iobridge_size_bucket(bio_bytes),
 *                                iobridge_inflight_bucket(inflight[leg]),
 *                                iobridge_lat_bucket(lat_edge_ns,
 *                                    iobridge_key_latency(last_lat_ns[leg], last_lat_qlen[leg])))
 *      cost = iobridge_leg_cost(inflight[leg], service_ns, last_lat_ns[leg], key latency,
 *                 iobridge_key_penalty(penalty_ns[key], top_lat_ns, latency bucket,
 *                                      key latency))
 *    (64-bit arithmetic; the open top bucket priced at the key latency).  The lowest cost wins; on an exact tie one of the
 *    tied legs uniformly at random (reservoir sampling: the k-th tied leg
 *    replaces the current best with probability 1/k, bpf_get_prandom_u32).
 * 3. Probing: the first valid leg in index order with probe_after_ns != 0,
 *    nothing in flight and no completion for iobridge_probe_wait_ns(
 *    probe_after_ns, key latency) (now - last_complete_ns[leg] >= that
 *    wait: at least 32x the leg's key latency; last_complete_ns == 0
 *    means idle forever; a completion stamped after now is not idle) gets
 *    the read instead, unless it is already the lowest-cost choice.  It
 *    counts as routed and as a probe.
 * 4. With no valid leg: fallback, chosen_leg stays -1 (module default).
 * 5. The chosen leg's hedge_us for the read's key (its key on that leg)
 *    goes to ctx->hedge_us: the target hedges the read once it has been
 *    pending that long (0 = never).
 *
 * Every routing the table makes (including probes) records the table's age
 * (now - the agent's published_ns) in a histogram.  The agent's Python
 * reference of this rule is what the replay simulator runs; keep the two
 * identical.
 *
 * Compiled by the agent with -I kmodule -I bpf (iobridge_abi.h,
 * iobridge_bpf.h).
 */
#include "iobridge_bpf.h"

/* Written by the agent through mmap(). */
BPF_F_TABLE("array", u32, struct iobridge_leg_decisions, iobridge_decisions,
	    IOBRIDGE_DECISION_ENTRIES, BPF_F_MMAPABLE);

/* The agent's heartbeat, also written through mmap(). */
BPF_F_TABLE("array", u32, struct iobridge_agent_state, iobridge_agent,
	    1, BPF_F_MMAPABLE);

/* Per-CPU counters, one lookup per call (calls = routed + fallback). */
BPF_PERCPU_ARRAY(iobridge_route_stats, struct iobridge_route_stats, 1);

/* Age of the table (now - published_ns) at each routing it decided. */
BPF_PERCPU_ARRAY(iobridge_decision_age, u64, IOBRIDGE_LAT_SLOTS);

/*
 * The running choice across the unrolled leg loop, kept in map memory on
 * purpose: the verifier does not track values loaded from a map, so the
 * states after each leg converge instead of multiplying with every earlier
 * leg's outcome (in registers, 8 legs exceed the verifier's 1M-instruction
 * budget).  Per CPU and private to one call: tracepoint probes run with
 * preemption disabled and a program does not nest on its CPU.
 */
struct iobridge_route_scratch {
	u64 best_cost;
	s32 best;
	s32 probe;
	u32 ties;
	u32 best_hedge_us;		/* hedge_us[key] of best */
	u32 probe_hedge_us;		/* hedge_us[key] of probe */
};
BPF_PERCPU_ARRAY(iobridge_route_scratch, struct iobridge_route_scratch, 1);

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
	u32 size_bucket = iobridge_size_bucket(ctx->bio_bytes);
	s32 best, probe, chosen;
	u64 published = 0;
	u32 zero = 0;
	struct iobridge_route_stats *stats = iobridge_route_stats.lookup(&zero);
	struct iobridge_route_scratch *s = iobridge_route_scratch.lookup(&zero);

	if (!s || target >= IOBRIDGE_MAX_TARGETS) {
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
	s->best = IOBRIDGE_NO_LEG;
	s->probe = IOBRIDGE_NO_LEG;
	s->best_cost = 0;
	s->ties = 0;

#pragma unroll
	for (u32 leg = 0; leg < IOBRIDGE_MAX_LEGS; leg++) {
		struct iobridge_leg_decisions *d;
		u32 idx, key, inflight, lat_b;
		u64 cost, last, klat;

		if (leg >= nr_legs)
			break;
		if (!ctx->healthy[leg])
			continue;
		idx = iobridge_leg_index(target, leg);
		d = iobridge_decisions.lookup(&idx);
		/* Made for another device that held this id: not ours. */
		if (!d || d->expires_ns <= now || d->target_incarnation != ctx->target_incarnation)
			continue;
		inflight = ctx->inflight[leg];
		klat = iobridge_key_latency(ctx->last_lat_ns[leg], ctx->last_lat_qlen[leg]);
		lat_b = iobridge_lat_bucket(d->lat_edge_ns, klat);
		key = iobridge_key_index(size_bucket, iobridge_inflight_bucket(inflight), lat_b);
		/* Keep the bounds check visible to the verifier. */
		asm volatile("" : "+r"(key));
		if (key >= IOBRIDGE_KEYS_PER_LEG)
			continue;
		cost = iobridge_leg_cost(inflight, d->service_ns, ctx->last_lat_ns[leg], klat,
					 iobridge_key_penalty(d->penalty_ns[key], d->top_lat_ns,
							      lat_b, klat));
		if (s->best < 0 || cost < s->best_cost) {
			s->best = leg;
			s->best_cost = cost;
			s->ties = 1;
			s->best_hedge_us = d->hedge_us[key];
		} else if (cost == s->best_cost) {
			/* Reservoir: the k-th tied leg wins with probability 1/k. */
			u32 k = s->ties + 1;

			s->ties = k;
			if (bpf_get_prandom_u32() % k == 0) {
				s->best = leg;
				s->best_hedge_us = d->hedge_us[key];
			}
		}
		if (s->probe < 0 && d->probe_after_ns && inflight == 0) {
			last = ctx->last_complete_ns[leg];
			if (!last || (now >= last && now - last >=
				      iobridge_probe_wait_ns(d->probe_after_ns, klat))) {
				s->probe = leg;
				s->probe_hedge_us = d->hedge_us[key];
			}
		}
	}

	best = s->best;
	probe = s->probe;
	chosen = best;
	if (probe >= 0 && probe != best)
		chosen = probe;

	if (chosen >= 0) {
		u32 slot = iobridge_lat_slot(now > published ? now - published : 0);
		u64 *age;

		ctx->chosen_leg = chosen;
		ctx->hedge_us = chosen == best ? s->best_hedge_us : s->probe_hedge_us;
		/* Keep the bounds check visible to the verifier. */
		asm volatile("" : "+r"(slot));
		if (slot < IOBRIDGE_LAT_SLOTS) {
			age = iobridge_decision_age.lookup(&slot);
			if (age)
				(*age)++;
		}
	}
	if (stats) {
		if (chosen >= 0) {
			stats->routed++;
			if (chosen != best)
				stats->probes++;
		} else {
			stats->fallback++;
		}
	}
	return 0;
}
