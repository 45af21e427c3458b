"""Slots moved and a primary frozen under continuous load from three gateway processes.
Each test leaves the cluster healthy for the next (the module shares one cluster)."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.crc import key_slot

from cachegw import AsyncClient
from tests.cluster.load import Load
from tests.cluster_topology import ClusterTopology
from tests.conftest import GatewayCluster

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
PROPAGATION = 1.0


async def _final_check(clients: list[AsyncClient], keys: list[str] = KEYS) -> None:
    """After the fault: a last write of every key is what every gateway reads."""
    for i, key in enumerate(keys):
        await clients[i % len(clients)].set(key, b"final", timeout=5.0)
    await asyncio.sleep(PROPAGATION)
    for client in clients:
        assert await client.get_many(keys, timeout=5.0) == [b"final"] * len(keys)


MOVED_SLOTS = 600


@pytest.mark.timeout(120)
async def test_slots_moved_under_load(
    cluster: ClusterTopology, gateway_cluster: GatewayCluster, prefix: str
) -> None:
    gateways = gateway_cluster(3, CLASSES)
    clients = [AsyncClient(gw.address) for gw in gateways]
    try:
        await clients[0].set_many([(k, b"v0") for k in KEYS])
        source = cluster.node_of_key(f"{prefix}:{{{KEYS[0]}}}")
        target = next(n for n in cluster.primaries() if n is not source)
        # redis-cli moves the source's lowest slots: half the keys of this test live
        # there (a key's slot is its hash tag's, whatever the prefix), so they do move.
        first = min(s for s, _ in cluster.slots_of(source))
        moving = [
            k
            for k in (f"product:m{i}" for i in range(20_000))
            if first <= key_slot(k.encode()) < first + MOVED_SLOTS
        ][:30]
        assert len(moving) == 30
        keys = [*KEYS[:30], *moving]
        await clients[0].set_many([(k, b"v0") for k in keys])
        load = Load(clients, keys)
        load.start()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.move_slots, source, target, MOVED_SLOTS)
        await asyncio.to_thread(cluster.wait_healthy)
        assert all(cluster.node_of_key(f"{prefix}:{{{k}}}") is target for k in moving)
        await asyncio.sleep(0.5)
        await load.stop()
        assert not load.late(), load.late()[:5]
        assert not load.undocumented(), load.undocumented()[:5]
        assert all(gw.proc.poll() is None for gw in gateways)
        # Nothing lost: every key still has a value (written before or during the move).
        for client in clients:
            assert None not in await client.get_many(keys, timeout=5.0)
        await _final_check(clients, keys)
        print(f"\nreshard under load: outcomes {dict(load.codes())}")
    finally:
        for client in clients:
            await client.close()


async def test_a_frozen_primary_fails_only_its_own_keys(
    cluster: ClusterTopology, gateway_cluster: GatewayCluster, prefix: str
) -> None:
    gateways = gateway_cluster(3, CLASSES)
    clients = [AsyncClient(gw.address) for gw in gateways]
    try:
        await clients[0].set_many([(k, b"v0") for k in KEYS])
        frozen = cluster.node_of_key(f"{prefix}:{{{KEYS[0]}}}")
        on_frozen = {k for k in KEYS if cluster.node_of_key(f"{prefix}:{{{k}}}") is frozen}
        # Not in L1, so that the reads of the other keys do reach Redis.
        load = Load(clients, KEYS)
        load.start()
        await asyncio.sleep(0.5)
        frozen_at = time.monotonic()
        cluster.pause(frozen)
        try:
            await asyncio.sleep(4.0)  # past the node timeout: its replica takes over
        finally:
            cluster.resume(frozen)
        thawed_at = time.monotonic()
        await asyncio.to_thread(cluster.wait_healthy)
        await asyncio.sleep(0.5)
        await load.stop()
        assert not load.late(), load.late()[:5]
        assert not load.undocumented(), load.undocumented()[:5]
        assert all(gw.proc.poll() is None for gw in gateways)
        during = [o for o in load.outcomes if frozen_at <= o.started <= thawed_at]
        elsewhere = [o for o in during if o.key not in on_frozen]
        failed = [o for o in elsewhere if o.code != "OK"]
        # The other primaries' keys are served, but not all of them: after every timeout
        # on the frozen node redis-py re-reads the slot map from a node picked at random,
        # under a lock every call waits on, and the frozen one stalls it for up to
        # socket_timeout (1-6 % of the calls elsewhere failed before the breaker per node,
        # 0-0.5 % with it, which stops the re-reads once it opens; see
        # docs/consistency.md). They still end by their deadline, checked above.
        assert elsewhere and len(failed) <= len(elsewhere) // 2, failed[:5]
        await _final_check(clients)
        print(
            f"\nfrozen primary: outcomes {dict(load.codes())}; calls to the other primaries "
            f"while frozen: {len(failed)} of {len(elsewhere)} failed"
        )
    finally:
        for client in clients:
            await client.close()
