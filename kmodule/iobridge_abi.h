/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * iobridge ABI: the one C definition of every structure shared by the
 * kernel module (kmodule/), the BPF programs (bpf/) and the agent (agent/).
 *
 * The agent mirrors these layouts in agent/abi.py; tests/test_abi.py compiles
 * this header with the host compiler and checks every size and offset against
 * the Python side.  Any change to a layout below must bump
 * IOBRIDGE_ABI_VERSION; the agent refuses to run when the module, the header
 * it compiles into BPF programs and its own mirror disagree.
 *
 * This header is included from kernel code, from BCC-compiled BPF programs
 * and from host user-space test programs, so it uses only <linux/types.h>.
 */
#ifndef _IOBRIDGE_ABI_H
#define _IOBRIDGE_ABI_H

#include <linux/types.h>

#define IOBRIDGE_ABI_VERSION		7

/* ------------------------------------------------------------------------
 * Limits
 * ------------------------------------------------------------------------ */
#define IOBRIDGE_MAX_LEGS		8	/* legs per target (min 2) */
#define IOBRIDGE_MAX_TARGETS		64	/* live targets (ids 0..63) */

/*
 * I/O size buckets.  Bucket i holds requests of at most
 * IOBRIDGE_SIZE_BUCKETi_MAX bytes; the last bucket holds everything larger.
 */
#define IOBRIDGE_SIZE_BUCKET0_MAX	4096
#define IOBRIDGE_SIZE_BUCKET1_MAX	16384
#define IOBRIDGE_SIZE_BUCKET2_MAX	65536
#define IOBRIDGE_NUM_SIZE_BUCKETS	4

static inline __u32 iobridge_size_bucket(__u32 nbytes)
{
	if (nbytes <= IOBRIDGE_SIZE_BUCKET0_MAX)
		return 0;
	if (nbytes <= IOBRIDGE_SIZE_BUCKET1_MAX)
		return 1;
	if (nbytes <= IOBRIDGE_SIZE_BUCKET2_MAX)
		return 2;
	return 3;
}

/* ------------------------------------------------------------------------
 * Routing hook: context of the writable tracepoint "iobridge_route"
 *
 * The module fills one of these for each read bio and calls the tracepoint.
 * A BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE program gets a pointer to it as
 * its first argument and may store a leg index into chosen_leg; every
 * other field is input only.  The module ignores a choice that is out of
 * range or names a failed leg and then uses its default policy.
 *
 * Since ABI 3 the context carries each leg's live latency state, kept by
 * the module at every data bio completion (reads and write copies, timed
 * from the module's submission to the leg until its completion): the
 * routing program keys its decision table on it, so a leg turning slow is
 * acted on at the next read, whatever the agent is doing.
 * ------------------------------------------------------------------------ */
#define IOBRIDGE_NO_LEG			(-1)

struct iobridge_route_ctx {
	__u32 abi_version;			/* IOBRIDGE_ABI_VERSION */
	__u32 target_id;			/* 0..IOBRIDGE_MAX_TARGETS-1 */
	__u32 nr_legs;				/* 2..IOBRIDGE_MAX_LEGS */
	__u32 bio_bytes;			/* size of the read */
	__u64 sector;				/* first sector, 512-byte units */
	__u64 now_ns;				/* ktime_get_ns() at the call */
	__u32 op_flags;				/* bio->bi_opf */
	__s32 chosen_leg;			/* in: -1; out: leg or -1 */
	__u32 inflight[IOBRIDGE_MAX_LEGS];	/* bios in flight per leg */
	__u8 healthy[IOBRIDGE_MAX_LEGS];	/* 1 = may serve reads */
	/* The leg's recent latency: of its two newest successful data bios, the
	 * one iobridge_use_previous() picks (0 = none yet), and the bios that
	 * were ahead of that one at submission (ABI 5). */
	__u64 last_lat_ns[IOBRIDGE_MAX_LEGS];
	__u64 last_complete_ns[IOBRIDGE_MAX_LEGS]; /* ktime_get_ns() of its newest completion, 0 = none */
	__u32 last_lat_qlen[IOBRIDGE_MAX_LEGS];
	/* Which device holds target_id now (since ABI 6): a number the module
	 * gives each new device, kept across table reloads of it.  A removed
	 * target's id is reused by the next one created, maybe before the agent
	 * has seen either; its decisions name the incarnation they were made
	 * for, so the new device never routes by the old one's entries. */
	__u32 target_incarnation;
	/* Out (since ABI 7): the hedge deadline of this read in microseconds,
	 * 0 = none (the target's own hedge_us option then applies, if set).
	 * The program copies it from the chosen leg's entry for the read's key. */
	__u32 hedge_us;
};

