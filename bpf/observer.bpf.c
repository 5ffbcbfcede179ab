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
 *
 * Leg feature state (ABI 2, struct iobridge_leg_features): per leg device
 * the agent assigned a slot to, kept at bio level from the raw tracepoints
 * block_bio_queue / block_bio_complete, which fire once per bio at every
 * layer, so bio-based legs (dm devices) are seen as well as request-based
 * ones.  Completion has two sources: for the bios of a request the kernel
 * clears BIO_TRACE_COMPLETION in blk_update_request() ("already traced" by
 * block_rq_complete), so block_bio_complete never fires for them and they
 * are completed here from block_rq_complete instead, by walking rq->bio;
 * bio-based devices (and bios ended before becoming a request) do get
 * block_bio_complete.  Tracepoint variant only: the kprobe fallback has no
 * bio hooks.
 */
#include <uapi/linux/ptrace.h>
#include "iobridge_bpf.h"
#include "kernel_layout.h"

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

static __always_inline int wanted(u32 dev)
{
	u32 zero = 0;
	struct iobridge_observer_config *cfg = config.lookup(&zero);

	return !cfg || cfg->filter_dev == 0 || cfg->filter_dev == dev;
}

/* Which event levels to stream (IOBRIDGE_STREAM_* bits). */
static __always_inline u32 streaming(void)
{
	u32 zero = 0;
	struct iobridge_observer_config *cfg = config.lookup(&zero);

	return cfg ? cfg->stream_events : 0;
}

/* Reserve an event record, counting it as dropped when the ring is full. */
static __always_inline struct iobridge_io_event *event_reserve(void)
{
	struct iobridge_io_event *e = events.ringbuf_reserve(sizeof(*e));
	u32 zero = 0;

	if (!e) {
		u64 *d = dropped.lookup(&zero);
		if (d)
			(*d)++;
	}
	return e;
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
	u32 slot = iobridge_lat_slot(lat);

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

	if (streaming() & IOBRIDGE_STREAM_REQUESTS) {
		struct iobridge_io_event *e = event_reserve();
		if (e) {
			e->issue_ns = v->ts;
			e->complete_ns = now;
			e->sector = sector;
			e->dev = dev;
			e->bytes = v->bytes;
			e->queue_len = v->queue_len;
			e->leg = -1;
			e->op = op;
			e->error = error ? 1 : 0;
			e->level = IOBRIDGE_EVENT_REQUEST;
			events.ringbuf_submit(e, 0);
		}
	}
	starts.delete(key);
}

/*
 * Kernel objects (struct request, bio, ...) are opaque pointers here, read
 * field by field with KREAD (bpf/kernel_layout.h): no kernel headers.
 */
static __always_inline u32 rq_dev(void *rq)
{
	void *q = NULL, *disk = NULL;
	int major = 0, first_minor = 0;

	KREAD(q, rq, request_q);
	if (!q)
		return 0;
	KREAD(disk, q, request_queue_disk);
	if (!disk)
		return 0;
	KREAD(major, disk, gendisk_major);
	KREAD(first_minor, disk, gendisk_first_minor);
	return (major << 20) | first_minor;
}

static __always_inline u8 rq_op(u32 cmd_flags)
{
	switch (cmd_flags & KERNEL_REQ_OP_MASK) {
	case KERNEL_REQ_OP_READ:
		return IOBRIDGE_OP_READ;
	case KERNEL_REQ_OP_WRITE:
		return IOBRIDGE_OP_WRITE;
	case KERNEL_REQ_OP_FLUSH:
		return IOBRIDGE_OP_FLUSH;
	case KERNEL_REQ_OP_DISCARD:
		return IOBRIDGE_OP_DISCARD;
	}
	return IOBRIDGE_OP_OTHER;
}

static __always_inline void rq_issued(void *rq)
{
	struct start_key key = {.rq = (u64)rq};
	u32 dev = rq_dev(rq);
	u32 bytes = 0, cmd_flags = 0;

	KREAD(bytes, rq, request_data_len);
	KREAD(cmd_flags, rq, request_cmd_flags);
	if (bytes == 0 || dev == 0 || !wanted(dev))
		return;
	on_issue(&key, dev, bytes, rq_op(cmd_flags));
}

static __always_inline void rq_completed(void *rq, int error)
{
	struct start_key key = {.rq = (u64)rq};
	u32 dev = rq_dev(rq);
	u64 sector = 0;

	if (dev == 0 || !wanted(dev))
		return;
	KREAD(sector, rq, request_sector);
	on_complete(&key, dev, sector, error);
}

/* ------------------------------------------------ leg feature state */

