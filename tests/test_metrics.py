"""Prometheus metrics (daemon/metrics.py) on the host: the listen address,
the histogram folding, and a scrape over loopback of a collector fed by a
stand-in agent (pure formatting; the VM test scrapes a real agent and
compares with `dmsetup status`)."""

from __future__ import annotations

import socket
import types
import urllib.request

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iobridge.core import histogram
from iobridge.core.errors import IobridgeError
from iobridge.daemon import metrics as M
from iobridge.daemon.agent import PhaseTimes
from iobridge.kernel import blockdev, cachestat
from iobridge.kernel.dmtarget import HedgeStatus, LegStatus, TargetStatus


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:65535", ("::1", 65535)), ("localhost:9464", ("localhost", 9464))])
def test_listen_address_accepted(text, want):
    assert M.parse_listen(text) == want


@pytest.mark.parametrize("text,says", [
    ("9464", "is not ADDR:PORT"), ("", "is not ADDR:PORT"),
    ("::1:9464", "in brackets"), ("[1.2.3.4]:80", "IPv6"), ("example.org:80", "not an IP"),
    ("127.0.0.1:0", "from 1 to 65535"), ("127.0.0.1:65536", "from 1 to 65535"),
    ("127.0.0.1:http", "from 1 to 65535"), (":9464", "not an IP")])
def test_listen_address_refused_with_the_reason(text, says):
    with pytest.raises(ValueError, match=says):
        M.parse_listen(text)


@given(st.text(max_size=40))
def test_listen_address_never_raises_anything_but_value_error(text):
    try:
        host, port = M.parse_listen(text)
    except ValueError:
        return
    assert 1 <= port <= 65535 and host


def test_histogram_buckets_are_exact_and_cumulative():
    values = [0, 7, 1023, 1024, 1025, 4096, 70_000, 5 * 10**9, 10**12]
    buckets, total = M.prometheus_buckets(histogram.from_samples(values))
    les = [float(le) for le, _ in buckets[:-1]]
    counts = [c for _, c in buckets]
    assert buckets[-1] == ("+Inf", len(values))
    assert counts == sorted(counts)                       # cumulative
    for le, count in zip(les, counts):
        assert count == sum(v / 1e9 < le for v in values), le
    assert total == pytest.approx(sum(values) / 1e9, rel=0.07)
    assert M.prometheus_buckets(np.zeros(histogram.SLOTS))[0][-1] == ("+Inf", 0.0)


def _agent(prefetch=None):
    legs = [LegStatus("7:0", "A", 10, 2, 0, 0, 1, 9, 1), LegStatus("7:1", "D", 4, 2, 1, 0, 0, 3, 1)]
    times = PhaseTimes()
    for ns in (2_000_000, 3_000_000):
        times.add("infer", ns)
    policy = types.SimpleNamespace(
        stats=lambda: {"calls": 14, "routed": 12, "default": 2, "silent": 1, "probes": 3},
        decision_age_hist=lambda: histogram.from_samples([1_000_000] * 5))
    counters = dict.fromkeys(("recomputes", "decision_changes", "reloads", "reload_failures",
                              "ticks", "overruns", "tick_errors"), 0)
    counters.update(recomputes=2, ticks=40)
    return types.SimpleNamespace(
        cfg=types.SimpleNamespace(model="/m/a.onnx"), model=types.SimpleNamespace(sha256="ab" * 32),
        maker=types.SimpleNamespace(threshold=0.08), policy=policy, counters=counters, times=times,
        prefetch=prefetch,
        target_statuses=lambda: [("iob_t", TargetStatus(3, 9, "learned", "AD", 0, 0, 0, 0, legs,
                                                        HedgeStatus(0, 5, 7, 4, 3, 2, 0, 0, 1)))])


