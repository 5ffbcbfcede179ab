// SPDX-License-Identifier: GPL-2.0-only
/*
 * dm-iobridge: a device-mapper target over 2..8 replica legs.
 *
 * Reads go to one leg, chosen by a BPF program attached to the writable
 * tracepoint "iobridge_route" or by the built-in default policy.  Writes go
 * to every leg that is not stale, flushes, discards and write-zeroes to
 * every leg.  A failed read is retried on another healthy leg; a leg that
 * keeps failing is marked failed and stops serving reads.  A read with a
 * hedge deadline (from the routing program or the hedge_us option) that is
 * still pending at its deadline gets one more read on another leg, within
 * a budget of extra reads ("Hedged reads" in iobridge_abi.h).
 *
 * Table: <nr_legs> <dev>... [<nr_opts> <opt>...]
 * See the iobridge README ("Device-mapper target") for the full contract.
 */
#include <linux/module.h>
#include <linux/device-mapper.h>
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/workqueue.h>
#include <linux/ktime.h>
#include <linux/mutex.h>
#include <linux/list.h>
#include <linux/spinlock.h>
#include <linux/sched.h>
#include <linux/hrtimer.h>
#include <linux/mempool.h>
#include <linux/wait.h>

#include "iobridge_abi.h"
#define CREATE_TRACE_POINTS
#include "iobridge_trace.h"

#define DM_MSG_PREFIX "iobridge"

#define IOB_DEFAULT_ERROR_THRESHOLD	3
#define IOB_MAX_ERROR_THRESHOLD		1000000
#define IOB_BENCH_MAX_CALLS		100000000
#define IOB_NO_LEG			0xff
#define IOB_WRITE_POOL			256
#define IOB_MAX_OPTS			16
/* Hedged reads: reads up to this size are hedge-eligible (both reads go to
 * bounce pages); larger ones are read directly and never hedged. */
#define IOB_HEDGE_MAX_PAGES		64
#define IOB_HEDGE_POOL			64	/* contexts and clones kept in reserve */
#define IOB_HEDGE_POOL_PAGES		IOB_HEDGE_MAX_PAGES
/* Bounce pages kept for reuse per target: a page from the allocator is
 * zeroed first (init_on_alloc), which cost more than the rest of a bounce
 * read under emulation. */
#define IOB_PAGE_CACHE			256
#define IOB_MAX_HEDGE_US		10000000	/* 10 s */
/* Request flags a bounce read keeps from the caller's read. */
#define IOB_READ_FLAGS	(REQ_SYNC | REQ_META | REQ_PRIO | REQ_RAHEAD | REQ_IDLE)

static int abi_version = IOBRIDGE_ABI_VERSION;
module_param(abi_version, int, 0444);
MODULE_PARM_DESC(abi_version, "Layout version of the shared structures (read-only)");

enum iob_policy {
	IOB_POLICY_LEAST_INFLIGHT,
	IOB_POLICY_ROUND_ROBIN,
	IOB_POLICY_PRIMARY,
	IOB_NR_POLICIES,
};

static const char *const iob_policy_names[IOB_NR_POLICIES] = {
	[IOB_POLICY_LEAST_INFLIGHT] = "least_inflight",
	[IOB_POLICY_ROUND_ROBIN] = "round_robin",
	[IOB_POLICY_PRIMARY] = "primary",
};

/* Leg state bits. */
#define IOB_LEG_FAILED	0	/* serves no reads */
#define IOB_LEG_STALE	1	/* missed a write: receives no I/O at all */

struct iob_leg {
	struct dm_dev *dev;
	unsigned long state;
	atomic_t inflight;
	atomic_t err_streak;		/* read errors since marked healthy */
	atomic64_t reads;
	atomic64_t writes;
	atomic64_t read_errors;
	atomic64_t write_errors;
	atomic64_t hook_routed;
	atomic64_t default_routed;
	/* Live latency state for the routing hook (ABI 5), data bios only. */
	atomic64_t lat_newest;		/* newest successful bio: iob_lat_pack(), 0 = none */
	atomic64_t lat_previous;	/* the one before it, 0 = none */
	atomic64_t last_complete_ns;	/* newest completion (any outcome), 0 = none */
};

struct iob_c {
	struct dm_target *ti;
	struct list_head list;		/* in iob_registry */
	struct mapped_device *md;
	u64 gen;			/* load order among tables */
	u32 incarnation;		/* the device's, kept across reloads: ABI 6 */
	bool registered;
	bool inherited;			/* leg state taken over at first resume */
	struct workqueue_struct *wq;
	struct work_struct event_work;
	struct bio_set bs;
	spinlock_t lock;		/* leg state transitions */
	u32 id;
	u32 nr_legs;
	u32 nr_healthy;			/* under lock */
	u32 error_threshold;
	int policy;
	bool strict_writes;
	atomic_t rr;
	atomic64_t retries;
	atomic64_t read_failures;	/* read errors returned to the caller */
	atomic64_t write_failures;	/* write errors returned to the caller */
	atomic64_t hook_rejected;	/* invalid choices from the BPF program */
	/* Hedged reads ("Hedged reads" in iobridge_abi.h) */
	u32 hedge_us;			/* the target's own deadline, 0 = the program's only */
	u32 hedge_budget_ppm;		/* extra reads, millionths of reads routed */
	atomic64_t hedge_tokens;	/* the budget's bucket, micro-tokens */
	atomic64_t hedges_issued;
	atomic64_t hedges_won;		/* the hedge completed the read */
	atomic64_t hedges_lost;		/* issued, and the first read completed it */
	atomic64_t hedges_refused;	/* due, but the bucket had no token */
	atomic64_t hedges_nomem;	/* no bounce memory: read unhedged, or hedge not sent */
	atomic_t hedge_active;		/* hedged reads alive (struct iob_hedge) */
	atomic_t bounce_pages;		/* bounce pages held by them */
	wait_queue_head_t hedge_wait;	/* for hedge_active to reach 0 */
	mempool_t *hedge_pool;		/* struct iob_hedge */
	mempool_t *page_pool;		/* bounce pages */
	spinlock_t page_lock;		/* page_cache, page_cached */
	struct list_head page_cache;	/* free bounce pages kept for reuse (page->lru) */
	unsigned int page_cached;
	struct bio_set hbs;		/* bounce reads, struct iob_hclone */
	struct workqueue_struct *hedge_wq;
	struct iob_leg legs[];
};

enum iob_kind {
	IOB_READ,
	IOB_WRITE,	/* data write, cloned per leg by us */
	IOB_DUP,	/* flush/discard/write-zeroes duplicated by dm core */
	IOB_HEDGED,	/* read through bounce pages, completed by struct iob_hedge */
};

/* Per-bio data of the dm clone. */
struct iob_io {
	struct iob_c *ic;
	u8 kind;
	u8 leg;
	u8 tried;			/* read: legs tried so far */
	u64 start_ns;			/* read: submitted to the current leg */
	u32 start_qlen;			/* read: bios ahead of it on that leg then */
	atomic_t pending;		/* write: leg clones outstanding + 1 */
	unsigned long ok_mask;		/* write: legs that succeeded */
	unsigned long err_mask;		/* write: legs that failed */
	blk_status_t status;		/* write: an error seen */
	/* read: what is needed to resubmit the bio to another leg */
	struct bvec_iter iter;
	unsigned short bi_flags;
	int remaining;
	bio_end_io_t *end_io;
	struct work_struct work;
};

/* One leg's copy of a data write. */
struct iob_wclone {
	struct iob_io *io;
	unsigned int leg;
	u64 start_ns;			/* submitted to the leg */
	u32 start_qlen;			/* bios ahead of it on the leg then */
	struct bio bio;			/* must be last (bioset front_pad) */
};

/*
 * A hedge-eligible read.  The caller's bio is never given to a leg: each
 * leg reads into its own bounce pages (struct iob_hclone), and the first
 * good completion copies its data into the caller's pages and completes
 * the caller's bio.  A read that completes later only ever touches its own
 * bounce pages, so it can never write into pages already returned.  This
 * outlives the caller's bio until every bounce read has ended; suspend and
 * table removal wait for that (iob_hedge_drain).
 */
struct iob_hedge {
	struct iob_c *ic;
	struct bio *orig;		/* the caller's read (dm's clone of it) */
	struct bvec_iter orig_iter;	/* its data, never advanced */
	sector_t sector;		/* on the legs */
	unsigned int size;
	spinlock_t lock;		/* everything below */
	unsigned int refs;		/* bounce reads in flight, armed timer, queued work */
	unsigned int inflight;		/* bounce reads in flight */
	unsigned long tried;		/* legs read from */
	blk_status_t error;		/* the newest read error */
	bool done;			/* the caller's bio is completed */
	bool due;			/* the deadline has passed */
	bool hedged;			/* the one hedge was tried (issued or refused) */
	bool hedge_issued;
	bool learned;			/* the deadline is the routing program's */
	u64 start_ns;			/* the first read's submission */
	struct hrtimer timer;		/* the deadline */
	struct work_struct work;	/* issues the hedge or a retry */
};

