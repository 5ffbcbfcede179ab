// SPDX-License-Identifier: GPL-2.0
/*
 * iobridge block observer (BCC).
 *
 * Keeps per-device counters and a latency histogram in BPF maps, updated at
 * each request issue and completion, and optionally streams one
 * iobridge_io_event per completed request through a ring buffer (dropped
 * records are counted here, in the kernel).  The structures are defined
 * once, in kmodule/iobridge_abi.h.
 *
 * Two probe sets, chosen by the loader (agent/observe.py):
 *   default            block:block_rq_issue / block:block_rq_complete
 *                      tracepoints; a request is keyed by (dev, sector);
 *   IOBRIDGE_KPROBES   kprobes on blk_mq_start_request / blk_update_request
 *                      for kernels without those tracepoints; a request is
 *                      keyed by its address.
 * Only data requests (at least one sector) are counted: flushes and
 * passthrough commands carry no sector range to time.
 */
#include <uapi/linux/ptrace.h>
#ifdef IOBRIDGE_KPROBES
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#endif
#include "iobridge_abi.h"

struct start_key {
#ifdef IOBRIDGE_KPROBES
	u64 rq;
#else
	u32 dev;
	u32 pad;
	u64 sector;
#endif
};

struct start_val {
	u64 ts;
	u32 queue_len;
	u32 bytes;
	u8 op;
};

BPF_HASH(starts, struct start_key, struct start_val, 16384);
BPF_HASH(stats, u32, struct iobridge_dev_stats, 256);
BPF_ARRAY(config, struct iobridge_observer_config, 1);
BPF_PERCPU_ARRAY(dropped, u64, 1);	/* events lost: ring buffer full */
BPF_PERCPU_ARRAY(missed_starts, u64, 1);	/* completions without an issue */
/* A zeroed record to insert from: too large for the 512-byte BPF stack. */
BPF_PERCPU_ARRAY(zero_stats, struct iobridge_dev_stats, 1);
BPF_RINGBUF_OUTPUT(events, IOBRIDGE_RINGBUF_PAGES);

static __always_inline u32 lat_slot(u64 ns)
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

static __always_inline int wanted(u32 dev)
{
	u32 zero = 0;
	struct iobridge_observer_config *cfg = config.lookup(&zero);

	return !cfg || cfg->filter_dev == 0 || cfg->filter_dev == dev;
}

static __always_inline int stream_on(void)
{
	u32 zero = 0;
	struct iobridge_observer_config *cfg = config.lookup(&zero);

	return cfg && cfg->stream_events;
}

static __always_inline struct iobridge_dev_stats *dev_stats(u32 dev)
{
	struct iobridge_dev_stats *s = stats.lookup(&dev), *zero;
	u32 idx = 0;

	if (s)
		return s;
	zero = zero_stats.lookup(&idx);
	if (!zero)
		return NULL;
	stats.insert(&dev, zero);	/* fails harmlessly if a racer won */
	return stats.lookup(&dev);
}

static __always_inline void on_issue(struct start_key *key, u32 dev, u32 bytes, u8 op)
{
	struct iobridge_dev_stats *s = dev_stats(dev);
	struct start_val v = {};

	if (!s)
		return;
	v.ts = bpf_ktime_get_ns();
	v.queue_len = (u32)s->inflight;
	v.bytes = bytes;
	v.op = op;
	/* A requeued request is issued again: time it from the last issue. */
	if (starts.lookup(key) == NULL) {
		__sync_fetch_and_add(&s->issued, 1);
		__sync_fetch_and_add(&s->inflight, 1);
	}
	starts.update(key, &v);
}

