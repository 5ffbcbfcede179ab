/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Page-cache observer: the one C definition of the structures shared by
 * bpf/cachestat.bpf.c and the agent (agent/kernel/cachestat.py through its
 * ctypes mirror agent/core/cachestat_abi.py).  tests/test_cachestat_host.py
 * compiles this header with the host compiler and checks every size,
 * offset and constant against the mirror.  Any layout change bumps
 * IOBRIDGE_CACHESTAT_VERSION.  Only <linux/types.h>: included from BCC
 * programs and from host test programs.
 *
 * Keys: a device is the file system's s_dev in the kernel's dev_t encoding
 * (major << 20 | minor), as the filemap tracepoints report it; a file is
 * (device, inode); a page is (device, inode, page index of the folio's
 * first page).  Counts of pages are in pages (a folio of order k counts
 * 2^k); reads count folios handed to read calls.
 */
#ifndef _IOBRIDGE_CACHESTAT_H
#define _IOBRIDGE_CACHESTAT_H

#include <linux/types.h>

#define IOBRIDGE_CACHESTAT_VERSION	2

/* How a readahead window was started (the outermost caller seen). */
#define IOBRIDGE_RA_SYNC		0	/* page_cache_sync_ra: a read missed */
#define IOBRIDGE_RA_ASYNC		1	/* page_cache_async_ra: a PG_readahead mark was hit */
#define IOBRIDGE_RA_FORCED		2	/* neither: fadvise WILLNEED, readahead(2), ... */
#define IOBRIDGE_RA_KINDS		3

/*
 * One time window of KML's feature aggregates over the page-cache
 * insertions of a device or file, in insertion order.  Page indices are
 * kept relative to `base` (the window's first index) so that the sums stay
 * small; the features do not depend on the shift.  Two windows per
 * device/file: the kernel writes win[epoch & 1] and resets it when it finds
 * an older epoch there; the agent advances the epoch and reads the other.
 * `lock` (bit 0) and `epoch` share one 64-bit word, taken with a 64-bit
 * compare-and-exchange (BCC's BPF target has no 32-bit one); an update that
 * finds it taken is skipped and counted in `contended`.
 */
struct iobridge_cache_window {
	__u32 lock;
	__u32 epoch;
	__u64 base;		/* first insertion's page index (absolute) */
	__u64 n;		/* insertions */
	__s64 s1;		/* sum of (index - base) */
	__u64 s2_lo;		/* sum of (index - base)^2, 128 bits */
	__u64 s2_hi;
	__s64 lo;		/* min and max of (index - base) */
	__s64 hi;
	__u64 sad;		/* sum of |delta index| of consecutive insertions */
	__s64 last;		/* last (index - base) */
	__s64 run;		/* current run: > 0 forward steps, < 0 backward steps */
	__u64 seq_steps;	/* deltas of +1 */
	__u64 rev_steps;	/* deltas of -1 */
	__u64 seq_runs;		/* maximal runs of +1 deltas */
	__u64 rev_runs;		/* maximal runs of -1 deltas */
	__u64 seq_run_max;	/* longest forward run, in pages */
	__u64 rev_run_max;	/* longest backward run, in pages */
	__u64 max_fwd;		/* largest forward step, pages (a backward scan's wrap) */
	__u64 max_back;		/* largest backward step, pages (a forward scan's wrap) */
	__u64 contended;	/* updates skipped: the window was being updated */
};

/* Cumulative counters of one device or one file, plus its two windows. */
struct iobridge_cache_stats {
	__u64 insertions;	/* pages added to the page cache */
	__u64 window_pages;	/* of which inside a readahead window on this file */
	__u64 ra_pages;		/* of which beyond the pages the read asked for:
				 * prefetched (readahead proper) */
	__u64 ra_windows[IOBRIDGE_RA_KINDS];	/* readahead windows, per IOBRIDGE_RA_* */
	__u64 ra_requested;	/* pages the windows asked for */
	__u64 reads;		/* folios handed to read calls (filemap_get_pages) */
	__u64 hits;		/* of which cached before that read call began */
	__u64 marked;		/* folio_mark_accessed calls */
	__u64 ra_used;		/* readahead pages used before removal (first use) */
	__u64 removed_used;	/* removed pages that had been used */
	__u64 removed_unused;	/* removed pages never used since insertion */
	__u64 removed_untracked;	/* removed pages inserted before attach (or state lost) */
	__u64 ra_unused_removed;	/* readahead pages removed unused: wasted */
	__u64 refaults;		/* workingset_refault: evicted pages read back */
	__u32 ra_pages_setting;	/* readahead (pages) of the last window's file */
	__u32 pad;
	struct iobridge_cache_window win[2];
};

struct iobridge_cache_file_key {
	__u32 dev;
	__u32 pad;
	__u64 ino;
};

struct iobridge_cache_page_key {
	__u32 dev;
	__u32 pad;
	__u64 ino;
	__u64 index;
};

/* Per-page (folio) state: kept from insertion to removal in an LRU hash. */
#define IOBRIDGE_PAGE_READAHEAD		1	/* inserted inside a readahead window */
#define IOBRIDGE_PAGE_USED		2	/* read or marked accessed since */

struct iobridge_cache_page {
	__u64 insert_ns;
	__u32 nr_pages;
	__u8 flags;		/* IOBRIDGE_PAGE_* */
	__u8 pad[3];
};

/* Element 0 of the program's one-entry config array, written by the agent. */
struct iobridge_cache_config {
	__u32 epoch;		/* current feature window */
	__u32 stream;		/* 1: emit iobridge_cache_event records */
};

/* Per-event records (only when streaming), through a ring buffer. */
#define IOBRIDGE_CEV_INSERT		0
#define IOBRIDGE_CEV_READ		1	/* a folio handed to a read call */
#define IOBRIDGE_CEV_REMOVE		2
#define IOBRIDGE_CEV_REFAULT		3
#define IOBRIDGE_CEV_WINDOW		4	/* a readahead window opened */

struct iobridge_cache_event {
	__u64 ts_ns;
	__u64 ino;
	__u64 index;		/* page index; WINDOW: first page asked for */
	__u32 dev;
	__u32 pid;		/* thread id */
	__u32 nr_pages;		/* INSERT/REMOVE: folio pages; WINDOW: pages asked for */
	__u8 kind;		/* IOBRIDGE_CEV_* */
	__u8 flags;		/* IOBRIDGE_PAGE_* (READ: bit 7 = hit); WINDOW: IOBRIDGE_RA_* */
	__u8 pad[2];
};

#define IOBRIDGE_CEV_HIT		0x80

#endif /* _IOBRIDGE_CACHESTAT_H */