/* One leg's read of a hedged read, into bounce pages. */
struct iob_hclone {
	struct iob_hedge *h;
	unsigned int leg;
	bool is_hedge;
	u32 start_qlen;			/* bios ahead of it on the leg then */
	u64 start_ns;			/* submitted to the leg */
	struct bio bio;			/* must be last (bioset front_pad) */
};

/*
 * Live targets.  A table reload keeps the target id (the decision table
 * index) and the failed/stale state of legs that stay in the table.
 */
static DEFINE_MUTEX(iob_registry_lock);
static LIST_HEAD(iob_registry);
static unsigned int iob_id_refs[IOBRIDGE_MAX_TARGETS];
static u64 iob_gen;

/* The newest table loaded before @ic for the same device, or NULL. */
static struct iob_c *iob_find_older_locked(struct iob_c *ic)
{
	struct iob_c *o, *best = NULL;

	list_for_each_entry(o, &iob_registry, list)
		if (o != ic && o->md == ic->md && o->gen < ic->gen &&
		    (!best || o->gen > best->gen))
			best = o;
	return best;
}

static int iob_register(struct iob_c *ic)
{
	struct iob_c *older;
	int id = -1, i;

	mutex_lock(&iob_registry_lock);
	ic->gen = ++iob_gen;
	older = iob_find_older_locked(ic);
	if (older) {
		id = older->id;
		ic->incarnation = older->incarnation;
	} else {
		ic->incarnation = (u32)ic->gen;
		for (i = 0; i < IOBRIDGE_MAX_TARGETS; i++) {
			if (!iob_id_refs[i]) {
				id = i;
				break;
			}
		}
	}
	if (id >= 0) {
		iob_id_refs[id]++;
		ic->id = id;
		list_add(&ic->list, &iob_registry);
		ic->registered = true;
	}
	mutex_unlock(&iob_registry_lock);
	return id < 0 ? -ENOSPC : 0;
}

static void iob_unregister(struct iob_c *ic)
{
	if (!ic->registered)
		return;
	mutex_lock(&iob_registry_lock);
	list_del(&ic->list);
	iob_id_refs[ic->id]--;
	mutex_unlock(&iob_registry_lock);
	ic->registered = false;
}

static inline bool iob_leg_readable(struct iob_leg *leg)
{
	return !test_bit(IOB_LEG_FAILED, &leg->state);
}

/* Count a bio in flight on @leg; returns how many were ahead of it. */
static inline u32 iob_leg_submitting(struct iob_leg *leg)
{
	return (u32)(atomic_inc_return(&leg->inflight) - 1);
}

/*
 * A completion's latency and the bios ahead of it at submission, in one
 * 64-bit word so the hook reads them as a pair: latency in the high 48
 * bits (at least 1, so 0 means none; saturating at ~78 hours), the queue in
 * the low 16 (saturating at 65535).
 */
#define IOB_LAT_QLEN_BITS	16
#define IOB_LAT_MAX		((1ULL << (64 - IOB_LAT_QLEN_BITS)) - 1)

static inline u64 iob_lat_pack(u64 lat_ns, u32 qlen)
{
	lat_ns = clamp_t(u64, lat_ns, 1, IOB_LAT_MAX);
	return lat_ns << IOB_LAT_QLEN_BITS | min_t(u32, qlen, U16_MAX);
}

static inline u64 iob_lat_of(u64 packed)
{
	return packed >> IOB_LAT_QLEN_BITS;
}

static inline u32 iob_qlen_of(u64 packed)
{
	return packed & U16_MAX;
}

/*
 * A data bio submitted to @leg at @start_ns behind @start_qlen others
 * completed: keep the newest completion time and, if it succeeded, its
 * latency and queue as the newest (the one before becomes the previous),
 * for the routing hook, then drop the leg's in-flight count.
 * Lock-free: concurrent completions may interleave, the last store wins.
 * The stores are ordered before the decrement (paired with the smp_rmb()
 * in iob_hook()), so the hook never sees the leg idle with the completion
 * time of an older bio, which would let it probe a leg that just answered.
 */
static inline void iob_leg_completed(struct iob_leg *leg, u64 start_ns, u32 start_qlen,
				     bool ok)
{
	u64 now = ktime_get_ns();

	if (ok)
		atomic64_set(&leg->lat_previous,
			     atomic64_xchg(&leg->lat_newest,
					   iob_lat_pack(now > start_ns ? now - start_ns : 1,
							start_qlen)));
	atomic64_set(&leg->last_complete_ns, now);
	smp_mb__before_atomic();
	atomic_dec(&leg->inflight);
}

static const char *iob_name(struct iob_c *ic)
{
	return dm_table_device_name(ic->ti->table);
}

static void iob_event_work(struct work_struct *w)
{
	struct iob_c *ic = container_of(w, struct iob_c, event_work);

	dm_table_event(ic->ti->table);
}

/*
 * Mark a leg failed (and stale if it missed data).  Returns false when the
 * leg was the last readable one and @stale is false: the last readable leg
 * is never failed for read errors alone.
 */
static bool iob_fail_leg(struct iob_c *ic, unsigned int i, bool stale,
			 const char *why)
{
	struct iob_leg *leg = &ic->legs[i];
	unsigned long flags;
	bool changed = false, refused = false;

	spin_lock_irqsave(&ic->lock, flags);
	if (stale && !test_and_set_bit(IOB_LEG_STALE, &leg->state))
		changed = true;
	if (!test_bit(IOB_LEG_FAILED, &leg->state)) {
		if (!stale && ic->nr_healthy <= 1) {
			refused = true;
		} else {
			set_bit(IOB_LEG_FAILED, &leg->state);
			ic->nr_healthy--;
			changed = true;
		}
	}
	spin_unlock_irqrestore(&ic->lock, flags);

	if (refused) {
		DMERR_LIMIT("%s: leg %u (%s): %s, but it is the last healthy leg; keeping it",
			    iob_name(ic), i, leg->dev->name, why);
		return false;
	}
	if (changed) {
		DMERR("%s: leg %u (%s) marked %s: %s", iob_name(ic), i,
		      leg->dev->name, stale ? "failed and stale" : "failed", why);
		trace_iobridge_leg_state(ic->id, i, stale ? 'S' : 'F');
		queue_work(ic->wq, &ic->event_work);
	}
	return true;
}

/*
 * The completion the routing hook sees for @leg, packed (latency, queue):
 * of its two newest, the one iobridge_use_previous() picks (0: none yet).
 */
static u64 iob_leg_recent(struct iob_leg *leg)
{
	u64 lat = atomic64_read(&leg->lat_newest);
	u64 prev = atomic64_read(&leg->lat_previous);

	if (iobridge_use_previous(iob_lat_of(lat), iob_qlen_of(lat),
				  iob_lat_of(prev), iob_qlen_of(prev)))
		return prev;
	return lat;
}

/* Default policy: pick a readable leg not in @exclude, or -1. */
static int iob_default_leg(struct iob_c *ic, unsigned int exclude)
{
	unsigned int n = ic->nr_legs, start, k;
	int policy = READ_ONCE(ic->policy);
	int best = -1, best_load = INT_MAX;

	if (policy == IOB_POLICY_PRIMARY) {
		for (k = 0; k < n; k++)
			if (!(exclude & BIT(k)) && iob_leg_readable(&ic->legs[k]))
				return k;
		return -1;
	}

	start = (unsigned int)atomic_inc_return(&ic->rr) % n;
	for (k = 0; k < n; k++) {
		unsigned int i = (start + k) % n;
		int load;

		if ((exclude & BIT(i)) || !iob_leg_readable(&ic->legs[i]))
			continue;
		if (policy == IOB_POLICY_ROUND_ROBIN)
			return i;
		load = atomic_read(&ic->legs[i].inflight);
		if (load < best_load) {
			best = i;
			best_load = load;
		}
	}
	return best;
}

/*
 * Run the routing hook.  Returns the leg the BPF program chose if it is
 * valid, else -1; *hedge_us the deadline it gave that leg's read (0 =
 * none, and always 0 with -1).  Only called while a program is attached.
 */
