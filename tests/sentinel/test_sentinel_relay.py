"""The two-region relay with a region behind Sentinel: real `cachegw serve` processes in
a standalone region and in a Sentinel region (``redis+sentinel://``), a real `cachegw
relay` process between them (tests/relay_regions.py).

Every invalidation kind crosses both ways once; then the Sentinel region's primary is
SIGKILLed while the relay runs, after it wrote what its replicas never received (their
replication stream held with CLIENT PAUSE WRITE, then dropped with the primary, as async
replication loses writes). The relay follows the new primary and keeps relaying both
ways, and takes the documented way out of each loss: events born in the Sentinel region
that the new primary lost were already carried, but what followed them cannot be known,
so the other region is flushed and gets RESET (docs/regions.md, "Never silently
skips"); copies the relay had applied in the Sentinel region and the new primary lost
(its checkpoint there went back) are applied again."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import Sentinel

from cachegw.client import Client
from cachegw.errors import CacheError
from cachegw_gateway.managed_redis import ManagedRedis
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
from tests.topology import SentinelTopology

FAILOVER_WITHIN = 30.0  # seconds: detection (1 s), election, promotion, reconnections

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def topology() -> Iterator[SentinelTopology]:
    """One Sentinel topology for the module (each test under a prefix of its own); the
    failover test, which leaves it with a primary fewer, runs last."""
    with SentinelTopology() as topo:
        yield topo


@pytest.fixture
def linked(
    topology: SentinelTopology,
    tmp_path: Path,
    gateway_process: Callable[..., GatewayProcess],
) -> Iterator[Regions]:
    """Region "a" on a standalone Redis, region "s" behind the Sentinels, a gateway
    process in each."""
    prefix = f"s{next(_prefixes)}"
    config = tmp_path / "cachegw.toml"
    config.write_text(TOML)
    sentinel = Sentinel(topology.sentinel_addresses, socket_timeout=2.0)  # type: ignore[no-untyped-call]
    with ManagedRedis() as single:
        gw_a = gateway_process(*gateway_flags(config, single.url, prefix, "a"))
        gw_s = gateway_process(*gateway_flags(config, topology.url, prefix, "s"))
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
                "s",
                topology.url,
                prefix,
                # Asks the Sentinels for the primary whenever it connects.
                sentinel.master_for(topology.service, socket_timeout=2.0),  # type: ignore[no-untyped-call]
                gw_s,
                Client(gw_s.address),
                f"{prefix}:events",
            ),
            tmp_path,
        )
        try:
            yield regions
        finally:
            regions.close()
            for c in sentinel.sentinels:
                c.close()


def test_sentinel_region_and_standalone_region_cross_both_ways_once(linked: Regions) -> None:
    a, s = linked.a, linked.b
    relay = linked.start_relay()
    assert cross_every_kind(a, s) == 4
    assert cross_every_kind(s, a) == 4
    a.client.invalidate(["marker-a"])
    s.client.invalidate(["marker-s"])
    wait_until(
        lambda: (
            sorted(s.copies_of("a")) == sorted(a.born())
            and sorted(a.copies_of("s")) == sorted(s.born())
        ),
        what="every event copied once",
    )
    assert len(a.born()) == len(s.born()) == 5
    assert a.copies_of("a") == [] and s.copies_of("s") == []
    wait_until(lambda: "relay s->a: 0 events behind" in relay.output(), what="s->a lag line")
    for src, dst in (("a", "s"), ("s", "a")):
        assert relay.metric("cachegw_relay_applied_total", src, dst) == 5
        assert relay.metric("cachegw_relay_behind_events", src, dst) == 0
        assert relay.metric("cachegw_relay_fallbacks_total", src, dst) == 0
    assert relay.stop() == 0


def quietly(check: Callable[[], bool]) -> Callable[[], bool]:
    """`check`, with a failing call (a failover under way) counting as not yet."""

    def run() -> bool:
        try:
            return check()
        except (redis.RedisError, CacheError, OSError):
            return False

    return run


def test_relay_follows_a_sentinel_failover_that_lost_writes(
    linked: Regions, topology: SentinelTopology
) -> None:
    a, s = linked.a, linked.b
    relay = linked.start_relay()
    cached_in_l1(s, "lost-copy", "s")  # a's invalidation of it is lost in s's failover
    cached_in_l1(s, "s-kept", "s")
    cached_in_l1(a, "lost-born", "a")  # s's invalidation of it: carried, then lost in s
    cached_in_l1(a, "unnamed", "a")  # no event names it: only a flush of a removes it
    assert a.client.incr("counter", 5) == 5
    topology.wait_replicated()

    # From here s's replicas receive nothing; what the primary writes dies with it.
    replicas = [topology.node_client(n) for n in topology.replicas]
    try:
        for c in replicas:
            c.client_pause(20_000, all=False)  # WRITE: the replication stream waits
        s.client.invalidate(["lost-born"])
        lost_born = s.born()[-1]
        wait_until(gone(a, "lost-born"), what="s's event carried to a")
        a.client.invalidate(["lost-copy"])
        wait_until(lambda: s.r.exists(s.key("lost-copy")) == 0, what="a's event applied in s")
        wait_until(checkpointed(s, a), what="a's stream checkpointed in s")
        wait_until(checkpointed(a, s), what="s's stream (with the copy) checkpointed in a")
        old = topology.address(topology.kill_primary())
    finally:
        for c in replicas:
            c.client_unpause()
            c.close()
    new = topology.wait_for_new_primary(old, within=FAILOVER_WITHIN)
    with topology.node_client(new) as c:
        entries = c.xrange(s.events_key)
    assert lost_born not in {eid.decode() for eid, _ in entries}  # lost, as meant

    # s->a: s's stream lost events the relay had read: a is flushed and gets RESET.
    wait_until(
        quietly(lambda: relay.metric("cachegw_relay_fallbacks_total", "s", "a") == 1),
        within=FAILOVER_WITHIN,
        what="the s->a fallback",
    )
    wait_until(gone(a, "unnamed"), what="a's L1 flushed by the RESET")
    assert a.r.exists(a.key("unnamed")) == 0
    assert a.client.incr("counter", 1) == 6  # counters are not copies: kept
    resets = a.resets()
    assert len(resets) == 1 and resets[0].relayed_from == "s"
    assert "dropping every cached value in a" in relay.output()

    # a->s: the copy s lost is applied again (s's checkpoint went back with it).
    wait_until(
        quietly(lambda: s.r.exists(s.key("lost-copy")) == 0 and gone(s, "lost-copy")()),
        within=FAILOVER_WITHIN,
        what="a's lost copy applied again in s",
    )
    assert relay.metric("cachegw_relay_fallbacks_total", "a", "s") == 0
    assert relay.metric("cachegw_relay_rewinds_total", "a", "s") == 1
    assert relay.metric("cachegw_relay_rewinds_total", "s", "a") == 0
    assert "s holds checkpoint" in relay.output()

    # And the relay keeps relaying both ways, on the new primary.
    cached_in_l1(s, "after-a", "s")
    a.client.invalidate(["after-a"])
    wait_until(gone(s, "after-a"), what="a's next event applied in s")
    cached_in_l1(a, "after-s", "a")
    wait_until(quietly(lambda: s.client.invalidate(["after-s"]) is not None))
    wait_until(gone(a, "after-s"), what="s's next event applied in a")
    assert s.client.get("s-kept") == b"s"  # s itself was never flushed
    wait_until(
        lambda: (
            relay.metric("cachegw_relay_up", "a", "s") == 1
            and relay.metric("cachegw_relay_up", "s", "a") == 1
        ),
        what="both links up",
    )
    assert relay.stop() == 0
