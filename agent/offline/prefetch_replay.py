"""`iobridge replay --task prefetch`: readahead policies compared on a
trace's reads through the page-cache simulator (pagecache.py), one fresh
cache per policy (policies: prefetch.py).

Reported per policy: hit ratio (hits / page requests), prefetch accuracy
(used / prefetched), coverage (used / (used + misses)), wasted I/O
(prefetched pages evicted unused, in MB), the unused prefetched pages still
cached at the end, refaults, and device reads (pages, MB, requests).

The whole trace is replayed: nothing is trained here (kml's stand-in is
rule-based; learned takes a trained model, by default the shipped one,
trained on VM recordings, not on these traces), so there is no held-back
part.
"""

from __future__ import annotations

import json

import numpy as np

from ..core import cliutil
from ..core import prefetch_features as PF
from ..core.errors import IobridgeError, UsageError
from ..core.outfiles import atomic_output, check_output
from . import prefetch as PP
from .pagecache import PAGE_SIZE, RequestArrays, requests_of, simulate_prefetch
from .progress import Progress
from .trace import Trace, load_any

MAX_CACHE_MB = 1 << 20            # 1 TiB: more is a typo (and the dicts would not fit)
MIN_CACHE_MB = PAGE_SIZE / 2**20  # one page
MAX_WINDOW_S = 3600.0
MB = 2**20

TASKS = ("admission", "prefetch")
# replay options of the admission task only (refused with --task prefetch
# when not at their defaults)
ADMISSION_ONLY = ("legs", "plot", "train_fraction", "recompute_us", "tick_us", "staleness_us",
                  "ttl_us", "probe_after_us", "hedge_percentile", "speed", "channels",
                  "gc_every_write_mb", "bg_per_s", "no_busy", "latency", "seed", "max_epochs")
PREFETCH_ONLY = ("cache_mb", "read_ahead_kb", "window_s", "writes", "out")


def footprint_pages(reqs: RequestArrays) -> int:
    """Distinct pages the trace's reads touch, over all devices."""
    r = ~reqs.is_write
    total = 0
    for d in range(len(reqs.devices)):
        m = r & (reqs.dev == d)
        first, lens = reqs.first[m], reqs.end[m] - reqs.first[m]
        if not len(first):
            continue
        offs = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        total += len(np.unique(np.repeat(first, lens) + offs))
    return total


def _policy_row(counts, seconds: float, stats: dict) -> dict:
    c = counts
    pr = c.page_requests
    return {
        "page_requests": pr, "hits": c.hits, "misses": c.misses,
        "hit_ratio": c.hits / pr if pr else None,
        "prefetched_pages": c.prefetched, "used_prefetched_pages": c.used_prefetched,
        "accuracy": c.used_prefetched / c.prefetched if c.prefetched else None,
        "coverage": (c.used_prefetched / (c.used_prefetched + c.misses)
                     if c.used_prefetched + c.misses else None),
        "wasted_pages": c.wasted, "wasted_mb": c.wasted * PAGE_SIZE / MB,
        "unused_prefetched_at_end": c.unused_at_end,
        "refaults": c.refaults, "refault_activations": c.refault_activations,
        "evictions": c.evictions, "activations": c.activations,
        "device_read_pages": c.device_read_pages,
        "device_read_mb": c.device_read_pages * PAGE_SIZE / MB,
        "device_read_requests": c.device_read_requests,
        "write_pages": c.write_pages, "write_allocated_pages": c.write_allocated,
        "sim_seconds": round(seconds, 2),
        **({"details": stats} if stats else {}),
    }


