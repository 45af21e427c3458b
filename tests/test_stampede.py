"""Stampede protection across three real gateway processes sharing one redis-server.

The callers are this test process's `cachegw.AsyncClient`s (one channel per gateway), and
for the dying holder a separate client process that is SIGKILLed mid-load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from cachegw import AsyncClient, Status
from tests.conftest import GatewayCluster

LEASES = """
[default_class]
ttl_seconds = 60
jitter = 0
lease_timeout_seconds = 1.0
max_wait_seconds = 10
"""

REFRESH = """
[default_class]
ttl_seconds = 1.0
jitter = 0
early_refresh_beta = 1.0
lease_timeout_seconds = 2
"""


async def test_500_concurrent_callers_over_three_gateways_load_once(
    gateway_cluster: GatewayCluster,
) -> None:
    gateways = gateway_cluster(3, LEASES)
    clients = [AsyncClient(gw.address, timeout=15) for gw in gateways]
    loads = 0

    async def loader() -> bytes:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.2)  # a slow source of truth
        return b"the value"

    try:
        results = await asyncio.gather(
            *(clients[i % 3].get_or_load("cold:key", loader) for i in range(500))
        )
    finally:
        for client in clients:
            await client.close()
    assert loads == 1
    assert results == [b"the value"] * 500


HOLDER = """
import sys, time
from cachegw import Client

def loader():
    print("loading", flush=True)
    time.sleep(120)  # killed long before this returns
    return b"never"

with Client(sys.argv[1], timeout=30) as client:
    client.get_or_load("dying:key", loader)
"""


async def test_a_holder_killed_mid_fill_is_taken_over_within_deadlines(
    gateway_cluster: GatewayCluster,
) -> None:
    gateways = gateway_cluster(3, LEASES)
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        gateways[0].address,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 20)
        assert line.strip() == b"loading", line
        clients = [AsyncClient(gw.address) for gw in gateways]
        loads = 0

        async def loader() -> bytes:
            nonlocal loads
            loads += 1
            return b"recovered"

        async def caller(i: int) -> tuple[bytes, float]:
            started = time.monotonic()
            value = await clients[i % 3].get_or_load("dying:key", loader, timeout=5)
            return value, time.monotonic() - started

        waiting = [asyncio.ensure_future(caller(i)) for i in range(60)]
        await asyncio.sleep(0.2)
        holder.kill()  # mid-fill: its lease is never filled nor released
        outcomes = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        for client in clients:
            await client.close()
    finally:
        if holder.returncode is None:
            holder.kill()
        await asyncio.wait_for(holder.wait(), 10)
    assert loads == 1  # one waiter took the expired lease over and filled it
    assert {value for value, _ in outcomes} == {b"recovered"}
    # Within the 1 s lease timeout plus a little, and always within the 5 s deadline.
    assert max(took for _, took in outcomes) < 3.0


async def test_steady_load_with_early_refresh_never_misses(
    gateway_cluster: GatewayCluster,
) -> None:
    gateways = gateway_cluster(3, REFRESH)
    clients = [AsyncClient(gw.address, timeout=5) for gw in gateways]
    loads = leased = misses = stale = 0
    refreshing: set[asyncio.Task[None]] = set()

    async def load() -> bytes:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return f"v{loads}".encode()

    async def refresh(client: AsyncClient, token: bytes) -> None:
        await client.set("hot:key", await load(), lease_token=token)

    async def caller(client: AsyncClient, until: float) -> None:
        nonlocal leased, misses, stale
        while time.monotonic() < until:
            entry = await client.lookup("hot:key", lease=True)
            if entry.status is Status.LEASED:
                leased += 1
                await client.set("hot:key", await load(), lease_token=entry.lease_token)
            elif entry.status is Status.MISS:
                misses += 1
            elif entry.status is Status.STALE:
                stale += 1
            elif entry.refresh:
                task = asyncio.create_task(refresh(client, entry.lease_token))
                refreshing.add(task)
                task.add_done_callback(refreshing.discard)
            await asyncio.sleep(0.005)

    duration = 4.0
    until = time.monotonic() + duration
    try:
        await asyncio.gather(*(caller(clients[i % 3], until) for i in range(24)))
        if refreshing:
            await asyncio.wait(refreshing, timeout=5)
    finally:
        for client in clients:
            await client.close()
    assert leased == 1, "only the very first, cold read may miss"
    assert misses == 0 and stale == 0
    # About one load per 1 s TTL period (refreshes land shortly before each expiry).
    assert duration - 1 <= loads <= duration + 2, loads


@pytest.mark.parametrize("invalidation", ["delete", "class"])
async def test_stale_set_race_across_processes(
    gateway_cluster: GatewayCluster, invalidation: str
) -> None:
    a, b = (AsyncClient(gw.address) for gw in gateway_cluster(2, LEASES))
    try:
        entry = await a.lookup("race:key", lease=True)
        assert entry.status is Status.LEASED
        if invalidation == "delete":
            await b.delete("race:key")
        else:
            await b.invalidate(classes=["default"])
        stored = await a.set("race:key", b"loaded before the write", lease_token=entry.lease_token)
        assert not stored.stored and stored.outcome.name == "LEASE_INVALID"
        assert await b.get("race:key") is None
        assert await a.get("race:key") is None
    finally:
        await a.close()
        await b.close()