def test_scrape_over_loopback_shows_every_family_with_its_labels():
    lines = _scrape(_agent())
    assert "iobridge_up 1.0" in lines
    assert any(line.startswith('iobridge_model_info{path="/m/a.onnx",sha256="abab') for line in lines)
    assert 'iobridge_reads_routed_by_table_total{dev="7:0",leg="0",target="iob_t"} 9.0' in lines
    assert 'iobridge_reads_routed_by_default_total{dev="7:1",leg="1",target="iob_t"} 1.0' in lines
    assert 'iobridge_leg_healthy{dev="7:1",leg="1",target="iob_t"} 0.0' in lines
    assert "iobridge_route_silent_total 1.0" in lines and "iobridge_route_probes_total 3.0" in lines
    assert "iobridge_agent_recomputes_total 2.0" in lines
    assert 'iobridge_hedges_issued_total{target="iob_t"} 7.0' in lines
    assert 'iobridge_hedges_refused_total{target="iob_t"} 2.0' in lines
    assert 'iobridge_hedges_nomem_total{target="iob_t"} 1.0' in lines
    assert 'iobridge_decision_age_seconds_bucket{le="+Inf"} 5.0' in lines
    assert 'iobridge_recompute_seconds_bucket{le="+Inf"} 2.0' in lines
    assert 'iobridge_recompute_seconds_bucket{le="0.001048576"} 0.0' in lines


def _scrape(agent) -> set[str]:
    server = M.MetricsServer(f"127.0.0.1:{_free_port()}")
    server.start(agent)
    try:
        return set(urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                          timeout=10).read().decode().splitlines())
    finally:
        server.stop()


def test_without_prefetch_no_prefetch_family_is_shown():
    assert not any("prefetch" in line or "pagecache" in line for line in _scrape(_agent()))


def test_prefetch_unit_and_page_cache_counters_per_device():
    counters = dict.fromkeys((k for k, _ in M.PREFETCH_COUNTERS), 0)
    counters.update(windows=12, actions=3, device_changes=1, file_advice=2, gone=1)
    vals = cachestat.Counters.empty().values
    vals.update(reads=100, hits=60, ra_pages=50, ra_used=30, ra_unused_removed=20, refaults=4)
    unit = types.SimpleNamespace(
        mode="on", counters=counters,
        classifier_info=lambda: {"name": "prefetch-default", "path": "/m/p.onnx", "sha256": "cd" * 32},
        device_counters=lambda: {blockdev.kdev(254, 1): cachestat.Counters(vals, ra_pages_setting=32)})
    lines = _scrape(_agent(prefetch=unit))
    assert any(line.startswith('iobridge_prefetch_info{classifier="prefetch-default",mode="on"')
               for line in lines), sorted(lines)
    assert "iobridge_prefetch_windows_total 12.0" in lines
    assert "iobridge_prefetch_file_advice_total 2.0" in lines
    assert "iobridge_prefetch_gone_total 1.0" in lines
    assert 'iobridge_pagecache_reads_total{dev="254:1"} 100.0' in lines
    assert 'iobridge_pagecache_hits_total{dev="254:1"} 60.0' in lines
    assert 'iobridge_pagecache_readahead_used_total{dev="254:1"} 30.0' in lines
    assert 'iobridge_pagecache_readahead_evicted_unused_total{dev="254:1"} 20.0' in lines
    assert 'iobridge_pagecache_refaults_total{dev="254:1"} 4.0' in lines
    assert 'iobridge_pagecache_readahead_bytes{dev="254:1"} 131072.0' in lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = M.MetricsServer(f"127.0.0.1:{port}")
        with pytest.raises(IobridgeError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            server.start(_agent())
        server.stop()        # nothing to stop: no error


def test_config_key_and_option_refuse_a_bad_address(tmp_path):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from iobridge.daemon import config  # noqa: PLC0415
    cfg = tmp_path / "m.toml"
    cfg.write_text('[agent]\nmetrics_listen = "example.org:9464"\n')
    with pytest.raises(config.ConfigError, match=r"agent\.metrics_listen = 'example.org:9464' is invalid"):
        config.load(cfg)
    cfg.write_text('[agent]\nmetrics_listen = "[::1]:9464"\n')
    assert config.load(cfg).metrics_listen == "[::1]:9464"
    assert config.load(None).metrics_listen == ""          # off by default
    proc = subprocess.run([sys.executable, "-m", "iobridge.cli", "run", "--metrics-listen", "9464"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "argument --metrics-listen: '9464' is not ADDR:PORT" in proc.stderr
    assert "Traceback" not in proc.stderr
