"""Leases over real gRPC and a real redis-server: grant, wait, fill, takeover, the stale-set
race, deadlines, early refresh (XFetch) and the stale window. Gateways here run in the
test's event loop and share one Redis; tests/test_stampede.py runs separate processes."""

from __future__ import annotations

import asyncio
import inspect
import time

import grpc
import pytest
import redis

from cachegw import AsyncClient, Client, Status
from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayFactory, RunningGateway, eventually

SHORT_LEASE = """
[default_class]
lease_timeout_seconds = 0.4
max_wait_seconds = 5
"""

REFRESH = """
[[classes]]
name = "hot"
patterns = ["hot:*"]
ttl_seconds = 5.0
jitter = 0
early_refresh_beta = 50
l1_ttl_seconds = 5

[[classes]]
name = "swr"
patterns = ["swr:*"]
ttl_seconds = 0.3
jitter = 0
stale_seconds = 30
"""


def lease_get(key: str, **kw: object) -> pb.GetRequest:
    return pb.GetRequest(key=key, lease=True, **kw)  # type: ignore[arg-type]


async def test_miss_grants_one_lease_and_the_fill_answers_the_waiters(
    gateway_factory: GatewayFactory,
) -> None:
    a, b = await gateway_factory(), await gateway_factory()
    first = await a.stub.Get(lease_get("k"))
    assert (first.status, first.tier) == (pb.STATUS_LEASED, pb.TIER_ORIGIN)
    assert len(first.lease_token) == 28
    # Every other caller, on either gateway, waits server-side for the holder's fill.
    waiters = [asyncio.ensure_future(gw.stub.Get(lease_get("k"))) for gw in (a, b, b, a)]
    await asyncio.sleep(0.2)
    assert not any(w.done() for w in waiters)
    filled = await a.stub.Set(pb.SetRequest(key="k", value=b"v", lease_token=first.lease_token))
    assert filled.outcome == pb.SET_OUTCOME_STORED
    answers = await asyncio.wait_for(asyncio.gather(*waiters), 2)
    assert [(r.status, r.value) for r in answers] == [(pb.STATUS_HIT, b"v")] * 4
    assert a.server.stats.classes["default"].leases_granted == 1
    assert a.server.stats.classes["default"].lease_fills == 1
    assert b.server.stats.classes["default"].lease_waits >= 1
    # Nothing is left behind in the per-key tables.
    assert len(a.server.cache.leases) == len(b.server.cache.leases) == 0
    assert len(a.server.cache.reads) == len(b.server.cache.reads) == 0


async def test_a_token_fills_once(gateway: RunningGateway) -> None:
    got = await gateway.stub.Get(lease_get("once"))
    req = pb.SetRequest(key="once", value=b"v", lease_token=got.lease_token)
    assert (await gateway.stub.Set(req)).outcome == pb.SET_OUTCOME_STORED
    again = await gateway.stub.Set(req)
    assert again.outcome == pb.SET_OUTCOME_LEASE_INVALID
    assert (await gateway.stub.Get(pb.GetRequest(key="once"))).value == b"v"


@pytest.mark.parametrize(
    "how", ["delete", "invalidate-key", "invalidate-prefix", "tag", "class", "set"]
)
async def test_stale_set_race_refuses_the_old_fill(
    gateway_factory: GatewayFactory, redis_client: redis.Redis, how: str
) -> None:
    toml = '[[classes]]\nname = "item"\npatterns = ["item:*"]\n'
    a, b = await gateway_factory(toml), await gateway_factory(toml)
    if how == "tag":  # the key must carry the tag for a tag invalidation to name it
        await a.stub.Set(pb.SetRequest(key="item:1", value=b"old", tags=["t"]))
        await a.stub.Invalidate(pb.InvalidateRequest(keys=["item:1"]))
        redis_client.zadd("cg:tag:t", {"item:1": time.time() * 1000 + 60_000})
    lease = await a.stub.Get(lease_get("item:1"))
    assert lease.status == pb.STATUS_LEASED
    # The source of truth changes while the holder loads: the writer invalidates via b.
    if how == "delete":
        await b.stub.Delete(pb.DeleteRequest(keys=["item:1"]))
    elif how == "invalidate-key":
        await b.stub.Invalidate(pb.InvalidateRequest(keys=["item:1"]))
    elif how == "invalidate-prefix":
        await b.stub.Invalidate(pb.InvalidateRequest(prefixes=["item:"]))
    elif how == "tag":
        await b.stub.Invalidate(pb.InvalidateRequest(tags=["t"]))
    elif how == "class":
        await b.stub.Invalidate(pb.InvalidateRequest(classes=["item"]))
    else:
        await b.stub.Set(pb.SetRequest(key="item:1", value=b"new"))
    stale = await a.stub.Set(
        pb.SetRequest(key="item:1", value=b"stale", lease_token=lease.lease_token)
    )
    assert stale.outcome == pb.SET_OUTCOME_LEASE_INVALID
    for gw in (a, b):
        got = await gw.stub.Get(pb.GetRequest(key="item:1"))
        assert got.value != b"stale"
    assert a.server.stats.classes["item"].lease_fills_refused == 1


