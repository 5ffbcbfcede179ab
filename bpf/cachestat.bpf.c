// SPDX-License-Identifier: GPL-2.0
/*
 * iobridge page-cache observer (BCC), loaded by agent/kernel/cachestat.py.
 *
 * Aggregates in kernel maps, per device (the file system's s_dev) and per
 * file (s_dev, inode): insertions, readahead windows and the pages they
 * inserted, folios handed to reads and how many were already cached,
 * accesses, removals (used or unused), unused readahead removals and
 * refaults; and per time window KML's feature aggregates of the insertions
 * (struct iobridge_cache_window).  Per-event records only when the agent
 * asks (config.stream), through a ring buffer, with drops counted here.
 * Structures: bpf/cachestat.h.
 *
 * Hooks (the loader picks them on the running kernel and attaches the
 * kprobes itself; IOBRIDGE_* macros select the variants compiled in):
 *   readahead window   kprobe + kretprobe page_cache_ra_unbounded and
 *                      page_cache_ra_order (6.1: ra_order falls back to
 *                      ra_unbounded, so windows nest: one per task, counted
 *                      at the outermost entry, closed at its return);
 *                      kprobes page_cache_sync_ra / page_cache_async_ra say
 *                      which kind (same readahead_control pointer).
 *   insertion          tracepoint filemap:mm_filemap_add_to_page_cache
 *                      (IOBRIDGE_INSERT_TP), else kprobe + kretprobe
 *                      filemap_add_folio (success only); readahead when the
 *                      inserting task has an open window on the same file.
 *   read               kprobe + kretprobe filemap_get_pages: the folios of
 *                      the returned batch; a hit when the folio was cached
 *                      before the call began.
 *   use                kprobe folio_mark_accessed (reads, and the paths that
 *                      do not go through filemap_get_pages, such as mmap).
 *   removal            tracepoint filemap:mm_filemap_delete_from_page_cache
 *                      (IOBRIDGE_REMOVE_TP), else kprobe __filemap_remove_folio.
 *   refault            kprobe workingset_refault.
 * Per-page state (readahead? used?) lives in an LRU hash from insertion to
 * removal; a removal without state (inserted before attach, or pushed out of
 * the LRU) is counted as untracked, not guessed.
 */
#include <uapi/linux/ptrace.h>
#include "cachestat.h"
#include "kernel_layout.h"

#ifndef IOBRIDGE_CACHE_PAGES
#define IOBRIDGE_CACHE_PAGES	262144	/* page states tracked (1 GiB of 4 KiB pages) */
#endif
#ifndef IOBRIDGE_CACHE_FILES
#define IOBRIDGE_CACHE_FILES	16384
#endif
#ifndef IOBRIDGE_RINGBUF_PAGES
#define IOBRIDGE_RINGBUF_PAGES	256
#endif

struct ra_window {
	u64 ractl;		/* struct readahead_control * of the outermost call */
	u64 ino;
	u64 demand_lo;		/* pages the read itself asked for: [lo, hi) */
	u64 demand_hi;
	u32 dev;
	u32 depth;
};

struct ra_mode {
	u64 ractl;
	u64 demand_lo;		/* sync: the read's pages; async: none */
	u64 demand_hi;
	u32 kind;
};

struct read_call {
	u64 fbatch;
	u64 start_ns;
};

struct add_call {
	u64 folio;
};

BPF_ARRAY(config, struct iobridge_cache_config, 1);
BPF_HASH(dev_stats, u32, struct iobridge_cache_stats, 1024);
BPF_HASH(file_stats, struct iobridge_cache_file_key, struct iobridge_cache_stats,
	 IOBRIDGE_CACHE_FILES);
BPF_TABLE("lru_hash", struct iobridge_cache_page_key, struct iobridge_cache_page,
	  page_state, IOBRIDGE_CACHE_PAGES);
/*
 * Per-thread call state.  Every read passes through several of these, so an
 * entry is written in place and closed by zeroing its first field, not
 * updated and deleted: a hash update or delete takes the bucket lock and a
 * free-list round trip, a lookup does not (under emulation the update and
 * delete pairs were a fifth of the observer's time per read).  LRU maps, so
 * the entries of threads that have exited make room for new threads.
 */
