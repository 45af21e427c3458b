"""The client's protocols against a real gateway (in-process, real gRPC, real Redis):
get_or_load (sync and async), its fallback when the gateway is unreachable, the near
cache's rules, warm-up and the hot-key list."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from cachegw import AsyncClient, Client, EventKind, NearCache, Status
from tests.conftest import GatewayFactory, RunningGateway, eventually


async def until_live(near: NearCache, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not near.live:
        assert time.monotonic() < deadline, "the near cache's stream never went live"
        await asyncio.sleep(0.01)


async def test_async_get_or_load_fills_once_and_then_hits(gateway: RunningGateway) -> None:
    loads = 0

    async def loader() -> bytes:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return b"loaded"

    async with AsyncClient(gateway.address) as client:
        values = await asyncio.gather(*(client.get_or_load("k", loader) for _ in range(30)))
        assert values == [b"loaded"] * 30 and loads == 1
        assert await client.get_or_load("k", loader) == b"loaded" and loads == 1
        # A plain function works as a loader too.
        assert await client.get_or_load("k2", lambda: "text") == b"text"
        assert await client.get("k2") == b"text"


async def test_sync_get_or_load_from_many_threads(gateway: RunningGateway) -> None:
    loads = 0
    lock = threading.Lock()

    def loader() -> bytes:
        nonlocal loads
        with lock:
            loads += 1
        time.sleep(0.1)
        return b"v"

    def run() -> list[bytes]:
        with Client(gateway.address) as client:
            results: list[bytes] = []

            def call() -> None:
                results.append(client.get_or_load("sync:key", loader))

            threads = [threading.Thread(target=call) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            return results

    results = await asyncio.to_thread(run)
    assert results == [b"v"] * 20 and loads == 1


async def test_a_failing_loader_releases_the_lease_at_once(gateway: RunningGateway) -> None:
    async with AsyncClient(gateway.address) as client:
        loading = asyncio.Event()

        async def broken() -> bytes:
            loading.set()  # called only once its caller holds the lease
            await asyncio.sleep(0.05)
            raise RuntimeError("database down")

        async def works() -> bytes:
            return b"ok"

        first = asyncio.ensure_future(client.get_or_load("flaky", broken))
        # Not a fixed sleep: under load the second call could reach the gateway first,
        # take the lease and fill, and the broken loader would never run.
        await asyncio.wait_for(loading.wait(), 5)
        started = time.monotonic()
        second = asyncio.ensure_future(client.get_or_load("flaky", works))
        with pytest.raises(RuntimeError, match="database down"):
            await first
        assert await second == b"ok"
        assert time.monotonic() - started < 2  # not the lease timeout


async def test_get_or_load_without_a_gateway_calls_the_loader(
    caplog: pytest.LogCaptureFixture, dead_address: str
) -> None:
    address = dead_address
    caplog.set_level(logging.WARNING, logger="cachegw")
    async with AsyncClient(address, timeout=1) as client:
        assert await client.get_or_load("k", lambda: b"direct") == b"direct"
    with Client(address, timeout=1) as sync_client:
        assert sync_client.get_or_load("k", lambda: b"direct") == b"direct"
    assert sum("without the cache" in r.getMessage() for r in caplog.records) == 2


async def test_get_or_load_refreshes_in_the_background(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        "[default_class]\nttl_seconds = 0.5\njitter = 0\nstale_seconds = 30\n"
    )
    loads = 0

    async def loader() -> bytes:
        nonlocal loads
        loads += 1
        return f"v{loads}".encode()

    async with AsyncClient(gw.address) as client:
        assert await client.get_or_load("swr", loader) == b"v1"
        await asyncio.sleep(0.6)  # stale now
        assert await client.get_or_load("swr", loader) == b"v1"  # at once, stale
        deadline = time.monotonic() + 3
        while await client.get("swr") != b"v2":
            assert time.monotonic() < deadline, "the background refresh never landed"
            await asyncio.sleep(0.02)
        assert loads == 2


async def test_near_cache_serves_hits_and_obeys_invalidations(
    gateway_factory: GatewayFactory,
) -> None:
    a, b = await gateway_factory(), await gateway_factory()
    near = NearCache(ttl=30)
    async with AsyncClient(a.address, near_cache=near) as client, AsyncClient(b.address) as other:
        await until_live(near)
        await other.set("p:1", b"one", tags=["t1"])
        await other.set("p:2", b"two")
        assert await client.get_many(["p:1", "p:2", "p:3"]) == [b"one", b"two", None]
        hits = near.hits
        assert await client.get("p:1") == b"one" and near.hits == hits + 1
        assert (
            a.server.stats.classes["default"].hits_l1 + a.server.stats.classes["default"].hits_l2
            == 2
        )  # the gateway saw only the first reads

        async def gone(key: str) -> None:
            deadline = time.monotonic() + 2
            while near.get(key) is not None:
                assert time.monotonic() < deadline, key
                await asyncio.sleep(0.005)

        await other.set("p:1", b"uno", tags=["t1"])  # a replacing write elsewhere
        await gone("p:1")
        assert await client.get("p:1") == b"uno"
        await other.invalidate(tags=["t1"])
        await gone("p:1")
        await client.get("p:2")
        await other.invalidate(prefixes=["p:"])
        await gone("p:2")
        await client.get("p:2")
        await other.invalidate(classes=["default"])
        await gone("p:2")


async def test_near_cache_copies_never_outlive_the_gateway_ttl(gateway: RunningGateway) -> None:
    near = NearCache(ttl=60)
    async with AsyncClient(gateway.address, near_cache=near) as client:
        await until_live(near)
        await client.set("short", b"v", ttl=0.3)
        assert await client.get("short") == b"v"
        assert near.get("short") == b"v"
        await asyncio.sleep(0.35)
        assert near.get("short") is None


async def test_a_class_may_have_a_shorter_near_cache_ttl(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        '[[classes]]\nname = "stock"\npatterns = ["stock:*"]\nttl_seconds = 60\n'
    )
    near = NearCache(ttl=60, class_ttl={"stock": 0.3})
    async with AsyncClient(gw.address, near_cache=near) as client:
        await until_live(near)
        await client.set("stock:1", b"5")
        await client.set("other", b"v")
        assert await client.get_many(["stock:1", "other"]) == [b"5", b"v"]
        assert near.get("stock:1") == b"5"
        await asyncio.sleep(0.35)
        assert near.get("stock:1") is None  # its class's 0.3 s
        assert near.get("other") == b"v"  # the 60 s of the rest
    with pytest.raises(ValueError, match="class_ttl"):
        NearCache(class_ttl={"stock": 0})


async def test_near_cache_empties_when_its_stream_drops(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    near = NearCache(ttl=30)
    client = AsyncClient(gw.address, near_cache=near)
    try:
        await until_live(near)
        await client.set("k", b"v")
        assert await client.get("k") == b"v" and near.get("k") == b"v"
        await gw.server.stop(grace=0)  # the stream ends with the gateway
        deadline = time.monotonic() + 3
        while near.live:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert near.get("k") is None and len(near) == 0
    finally:
        await client.close()


async def test_subscribe_from_the_client(gateway: RunningGateway) -> None:
    async with AsyncClient(gateway.address) as client:
        events = client.subscribe(prefixes=["a"])
        first = asyncio.ensure_future(anext(events))
        # The stream must be open at the gateway before the event, or it is not for it.
        await eventually(lambda: gateway.server.stats.subscribers == 1)
        result = await client.invalidate(["b1", "a1"])
        event = await asyncio.wait_for(first, 3)
        assert (event.id, event.kind, event.keys) == (result.event_id, EventKind.KEYS, ("a1",))
        await events.aclose()


async def test_warmup_loads_l1_and_the_recorded_hot_keys(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    async with AsyncClient(gw.address) as client:
        assert await client.warmup(entries=[("w1", b"1"), ("w2", "2")]) == (0, 0, 2)
        gw.server.l1.clear()
        assert await client.warmup(["w1", "w2", "nope"]) == (2, 1, 0)
        assert "w1" in gw.server.l1 and "w2" in gw.server.l1
        for _ in range(5):
            await client.get("w2")
        await gw.server.record_hot_keys()
    # A new gateway (a restart) starts with the recorded hot keys in its L1.
    fresh = await gateway_factory()
    assert "w2" in fresh.server.l1
    fresh.server.l1.clear()
    async with AsyncClient(fresh.address) as client:
        loaded, _, _ = await client.warmup(hot_keys=True)
        assert loaded >= 1 and "w2" in fresh.server.l1
        entry = await client.lookup("w2")
        assert entry.status is Status.HIT
