"""The two-region relay with a Redis Cluster at either end: events from a standalone
region applied in a cluster region (its meta-slot stream, its keys on every primary),
and the other way round; in process (`Link`), then with the real processes
(`cachegw serve` in each region, `cachegw relay` between them: tests/relay_regions.py)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from cachegw.client import Client
from cachegw_gateway import events
from cachegw_gateway.config import RedisConfig
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.relay import Link, Region
from tests.cluster_topology import ClusterTopology
from tests.conftest import GatewayProcess
from tests.relay_regions import (
    TOML,
    LinkedRegion,
    Regions,
    cached_in_l1,
    checkpointed,
    cross_every_kind,
    gateway_flags,
    gone,
    wait_until,
)

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


# -- the real processes: `cachegw serve` in each region, `cachegw relay` between them ----


@pytest.fixture
def linked(
    cluster: ClusterTopology,
    prefix: str,
    tmp_path: Path,
    gateway_process: Callable[..., GatewayProcess],
) -> Iterator[Regions]:
    """Region "a" on a standalone Redis, region "b" on the cluster (this test's prefix),
    a gateway process in each."""
    config = tmp_path / "cachegw.toml"
    config.write_text(TOML)
    with ManagedRedis() as single:
        gw_a = gateway_process(*gateway_flags(config, single.url, prefix, "a"))
        gw_b = gateway_process(*gateway_flags(config, cluster.url, prefix, "b"))
        regions = Regions(
            LinkedRegion(
                "a",
                single.url,
                prefix,
                redis.Redis.from_url(single.url),
                gw_a,
                Client(gw_a.address),
                f"{prefix}:events",
            ),
            LinkedRegion(
                "b",
                cluster.url,
                prefix,
                cluster.cluster_client(),
                gw_b,
                Client(gw_b.address),
                f"{prefix}:{{meta}}:events",
            ),
            tmp_path,
        )
        try:
            yield regions
        finally:
            regions.close()


def test_cluster_region_and_standalone_region_cross_both_ways_once(linked: Regions) -> None:
    a, b = linked.a, linked.b
    relay = linked.start_relay()
    assert cross_every_kind(a, b) == 4
    assert cross_every_kind(b, a) == 4

    # No loop: each event crosses exactly once. Markers each way make sure the relay
    # has read past every copy it published (a looped copy would be there by then).
    a.client.invalidate(["marker-a"])
    b.client.invalidate(["marker-b"])
    wait_until(
        lambda: (
            sorted(b.copies_of("a")) == sorted(a.born())
            and sorted(a.copies_of("b")) == sorted(b.born())
        ),
        what="every event copied once",
    )
    assert len(a.born()) == 5 and len(b.born()) == 5
    assert a.copies_of("a") == [] and b.copies_of("b") == []
    assert len(a.events()) == len(b.events()) == 10

    # Lag: the log line and the metrics.
    wait_until(lambda: "relay a->b: 0 events behind" in relay.output(), what="a->b lag line")
    wait_until(lambda: "relay b->a: 0 events behind" in relay.output(), what="b->a lag line")
    for src, dst in (("a", "b"), ("b", "a")):
        assert relay.metric("cachegw_relay_applied_total", src, dst) == 5
        assert relay.metric("cachegw_relay_skipped_total", src, dst) == 5
        assert relay.metric("cachegw_relay_behind_events", src, dst) == 0
        assert relay.metric("cachegw_relay_up", src, dst) == 1
        assert relay.metric("cachegw_relay_fallbacks_total", src, dst) == 0
        assert relay.metric("cachegw_relay_last_delay_seconds", src, dst) is not None
    assert relay.stop() == 0


def test_killed_relay_resumes_from_its_checkpoint_on_a_cluster(linked: Regions) -> None:
    a, b = linked.a, linked.b
    relay = linked.start_relay()
    for key in ("before", "while-down", "while-down-2"):
        cached_in_l1(b, key, "b")
    cached_in_l1(a, "from-b", "a")
    a.client.invalidate(["before"])
    b.client.invalidate(["before-b"])
    wait_until(gone(b, "before"), what="applied before the kill")
    # Killed between two batches: each checkpoint holds the newest event of its source.
    wait_until(checkpointed(b, a), what="a's stream checkpointed in b")
    wait_until(checkpointed(a, b), what="b's stream checkpointed in a")
    relay.stop(signal.SIGKILL)

    a.client.invalidate(["while-down"])
    a.client.set("while-down-2", "a")  # not a replacement in a: no event
    a.client.set("while-down-2", "a2")  # a replacement: an event
    b.client.invalidate(["from-b"])
    assert b.client.get("while-down") == b"b"  # nothing carries them: the relay is dead
    assert a.client.get("from-b") == b"a"

    relay = linked.start_relay()
    wait_until(gone(b, "while-down"), what="a's event made while down, applied")
    wait_until(gone(b, "while-down-2"), what="a's Set made while down, applied")
    wait_until(gone(a, "from-b"), what="b's event made while down, applied")
    # Nothing lost, nothing applied twice: one copy of each event born in a or b.
    wait_until(checkpointed(b, a), what="a's stream checkpointed in b")
    wait_until(checkpointed(a, b), what="b's stream checkpointed in a")
    assert sorted(b.copies_of("a")) == sorted(a.born()) and len(a.born()) == 3
    assert sorted(a.copies_of("b")) == sorted(b.born()) and len(b.born()) == 2
    out = relay.output()
    assert out.count("resuming after") == 2, out
    assert "relay_fallback" not in out and "dropping every" not in out
    assert relay.metric("cachegw_relay_applied_total", "a", "b") == 2
    assert relay.metric("cachegw_relay_applied_total", "b", "a") == 1


def test_events_lost_in_the_source_flush_the_cluster_region(
    linked: Regions, cluster: ClusterTopology
) -> None:
    a, b = linked.a, linked.b
    assert linked.run_once()["a->b"]["fallbacks"] == 0  # checkpoints at both ends
    named, unnamed = ["named"], [f"unnamed-{i}" for i in range(6)]
    assert len({cluster.node_of_key(b.key(k)).port for k in unnamed}) == 3  # every primary
    for key in named + unnamed:
        cached_in_l1(b, key, "b")
    assert b.client.incr("counter", 5) == 5
    for i in range(5):
        a.client.invalidate([f"gone-{i}"])
    a.client.invalidate(named)
    a.r.xtrim(a.events_key, maxlen=1, approximate=False)  # past the checkpoint

    figures = linked.run_once()
    assert figures["a->b"]["fallbacks"] == 1
    assert figures["b->a"]["fallbacks"] == 0
    for key in named + unnamed:  # b's L1 flushed by the RESET, its L2 by the relay
        wait_until(gone(b, key), what=f"{key} gone from b")
        assert b.r.exists(b.key(key)) == 0
    assert b.client.incr("counter", 1) == 6  # counters are not copies: kept
    resets = b.resets()
    assert len(resets) == 1 and resets[0].relayed_from == "a"