BPF_TABLE("lru_hash", u32, struct ra_window, windows, 4096);	/* thread id -> open window (ractl 0: none) */
BPF_TABLE("lru_hash", u32, struct ra_mode, ra_modes, 4096);	/* thread id -> sync/async call (ractl 0: none) */
BPF_TABLE("lru_hash", u32, struct read_call, read_calls, 4096);	/* thread id -> filemap_get_pages (fbatch 0: none) */
BPF_TABLE("lru_hash", u32, struct add_call, add_calls, 4096);	/* thread id -> filemap_add_folio (folio 0: none) */
BPF_PERCPU_ARRAY(zero_stats, struct iobridge_cache_stats, 1);
BPF_PERCPU_ARRAY(dropped, u64, 1);		/* events lost: ring buffer full */
BPF_PERCPU_ARRAY(files_untracked, u64, 1);	/* file updates lost: file_stats full */
BPF_RINGBUF_OUTPUT(events, IOBRIDGE_RINGBUF_PAGES);

static __always_inline u32 tid(void)
{
	return (u32)bpf_get_current_pid_tgid();
}

static __always_inline struct iobridge_cache_config *cfg(void)
{
	u32 zero = 0;

	return config.lookup(&zero);
}

static __always_inline void count_percpu(void *map_lookup)
{
	u64 *c = map_lookup;

	if (c)
		(*c)++;
}

static __always_inline struct iobridge_cache_stats *dev_entry(u32 dev)
{
	struct iobridge_cache_stats *s = dev_stats.lookup(&dev), *zero;
	u32 idx = 0;

	if (s)
		return s;
	zero = zero_stats.lookup(&idx);
	if (!zero)
		return NULL;
	dev_stats.insert(&dev, zero);	/* fails harmlessly if a racer won */
	return dev_stats.lookup(&dev);
}

static __always_inline struct iobridge_cache_stats *file_entry(u32 dev, u64 ino)
{
	struct iobridge_cache_file_key key = {.dev = dev, .ino = ino};
	struct iobridge_cache_stats *s = file_stats.lookup(&key), *zero;
	u32 idx = 0;

	if (s)
		return s;
	zero = zero_stats.lookup(&idx);
	if (!zero)
		return NULL;
	file_stats.insert(&key, zero);
	s = file_stats.lookup(&key);
	if (!s)
		count_percpu(files_untracked.lookup(&idx));
	return s;
}

/* Add one insertion's page index to a window (KML's aggregates). */
static __always_inline void window_add(struct iobridge_cache_window *w, u64 index, u32 epoch)
{
	u64 *word = (u64 *)&w->lock;
	u64 s = *(volatile u64 *)word;

	if ((s & 1) || __sync_val_compare_and_swap(word, s, s | 1) != s) {
		__sync_fetch_and_add(&w->contended, 1);
		return;
	}
	if (w->epoch != epoch || w->n == 0) {
		w->epoch = epoch;
		w->base = index;
		w->n = 1;
		w->s1 = 0;
		w->s2_lo = 0;
		w->s2_hi = 0;
		w->lo = 0;
		w->hi = 0;
		w->sad = 0;
		w->last = 0;
		w->run = 0;
		w->seq_steps = 0;
		w->rev_steps = 0;
		w->seq_runs = 0;
		w->rev_runs = 0;
		w->seq_run_max = 1;
		w->rev_run_max = 1;
		w->max_fwd = 0;
		w->max_back = 0;
		w->contended = 0;
	} else {
		s64 d = (s64)(index - w->base);
		s64 delta = d - w->last;
		u64 sq = (u64)(d * d);

		w->n++;
		w->s1 += d;
		w->s2_lo += sq;
		if (w->s2_lo < sq)
			w->s2_hi++;
		if (d < w->lo)
			w->lo = d;
		if (d > w->hi)
			w->hi = d;
		w->sad += delta < 0 ? (u64)-delta : (u64)delta;
		if (delta > 0 && (u64)delta > w->max_fwd)
			w->max_fwd = (u64)delta;
		if (delta < 0 && (u64)-delta > w->max_back)
			w->max_back = (u64)-delta;
		if (delta == 1) {
			if (w->run > 0) {
				w->run++;
			} else {
				w->run = 1;
				w->seq_runs++;
			}
			w->seq_steps++;
			if ((u64)w->run + 1 > w->seq_run_max)
				w->seq_run_max = (u64)w->run + 1;
		} else if (delta == -1) {
			if (w->run < 0) {
				w->run--;
			} else {
				w->run = -1;
				w->rev_runs++;
			}
			w->rev_steps++;
			if ((u64)-w->run + 1 > w->rev_run_max)
				w->rev_run_max = (u64)-w->run + 1;
		} else {
			w->run = 0;
		}
		w->last = d;
	}
	/* unlock: bit 0 only (a 32-bit add never carries into epoch) */
	__sync_fetch_and_add(&w->lock, -1);
}