async def test_a_lease_granted_after_a_class_invalidation_fills(
    gateway_factory: GatewayFactory,
) -> None:
    toml = '[[classes]]\nname = "item"\npatterns = ["item:*"]\n'
    a, b = await gateway_factory(toml), await gateway_factory(toml)
    await b.stub.Invalidate(pb.InvalidateRequest(classes=["item"]))
    await b.stub.Invalidate(pb.InvalidateRequest(classes=["item"]))
    lease = await a.stub.Get(lease_get("item:2"))
    assert lease.status == pb.STATUS_LEASED
    out = await a.stub.Set(pb.SetRequest(key="item:2", value=b"v", lease_token=lease.lease_token))
    assert out.outcome == pb.SET_OUTCOME_STORED
    for gw in (a, b):
        assert (await gw.stub.Get(pb.GetRequest(key="item:2"))).value == b"v"


async def test_a_dead_holder_is_taken_over_after_the_lease_timeout(
    gateway_factory: GatewayFactory,
) -> None:
    a, b = await gateway_factory(SHORT_LEASE), await gateway_factory(SHORT_LEASE)
    holder = await a.stub.Get(lease_get("k"))
    assert holder.status == pb.STATUS_LEASED  # ... and never fills
    started = time.monotonic()
    taker = await b.stub.Get(lease_get("k"), timeout=5)
    waited = time.monotonic() - started
    assert taker.status == pb.STATUS_LEASED and taker.lease_token != holder.lease_token
    assert 0.2 < waited < 2.0
    assert b.server.stats.classes["default"].leases_taken_over == 1
    # The dead holder's late fill is refused; the new holder's lands.
    late = pb.SetRequest(key="k", value=b"late", lease_token=holder.lease_token)
    assert (await a.stub.Set(late)).outcome == pb.SET_OUTCOME_LEASE_INVALID
    ok = pb.SetRequest(key="k", value=b"fresh", lease_token=taker.lease_token)
    assert (await b.stub.Set(ok)).outcome == pb.SET_OUTCOME_STORED


async def test_default_lease_is_taken_over_within_the_clients_default_deadline(
    gateway_factory: GatewayFactory,
) -> None:
    # The defaults must agree: after a holder dies, a waiter with the client's default
    # deadline outwaits its lease and takes over, rather than giving up with a MISS and
    # loading by itself (as every other waiter would too).
    deadlines = {
        inspect.signature(cls).parameters["timeout"].default for cls in (Client, AsyncClient)
    }
    assert len(deadlines) == 1, deadlines
    (deadline,) = deadlines
    assert isinstance(deadline, float)
    a, b = await gateway_factory(), await gateway_factory()  # default class settings
    holder = await a.stub.Get(lease_get("k"))
    assert holder.status == pb.STATUS_LEASED  # ... and dies: never fills, never releases
    async with AsyncClient(b.address) as client:
        assert client.timeout == deadline
        started = time.monotonic()
        taker = await client.lookup("k", lease=True)  # the client's default deadline
        waited = time.monotonic() - started
    assert taker.status is Status.LEASED, f"{taker.status} after {waited:.2f}s"
    assert taker.lease_token and taker.lease_token != holder.lease_token
    assert waited < deadline
    assert b.server.stats.classes["default"].leases_taken_over == 1