struct bio_start {
	u64 ts;
	u64 sector;	/* for the event stream */
	u32 dev;
	u32 slot;
	u32 bytes;
	u32 qlen;	/* in flight at queue time, this one excluded */
	u8 op;
};

/* kernel dev_t (major << 20 | minor) -> slot in leg_features; agent-written */
BPF_HASH(leg_slots, u32, u32, IOBRIDGE_MAX_LEG_SLOTS);
BPF_F_TABLE("array", u32, struct iobridge_leg_features, leg_features,
	    IOBRIDGE_MAX_LEG_SLOTS, BPF_F_MMAPABLE);
BPF_HASH(bio_starts, u64, struct bio_start, 16384);	/* struct bio * -> start */
BPF_PERCPU_ARRAY(leg_dropped, u64, 1);	/* bios not tracked: bio_starts full */
/* Requests with more bios than one completion walk covers (their tail bios
 * stay counted in flight). */
BPF_PERCPU_ARRAY(leg_walk_overflow, u64, 1);
/* Element 0: number of devices in leg_slots, set by the agent, so that
 * request completions skip the bio walk while no leg is tracked. */
BPF_ARRAY(leg_tracking, u32, 1);

#define LEG_RQ_MAX_BIOS 256	/* a 1 MiB request of 4 KiB bios */

/*
 * Take the record's history for writing (seq even -> odd), or count the
 * update as contended and skip it.  BCC generates code for BPF cpu v1 (no
 * ALU32), where LLVM has no 32-bit compare-and-exchange, only the 64-bit
 * one; seq and dev share the record's first aligned 64-bit word, so the
 * exchange is done on that word: an even seq plus one never carries into
 * dev, and an agent rewriting dev at that moment only makes it fail.
 */
static __always_inline int leg_lock(struct iobridge_leg_features *f)
{
	u64 *word = (u64 *)&f->seq;
	u64 s = *(volatile u64 *)word;

	if ((s & 1) || __sync_val_compare_and_swap(word, s, s + 1) != s) {
		__sync_fetch_and_add(&f->contended, 1);
		return 0;
	}
	return 1;
}

/* A 32-bit add: odd seq + 1 must wrap within seq, never carry into dev. */
static __always_inline void leg_unlock(struct iobridge_leg_features *f)
{
	__sync_fetch_and_add(&f->seq, 1);
}

static __always_inline int data_bio(u32 opf)
{
	u32 op = opf & KERNEL_REQ_OP_MASK;

	return op == KERNEL_REQ_OP_READ || op == KERNEL_REQ_OP_WRITE;
}

static __always_inline void leg_bio_queued(void *bio)
{
	void *bdev = NULL;
	u32 dev = 0, bytes = 0, opf = 0;

	KREAD(bdev, bio, bio_bdev);
	if (!bdev)
		return;
	KREAD(dev, bdev, block_device_dev);
	u32 *slot = leg_slots.lookup(&dev);
	if (!slot)
		return;
	KREAD(bytes, bio, bio_size);
	KREAD(opf, bio, bio_opf);
	if (bytes == 0 || !data_bio(opf))
		return;
	u64 sector = 0;
	KREAD(sector, bio, bio_sector);
	u32 idx = *slot;
	struct iobridge_leg_features *f = leg_features.lookup(&idx);
	/* The agent writes dev before it publishes the slot: a mismatch is a
	 * slot being freed or reassigned right now. */
	if (!f || f->dev != dev)
		return;

	u64 key = (u64)bio;
	struct bio_start st = {.ts = bpf_ktime_get_ns(), .sector = sector, .dev = dev,
			       .slot = idx, .bytes = bytes, .op = rq_op(opf)};
	s64 before = __sync_fetch_and_add(&f->inflight, 1);

	st.qlen = before > 0 ? (u32)before : 0;
	/* Count only what the completion can find again: a bio without a start
	 * record would stay in flight for ever. */
	if (bio_starts.update(&key, &st) != 0) {
		u32 zero = 0;
		u64 *d = leg_dropped.lookup(&zero);

		__sync_fetch_and_add(&f->inflight, -1);
		if (d)
			__sync_fetch_and_add(d, 1);
		return;
	}
	__sync_fetch_and_add(&f->issued, 1);
	if (!leg_lock(f))
		return;
	f->prev_qlen[2] = f->prev_qlen[1];
	f->prev_qlen[1] = f->prev_qlen[0];
	f->prev_qlen[0] = st.qlen;
	leg_unlock(f);
}

