"""A primary of the cluster SIGKILLed under continuous load from three gateway processes:
Redis promotes its replica (a few seconds here), and the gateways ride it out.

Its own module: the killed node stays dead, so this module's cluster is not shared."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from cachegw import AsyncClient, Tier
from cachegw.errors import CacheError
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from tests.cluster.load import DEADLINE, Load
from tests.cluster_topology import ClusterTopology
from tests.conftest import GatewayCluster, GatewayProcess

# Minutes of real topology under load: CI runs them after `make test` (`make test-slow`).
pytestmark = pytest.mark.slow

CLASSES = """
[[classes]]
name = "product"
patterns = ["product:*"]
ttl_seconds = 120
l1_ttl_seconds = 60
"""

KEYS = [f"product:{i}" for i in range(60)]
UNTOUCHED = [f"product:u{i}" for i in range(30)]  # not in the load: invalidated mid-failover
WRITES_RESUME_WITHIN = 15.0  # seconds after the promotion (generous: a loaded CI host)
PROPAGATION = 1.0


async def test_a_primary_killed_under_load(
    cluster: ClusterTopology, gateway_cluster: GatewayCluster, prefix: str
) -> None:
    gateways = gateway_cluster(3, CLASSES)
    clients = [AsyncClient(gw.address) for gw in gateways]
    try:
        await clients[0].set_many([(k, b"v0") for k in [*KEYS, *UNTOUCHED]])
        for client in clients:  # L1-hot on every gateway
            await client.get_many([*KEYS, *UNTOUCHED])
        victim = cluster.node_of_key(f"{prefix}:{{{KEYS[0]}}}")
        on_victim = [k for k in KEYS if cluster.node_of_key(f"{prefix}:{{{k}}}") is victim]

        load = Load(clients, KEYS)
        load.start()
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        cluster.kill(victim)
        # An invalidation issued during the failover (sent again until it is applied).
        invalidated = False
        while not invalidated and time.monotonic() - killed_at < WRITES_RESUME_WITHIN + 10:
            try:
                await clients[0].invalidate(keys=UNTOUCHED, timeout=DEADLINE)
                invalidated = True
            except CacheError:
                await asyncio.sleep(0.1)
        assert invalidated
        await asyncio.to_thread(cluster.wait_failover, victim)
        promoted_at = time.monotonic()

        # Writes to the lost primary's slots resume soon after the promotion.
        first_write: float | None = None
        while time.monotonic() - promoted_at < WRITES_RESUME_WITHIN:
            try:
                await clients[1].set(on_victim[0], b"after", timeout=DEADLINE)
                first_write = time.monotonic()
                break
            except CacheError:
                await asyncio.sleep(0.1)
        assert first_write is not None, "no write to the promoted replica's slots"
        await asyncio.sleep(1.0)
        await load.stop()

        assert not load.late(), load.late()[:5]
        assert not load.undocumented(), load.undocumented()[:5]
        assert all(gw.proc.poll() is None for gw in gateways), "a gateway exited"
        # Keys held in L1 kept being answered through the blackout, the lost primary's
        # included.
        blackout = [
            o
            for o in load.outcomes
            if o.op == "get" and killed_at <= o.started <= promoted_at and o.key in on_victim
        ]
        assert any(o.code == "OK" and o.value is not None for o in blackout), blackout[:5]
        others = [
            o
            for o in load.outcomes
            if o.started >= killed_at and o.key not in on_victim and o.op == "get"
        ]
        assert others and all(o.code == "OK" for o in others), [
            o for o in others if o.code != "OK"
        ][:5]

        # Every gateway sees the cluster whole again (its probe pings every primary), and
        # no breaker open: the dead node's is dropped once it is no longer a primary.
        trips = 0
        for gw in gateways:
            async with grpc.aio.insecure_channel(gw.address) as channel:
                stub = cache_pb2_grpc.CacheServiceStub(channel)
                for _ in range(100):
                    stats = await stub.Stats(pb.StatsRequest(), timeout=5.0)
                    if stats.redis.up and not stats.redis.breaker_nodes:
                        break
                    await asyncio.sleep(0.1)
                assert stats.redis.up
                assert not stats.redis.breaker_nodes
                assert stats.redis.breaker_state == pb.BREAKER_STATE_CLOSED
                trips += stats.redis.breaker_trips
        assert trips  # the dead primary's breaker did open (a breaker per node)

        # The invalidation issued during the failover reached every gateway.
        for client in clients:
            assert await client.get_many(UNTOUCHED, timeout=5.0) == [None] * len(UNTOUCHED)

        # After recovery no gateway serves anything older than the last write.
        for i, key in enumerate(KEYS):
            await clients[i % 3].set(key, b"final", timeout=5.0)
        await asyncio.sleep(PROPAGATION)
        for client in clients:
            assert await client.get_many(KEYS, timeout=5.0) == [b"final"] * len(KEYS)
        print(
            f"\nfailover: promoted {promoted_at - killed_at:.1f}s after the kill, first write "
            f"{first_write - killed_at:.1f}s; outcomes {dict(load.codes())}"
        )
    finally:
        for client in clients:
            await client.close()


async def test_the_generations_node_killed_l1_hot_keys_are_all_answered(
    tmp_path: Path, gateway_process: Callable[..., GatewayProcess], prefix: str
) -> None:
    """The primary holding the audit stream and the class generations dies: every
    gateway's subscription drops with it (they listen there), and until its replica
    takes over, no gateway can learn a generation, so its Redis reads fail. Keys it held
    in L1 are still answered, every one of them, from the copies set aside."""
    with ClusterTopology() as cluster:
        config = tmp_path / "gw.toml"
        config.write_text(CLASSES)
        flags = ["--config", str(config), "--redis-url", cluster.url, "--redis-prefix", prefix]
        gateways = [
            gateway_process(*flags, "--gateway-id", f"gw{i}", "--log-level", "WARNING")
            for i in range(3)
        ]
        clients = [AsyncClient(gw.address) for gw in gateways]
        try:
            await clients[0].set_many([(k, b"v0") for k in KEYS])
            for client in clients:
                await client.get_many(KEYS)
                assert all(e.tier is Tier.L1 for e in await client.lookup_many(KEYS))
            meta = cluster.node_of_key(f"{prefix}:{{meta}}:events")
            load = Load(clients, KEYS)
            load.start(write_share=0.0)  # reads only: every key stays held
            await asyncio.sleep(0.5)
            killed_at = time.monotonic()
            cluster.kill(meta)
            await asyncio.to_thread(cluster.wait_failover, meta)
            promoted_at = time.monotonic()
            await asyncio.sleep(1.0)
            await load.stop()
            blackout = [o for o in load.outcomes if killed_at <= o.started <= promoted_at]
            failed = [o for o in blackout if o.code != "OK" or o.value != b"v0"]
            assert blackout and not failed, (len(failed), len(blackout), failed[:3])
            assert not load.late(), load.late()[:5]
            # After the promotion, writes and class invalidations work again.
            await clients[1].set(KEYS[0], b"v1", timeout=5.0)
            await clients[2].invalidate(classes=["product"], timeout=5.0)
            for client in clients:
                for _ in range(100):
                    if await client.get(KEYS[0], timeout=5.0) is None:
                        break
                    await asyncio.sleep(0.05)
                assert await client.get(KEYS[0], timeout=5.0) is None
        finally:
            for client in clients:
                await client.close()
            for gw in gateways:
                gw.stop()
