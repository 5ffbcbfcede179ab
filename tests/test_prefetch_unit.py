"""Host tests of the prefetch unit (daemon/prefetch.py) and its actuators
(kernel/readahead.py): the decision and feedback rules on synthetic windows,
the restore record (atomic, round trip, a killed agent's record restored at
the next start), shadow mode changing nothing, and the actuators' errors on
a stand-in sysfs tree and on real processes of this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from test_cachestat_host import kernel_window_add, leaf

from iobridge import cli
from iobridge.core import cachestat_abi as cabi
from iobridge.core import prefetch_features as PF
from iobridge.core.errors import IobridgeError
from iobridge.daemon import config
from iobridge.daemon import prefetch as P
from iobridge.kernel import blockdev
from iobridge.kernel import cachestat as cs
from iobridge.kernel import readahead as RA
from iobridge.core.prefetch_rules import RuleClassifier

DEV = blockdev.kdev(7, 0)
A, B = (DEV, 11), (DEV, 12)


def win(key, indices, ra_kb=128, **counts) -> P.Window:
    """A Window over page-cache insertions at `indices` (in order)."""
    ws = PF.WindowStats()
    for i in indices:
        ws.add(i)
    w = P.Window(key, ws.features(ra_kb), ws.direction, False,
                 insertions=counts.pop("insertions", len(indices)), lo=ws.lo, last=ws.last,
                 step_over_range=ws.step_over_range, **counts)
    if not indices:
        w.lo = w.last = None
    return w


def seq(start, n):
    return list(range(start, start + n))


def rnd(n, seed=1, span=100_000):
    import random
    r = random.Random(seed)
    return [r.randrange(span) for _ in range(n)]


def kinds(actions):
    return [(a.kind, a.key, a.old, a.new) for a in actions]


# ------------------------------------------------------------ decisions

def test_one_pattern_on_a_device_sets_its_readahead_and_open_files_follow():
    d = P.Decider(RuleClassifier())
    acts = d.decide({DEV: win(DEV, seq(0, 512))}, {A: win(A, seq(0, 512))}, {DEV: 128})
    acts = [a for a in acts if a.kind != "dontneed"]      # drop-behind: its own test
    assert kinds(acts) == [("device_ra", DEV, 128, 320), ("advise", A, "as opened", "normal")]
    assert "device class sequential" in acts[0].reason and "events 512" in acts[0].reason
    # the same pattern again: nothing to change
    assert [a for a in d.decide({DEV: win(DEV, seq(512, 512))}, {A: win(A, seq(512, 100))},
                                {DEV: 320}) if a.kind != "dontneed"] == []


def test_interleaved_scans_set_the_device_by_the_files_not_the_mixed_device_window():
    d = P.Decider(RuleClassifier())
    a, b = seq(0, 200), seq(50_000, 200)
    mixed = [x for pair in zip(a, b) for x in pair]
    assert RuleClassifier().classify(win(DEV, mixed).feats, False, 0) == 0     # random
    acts = d.decide({DEV: win(DEV, mixed)}, {A: win(A, a), B: win(B, b)}, {DEV: 128})
    assert kinds(acts)[0] == ("device_ra", DEV, 128, 320)


def test_random_device_gets_little_readahead():
    d = P.Decider(RuleClassifier())
    acts = d.decide({DEV: win(DEV, rnd(200))}, {A: win(A, rnd(200))}, {DEV: 128})
    assert kinds(acts)[0] == ("device_ra", DEV, 128, 8)


def test_a_scanner_beside_a_random_reader_gets_advice_per_file():
    d = P.Decider(RuleClassifier())
    dev_w = win(DEV, seq(0, 300) + rnd(300))
    acts = d.decide({DEV: dev_w}, {A: win(A, seq(0, 300)), B: win(B, rnd(300))}, {DEV: 128})
    assert ("advise", A, "as opened", "sequential") in kinds(acts)
    assert ("advise", B, "as opened", "random") in kinds(acts)
    # the device serves the file that reads ahead most (RANDOM stops B's readahead)
    assert ("device_ra", DEV, 128, 320) in kinds(acts)
    dev_act = next(a for a in acts if a.kind == "device_ra")
    assert "files on it differ: set for the class that reads ahead most" in dev_act.reason
    assert all("files on device 7:0 differ" in a.reason for a in acts if a.kind == "advise")
    # one file forced on its own (an operator's decision) leaves the device as it is
    acts = P.Decider(RuleClassifier()).decide({DEV: win(DEV, seq(0, 300))},
                                              {A: win(A, seq(0, 300))}, {DEV: 128},
                                              force={A: "random"})
    assert kinds(acts) == [("advise", A, "as opened", "random")]


def test_device_only_sets_the_device_from_its_own_window_and_nothing_per_file():
    """prefetch.device_only (KML-like): a scanner beside a random reader is
    one device class from the device's window; no per-file advice, WILLNEED,
    drop-behind or feedback; open files follow a change with NORMAL."""
    d = P.Decider(RuleClassifier(), device_only=True)
    a, b = seq(0, 300), rnd(300)
    dev_w = win(DEV, [x for pair in zip(a, b) for x in pair])
    acts = d.decide({DEV: dev_w}, {A: win(A, a), B: win(B, b)}, {DEV: 128})
    assert kinds(acts) == [("device_ra", DEV, 128, 8), ("advise", A, "as opened", "normal"),
                           ("advise", B, "as opened", "normal")]
    # a reverse scan alone: the reverse class's readahead, no WILLNEED
    d = P.Decider(RuleClassifier(), device_only=True)
    back = list(range(10_000, 9_000, -1))
    acts = d.decide({DEV: win(DEV, back)}, {A: win(A, back)}, {DEV: 128})
    assert [a.kind for a in acts] == ["device_ra", "advise"]
    # a sequential scan: no drop-behind, and unused evictions change nothing
    d = P.Decider(RuleClassifier(), device_only=True)
    acts = d.decide({DEV: win(DEV, seq(0, 4096))}, {A: win(A, seq(0, 4096))}, {DEV: 128})
    assert kinds(acts)[0] == ("device_ra", DEV, 128, 320)
    assert not [a for a in acts if a.kind in ("dontneed", "willneed")]
    acts = d.decide({DEV: win(DEV, seq(4096, 4096), ra_pages=1000, ra_wasted=900)},
                    {A: win(A, seq(4096, 4096))}, {DEV: 320})
    assert acts == [] and d.streams[DEV].scale == 1.0
    # the same windows without the switch: per-file advice (the default),
    # the device set for the scanner
    acts = P.Decider(RuleClassifier()).decide({DEV: dev_w}, {A: win(A, a), B: win(B, b)},
                                              {DEV: 128})
    assert ("device_ra", DEV, 128, 320) in kinds(acts)
    assert {x.new for x in acts if x.kind == "advise"} == {"sequential", "random"}


def test_device_only_config_key_and_status(tmp_path):
    assert config.load(None).prefetch_device_only is False
    p = tmp_path / "c.toml"
    p.write_text('[prefetch]\ndevice_only = true\n')
    assert config.load(p).prefetch_device_only is True
    p.write_text('[prefetch]\ndevice_only = "yes"\n')
    with pytest.raises(config.ConfigError, match=r"prefetch\.device_only = 'yes' is invalid: "
                                                 "it must be true or false"):
        config.load(p)
    unit = P.PrefetchUnit(None, RuleClassifier(), "shadow", tmp_path / "r.json", device_only=True)
    assert unit.decider.device_only and unit.status()["device_only"] is True
    assert P.PrefetchUnit(None, RuleClassifier(), "shadow",
                          tmp_path / "r.json").status()["device_only"] is False


def test_a_reverse_scan_gets_willneed_below_it_once():
    d = P.Decider(RuleClassifier())
    back = list(range(10_000, 9_000, -1))
    acts = d.decide({}, {A: win(A, back)}, {DEV: 128})
    wn = [a for a in acts if a.kind == "willneed"]
    assert len(wn) == 1 and wn[0].extent == (9_001 - 1000, 1000)
    # next window, further down: only the part not asked for yet
    acts = d.decide({}, {A: win(A, list(range(9_000, 8_500, -1)))}, {DEV: 480})
    wn = [a for a in acts if a.kind == "willneed"]
    assert wn[0].extent == (8_001 - 500, 500)
    # a second pass from the top starts over
    acts = d.decide({}, {A: win(A, list(range(20_000, 19_500, -1)))}, {DEV: 480})
    assert [a.extent for a in acts if a.kind == "willneed"] == [(19_501 - 500, 500)]


def test_drop_behind_for_a_scan_not_re_read_and_not_when_pages_are_read_again():
    d = P.Decider(RuleClassifier())
    keep = P.KEEP_BEHIND_FRONT * 128 // 4        # below the window's last page
    acts = d.decide({}, {A: win(A, seq(0, 512), reads=512)}, {DEV: 128})
    drop = [a for a in acts if a.kind == "dontneed"]
    assert len(drop) == 1 and drop[0].extent == (0, 511 - keep)
    assert "not re-read: readahead front at page 511" in drop[0].reason
    # the next piece starts where the last ended
    acts = d.decide({}, {A: win(A, seq(512, 512), reads=512)}, {DEV: 128})
    assert [a.extent for a in acts if a.kind == "dontneed"] == [(511 - keep, 512)]
    # a window with pages read twice: kept
    e = P.Decider(RuleClassifier())
    e.decide({}, {A: win(A, seq(0, 512), reads=1100)}, {DEV: 128})
    acts = e.decide({}, {A: win(A, seq(512, 512), reads=1100)}, {DEV: 128})
    assert not [a for a in acts if a.kind == "dontneed"]


def test_a_scan_set_for_drop_behind_is_dropped_between_windows_behind_its_front():
    d = P.Decider(RuleClassifier())
    d.decide({}, {A: win(A, seq(0, 200), reads=200), B: win(B, rnd(300), reads=300)},
             {DEV: 128})
    assert d.droppers() == [A]
    keep = P.KEEP_BEHIND_FRONT * 128 // 4
    # the front moved on: everything more than `keep` pages below it goes, in order
    assert d.drop_between(A, 2000, 128)[0].extent == (0, 2000 - keep)
    assert d.drop_between(A, 2000 + P.MIN_DROP_PAGES - 1, 128) == []      # too little yet
    assert d.drop_between(A, 3000, 128)[0].extent == (2000 - keep, 1000)
    assert "readahead front at page 4000" in d.drop_between(A, 4000, 128)[0].reason
    # a larger readahead keeps more; a scan back at its start drops from 0 again
    assert d.drop_between(A, 600, 1024) == []
    assert d.drop_between(A, 5000, 1024)[0].extent == (0, 5000 - P.KEEP_BEHIND_FRONT * 256)
    # not a dropper, or no front seen: nothing
    assert d.drop_between(B, 9000, 128) == [] and d.drop_between(A, None, 128) == []
    # each window decides again: a window with pages read twice stops it
    d.decide({}, {A: win(A, seq(6000, 512), reads=1100)}, {DEV: 128})
    assert d.droppers() == [] and d.drop_between(A, 20_000, 128) == []


def test_window_front_is_read_only_from_the_open_window_and_not_while_locked():
    s = leaf()
    assert cs.window_front(s, 4) is None
    for i in range(100, 150):
        kernel_window_add(s.win[0], i, 4)
    assert cs.window_front(s, 4) == 149
    assert cs.window_front(s, 5) is None and cs.window_front(s, 6) is None
    s.win[0].lock |= 1
    assert cs.window_front(s, 4) is None


def test_the_unit_drops_between_windows_and_not_in_shadow_mode(tmp_path):
    for mode in ("on", "shadow"):
        obs, act = FakeObserver(), FakeActuators()
        unit = P.PrefetchUnit(None, RuleClassifier(), mode, tmp_path / f"{mode}.json",
                              actuators=act)
        unit.attach(obs)
        obs.feed(A, seq(0, 512), reads=512)
        unit.step()
        obs.feed(A, seq(512, 2000), reads=2000)     # the open window, between two steps
        act.calls.clear()
        unit.drop_tick()
        drops = [c for c in act.calls if c[0] == "dontneed"]
        if mode == "shadow":
            assert drops == []
            continue
        # kept below the front: the device's readahead as the window left it
        assert act.kb[DEV] == 320
        # from where the window's own drop ended (front 511, the device at 128 then)
        at_window = 511 - P.KEEP_BEHIND_FRONT * 32
        assert drops == [("dontneed", 4242, 3, A, at_window,
                          2511 - P.KEEP_BEHIND_FRONT * 80 - at_window)]
        unit.drop_tick()                              # the front has not moved
        assert [c for c in act.calls if c[0] == "dontneed"] == drops
        assert unit.counters["dropped_pages"] == 2511 - P.KEEP_BEHIND_FRONT * 80


def test_the_run_loop_ticks_drop_behind_between_windows(tmp_path, monkeypatch):
    import threading
    monkeypatch.setattr(P, "DROP_TICK_S", 0.01)
    obs, act = FakeObserver(), FakeActuators()
    unit = P.PrefetchUnit(None, RuleClassifier(), "on", tmp_path / "r.json", actuators=act,
                          window_s=0.5)
    unit.attach(obs)
    obs.feed(A, seq(0, 512), reads=512)
    calls, order = {"step": 0, "tick": 0}, []
    step, tick = unit.step, unit.drop_tick

    def counted(name, fn):
        def f():
            calls[name] += 1
            order.append(name)
            return fn()
        return f
    monkeypatch.setattr(unit, "step", counted("step", step))
    monkeypatch.setattr(unit, "drop_tick", counted("tick", tick))
    stop = threading.Event()
    t = threading.Thread(target=unit.run, args=(stop,))
    t.start()
    deadline = time.monotonic() + 20
    while calls["tick"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(5)
    assert not t.is_alive()
    # no tick before the first window set a file for drop-behind
    assert order[0] == "step" and calls["tick"] >= 3


def test_unused_evictions_cut_readahead_next_window_and_clean_windows_restore_it():
    d = P.Decider(RuleClassifier())
    d.decide({DEV: win(DEV, seq(0, 512))}, {}, {DEV: 128})
    acts = d.decide({DEV: win(DEV, seq(512, 512), ra_pages=500, ra_wasted=300)}, {}, {DEV: 320})
    assert kinds(acts) == [("device_ra", DEV, 320, 160)]
    assert "300 prefetched pages evicted unused" in acts[0].reason
    acts = d.decide({DEV: win(DEV, seq(1024, 512), ra_pages=500, ra_wasted=0)}, {}, {DEV: 160})
    assert kinds(acts) == [("device_ra", DEV, 160, 320)]
    # a few unused pages are not waste enough
    acts = d.decide({DEV: win(DEV, seq(1536, 512), ra_pages=500, ra_wasted=4)}, {}, {DEV: 320})
    assert acts == []


def test_a_sequential_device_whose_prefetches_are_used_grows_its_readahead_to_the_cap():
    """RuleClassifier's sequential class has 320 KiB: a used, clean window
    takes it to 1024, no further; waste halves it (512), and a window that
    classifies random drops the growth at once."""
    d = P.Decider(RuleClassifier())
    d.decide({DEV: win(DEV, seq(0, 512))}, {}, {DEV: 128})
    acts = d.decide({DEV: win(DEV, seq(512, 512), ra_pages=500, ra_used=480)}, {}, {DEV: 320})
    assert kinds(acts) == [("device_ra", DEV, 320, 1024)]
    assert ("480 of 500 prefetched pages used, none evicted unused: readahead grown to "
            "1024 KiB") in acts[0].reason
    acts = d.decide({DEV: win(DEV, seq(1024, 512), ra_pages=500, ra_used=500)}, {}, {DEV: 1024})
    assert acts == [] and d.streams[DEV].scale == 1024 / 320
    acts = d.decide({DEV: win(DEV, seq(1536, 512), ra_pages=500, ra_used=400, ra_wasted=100)},
                    {}, {DEV: 1024})
    assert kinds(acts) == [("device_ra", DEV, 1024, 512)]
    acts = d.decide({DEV: win(DEV, rnd(200), ra_pages=500, ra_used=500)}, {}, {DEV: 512})
    assert kinds(acts) == [("device_ra", DEV, 512, 8)] and d.streams[DEV].scale == 1.0


def test_a_small_class_value_grows_to_the_cap_in_the_window_that_shows_it_is_used():
    """The shipped model's sequential class has 32 KiB. A first window
    whose readahead (the kernel's 128 KiB) was not measured sets 32 and
    grows in the next; one whose readahead was used goes to 1024 at once,
    never through the class's 32."""
    class Small(RuleClassifier):
        class_readahead_kb = (8, 8, 32, 8)      # the shipped model's map
    for first_used, want in ((0, [32, 1024]), (500, [1024])):
        d = P.Decider(Small())
        kb, got = 128, []
        for n in range(5):
            used = 500 if n else first_used
            for a in d.decide({DEV: win(DEV, seq(512 * n, 512), ra_pages=used, ra_used=used)},
                              {}, {DEV: kb}):
                kb = a.new
                got.append(kb)
        assert got == want, (first_used, got)


def test_files_that_all_scan_grow_the_device_even_when_its_own_window_looks_random():
    """Two files read sequentially at once: the device's window interleaves
    them (random to the classifier), the files set it for sequential, and
    its used readahead grows; so it does where files differ, the device set
    for the scanner among them."""
    d = P.Decider(RuleClassifier())
    a, b = seq(0, 200), seq(50_000, 200)
    mixed = [x for pair in zip(a, b) for x in pair]
    d.decide({DEV: win(DEV, mixed)}, {A: win(A, a), B: win(B, b)}, {DEV: 128})
    a, b = seq(200, 200), seq(50_200, 200)
    mixed = [x for pair in zip(a, b) for x in pair]
    acts = d.decide({DEV: win(DEV, mixed, ra_pages=400, ra_used=400)},
                    {A: win(A, a), B: win(B, b)}, {DEV: 320})
    assert kinds(acts)[0] == ("device_ra", DEV, 320, 1024)
    e = P.Decider(RuleClassifier())
    dev_w = win(DEV, seq(0, 300) + rnd(300), ra_pages=400, ra_used=400)
    got, kb = [], 128
    for _ in range(4):
        for x in e.decide({DEV: dev_w}, {A: win(A, seq(0, 300)), B: win(B, rnd(300))}, {DEV: kb}):
            if x.kind == "device_ra":
                got.append(kb := x.new)
    assert got == [1024]


def test_growth_is_undone_in_the_first_window_whose_prefetches_go_unused():
    """A scan grows the device's readahead; a random phase that the files
    still call sequential (a few contiguous reads each) must not inherit
    it: the first window with its prefetched pages mostly unused undoes it."""
    class Small(RuleClassifier):
        class_readahead_kb = (8, 8, 32, 8)
    d = P.Decider(Small())
    kb = 128
    for n in range(4):
        for a in d.decide({DEV: win(DEV, seq(512 * n, 512), ra_pages=500 if n else 0,
                                    ra_used=500 if n else 0)}, {}, {DEV: kb}):
            kb = a.new
    assert kb == 1024
    acts = d.decide({DEV: win(DEV, seq(4096, 512), ra_pages=500, ra_used=100)}, {}, {DEV: 1024})
    assert kinds(acts) == [("device_ra", DEV, 1024, 32)]
    assert "only 100 of 500 prefetched pages used: growth undone" in acts[0].reason


def test_a_device_cut_for_waste_steps_back_up_before_it_grows_again():
    """Halved below its class's value for waste (320 -> 160), a device
    steps back to the class's value in its next clean window, and only the
    window after that may grow it."""
    d = P.Decider(RuleClassifier())
    kb, got = 128, []
    for counts in ({}, {"ra_pages": 500, "ra_used": 400, "ra_wasted": 100},
                   {"ra_pages": 500, "ra_used": 500}, {"ra_pages": 500, "ra_used": 500}):
        for a in d.decide({DEV: win(DEV, seq(0, 512), **counts)}, {}, {DEV: kb}):
            got.append(kb := a.new)
    assert got == [320, 160, 320, 1024], got


def test_readahead_does_not_grow_on_a_trickle_or_on_pages_left_unused():
    for counts in ({"ra_pages": 40, "ra_used": 40},        # under MIN_GROW_PAGES
                   {"ra_pages": 500, "ra_used": 300},      # 60% used
                   {"ra_pages": 500, "ra_used": 500, "ra_wasted": 4}):   # some waste
        d = P.Decider(RuleClassifier())
        d.decide({DEV: win(DEV, seq(0, 512))}, {}, {DEV: 128})
        assert d.decide({DEV: win(DEV, seq(512, 512), **counts)}, {}, {DEV: 320}) == [], counts
        assert d.streams[DEV].scale == 1.0


def test_a_random_device_never_grows():
    d = P.Decider(RuleClassifier())
    d.decide({DEV: win(DEV, rnd(200))}, {}, {DEV: 128})
    acts = d.decide({DEV: win(DEV, rnd(200, 2), ra_pages=500, ra_used=500)}, {}, {DEV: 8})
    assert acts == [] and d.streams[DEV].scale == 1.0


def test_a_file_whose_prefetches_go_unused_steps_down_its_advice():
    d = P.Decider(RuleClassifier())
    files = {A: win(A, seq(0, 300)), B: win(B, rnd(300))}
    d.decide({}, files, {DEV: 128})
    files = {A: win(A, seq(300, 300), ra_pages=300, ra_wasted=200), B: win(B, rnd(300, 2))}
    acts = d.decide({}, files, {DEV: 128})
    assert ("advise", A, "sequential", "normal") in kinds(acts)
    assert "stepped down 1" in next(a for a in acts if a.key == A).reason


def test_refaults_stop_drop_behind():
    d = P.Decider(RuleClassifier())
    d.decide({}, {A: win(A, seq(0, 512), reads=512)}, {DEV: 128})
    acts = d.decide({}, {A: win(A, seq(512, 512), reads=512, refaults=3)}, {DEV: 128})
    assert not [a for a in acts if a.kind == "dontneed"]
    assert d.streams[A].drop_behind is False
    acts = d.decide({}, {A: win(A, seq(4096, 512), reads=512)}, {DEV: 128})
    assert not [a for a in acts if a.kind == "dontneed"]


def test_a_forced_class_advises_the_file_alone_even_without_a_window():
    d = P.Decider(RuleClassifier())
    acts = d.decide({}, {}, {DEV: 128}, force={A: "random", DEV: "sequential"})
    assert kinds(acts) == [("device_ra", DEV, 128, 320), ("advise", A, "as opened", "random")]
    assert acts[1].reason.startswith("forced class random")


class AlwaysReverse:
    """Any object with classify() and describe() serves (a learned model later)."""

    def classify(self, feats, has_writes, direction):
        return PF.PREFETCH_CLASSES.index("reverse") if feats[0] else None

    def describe(self):
        return "always reverse"


def test_any_classifier_object_is_accepted():
    d = P.Decider(AlwaysReverse())
    acts = d.decide({DEV: win(DEV, seq(0, 20))}, {}, {DEV: 128})
    assert kinds(acts) == [("device_ra", DEV, 128, 480)]


class AlwaysScan:
    """A classifier that calls every window a scan: as the shipped model
    called a random reader of a file smaller than those it was fitted on."""

    def __init__(self, cls):
        self.index = PF.PREFETCH_CLASSES.index(cls)

    def classify(self, feats, has_writes, direction):
        return self.index if feats[0] else None

    def describe(self):
        return "always a scan"


@pytest.mark.parametrize("said", ["reverse", "sequential"])
def test_a_scan_verdict_on_random_steps_is_taken_as_random(said):
    d = P.Decider(AlwaysScan(said))
    small_random = win(B, rnd(1500, span=6_144))         # a 24 MB file's random reader
    acts = d.decide({DEV: win(DEV, seq(0, 300))}, {A: win(A, seq(0, 300)), B: small_random},
                    {DEV: 128})
    assert d.streams[B].cls == "random" and d.streams[A].cls == said
    advice = next(a for a in acts if a.kind == "advise" and a.key == B)
    assert advice.new == "random"
    assert f"the classifier said {said}, but steps average" in advice.reason
    assert not [a for a in acts if a.key == B and a.kind in ("willneed", "dontneed")]
    # a scan stays what the classifier said, and a forced class is not checked
    d = P.Decider(AlwaysScan(said))
    d.decide({}, {A: win(A, seq(0, 300))}, {DEV: 128}, force={B: "reverse"})
    assert d.streams[A].cls == said and d.streams[B].cls == "reverse"


def test_few_events_decide_nothing():
    d = P.Decider(RuleClassifier())
    assert d.decide({DEV: win(DEV, seq(0, 5))}, {A: win(A, seq(0, 5))}, {DEV: 128}) == []


def test_no_block_device_means_files_only():
    d = P.Decider(RuleClassifier())
    acts = d.decide({DEV: win(DEV, seq(0, 512))}, {A: win(A, seq(0, 512))}, {DEV: None})
    assert [a.kind for a in acts] == ["dontneed"] and acts[0].key == A


# ------------------------------------------------------------ the record

class FakeActuators:
    """Records every call (used only where the kernel must not be touched)."""

    def __init__(self, kb=128):
        self.calls, self.kb = [], {DEV: kb}

    def read_ahead_kb(self, dev):
        return self.kb.get(dev)

    def set_read_ahead_kb(self, dev, kb):
        self.calls.append(("set", dev, kb))
        self.kb[dev] = kb

    def holders(self, keys):
        self.calls.append(("holders", sorted(keys)))
        return {k: [RA.Holder(4242, 3, "/x")] for k in keys}

    def advise(self, pid, fd, key, advice, ahead_pages=0):
        self.calls.append(("advise", pid, fd, key, advice))

    def willneed(self, *a):
        self.calls.append(("willneed", *a))
        return 1

    def dontneed(self, *a):
        self.calls.append(("dontneed", *a))


def test_record_is_written_atomically_and_round_trips(tmp_path):
    path = tmp_path / "run" / "prefetch-state.json"
    rec = P.Record(path)
    rec.owner = {"pid": 1, "create_time": 2.0}
    rec.devices["7:0"] = {"dev": DEV, "read_ahead_kb": 128}
    rec.files["5:3"] = {"pid": 5, "fd": 3, "dev": DEV, "ino": 11, "advice": "random"}
    rec.save()
    assert sorted(p.name for p in path.parent.iterdir()) == ["prefetch-state.json"]
    back = P.Record.load(path)
    assert back.data() == rec.data()
    path.write_text("{not json")
    with pytest.raises(IobridgeError, match="is not a prefetch record"):
        P.Record.load(path)
    path.write_text(json.dumps({"version": 99, "devices": {}, "files": {}}))
    with pytest.raises(IobridgeError, match="version 99"):
        P.Record.load(path)
    assert P.Record.load(tmp_path / "none.json") is None


class Holder:
    """A real process holding a file open (sleeping)."""

    def __init__(self, path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import os,sys,time; fd=os.open(sys.argv[1], os.O_RDONLY); "
             "print(fd, flush=True); time.sleep(600)", str(path)],
            stdout=subprocess.PIPE, text=True)
        self.fd = int(self.proc.stdout.readline())

    def close(self):
        self.proc.kill()
        self.proc.wait()