static __always_inline void on_complete(struct start_key *key, u32 dev, u64 sector, int error)
{
	struct iobridge_dev_stats *s = dev_stats(dev);
	struct start_val *v = starts.lookup(key);
	u32 zero = 0;

	if (!s)
		return;
	if (!v) {
		/* Issued before we attached, or not a data request we saw. */
		u64 *m = missed_starts.lookup(&zero);
		if (m)
			(*m)++;
		return;
	}
	u64 now = bpf_ktime_get_ns();
	u64 lat = now - v->ts;
	u32 op = v->op < IOBRIDGE_NUM_OPS ? v->op : IOBRIDGE_OP_OTHER;
	u32 slot = lat_slot(lat);

	__sync_fetch_and_add(&s->completed, 1);
	__sync_fetch_and_add(&s->inflight, -1);
	if (error)
		__sync_fetch_and_add(&s->errors, 1);
	if (op < IOBRIDGE_NUM_OPS) {
		__sync_fetch_and_add(&s->ios[op], 1);
		__sync_fetch_and_add(&s->bytes[op], v->bytes);
	}
	__sync_fetch_and_add(&s->lat_sum_ns, lat);
	/* Keep the bounds check: the compiler knows lat_slot() < SLOTS and
	 * would drop it, but the verifier needs to see it. */
	asm volatile("" : "+r"(slot));
	if (slot < IOBRIDGE_LAT_SLOTS)
		__sync_fetch_and_add(&s->lat_hist[slot], 1);

	if (stream_on()) {
		struct iobridge_io_event *e = events.ringbuf_reserve(sizeof(*e));
		if (!e) {
			u64 *d = dropped.lookup(&zero);
			if (d)
				(*d)++;
		} else {
			e->issue_ns = v->ts;
			e->complete_ns = now;
			e->sector = sector;
			e->dev = dev;
			e->bytes = v->bytes;
			e->queue_len = v->queue_len;
			e->leg = -1;
			e->op = op;
			e->error = error ? 1 : 0;
			events.ringbuf_submit(e, 0);
		}
	}
	starts.delete(key);
}

#ifndef IOBRIDGE_KPROBES

static __always_inline u8 rwbs_op(const char *rwbs)
{
	/* rwbs: optional F (preflush), then R, W, D, E or N, then modifiers. */
	char c0 = rwbs[0], c1 = rwbs[1];
	char c = c0 == 'F' ? c1 : c0;

	if (c0 == 'F' && (c1 == 0 || c1 == 'N'))
		return IOBRIDGE_OP_FLUSH;
	if (c == 'R')
		return IOBRIDGE_OP_READ;
	if (c == 'W')
		return IOBRIDGE_OP_WRITE;
	if (c == 'D')
		return IOBRIDGE_OP_DISCARD;
	return IOBRIDGE_OP_OTHER;
}

TRACEPOINT_PROBE(block, block_rq_issue)
{
	struct start_key key = {};
	u32 dev = args->dev;

	if (args->nr_sector == 0 || !wanted(dev))
		return 0;
	key.dev = dev;
	key.sector = args->sector;
	on_issue(&key, dev, args->nr_sector << 9, rwbs_op(args->rwbs));
	return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
	struct start_key key = {};
	u32 dev = args->dev;

	if (args->nr_sector == 0 || !wanted(dev))
		return 0;
	key.dev = dev;
	key.sector = args->sector;
	on_complete(&key, dev, args->sector, args->error);
	return 0;
}

#else /* IOBRIDGE_KPROBES */

static __always_inline u32 rq_dev(struct request *rq)
{
	struct gendisk *disk = rq->q->disk;

	if (!disk)
		return 0;
	return (disk->major << 20) | disk->first_minor;
}

static __always_inline u8 rq_op(struct request *rq)
{
	switch (rq->cmd_flags & REQ_OP_MASK) {
	case REQ_OP_READ:
		return IOBRIDGE_OP_READ;
	case REQ_OP_WRITE:
		return IOBRIDGE_OP_WRITE;
	case REQ_OP_FLUSH:
		return IOBRIDGE_OP_FLUSH;
	case REQ_OP_DISCARD:
		return IOBRIDGE_OP_DISCARD;
	}
	return IOBRIDGE_OP_OTHER;
}

int kprobe__blk_mq_start_request(struct pt_regs *ctx, struct request *rq)
{
	struct start_key key = {.rq = (u64)rq};
	u32 dev = rq_dev(rq);

	if (rq->__data_len == 0 || dev == 0 || !wanted(dev))
		return 0;
	on_issue(&key, dev, rq->__data_len, rq_op(rq));
	return 0;
}

/* Every completion path (single and batched) goes through blk_update_request. */
int kprobe__blk_update_request(struct pt_regs *ctx, struct request *rq, u8 error,
			       unsigned int nr_bytes)
{
	struct start_key key = {.rq = (u64)rq};
	u32 dev = rq_dev(rq);

	if (dev == 0 || !wanted(dev))
		return 0;
	on_complete(&key, dev, rq->__sector, error);
	return 0;
}

#endif /* IOBRIDGE_KPROBES */
