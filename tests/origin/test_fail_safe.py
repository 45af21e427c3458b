"""Fail-safe: while the origin fails or is slow, a read-through class with
fail_safe_seconds answers the last value STALE (never HIT), for a bounded time; a soft
timeout answers it while the load goes on and fills the cache; a hard timeout gives up.
The origin is tests/origin/flaky_origin.py, its own process, told what to do."""

from __future__ import annotations

import asyncio

import grpc
import redis

from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayFactory, RunningGateway
from tests.origin.flaky import Flaky, class_stats, flaky, past_fresh_life, until

__all__ = ["flaky"]  # the fixture

FAIL_SAFE_MS = 60_000


def toml(origin: str) -> str:
    # The breaker is off: these tests count every Load the origin gets.
    return f"""
[origin]
timeout_seconds = 2.0
[origin.breaker]
enabled = false

[[classes]]
name = "fs"
patterns = ["fs:*"]
ttl_seconds = 1
jitter = 0
l1 = false
origin = "{origin}"
read_policy = "read-through"
fail_safe_seconds = {FAIL_SAFE_MS / 1000:g}
soft_timeout_seconds = 0.3
hard_timeout_seconds = 2.5

[[classes]]
name = "short"
patterns = ["short:*"]
ttl_seconds = 1
jitter = 0
l1 = false
origin = "{origin}"
read_policy = "read-through"
fail_safe_seconds = 2

[[classes]]
name = "hard"
patterns = ["hard:*"]
ttl_seconds = 1
jitter = 0
l1 = false
origin = "{origin}"
read_policy = "read-through"
fail_safe_seconds = 60
soft_timeout_seconds = 0.2
hard_timeout_seconds = 0.5

[[classes]]
name = "plain"
patterns = ["plain:*"]
ttl_seconds = 1
jitter = 0
l1 = false
origin = "{origin}"
read_policy = "read-through"
"""


async def get(gw: RunningGateway, key: str) -> pb.GetResponse:
    reply: pb.GetResponse = await gw.stub.Get(pb.GetRequest(key=key), timeout=10)
    return reply


async def error_of(gw: RunningGateway, key: str) -> tuple[grpc.StatusCode, str]:
    try:
        got = await get(gw, key)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError(f"{key}: answered {pb.Status.Name(got.status)}, not an error")


async def test_an_origin_that_fails_gets_the_last_value_answered_stale_never_hit(
    gateway_factory: GatewayFactory, flaky: Flaky, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(flaky.address))
    first = await get(gw, "fs:a")
    assert (first.status, first.value, first.tier) == (pb.STATUS_HIT, b"fs:a@1", pb.TIER_ORIGIN)
    plain = await get(gw, "plain:a")
    await past_fresh_life(redis_client, "fs:a", FAIL_SAFE_MS)
    flaky.mode("down")
    for attempt in (1, 2):
        got = await get(gw, "fs:a")
        assert (got.status, got.value, got.version) == (pb.STATUS_STALE, b"fs:a@1", first.version)
        assert (got.tier, got.ttl_remaining_ms, got.key_class) == (pb.TIER_L2, 0, "fs")
        assert flaky.loads("fs:a") == 1 + attempt  # the origin was asked each time
    counts = await class_stats(gw.stub, "fs")
    assert (counts.fail_safe_errors, counts.stale, counts.origin_errors) == (2, 2, 2)
    # A class without fail-safe answers the origin's failure once its value expired.
    await until(lambda: not redis_client.exists(f"cg:{{{'plain:a'}}}"), "plain:a expired")
    code, details = await error_of(gw, "plain:a")
    assert code == grpc.StatusCode.UNAVAILABLE and "the database is down" in details
    assert plain.status == pb.STATUS_HIT
    # The origin is back: the next read loads it again.
    flaky.mode("ok")
    again = await get(gw, "fs:a")
    assert (again.status, again.tier) == (pb.STATUS_HIT, pb.TIER_ORIGIN)


async def test_the_last_value_is_answered_for_fail_safe_seconds_and_no_longer(
    gateway_factory: GatewayFactory, flaky: Flaky, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(flaky.address))
    assert (await get(gw, "short:a")).status == pb.STATUS_HIT
    await past_fresh_life(redis_client, "short:a", 2000)
    flaky.mode("down")
    assert (await get(gw, "short:a")).status == pb.STATUS_STALE
    # Redis keeps it fail_safe_seconds past its fresh life, then it is gone.
    await until(lambda: not redis_client.exists(f"cg:{{{'short:a'}}}"), "short:a gone")
    code, details = await error_of(gw, "short:a")
    assert code == grpc.StatusCode.UNAVAILABLE and "the database is down" in details


