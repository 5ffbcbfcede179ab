"""Trace-driven replay of read routing over N replica legs.

The simulator itself is simulate.py: the trace's arrivals drive N legs of
the device model (devmodel.py), reads go where a policy says.

Evaluation protocol: the trace is split by time (labeling.time_split) into
an earlier training part and a later held-back part. Learned policies are
trained on the training part, replayed with reads routed at random across
the legs (so every leg sees a mix of load), and the hedging deadline is a
percentile of read latency under least-in-flight routing on the training
part. EVERY policy is then replayed on the held-back part only, starting
from idle legs at the split time, and the report covers those reads.

Hedging: hedged duplicates a read after its fixed deadline, with no limit
on extra reads unless asked (budget_hedged, --budget-hedged).
hedged-learned (least-in-flight routing) and table-hedged (the table's
routing) hedge after learned deadlines per leg and key (core/hedging.py),
which, like the table, follow the replay's time: recomputed from the reads
the policy has seen so far, not from the future; their extra reads are
bounded by the target's token bucket at --hedge-budget (default 5% of
reads). Each hedging policy's report says its extra reads, their share of
the reads, the hedges the budget refused and the hedges that won (the
duplicate completed first).

A policy that cannot run as asked is still reported: a learned policy
whose model could not be trained (e.g. the training part has no slow I/Os:
nothing to learn; the learned hedging policies need the heimdall model's
P(slow)) and hedged without training reads for its deadline are
replayed as least in flight, the module's default (what the module does
with no model), marked "fallback" with the reason in the JSON report and
with a * and the reason in the table. For the table policy the report also
shows P(slow) and the penalty per key of its newest table (the model stays
the source of truth; the table is what it says at the legs' baselines).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core import abi, cliutil, clock
from ..core import hedging as H
from ..core.errors import IobridgeError, UsageError
from ..core.outfiles import atomic_output, check_output
from . import policies as P
from . import prefetch_replay
from .devmodel import DeviceParams
from .labeling import time_split
from .progress import Progress
from .simulate import arrivals_of_recorded, latency_stats, recorded_timelines, simulate
from .trace import OP_READ, Trace, load_any


def build_policy(name: str, *, learned: dict, hedge_deadline_ns: int | None,
                 hedge_pct: float, recompute_ns: int = P.RECOMPUTE_NS, staleness_ns: int = 0,
                 ttl_ns: int | None = None, probe_after_ns: int = P.PROBE_AFTER_NS,
                 tick_ns: int = P.TICK_NS, hedge_worth: float = H.HEDGE_WORTH):
    if name == "primary":
        return P.Primary()
    if name == "random":
        return P.Random()
    if name == "roundrobin":
        return P.RoundRobin()
    if name == "leastinflight":
        return P.LeastInflight()
    if name == "hedged":
        return P.Hedged(hedge_deadline_ns, hedge_pct)
    if name == "linnos":
        return P.LinnOS(learned["linnos"], probe_after_ns, tick_ns)
    if name == "heimdall":
        return P.Heimdall(learned["heimdall"], probe_after_ns, tick_ns)
    if name == "table":
        return P.Table(learned["heimdall"], recompute_ns, staleness_ns, ttl_ns, probe_after_ns,
                       tick_ns=tick_ns)
    if name in ("hedged-learned", "table-hedged"):
        cls = P.HedgedLearned if name == "hedged-learned" else P.TableHedged
        return cls(learned["heimdall"], recompute_ns, staleness_ns, ttl_ns, probe_after_ns,
                   tick_ns=tick_ns, worth=hedge_worth)
    raise UsageError(f"unknown policy {name!r}", f"choose from {', '.join(P.POLICY_NAMES)}")


# Option ranges. The device model's are what keep the simulation finite and
# fast: each write runs a loop of (bytes written / GC threshold) steps, and
# every leg draws each background busy period between the trace's first and
# last arrival (a busy period lasts 1-80 ms, so 100 per second already
# keeps a leg busy nearly all the time).
MAX_CHANNELS = 1024             # --channels: parallel service units per leg
GC_EVERY_WRITE_MB = (1.0, 1e6)  # --gc-every-write-mb: an erase block or more
MAX_BG_PER_S = 100.0            # --bg-per-s
SPEED = (0.01, 1000.0)          # --speed
MAX_BG_PERIODS = 20_000_000     # background busy periods per leg over the replay
MAX_US = 3.6e9                  # the time options (us): an hour
MAX_EPOCHS = 10_000

FALLBACK_POLICY = "leastinflight"    # what the module does without a model: its default
STALENESS_NS = 1_000_000             # table: from reading the baselines to the table in force


def run_replay(trace: Trace, nlegs: int, policy_names: list[str], *,
               params: DeviceParams = DeviceParams(), train_fraction: float = 0.5,
               seed: int = 0, recompute_ns: int = P.RECOMPUTE_NS,
               staleness_ns: int = STALENESS_NS, ttl_ns: int | None = None,
               probe_after_ns: int = P.PROBE_AFTER_NS, tick_ns: int = P.TICK_NS,
               hedge_pct: float = 95.0, model_path: str | None = None, max_epochs: int = 30,
               progress: Progress | None = None, keep_latencies: bool = False,
               latency: str = "auto", hedge_budget: float = H.DEFAULT_BUDGET,
               budget_hedged: bool = False, hedge_worth: float = H.HEDGE_WORTH) -> dict:
    """latency: "model" (device model), "trace" (per-leg latencies recorded in
    the trace) or "auto" (trace when it has measured latency on legs).

    hedge_budget: the target's budget on extra reads (a fraction of reads,
    core/hedging.HedgeBudget) for hedged-learned and table-hedged, and for
    hedged too with budget_hedged (without: hedged is unlimited, as
    before). hedge_worth: the learned deadlines' HEDGE_WORTH.

    A policy that cannot run as asked (a learned one whose model could not be
    trained on the training part, hedged without training reads for its
    deadline) is replayed as the module default (least in flight, what the
    module does without a model) and its report row says why, in
    "fallback"; report["fallbacks"] lists them all."""
    from . import train as TR
    progress = progress or Progress(False)
    if not 2 <= nlegs <= abi.MAX_LEGS:
        raise UsageError(f"--legs {nlegs}: an iobridge target has 2 to {abi.MAX_LEGS} legs")
    if len(trace) == 0 or not (trace["op"] == OP_READ).any():
        raise IobridgeError("trace has no reads to replay")
    if latency == "auto":
        latency = "trace" if trace.has_latency and (trace["leg"] >= 0).all() else "model"
    timelines = None
    if latency == "trace":
        timelines = recorded_timelines(trace, nlegs)
        trace = arrivals_of_recorded(trace)
    elif latency != "model":
        raise UsageError(f"unknown latency source {latency!r}", "use model, trace or auto")
    tr = trace.sorted()
    split = time_split(tr["issue_ns"], train_fraction)
    train_part = tr.take(np.flatnonzero(tr["issue_ns"] < split))
    eval_part = tr.take(np.flatnonzero(tr["issue_ns"] >= split))
    if not (eval_part["op"] == OP_READ).any():     # every policy would report nothing
        raise IobridgeError(f"the held-back part of the trace (from {split} ns, the later "
                            f"{1 - train_fraction:g} of its time span) has no reads to replay",
                            "use a longer trace, or a smaller --train-fraction")
    report: dict = {
        "trace": tr.meta.get("source", "?"), "legs": nlegs, "seed": seed,
        "latency_source": "recorded per-leg latencies" if timelines else "device model",
        "device_model": None if timelines else params.as_dict(), "train_fraction": train_fraction,
        "split_ns": split,
        "train_part": {"records": len(train_part), "reads": int((train_part["op"] == OP_READ).sum())},
        "eval_part": {"records": len(eval_part), "reads": int((eval_part["op"] == OP_READ).sum())},
        "policies": {},
        "fallbacks": {},
    }
    learned: dict = {}
    fallbacks: dict = report["fallbacks"]
    if not (isinstance(hedge_budget, (int, float)) and 0.0 <= hedge_budget <= 1.0):
        raise UsageError(f"hedge budget {hedge_budget!r}: must be a fraction of reads from 0 to 1")
    hedge_deadline = None
    want_heimdall = any(n in P.TABLE_MODEL for n in policy_names)
    want_linnos = "linnos" in policy_names

    def not_trained(models, why):
        for name in policy_names:
            if name in models:
                what = ("its model (the heimdall one) is not"
                        if name in P.TABLE_MODEL and name != "heimdall" else "not")
                fallbacks[name] = f"{what} trained: {why}; replayed as {FALLBACK_POLICY}"

    if (want_heimdall and not model_path) or want_linnos:
        if len(train_part) == 0:
            not_trained((*P.TABLE_MODEL, "linnos") if not model_path else ("linnos",),
                        "the training part of the trace is empty (raise --train-fraction)")
            want_linnos = False
            want_heimdall = want_heimdall and bool(model_path)
    recs = None
    if (want_heimdall and not model_path) or want_linnos:
        progress.phase(f"simulating the training part ({len(train_part)} records, random routing)")
        recs = simulate(train_part, nlegs, P.Random(), params, seed + 101, record=True,
                        progress=progress, label="training part", timelines=timelines).records
    if want_heimdall:
        if model_path:
            from ..core.model import AdmissionModel
            learned["heimdall"] = AdmissionModel(model_path)
            report["heimdall_model"] = {"file": str(model_path),
                                        "note": "given with --model; not trained here"}
        else:
            progress.phase("training the Heimdall-style model on the training part")
            try:
                res = TR.train_heimdall_on_records([recs], max_epochs=max_epochs, seed=seed)
            except IobridgeError as e:
                not_trained(P.TABLE_MODEL, e.message)
                report["heimdall_model"] = {"trained_on": "training part",
                                            "not_trained": str(e)}
            else:
                learned["heimdall"] = res.model
                report["heimdall_model"] = {"trained_on": "training part", **res.summary()}
    if want_linnos:
        progress.phase("training the LinnOS-style model on the training part")
        try:
            res = TR.train_linnos_on_records([recs], max_epochs=max_epochs, seed=seed)
        except IobridgeError as e:
            not_trained(("linnos",), e.message)
            report["linnos_model"] = {"trained_on": "training part", "not_trained": str(e)}
        else:
            learned["linnos"] = res.model
            report["linnos_model"] = {"trained_on": "training part", **res.summary()}
    if "hedged" in policy_names:
        if len(train_part) and (train_part["op"] == OP_READ).any():
            sim = simulate(train_part, nlegs, P.LeastInflight(), params, seed + 101,
                           timelines=timelines)
            hedge_deadline = int(np.percentile(sim.read_lat_ns, hedge_pct))
        else:
            fallbacks["hedged"] = (f"no reads in the training part to set the deadline; "
                                   f"replayed as {FALLBACK_POLICY}")
    report["fallbacks"] = fallbacks = {n: fallbacks[n] for n in policy_names if n in fallbacks}
    lat_out = {}
    for name in policy_names:
        run_as = FALLBACK_POLICY if name in fallbacks else name
        pol = build_policy(run_as, learned=learned, hedge_deadline_ns=hedge_deadline,
                           hedge_pct=hedge_pct, recompute_ns=recompute_ns,
                           staleness_ns=staleness_ns, ttl_ns=ttl_ns,
                           probe_after_ns=probe_after_ns, tick_ns=tick_ns,
                           hedge_worth=hedge_worth)
        progress.phase(f"replaying the held-back part with policy {name}"
                       + (f" (as {run_as})" if run_as != name else ""))
        budgeted = run_as != "hedged" or budget_hedged
        r = simulate(eval_part, nlegs, pol, params, seed, progress=progress, label=name,
                     timelines=timelines, hedge_budget=hedge_budget if budgeted else None)
        report["policies"][name] = {**latency_stats(r.read_lat_ns), "reads_per_leg": r.sent,
                                    "extra_ios": r.extra_ios, "sim_seconds": round(r.seconds, 2),
                                    **({"hedging": r.hedging} if r.hedging else {}),
                                    **({"details": r.policy_stats} if r.policy_stats else {}),
                                    **({"fallback": fallbacks[name], "replayed_as": run_as}
                                       if run_as != name else {})}
        lat_out[name] = r.read_lat_ns
    if keep_latencies:
        report["_latencies"] = lat_out
    return report


def _fmt_keys(keys: dict) -> list[str]:
    """The table's P(slow) / penalty per latency bucket, a few lines per leg."""
    edges = keys["lat_bucket_rel_edges"]
    heads = [f"<{edges[0]:g}x"] + [f"{a:g}-{b:g}x" for a, b in zip(edges, edges[1:])] \
        + [f">={edges[-1]:g}x"]
    out = [f"table: P(slow) and penalty (us) per latency bucket of the newest table "
           f"(built at {keys['computed_at_s']:.1f} s) at the replay's leg baselines, "
           f"reads <= 4K:",
           f"  {'':<24}" + "".join(f"{h:>9}" for h in heads)]
    for i, leg in enumerate(keys["legs"]):
        if leg is None:
            out.append(f"  leg {i}: no baseline")
            continue
        b = leg["baseline"]
        out.append(f"  leg {i}: baseline {b['lat_us']:g} us, slow read {b['slow_lat_us']:g} us"
                   + (" (borrowed)" if leg["borrowed_baseline"] else ""))
        for fb, label in ((0, "0 in flight"), (1, "1 in flight")):
            row = leg[f"inflight_bucket_{fb}"]
            out.append(f"    {label + ' P(slow)':<22}" + "".join(f"{v:>9.3f}" for v in row["p_slow"]))
            out.append(f"    {label + ' penalty us':<22}"
                       + "".join(f"{v:>9.0f}" for v in row["penalty_us"]))
    return out