def fake_sysfs(tmp_path, kb=128):
    q = tmp_path / "sysfs" / "7:0" / "queue"
    q.mkdir(parents=True)
    (q / "read_ahead_kb").write_text(f"{kb}\n")
    return tmp_path / "sysfs"


def file_key(path):
    st = os.stat(path)
    return (blockdev.kdev(os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)


def test_a_killed_agents_record_is_restored_at_the_next_start(tmp_path):
    """A record left by an agent that is gone (kill -9): the next start puts
    the device value back and advises NORMAL on the recorded descriptors
    that are still open, skips those that are gone, and removes the record."""
    sysfs = fake_sysfs(tmp_path, kb=320)
    data = tmp_path / "data"
    data.write_bytes(b"x" * 8192)
    h = Holder(data)
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        rec = P.Record(tmp_path / "state.json")
        rec.owner = {"pid": dead.pid, "create_time": time.time() - 100}
        rec.devices["7:0"] = {"dev": DEV, "read_ahead_kb": 128}
        key = file_key(data)
        rec.files[f"{h.proc.pid}:{h.fd}"] = {"pid": h.proc.pid, "fd": h.fd, "dev": key[0],
                                             "ino": key[1], "advice": "random"}
        rec.files[f"{dead.pid}:3"] = {"pid": dead.pid, "fd": 3, "dev": key[0], "ino": key[1],
                                      "advice": "random"}
        rec.save()
        unit = P.PrefetchUnit(None, RuleClassifier(), "on", tmp_path / "state.json",
                              actuators=RA.Actuators(sysfs=sysfs))
        done = unit.recover()
        assert done == {"devices": 1, "files": 1, "gone": 1, "failed": 0}
        assert (sysfs / "7:0" / "queue" / "read_ahead_kb").read_text().strip() == "128"
        assert not (tmp_path / "state.json").exists()
        assert unit.counters["restores"] == 1 and unit.counters["restored_files"] == 1
    finally:
        h.close()


def test_a_record_of_a_live_agent_is_refused_and_kept(tmp_path):
    import psutil
    sysfs = fake_sysfs(tmp_path, kb=320)
    rec = P.Record(tmp_path / "state.json")
    me = psutil.Process(os.getppid())
    rec.owner = {"pid": me.pid, "create_time": me.create_time()}
    rec.devices["7:0"] = {"dev": DEV, "read_ahead_kb": 128}
    rec.save()
    unit = P.PrefetchUnit(None, RuleClassifier(), "on", tmp_path / "state.json",
                          actuators=RA.Actuators(sysfs=sysfs))
    with pytest.raises(IobridgeError, match=rf"belongs to a running agent \(pid {me.pid}\)"):
        unit.recover()
    assert (tmp_path / "state.json").exists()
    assert (sysfs / "7:0" / "queue" / "read_ahead_kb").read_text().strip() == "320"


# ------------------------------------------------------------ the unit with an observer

class FakeObserver:
    """snapshot() from real map leaves (cabi.CacheStats) built per window."""

    def __init__(self):
        self.epoch = 0
        self.devs = {DEV: cabi.CacheStats()}
        self.files = {A: cabi.CacheStats(), B: cabi.CacheStats()}

    def feed(self, key, indices, reads=0):
        for leaf_ in ((self.devs[key[0]], self.files[key]) if isinstance(key, tuple)
                      else (self.devs[key],)):
            for i in indices:
                kernel_window_add(leaf_.win[self.epoch & 1], i, self.epoch)
            leaf_.insertions += len(indices)
            leaf_.reads += reads

    def file_front(self, key):
        return cs.window_front(self.files[key], self.epoch)

    def forget_files(self, keys):
        gone = [k for k in keys if k in self.files]
        for k in gone:
            del self.files[k]
        return len(gone)

    def next_window(self):
        closed = self.epoch
        self.epoch += 1
        return closed

    def snapshot(self, epoch=None):
        return ({d: cs.Counters.from_leaf(v, epoch) for d, v in self.devs.items()},
                {k: cs.Counters.from_leaf(v, epoch) for k, v in self.files.items()})


def test_window_of_takes_absolute_positions_from_the_observer():
    s = leaf(insertions=100, ra_unused_removed=7, refaults=2, reads=90)
    for i in range(5000, 4900, -1):
        kernel_window_add(s.win[1], i, 3)
    w = P.window_of(A, cs.Counters.from_leaf(s, 3), 128)
    assert (w.lo, w.last) == (4901, 4901) and w.direction == -1.0
    assert (w.ra_wasted, w.refaults, w.reads) == (7, 2, 90)
    assert RuleClassifier().classify(w.feats, False, w.direction) == PF.PREFETCH_CLASSES.index("reverse")


@pytest.mark.parametrize("mode", ["shadow", "on"])
def test_shadow_decides_and_logs_but_changes_nothing(tmp_path, caplog, mode):
    obs = FakeObserver()
    act = FakeActuators()
    unit = P.PrefetchUnit(None, RuleClassifier(), mode, tmp_path / "state.json", actuators=act)
    unit.attach(obs)
    obs.feed(A, seq(0, 300))
    obs.feed(B, rnd(300))
    with caplog.at_level("DEBUG", logger="iobridge.prefetch"):
        acts = unit.step()
    assert {(a.kind, a.key, a.new) for a in acts} == {("device_ra", DEV, 320),
                                                      ("advise", A, "sequential"),
                                                      ("advise", B, "random")}
    assert "prefetch: file 7:0:11: advise as opened -> sequential: class sequential" in caplog.text
    changes = [c for c in act.calls if c[0] != "holders"]
    if mode == "shadow":
        assert act.calls == [] and not (tmp_path / "state.json").exists()
        assert "[shadow] prefetch:" in caplog.text
    else:
        assert sorted(changes) == [("advise", 4242, 3, A, "sequential"),
                                   ("advise", 4242, 3, B, "random"), ("set", DEV, 320)]
        rec = P.Record.load(tmp_path / "state.json")
        assert rec.files == {"4242:3": {"pid": 4242, "fd": 3, "dev": DEV, "ino": 12,
                                        "advice": "random"}}
        unit.stop()
        assert act.calls[-1] == ("advise", 4242, 3, B, "normal")
        assert not (tmp_path / "state.json").exists()
    assert unit.status()["streams_per_class"]["sequential"] == 1


def test_the_record_is_written_before_a_descriptors_first_change_only(tmp_path, monkeypatch):
    """The record is written before the first change to a descriptor (and
    when its number now holds another file), not again for each later
    change of advice: restoring is NORMAL whatever the advice was. A kill
    after the later changes still leaves the descriptor to restore."""
    act = FakeActuators()
    unit = P.PrefetchUnit(None, RuleClassifier(), "on", tmp_path / "state.json", actuators=act)
    saves = []
    real_save = P.Record.save
    monkeypatch.setattr(P.Record, "save", lambda rec: (saves.append(1), real_save(rec)))
    h = RA.Holder(4242, 3, "/x")
    for advice in ("sequential", "random", "normal", "random"):
        assert unit._file_action(P.Action("advise", A, None, advice, "test"), h)
    assert len(saves) == 1
    assert unit.record.files["4242:3"]["advice"] == "random"
    assert P.Record.load(tmp_path / "state.json").files["4242:3"]["ino"] == A[1]
    assert unit._file_action(P.Action("advise", B, None, "random", "test"), h)   # fd reused
    assert len(saves) == 2
    assert P.Record.load(tmp_path / "state.json").files["4242:3"]["ino"] == B[1]


def test_idle_files_leave_the_observers_map_and_count_from_zero_when_back(tmp_path):
    """A file whose counters stay still for PRUNE_IDLE_WINDOWS windows loses
    its map entry (a snapshot reads every entry, every window); one with
    stream state keeps it; a forgotten file that comes back is counted from
    its new entry, not against its old totals."""
    obs, act = FakeObserver(), FakeActuators()
    idle = (DEV, 99)
    obs.files[idle] = leaf(insertions=5000, reads=5000)      # touched before, never again
    unit = P.PrefetchUnit(None, RuleClassifier(), "on", tmp_path / "state.json", actuators=act)
    unit.attach(obs)
    obs.feed(A, seq(0, 300))
    for _ in range(P.PRUNE_IDLE_WINDOWS - 1):     # A gets stream state; B and idle stay still
        unit.step()
        assert idle in obs.files and B in obs.files
    unit.step()
    assert idle not in obs.files and B not in obs.files and A in obs.files
    assert unit.counters["forgotten_files"] == 2
    obs.files[idle] = cabi.CacheStats()          # the kernel makes a new entry
    obs.feed(idle, seq(0, 300))
    devs, files, _ = unit.windows()
    assert files[idle].insertions == 300 and files[idle].lo == 0


# ------------------------------------------------------------ actuator errors

def test_an_unwritable_sysfs_is_named_and_leaves_no_record(tmp_path):
    sysfs = fake_sysfs(tmp_path)
    ra = sysfs / "7:0" / "queue" / "read_ahead_kb"
    ra.unlink()
    ra.mkdir()          # as root, modes do not stop a write: a directory does
    unit = P.PrefetchUnit(None, RuleClassifier(), "on", tmp_path / "state.json",
                          actuators=RA.Actuators(sysfs=sysfs))
    unit.apply([P.Action("device_ra", DEV, 128, 320, "test")])
    assert unit.counters["errors"] == 1 and unit.counters["device_changes"] == 0
    assert not (tmp_path / "state.json").exists()
    with pytest.raises(IobridgeError, match=r"cannot set read_ahead_kb of device 7:0 \(.*\): Is a directory"):
        RA.Actuators(sysfs=sysfs).set_read_ahead_kb(DEV, 320)


def test_a_device_that_vanished_is_named(tmp_path):
    sysfs = fake_sysfs(tmp_path)
    act = RA.Actuators(sysfs=sysfs)
    (sysfs / "7:0" / "queue" / "read_ahead_kb").unlink()
    with pytest.raises(IobridgeError, match="device 7:0 is gone"):
        act.set_read_ahead_kb(DEV, 320)
    assert act.read_ahead_kb(DEV) is None


def test_a_process_that_exited_or_a_reused_descriptor_is_file_gone(tmp_path):
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    other = tmp_path / "other"
    other.write_bytes(b"y")
    h = Holder(data)
    act = RA.Actuators()
    try:
        assert act.holders({file_key(data)}) == {file_key(data): [RA.Holder(h.proc.pid, h.fd,
                                                                             str(data))]}
        act.advise(h.proc.pid, h.fd, file_key(data), "random")      # real pidfd_getfd + fadvise
        with pytest.raises(RA.FileGone, match="now holds another file"):
            act.advise(h.proc.pid, h.fd, file_key(other), "random")
        with pytest.raises(RA.FileGone, match="closed fd 999"):
            act.advise(h.proc.pid, 999, file_key(data), "random")
    finally:
        h.close()
    with pytest.raises(RA.FileGone, match="has exited"):
        act.advise(h.proc.pid, h.fd, file_key(data), "random")


def test_holders_are_scanned_for_once_per_max_age_and_a_gone_one_makes_a_rescan(
        tmp_path, monkeypatch):
    """One /proc scan serves a file's holders for HOLDERS_MAX_AGE_S (the scan
    stats every descriptor of every process); a holder found gone when
    acting leaves the cache, so the next call scans again and finds the
    process that has the file open now."""
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    key = file_key(data)
    scans = []
    real_scan = RA.open_holders
    monkeypatch.setattr(RA, "open_holders",
                        lambda *a, **kw: (scans.append(1), list(real_scan(*a, **kw)))[1])
    act = RA.Actuators()
    first = Holder(data)
    second = None
    try:
        assert act.holders({key}) == {key: [RA.Holder(first.proc.pid, first.fd, str(data))]}
        second = Holder(data)
        assert act.holders({key}) == {key: [RA.Holder(first.proc.pid, first.fd, str(data))]}
        assert len(scans) == 1
        first.close()
        with pytest.raises(RA.FileGone, match="has exited"):
            act.advise(first.proc.pid, first.fd, key, "random")
        assert act.holders({key}) == {key: [RA.Holder(second.proc.pid, second.fd, str(data))]}
        assert len(scans) == 2
        monkeypatch.setattr(RA, "HOLDERS_MAX_AGE_S", 0.0)
        time.sleep(0.01)
        act.holders({key})
        assert len(scans) == 3
        assert act.holders({(DEV, 1)}) == {} and len(scans) == 4   # nobody: looked for each time
        assert act.holders({(DEV, 1)}) == {} and len(scans) == 5
    finally:
        first.close()
        if second is not None:
            second.close()


def test_non_root_is_refused_before_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    unit = P.PrefetchUnit(None, RuleClassifier(), "on", tmp_path / "state.json",
                          actuators=FakeActuators())
    with pytest.raises(IobridgeError, match="the prefetch actuators need root"):
        unit.prepare()
    assert unit.act.calls == []


# ------------------------------------------------------------ config and CLI

def test_prefetch_config_keys(tmp_path):
    cfg = config.load(None)
    assert cfg.prefetch_mode == "off" and cfg.prefetch_window_s == 1.0
    p = tmp_path / "c.toml"
    p.write_text('[prefetch]\nmode = "shadow"\nwindow_s = 2\nstate_file = "/tmp/x.json"\n')
    cfg = config.load(p)
    assert (cfg.prefetch_mode, cfg.prefetch_window_s) == ("shadow", 2)
    assert str(cfg.prefetch_state_file) == "/tmp/x.json"
    p.write_text('[prefetch]\nmode = "sometimes"\n')
    with pytest.raises(config.ConfigError, match=r"prefetch\.mode = 'sometimes' is invalid: "
                                                 "it must be one of off, shadow, on"):
        config.load(p)
    p.write_text('[prefetch]\nprefetch_mode = "on"\n')
    with pytest.raises(config.ConfigError, match=r"unknown key prefetch\.prefetch_mode"):
        config.load(p)


def test_run_prefetch_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--prefetch", "sometimes"])
    assert e.value.code == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


# ------------------------------------------------------------ the agent's wiring

def test_agent_without_an_observer_says_so_in_one_line_and_serves_admission_only(
        tmp_path, monkeypatch, caplog):
    """An observer that cannot attach (here: its refusal for a missing hook,
    raised as the loader raises it): one warning line, prefetch not running,
    the status file's prefetch section says why; a killed agent's record is
    restored all the same (before the observer is tried)."""
    from iobridge.daemon import agent as daemon
    sysfs = fake_sysfs(tmp_path, kb=480)
    rec = P.Record(tmp_path / "state.json")
    rec.owner = {"pid": 999_999_999, "create_time": 1.0}
    rec.devices["7:0"] = {"dev": DEV, "read_ahead_kb": 128}
    rec.save()
    monkeypatch.setattr(RA, "SYSFS_BLOCK", sysfs)

    def refuse(self):
        raise IobridgeError("this kernel lacks page-cache hooks the observer needs: readahead "
                            "(kprobe page_cache_ra_unbounded)")

    monkeypatch.setattr(cs.CacheObserver, "open", refuse)
    cfg = config.Config(status_file=tmp_path / "status.json", prefetch_mode="on",
                        prefetch_state_file=tmp_path / "state.json")

    class Quiet:
        def __getattr__(self, name):
            return lambda *a: None

    agent = daemon.Agent(cfg, notifier=Quiet())
    with caplog.at_level("INFO"):
        agent._start_prefetch()
    warn = [r for r in caplog.records if r.levelname == "WARNING" and "prefetch off" in r.message]
    assert len(warn) == 1 and "\n" not in warn[0].message
    assert "lacks page-cache hooks" in warn[0].message and "admission only" in warn[0].message
    assert (sysfs / "7:0" / "queue" / "read_ahead_kb").read_text().strip() == "128"
    assert not (tmp_path / "state.json").exists()
    st = agent._prefetch_status()
    assert st == {"mode": "on", "running": False, "error": warn[0].message.split("(", 1)[1]
                  .rsplit(")", 1)[0], "classifier_info": P.classifier_info(agent.prefetch_classifier)}
    # the classifier checked at start is named even though it does not run
    assert st["classifier_info"]["path"] == str(config.DEFAULT_PREFETCH_MODEL)
    lines = _status_lines(daemon, st)
    at = lines.index(f"prefetch on: not running ({st['error']})")
    assert lines[at + 1].startswith(f"  classifier {st['classifier_info']['name']}: model "
                                    f"{config.DEFAULT_PREFETCH_MODEL} (sha256 ")
    agent._stop_prefetch()


def test_status_text_has_a_prefetch_line():
    from iobridge.daemon import agent as daemon
    unit = P.PrefetchUnit(None, RuleClassifier(), "shadow", "/nonexistent/state.json",
                          actuators=FakeActuators())
    pf = {"running": True, **unit.status()}
    line = [x for x in _status_lines(daemon, pf) if x.startswith("prefetch")]
    assert line == ["prefetch shadow: 0 windows, 0 actions (0 device, 0 file advice, 0 willneed "
                    "calls, 0 pages dropped behind), 0 restores; streams per class: random 0, "
                    "random+write 0, sequential 0, reverse 0"]
    off = _status_lines(daemon, {"mode": "on", "running": False, "error": "no hooks"})
    assert "prefetch on: not running (no hooks)" in off


def _status_lines(daemon, pf):
    st = {"agent_alive": True, "pid": 1, "status_age_s": 0.1,
          "model": {"path": "m.onnx", "threshold": 0.1, "sha256": "ab" * 32},
          "shadow": False, "tick_ms": 250, "ttl_ticks": 12, "max_silence_ms": 2000,
          "program_attached": True, "pins": [], "counters": {}, "routing": {},
          "timing_us": {p: {"p50_us": 1, "p99_us": 2} for p in daemon.PHASES},
          "targets": [], "prefetch": pf}
    return daemon.format_status(st).splitlines()
