"""The two-region relay with a region behind Sentinel: real `cachegw serve` processes in
a standalone region and in a Sentinel region (``redis+sentinel://``), a real `cachegw
relay` process between them (tests/relay_regions.py): every invalidation kind crosses
both ways, once."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import Sentinel

from cachegw.client import Client
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayProcess
from tests.relay_regions import (
    TOML,
    LinkedRegion,
    Regions,
    cross_every_kind,
    gateway_flags,
    wait_until,
)
from tests.topology import SentinelTopology

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def topology() -> Iterator[SentinelTopology]:
    """One Sentinel topology for the module (each test under a prefix of its own)."""
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