def format_table(report: dict) -> str:
    lines = [f"trace {report['trace']}: {report['legs']} legs, held-back part "
             f"{report['eval_part']['reads']} reads (training part "
             f"{report['train_part']['reads']} reads, split at "
             f"{report['split_ns'] / 1e9:.1f} s)",
             f"{'policy':<14}{'mean us':>10}{'p50 us':>10}{'p99 us':>11}{'p99.9 us':>11}"
             f"{'extra I/O':>11}  reads per leg"]
    for name, s in report["policies"].items():
        lines.append(f"{name + ('*' if 'fallback' in s else ''):<14}{s['mean_us']:>10.1f}"
                     f"{s['p50_us']:>10.1f}{s['p99_us']:>11.1f}"
                     f"{s['p999_us']:>11.1f}{s['extra_ios']:>11d}  "
                     + "/".join(str(x) for x in s["reads_per_leg"]))
    for name, why in report.get("fallbacks", {}).items():
        lines.append(f"* {name}: {why}")
    for key in ("heimdall_model", "linnos_model"):
        if key in report:
            m = report[key]
            ev = m.get("evaluation", {})
            if ev:
                auc = "n/a" if ev["roc_auc"] is None else f"{ev['roc_auc']:.3f}"
                lines.append(f"{key.split('_')[0]} model (validation on the last 20% of the "
                             f"training part): precision {ev['precision']:.3f} recall "
                             f"{ev['recall']:.3f} ROC AUC {auc}, {ev['slow_rows']} of "
                             f"{ev['rows']} rows slow")
            elif "file" in m:
                lines.append(f"{key.split('_')[0]} model: {m.get('file')}")
    pols = report["policies"]
    hedging = [(n, s["hedging"]) for n, s in pols.items() if s.get("hedging")]
    if hedging:
        lines.append(f"{'hedging':<14}{'budget':>8}{'deadlines':>11}{'extra reads':>13}"
                     f"{'of reads':>10}{'futile':>8}{'refused':>9}{'won':>7}")
        for name, h in hedging:
            budget = "none" if h["budget"] is None else f"{h['budget'] * 100:g}%"
            lines.append(f"{name:<14}{budget:>8}{h['deadlines_passed']:>11d}"
                         f"{h['extra_reads']:>13d}{h['extra_per_read']:>10.3%}"
                         f"{h.get('futile', 0):>8d}{h['refused_by_budget']:>9d}{h['won']:>7d}")
        lines.append("  (deadlines: reads still pending at their deadline; futile: no other leg's "
                     "recent read was faster than the wait, so no hedge (learned deadlines); "
                     "refused: hedges the target's token bucket refused; won: the duplicate "
                     "completed first)")
    if "hedged" in pols and "details" in pols["hedged"] and "fallback" not in pols["hedged"]:
        d = pols["hedged"]["details"]
        lines.append(f"hedged: duplicate after {d['deadline_us']:.0f} us (p{d['percentile']:g} "
                     "of least-in-flight read latency on the training part)")
    for name in ("hedged-learned", "table-hedged"):
        d = pols.get(name, {}).get("details", {})
        if "fallback" in pols.get(name, {}) or not d.get("deadlines"):
            continue
        dl = d["deadlines"]
        lines.append(f"{name}: deadlines recomputed {d['deadline_updates']} times (worth "
                     f"{d['hedge_worth']:g}); newest (at {dl['computed_at_s']:.1f} s), idle leg "
                     "with a fast newest read, per size bucket <=4K/16K/64K/more, us:")
        for i, leg in enumerate(dl["legs"]):
            if leg is None:
                lines.append(f"  leg {i}: none")
                continue
            lines.append(f"  leg {i}: " + "/".join(str(x) for x in leg["idle_fast_by_size_us"])
                         + f" (all keys {leg['min_us']}-{leg['max_us']} us, "
                         f"{leg['never_keys']} keys never; {leg['read_samples']} read samples)")
    for name in ("linnos", "heimdall"):
        if name in pols and "fallback" not in pols[name]:
            d = pols[name]["details"]
            lines.append(f"{name}: {d['inference_calls']} per-read inferences, "
                         f"{d['routed_fraction']:.1%} of reads routed by the cost rule, "
                         f"{d['probes']} probes")
    if "table" in pols and "fallback" not in pols["table"]:
        d = pols["table"]["details"]
        ttl = "kept alive" if d["ttl_us"] is None else f"TTL {d['ttl_us']:g} us"
        lines.append(f"table: {d['rebuilds']} rebuilds, {d['inference_calls']} batched "
                     "inferences (rebuild when a "
                     f"baseline moves >10%, checked every {d['tick_us'] / 1000:g} ms tick, at "
                     f"most every {d['recompute_us'] / 1000:g} ms; staleness "
                     f"{d['staleness_us']:g} us, {ttl}), {d['routed_fraction']:.1%} "
                     f"of reads routed by the table, {d['probes']} probes")
        if d.get("keys"):
            lines += _fmt_keys(d["keys"])
    return "\n".join(lines)