/* ------------------------------------------------------------------------
 * Hedged reads (since ABI 7)
 *
 * A read still pending on its leg when its hedge deadline has passed gets
 * ONE more read, to the least in-flight other healthy leg (for a deadline
 * from the routing program, only one whose recent read took less than the
 * read has waited); the first good completion completes the caller's bio.
 * Both reads go into the target's own bounce pages and the winner's data
 * is copied, so a late completion never writes into pages returned to the
 * caller.  Extra reads are bounded by a token
 * bucket in the target, whatever the deadlines say: every read routed
 * earns budget% x IOBRIDGE_HEDGE_TOKEN / 100 micro-tokens (the budget a
 * percent to IOBRIDGE_HEDGE_BUDGET_DECIMALS decimals, kept in millionths of
 * reads, so a read earns exactly that many micro-tokens), a hedge costs
 * IOBRIDGE_HEDGE_TOKEN, the bucket holds IOBRIDGE_HEDGE_BUCKET hedges and
 * starts empty; a hedge due without a whole token is refused (counted) and
 * the read waits for its own leg.  agent/core/hedging.py is the reference
 * the replay runs.
 * ------------------------------------------------------------------------ */
#define IOBRIDGE_HEDGE_TOKEN		1000000
#define IOBRIDGE_HEDGE_BUCKET		16
#define IOBRIDGE_HEDGE_DEFAULT_BUDGET_PCT	5
#define IOBRIDGE_HEDGE_BUDGET_DECIMALS		4

/* ------------------------------------------------------------------------
 * Feature-keyed decision table (BPF array, BPF_F_MMAPABLE, written by the
 * agent; since ABI 3)
 *
 * One struct iobridge_leg_decisions per (target, leg), at index
 * iobridge_leg_index(target, leg).  Per read, the routing program computes
 * for every healthy leg the key
 *
 *   (size bucket of the read,
 *    in-flight bucket of the leg's bios in flight,
 *    latency bucket of the leg's newest completion latency, by lat_edge_ns)
 *
 * and the leg's expected completion time
 *
 *   cost = iobridge_leg_cost(inflight, service_ns, newest latency, key latency,
 *                            iobridge_key_penalty(penalty_ns[key], ...))
 *
 * and sends the read to the leg with the lowest cost (exact ties: a random
 * one of them).  penalty_ns is what the agent precomputed for the key from
 * the admission model: how much the key's latency raises P(slow) (over
 * the same key with a fast latency) times the extra time a slow read
 * costs on that leg.  Keys and edges are documented in the README
 * ("Feature-keyed decision table").
 *
 * Probing: a leg whose entry is valid, with no bio in flight and no
 * completion for iobridge_probe_wait_ns(probe_after_ns, its key
 * latency), gets the read (one at a time), so an avoided leg shows its
 * recovery even when the agent is slow.
 *
 * An entry is valid while expires_ns > now (CLOCK_MONOTONIC ns, i.e.
 * ktime_get_ns()) and its target_incarnation is the context's (the device
 * that holds the id now); expires_ns == 0 is empty.  The agent writes everything
 * else first and expires_ns last; legs without a valid entry are left out,
 * and with no valid entry at all the module default decides.
 * ------------------------------------------------------------------------ */