async def test_a_soft_timeout_answers_stale_while_one_load_goes_on_and_fills_the_cache(
    gateway_factory: GatewayFactory, flaky: Flaky, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(flaky.address))
    first = await get(gw, "fs:slow")
    await past_fresh_life(redis_client, "fs:slow", FAIL_SAFE_MS)
    newer = await flaky.store("fs:slow", b"newer")  # the owner changed it meanwhile
    flaky.mode("slow 1.2")
    answers = await asyncio.gather(*(get(gw, "fs:slow") for _ in range(20)))
    assert {(a.status, a.value) for a in answers} == {(pb.STATUS_STALE, first.value)}
    # The load went on after the callers were answered, and filled the cache.
    flaky.mode("ok")

    async def filled() -> bool:
        got = await get(gw, "fs:slow")
        return got.status == pb.STATUS_HIT and got.value == b"newer"

    await until(filled, "the background load filled the cache")
    got = await get(gw, "fs:slow")
    assert (got.version, got.tier) == (newer, pb.TIER_L2)
    assert flaky.loads("fs:slow") == 2  # the first, and one for all 20 callers
    assert (await class_stats(gw.stub, "fs")).fail_safe_timeouts >= 20


async def test_a_hard_timeout_gives_up_with_deadline_exceeded_or_the_last_value(
    gateway_factory: GatewayFactory, flaky: Flaky, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(flaky.address))
    warm = await get(gw, "hard:warm")
    await past_fresh_life(redis_client, "hard:warm", FAIL_SAFE_MS)
    flaky.mode("slow 5")
    # No last value: the load gives up at the class's hard timeout.
    code, details = await error_of(gw, "hard:cold")
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer within 0.5s" in details and "hard_timeout_seconds" in details
    # A last value: STALE at the soft timeout; the load gives up at the hard one and
    # releases its lease, leaving the last value in place.
    got = await get(gw, "hard:warm")
    assert (got.status, got.value) == (pb.STATUS_STALE, warm.value)
    await until(lambda: not redis_client.exists(f"cg:{{{'hard:warm'}}}:lease"), "lease released")
    assert (await class_stats(gw.stub, "hard")).origin_errors == 2
    again = await get(gw, "hard:warm")
    assert (again.status, again.value) == (pb.STATUS_STALE, warm.value)


async def test_a_get_many_answers_stale_when_every_failed_key_has_a_last_value(
    gateway_factory: GatewayFactory, flaky: Flaky, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(flaky.address))
    keys = ["fs:m1", "fs:m2"]
    first = await gw.stub.GetMany(pb.GetManyRequest(keys=keys))
    assert [r.status for r in first.results] == [pb.STATUS_HIT] * 2
    for key in keys:
        await past_fresh_life(redis_client, key, FAIL_SAFE_MS)
    flaky.mode("down")
    got = await gw.stub.GetMany(pb.GetManyRequest(keys=keys))
    assert [(r.status, r.value) for r in got.results] == [
        (pb.STATUS_STALE, r.value) for r in first.results
    ]
    assert flaky.loads("fs:m1") == 2 and "2 keys" in flaky.process.calls("Load", "fs:m1")[-1]
    # A key without a last value needs its load: the batch fails whole, as without it.
    try:
        await gw.stub.GetMany(pb.GetManyRequest(keys=[*keys, "fs:cold"]))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    else:
        raise AssertionError("a GetMany with a cold key was answered")


async def test_over_two_gateways_a_slow_origin_gets_one_load_and_every_caller_the_last_value(
    gateway_factory: GatewayFactory, flaky: Flaky, redis_client: redis.Redis
) -> None:
    a = await gateway_factory(toml(flaky.address))
    b = await gateway_factory(toml(flaky.address))
    first = await get(a, "fs:two")
    await past_fresh_life(redis_client, "fs:two", FAIL_SAFE_MS)
    flaky.mode("slow 1.0")
    answers = await asyncio.gather(*(get(gw, "fs:two") for gw in [a, b] * 10))
    # The callers of both gateways waited 0.3 s at most: the one Load (under the lease,
    # on one of them) went on.
    assert {(x.status, x.value) for x in answers} == {(pb.STATUS_STALE, first.value)}
    assert flaky.loads("fs:two") == 2
    flaky.mode("ok")

    async def fresh_on_both() -> bool:
        got = [await get(gw, "fs:two") for gw in (a, b)]
        return all(g.status == pb.STATUS_HIT for g in got)

    await until(fresh_on_both, "the one load filled the cache for both")
    assert flaky.loads("fs:two") == 2