def plot_format(out) -> str:
    """The image format `out`'s suffix names (none: png); one matplotlib cannot
    write is a UsageError, checked before the replay's work."""
    from matplotlib.backend_bases import FigureCanvasBase
    fmt = Path(out).suffix[1:].lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise UsageError(f"cannot write {out}: no image format .{fmt}",
                         f"name a file ending in {', '.join('.' + k for k in sorted(known))}")
    return fmt


def plot_cdf(latencies: dict, out, title: str) -> None:
    """Latency CDF and tail plots to `out`, atomically (its suffix names the
    image format: png, svg, pdf ...)."""
    fmt = plot_format(out)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, lat in latencies.items():
        us = np.sort(np.asarray(lat, dtype=np.float64) / 1000.0)
        if len(us) == 0:
            continue
        y = np.arange(1, len(us) + 1) / len(us)
        a1.plot(us, y, label=name)
        a2.plot(us, 1.0 - y + 1.0 / len(us), label=name)
    a1.set_xscale("log"); a1.set_xlabel("read latency (us)"); a1.set_ylabel("CDF")
    a2.set_xscale("log"); a2.set_yscale("log"); a2.set_xlabel("read latency (us)")
    a2.set_ylabel("1 - CDF (tail)")
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    finally:
        plt.close(fig)


