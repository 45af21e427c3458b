"""The soak, shortened (benchmarks/soak.py; `make soak` runs 10 minutes): mixed load on
two gateway processes with subscriptions that come and go, then subscribe/cancel cycles.
Only the counts are checked here (asyncio tasks, open descriptors, open streams), never
RSS: memory is judged by the full run's aims, not by a test."""

from __future__ import annotations

import asyncio
import tempfile
from contextlib import ExitStack
from pathlib import Path

import pytest

from benchmarks import soak
from benchmarks.harness import start_gateways
from cachegw_gateway.managed_redis import ManagedRedis


# A soak: `make test-slow` (and CI) runs it; `make test` stays under its time budget.
@pytest.mark.slow
def test_a_short_soak_leaves_nothing_behind() -> None:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        redis = stack.enter_context(ManagedRedis())
        gateways = start_gateways(stack, 2, redis.url, soak.CONFIG, Path(tmp))
        outcome = asyncio.run(soak.run([g.address for g in gateways], 0.3, 1000))
    assert outcome.ops > 1000, outcome
    assert not outcome.errors, outcome.errors
    m = outcome.measured
    assert m["tasks"] <= 2 and m["fds"] <= 2, m
    assert m["cycle tasks"] <= 2 and m["cycle fds"] <= 2, m
    assert m["cycle streams"] == 0, m
