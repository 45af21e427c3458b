"""Every numeric field of the requests at the limits of its protobuf type: answered
INVALID_ARGUMENT (naming the field) or with a correct result, never an overflow turned
into UNKNOWN, INTERNAL, or an error reply from Redis (UNAVAILABLE)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from cachegw.v1 import cache_pb2 as pb
from tests.conftest import RunningGateway

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
MAX_TTL_MS = 86_400_000  # server.max_ttl_seconds = 86400 below


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def _invalid(call: Awaitable[Any], *fragments: str) -> None:
    code, details = await _code(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    for fragment in fragments:
        assert fragment in details, details


@pytest.fixture
async def gw(gateway_factory: Any) -> RunningGateway:
    g: RunningGateway = await gateway_factory(server__max_ttl_seconds=86400)
    return g


async def test_ttl_fields_at_their_limits(gw: RunningGateway) -> None:
    s = gw.stub
    for ttl in (INT64_MIN, -1, 0, MAX_TTL_MS + 1, INT64_MAX):
        await _invalid(s.Set(pb.SetRequest(key="k", value=b"v", ttl_ms=ttl)), "ttl_ms")
        await _invalid(s.Touch(pb.TouchRequest(key="k", ttl_ms=ttl)), "ttl_ms")
        await _invalid(s.Incr(pb.IncrRequest(key="k", delta=1, ttl_ms=ttl)), "ttl_ms")
        entry = pb.WarmupEntry(key="k", value=b"v", ttl_ms=ttl)
        await _invalid(s.Warmup(pb.WarmupRequest(entries=[entry])), "entries[0].ttl_ms")
        many = pb.SetManyRequest(entries=[pb.SetRequest(key="k", value=b"v", ttl_ms=ttl)])
        await _invalid(s.SetMany(many), "entries[0].ttl_ms")
    stored = await s.Set(pb.SetRequest(key="k", value=b"v", ttl_ms=MAX_TTL_MS))
    assert stored.outcome == pb.SET_OUTCOME_STORED and 0 < stored.ttl_ms <= MAX_TTL_MS
    touched = await s.Touch(pb.TouchRequest(key="k", ttl_ms=MAX_TTL_MS))
    assert touched.touched and 0 < touched.ttl_ms <= MAX_TTL_MS
    left = await s.Ttl(pb.TtlRequest(key="k"))
    assert left.exists and 0 < left.ttl_remaining_ms <= MAX_TTL_MS


async def test_incr_at_the_int64_limits(gw: RunningGateway) -> None:
    s = gw.stub
    low = await s.Incr(pb.IncrRequest(key="low", delta=INT64_MIN))
    assert (low.value, low.created) == (INT64_MIN, True)
    code, details = await _code(s.Incr(pb.IncrRequest(key="low", delta=-1)))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "nothing changed" in details
    assert (await s.Incr(pb.IncrRequest(key="low", delta=INT64_MAX))).value == -1
    high = await s.Incr(pb.IncrRequest(key="high", delta=INT64_MAX))
    assert high.value == INT64_MAX
    for delta in (1, INT64_MAX):
        code, _ = await _code(s.Incr(pb.IncrRequest(key="high", delta=delta)))
        assert code == grpc.StatusCode.OUT_OF_RANGE
    assert (await s.Incr(pb.IncrRequest(key="high", delta=INT64_MIN))).value == -1
    assert (await s.Incr(pb.IncrRequest(key="high", delta=0))).value == -1


async def test_compare_and_set_versions_at_the_uint64_limit(gw: RunningGateway) -> None:
    s = gw.stub
    for version in (UINT64_MAX, 2**63, 2**53 + 1, 2**53):
        out = await s.Set(pb.SetRequest(key="cas", value=b"v", if_version=version))
        assert out.outcome == pb.SET_OUTCOME_VERSION_CONFLICT, version
    first = await s.Set(pb.SetRequest(key="cas", value=b"v", if_version=0))
    assert first.outcome == pb.SET_OUTCOME_STORED
    out = await s.Set(pb.SetRequest(key="cas", value=b"w", if_version=UINT64_MAX))
    assert (out.outcome, out.version) == (pb.SET_OUTCOME_VERSION_CONFLICT, first.version)


async def test_enums_out_of_range(gw: RunningGateway) -> None:
    s = gw.stub
    for condition in (3, -1, 2**31 - 1, -(2**31)):
        request = pb.SetRequest(key="e", value=b"v", condition=condition)  # type: ignore[arg-type]
        await _invalid(s.Set(request), "condition")
    for algorithm in (3, -1, 2**31 - 1):
        limit = pb.RateLimit(rate=1, period_ms=1000, algorithm=algorithm)  # type: ignore[arg-type]
        await _invalid(s.Allow(pb.AllowRequest(key="e", limit=limit)), "limit.algorithm")


async def test_allow_limits_at_their_extremes(gw: RunningGateway) -> None:
    s = gw.stub
    day = 86_400_000
    refused = [
        (pb.RateLimit(rate=0, period_ms=1000), 0, "limit.rate"),
        (pb.RateLimit(rate=UINT64_MAX, period_ms=1000), 0, "limit.rate"),
        (pb.RateLimit(rate=1, period_ms=0), 0, "limit.period_ms"),
        (pb.RateLimit(rate=1, period_ms=UINT64_MAX), 0, "limit.period_ms"),
        (pb.RateLimit(rate=10**9, period_ms=1), 0, "limit.rate"),
        (pb.RateLimit(rate=1, period_ms=1000, burst=UINT64_MAX), 0, "limit.burst"),
        (pb.RateLimit(rate=1, period_ms=day, burst=10**9), 0, "limit.burst"),
        (pb.RateLimit(rate=5, period_ms=1000), UINT64_MAX, "cost"),
        (
            pb.RateLimit(rate=5, period_ms=1000, algorithm=pb.RATE_ALGORITHM_SLIDING_WINDOW),
            6,
            "cost",
        ),
    ]
    for limit, cost, field in refused:
        await _invalid(s.Allow(pb.AllowRequest(key="a", limit=limit, cost=cost)), field)
    accepted = [
        (pb.RateLimit(rate=10**9, period_ms=day, burst=10**9), 10**9),
        (
            pb.RateLimit(rate=10**9, period_ms=day, algorithm=pb.RATE_ALGORITHM_SLIDING_WINDOW),
            10**9,
        ),
        (pb.RateLimit(rate=1, period_ms=1), 1),
        (pb.RateLimit(rate=1, period_ms=1, algorithm=pb.RATE_ALGORITHM_SLIDING_WINDOW), 1),
        (pb.RateLimit(rate=1000, period_ms=1), 1000),
    ]
    for i, (limit, cost) in enumerate(accepted):
        first = await s.Allow(pb.AllowRequest(key=f"x{i}", limit=limit, cost=cost))
        assert first.allowed, (limit, first)
        assert first.retry_after_ms == 0 and 0 <= first.reset_after_ms <= 2 * day
        again = await s.Allow(pb.AllowRequest(key=f"x{i}", limit=limit, cost=cost))
        assert again.retry_after_ms >= 0 and again.remaining <= limit.rate


async def test_get_waits_are_bounded_by_the_deadline(gw: RunningGateway) -> None:
    s = gw.stub
    leased = await s.Get(pb.GetRequest(key="w", lease=True))
    assert leased.status == pb.STATUS_LEASED
    # Another caller with max_wait_ms at uint32's limit (49 days) waits for the holder
    # no longer than its deadline allows.
    code, _ = await _code(
        s.Get(pb.GetRequest(key="w", lease=True, max_wait_ms=UINT32_MAX), timeout=1.0)
    )
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
    stats = await s.Stats(pb.StatsRequest(top_keys=UINT32_MAX))
    assert len(stats.hot_keys) < 100


async def test_subscribe_since_past_a_stream_id(gw: RunningGateway) -> None:
    # A Redis stream id is two unsigned 64-bit parts: a larger one used to reach Redis,
    # whose error reply came back as UNAVAILABLE ("retry, and report it").
    s = gw.stub
    await s.Invalidate(pb.InvalidateRequest(keys=["ev"]))  # the stream exists
    for since in ("18446744073709551616-0", "0-18446744073709551616", "9" * 20 + "-" + "9" * 20):
        stream = s.Subscribe(pb.SubscribeRequest(since=since))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(stream.read(), 5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "since" in (err.value.details() or "")
    stream = s.Subscribe(pb.SubscribeRequest(since=f"{UINT64_MAX}-{UINT64_MAX}"))
    first = await asyncio.wait_for(stream.read(), 5)
    assert isinstance(first, pb.InvalidationEvent) and first.kind == pb.EVENT_KIND_RESET
    stream.cancel()


async def test_very_long_tags_and_many_tags(gw: RunningGateway) -> None:
    s = gw.stub
    longest = "t" * 511 + "{"  # server.max_key_bytes (512) bytes
    stored = await s.Set(pb.SetRequest(key="tagged", value=b"v", tags=[longest, "\x00*"]))
    assert stored.outcome == pb.SET_OUTCOME_STORED
    for tag in ("t" * 513, "é" * 257, "x" * 1_000_000):
        await _invalid(s.Set(pb.SetRequest(key="k", value=b"v", tags=[tag])), "tags[0]")
        await _invalid(s.Invalidate(pb.InvalidateRequest(tags=[tag])), "tags[0]")
    many = [f"t{i}" for i in range(33)]
    await _invalid(s.Set(pb.SetRequest(key="k", value=b"v", tags=many)), "tags has 33")
    out = await s.Invalidate(pb.InvalidateRequest(tags=[longest]))
    assert out.removed == 1
    assert (await s.Get(pb.GetRequest(key="tagged"))).status == pb.STATUS_MISS