def _cmd_replay(args) -> int:
    rc = prefetch_replay.run_task(args)     # --task prefetch (its own module)
    if rc is not None:
        return rc
    names = args.policy or list(P.POLICY_NAMES)
    if "all" in names:
        names = list(P.POLICY_NAMES)
    for nm in names:
        if nm not in P.POLICY_NAMES:
            raise UsageError(f"unknown policy {nm!r}", f"choose from {', '.join(P.POLICY_NAMES)}, all")
    names = list(dict.fromkeys(names))
    if args.plot is not None:   # before the long work: a bad path must not cost the replay
        check_output(args.plot, args.force, [args.trace, *([args.model] if args.model else [])])
        plot_format(args.plot)
    prog = Progress(not args.quiet)
    tr = load_any(args.trace, args.format, time_unit=args.time_unit, duration_s=args.duration)
    if args.speed != 1.0:
        last = int(tr["issue_ns"].max()) if len(tr) else 0
        if last / args.speed >= 2.0 ** 63:      # would wrap, not slow down
            raise UsageError(f"--speed {args.speed:g}: the trace's last issue time, {last} ns, "
                             f"divided by it is past the int64 nanosecond range",
                             "raise --speed")
        tr.cols["issue_ns"] = (tr["issue_ns"] / args.speed).astype(np.int64)
        tr.meta["speed"] = args.speed
    params = DeviceParams(**{k: v for k, v in {
        "bg_per_s": args.bg_per_s, "gc_every_write_mb": args.gc_every_write_mb,
        "channels": args.channels}.items() if v is not None})
    if args.no_busy:
        params = DeviceParams(**{**params.as_dict(), "bg_per_s": 0.0, "gc_every_write_mb": 1e18})
    if len(tr) and params.bg_per_s > 0:
        span_s = float(tr["issue_ns"].max() - tr["issue_ns"].min()) / 1e9
        if span_s * params.bg_per_s > MAX_BG_PERIODS:
            raise UsageError(
                f"the replay spans {span_s:.0f} s: {params.bg_per_s:g} background busy periods "
                f"per second make {span_s * params.bg_per_s:.3g} per leg, more than "
                f"{MAX_BG_PERIODS}", "lower --bg-per-s (or --duration), raise --speed, "
                "or pass --no-busy")
    rep = run_replay(tr, args.legs, names, params=params, train_fraction=args.train_fraction,
                     seed=args.seed, recompute_ns=int(args.recompute_us * 1000),
                     staleness_ns=int(args.staleness_us * 1000),
                     ttl_ns=int(args.ttl_us * 1000) if args.ttl_us else None,
                     probe_after_ns=int(args.probe_after_us * 1000),
                     tick_ns=int(args.tick_us * 1000),
                     hedge_pct=args.hedge_percentile, model_path=args.model,
                     max_epochs=args.max_epochs, progress=prog, keep_latencies=args.plot is not None,
                     latency=args.latency, hedge_budget=args.hedge_budget,
                     budget_hedged=args.budget_hedged)
    rep["speed"] = args.speed
    lats = rep.pop("_latencies", None)
    # The report first: a plot that cannot be written must not lose it.
    if args.json:
        print(json.dumps(rep, indent=2, default=float), flush=True)
    else:
        print(format_table(rep), flush=True)
    if args.plot is not None:
        plot_cdf(lats, args.plot, f"{rep['trace']}, {rep['legs']} legs, held-back part")
        prog.phase(f"wrote {args.plot}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "replay", help="compare read-routing policies on a trace over simulated replicas",
        description="Replay a trace's arrivals against N replica legs of the documented "
        "SSD model (agent/devmodel.py: 8 service units, 80 us + size/2 GB/s reads, "
        "GC busy periods every 64 MB written per leg plus 0.5/s background ones). Reads "
        "go where the policy says, writes to every leg. The trace is split by time; "
        "learned policies train on the earlier part and every policy is reported on the "
        "later, held-back part only. Hedging policies (hedged, hedged-learned, "
        "table-hedged) duplicate a read still pending at its deadline to another leg; "
        "the learned ones learn deadlines per leg and key as they go, within the "
        "target's budget on extra reads (--hedge-budget). Latencies in microseconds.",
        parents=[cliutil.json_parent()],
        **cliutil.examples(
            ("iobridge replay --trace cloudPhysicsIO.csv", "every policy, 2 legs"),
            ("iobridge replay --trace cp.parquet --legs 4 --policy heimdall --policy table",
             "two policies, 4 legs"),
            ("iobridge replay --trace cp.parquet --model models/admission-cloudphysics.onnx",
             "a trained model instead of training one"),
            ("iobridge replay --trace cp.parquet --speed 4 --plot cdf.png",
             "4x the load; latency CDF plot"),
            ("iobridge replay --trace cp.parquet --policy hedged --policy hedged-learned "
             "--policy table-hedged --hedge-budget 0.01", "hedging, 1% extra reads at most"),
            ("iobridge replay --trace t.parquet --json -q", "the report as JSON, no progress")))
    p.add_argument("--trace", required=True, help="trace: iobridge .parquet, CloudPhysics "
                   ".csv, ARC .lis[.zst] or fio iolog")
    p.add_argument("--legs", type=cliutil.int_range(2, abi.MAX_LEGS), default=2,
                   help=f"replica legs, 2-{abi.MAX_LEGS} as an iobridge target (default 2)")
    p.add_argument("--policy", action="append", metavar="P",
                   help="policy to compare, repeatable (default: all): " + ", ".join(P.POLICY_NAMES))
    p.add_argument("--plot", metavar="FILE.png", help="write latency CDF and tail plots")
    p.add_argument("--force", action="store_true", help="overwrite --plot's file if it exists")
    p.add_argument("--train-fraction", type=cliutil.fraction, default=0.5,
                   help="earlier fraction of the trace's time span used for training "
                   "(default 0.5); the rest is held back and reported")
    p.add_argument("--model", help="use this ONNX admission model (with its card) for "
                   "heimdall and table instead of training one on the training part. "
                   "The result is a held-back evaluation only if the model never saw this "
                   "part of the trace (the shipped model was trained on the first 70%% of "
                   "cloudPhysicsIO.csv)")
    p.add_argument("--recompute-us", type=cliutil.positive_float(MAX_US), default=P.RECOMPUTE_NS / 1000,
                   help="table: the agent rebuilds the keyed table when a leg's baseline "
                   "moved by more than 10%%, at most once per this many us (default "
                   f"{P.RECOMPUTE_NS / 1000:g})")
    p.add_argument("--tick-us", type=cliutil.float_range(clock.TICK_MS_MIN * 1000, clock.TICK_MS_MAX * 1000),
                   default=P.TICK_NS / 1000,
                   help="learned policies: the agent's tick; leg baselines are re-read (and "
                   "a table rebuild considered) at most this often (default "
                   f"{P.TICK_NS / 1000:g}, the agent's default)")
    p.add_argument("--staleness-us", type=cliutil.nonneg_float(MAX_US), default=STALENESS_NS / 1000,
                   help="table: delay from the agent reading the baselines to the rebuilt "
                   "table being in force (inference and publication), in us (default "
                   f"{STALENESS_NS / 1000:g})")
    p.add_argument("--ttl-us", type=cliutil.positive_float(MAX_US), default=None,
                   help="table: a published table expires this many us after it is in force "
                   "and is NOT kept alive (a stalled agent; reads then go to the module "
                   "default); default: the live agent keeps it in force")
    p.add_argument("--probe-after-us", type=cliutil.nonneg_float(MAX_US), default=P.PROBE_AFTER_NS / 1000,
                   help="learned policies: a leg with no bio in flight and no completion for "
                   f"this long gets the read as a probe; 0 = no probing (default "
                   f"{P.PROBE_AFTER_NS / 1000:g}, the agent's default)")
    p.add_argument("--hedge-percentile", type=cliutil.percentile, default=95.0,
                   help="hedged: duplicate a read still pending after this percentile of "
                   "training-part read latency (default 95)")
    p.add_argument("--hedge-budget", type=cliutil.float_range(0.0, 1.0),
                   default=H.DEFAULT_BUDGET, metavar="FRACTION",
                   help="hedged-learned, table-hedged: the target's budget on extra reads, a "
                   "fraction of reads from 0 (never hedge) to 1: a token bucket earning this "
                   f"much per read, holding up to {H.BUCKET_HEDGES} hedges (default "
                   f"{H.DEFAULT_BUDGET:g})")
    p.add_argument("--budget-hedged", action="store_true",
                   help="hedged within --hedge-budget too (default: hedged is unlimited)")
    p.add_argument("--speed", type=cliutil.float_range(*SPEED), default=1.0,
                   help="divide all arrival times by this factor to raise the load, "
                   f"{SPEED[0]:g} to {SPEED[1]:g} (default 1)")
    p.add_argument("--channels", type=cliutil.positive_int(MAX_CHANNELS), default=None,
                   help=f"device model: parallel service units per leg, 1 to {MAX_CHANNELS} "
                   "(default 8)")
    p.add_argument("--gc-every-write-mb", type=cliutil.float_range(*GC_EVERY_WRITE_MB), default=None,
                   help="device model: MB written per leg between GC busy periods, "
                   f"{GC_EVERY_WRITE_MB[0]:g} to {GC_EVERY_WRITE_MB[1]:g} (default 64)")
    p.add_argument("--bg-per-s", type=cliutil.nonneg_float(MAX_BG_PER_S), default=None,
                   help="device model: background busy periods per second per leg, 0 to "
                   f"{MAX_BG_PER_S:g} (default 0.5); at most {MAX_BG_PERIODS} per leg over "
                   "the trace's span")
    p.add_argument("--no-busy", action="store_true", help="device model without busy periods")
    p.add_argument("--latency", choices=["auto", "model", "trace"], default="auto",
                   help="where leg latency comes from: the device model, or the per-leg "
                   "latencies recorded in the trace (a request sent to leg L at time t "
                   "takes the latency recorded for L's latest I/O of the same kind at or "
                   "before t); auto = trace when every I/O has a leg and a latency "
                   "(default auto)")
    p.add_argument("--seed", type=cliutil.seed, default=0, help="random seed (default 0)")
    p.add_argument("--max-epochs", type=cliutil.positive_int(MAX_EPOCHS), default=30,
                   help="training epochs for the learned policies' MLPs (default 30)")
    p.add_argument("--format", choices=["parquet", "cloudphysics", "arc", "fio"],
                   help="trace format (default: guessed)")
    p.add_argument("--time-unit", choices=["s", "ms", "us", "ns"], default=None,
                   help="CloudPhysics time column unit (default s)")
    p.add_argument("--duration", type=cliutil.seconds, default=None, metavar="SECONDS",
                   help="ARC traces: spread arrivals over this many seconds (default 3600)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    prefetch_replay.add_cli_options(p)
    p.set_defaults(func=_cmd_replay)