static int iob_hook(struct iob_c *ic, sector_t sector, unsigned int bytes,
		    blk_opf_t opf, unsigned int exclude, u32 *hedge_us)
{
	struct iobridge_route_ctx ctx;
	unsigned int i;
	int chosen;

	memset(&ctx, 0, sizeof(ctx));
	ctx.abi_version = IOBRIDGE_ABI_VERSION;
	ctx.target_id = ic->id;
	ctx.target_incarnation = ic->incarnation;
	ctx.nr_legs = ic->nr_legs;
	ctx.bio_bytes = bytes;
	ctx.sector = sector;
	ctx.now_ns = ktime_get_ns();
	ctx.op_flags = (__force u32)opf;
	ctx.chosen_leg = IOBRIDGE_NO_LEG;
	for (i = 0; i < ic->nr_legs; i++) {
		ctx.inflight[i] = atomic_read(&ic->legs[i].inflight);
		ctx.healthy[i] = iob_leg_readable(&ic->legs[i]) && !(exclude & BIT(i));
	}
	smp_rmb();	/* pairs with iob_leg_completed() */
	for (i = 0; i < ic->nr_legs; i++) {
		u64 lat = iob_leg_recent(&ic->legs[i]);

		ctx.last_lat_ns[i] = iob_lat_of(lat);
		ctx.last_lat_qlen[i] = iob_qlen_of(lat);
		ctx.last_complete_ns[i] = atomic64_read(&ic->legs[i].last_complete_ns);
	}

	trace_iobridge_route(&ctx);

	*hedge_us = 0;
	chosen = READ_ONCE(ctx.chosen_leg);
	if (chosen == IOBRIDGE_NO_LEG)
		return -1;
	if (chosen < 0 || chosen >= (int)ic->nr_legs ||
	    (exclude & BIT(chosen)) || !iob_leg_readable(&ic->legs[chosen])) {
		atomic64_inc(&ic->hook_rejected);
		DMWARN_LIMIT("%s: routing program chose leg %d, which is out of range or not healthy; using the default policy",
			     iob_name(ic), chosen);
		return -1;
	}
	*hedge_us = min_t(u32, READ_ONCE(ctx.hedge_us), IOB_MAX_HEDGE_US);
	return chosen;
}

/*
 * A read (flags @opf) failed on leg @i: count it, and fail the leg at the
 * threshold.  A failed readahead does not count towards it (as in
 * dm-raid1): device-mapper fails readahead bios by design while a device is
 * suspended, so a dm leg being reloaded failed udev's probe reads (at the
 * device's start and end, after a writer closed it) and with them the leg.
 */
static void iob_read_failed(struct iob_c *ic, unsigned int i, blk_opf_t opf)
{
	struct iob_leg *leg = &ic->legs[i];

	atomic64_inc(&leg->read_errors);
	if (opf & REQ_RAHEAD)
		return;
	if ((u32)atomic_inc_return(&leg->err_streak) >= READ_ONCE(ic->error_threshold))
		iob_fail_leg(ic, i, false, "read error threshold reached");
}

/* ---------------------------------------------------------------------
 * Hedged reads
 * --------------------------------------------------------------------- */

/* A read was routed: it earns its credit in the budget's bucket. */
static void iob_budget_earn(struct iob_c *ic)
{
	const s64 cap = (s64)IOBRIDGE_HEDGE_BUCKET * IOBRIDGE_HEDGE_TOKEN;
	s64 credit = (s64)READ_ONCE(ic->hedge_budget_ppm) * (IOBRIDGE_HEDGE_TOKEN / 1000000);
	s64 old = atomic64_read(&ic->hedge_tokens), new;

	if (!credit)
		return;
	do {
		if (old >= cap)
			return;
		new = min(old + credit, cap);
	} while (!atomic64_try_cmpxchg(&ic->hedge_tokens, &old, new));
}

/* A hedge is due: take one token, or refuse (false). */
static bool iob_budget_take(struct iob_c *ic)
{
	s64 old = atomic64_read(&ic->hedge_tokens);

	do {
		if (old < IOBRIDGE_HEDGE_TOKEN)
			return false;
	} while (!atomic64_try_cmpxchg(&ic->hedge_tokens, &old, old - IOBRIDGE_HEDGE_TOKEN));
	return true;
}

static void iob_hedge_put(struct iob_hedge *h)
{
	struct iob_c *ic = h->ic;
	unsigned long flags;
	bool last;

	spin_lock_irqsave(&h->lock, flags);
	last = !--h->refs;
	spin_unlock_irqrestore(&h->lock, flags);
	if (!last)
		return;
	mempool_free(h, ic->hedge_pool);
	/* Under the wait queue's lock: iob_hedge_drain() takes it after it
	 * sees 0, so the target is not freed under this wake-up. */
	spin_lock_irqsave(&ic->hedge_wait.lock, flags);
	if (atomic_dec_and_test(&ic->hedge_active))
		wake_up_locked(&ic->hedge_wait);
	spin_unlock_irqrestore(&ic->hedge_wait.lock, flags);
}

/* Wait until no hedged read is alive: no bounce read is on any leg. */
static void iob_hedge_drain(struct iob_c *ic)
{
	wait_event(ic->hedge_wait, !atomic_read(&ic->hedge_active));
	spin_lock_irq(&ic->hedge_wait.lock);
	spin_unlock_irq(&ic->hedge_wait.lock);
}

/* Queue the hedge's work (the hedge, or a retry), with a reference. */
static void iob_hedge_kick(struct iob_hedge *h)
{
	unsigned long flags;

	spin_lock_irqsave(&h->lock, flags);
	h->refs++;
	spin_unlock_irqrestore(&h->lock, flags);
	if (!queue_work(h->ic->hedge_wq, &h->work))
		iob_hedge_put(h);	/* already queued, with its own reference */
}

/* A bounce page: a kept one, else from the pool (@gfp); counted while held. */
static struct page *iob_page_get(struct iob_c *ic, gfp_t gfp)
{
	struct page *page = NULL;
	unsigned long flags;

	spin_lock_irqsave(&ic->page_lock, flags);
	if (!list_empty(&ic->page_cache)) {
		page = list_first_entry(&ic->page_cache, struct page, lru);
		list_del(&page->lru);
		ic->page_cached--;
	}
	spin_unlock_irqrestore(&ic->page_lock, flags);
	if (!page)
		page = mempool_alloc(ic->page_pool, gfp);
	if (page)
		atomic_inc(&ic->bounce_pages);
	return page;
}

/* Its contents need no clearing: a bounce read overwrites the bytes that
 * are copied out of it. */
static void iob_page_put(struct iob_c *ic, struct page *page)
{
	unsigned long flags;

	atomic_dec(&ic->bounce_pages);
	spin_lock_irqsave(&ic->page_lock, flags);
	if (ic->page_cached < IOB_PAGE_CACHE) {
		list_add(&page->lru, &ic->page_cache);
		ic->page_cached++;
		page = NULL;
	}
	spin_unlock_irqrestore(&ic->page_lock, flags);
	if (page)
		mempool_free(page, ic->page_pool);
}

static void iob_page_cache_drain(struct iob_c *ic)
{
	struct page *page, *tmp;

	list_for_each_entry_safe(page, tmp, &ic->page_cache, lru) {
		list_del(&page->lru);
		mempool_free(page, ic->page_pool);
	}
	ic->page_cached = 0;
}

static void iob_hclone_free(struct iob_hclone *hc)
{
	struct iob_c *ic = hc->h->ic;
	unsigned short i;

	for (i = 0; i < hc->bio.bi_vcnt; i++)
		iob_page_put(ic, hc->bio.bi_io_vec[i].bv_page);
	bio_put(&hc->bio);
}

static void iob_hclone_endio(struct bio *bio);

/* A bounce read of @h on @leg, or NULL without memory (@gfp). */
static struct iob_hclone *iob_hclone_alloc(struct iob_hedge *h, unsigned int leg, gfp_t gfp)
{
	struct iob_c *ic = h->ic;
	unsigned int nr = DIV_ROUND_UP(h->size, PAGE_SIZE), left = h->size, i;
	struct iob_hclone *hc;
	struct bio *bio;

	bio = bio_alloc_bioset(ic->legs[leg].dev->bdev, nr,
			       REQ_OP_READ | (h->orig->bi_opf & IOB_READ_FLAGS), gfp, &ic->hbs);
	if (!bio)
		return NULL;
	hc = container_of(bio, struct iob_hclone, bio);
	hc->h = h;
	hc->leg = leg;
	hc->is_hedge = false;
	bio->bi_iter.bi_sector = h->sector;
	bio->bi_ioprio = h->orig->bi_ioprio;
	bio->bi_end_io = iob_hclone_endio;
	bio->bi_private = hc;
	bio_clone_blkg_association(bio, h->orig);
	for (i = 0; i < nr; i++) {
		struct page *page = iob_page_get(ic, gfp);
		unsigned int len = min_t(unsigned int, left, PAGE_SIZE);

		if (!page) {
			iob_hclone_free(hc);
			return NULL;
		}
		__bio_add_page(bio, page, len, 0);	/* one page per bvec: freed by index */
		left -= len;
	}
	return hc;
}

/* Submit a bounce read; @now is ktime_get_ns() (a clock read costs an
 * emulated HPET read in the VM: each one counts). */
static void iob_hclone_submit(struct iob_c *ic, struct iob_hclone *hc, u64 now)
{
	struct iob_leg *leg = &ic->legs[hc->leg];

	hc->start_qlen = iob_leg_submitting(leg);
	atomic64_inc(&leg->reads);
	hc->start_ns = now;
	submit_bio_noacct(&hc->bio);
}