def run_prefetch_replay(trace: Trace, cache_mb: float, policy_specs: list[str], *,
                        read_ahead_kb: int = PP.DEFAULT_READ_AHEAD_KB,
                        window_s: float = PF.WINDOW_S, writes: str = "allocate",
                        classifier=None, classifiers: dict | None = None,
                        progress: Progress | None = None) -> dict:
    """Replay `trace` through a cache of `cache_mb` MiB once per policy.
    `classifiers`: {spec: classifier} of learned policies (`classifier`:
    the one of plain `learned`)."""
    progress = progress or Progress(False)
    if not MIN_CACHE_MB <= cache_mb <= MAX_CACHE_MB:
        raise UsageError(f"--cache-mb {cache_mb:g}: must be from {MIN_CACHE_MB:g} (one page) "
                         f"to {MAX_CACHE_MB}")
    classifiers = dict(classifiers or {})
    policies = [PP.build_policy(s, read_ahead_kb=read_ahead_kb, window_s=window_s,
                                classifier=classifiers.get(s, classifier))
                for s in policy_specs]
    reqs = requests_of(trace)
    nreads = int((~reqs.is_write).sum())
    if nreads == 0:
        raise IobridgeError(f"{trace.meta.get('source', 'trace')}: the trace has no reads to "
                            "replay through the page cache", "give a trace with reads")
    cap = max(int(cache_mb * MB) // PAGE_SIZE, 1)
    foot = footprint_pages(reqs)
    report: dict = {
        "task": "prefetch", "trace": trace.meta.get("source", "?"),
        "devices": reqs.devices, "read_requests": nreads,
        "write_requests": int(reqs.is_write.sum()),
        "page_size": PAGE_SIZE, "cache_mb": cache_mb, "cache_pages": cap,
        "footprint_pages": foot, "footprint_mb": foot * PAGE_SIZE / MB,
        "writes": writes, "read_ahead_kb": read_ahead_kb,
        "cache_model": "two lists (inactive/active) as Linux's file LRU, FIFO each; "
                       "refault = demand miss within one cache's worth of evictions",
        "notes": [],
        "policies": {},
    }
    if "assigned_arrivals" in trace.meta:
        report["notes"].append(f"the trace has no times: arrivals "
                               f"{trace.meta['assigned_arrivals']} (kml's windows use them)")
    if cap >= foot:
        report["notes"].append(f"the cache ({cap} pages) holds every page the trace reads "
                               f"({foot}): nothing read is ever evicted; a cache below "
                               f"{foot * PAGE_SIZE / MB:.1f} MB tests eviction")
    for spec, pol in zip(policy_specs, policies):
        progress.phase(f"replaying {len(reqs)} requests through a {cache_mb:g} MB page "
                       f"cache with policy {pol.name}")
        r = simulate_prefetch(reqs, cap, pol, writes=writes, progress=progress, label=pol.name)
        row = _policy_row(r.counts, r.seconds, r.policy_stats)
        if isinstance(pol, PP.KmlLike) and hasattr(pol.classifier, "describe"):
            row["details"]["classifier_rules"] = pol.classifier.describe()
        report["policies"][spec] = row
    return report


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def format_table(rep: dict) -> str:
    w = max([12] + [len(n) + 1 for n in rep["policies"]])     # learned:PATH can be long
    lines = [f"trace {rep['trace']}: {rep['read_requests']} read requests, "
             f"{rep['write_requests']} writes ({rep['writes']}), reads touch "
             f"{rep['footprint_pages']} pages ({rep['footprint_mb']:.1f} MB); page cache "
             f"{rep['cache_mb']:g} MB ({rep['cache_pages']} pages, two-list)",
             f"{'policy':<{w}}{'hit ratio':>10}{'accuracy':>10}{'coverage':>10}"
             f"{'prefetched':>11}{'wasted MB':>10}{'refaults':>9}{'dev reads':>10}"
             f"{'dev MB':>9}{'sim s':>7}"]
    for name, s in rep["policies"].items():
        lines.append(f"{name:<{w}}{_pct(s['hit_ratio']):>10}{_pct(s['accuracy']):>10}"
                     f"{_pct(s['coverage']):>10}{s['prefetched_pages']:>11}"
                     f"{s['wasted_mb']:>10.1f}{s['refaults']:>9}"
                     f"{s['device_read_requests']:>10}{s['device_read_mb']:>9.1f}"
                     f"{s['sim_seconds']:>7.1f}")
    lines.append("dev reads = device read requests (a run of contiguous pages read at once); "
                 "wasted = prefetched pages evicted unused")
    for name, s in rep["policies"].items():
        d = s.get("details", {})
        if "windows_by_class" in d:
            classes = ", ".join(f"{k} {v}" for k, v in d["windows_by_class"].items())
            lines.append(f"{name}: classifier {d['classifier']}: {d['window_s']:g} s windows "
                         f"by class: {classes}, undecided {d['windows_undecided']}; "
                         f"{d['read_ahead_changes']} readahead changes")
    for note in rep["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def add_cli_options(p) -> None:
    """The replay parser's --task and the prefetch task's options."""
    p.add_argument("--task", choices=TASKS, default="admission",
                   help="admission: read routing over replica legs (default); prefetch: "
                   "readahead policies through a page-cache simulator, --policy none, "
                   "fixed:KB, linux[:KB], kml, learned[:MODEL.onnx] (a prefetch model, "
                   f"default models/{PP.DEFAULT_MODEL_NAME}, or --model) or all (default: "
                   f"{', '.join(PP.DEFAULT_POLICIES)}), "
                   "e.g. `iobridge replay --task prefetch --trace OLTP.lis.zst --cache-mb 32`")
    p.add_argument("--cache-mb", type=cliutil.float_range(MIN_CACHE_MB, MAX_CACHE_MB),
                   default=None, help="prefetch: page-cache size in MiB (required), "
                   f"{MIN_CACHE_MB:g} (one page) to {MAX_CACHE_MB}")
    p.add_argument("--read-ahead-kb", type=cliutil.int_range(0, PP.MAX_READAHEAD_KB),
                   default=None, help="prefetch: read_ahead_kb of policy linux and the "
                   f"starting one of kml (default {PP.DEFAULT_READ_AHEAD_KB})")
    p.add_argument("--window-s", type=cliutil.float_range(0.001, MAX_WINDOW_S), default=None,
                   help=f"prefetch: kml's feature window in seconds of trace time (default "
                   f"{PF.WINDOW_S:g}, KML's)")
    p.add_argument("--writes", choices=["allocate", "ignore"], default=None,
                   help="prefetch: written pages enter the cache without a read (allocate, "
                   "default) or writes leave the cache alone (ignore)")
    p.add_argument("--out", "-o", metavar="FILE.json",
                   help="prefetch: also write the report as JSON to this file (atomically)")
    p.set_defaults(admission_defaults={d: p.get_default(d) for d in ADMISSION_ONLY})


def run_task(args) -> int | None:
    """Called first by `iobridge replay`: runs --task prefetch and returns its
    exit status; for the admission task refuses the prefetch options and
    returns None (the admission replay goes on)."""
    if args.task != "prefetch":
        given = [d for d in PREFETCH_ONLY if getattr(args, d) is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} is an option of --task prefetch",
                             "add --task prefetch, or leave it out")
        return None
    given = [d for d, v in args.admission_defaults.items() if getattr(args, d) != v]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} is an option of the admission replay, "
                         "not of --task prefetch")
    if args.cache_mb is None:
        raise UsageError("--task prefetch needs --cache-mb (the page cache's size in MiB)",
                         "choose one below the trace's working set, e.g. --cache-mb 64")
    specs = list(dict.fromkeys(args.policy or PP.DEFAULT_POLICIES))
    if "all" in specs:
        specs = list(dict.fromkeys(PP.DEFAULT_POLICIES + tuple(s for s in specs if s != "all")))
    parsed = {s: PP.parse_policy(s) for s in specs}
    if args.model and "learned" not in specs:
        raise UsageError("--model with --task prefetch is the model of policy learned",
                         "add --policy learned")
    out = check_output(args.out, args.force, [args.trace]) if args.out else None
    # models are loaded (and checked) before the trace: a wrong one fails fast
    classifiers = {s: PP.load_prefetch_classifier(arg or args.model)
                   for s, (base, arg) in parsed.items() if base == "learned"}
    prog = Progress(not args.quiet)
    tr = load_any(args.trace, args.format, time_unit=args.time_unit, duration_s=args.duration)
    rep = run_prefetch_replay(
        tr, args.cache_mb, specs,
        read_ahead_kb=PP.DEFAULT_READ_AHEAD_KB if args.read_ahead_kb is None else args.read_ahead_kb,
        window_s=PF.WINDOW_S if args.window_s is None else args.window_s,
        writes=args.writes or "allocate", classifiers=classifiers, progress=prog)
    if out is not None:
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(rep, indent=2) + "\n")
        prog.phase(f"wrote {args.out}")
    print(json.dumps(rep, indent=2) if args.json else format_table(rep), flush=True)
    return 0
