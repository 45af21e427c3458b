"""Ending a lease without storing (issue 9, defect 6), over both clients against a real
gateway (in-process, real gRPC, real Redis).

A lease that get_or_load abandons (the loader raised, the caller was cancelled) is handed
back with ReleaseLease: the gateway removes the lease only while this caller's token
holds it and never touches the value. The value a refresh or a stale-while-revalidate
was meant to replace stays readable in the gateway and in the near cache, and the next
caller can take the lease at once instead of after the lease timeout.

Tests taking `face` run twice: over `Client` (its calls made from a worker thread, since
the gateway runs in the test's event loop) and over `AsyncClient`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest

from cachegw import AsyncClient, Client, Entry, NearCache, Status
from tests.conftest import GatewayFactory, RunningGateway, eventually

# A lease timeout far beyond every wait below: a lease still held after its loader
# failed shows as a refresh nobody can take, or as a waiter left waiting.
CLASSES = """
[[classes]]
name = "hot"
patterns = ["hot:*"]
ttl_seconds = 5
jitter = 0
early_refresh_beta = 100
lease_timeout_seconds = 30
max_wait_seconds = 40

[[classes]]
name = "swr"
patterns = ["swr:*"]
ttl_seconds = 0.3
jitter = 0
stale_seconds = 30
lease_timeout_seconds = 30
max_wait_seconds = 40

[default_class]
lease_timeout_seconds = 30
max_wait_seconds = 40
"""

Face = Callable[..., Any]


class _InThread:
    """The blocking client behind AsyncClient's awaitable methods: each call runs in a
    worker thread, so the gateway in the test's event loop keeps answering."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


@pytest.fixture(params=["sync", "async"])
def face(request: pytest.FixtureRequest) -> Face:
    """open(address, near_cache=None): Client or AsyncClient, with AsyncClient's API."""

    @asynccontextmanager
    async def open_client(
        address: str, near_cache: NearCache | None = None
    ) -> AsyncIterator[AsyncClient]:
        if request.param == "sync":
            client = Client(address, near_cache=near_cache)
            try:
                yield cast(AsyncClient, _InThread(client))
            finally:
                await asyncio.to_thread(client.close)
        else:
            async with AsyncClient(address, near_cache=near_cache) as async_client:
                yield async_client

    return open_client


def failed_refreshes(caplog: pytest.LogCaptureFixture, key: str) -> int:
    """Background refreshes of `key` that ended (the log line comes after the release)."""
    return sum(f"refreshing {key!r} failed" in r.getMessage() for r in caplog.records)


def broken_loader(calls: list[str]) -> Callable[[], bytes]:
    def broken() -> bytes:
        calls.append("called")
        raise RuntimeError("the source of truth is down")

    return broken


async def take_refresh_lease(client: AsyncClient, key: str, *, allow_stale: bool) -> Entry:
    """A Get that is handed the refresh lease, asked for until one is (XFetch picks a
    refresher at random); bounded far below the lease timeout."""
    deadline = time.monotonic() + 3
    while True:
        entry = await client.lookup(key, lease=True, allow_stale=allow_stale)
        if entry.refresh or time.monotonic() > deadline:
            return entry
        await asyncio.sleep(0.01)


