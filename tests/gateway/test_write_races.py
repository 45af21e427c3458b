"""Races on the write and invalidation paths, driven to the exact await where they bite.

Faults are injected at the store's edge of one gateway (a delay after Redis answered, or
another gateway's write landing at that moment); Redis itself is real and decides
everything it decides in production.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayFactory, RunningGateway, eventually

SHORT = 0.3  # a caller's deadline that fires during the injected delay


def after_reply(
    store: RedisStore, method: str, then: Callable[[], Awaitable[None]]
) -> Callable[[], None]:
    """Run `then()` right after `store.<method>` got Redis's answer, before the gateway
    goes on; returns the undo."""
    original = getattr(store, method)

    async def hooked(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        await then()
        return result

    setattr(store, method, hooked)
    return lambda: setattr(store, method, original)


async def two_gateways_holding(
    gateway_factory: GatewayFactory, key: str, value: bytes
) -> tuple[RunningGateway, RunningGateway]:
    a: RunningGateway = await gateway_factory()
    b: RunningGateway = await gateway_factory()
    await a.stub.Set(pb.SetRequest(key=key, value=value))
    for gw in (a, b):
        got = await gw.stub.Get(pb.GetRequest(key=key))
        assert got.value == value
    assert key in b.server.l1
    return a, b


# -- defect 3: an applied write is a published write ---------------------------------------


@pytest.mark.parametrize("rpc", ["set", "delete", "invalidate_prefix", "invalidate_tag"])
async def test_a_deadline_after_the_redis_write_still_publishes(
    gateway_factory: GatewayFactory, rpc: str
) -> None:
    a: RunningGateway = await gateway_factory()
    b: RunningGateway = await gateway_factory()
    await a.stub.Set(pb.SetRequest(key="inv:1", value=b"old", tags=["t"]))
    assert (await b.stub.Get(pb.GetRequest(key="inv:1"))).value == b"old"
    assert "inv:1" in b.server.l1
    method = {
        "set": "set",
        "delete": "delete_each",
        "invalidate_prefix": "delete_prefixes",
        "invalidate_tag": "delete_tag",
    }[rpc]
    # Redis applies the write; the caller's deadline fires before the gateway goes on.
    after_reply(a.server.store, method, lambda: asyncio.sleep(1.0))
    call: Awaitable[object]
    if rpc == "set":
        call = a.stub.Set(pb.SetRequest(key="inv:1", value=b"new"), timeout=SHORT)
    elif rpc == "delete":
        call = a.stub.Delete(pb.DeleteRequest(keys=["inv:1"]), timeout=SHORT)
    elif rpc == "invalidate_prefix":
        call = a.stub.Invalidate(pb.InvalidateRequest(prefixes=["inv:"]), timeout=SHORT)
    else:
        call = a.stub.Invalidate(pb.InvalidateRequest(tags=["t"]), timeout=SHORT)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The write landed in Redis; the other gateway must drop its copy.
    await eventually(lambda: "inv:1" not in b.server.l1, 3)
    got = await b.stub.Get(pb.GetRequest(key="inv:1"))
    assert got.value != b"old"


# -- defect 4: the write path fills L1 under the read path's guard --------------------------


async def test_an_invalidation_between_the_write_and_the_fill_wins(
    gateway_factory: GatewayFactory,
) -> None:
    a: RunningGateway = await gateway_factory()
    b: RunningGateway = await gateway_factory()
    received = a.server.stats.invalidations_received

    async def other_gateway_invalidates() -> None:
        await b.stub.Invalidate(pb.InvalidateRequest(keys=["race:k"]))
        await eventually(lambda: a.server.stats.invalidations_received > received)

    undo = after_reply(a.server.store, "set", other_gateway_invalidates)
    await a.stub.Set(pb.SetRequest(key="race:k", value=b"v1"))
    undo()
    assert "race:k" not in a.server.l1
    got = await a.stub.Get(pb.GetRequest(key="race:k"))
    assert got.status == pb.STATUS_MISS  # Redis holds nothing: neither may L1


# -- defect 5: tag invalidation keeps what was indexed meanwhile ----------------------------


async def test_tag_invalidation_walks_in_chunks_and_keeps_concurrent_members(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    a: RunningGateway = await gateway_factory()
    b: RunningGateway = await gateway_factory()
    count = 3000
    for i in range(0, count, 200):
        await asyncio.gather(
            *(
                a.stub.Set(pb.SetRequest(key=f"tg:{j}", value=b"x", tags=["T"]))
                for j in range(i, i + 200)
            )
        )
    redis_client.config_resetstat()
    stop = asyncio.Event()
    written: list[str] = []

    async def keep_writing() -> None:
        n = 0
        while not stop.is_set() and n < 5000:
            key = f"tg:new:{n}"
            await b.stub.Set(pb.SetRequest(key=key, value=b"y", tags=["T"]))
            written.append(key)
            n += 1

    writer = asyncio.create_task(keep_writing())
    try:
        await asyncio.sleep(0.01)
        await a.stub.Invalidate(pb.InvalidateRequest(tags=["T"]))
    finally:
        stop.set()
        await writer
    assert written, "the writer ran alongside the invalidation"
    index = a.server.store.tag_key("T")
    for key in written:
        if redis_client.exists(a.server.store.redis_key(key)):
            assert redis_client.zscore(index, key) is not None, f"{key} lost its index entry"
    # A later Invalidate(tag) finds every one of them.
    await a.stub.Invalidate(pb.InvalidateRequest(tags=["T"]))
    assert not any(redis_client.exists(a.server.store.redis_key(k)) for k in written)
    zranges = redis_client.info("commandstats").get("cmdstat_zrange", {}).get("calls", 0)
    assert zranges >= count // 1000, "the index is read in bounded chunks, not whole"


async def test_a_set_that_did_not_store_adds_no_index_entry(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    await gateway.stub.Set(pb.SetRequest(key="cas:k", value=b"1"))
    out = await gateway.stub.Set(pb.SetRequest(key="cas:k", value=b"2", tags=["T"], if_version=7))
    assert out.outcome == pb.SET_OUTCOME_VERSION_CONFLICT
    assert redis_client.zscore(gateway.server.store.tag_key("T"), "cas:k") is None


# -- defect 7: value and lease share a slot whatever the key --------------------------------


KEYS = ["}x", "}", "{}", "{a}b", "a}b", "\\x", "\\", "}{}", "plain", "{", "x{y}z", "ключ}"]


def test_value_and_lease_hash_to_one_slot_for_any_key() -> None:
    store = RedisStore(aioredis.Redis(), "cg")
    for key in KEYS:
        assert key_slot(store.redis_key(key).encode()) == key_slot(store.lease_key(key).encode()), (
            key
        )
    # The mapping stays one-to-one.
    assert len({store.redis_key(k) for k in KEYS}) == len(KEYS)


async def test_odd_keys_round_trip_with_leases(gateway: RunningGateway) -> None:
    for key in KEYS:
        got = await gateway.stub.Get(pb.GetRequest(key=key, lease=True))
        assert got.status == pb.STATUS_LEASED, key
        out = await gateway.stub.Set(
            pb.SetRequest(key=key, value=key.encode(), lease_token=got.lease_token)
        )
        assert out.outcome == pb.SET_OUTCOME_STORED, key
        assert (await gateway.stub.Get(pb.GetRequest(key=key))).value == key.encode()
    await gateway.stub.Invalidate(pb.InvalidateRequest(prefixes=["}"]))
    for key in KEYS:
        got = await gateway.stub.Get(pb.GetRequest(key=key))
        assert (got.status == pb.STATUS_MISS) == key.startswith("}"), key


# -- defect 8: a Set is one round trip -------------------------------------------------------


# Connection upkeep and background probes, not part of any request.
HOUSEKEEPING = {"MONITOR", "PING", "CLIENT", "HELLO", "SELECT", "AUTH", "INFO"}


@contextlib.asynccontextmanager
async def commands_sent(url: str) -> Any:
    """The commands clients sent Redis meanwhile (not those scripts ran), via MONITOR."""
    seen: list[str] = []
    client = aioredis.Redis.from_url(url)
    monitor = client.monitor()
    await monitor.connect()  # type: ignore[no-untyped-call]
    await monitor.connection.send_command("MONITOR")  # type: ignore[union-attr]
    assert await monitor.connection.read_response() in (b"OK", "OK")  # type: ignore[union-attr]

    async def collect() -> None:
        while True:
            cmd = await monitor.next_command()
            name = str(cmd["command"]).split(" ", 1)[0].upper()
            if cmd.get("client_type") != "lua" and name not in HOUSEKEEPING:
                seen.append(name)

    task = asyncio.create_task(collect())
    try:
        yield seen
        await asyncio.sleep(0.2)  # MONITOR lines trail the replies a little
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await monitor.connection.disconnect()  # type: ignore[union-attr]
        await client.aclose()


@pytest.mark.parametrize("tags", [[], ["a", "b"]])
async def test_a_replacing_set_is_one_command(
    gateway: RunningGateway, redis_server: ManagedRedis, tags: list[str]
) -> None:
    await gateway.stub.Set(pb.SetRequest(key="one:k", value=b"1"))  # scripts loaded
    async with commands_sent(redis_server.url) as seen:
        out = await gateway.stub.Set(pb.SetRequest(key="one:k", value=b"2", tags=tags))
        assert out.outcome == pb.SET_OUTCOME_STORED
    assert seen == ["EVALSHA"]


# -- defect 9: a broad invalidation wakes only the waiters it concerns -----------------------


async def test_a_prefix_event_leaves_unrelated_lease_waiters_alone(
    gateway_factory: GatewayFactory,
) -> None:
    # Leases and waits far longer than the test: a waiter woken by its lease's expiry
    # (a loaded machine is slow enough for 3 s to pass) would read Redis again.
    toml = "[default_class]\nlease_timeout_seconds = 60\nmax_wait_seconds = 61\n"
    a: RunningGateway = await gateway_factory(toml)
    b: RunningGateway = await gateway_factory(toml)
    held = await a.stub.Get(pb.GetRequest(key="slow:k", lease=True))
    assert held.status == pb.STATUS_LEASED
    waiters = [
        b.stub.Get(pb.GetRequest(key="slow:k", lease=True, max_wait_ms=60_000)) for _ in range(20)
    ]
    await eventually(lambda: b.server.cache.leases.held("slow:k"))
    # All of them waiting (a fixed sleep here raced the waiters' first reads under load).
    await eventually(lambda: b.server.stats.classes["default"].lease_waits >= len(waiters))
    reads = b.server.cache.reads.flights
    received = b.server.stats.invalidations_received
    await a.stub.Invalidate(pb.InvalidateRequest(prefixes=["other:"], classes=[]))
    await eventually(lambda: b.server.stats.invalidations_received > received)
    await asyncio.sleep(0.02)
    assert b.server.cache.reads.flights == reads, "the waiters of slow:k were not woken"
    await a.stub.Set(pb.SetRequest(key="slow:k", value=b"v", lease_token=held.lease_token))
    answers = await asyncio.gather(*waiters)
    assert all(r.value == b"v" for r in answers)


# -- defect 6 (gateway side): releasing a lease leaves the value ----------------------------


async def test_release_lease_keeps_the_value_and_hands_the_lease_on(
    gateway_factory: GatewayFactory,
) -> None:
    toml = """