#define IOBRIDGE_NUM_INFLIGHT_BUCKETS	6	/* 0, 1, 2-3, 4-7, 8-15, 16+ */
#define IOBRIDGE_NUM_LAT_BUCKETS	8	/* split by the leg's 7 lat_edge_ns */
#define IOBRIDGE_KEYS_PER_LEG \
	(IOBRIDGE_NUM_SIZE_BUCKETS * IOBRIDGE_NUM_INFLIGHT_BUCKETS * IOBRIDGE_NUM_LAT_BUCKETS)
#define IOBRIDGE_PENALTY_MAX_NS		0xffffffffU

struct iobridge_leg_decisions {
	__u64 expires_ns;			/* 0 = empty; written last */
	__u64 probe_after_ns;			/* 0 = never probe this leg */
	__u32 service_ns;			/* per read: latency / (bios ahead + 1), typical */
	__u32 lat_edge_ns[IOBRIDGE_NUM_LAT_BUCKETS - 1];	/* ascending */
	__u32 top_lat_ns;			/* latency the top bucket is priced at, 0 = as is */
	__u32 target_incarnation;		/* valid only for this incarnation (ABI 6) */
	__u32 penalty_ns[IOBRIDGE_KEYS_PER_LEG];	/* by iobridge_key_index() */
	__u32 hedge_us[IOBRIDGE_KEYS_PER_LEG];	/* hedge deadline per key, 0 = never (ABI 7) */
};

#define IOBRIDGE_DECISION_ENTRIES	(IOBRIDGE_MAX_TARGETS * IOBRIDGE_MAX_LEGS)

static inline __u32 iobridge_leg_index(__u32 target, __u32 leg)
{
	return target * IOBRIDGE_MAX_LEGS + leg;
}

/* 0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, 8-15 -> 4, 16 and more -> 5 */
static inline __u32 iobridge_inflight_bucket(__u32 inflight)
{
	if (inflight < 2)
		return inflight;
	if (inflight < 4)
		return 2;
	if (inflight < 8)
		return 3;
	if (inflight < 16)
		return 4;
	return 5;
}

/*
 * The latency the key buckets: the leg's newest completion latency over
 * (the bios ahead of it when it was submitted + 1), its time per read.
 * Under a deep queue each read also waits for the ones ahead of it, which
 * the cost's in-flight term already prices: per read, a loaded but healthy
 * leg stays in the low buckets (raw, two healthy legs at QD16 flipped
 * between buckets whose penalties differ by several reads of queue, and
 * reads herded onto one leg), while a leg in a slow period stays high.
 * The queue is the one that bio met, not the one now (ABI 3 divided by the
 * bios in flight now: a leg reads had moved away from kept a latency
 * earned behind 15 others over a queue of 1, looked slow, and stayed
 * avoided; learned IOPS were 0.74x the default's at QD16 on a busy host).
 * (Also taking the time since the newest completion while bios are in
 * flight was tried: under emulation a healthy leg's completion gaps are
 * noisy, and the slow leg got more reads while slow, not fewer.)
 */
static inline __u64 iobridge_key_latency(__u64 last_lat_ns, __u32 last_lat_qlen)
{
	return last_lat_ns / ((__u64)last_lat_qlen + 1);
}

/*
 * Which of a leg's two newest successful reads stands for its recent
 * latency (since ABI 5): the one with the lower latency per read
 * (latency / (bios ahead + 1), compared without dividing); the newest
 * while there is no previous one (prev_lat_ns == 0).  One read the host
 * delayed (an emulator stall) no longer makes a healthy leg look slow
 * until its probe, 32x the stall later, with every read meanwhile on the
 * other leg even in its slow period (1 ms legs at queue depth 1: 90 reads
 * on the slow leg while slow, VM); a leg turning slow is seen at its second
 * slow read.  Latencies below 2^48 ns and queues below 2^16 (the module
 * saturates both) keep the products in 64 bits.
 */