/* Complete the caller's read (the caller of this set h->done). */
static void iob_hedge_finish(struct iob_hedge *h, struct iob_hclone *winner)
{
	struct bio *orig = h->orig;

	if (winner) {
		struct bvec_iter src = { .bi_size = h->size }, dst = h->orig_iter;

		bio_copy_data_iter(orig, &dst, &winner->bio, &src);
		orig->bi_status = BLK_STS_OK;
	} else {
		orig->bi_status = h->error ? h->error : BLK_STS_IOERR;
	}
	if (hrtimer_try_to_cancel(&h->timer) == 1)
		iob_hedge_put(h);	/* the armed timer's reference */
	bio_endio(orig);
}

static void iob_hclone_endio(struct bio *bio)
{
	struct iob_hclone *hc = container_of(bio, struct iob_hclone, bio);
	struct iob_hedge *h = hc->h;
	struct iob_c *ic = h->ic;
	blk_status_t st = bio->bi_status;
	bool win = false, retry = false, lost;
	unsigned long flags;

	iob_leg_completed(&ic->legs[hc->leg], hc->start_ns, hc->start_qlen, !st);
	if (st) {
		if (!(bio->bi_opf & REQ_RAHEAD))	/* see iob_read_failed() */
			DMERR_LIMIT("%s: %s of sector %llu (%u bytes) failed on leg %u (%s): error %d",
				    iob_name(ic), hc->is_hedge ? "hedge" : "hedged read",
				    (unsigned long long)h->sector, h->size, hc->leg,
				    ic->legs[hc->leg].dev->name, blk_status_to_errno(st));
		iob_read_failed(ic, hc->leg, bio->bi_opf);
	}

	spin_lock_irqsave(&h->lock, flags);
	h->inflight--;
	if (!h->done) {
		if (!st) {
			h->done = win = true;
		} else {
			/* The other read, if any, may still answer. */
			h->error = st;
			retry = !h->inflight;
		}
	}
	lost = h->hedge_issued && !hc->is_hedge;
	spin_unlock_irqrestore(&h->lock, flags);

	if (win) {
		if (hc->is_hedge)
			atomic64_inc(&ic->hedges_won);
		else if (lost)
			atomic64_inc(&ic->hedges_lost);
		iob_hedge_finish(h, hc);
	}
	if (retry)
		iob_hedge_kick(h);
	iob_hclone_free(hc);
	iob_hedge_put(h);
}

/*
 * Legs a hedge of a read that has waited @waited_ns would not beat it on:
 * those whose recent read (as the routing hook sees it) took at least that
 * long. A leg in a slow period holds a hedge longer than the first read
 * is likely to take, which is late more often through a host stall than
 * a slow leg, and a hedge sent there only spends the budget and the leg.
 * Only for the routing program's deadlines: the target's own hedge_us is
 * plain hedging (the least in-flight other leg), which tests use to force
 * hedges with deadlines shorter than any read.
 */
static unsigned long iob_hedge_futile(struct iob_c *ic, u64 waited_ns)
{
	unsigned long mask = 0;
	unsigned int i;

	for (i = 0; i < ic->nr_legs; i++)
		if (iob_lat_of(iob_leg_recent(&ic->legs[i])) >= waited_ns)
			mask |= BIT(i);
	return mask;
}

/* The deadline passed: hand the timer's reference to the work. */
static enum hrtimer_restart iob_hedge_timer(struct hrtimer *t)
{
	struct iob_hedge *h = container_of(t, struct iob_hedge, timer);
	unsigned long flags;

	spin_lock_irqsave(&h->lock, flags);
	h->due = true;
	spin_unlock_irqrestore(&h->lock, flags);
	if (!queue_work(h->ic->hedge_wq, &h->work))
		iob_hedge_put(h);
	return HRTIMER_NORESTART;
}

/*
 * Issue the hedge (the deadline passed, a read is still in flight) or a
 * retry (every read so far failed: the next healthy leg, outside the
 * budget, as an unhedged read's retry); with no leg left, fail the read.
 */
static void iob_hedge_work(struct work_struct *w)
{
	struct iob_hedge *h = container_of(w, struct iob_hedge, work);
	struct iob_c *ic = h->ic;
	struct iob_hclone *hc;
	unsigned long flags, futile;
	bool hedge;
	int next;

	for (;;) {
		futile = h->learned ? iob_hedge_futile(ic, ktime_get_ns() - h->start_ns) : 0;
		spin_lock_irqsave(&h->lock, flags);
		if (h->done || (h->inflight && (!h->due || h->hedged))) {
			spin_unlock_irqrestore(&h->lock, flags);
			break;
		}
		hedge = h->inflight > 0;
		if (hedge)
			h->hedged = true;
		/* A retry takes any leg left; a hedge only one it may win on
		 * (none: the read waits for its leg, no token spent). */
		next = iob_default_leg(ic, h->tried | (hedge ? futile : 0));
		if (next < 0 && !hedge) {
			h->done = true;
			spin_unlock_irqrestore(&h->lock, flags);
			atomic64_inc(&ic->read_failures);
			DMERR_LIMIT("%s: read of sector %llu failed on every healthy leg",
				    iob_name(ic), (unsigned long long)h->sector);
			iob_hedge_finish(h, NULL);
			break;
		}
		if (next < 0 || (hedge && !iob_budget_take(ic))) {
			spin_unlock_irqrestore(&h->lock, flags);
			if (next >= 0)
				atomic64_inc(&ic->hedges_refused);
			break;
		}
		h->tried |= BIT(next);
		h->inflight++;
		h->refs++;
		h->hedge_issued |= hedge;
		spin_unlock_irqrestore(&h->lock, flags);

		/* A hedge must not wait for memory; a retry may (GFP_NOIO). */
		hc = iob_hclone_alloc(h, next, hedge ? GFP_NOWAIT : GFP_NOIO);
		if (hc) {
			hc->is_hedge = hedge;
			atomic64_inc(hedge ? &ic->hedges_issued : &ic->retries);
			iob_hclone_submit(ic, hc, ktime_get_ns());
			break;
		}
		spin_lock_irqsave(&h->lock, flags);
		h->inflight--;
		h->refs--;		/* not the last: this work holds one */
		if (hedge)
			h->hedge_issued = false;
		spin_unlock_irqrestore(&h->lock, flags);
		if (hedge) {
			atomic64_add(IOBRIDGE_HEDGE_TOKEN, &ic->hedge_tokens);	/* unspent */
			atomic64_inc(&ic->hedges_nomem);
			/* the read in flight may have failed meanwhile */
			continue;
		}
	}
	iob_hedge_put(h);	/* the work's reference */
}

/*
 * Read @bio through bounce pages on @leg with a hedge after @hedge_us
 * (@learned: the routing program's deadline, see iob_hedge_futile()).
 * Returns false (nothing done) when the read is not hedge-eligible or
 * memory is short: the caller then reads directly, unhedged.
 */
static bool iob_hedge_read(struct iob_c *ic, struct iob_io *io, struct bio *bio,
			   sector_t sector, unsigned int leg, u32 hedge_us, bool learned)
{
	struct iob_hclone *hc;
	struct iob_hedge *h;
	u64 now;

	/* Not a read a bounce copy can stand for: one that must not wait, one
	 * completed by polling (dm clears REQ_POLLED for a target without
	 * iopoll; checked all the same), or one with an integrity payload (the
	 * bounce read would not fill it). */
	if (!bio->bi_iter.bi_size || bio->bi_iter.bi_size > IOB_HEDGE_MAX_PAGES * PAGE_SIZE ||
	    (bio->bi_opf & (REQ_NOWAIT | REQ_POLLED | REQ_INTEGRITY)) ||
	    !READ_ONCE(ic->hedge_budget_ppm))
		return false;
	h = mempool_alloc(ic->hedge_pool, GFP_NOWAIT);
	if (!h) {
		atomic64_inc(&ic->hedges_nomem);
		return false;
	}
	memset(h, 0, sizeof(*h));
	h->ic = ic;
	h->orig = bio;
	h->orig_iter = bio->bi_iter;
	h->sector = sector;
	h->size = bio->bi_iter.bi_size;
	spin_lock_init(&h->lock);
	hc = iob_hclone_alloc(h, leg, GFP_NOWAIT);
	if (!hc) {
		mempool_free(h, ic->hedge_pool);
		atomic64_inc(&ic->hedges_nomem);
		return false;
	}
	atomic_inc(&ic->hedge_active);
	h->tried = BIT(leg);
	h->learned = learned;
	h->inflight = 1;
	h->refs = 2;		/* the read, the armed timer */
	INIT_WORK(&h->work, iob_hedge_work);
	/* Absolute, from the submission time taken anyway: a relative timer
	 * reads the clock once more. */
	hrtimer_init(&h->timer, CLOCK_MONOTONIC, HRTIMER_MODE_ABS);
	h->timer.function = iob_hedge_timer;
	io->kind = IOB_HEDGED;
	io->leg = IOB_NO_LEG;	/* iob_end_io() has nothing to do */
	now = ktime_get_ns();
	h->start_ns = now;
	hrtimer_start(&h->timer, ns_to_ktime(now + (u64)hedge_us * NSEC_PER_USEC),
		      HRTIMER_MODE_ABS);
	iob_hclone_submit(ic, hc, now);
	return true;
}

