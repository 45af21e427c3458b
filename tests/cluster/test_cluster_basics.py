"""The gateway on a real Redis Cluster: every RPC whose keys spread over the three
primaries, the split scripts (tag indexes, events, generations in memory) and the
coherence of two gateways through the cluster's pub/sub."""

from __future__ import annotations

import asyncio
from collections import Counter

import redis

from cachegw import AsyncClient, Tier
from cachegw.errors import CacheError
from cachegw_gateway.cluster_url import parse_seeds
from tests.cluster.conftest import ClusterGateways
from tests.cluster_topology import ClusterTopology
from tests.conftest import eventually

CLASSES = """
[[classes]]
name = "product"
patterns = ["product:*"]
ttl_seconds = 60
l1_ttl_seconds = 30

[[classes]]
name = "limited"
patterns = ["rl:*"]
ttl_seconds = 60
[classes.rate_limit]
algorithm = "gcra"
rate = 3
period_seconds = 60
"""

KEYS = [f"product:{i}" for i in range(60)]


def nodes_holding(cluster: ClusterTopology, prefix: str) -> Counter[int]:
    """How many of this test's values each primary holds (by port)."""
    held: Counter[int] = Counter()
    for node in cluster.primaries():
        with cluster.client(node) as c:
            held[node.port] += sum(1 for _ in c.scan_iter(match=f"{prefix}:{{product:*}}"))
    return held


def test_cluster_urls_are_parsed_and_refused_clearly() -> None:
    seeds, user, password = parse_seeds("redis+cluster://u:s%40cret@127.0.0.1:7000,[::1]:7001")
    assert seeds == [("127.0.0.1", 7000), ("::1", 7001)]
    assert (user, password) == ("u", "s@cret")
    for bad in ("redis+cluster://", "redis+cluster://h", "redis+cluster://h:1/0"):
        try:
            parse_seeds(bad)
        except ValueError as exc:
            assert "cret" not in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")


async def test_values_spread_over_every_primary_and_read_back_in_one_get_many(
    cluster: ClusterTopology, cluster_gateway: ClusterGateways, prefix: str
) -> None:
    gw = await cluster_gateway(CLASSES)
    client = AsyncClient(gw.address)
    try:
        results = await client.set_many([(k, k.encode()) for k in KEYS])
        assert all(not isinstance(r, CacheError) for r in results), results
        held = nodes_holding(cluster, prefix)
        assert len(held) == 3 and sum(held.values()) == len(KEYS), held
        assert await client.get_many(KEYS) == [k.encode() for k in KEYS]
        # Set one by one too, and overwrite (a replaced value publishes an event).
        for key in KEYS[:5]:
            await client.set(key, b"v2")
        assert await client.get_many(KEYS[:5]) == [b"v2"] * 5
        assert await client.delete_many([*KEYS[:3], "product:none"]) == [True] * 3 + [False]
        assert await client.get_many(KEYS[:4]) == [None, None, None, b"v2"]
    finally:
        await client.close()


async def test_invalidation_by_key_prefix_tag_and_class_reaches_the_other_gateway(
    cluster_gateway: ClusterGateways,
) -> None:
    a, b = await cluster_gateway(CLASSES), await cluster_gateway(CLASSES)
    ca, cb = AsyncClient(a.address), AsyncClient(b.address)
    try:
        for request in (
            {"keys": KEYS[:20]},
            {"prefixes": ["product:"]},
            {"tags": ["catalog"]},
            {"classes": ["product"]},
        ):
            for key in KEYS[:20]:
                await ca.set(key, b"old", tags=["catalog"])
            for key in KEYS[:20]:  # twice: the second read comes from b's L1
                await cb.get(key)
            assert (await cb.lookup(KEYS[0])).tier is Tier.L1
            await ca.invalidate(**request)  # type: ignore[arg-type]

            async def gone() -> bool:
                return await cb.get_many(KEYS[:20]) == [None] * 20

            for _ in range(100):
                if await gone():
                    break
                await asyncio.sleep(0.02)
            assert await gone(), request
            assert await ca.get_many(KEYS[:20]) == [None] * 20, request
            # A write after the invalidation is served everywhere.
            await ca.set(KEYS[0], b"new")
            await eventually(lambda: True)
            assert await cb.get(KEYS[0]) == b"new", request
    finally:
        await ca.close()
        await cb.close()


async def test_a_class_invalidation_kills_values_another_gateway_reads_from_redis(
    cluster_gateway: ClusterGateways,
) -> None:
    """b never held the values in L1: only the generation it learned from a's event
    (re-read from the cluster) makes it treat the stored values as dead."""
    a, b = await cluster_gateway(CLASSES), await cluster_gateway(CLASSES)
    ca, cb = AsyncClient(a.address), AsyncClient(b.address)
    try:
        await ca.set_many([(k, b"old") for k in KEYS[:10]])
        await ca.invalidate(classes=["product"])
        for _ in range(200):
            if await cb.get_many(KEYS[:10]) == [None] * 10:
                break
            await asyncio.sleep(0.02)
        assert await cb.get_many(KEYS[:10]) == [None] * 10
        await cb.set(KEYS[0], b"fresh")  # stamped with the new generation
        assert await ca.get(KEYS[0]) == b"fresh"
    finally:
        await ca.close()
        await cb.close()