static __always_inline void emit(u8 kind, u32 dev, u64 ino, u64 index, u32 nr, u8 flags)
{
	struct iobridge_cache_config *c = cfg();
	struct iobridge_cache_event *e;
	u32 zero = 0;

	if (!c || !c->stream)
		return;
	e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		count_percpu(dropped.lookup(&zero));
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->ino = ino;
	e->index = index;
	e->dev = dev;
	e->pid = tid();
	e->nr_pages = nr;
	e->kind = kind;
	e->flags = flags;
	e->pad[0] = 0;
	e->pad[1] = 0;
	events.ringbuf_submit(e, 0);
}

/* The file a folio belongs to: 0 for anonymous or detached folios. */
static __always_inline int folio_file(void *folio, u32 *dev, u64 *ino, u64 *index)
{
	void *mapping = NULL, *host = NULL, *sb = NULL;

	KREAD(mapping, folio, folio_mapping);
	if (!mapping || ((unsigned long)mapping & KERNEL_PAGE_MAPPING_ANON))
		return 0;
	KREAD(host, mapping, address_space_host);
	if (!host)
		return 0;
	KREAD(*ino, host, inode_ino);
	KREAD(sb, host, inode_sb);
	if (sb)
		KREAD(*dev, sb, super_block_dev);
	else
		KREAD(*dev, host, inode_rdev);
	KREAD(*index, folio, folio_index);
	return 1;
}

/* ------------------------------------------------------------ readahead */

static __always_inline void window_enter(void *ractl, u64 start, u64 nr, void *ra)
{
	u32 t = tid();
	struct ra_window *open = windows.lookup(&t);

	/* Nested (ra_order -> ra_unbounded on the same ractl): one window. A
	 * different ractl means the return of an earlier one was missed. */
	if (open && open->ractl && open->ractl == (u64)ractl) {
		open->depth++;
		return;
	}
	void *mapping = NULL, *host = NULL, *sb = NULL;
	struct ra_window w = {.ractl = (u64)ractl, .depth = 1};
	u32 ra_pages = 0;

	KREAD(mapping, ractl, ractl_mapping);
	if (!mapping)
		return;
	KREAD(host, mapping, address_space_host);
	if (!host)
		return;
	KREAD(w.ino, host, inode_ino);
	KREAD(sb, host, inode_sb);
	if (sb)
		KREAD(w.dev, sb, super_block_dev);
	if (ra)
		KREAD(ra_pages, ra, ra_state_ra_pages);

	u32 kind = IOBRIDGE_RA_FORCED;
	struct ra_mode *m = ra_modes.lookup(&t);
	if (m && m->ractl) {
		if (m->ractl == (u64)ractl && m->kind < IOBRIDGE_RA_KINDS) {
			kind = m->kind;
			w.demand_lo = m->demand_lo;
			w.demand_hi = m->demand_hi;
		}
		m->ractl = 0;
	}
	if (open)
		*open = w;
	else
		windows.update(&t, &w);
	struct iobridge_cache_stats *s[2] = {dev_entry(w.dev), file_entry(w.dev, w.ino)};
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (!s[i])
			continue;
		if (kind < IOBRIDGE_RA_KINDS)
			__sync_fetch_and_add(&s[i]->ra_windows[kind], 1);
		__sync_fetch_and_add(&s[i]->ra_requested, nr);
		s[i]->ra_pages_setting = ra_pages;
	}
	emit(IOBRIDGE_CEV_WINDOW, w.dev, w.ino, start, (u32)nr, (u8)kind);
}