async def test_a_failing_early_refresh_keeps_the_value_everywhere(
    gateway_factory: GatewayFactory, face: Face, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cachegw")
    gw: RunningGateway = await gateway_factory(CLASSES)
    near = NearCache(ttl=30)
    calls: list[str] = []
    async with face(gw.address, near) as client, AsyncClient(gw.address) as other:
        await eventually(lambda: near.live)
        await other.set("hot:1", b"v1")
        # XFetch hands a refresh lease (with the HIT) at random, likelier near expiry:
        # ask until get_or_load is picked, each time as a caller the near cache misses.
        deadline = time.monotonic() + 5
        while not calls:
            assert time.monotonic() < deadline, "no early refresh was ever handed out"
            near.forget(["hot:1"])
            assert await client.get_or_load("hot:1", broken_loader(calls)) == b"v1"
        await eventually(lambda: failed_refreshes(caplog, "hot:1") == 1)

        # The value the refresh would have replaced is still served, by the gateway and
        # by the near cache (that copy was filled by the very Get that granted the lease).
        assert near.get("hot:1") == b"v1"
        entry = await other.lookup("hot:1")
        assert (entry.status, entry.value) == (Status.HIT, b"v1")
        # ... and the lease was handed back: the next caller can refresh at once.
        again = await take_refresh_lease(other, "hot:1", allow_stale=False)
        assert again.refresh and again.lease_token, "the refresh lease was never released"
        assert (await other.set("hot:1", b"v2", lease_token=again.lease_token)).stored


async def test_a_failing_stale_refresh_keeps_the_stale_value(
    gateway_factory: GatewayFactory, face: Face, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cachegw")
    gw: RunningGateway = await gateway_factory(CLASSES)
    calls: list[str] = []
    async with face(gw.address) as client, AsyncClient(gw.address) as other:
        await other.set("swr:1", b"old")
        await asyncio.sleep(0.4)  # past its fresh life, inside the stale window
        # Served stale at once; this caller was handed the refresh, which fails.
        assert await client.get_or_load("swr:1", broken_loader(calls)) == b"old"
        await eventually(lambda: failed_refreshes(caplog, "swr:1") == 1)
        assert calls == ["called"]

        entry = await other.lookup("swr:1", allow_stale=True)
        assert (entry.status, entry.value) == (Status.STALE, b"old")
        # The refresh lease is free again: the next caller is handed it straight away.
        again = await other.lookup("swr:1", lease=True, allow_stale=True)
        assert (again.status, again.value, again.refresh) == (Status.STALE, b"old", True)
        assert (await other.set("swr:1", b"new", lease_token=again.lease_token)).stored
        assert await other.get("swr:1") == b"new"


async def test_a_failed_fill_leaves_another_writers_value_alone(
    gateway: RunningGateway, face: Face
) -> None:
    """The holder of a miss's lease fails after someone else stored the key: ending its
    lease must not delete that value (Delete did, from Redis and every cache)."""
    started, give_up, give_up_async = threading.Event(), threading.Event(), asyncio.Event()

    def blocking() -> bytes:  # Client: runs in the caller's (worker) thread
        started.set()
        give_up.wait(10)
        raise RuntimeError("the source of truth is down")

    async def awaiting() -> bytes:  # AsyncClient: must not block the loop
        started.set()
        await give_up_async.wait()
        raise RuntimeError("the source of truth is down")

    async with face(gateway.address) as client, AsyncClient(gateway.address) as other:
        loader = awaiting if isinstance(client, AsyncClient) else blocking
        holder = asyncio.ensure_future(client.get_or_load("k", loader))
        await eventually(started.is_set)
        await other.set("k", b"fresh")  # the source changed: a writer stored the new value
        give_up.set()
        give_up_async.set()
        with pytest.raises(RuntimeError, match="source of truth"):
            await holder
        assert await other.get("k") == b"fresh"
        assert await client.get("k") == b"fresh"


async def holding_the_lease(client: AsyncClient, key: str) -> asyncio.Future[bytes]:
    """A get_or_load of `key` that was handed the lease and is loading, for ever."""
    loading = asyncio.Event()

    async def forever() -> bytes:
        loading.set()
        await asyncio.sleep(60)
        return b"never"

    holder = asyncio.ensure_future(client.get_or_load(key, forever))
    await loading.wait()
    return holder


async def cancel(holder: asyncio.Future[bytes]) -> None:
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder


async def test_a_cancelled_fill_leaves_another_writers_value_alone(
    gateway: RunningGateway,
) -> None:
    async with AsyncClient(gateway.address) as client:
        holder = await holding_the_lease(client, "k")
        await client.set("k", b"fresh")
        await cancel(holder)
        assert await client.get("k") == b"fresh"


async def test_a_cancelled_holder_hands_its_lease_to_a_waiter_at_once(
    gateway_factory: GatewayFactory,
) -> None:
    gw: RunningGateway = await gateway_factory(CLASSES)
    async with AsyncClient(gw.address) as client:
        holder = await holding_the_lease(client, "cancel:1")
        started = time.monotonic()
        waiter = asyncio.ensure_future(client.get_or_load("cancel:1", lambda: b"ok"))
        await asyncio.sleep(0.1)  # the waiter is waiting server-side for the holder
        await cancel(holder)
        assert await asyncio.wait_for(waiter, 10) == b"ok"
        assert time.monotonic() - started < 3  # neither the lease timeout nor the deadline
        # The waiter took the lease over and stored (a wait that ran out stores nothing).
        assert await client.get("cancel:1") == b"ok"


async def test_release_lease(gateway_factory: GatewayFactory, face: Face) -> None:
    gw: RunningGateway = await gateway_factory(CLASSES)
    near = NearCache(ttl=30)
    async with face(gw.address, near) as client, AsyncClient(gw.address) as other:
        await eventually(lambda: near.live)
        lease = await client.lookup("k", lease=True)
        assert lease.status is Status.LEASED
        # Only the token's own lease is removed, once; the next caller takes a new one.
        assert await client.release_lease("k", b"0" * len(lease.lease_token)) is False
        assert await client.release_lease("k", lease.lease_token) is True
        assert await client.release_lease("k", lease.lease_token) is False
        taken = await other.lookup("k", lease=True, max_wait=0.2)
        assert taken.status is Status.LEASED and taken.lease_token != lease.lease_token
        assert await other.release_lease("k", taken.lease_token) is True

        # A stored value is left as it is, in the gateway and in the near cache.
        await other.set("hot:2", b"v")
        assert await client.get("hot:2") == b"v" and near.get("hot:2") == b"v"
        refresh = await take_refresh_lease(other, "hot:2", allow_stale=False)
        assert refresh.refresh
        assert await client.release_lease("hot:2", refresh.lease_token) is True
        assert near.get("hot:2") == b"v"
        entry = await other.lookup("hot:2")
        assert (entry.status, entry.value) == (Status.HIT, b"v")