static inline int iobridge_use_previous(__u64 newest_lat_ns, __u32 newest_qlen,
					__u64 prev_lat_ns, __u32 prev_qlen)
{
	if (!prev_lat_ns)
		return 0;
	return prev_lat_ns * ((__u64)newest_qlen + 1) < newest_lat_ns * ((__u64)prev_qlen + 1);
}

/*
 * How long an avoided idle leg waits for a probe: probe_after_ns, and at
 * least IOBRIDGE_PROBE_LAT_MULT times its key latency (per read).  A probe of a
 * leg still slow costs its reader about that latency; waiting that many
 * times longer keeps probes of a slow leg to about 1/32 of the time (at
 * queue depth 1 with 20 ms slow periods, probes every probe_after_ns were
 * most of the slow leg's reads, and the p99 was theirs).  (Since ABI 4.)
 */
#define IOBRIDGE_PROBE_LAT_MULT		32

static inline __u64 iobridge_probe_wait_ns(__u64 probe_after_ns, __u64 last_lat_ns)
{
	__u64 w = last_lat_ns * IOBRIDGE_PROBE_LAT_MULT;

	return w > probe_after_ns ? w : probe_after_ns;
}

/*
 * A leg's expected completion time for one more read (since ABI 5): no
 * sooner than the reads queued ahead and this one drain, each taking the
 * leg's time per read now (its key latency, at least the typical service
 * time), and no sooner than its newest read took (a leg whose slow period
 * delays every read by itself, as dm-delay or a network hop does, is as
 * slow with one read as with eight: per read over a queue of 7, a 20 ms
 * leg looked like 2.5 ms); plus the key's penalty once (the risk that this
 * read meets a slow period, priced at a slow read).
 * - The queue at the live time per read: a leg in a slow period costs its
 *   slow time per read queued on it, so it does not take every read while
 *   another leg's newest read is a host stall (with the penalty alone, a
 *   leg idle after one read the host delayed cost as much as the slow leg
 *   with 3 reads queued, and the slow leg took every read until a probe:
 *   46-75 reads in 2 s, VM).
 * - The penalty once, not per read queued: at queue depth 16 the shipped
 *   model gives a healthy leg 1.5-4x its per-read time (a busy host's
 *   jitter) a penalty of 6-10 ms; times the queue (ABI 4) that cost more
 *   than an idle leg in a 20 ms slow period, which got the reads (VM, a
 *   host core busy: 1.2% of reads on the slow leg, p99 1.3x the default's).
 * Latencies are capped at 2^31 ns, so the product stays in 64 bits.
 */
static inline __u64 iobridge_leg_cost(__u32 inflight, __u32 service_ns, __u64 last_lat_ns,
				      __u64 key_lat_ns, __u64 penalty_ns)
{
	__u64 per_read = key_lat_ns > (1ULL << 31) ? (1ULL << 31) : key_lat_ns;
	__u64 newest = last_lat_ns > (1ULL << 31) ? (1ULL << 31) : last_lat_ns;
	__u64 queue;

	if (per_read < service_ns)
		per_read = service_ns;
	queue = ((__u64)inflight + 1) * per_read;
	return (queue > newest ? queue : newest) + penalty_ns;
}

/* The number of edges at or below lat_ns (edges ascending). */
static inline __u32 iobridge_lat_bucket(const __u32 *edges, __u64 lat_ns)
{
	__u32 b = 0, i;

	for (i = 0; i < IOBRIDGE_NUM_LAT_BUCKETS - 1; i++)
		if (lat_ns >= edges[i])
			b++;
	return b;
}

/*
 * The penalty of a key (since ABI 4).  The top latency bucket is open: its
 * penalty was priced for a read of top_lat_ns, and a leg whose key latency
 * is beyond that pays in proportion (a 20 ms slow period against a top
 * priced at 6 ms cost no more than a fast leg's host stall, and the slow
 * leg got reads).  The key latency is capped at 2^31 ns so that the
 * product stays in 64 bits; the result at IOBRIDGE_PENALTY_MAX_NS.
 */