async def test_waiters_get_miss_before_their_deadline_never_an_error(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory()  # the default lease timeout and max wait
    assert (await gw.stub.Get(lease_get("slow"))).status == pb.STATUS_LEASED
    started = time.monotonic()
    got = await gw.stub.Get(lease_get("slow"), timeout=0.5)
    assert got.status == pb.STATUS_MISS
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    got = await gw.stub.Get(lease_get("slow", max_wait_ms=200), timeout=5)
    assert got.status == pb.STATUS_MISS
    assert 0.15 < time.monotonic() - started < 1.0
    assert gw.server.stats.classes["default"].lease_wait_timeouts == 2


async def test_waiters_in_one_gateway_share_their_redis_calls(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    holder = await gateway.stub.Get(lease_get("shared"))
    redis_client.config_resetstat()
    waiters = [asyncio.ensure_future(gateway.stub.Get(lease_get("shared"))) for _ in range(100)]
    # All of them waiting before the fill (under load some arrived after it, each batch
    # of latecomers with a Redis call of its own).
    await eventually(lambda: gateway.server.stats.classes["default"].lease_waits == 100, 10)
    fill = pb.SetRequest(key="shared", value=b"v", lease_token=holder.lease_token)
    await gateway.stub.Set(fill)
    answers = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert all(r.value == b"v" for r in answers)
    stats = redis_client.info("commandstats")
    # 100 waiters: a handful of lease attempts and polls, not one per caller.
    scripts = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    reads = stats.get("cmdstat_pttl", {}).get("calls", 0)
    assert scripts <= 6, stats
    assert reads <= 10, stats


async def test_bad_lease_tokens_are_invalid_arguments(gateway: RunningGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gateway.stub.Set(pb.SetRequest(key="k", value=b"v", lease_token=b"nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lease_token" in (err.value.details() or "")
    forged = b"\x00" * 28  # the right size, never issued
    out = await gateway.stub.Set(pb.SetRequest(key="k", value=b"v", lease_token=forged))
    assert out.outcome == pb.SET_OUTCOME_LEASE_INVALID


async def test_early_refresh_hands_out_one_refresh_lease_and_nobody_misses(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(REFRESH)
    got = await gw.stub.Get(lease_get("hot:1"))
    # The fill measures a load of at least 200 ms: with beta 50, XFetch picks a refresher
    # with probability above e^-0.5 per Get from the start of the 5 s TTL (a slower
    # machine measures a longer load and picks sooner), long before expiry.
    await asyncio.sleep(0.2)
    await gw.stub.Set(pb.SetRequest(key="hot:1", value=b"v1", lease_token=got.lease_token))
    refreshers: list[pb.GetResponse] = []
    deadline = time.monotonic() + 4
    while not refreshers and time.monotonic() < deadline:
        replies = await asyncio.gather(*(gw.stub.Get(lease_get("hot:1")) for _ in range(20)))
        assert all(r.status == pb.STATUS_HIT and r.value == b"v1" for r in replies)
        refreshers = [r for r in replies if r.refresh]
        await asyncio.sleep(0.02)
    assert len(refreshers) == 1, "exactly one caller is picked to refresh"
    assert refreshers[0].lease_token
    fill = pb.SetRequest(key="hot:1", value=b"v2", lease_token=refreshers[0].lease_token)
    assert (await gw.stub.Set(fill)).outcome == pb.SET_OUTCOME_STORED
    after = await gw.stub.Get(lease_get("hot:1"))
    assert (after.status, after.value) == (pb.STATUS_HIT, b"v2")
    assert gw.server.stats.classes["hot"].misses == 1  # only the first, cold read


async def test_stale_window_serves_stale_while_one_caller_refreshes(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(REFRESH)
    await gw.stub.Set(pb.SetRequest(key="swr:1", value=b"old"))
    await asyncio.sleep(0.4)  # past the 0.3 s TTL, inside the 30 s stale window
    replies = await asyncio.gather(
        *(gw.stub.Get(lease_get("swr:1", allow_stale=True)) for _ in range(10))
    )
    assert [(r.status, r.value) for r in replies] == [(pb.STATUS_STALE, b"old")] * 10
    tokens = [r.lease_token for r in replies if r.refresh]
    assert len(tokens) == 1
    # A caller that does not accept stale data sees the value as missing.
    plain = await gw.stub.Get(pb.GetRequest(key="swr:1"))
    assert plain.status == pb.STATUS_MISS
    fill = pb.SetRequest(key="swr:1", value=b"new", lease_token=tokens[0])
    assert (await gw.stub.Set(fill)).outcome == pb.SET_OUTCOME_STORED
    fresh = await gw.stub.Get(pb.GetRequest(key="swr:1"))
    assert (fresh.status, fresh.value) == (pb.STATUS_HIT, b"new")


async def test_deterministic_jitter_agrees_across_gateways(
    gateway_factory: GatewayFactory,
) -> None:
    toml = "[default_class]\nttl_seconds = 1000\njitter = 0.5\njitter_mode = 'deterministic'\n"
    a, b = await gateway_factory(toml), await gateway_factory(toml)
    ttls = []
    for i in range(20):
        one = await a.stub.Set(pb.SetRequest(key=f"d{i}", value=b"v"))
        two = await b.stub.Set(pb.SetRequest(key=f"d{i}", value=b"v"))
        assert one.ttl_ms == two.ttl_ms
        assert 500_000 <= one.ttl_ms <= 1_000_000
        ttls.append(one.ttl_ms)
    assert len(set(ttls)) > 10  # different keys are still spread