static __always_inline void window_exit(void)
{
	u32 t = tid();
	struct ra_window *open = windows.lookup(&t);

	if (!open || !open->ractl)
		return;
	if (open->depth > 1) {
		open->depth--;
		return;
	}
	open->ractl = 0;
}

/* void page_cache_ra_unbounded(struct readahead_control *, unsigned long nr_to_read,
 *                              unsigned long lookahead_size) */
int on_ra_unbounded(struct pt_regs *ctx)
{
	void *ractl = (void *)PT_REGS_PARM1(ctx), *ra = NULL;
	u64 index = 0;

	KREAD(index, ractl, ractl_index);
	KREAD(ra, ractl, ractl_ra);
	window_enter(ractl, index, PT_REGS_PARM2(ctx), ra);
	return 0;
}

/* void page_cache_ra_order(struct readahead_control *, struct file_ra_state *,
 *                          unsigned int new_order) */
int on_ra_order(struct pt_regs *ctx)
{
	void *ractl = (void *)PT_REGS_PARM1(ctx), *ra = (void *)PT_REGS_PARM2(ctx);
	u64 start = 0;
	u32 size = 0;

	KREAD(start, ra, ra_state_start);
	KREAD(size, ra, ra_state_size);
	window_enter(ractl, start, size, ra);
	return 0;
}

int on_ra_return(struct pt_regs *ctx)
{
	window_exit();
	return 0;
}

static __always_inline void set_ra_mode(u32 t, struct ra_mode *m)
{
	struct ra_mode *old = ra_modes.lookup(&t);

	if (old)
		*old = *m;
	else
		ra_modes.update(&t, m);
}

/* void page_cache_sync_ra(struct readahead_control *, unsigned long req_count):
 * a read missed at ractl->_index and needs req_count pages from there; those
 * are demand pages even when inserted inside the window this call opens. */
int on_sync_ra(struct pt_regs *ctx)
{
	void *ractl = (void *)PT_REGS_PARM1(ctx);
	u32 t = tid();
	struct ra_mode m = {.ractl = (u64)ractl, .kind = IOBRIDGE_RA_SYNC};

	KREAD(m.demand_lo, ractl, ractl_index);
	m.demand_hi = m.demand_lo + PT_REGS_PARM2(ctx);
	set_ra_mode(t, &m);
	return 0;
}

/* void page_cache_async_ra(struct readahead_control *, struct folio *,
 * unsigned long req_count): every page it inserts is ahead of the reader. */
int on_async_ra(struct pt_regs *ctx)
{
	u32 t = tid();
	struct ra_mode m = {.ractl = PT_REGS_PARM1(ctx), .kind = IOBRIDGE_RA_ASYNC};

	set_ra_mode(t, &m);
	return 0;
}

/* ------------------------------------------------------------ insertion */

static __always_inline void inserted(u32 dev, u64 ino, u64 index, u32 order)
{
	struct iobridge_cache_config *c = cfg();
	u32 epoch = c ? c->epoch : 0;
	u32 nr = order < 20 ? 1U << order : 1;
	u32 t = tid();
	struct ra_window *w = windows.lookup(&t);
	u8 in_window = w && w->ractl && w->dev == dev && w->ino == ino;
	u8 ra = in_window && !(index >= w->demand_lo && index < w->demand_hi);
	struct iobridge_cache_page_key key = {.dev = dev, .ino = ino, .index = index};
	struct iobridge_cache_page page = {.insert_ns = bpf_ktime_get_ns(), .nr_pages = nr,
					   .flags = ra ? IOBRIDGE_PAGE_READAHEAD : 0};

	page_state.update(&key, &page);
	/* the event before the counts: a report that counts this page comes
	 * after its event in the stream (iobridge cachestat --events) */
	emit(IOBRIDGE_CEV_INSERT, dev, ino, index, nr, page.flags);
	struct iobridge_cache_stats *s[2] = {dev_entry(dev), file_entry(dev, ino)};
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (!s[i])
			continue;
		__sync_fetch_and_add(&s[i]->insertions, nr);
		if (in_window)
			__sync_fetch_and_add(&s[i]->window_pages, nr);
		if (ra)
			__sync_fetch_and_add(&s[i]->ra_pages, nr);
		window_add(&s[i]->win[epoch & 1], index, epoch);
	}
}

