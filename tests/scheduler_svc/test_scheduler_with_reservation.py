"""Every scheduler test again with ``block_reservation="predicted"``: reservation only
changes when requests run, so the simulated runner's exact outputs and contract checks
must hold unchanged."""

import pytest

from tests.scheduler_svc import test_scheduler as base
from tests.scheduler_svc.test_scheduler import *  # noqa: F401,F403 - re-collected here

_make_scheduler = base.make_scheduler


@pytest.fixture(autouse=True)
def _reservation_on(monkeypatch):
    def make_scheduler(num_blocks=64, block_size=4, **kwargs):
        scheduler = _make_scheduler(num_blocks, block_size,
                                    **{"block_reservation": "predicted", **kwargs})
        assert scheduler.reservation is not None
        return scheduler

    monkeypatch.setattr(base, "make_scheduler", make_scheduler)

# These two assert that a small pool preempts; reservation exists to avoid exactly that.
# test_block_reservation.py checks the same workloads with their reservation outcome.
for _name in ("test_small_pool_preempts_and_recomputes",
              "test_preemption_victim_is_lowest_priority_then_latest"):
    globals().pop(_name)