[default_class]
ttl_seconds = 60
stale_seconds = 60
early_refresh_beta = 0
lease_timeout_seconds = 30
"""
    a: RunningGateway = await gateway_factory(toml)
    b: RunningGateway = await gateway_factory(toml)
    await a.stub.Set(pb.SetRequest(key="rel:k", value=b"usable", ttl_ms=1))
    await asyncio.sleep(0.05)  # past its fresh life, inside the stale window
    stale = await a.stub.Get(pb.GetRequest(key="rel:k", lease=True, allow_stale=True))
    assert stale.status == pb.STATUS_STALE and stale.refresh and stale.lease_token
    waiter = b.stub.Get(pb.GetRequest(key="rel:k", lease=True))
    await eventually(lambda: b.server.cache.leases.held("rel:k"))
    out = await a.stub.ReleaseLease(
        pb.ReleaseLeaseRequest(key="rel:k", lease_token=stale.lease_token)
    )
    assert out.released
    # The waiter takes the lease over at once (not after the 30 s lease timeout).
    got = await asyncio.wait_for(waiter, 5)
    assert got.status == pb.STATUS_LEASED
    # The stale value is still there for everyone else.
    again = await a.stub.Get(pb.GetRequest(key="rel:k", allow_stale=True))
    assert again.status == pb.STATUS_STALE and again.value == b"usable"
    # A token that no longer holds the lease changes nothing.
    out = await a.stub.ReleaseLease(
        pb.ReleaseLeaseRequest(key="rel:k", lease_token=stale.lease_token)
    )
    assert not out.released
    bad = a.stub.ReleaseLease(pb.ReleaseLeaseRequest(key="rel:k", lease_token=b"short"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bad
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