static __always_inline void leg_bio_done(u64 key, int error)
{
	struct bio_start *sp = bio_starts.lookup(&key);

	if (!sp)
		return;		/* not a tracked leg, or queued before we attached */
	struct bio_start st = *sp;
	bio_starts.delete(&key);

	struct iobridge_leg_features *f = leg_features.lookup(&st.slot);
	if (!f || f->dev != st.dev)
		return;		/* the slot was freed or reassigned meanwhile */
	u64 now = bpf_ktime_get_ns();

	__sync_fetch_and_add(&f->inflight, -1);
	__sync_fetch_and_add(&f->completed, 1);
	if (!leg_lock(f))
		return;
	f->prev_lat_ns[2] = f->prev_lat_ns[1];
	f->prev_lat_ns[1] = f->prev_lat_ns[0];
	f->prev_lat_ns[0] = now - st.ts;
	f->prev_bytes[2] = f->prev_bytes[1];
	f->prev_bytes[1] = f->prev_bytes[0];
	f->prev_bytes[0] = st.bytes;
	f->prev_lat_qlen[2] = f->prev_lat_qlen[1];
	f->prev_lat_qlen[1] = f->prev_lat_qlen[0];
	f->prev_lat_qlen[0] = st.qlen;
	f->last_complete_ns = now;
	leg_unlock(f);

	if (streaming() & IOBRIDGE_STREAM_LEG_BIOS) {
		struct iobridge_io_event *e = event_reserve();
		if (e) {
			e->issue_ns = st.ts;
			e->complete_ns = now;
			e->sector = st.sector;
			e->dev = st.dev;
			e->bytes = st.bytes;
			e->queue_len = st.qlen;
			e->leg = -1;
			e->op = st.op;
			e->error = error ? 1 : 0;
			e->level = IOBRIDGE_EVENT_LEG_BIO;
			events.ringbuf_submit(e, 0);
		}
	}
}

static __always_inline void leg_bio_completed(void *bio)
{
	u8 status = 0;

	KREAD(status, bio, bio_status);
	leg_bio_done((u64)bio, status);
}

/* The bios that this update of `rq` ends: the leading ones that nr_bytes
 * covers whole (a partial completion ends the rest at a later update). */
static __always_inline void leg_rq_completed(void *rq, int error, u32 nr_bytes)
{
	u32 zero = 0;
	u32 *tracking = leg_tracking.lookup(&zero);
	void *bio = NULL;

	if (!tracking || *tracking == 0)
		return;
	KREAD(bio, rq, request_bio);
	for (int i = 0; i < LEG_RQ_MAX_BIOS; i++) {
		void *next = NULL;
		u32 size = 0;

		if (!bio)
			return;
		KREAD(size, bio, bio_size);
		if (size > nr_bytes)
			return;
		nr_bytes -= size;
		KREAD(next, bio, bio_next);
		leg_bio_done((u64)bio, error);
		bio = next;
	}
	if (bio && nr_bytes) {
		u64 *o = leg_walk_overflow.lookup(&zero);
		if (o)
			__sync_fetch_and_add(o, 1);
	}
}

#ifndef IOBRIDGE_KPROBES

/* TP_PROTO(struct bio *bio); fires once per bio (BIO_TRACE_COMPLETION). */
RAW_TRACEPOINT_PROBE(block_bio_queue)
{
	leg_bio_queued((void *)ctx->args[0]);
	return 0;
}

/* TP_PROTO(struct request_queue *q, struct bio *bio) */
RAW_TRACEPOINT_PROBE(block_bio_complete)
{
	leg_bio_completed((void *)ctx->args[1]);
	return 0;
}

RAW_TRACEPOINT_PROBE(block_rq_issue)
{
	rq_issued((void *)ctx->args[0]);
	return 0;
}

/* TP_PROTO(struct request *rq, blk_status_t error, unsigned int nr_bytes) */
RAW_TRACEPOINT_PROBE(block_rq_complete)
{
	void *rq = (void *)ctx->args[0];

	rq_completed(rq, (int)ctx->args[1]);
	leg_rq_completed(rq, (int)ctx->args[1], (u32)ctx->args[2]);
	return 0;
}

#else /* IOBRIDGE_KPROBES */

/* void blk_mq_start_request(struct request *rq) */
int kprobe__blk_mq_start_request(struct pt_regs *ctx)
{
	rq_issued((void *)PT_REGS_PARM1(ctx));
	return 0;
}

/* Every completion path (single and batched) goes through blk_update_request. */
/* bool blk_update_request(struct request *rq, blk_status_t error, unsigned int nr_bytes) */
int kprobe__blk_update_request(struct pt_regs *ctx)
{
	rq_completed((void *)PT_REGS_PARM1(ctx), (u8)PT_REGS_PARM2(ctx));
	return 0;
}

#endif /* IOBRIDGE_KPROBES */