static int iob_map_read(struct iob_c *ic, struct iob_io *io, struct bio *bio)
{
	struct dm_target *ti = ic->ti;
	sector_t sector = dm_target_offset(ti, bio->bi_iter.bi_sector);
	struct iob_leg *leg;
	u32 hedge_us = 0;
	bool learned;
	int chosen = -1;

	if (trace_iobridge_route_enabled())
		chosen = iob_hook(ic, sector, bio->bi_iter.bi_size, bio->bi_opf, 0, &hedge_us);
	io->kind = IOB_READ;
	if (chosen >= 0) {
		atomic64_inc(&ic->legs[chosen].hook_routed);
	} else {
		chosen = iob_default_leg(ic, 0);
		if (chosen < 0) {
			atomic64_inc(&ic->read_failures);
			DMERR_LIMIT("%s: no healthy leg to read from", iob_name(ic));
			return DM_MAPIO_KILL;
		}
		atomic64_inc(&ic->legs[chosen].default_routed);
	}
	iob_budget_earn(ic);
	/* The program's deadline for the leg it chose, else the target's own. */
	learned = hedge_us != 0;
	if (!learned)
		hedge_us = READ_ONCE(ic->hedge_us);
	if (hedge_us && iob_hedge_read(ic, io, bio, sector, chosen, hedge_us, learned))
		return DM_MAPIO_SUBMITTED;
	leg = &ic->legs[chosen];
	io->leg = chosen;
	io->tried = BIT(chosen);

	bio_set_dev(bio, leg->dev->bdev);
	bio->bi_iter.bi_sector = sector;
	io->iter = bio->bi_iter;
	io->bi_flags = bio->bi_flags;
	io->remaining = atomic_read(&bio->__bi_remaining);
	io->end_io = bio->bi_end_io;

	io->start_qlen = iob_leg_submitting(leg);
	atomic64_inc(&leg->reads);
	io->start_ns = ktime_get_ns();
	return DM_MAPIO_REMAPPED;
}

static void iob_write_put(struct iob_io *io)
{
	struct iob_c *ic = io->ic;
	struct bio *bio;
	unsigned int i;

	if (!atomic_dec_and_test(&io->pending))
		return;

	bio = dm_bio_from_per_bio_data(io, sizeof(*io));
	if (io->err_mask) {
		/* A leg that missed a write others got is stale. */
		if (io->ok_mask)
			for_each_set_bit(i, &io->err_mask, ic->nr_legs)
				iob_fail_leg(ic, i, true, "write error");
		if (!io->ok_mask || ic->strict_writes) {
			bio->bi_status = io->status ? io->status : BLK_STS_IOERR;
			atomic64_inc(&ic->write_failures);
		}
	}
	bio_endio(bio);
}

static void iob_write_endio(struct bio *clone)
{
	struct iob_wclone *wc = container_of(clone, struct iob_wclone, bio);
	struct iob_io *io = wc->io;
	struct iob_leg *leg = &io->ic->legs[wc->leg];

	iob_leg_completed(leg, wc->start_ns, wc->start_qlen, !clone->bi_status);
	if (clone->bi_status) {
		atomic64_inc(&leg->write_errors);
		WRITE_ONCE(io->status, clone->bi_status);
		set_bit(wc->leg, &io->err_mask);
	} else {
		set_bit(wc->leg, &io->ok_mask);
	}
	bio_put(clone);
	iob_write_put(io);
}

static int iob_map_write(struct iob_c *ic, struct iob_io *io, struct bio *bio)
{
	sector_t sector = dm_target_offset(ic->ti, bio->bi_iter.bi_sector);
	unsigned int i, sent = 0;

	io->kind = IOB_WRITE;
	io->leg = IOB_NO_LEG;
	io->ok_mask = 0;
	io->err_mask = 0;
	io->status = BLK_STS_OK;
	atomic_set(&io->pending, 1);

	for (i = 0; i < ic->nr_legs; i++) {
		struct iob_leg *leg = &ic->legs[i];
		struct iob_wclone *wc;
		struct bio *clone;

		if (test_bit(IOB_LEG_STALE, &leg->state))
			continue;
		clone = bio_alloc_clone(leg->dev->bdev, bio, GFP_NOIO, &ic->bs);
		if (!clone) {
			atomic64_inc(&leg->write_errors);
			set_bit(i, &io->err_mask);
			continue;
		}
		wc = container_of(clone, struct iob_wclone, bio);
		wc->io = io;
		wc->leg = i;
		clone->bi_iter.bi_sector = sector;
		clone->bi_end_io = iob_write_endio;
		clone->bi_private = wc;
		atomic_inc(&io->pending);
		wc->start_qlen = iob_leg_submitting(leg);
		atomic64_inc(&leg->writes);
		sent++;
		wc->start_ns = ktime_get_ns();
		submit_bio_noacct(clone);
	}
	if (!sent) {
		/* Every leg stale cannot happen; refuse rather than drop data. */
		atomic64_inc(&ic->write_failures);
		return DM_MAPIO_KILL;
	}
	iob_write_put(io);
	return DM_MAPIO_SUBMITTED;
}

/* Flush, discard and write-zeroes: dm core sends one bio per leg. */
static int iob_map_dup(struct iob_c *ic, struct iob_io *io, struct bio *bio)
{
	unsigned int i = dm_bio_get_target_bio_nr(bio);
	struct iob_leg *leg;

	io->kind = IOB_DUP;
	io->leg = IOB_NO_LEG;
	if (i >= ic->nr_legs)
		return DM_MAPIO_KILL;
	leg = &ic->legs[i];
	if (test_bit(IOB_LEG_STALE, &leg->state)) {
		bio_endio(bio);
		return DM_MAPIO_SUBMITTED;
	}
	io->leg = i;
	bio_set_dev(bio, leg->dev->bdev);
	if (bio_sectors(bio))
		bio->bi_iter.bi_sector = dm_target_offset(ic->ti, bio->bi_iter.bi_sector);
	atomic_inc(&leg->inflight);
	atomic64_inc(&leg->writes);
	return DM_MAPIO_REMAPPED;
}

static int iob_map(struct dm_target *ti, struct bio *bio)
{
	struct iob_c *ic = ti->private;
	struct iob_io *io = dm_per_bio_data(bio, sizeof(*io));

	io->ic = ic;
	if (bio_op(bio) == REQ_OP_READ)
		return iob_map_read(ic, io, bio);
	if (bio_op(bio) == REQ_OP_WRITE && bio_sectors(bio))
		return iob_map_write(ic, io, bio);
	return iob_map_dup(ic, io, bio);
}

static void iob_retry_work(struct work_struct *w)
{
	struct iob_io *io = container_of(w, struct iob_io, work);
	struct iob_c *ic = io->ic;
	struct bio *bio = dm_bio_from_per_bio_data(io, sizeof(*io));
	struct iob_leg *leg = &ic->legs[io->leg];

	bio->bi_iter = io->iter;
	bio->bi_flags = io->bi_flags;
	atomic_set(&bio->__bi_remaining, io->remaining);
	bio->bi_end_io = io->end_io;
	bio->bi_status = BLK_STS_OK;
	bio_set_dev(bio, leg->dev->bdev);

	io->start_qlen = iob_leg_submitting(leg);
	atomic64_inc(&leg->reads);
	atomic64_inc(&leg->default_routed);
	atomic64_inc(&ic->retries);
	io->start_ns = ktime_get_ns();
	submit_bio_noacct(bio);
}

static int iob_end_io(struct dm_target *ti, struct bio *bio, blk_status_t *error)
{
	struct iob_c *ic = ti->private;
	struct iob_io *io = dm_per_bio_data(bio, sizeof(*io));
	struct iob_leg *leg;
	int next;

	if (io->kind == IOB_WRITE || io->leg == IOB_NO_LEG)
		return DM_ENDIO_DONE;

	leg = &ic->legs[io->leg];
	if (io->kind == IOB_DUP) {
		atomic_dec(&leg->inflight);
		if (*error && *error != BLK_STS_NOTSUPP) {
			unsigned int i, others = 0;

			atomic64_inc(&leg->write_errors);
			for (i = 0; i < ic->nr_legs; i++)
				if (i != io->leg && !test_bit(IOB_LEG_STALE, &ic->legs[i].state))
					others++;
			if (others)
				iob_fail_leg(ic, io->leg, true, "flush/discard error");
		}
		return DM_ENDIO_DONE;
	}

	/* Read (first try or retry): timed, and leaves the leg's in-flight count. */
	iob_leg_completed(leg, io->start_ns, io->start_qlen, !*error);
	if (!*error)
		return DM_ENDIO_DONE;
	if (*error == BLK_STS_AGAIN && (bio->bi_opf & REQ_NOWAIT))
		return DM_ENDIO_DONE;

	iob_read_failed(ic, io->leg, bio->bi_opf);

	next = iob_default_leg(ic, io->tried);
	if (next < 0) {
		atomic64_inc(&ic->read_failures);
		DMERR_LIMIT("%s: read of sector %llu failed on every healthy leg",
			    iob_name(ic), (unsigned long long)io->iter.bi_sector);
		return DM_ENDIO_DONE;
	}
	io->leg = next;
	io->tried |= BIT(next);
	INIT_WORK(&io->work, iob_retry_work);
	queue_work(ic->wq, &io->work);
	return DM_ENDIO_INCOMPLETE;
}

