"""Host tests: the dm table line builder and the status parser."""

import pytest
from hypothesis import given
from hypothesis import strategies as hst

from iobridge.kernel import dmtarget
from iobridge.core.errors import UsageError

STATUS = ("0 32768 iobridge 3 17 least_inflight 2 AF 4 0 1 2 "
          "253:0 100 50 0 0 1 90 10 "
          "254:0 7 49 4 1 0 0 7")


def test_parse_status():
    st = dmtarget.parse_status(STATUS)
    assert (st.target_id, st.incarnation, st.policy, st.health) == (3, 17, "least_inflight", "AF")
    assert (st.retries, st.read_failures, st.write_failures, st.hook_rejected) == (4, 0, 1, 2)
    assert [leg.dev for leg in st.legs] == ["253:0", "254:0"]
    assert st.legs[0].healthy and not st.legs[1].healthy
    assert st.legs[0].hook_routed == 90 and st.legs[1].read_errors == 4
    # Without the "START LEN iobridge" prefix too.
    assert dmtarget.parse_status(STATUS.split(" ", 3)[3]) == st


def test_parse_status_hedge_fields():
    st = dmtarget.parse_status(STATUS + " hedge 0 5 12 7 3 2 1 4 6")
    assert st.hedge == dmtarget.HedgeStatus(hedge_us=0, budget_pct=5, issued=12, won=7, lost=3,
                                            refused=2, active=1, bounce_pages=4, nomem=6)
    assert dmtarget.parse_status(STATUS).hedge is None      # a target 1.0 line
    # target 1.3: a budget under 1%, to 4 decimals
    st = dmtarget.parse_status(STATUS + " hedge 0 0.15 12 7 3 2 1 4 6")
    assert st.hedge.budget_pct == 0.15 and st.hedge.issued == 12
    for bad in (" hedge 0 5 12", " hedges 0 5 12 7 3 2 1 4 6", " hedge 0 5 12 7 3 2 1 x 6",
                " hedge 0 0.00001 12 7 3 2 1 4 6", " hedge 0 5. 12 7 3 2 1 4 6",
                " hedge 0 -1 12 7 3 2 1 4 6", " hedge 0 nan 12 7 3 2 1 4 6",
                " hedge 0 5 12 7 3 2 1 4",     # a target 1.1 line: a rebuilt module is owed
                " 253:9"):
        with pytest.raises(dmtarget.IobridgeError):
            dmtarget.parse_status(STATUS + bad)


def test_parse_status_rejects_garbage():
    with pytest.raises(dmtarget.IobridgeError):
        dmtarget.parse_status("0 8 iobridge 0 1 least_inflight 2 AA 0 0")
    with pytest.raises(dmtarget.IobridgeError):   # an ABI 5 line: no incarnation
        dmtarget.parse_status("0 8 iobridge 0 least_inflight 2 AA 0 0 0 0 "
                              "253:0 1 1 0 0 0 0 1 254:0 1 1 0 0 0 0 1")


def test_table_line():
    assert dmtarget.table_line(["/dev/a", "/dev/b"], 8) == "0 8 iobridge 2 /dev/a /dev/b"
    line = dmtarget.table_line(["/dev/a", "/dev/b"], 8, error_threshold=5,
                               policy="primary", strict_writes=True)
    assert line.endswith("2 /dev/a /dev/b 5 error_threshold 5 policy primary strict_writes")
    line = dmtarget.table_line(["/dev/a", "/dev/b"], 8, hedge_us=200, hedge_budget=10)
    assert line.endswith("2 /dev/a /dev/b 4 hedge_us 200 hedge_budget 10")
    line = dmtarget.table_line(["/dev/a", "/dev/b"], 8, hedge_budget=0.15)
    assert line.endswith("2 /dev/a /dev/b 2 hedge_budget 0.15")
    with pytest.raises(UsageError):
        dmtarget.table_line(["/dev/a"], 8)
    with pytest.raises(UsageError):
        dmtarget.table_line(["/dev/a", "/dev/b"], 8, policy="fastest")


@pytest.mark.parametrize("value, arg", [
    (5, "5"), (0, "0"), (100, "100"), (0.15, "0.15"), ("0.15", "0.15"), (12.5, "12.5"),
    (0.0001, "0.0001"), ("3.1000", "3.1"), (99.9999, "99.9999"), (5.0, "5")])
def test_budget_arg_is_what_the_target_takes_and_prints(value, arg):
    assert dmtarget.budget_arg(value) == arg
    assert dmtarget._BUDGET_RE.fullmatch(arg)       # noqa: SLF001 - parses back


@pytest.mark.parametrize("value", [-1, 100.0001, 101, 0.00001, "5%", "x", None, float("nan"),
                                   float("inf"), "", "1e9"])
def test_budget_arg_refuses_what_the_target_would(value):
    with pytest.raises(UsageError, match="percent of reads from 0 to 100 with at most 4 decimals"):
        dmtarget.budget_arg(value)


@given(hst.integers(0, 100 * 10 ** 4))
def test_budget_arg_round_trips_every_millionth(millionths):
    """Every budget the target can hold formats to a string that parses back
    to the same millionths (what the kernel's iob_parse_fixed keeps)."""
    arg = dmtarget.budget_arg(millionths / 10 ** 4)
    whole, _, frac = arg.partition(".")
    assert int(whole) * 10 ** 4 + int((frac or "0").ljust(4, "0")) == millionths
    assert dmtarget._BUDGET_RE.fullmatch(arg)       # noqa: SLF001
