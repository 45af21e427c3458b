"""Two regions linked by `cachegw relay`: real redis-servers (one per region), real
`cachegw serve` processes (one per region) and a real `cachegw relay` process.

Each test fails when the behaviour it names is removed: without the relay's apply the
other region keeps serving the old value; without the loop guard each event comes back;
without the checkpoint the events made while the relay was down are skipped; without the
fallback a value no event named survives in the destination."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis

from cachegw.client import Client
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayProcess
from tests.relay_regions import (
    TOML,
    LinkedRegion,
    Regions,
    cached_in_l1,
    gateway_flags,
    gone,
    wait_until,
)


@pytest.fixture
def regions(tmp_path: Path, gateway_process: Callable[..., GatewayProcess]) -> Iterator[Regions]:
    config = tmp_path / "cachegw.toml"
    config.write_text(TOML)
    with ManagedRedis() as server_a, ManagedRedis() as server_b:
        built = []
        for name, server in (("a", server_a), ("b", server_b)):
            gw = gateway_process(*gateway_flags(config, server.url, "cg", name))
            built.append(
                LinkedRegion(
                    name,
                    server.url,
                    "cg",
                    redis.Redis.from_url(server.url),
                    gw,
                    Client(gw.address),
                    "cg:events",
                )
            )
        linked = Regions(built[0], built[1], tmp_path)
        try:
            yield linked
        finally:
            linked.close()


def test_invalidations_cross_both_ways_once(regions: Regions) -> None:
    a, b = regions.a, regions.b
    relay = regions.start_relay()
    for key in ("k", "set:k", "p:1", "p:2", "q:1", "t:1", "prod:1", "back"):
        cached_in_l1(b, key, f"b-{key}", tags=("T",) if key == "t:1" else ())
        cached_in_l1(a, key, f"a-{key}")

    # A Subscribe stream in b gets the copy (near caches there evict too).
    channel = grpc.insecure_channel(b.gateway.address)
    stream = cache_pb2_grpc.CacheServiceStub(channel).Subscribe(pb.SubscribeRequest())
    stream.initial_metadata()  # sent once the stream is registered
    seen: list[pb.InvalidationEvent] = []

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # CANCELLED when the test ends it
            seen.extend(stream)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        a.client.invalidate(["k"])  # by key
        wait_until(gone(b, "k"), what="key event applied in b")
        assert b.r.exists("cg:{k}") == 0
        wait_until(
            lambda: any(list(e.keys) == ["k"] and e.relayed_from == "a" for e in seen),
            what="the copy on b's Subscribe stream",
        )
    finally:
        stream.cancel()  # type: ignore[no-untyped-call]
        reader.join(5)
        channel.close()

    a.client.set("set:k", "a-new")  # a Set that replaced a value publishes an event
    wait_until(gone(b, "set:k"), what="replacing Set applied in b")

    a.client.invalidate(prefixes=["p:"])
    wait_until(lambda: gone(b, "p:1")() and gone(b, "p:2")(), what="prefix applied in b")

    a.client.invalidate(tags=["T"])  # b's index of T, not a's, names t:1
    wait_until(gone(b, "t:1"), what="tag applied in b")

    a.client.invalidate(classes=["prod"])
    wait_until(gone(b, "prod:1"), what="class applied in b")

    # Only what the events named: b's other copy is still served from its L1.
    assert b.in_l1("q:1")

    b.client.invalidate(["back"])  # and from b to a
    wait_until(gone(a, "back"), what="b's event applied in a")
    assert a.in_l1("q:1")

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
    assert len(a.born()) == 6 and len(b.born()) == 2
    assert a.copies_of("a") == [] and b.copies_of("b") == []
    assert len(a.events()) == 6 + 2 and len(b.events()) == 2 + 6

    # Lag: the log line and the metrics.
    wait_until(lambda: "relay a->b: 0 events behind" in relay.output(), what="lag line")
    text = relay.metrics()
    assert 'cachegw_relay_applied_total{dest="b",source="a"} 6.0' in text
    assert 'cachegw_relay_skipped_total{dest="b",source="a"} 2.0' in text
    assert 'cachegw_relay_behind_events{dest="a",source="b"} 0.0' in text
    assert relay.stop() == 0


def test_killed_relay_resumes_from_its_checkpoint(regions: Regions) -> None:
    a, b = regions.a, regions.b
    relay = regions.start_relay()
    for key in ("before", "while-down", "while-down-2"):
        cached_in_l1(b, key, "b")
    cached_in_l1(a, "from-b", "a")
    a.client.invalidate(["before"])
    wait_until(gone(b, "before"), what="applied before the kill")

    relay.stop(signal.SIGKILL)
    a.client.invalidate(["while-down"])
    a.client.set("while-down-2", "a")  # not a replacement in a: no event
    a.client.set("while-down-2", "a2")  # a replacement: an event
    b.client.invalidate(["from-b"])
    assert b.client.get("while-down") == b"b"  # nothing carries them: the relay is dead
    assert a.client.get("from-b") == b"a"

    relay = regions.start_relay()
    wait_until(gone(b, "while-down"), what="a's event made while down, applied")
    wait_until(gone(b, "while-down-2"), what="a's Set made while down, applied")
    wait_until(gone(a, "from-b"), what="b's event made while down, applied")
    # Nothing lost: every event born in a has a copy in b (a crash may repeat a batch).
    assert set(a.born()) <= set(b.copies_of("a"))
    assert "resuming after" in relay.output()
    assert "relay_fallback" not in relay.output() and "dropping every" not in relay.output()


def test_trimmed_source_flushes_the_destination(regions: Regions) -> None:
    a, b = regions.a, regions.b
    assert regions.run_once()["a->b"]["fallbacks"] == 0  # checkpoints at both ends
    cached_in_l1(b, "named", "b")
    cached_in_l1(b, "unnamed", "b")  # no event names it: only a flush removes it
    assert b.client.incr("counter", 5) == 5
    for i in range(20):
        a.client.invalidate([f"gone-{i}"])
    a.client.invalidate(["named"])
    a.r.xtrim("cg:events", maxlen=1, approximate=False)  # past the checkpoint

    figures = regions.run_once()
    assert figures["a->b"]["fallbacks"] == 1
    assert figures["b->a"]["fallbacks"] == 0
    wait_until(gone(b, "named"), what="named key gone")
    wait_until(gone(b, "unnamed"), what="b's L1 flushed by the RESET")
    assert b.r.exists("cg:{unnamed}") == 0
    assert b.client.incr("counter", 1) == 6  # counters are not copies: kept
    resets = b.resets()
    assert len(resets) == 1 and resets[0].relayed_from == "a"

    # Carried on from a's end: the next event crosses normally, no second fallback.
    cached_in_l1(b, "after", "b")
    a.client.invalidate(["after"])
    figures = regions.run_once()
    assert figures["a->b"]["fallbacks"] == 0 and figures["a->b"]["applied"] == 1
    wait_until(gone(b, "after"), what="event after the fallback applied")