static inline __u64 iobridge_key_penalty(__u32 penalty_ns, __u32 top_lat_ns,
					 __u32 lat_bucket, __u64 key_lat_ns)
{
	__u64 pen = penalty_ns;

	if (lat_bucket != IOBRIDGE_NUM_LAT_BUCKETS - 1 || !top_lat_ns ||
	    key_lat_ns <= top_lat_ns)
		return pen;
	if (key_lat_ns > (1ULL << 31))
		key_lat_ns = 1ULL << 31;
	pen = pen * key_lat_ns / top_lat_ns;
	return pen > IOBRIDGE_PENALTY_MAX_NS ? IOBRIDGE_PENALTY_MAX_NS : pen;
}

static inline __u32 iobridge_key_index(__u32 size_bucket, __u32 inflight_bucket,
				       __u32 lat_bucket)
{
	return (size_bucket * IOBRIDGE_NUM_INFLIGHT_BUCKETS + inflight_bucket) *
		IOBRIDGE_NUM_LAT_BUCKETS + lat_bucket;
}

/* ========================================================================
 * Observer: per-device statistics and per-I/O event records
 * (bpf/observer.bpf.c writes them; agent/observe.py reads them).
 * ======================================================================== */

/*
 * Latency histogram, log-linear in nanoseconds: values below
 * 2^IOBRIDGE_LAT_SUB_BITS get a slot each; above, every power of two is
 * split into 2^IOBRIDGE_LAT_SUB_BITS equal slots (12.5% wide at most), so
 * percentiles come out within one slot's width of the truth.
 */
#define IOBRIDGE_LAT_SUB_BITS		3
#define IOBRIDGE_LAT_SLOTS		320	/* covers up to ~2^40 ns (18 min) */

/* Operation of a request, from the block layer's rwbs / cmd_flags (the
 * trace format's "op" column uses the same codes). */
#define IOBRIDGE_OP_READ		0
#define IOBRIDGE_OP_WRITE		1
#define IOBRIDGE_OP_FLUSH		2
#define IOBRIDGE_OP_DISCARD		3
#define IOBRIDGE_OP_OTHER		4
#define IOBRIDGE_NUM_OPS		5

/*
 * Per-device counters, keyed by the kernel's dev_t encoding
 * (major << 20 | minor).  Only data requests (at least one sector) count.
 */
struct iobridge_dev_stats {
	__u64 issued;				/* requests issued to the driver */
	__u64 completed;			/* requests completed (any outcome) */
	__s64 inflight;				/* issued and not yet completed */
	__u64 errors;				/* completed with an error */
	__u64 ios[IOBRIDGE_NUM_OPS];		/* completed, per operation */
	__u64 bytes[IOBRIDGE_NUM_OPS];		/* completed bytes, per operation */
	__u64 lat_sum_ns;			/* sum of issue->completion times */
	__u64 lat_hist[IOBRIDGE_LAT_SLOTS];	/* issue->completion, ns */
};

/*
 * One completed I/O, streamed through a ring buffer when asked for.  Two
 * levels: a request at a request-based device (issue = driver issue), or
 * a bio at a tracked leg device (issue = bio queued; since ABI 2), which
 * also covers stacked devices such as dm and is what the leg feature
 * state below is made of.
 */
#define IOBRIDGE_EVENT_REQUEST		0
#define IOBRIDGE_EVENT_LEG_BIO		1

struct iobridge_io_event {
	__u64 issue_ns;				/* ktime_get_ns() at issue */
	__u64 complete_ns;			/* ktime_get_ns() at completion */
	__u64 sector;				/* first sector, 512-byte units */
	__u32 dev;				/* dev_t, major << 20 | minor */
	__u32 bytes;
	__u32 queue_len;			/* in flight on dev at issue, this one excluded */
	__s32 leg;				/* iobridge leg, or -1 */
	__u8 op;				/* IOBRIDGE_OP_* */
	__u8 error;				/* 1 if completed with an error */
	__u8 level;				/* IOBRIDGE_EVENT_* */
	__u8 pad[5];
};

