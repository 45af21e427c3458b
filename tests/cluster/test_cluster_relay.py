"""The two-region relay with a Redis Cluster at either end: events from a standalone
region applied in a cluster region (its meta-slot stream, its keys on every primary),
and the other way round."""

from __future__ import annotations

import redis

from cachegw_gateway import events
from cachegw_gateway.config import RedisConfig
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.relay import Link, Region
from tests.cluster_topology import ClusterTopology

KEYS = [f"k{i}" for i in range(20)]  # spread over the three primaries


def store(url: str, prefix: str) -> RedisStore:
    return RedisStore.from_config(RedisConfig(prefix=prefix, socket_timeout=5.0), url)


async def test_events_cross_between_a_standalone_and_a_cluster_region(
    cluster: ClusterTopology, prefix: str
) -> None:
    with ManagedRedis() as single:
        one, many = store(single.url, prefix), store(cluster.url, prefix)
        plain = redis.Redis.from_url(single.url)
        spread = cluster.cluster_client()
        try:
            to_cluster = Link(Region("a", single.url), one, Region("b", cluster.url), many)
            to_single = Link(Region("b", cluster.url), many, Region("a", single.url), one)
            await to_cluster.load_checkpoint()
            await to_single.load_checkpoint()

            # a -> b: keys invalidated in the standalone region leave every primary.
            for key in KEYS:
                spread.set(f"{prefix}:{{{key}}}", b"v")
            payload = events.make(origin="gw-a", keys=KEYS).SerializeToString()
            await one.publish(payload, 1000)
            assert await to_cluster.catch_up() == 1
            assert all(not spread.exists(f"{prefix}:{{{k}}}") for k in KEYS)
            copies = spread.xrange(f"{prefix}:{{meta}}:events")
            assert copies is not None and len(copies) == 1  # in b's own audit stream

            # b -> a: a class invalidation in the cluster region bumps a's generation;
            # the copy that reached b from a is not carried back.
            payload = events.make(origin="gw-b", classes=["product"]).SerializeToString()
            await many.bump_generations(["product"])
            await many.publish(payload, 1000)
            assert await to_single.catch_up() == 2  # b's copy of a's event, and b's own
            assert (to_single.stats.applied, to_single.stats.skipped) == (1, 1)
            assert int(plain.get(f"{prefix}:gen:product") or 0) == 1
            await to_cluster.catch_up()  # a's copy of b's event is not carried back
            assert (to_cluster.stats.applied, to_cluster.stats.skipped) == (1, 1)
        finally:
            await one.close()
            await many.close()
            plain.close()
            spread.close()
