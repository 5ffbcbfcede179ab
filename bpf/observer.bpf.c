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
 * Two probe sets on the same request hooks, chosen by the loader
 * (agent/observe.py); a request is keyed by its address in both:
 *   default            raw tracepoints block_rq_issue / block_rq_complete;
 *   IOBRIDGE_KPROBES   kprobes on blk_mq_start_request / blk_update_request
 *                      for kernels without those tracepoints.
 * Raw tracepoints first, because the kernel skips a kprobe or classic
 * tracepoint program that fires while another such program runs on the same
 * CPU: a completion interrupt arriving during the issue probe would be lost
 * (seen with null_blk timer completions at queue depth 8: in-flight drifted
 * up and completions went missing). Raw tracepoint programs are only
 * skipped when the same program re-enters.
 * Only data requests (at least one byte) are counted: flushes and
 * passthrough commands carry no sector range to time.
 */
#include <uapi/linux/ptrace.h>
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include "iobridge_abi.h"

struct start_key {
	u64 rq;		/* struct request * */
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

/*
 * Request fields are read with explicit probe reads: BCC rewrites pointer
 * walks only for pointers it can trace to the probe's arguments, which
 * the raw tracepoint's untyped args are not.
 */
#define READ_KERNEL(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), &(src))

static __always_inline u32 rq_dev(struct request *rq)
{
	struct request_queue *q = NULL;
	struct gendisk *disk = NULL;
	int major = 0, first_minor = 0;

	READ_KERNEL(q, rq->q);
	if (!q)
		return 0;
	READ_KERNEL(disk, q->disk);
	if (!disk)
		return 0;
	READ_KERNEL(major, disk->major);
	READ_KERNEL(first_minor, disk->first_minor);
	return (major << 20) | first_minor;
}

static __always_inline u8 rq_op(u32 cmd_flags)
{
	switch (cmd_flags & REQ_OP_MASK) {
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

static __always_inline void rq_issued(struct request *rq)
{
	struct start_key key = {.rq = (u64)rq};
	u32 dev = rq_dev(rq);
	u32 bytes = 0, cmd_flags = 0;

	READ_KERNEL(bytes, rq->__data_len);
	READ_KERNEL(cmd_flags, rq->cmd_flags);
	if (bytes == 0 || dev == 0 || !wanted(dev))
		return;
	on_issue(&key, dev, bytes, rq_op(cmd_flags));
}

static __always_inline void rq_completed(struct request *rq, int error)
{
	struct start_key key = {.rq = (u64)rq};
	u32 dev = rq_dev(rq);
	u64 sector = 0;

	if (dev == 0 || !wanted(dev))
		return;
	READ_KERNEL(sector, rq->__sector);
	on_complete(&key, dev, sector, error);
}

#ifndef IOBRIDGE_KPROBES

RAW_TRACEPOINT_PROBE(block_rq_issue)
{
	rq_issued((struct request *)ctx->args[0]);
	return 0;
}

/* TP_PROTO(struct request *rq, blk_status_t error, unsigned int nr_bytes) */
RAW_TRACEPOINT_PROBE(block_rq_complete)
{
	rq_completed((struct request *)ctx->args[0], (int)ctx->args[1]);
	return 0;
}

#else /* IOBRIDGE_KPROBES */

int kprobe__blk_mq_start_request(struct pt_regs *ctx, struct request *rq)
{
	rq_issued(rq);
	return 0;
}

/* Every completion path (single and batched) goes through blk_update_request. */
int kprobe__blk_update_request(struct pt_regs *ctx, struct request *rq, u8 error)
{
	rq_completed(rq, error);
	return 0;
}

#endif /* IOBRIDGE_KPROBES */