static int iob_parse_policy(const char *name)
{
	int p;

	for (p = 0; p < IOB_NR_POLICIES; p++)
		if (!strcasecmp(name, iob_policy_names[p]))
			return p;
	return -1;
}

static void iob_free(struct dm_target *ti, struct iob_c *ic)
{
	unsigned int i;

	iob_unregister(ic);	/* first: preresume of a newer table reads our legs */
	iob_hedge_drain(ic);	/* no bounce read may outlive the legs */
	if (ic->hedge_wq)
		destroy_workqueue(ic->hedge_wq);
	if (ic->wq)
		destroy_workqueue(ic->wq);
	bioset_exit(&ic->hbs);
	if (ic->page_pool)
		iob_page_cache_drain(ic);
	mempool_destroy(ic->page_pool);
	mempool_destroy(ic->hedge_pool);
	bioset_exit(&ic->bs);
	for (i = 0; i < ic->nr_legs; i++)
		if (ic->legs[i].dev)
			dm_put_device(ti, ic->legs[i].dev);
	kfree(ic);
}

/*
 * The settings that are one unsigned number, in the table line and by
 * message alike: one definition of each one's name, range and meaning, so
 * the two paths cannot disagree. Its error reads "<name> needs <what>
 * <min>..<max><unit><zero>". A setting with decimals takes up to that many
 * digits after a point and is kept scaled by 10^decimals (the hedge budget:
 * a percent to 4 decimals, kept in millionths of reads, so that budgets
 * under 1% can be set).
 */
struct iob_uint_setting {
	const char *name;
	const char *what;
	const char *unit;
	const char *zero;	/* what 0 means, "" when 0 is out of range */
	char *invalid;		/* ti->error for a bad table (dm declares it char *) */
	u32 min, max;		/* as written, before scaling */
	unsigned int decimals;
	size_t offset;		/* the u32 in struct iob_c */
};

static const struct iob_uint_setting iob_uint_settings[] = {
	{ "error_threshold", "a value", "", "", "Invalid error_threshold",
	  1, IOB_MAX_ERROR_THRESHOLD, 0, offsetof(struct iob_c, error_threshold) },
	{ "hedge_us", "a deadline", " microseconds", " (0 = the routing program's only)",
	  "Invalid hedge_us", 0, IOB_MAX_HEDGE_US, 0, offsetof(struct iob_c, hedge_us) },
	{ "hedge_budget", "a percent of reads (up to 4 decimals)", "", " (0 = never hedge)",
	  "Invalid hedge_budget", 0, 100, IOBRIDGE_HEDGE_BUDGET_DECIMALS,
	  offsetof(struct iob_c, hedge_budget_ppm) },
};

#define IOB_UINT_NEEDS_FMT "%s needs %s %u..%u%s%s"
#define IOB_UINT_NEEDS_ARGS(u) (u)->name, (u)->what, (u)->min, (u)->max, (u)->unit, (u)->zero

static const struct iob_uint_setting *iob_uint_setting(const char *name)
{
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(iob_uint_settings); i++)
		if (!strcasecmp(name, iob_uint_settings[i].name))
			return &iob_uint_settings[i];
	return NULL;
}

static u32 iob_pow10(unsigned int n)
{
	u32 p = 1;

	while (n--)
		p *= 10;
	return p;
}

/*
 * @s as a number with at most @decimals digits after a point ("0.15",
 * "5"; not "5.", ".5", "+5" or "1e3"), scaled by 10^@decimals into @v.
 */
static bool iob_parse_fixed(const char *s, unsigned int decimals, u64 *v)
{
	unsigned int frac = 0;
	bool point = false, digit = false;

	*v = 0;
	for (; *s; s++) {
		if (*s == '.' && !point && digit) {
			point = true;
			digit = false;
			continue;
		}
		if (*s < '0' || *s > '9' || (point && ++frac > decimals))
			return false;
		*v = *v * 10 + (*s - '0');
		if (*v > U32_MAX)
			return false;
		digit = true;
	}
	if (!digit)
		return false;
	*v *= iob_pow10(decimals - frac);
	return true;
}

/* Set @u from @arg (NULL: missing); false, nothing changed, if out of range. */
static bool iob_set_uint(struct iob_c *ic, const struct iob_uint_setting *u, const char *arg)
{
	unsigned int v;
	u64 scaled;

	if (!arg)
		return false;
	if (u->decimals) {
		if (!iob_parse_fixed(arg, u->decimals, &scaled) ||
		    scaled < (u64)u->min * iob_pow10(u->decimals) ||
		    scaled > (u64)u->max * iob_pow10(u->decimals))
			return false;
		v = scaled;
	} else if (kstrtouint(arg, 10, &v) || v < u->min || v > u->max) {
		return false;
	}
	WRITE_ONCE(*(u32 *)((char *)ic + u->offset), v);
	return true;
}

/* A hedge budget in millionths as the percent it was set as: "5", "0.15". */
static const char *iob_budget_str(char *buf, size_t size, u32 ppm)
{
	const u32 scale = iob_pow10(IOBRIDGE_HEDGE_BUDGET_DECIMALS);
	u32 frac = ppm % scale;
	int width = IOBRIDGE_HEDGE_BUDGET_DECIMALS;

	if (!frac) {
		snprintf(buf, size, "%u", ppm / scale);
		return buf;
	}
	for (; frac % 10 == 0; frac /= 10)
		width--;
	snprintf(buf, size, "%u.%0*u", ppm / scale, width, frac);
	return buf;
}

static int iob_parse_options(struct dm_target *ti, struct iob_c *ic,
			     struct dm_arg_set *as)
{
	static const struct dm_arg nopts_arg = {
		0, IOB_MAX_OPTS, "Invalid number of options (expected a count 0..16 after the leg devices)"
	};
	const struct iob_uint_setting *u;
	unsigned int nopts;
	const char *opt;
	int r;

	if (!as->argc)
		return 0;
	r = dm_read_arg_group(&nopts_arg, as, &nopts, &ti->error);
	if (r) {
		DMERR("option count must be a number 0..%u after the %u leg devices, and match the options given",
		      IOB_MAX_OPTS, ic->nr_legs);
		return r;
	}
	while (nopts) {
		opt = dm_shift_arg(as);
		nopts--;
		if (!strcasecmp(opt, "strict_writes")) {
			ic->strict_writes = true;
		} else if ((u = iob_uint_setting(opt))) {
			if (!iob_set_uint(ic, u, nopts ? dm_shift_arg(as) : NULL)) {
				DMERR(IOB_UINT_NEEDS_FMT, IOB_UINT_NEEDS_ARGS(u));
				ti->error = u->invalid;
				return -EINVAL;
			}
			nopts--;
		} else if (!strcasecmp(opt, "policy")) {
			int p = nopts ? iob_parse_policy(dm_shift_arg(as)) : -1;

			if (p < 0) {
				DMERR("policy needs one of least_inflight, round_robin, primary");
				ti->error = "Invalid policy";
				return -EINVAL;
			}
			nopts--;
			ic->policy = p;
		} else {
			DMERR("unknown option '%s'", opt);
			ti->error = "Unknown option";
			return -EINVAL;
		}
	}
	if (as->argc) {
		DMERR("%u unexpected argument(s) after the options, starting with '%s'",
		      as->argc, as->argv[0]);
		ti->error = "Too many arguments";
		return -EINVAL;
	}
	return 0;
}

/*
 * <nr_legs> <dev_0> ... <dev_n-1> [<nr_opts> <opt>...]
 */