async def test_a_restarted_gateway_learns_the_generations_from_the_cluster(
    cluster_gateway: ClusterGateways,
) -> None:
    a = await cluster_gateway(CLASSES)
    ca = AsyncClient(a.address)
    try:
        await ca.set(KEYS[0], b"old")
        await ca.invalidate(classes=["product"])
        await ca.invalidate(classes=["product"])
        b = await cluster_gateway(CLASSES)  # starts after both bumps
        cb = AsyncClient(b.address)
        try:
            assert await cb.get(KEYS[0]) is None
            await cb.set(KEYS[1], b"new")
            assert await ca.get(KEYS[1]) == b"new"
        finally:
            await cb.close()
    finally:
        await ca.close()


async def test_one_lease_across_two_gateways_for_a_cold_key(
    cluster_gateway: ClusterGateways,
) -> None:
    a, b = await cluster_gateway(CLASSES), await cluster_gateway(CLASSES)
    clients = [AsyncClient(a.address), AsyncClient(b.address)]
    loads = 0

    async def loader() -> bytes:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.2)
        return b"loaded"

    try:
        values = await asyncio.gather(
            *(clients[i % 2].get_or_load("product:cold", loader) for i in range(40))
        )
        assert values == [b"loaded"] * 40
        assert loads == 1
    finally:
        for c in clients:
            await c.close()


async def test_conditions_counters_ttl_and_rate_limits_on_the_cluster(
    cluster_gateway: ClusterGateways,
) -> None:
    gw = await cluster_gateway(CLASSES)
    client = AsyncClient(gw.address)
    try:
        assert (await client.set("product:c", b"1", if_absent=True)).stored
        assert not (await client.set("product:c", b"2", if_absent=True)).stored
        assert (await client.set("product:c", b"3", if_present=True)).stored
        ttl = await client.ttl("product:c")
        assert ttl is not None and 0 < ttl <= 60
        await client.invalidate(classes=["product"])
        assert await client.ttl("product:c") is None  # dead by its generation
        assert [await client.incr("product:n") for _ in range(3)] == [1, 2, 3]
        allowed = [(await client.allow("rl:user-1")).allowed for _ in range(5)]
        assert allowed == [True, True, True, False, False]
    finally:
        await client.close()


async def test_subscribe_replays_the_cluster_audit_stream_in_order(
    cluster_gateway: ClusterGateways,
) -> None:
    gw = await cluster_gateway(CLASSES)
    client = AsyncClient(gw.address)
    try:
        first = await client.invalidate(keys=["product:a"])
        await client.invalidate(keys=["product:b"])
        await client.invalidate(tags=["t"])
        seen: list[list[str]] = []
        async with asyncio.timeout(10):
            async for event in client.subscribe(since=first.event_id):
                seen.append([*event.keys, *event.tags])
                if len(seen) == 2:
                    break
        assert seen == [["product:b"], ["t"]]
    finally:
        await client.close()


def test_generations_and_events_share_one_slot(cluster: ClusterTopology) -> None:
    """The meta keys must stay together (one slot), whatever the prefix."""
    with cluster.client(cluster.running_nodes()[0]) as c:
        slots = {
            int(c.execute_command("CLUSTER", "KEYSLOT", f"p{i}:{{meta}}:{name}"))
            for i in range(3)
            for name in ("events", "gens")
        }
    assert len(slots) == 1
    assert isinstance(redis.__version__, str)


async def test_an_event_that_could_not_be_published_is_sent_again(
    cluster: ClusterTopology, cluster_gateway: ClusterGateways, prefix: str
) -> None:
    """A Set's value and its event are two calls on a cluster: when the node holding the
    audit stream refuses the event (OOM: nothing ran), the write still stands and its
    event goes out once the node takes writes again, evicting the other gateway's copy
    (docs/consistency.md)."""
    a, b = await cluster_gateway(CLASSES), await cluster_gateway(CLASSES)
    ca, cb = AsyncClient(a.address), AsyncClient(b.address)
    meta = cluster.node_of_key(f"{prefix}:{{meta}}:events")
    key = next(k for k in KEYS if cluster.node_of_key(f"{prefix}:{{{k}}}") is not meta)
    try:
        await ca.set(key, b"old")
        await cb.get(key)
        assert (await cb.lookup(key)).tier is Tier.L1
        with cluster.client(meta) as admin:
            admin.config_set("maxmemory", "1")
            try:
                assert (await ca.set(key, b"new")).stored
                await asyncio.sleep(0.3)
                assert (await cb.lookup(key)).value == b"old"  # no event yet
            finally:
                admin.config_set("maxmemory", "0")
        # The event is sent again: b drops its copy and reads the new value.
        for _ in range(300):
            if await cb.get(key) == b"new":
                break
            await asyncio.sleep(0.02)
        assert await cb.get(key) == b"new"
    finally:
        await ca.close()
        await cb.close()


async def test_many_tags_in_one_invalidation_across_slots(
    cluster_gateway: ClusterGateways,
) -> None:
    """The first chunk of every tag's index is read in one pipeline, whatever node holds
    each index."""
    gw = await cluster_gateway(CLASSES)
    client = AsyncClient(gw.address)
    try:
        tags = [f"tag-{i}" for i in range(12)]
        for i, tag in enumerate(tags):
            await client.set(f"product:m{i}", b"v", tags=[tag])
        await client.set("product:kept", b"v", tags=["other"])
        out = await client.invalidate(tags=tags)
        assert out.removed == 12
        names = [f"product:m{i}" for i in range(12)]
        assert await client.get_many(names) == [None] * 12
        assert await client.get("product:kept") == b"v"
    finally:
        await client.close()
