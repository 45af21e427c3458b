"""Sentinel: the gateway's Redis connections follow the primary across failovers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cachegw_gateway import redis_connect
from cachegw_gateway.config import RedisConfig
from cachegw_gateway.l2 import RedisStore, SetCall
from cachegw_gateway.redis_errors import L2ErrorReply
from tests.topology import SentinelTopology, client

TAIL = bytes(40)  # an envelope tail the Set script accepts (see l2.SetCall)


def _set(key: str) -> SetCall:
    return SetCall(key=key, tail=TAIL, px_ms=60_000)


def _quietly_make_primary(topo: SentinelTopology, new: tuple[str, int]) -> None:
    """Demote the primary without Sentinel's help, then tell the Sentinels: the old
    primary keeps its clients' connections open (Sentinel itself would CLIENT KILL them),
    so they meet READONLY, as after a failover the gateway did not see coming."""
    old = topo.primary_address()
    with client(new) as c:
        c.execute_command("REPLICAOF", "NO", "ONE")
    for node in topo.nodes:
        address = topo.address(node)
        if address != new:
            with client(address) as c:
                c.execute_command("REPLICAOF", new[0], str(new[1]))
    for s in topo.sentinels:
        with client(topo.address(s)) as c:
            c.execute_command("SENTINEL", "REMOVE", topo.service)
            c.execute_command("SENTINEL", "MONITOR", topo.service, new[0], str(new[1]), "2")
            c.execute_command("SENTINEL", "SET", topo.service, "down-after-milliseconds", "1000")
    assert topo.primary_address() == new != old


async def test_readonly_from_a_demoted_primary_sends_the_pool_to_the_new_one(
    sentinel_topology: SentinelTopology,
) -> None:
    topo = sentinel_topology
    store = RedisStore.from_config(RedisConfig(prefix="t"), topo.url)
    try:
        # Several connections open to the first primary, idle in the pool.
        await asyncio.gather(*(store.set(_set(f"k{i}")) for i in range(8)))
        assert await store.ping()
        _quietly_make_primary(topo, topo.address(topo.nodes[1]))

        with pytest.raises(L2ErrorReply) as info:
            await store.set(_set("refused"))
        # Refused, not lost: READONLY (never "may or may not have been applied").
        assert info.value.kind == "READONLY"
        assert not store.stats.redis_up
        # The very next write goes to the new primary: no stream of READONLY.
        result = await store.set(_set("after"))
        assert result.stored
        # and the probe ends the "writes refused" state at once.
        assert await store.ping()
        assert store.stats.redis_up
        with client(topo.address(topo.nodes[1])) as c:
            assert c.exists("t:{after}") == 1
            assert c.exists("t:{refused}") == 0
    finally:
        await store.close()


async def test_concurrent_discoveries_keep_every_sentinel() -> None:
    """redis-py's own discovery, run by many connections at once while the first
    Sentinel is down, wrote one Sentinel over another (never asked again, never closed)."""
    with SentinelTopology(replicas=1) as topo:
        clients = redis_connect.connect(RedisConfig(prefix="t"), topo.url)
        pool: Any = clients.client.connection_pool  # a SentinelConnectionPool
        manager = pool.sentinel_manager
        before = sorted(id(s) for s in manager.sentinels)
        first = manager.sentinels[0].connection_pool.connection_kwargs["port"]
        next(s for s in topo.sentinels if s.port == first).kill()
        try:
            found = await asyncio.gather(
                *(manager.discover_master(topo.service) for _ in range(50))
            )
            assert set(found) == {topo.address(topo.nodes[0])}
            assert sorted(id(s) for s in manager.sentinels) == before
        finally:
            await clients.client.aclose()
            await clients.close()