static int iob_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	static const struct dm_arg nlegs_arg = {
		2, IOBRIDGE_MAX_LEGS, "Invalid leg count (must be 2 to 8)"
	};
	struct dm_arg_set as = { .argc = argc, .argv = argv };
	unsigned int nr_legs, i, j;
	struct iob_c *ic;
	int r;

	if (!argc) {
		DMERR("table needs <nr_legs> <dev>... [<nr_opts> <opt>...]");
		ti->error = "Missing arguments";
		return -EINVAL;
	}
	r = dm_read_arg(&nlegs_arg, &as, &nr_legs, &ti->error);
	if (r) {
		DMERR("leg count '%s' is not a number from 2 to %u", argv[0], IOBRIDGE_MAX_LEGS);
		return r;
	}
	if (as.argc < nr_legs) {
		DMERR("leg count is %u but only %u device(s) given", nr_legs, as.argc);
		ti->error = "Missing leg devices";
		return -EINVAL;
	}

	ic = kzalloc(struct_size(ic, legs, nr_legs), GFP_KERNEL);
	if (!ic) {
		ti->error = "Cannot allocate context";
		return -ENOMEM;
	}
	ic->ti = ti;
	ic->id = IOBRIDGE_MAX_TARGETS;	/* not allocated yet */
	ic->error_threshold = IOB_DEFAULT_ERROR_THRESHOLD;
	ic->policy = IOB_POLICY_LEAST_INFLIGHT;
	ic->hedge_budget_ppm = IOBRIDGE_HEDGE_DEFAULT_BUDGET_PCT *
		iob_pow10(IOBRIDGE_HEDGE_BUDGET_DECIMALS);
	init_waitqueue_head(&ic->hedge_wait);
	spin_lock_init(&ic->page_lock);
	INIT_LIST_HEAD(&ic->page_cache);
	spin_lock_init(&ic->lock);
	INIT_WORK(&ic->event_work, iob_event_work);

	for (i = 0; i < nr_legs; i++) {
		struct iob_leg *leg = &ic->legs[i];
		const char *path = dm_shift_arg(&as);
		sector_t size;

		atomic_set(&leg->inflight, 0);
		r = dm_get_device(ti, path, dm_table_get_mode(ti->table), &leg->dev);
		if (r) {
			DMERR("leg %u: cannot open device '%s' (error %d)", i, path, r);
			ti->error = "Cannot open leg device";
			r = -EINVAL;
			goto bad;
		}
		ic->nr_legs = i + 1;	/* for iob_free() */
		for (j = 0; j < i; j++) {
			if (ic->legs[j].dev->bdev == leg->dev->bdev) {
				DMERR("legs %u and %u are the same device %s", j, i, leg->dev->name);
				ti->error = "Duplicate leg device";
				r = -EINVAL;
				goto bad;
			}
		}
		size = bdev_nr_sectors(leg->dev->bdev);
		if (size < ti->len) {
			DMERR("leg %u (%s) has %llu sectors, fewer than the target's %llu",
			      i, leg->dev->name, (unsigned long long)size,
			      (unsigned long long)ti->len);
			ti->error = "Leg device smaller than the target";
			r = -EINVAL;
			goto bad;
		}
	}

	r = iob_parse_options(ti, ic, &as);
	if (r)
		goto bad;

	ic->md = dm_table_get_md(ti->table);
	r = iob_register(ic);
	if (r) {
		DMERR("more than %u iobridge targets", IOBRIDGE_MAX_TARGETS);
		ti->error = "Too many iobridge targets";
		goto bad;
	}

	ic->wq = alloc_workqueue("iobridge%u", WQ_MEM_RECLAIM, 0, ic->id);
	if (!ic->wq) {
		ti->error = "Cannot allocate workqueue";
		r = -ENOMEM;
		goto bad;
	}
	r = bioset_init(&ic->bs, IOB_WRITE_POOL, offsetof(struct iob_wclone, bio),
			BIOSET_NEED_RESCUER);
	if (r) {
		ti->error = "Cannot allocate bioset";
		goto bad;
	}
	ic->hedge_wq = alloc_workqueue("iobridge%u_hedge", WQ_MEM_RECLAIM | WQ_HIGHPRI, 0, ic->id);
	ic->hedge_pool = mempool_create_kmalloc_pool(IOB_HEDGE_POOL, sizeof(struct iob_hedge));
	ic->page_pool = mempool_create_page_pool(IOB_HEDGE_POOL_PAGES, 0);
	r = bioset_init(&ic->hbs, IOB_HEDGE_POOL, offsetof(struct iob_hclone, bio),
			BIOSET_NEED_BVECS | BIOSET_NEED_RESCUER);
	if (r || !ic->hedge_wq || !ic->hedge_pool || !ic->page_pool) {
		ti->error = "Cannot allocate the hedged reads' pools";
		r = r ? r : -ENOMEM;
		goto bad;
	}

	ic->nr_healthy = nr_legs;
	ti->num_flush_bios = nr_legs;
	ti->num_discard_bios = nr_legs;
	ti->num_write_zeroes_bios = nr_legs;
	ti->per_io_data_size = sizeof(struct iob_io);
	ti->private = ic;
	return 0;

bad:
	iob_free(ti, ic);
	return r;
}

/*
 * At the first resume of a reloaded table (the previous one is suspended,
 * so its leg state no longer changes), take over which legs are failed or
 * stale: a reload must not make a stale leg readable again.
 */
static int iob_preresume(struct dm_target *ti)
{
	struct iob_c *ic = ti->private, *old;
	unsigned long flags;
	unsigned int i, j;

	if (ic->inherited)
		return 0;
	ic->inherited = true;
	mutex_lock(&iob_registry_lock);
	old = iob_find_older_locked(ic);
	for (i = 0; old && i < ic->nr_legs; i++) {
		struct iob_leg *leg = &ic->legs[i];

		for (j = 0; j < old->nr_legs; j++) {
			unsigned long st = READ_ONCE(old->legs[j].state);

			if (old->legs[j].dev->bdev != leg->dev->bdev || !st)
				continue;
			spin_lock_irqsave(&ic->lock, flags);
			if (test_bit(IOB_LEG_STALE, &st))
				set_bit(IOB_LEG_STALE, &leg->state);
			if (test_bit(IOB_LEG_FAILED, &st) &&
			    !test_and_set_bit(IOB_LEG_FAILED, &leg->state))
				ic->nr_healthy--;
			spin_unlock_irqrestore(&ic->lock, flags);
			DMINFO("%s: leg %u (%s) stays %s after the table reload",
			       iob_name(ic), i, leg->dev->name,
			       test_bit(IOB_LEG_STALE, &st) ? "failed and stale" : "failed");
		}
	}
	mutex_unlock(&iob_registry_lock);
	return 0;
}

/* Suspended means no I/O on the legs: wait for the bounce reads that
 * outlive the reads they answered (hedges that lost). */
static void iob_postsuspend(struct dm_target *ti)
{
	iob_hedge_drain(ti->private);
}

static void iob_dtr(struct dm_target *ti)
{
	struct iob_c *ic = ti->private;

	cancel_work_sync(&ic->event_work);
	iob_free(ti, ic);
}

static char iob_leg_state_char(struct iob_leg *leg)
{
	if (test_bit(IOB_LEG_STALE, &leg->state))
		return 'S';
	if (test_bit(IOB_LEG_FAILED, &leg->state))
		return 'F';
	return 'A';
}

static void iob_status(struct dm_target *ti, status_type_t type,
		       unsigned int status_flags, char *result, unsigned int maxlen)
{
	struct iob_c *ic = ti->private;
	unsigned int sz = 0, i, nopts;
	const u32 default_ppm = IOBRIDGE_HEDGE_DEFAULT_BUDGET_PCT *
		iob_pow10(IOBRIDGE_HEDGE_BUDGET_DECIMALS);
	char budget[16];

	switch (type) {
	case STATUSTYPE_INFO:
		DMEMIT("%u %u %s %u ", ic->id, ic->incarnation,
		       iob_policy_names[READ_ONCE(ic->policy)], ic->nr_legs);
		for (i = 0; i < ic->nr_legs; i++)
			DMEMIT("%c", iob_leg_state_char(&ic->legs[i]));
		DMEMIT(" %llu %llu %llu %llu",
		       (unsigned long long)atomic64_read(&ic->retries),
		       (unsigned long long)atomic64_read(&ic->read_failures),
		       (unsigned long long)atomic64_read(&ic->write_failures),
		       (unsigned long long)atomic64_read(&ic->hook_rejected));
		for (i = 0; i < ic->nr_legs; i++) {
			struct iob_leg *leg = &ic->legs[i];

			DMEMIT(" %s %llu %llu %llu %llu %d %llu %llu", leg->dev->name,
			       (unsigned long long)atomic64_read(&leg->reads),
			       (unsigned long long)atomic64_read(&leg->writes),
			       (unsigned long long)atomic64_read(&leg->read_errors),
			       (unsigned long long)atomic64_read(&leg->write_errors),
			       atomic_read(&leg->inflight),
			       (unsigned long long)atomic64_read(&leg->hook_routed),
			       (unsigned long long)atomic64_read(&leg->default_routed));
		}
		DMEMIT(" hedge %u %s %llu %llu %llu %llu %d %d %llu", READ_ONCE(ic->hedge_us),
		       iob_budget_str(budget, sizeof(budget), READ_ONCE(ic->hedge_budget_ppm)),
		       (unsigned long long)atomic64_read(&ic->hedges_issued),
		       (unsigned long long)atomic64_read(&ic->hedges_won),
		       (unsigned long long)atomic64_read(&ic->hedges_lost),
		       (unsigned long long)atomic64_read(&ic->hedges_refused),
		       atomic_read(&ic->hedge_active), atomic_read(&ic->bounce_pages),
		       (unsigned long long)atomic64_read(&ic->hedges_nomem));
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%u", ic->nr_legs);
		for (i = 0; i < ic->nr_legs; i++)
			DMEMIT(" %s", ic->legs[i].dev->name);
		nopts = (ic->strict_writes ? 1 : 0) +
			(ic->error_threshold != IOB_DEFAULT_ERROR_THRESHOLD ? 2 : 0) +
			(ic->policy != IOB_POLICY_LEAST_INFLIGHT ? 2 : 0) +
			(ic->hedge_us ? 2 : 0) +
			(ic->hedge_budget_ppm != default_ppm ? 2 : 0);
		if (nopts) {
			DMEMIT(" %u", nopts);
			if (ic->error_threshold != IOB_DEFAULT_ERROR_THRESHOLD)
				DMEMIT(" error_threshold %u", ic->error_threshold);
			if (ic->policy != IOB_POLICY_LEAST_INFLIGHT)
				DMEMIT(" policy %s", iob_policy_names[ic->policy]);
			if (ic->hedge_us)
				DMEMIT(" hedge_us %u", ic->hedge_us);
			if (ic->hedge_budget_ppm != default_ppm)
				DMEMIT(" hedge_budget %s",
				       iob_budget_str(budget, sizeof(budget), ic->hedge_budget_ppm));
			if (ic->strict_writes)
				DMEMIT(" strict_writes");
		}
		break;
	case STATUSTYPE_IMA:
		DMEMIT_TARGET_NAME_VERSION(ti->type);
		DMEMIT(",nr_legs=%u;", ic->nr_legs);
		break;
	}
}