/* Observer settings, element 0 of a one-entry array written by the agent. */
#define IOBRIDGE_STREAM_REQUESTS	1	/* request-level events */
#define IOBRIDGE_STREAM_LEG_BIOS	2	/* bio-level events of tracked legs */

struct iobridge_observer_config {
	__u32 filter_dev;			/* request level: 0 = all devices, else this dev_t */
	__u32 stream_events;			/* IOBRIDGE_STREAM_* bits */
};

/* ========================================================================
 * Leg feature state (since ABI 2): the admission model's inputs per leg
 * device, kept by bpf/observer.bpf.c at bio level (block_bio_queue /
 * block_bio_complete, so stacked legs such as dm devices are seen too) and
 * read by the agent through mmap of a BPF_F_MMAPABLE array, one slot per
 * leg device.  The agent assigns slots (leg_slots hash: dev_t -> slot).
 *
 * Consistency: seq is a sequence counter.  A BPF writer takes the record
 * by moving seq from even to odd with an atomic compare-and-exchange (if it
 * is odd or the exchange fails, another CPU is writing: the update is
 * skipped and counted in `contended`), writes the history, then makes seq
 * even again with an atomic add.  A reader copies the record between two
 * reads of seq and retries while seq was odd or changed.  The counters
 * outside the history (inflight, issued, completed, contended) are atomic
 * on their own and need no seq.
 * ======================================================================== */
#define IOBRIDGE_HISTORY		3
#define IOBRIDGE_MAX_LEG_SLOTS		(IOBRIDGE_MAX_TARGETS * IOBRIDGE_MAX_LEGS)

struct iobridge_leg_features {
	__u32 seq;				/* odd while a writer updates the history */
	__u32 dev;				/* dev_t tracked here, 0 = free slot */
	__s64 inflight;				/* bios queued and not yet completed */
	__u64 issued;				/* bios queued */
	__u64 completed;			/* bios completed (any outcome) */
	__u64 contended;			/* history updates skipped (record busy) */
	/* history, under seq; index 0 is the newest */
	__u64 last_complete_ns;			/* ktime_get_ns() of the newest completion */
	__u64 prev_lat_ns[IOBRIDGE_HISTORY];	/* queue -> completion of the last completions */
	__u32 prev_bytes[IOBRIDGE_HISTORY];	/* their sizes */
	__u32 prev_qlen[IOBRIDGE_HISTORY];	/* in flight at queue time of the last queued bios */
	/* in flight at queue time of the bios of prev_lat_ns (since ABI 4):
	 * the agent's per-read service estimate is latency / (this + 1) */
	__u32 prev_lat_qlen[IOBRIDGE_HISTORY];
	__u32 pad;
};

/* ========================================================================
 * Agent liveness (since ABI 2): element 0 of a one-entry BPF_F_MMAPABLE
 * array next to the decision table, written by the agent every tick.  The
 * routing program ignores the whole table while the heartbeat is older than
 * max_silence_ns (defence in depth on top of each entry's expiry) and
 * records the age of the table at each routing it makes.
 * ======================================================================== */
struct iobridge_agent_state {
	__u64 heartbeat_ns;			/* ktime_get_ns() of the agent's last tick */
	__u64 published_ns;			/* when the current table was computed */
	__u64 max_silence_ns;			/* 0 = no heartbeat check */
	__u64 ticks;				/* ticks since the agent started */
	__u32 pid;				/* the agent's process id */
	__u32 pad;
};

/* Routing program counters (per CPU): calls = routed + fallback. */
struct iobridge_route_stats {
	__u64 routed;				/* the table chose the leg */
	__u64 fallback;				/* left to the module default */
	__u64 silent;				/* of fallback: heartbeat too old */
	__u64 probes;				/* of routed: probes of an idle leg */
};

#endif /* _IOBRIDGE_ABI_H */