#ifdef IOBRIDGE_INSERT_TP
TRACEPOINT_PROBE(filemap, mm_filemap_add_to_page_cache)
{
	inserted(args->s_dev, args->i_ino, args->index, args->order);
	return 0;
}
#else
/* int filemap_add_folio(struct address_space *, struct folio *, pgoff_t, gfp_t) */
int on_add_folio(struct pt_regs *ctx)
{
	u32 t = tid();
	struct add_call a = {.folio = PT_REGS_PARM2(ctx)};
	struct add_call *old = add_calls.lookup(&t);

	if (old)
		*old = a;
	else
		add_calls.update(&t, &a);
	return 0;
}

int on_add_folio_return(struct pt_regs *ctx)
{
	u32 t = tid();
	struct add_call *a = add_calls.lookup(&t);
	u32 dev = 0;
	u64 ino = 0, index = 0;

	if (!a || !a->folio)
		return 0;
	void *folio = (void *)a->folio;
	a->folio = 0;
	if ((int)PT_REGS_RC(ctx) != 0 || !folio_file(folio, &dev, &ino, &index))
		return 0;
	inserted(dev, ino, index, 0);
	return 0;
}
#endif

/* ------------------------------------------------------------ use */

static __always_inline void mark_used(struct iobridge_cache_page *p, struct iobridge_cache_stats **s)
{
	if (p->flags & IOBRIDGE_PAGE_USED)
		return;
	p->flags |= IOBRIDGE_PAGE_USED;
	if (!(p->flags & IOBRIDGE_PAGE_READAHEAD))
		return;
#pragma unroll
	for (int i = 0; i < 2; i++)
		if (s[i])
			__sync_fetch_and_add(&s[i]->ra_used, p->nr_pages);
}

/* static int filemap_get_pages(struct kiocb *, <6.1: struct iov_iter *>,
 *                              struct folio_batch *, ...) */
int on_get_pages(struct pt_regs *ctx)
{
	u32 t = tid();
	struct read_call r = {.fbatch = PT_REGS_PARM3(ctx), .start_ns = bpf_ktime_get_ns()};
	struct read_call *old = read_calls.lookup(&t);

	if (old)
		*old = r;
	else
		read_calls.update(&t, &r);
	return 0;
}

int on_get_pages_return(struct pt_regs *ctx)
{
	u32 t = tid();
	struct read_call *rp = read_calls.lookup(&t);

	if (!rp || !rp->fbatch)
		return 0;
	struct read_call r = *rp;
	rp->fbatch = 0;
	if ((int)PT_REGS_RC(ctx) != 0)
		return 0;
	void *fb = (void *)r.fbatch;
	unsigned char nr = 0;

	KREAD(nr, fb, folio_batch_nr);
#pragma unroll
	for (int i = 0; i < IOBRIDGE_COUNT_folio_batch_folios; i++) {
		void *folio = NULL;
		u32 dev = 0;
		u64 ino = 0, index = 0;

		if (i >= nr)
			break;
		KREAD_ELEM(folio, fb, folio_batch_folios, i);
		if (!folio || !folio_file(folio, &dev, &ino, &index))
			continue;
		struct iobridge_cache_page_key key = {.dev = dev, .ino = ino, .index = index};
		struct iobridge_cache_page *p = page_state.lookup(&key);
		/* No state: inserted before we attached, so cached long before. */
		u8 hit = !p || p->insert_ns < r.start_ns;
		struct iobridge_cache_stats *s[2] = {dev_entry(dev), file_entry(dev, ino)};

#pragma unroll
		for (int j = 0; j < 2; j++) {
			if (!s[j])
				continue;
			__sync_fetch_and_add(&s[j]->reads, 1);
			if (hit)
				__sync_fetch_and_add(&s[j]->hits, 1);
		}
		if (p)
			mark_used(p, s);
		emit(IOBRIDGE_CEV_READ, dev, ino, index, 1,
		     (p ? p->flags : IOBRIDGE_PAGE_USED) | (hit ? IOBRIDGE_CEV_HIT : 0));
	}
	return 0;
}