static int iob_parse_leg(struct iob_c *ic, const char *s, unsigned int *leg)
{
	if (kstrtouint(s, 10, leg) || *leg >= ic->nr_legs) {
		DMWARN("%s: message names leg '%s'; legs are 0..%u",
		       iob_name(ic), s, ic->nr_legs - 1);
		return -EINVAL;
	}
	return 0;
}

static int iob_restore_leg(struct iob_c *ic, unsigned int i, bool resynced)
{
	struct iob_leg *leg = &ic->legs[i];
	unsigned long flags;
	int r = 0;

	spin_lock_irqsave(&ic->lock, flags);
	if (test_bit(IOB_LEG_STALE, &leg->state) && !resynced) {
		r = -EINVAL;
	} else {
		clear_bit(IOB_LEG_STALE, &leg->state);
		if (test_and_clear_bit(IOB_LEG_FAILED, &leg->state))
			ic->nr_healthy++;
		atomic_set(&leg->err_streak, 0);
	}
	spin_unlock_irqrestore(&ic->lock, flags);
	if (r) {
		DMWARN("%s: leg %u (%s) missed writes; copy a healthy leg onto it, then send 'restore_leg %u resynced'",
		       iob_name(ic), i, leg->dev->name, i);
		return r;
	}
	DMINFO("%s: leg %u (%s) restored", iob_name(ic), i, leg->dev->name);
	trace_iobridge_leg_state(ic->id, i, 'A');
	queue_work(ic->wq, &ic->event_work);
	return 0;
}

static void iob_reset_counters(struct iob_c *ic)
{
	unsigned int i;

	atomic64_set(&ic->retries, 0);
	atomic64_set(&ic->read_failures, 0);
	atomic64_set(&ic->write_failures, 0);
	atomic64_set(&ic->hook_rejected, 0);
	atomic64_set(&ic->hedges_issued, 0);
	atomic64_set(&ic->hedges_won, 0);
	atomic64_set(&ic->hedges_lost, 0);
	atomic64_set(&ic->hedges_refused, 0);
	atomic64_set(&ic->hedges_nomem, 0);
	for (i = 0; i < ic->nr_legs; i++) {
		struct iob_leg *leg = &ic->legs[i];

		atomic64_set(&leg->reads, 0);
		atomic64_set(&leg->writes, 0);
		atomic64_set(&leg->read_errors, 0);
		atomic64_set(&leg->write_errors, 0);
		atomic64_set(&leg->hook_routed, 0);
		atomic64_set(&leg->default_routed, 0);
	}
}

/* Time @calls routing steps as the read path runs them. */
static void iob_bench_hook(struct iob_c *ic, unsigned int calls, char *result,
			   unsigned int maxlen)
{
	bool attached = trace_iobridge_route_enabled();
	unsigned int i, sz = 0;
	u64 t0, t1, ns = 0;
	u32 hedge_us;
	int sink = 0;

	for (i = 0; i < calls; i++) {
		if ((i & 4095) == 0) {
			if (i)
				ns += ktime_get_ns() - t0;
			cond_resched();
			t0 = ktime_get_ns();
		}
		if (trace_iobridge_route_enabled())
			sink += iob_hook(ic, (sector_t)i * 8, 4096, REQ_OP_READ, 0, &hedge_us);
	}
	t1 = ktime_get_ns();
	if (calls)
		ns += t1 - t0;
	barrier_data(&sink);
	DMEMIT("calls=%u total_ns=%llu ns_per_call=%llu.%03llu program_attached=%d",
	       calls, (unsigned long long)ns,
	       (unsigned long long)(calls ? ns / calls : 0),
	       (unsigned long long)(calls ? (ns * 1000 / calls) % 1000 : 0),
	       attached ? 1 : 0);
}

static int iob_message(struct dm_target *ti, unsigned int argc, char **argv,
		       char *result, unsigned int maxlen)
{
	struct iob_c *ic = ti->private;
	const struct iob_uint_setting *u;
	unsigned int leg, v;
	int p;

	if (argc == 2 && !strcasecmp(argv[0], "fail_leg")) {
		if (iob_parse_leg(ic, argv[1], &leg))
			return -EINVAL;
		if (!iob_fail_leg(ic, leg, false, "by message"))
			return -EINVAL;
		return 0;
	}
	if ((argc == 2 || argc == 3) && !strcasecmp(argv[0], "restore_leg")) {
		if (iob_parse_leg(ic, argv[1], &leg))
			return -EINVAL;
		if (argc == 3 && strcasecmp(argv[2], "resynced")) {
			DMWARN("%s: restore_leg takes only the word 'resynced' after the leg", iob_name(ic));
			return -EINVAL;
		}
		return iob_restore_leg(ic, leg, argc == 3);
	}
	if (argc == 2 && !strcasecmp(argv[0], "policy")) {
		p = iob_parse_policy(argv[1]);
		if (p < 0) {
			DMWARN("%s: unknown policy '%s' (least_inflight, round_robin, primary)",
			       iob_name(ic), argv[1]);
			return -EINVAL;
		}
		WRITE_ONCE(ic->policy, p);
		return 0;
	}
	if (argc == 2 && (u = iob_uint_setting(argv[0]))) {
		if (!iob_set_uint(ic, u, argv[1])) {
			DMWARN("%s: " IOB_UINT_NEEDS_FMT, iob_name(ic), IOB_UINT_NEEDS_ARGS(u));
			return -EINVAL;
		}
		return 0;
	}
	if (argc == 1 && !strcasecmp(argv[0], "reset_counters")) {
		iob_reset_counters(ic);
		return 0;
	}
	if (argc == 2 && !strcasecmp(argv[0], "bench_hook")) {
		if (kstrtouint(argv[1], 10, &v) || v < 1 || v > IOB_BENCH_MAX_CALLS) {
			DMWARN("%s: bench_hook needs a call count 1..%u", iob_name(ic),
			       IOB_BENCH_MAX_CALLS);
			return -EINVAL;
		}
		iob_bench_hook(ic, v, result, maxlen);
		return 1;	/* result holds output */
	}
	DMWARN("%s: unrecognised message '%s' with %u argument(s)", iob_name(ic),
	       argc ? argv[0] : "", argc ? argc - 1 : 0);
	return -EINVAL;
}

static int iob_iterate_devices(struct dm_target *ti, iterate_devices_callout_fn fn,
			       void *data)
{
	struct iob_c *ic = ti->private;
	unsigned int i;
	int r;

	for (i = 0; i < ic->nr_legs; i++) {
		r = fn(ti, ic->legs[i].dev, 0, ti->len, data);
		if (r)
			return r;
	}
	return 0;
}

static struct target_type iob_target = {
	.name = "iobridge",
	.version = {1, 3, 0},
	.module = THIS_MODULE,
	.ctr = iob_ctr,
	.dtr = iob_dtr,
	.map = iob_map,
	.end_io = iob_end_io,
	.status = iob_status,
	.message = iob_message,
	.iterate_devices = iob_iterate_devices,
	.preresume = iob_preresume,
	.postsuspend = iob_postsuspend,
};

static int __init iob_init(void)
{
	int r = dm_register_target(&iob_target);

	if (r < 0)
		DMERR("register failed %d", r);
	return r;
}

static void __exit iob_exit(void)
{
	dm_unregister_target(&iob_target);
}

module_init(iob_init);
module_exit(iob_exit);

MODULE_DESCRIPTION(DM_NAME " iobridge: replica legs with a BPF-writable read routing hook");
MODULE_AUTHOR("iobridge developers");
MODULE_LICENSE("GPL");
