"""Latency histogram maths (pure logic, mirrors bpf/observer.bpf.c)."""

import numpy as np
import pytest

from iobridge.core import histogram as h


def test_small_values_get_one_slot_each():
    assert [h.slot_of(v) for v in range(8)] == list(range(8))


@pytest.mark.parametrize("value", [8, 9, 15, 16, 100, 1000, 4095, 4096, 1_000_000, 2**39 + 7])
def test_every_value_lies_inside_its_slot_bounds(value):
    low, high = h.slot_bounds(h.slot_of(value))
    assert low <= value < high


def test_slots_tile_the_line_without_gaps():
    for slot in range(h.SLOTS - 1):
        assert h.slot_bounds(slot)[1] == h.slot_bounds(slot + 1)[0]


def test_slot_width_is_at_most_an_eighth_of_the_value():
    for slot in range(8, h.SLOTS):
        low, high = h.slot_bounds(slot)
        assert (high - low) / low <= 0.125


def test_huge_values_land_in_the_last_slot():
    assert h.slot_of(2**62) == h.SLOTS - 1


def test_percentiles_of_a_known_distribution_within_one_slot():
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=np.log(200_000), sigma=0.6, size=20_000).astype(np.int64)
    hist = h.from_samples(samples)
    for q in (50, 90, 99, 99.9):
        want = np.percentile(samples, q)
        got = h.percentiles(hist, [q])[0]
        assert abs(got - want) / want < 0.125, (q, got, want)


def test_percentiles_of_a_single_value():
    hist = h.from_samples([1_000_000] * 10)
    low, high = h.slot_bounds(h.slot_of(1_000_000))
    for p in h.percentiles(hist, [0, 50, 100]):
        assert low <= p <= high


def test_empty_histogram_has_no_percentiles():
    assert h.percentiles(np.zeros(h.SLOTS), [50, 99]) == [None, None]


def test_percentile_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="outside 0..100"):
        h.percentiles(h.from_samples([5]), [101])
