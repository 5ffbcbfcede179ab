"""Host tests: the dm table line builder and the status parser."""

import pytest

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
    for bad in (" hedge 0 5 12", " hedges 0 5 12 7 3 2 1 4 6", " hedge 0 5 12 7 3 2 1 x 6",
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
    with pytest.raises(UsageError):
        dmtarget.table_line(["/dev/a"], 8)
    with pytest.raises(UsageError):
        dmtarget.table_line(["/dev/a", "/dev/b"], 8, policy="fastest")