/* void folio_mark_accessed(struct folio *) */
int on_mark_accessed(struct pt_regs *ctx)
{
	void *folio = (void *)PT_REGS_PARM1(ctx);
	u32 dev = 0;
	u64 ino = 0, index = 0;

	if (!folio_file(folio, &dev, &ino, &index))
		return 0;
	struct iobridge_cache_page_key key = {.dev = dev, .ino = ino, .index = index};
	struct iobridge_cache_page *p = page_state.lookup(&key);
	struct iobridge_cache_stats *s[2] = {dev_entry(dev), file_entry(dev, ino)};

#pragma unroll
	for (int i = 0; i < 2; i++)
		if (s[i])
			__sync_fetch_and_add(&s[i]->marked, 1);
	if (p)
		mark_used(p, s);
	return 0;
}

/* ------------------------------------------------------------ removal */

static __always_inline void removed(u32 dev, u64 ino, u64 index, u32 order)
{
	struct iobridge_cache_page_key key = {.dev = dev, .ino = ino, .index = index};
	struct iobridge_cache_page *p = page_state.lookup(&key);
	u32 nr = order < 20 ? 1U << order : 1;
	u8 flags = 0;
	struct iobridge_cache_stats *s[2] = {dev_entry(dev), file_entry(dev, ino)};

	if (p) {
		flags = p->flags;
		nr = p->nr_pages;
		page_state.delete(&key);
	}
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (!s[i])
			continue;
		if (!p)
			__sync_fetch_and_add(&s[i]->removed_untracked, nr);
		else if (flags & IOBRIDGE_PAGE_USED)
			__sync_fetch_and_add(&s[i]->removed_used, nr);
		else {
			__sync_fetch_and_add(&s[i]->removed_unused, nr);
			if (flags & IOBRIDGE_PAGE_READAHEAD)
				__sync_fetch_and_add(&s[i]->ra_unused_removed, nr);
		}
	}
	emit(IOBRIDGE_CEV_REMOVE, dev, ino, index, nr, flags);
}

#ifdef IOBRIDGE_REMOVE_TP
TRACEPOINT_PROBE(filemap, mm_filemap_delete_from_page_cache)
{
	removed(args->s_dev, args->i_ino, args->index, args->order);
	return 0;
}
#else
/* void __filemap_remove_folio(struct folio *, void *shadow) */
int on_remove_folio(struct pt_regs *ctx)
{
	void *folio = (void *)PT_REGS_PARM1(ctx);
	u32 dev = 0;
	u64 ino = 0, index = 0;

	if (folio_file(folio, &dev, &ino, &index))
		removed(dev, ino, index, 0);
	return 0;
}
#endif

/* ------------------------------------------------------------ refault */

/* void workingset_refault(struct folio *, void *shadow): called after the
 * folio was added back, so its mapping is set. */
int on_refault(struct pt_regs *ctx)
{
	void *folio = (void *)PT_REGS_PARM1(ctx);
	u32 dev = 0;
	u64 ino = 0, index = 0;

	if (!folio_file(folio, &dev, &ino, &index))
		return 0;
	struct iobridge_cache_stats *s[2] = {dev_entry(dev), file_entry(dev, ino)};

#pragma unroll
	for (int i = 0; i < 2; i++)
		if (s[i])
			__sync_fetch_and_add(&s[i]->refaults, 1);
	emit(IOBRIDGE_CEV_REFAULT, dev, ino, index, 1, 0);
	return 0;
}
