"""Invalidation over real gRPC and a real redis-server: by key, prefix, tag and class, with
the copies in L1 only, in Redis only and in both; fan-out to other gateways; the pub/sub
connection killed; Subscribe filters, resume, trimming and slow subscribers.

Gateways here run in the test's event loop and share one Redis; the three-process
version is tests/test_fanout.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from tests.conftest import GatewayFactory, RunningGateway, eventually

CLASSES = """
[[classes]]
name = "inventory"
patterns = ["inv:*"]
ttl_seconds = 60

[[classes]]
name = "counter"
patterns = ["rate:*"]
invalidation = "ttl"
"""


async def cache_everywhere(gws: list[RunningGateway], key: str, value: bytes, **kw: object) -> None:
    await gws[0].stub.Set(pb.SetRequest(key=key, value=value, **kw))  # type: ignore[arg-type]
    for gw in gws:
        got = await gw.stub.Get(pb.GetRequest(key=key))
        assert got.value == value
        assert key in gw.server.l1


async def test_invalidate_keys_reaches_every_gateway(gateway_factory: GatewayFactory) -> None:
    gws = [await gateway_factory(CLASSES) for _ in range(3)]
    await cache_everywhere(gws, "inv:1", b"5 left")
    out = await gws[1].stub.Invalidate(pb.InvalidateRequest(keys=["inv:1", "inv:none"]))
    assert out.removed == 1 and out.event_id
    assert "inv:1" not in gws[1].server.l1  # the invalidating gateway: before it answers
    await eventually(lambda: all("inv:1" not in gw.server.l1 for gw in gws))
    for gw in gws:
        assert (await gw.stub.Get(pb.GetRequest(key="inv:1"))).status == pb.STATUS_MISS


async def test_a_replacing_set_drops_other_copies_unless_the_class_is_ttl_only(
    gateway_factory: GatewayFactory,
) -> None:
    a, b = await gateway_factory(CLASSES), await gateway_factory(CLASSES)
    await cache_everywhere([a, b], "inv:2", b"old")
    await a.stub.Set(pb.SetRequest(key="inv:2", value=b"new"))
    await eventually(lambda: "inv:2" not in b.server.l1)
    assert (await b.stub.Get(pb.GetRequest(key="inv:2"))).value == b"new"
    # A "ttl" class publishes nothing on Set: b's copy stays until its L1 TTL.
    published = a.server.stats.invalidations_published
    await cache_everywhere([a, b], "rate:1", b"1")
    await a.stub.Set(pb.SetRequest(key="rate:1", value=b"2"))
    assert a.server.stats.invalidations_published == published
    # Deletes always publish.
    await a.stub.Delete(pb.DeleteRequest(keys=["inv:2"]))
    assert a.server.stats.invalidations_published == published + 1


def place(where: str) -> tuple[bool, bool]:
    return {"l1": (True, False), "l2": (False, True), "both": (True, True)}[where]


@pytest.mark.parametrize("where", ["l1", "l2", "both"])
@pytest.mark.parametrize("how", ["prefix", "tag", "class"])
async def test_broad_invalidation_wherever_the_copies_sit(
    gateway_factory: GatewayFactory, redis_client: redis.Redis, where: str, how: str
) -> None:
    a, b = await gateway_factory(CLASSES), await gateway_factory(CLASSES)
    in_l1, in_l2 = place(where)
    keys = [f"inv:{i}" for i in range(5)]
    for key in keys:
        await a.stub.Set(pb.SetRequest(key=key, value=b"v", tags=["sku-7"]))
        await b.stub.Get(pb.GetRequest(key=key))  # b copies it into its L1
    await a.stub.Set(pb.SetRequest(key="other:1", value=b"keep", tags=["sku-8"]))
    if not in_l1:
        a.server.l1.clear()
        b.server.l1.clear()
    if not in_l2:  # Redis lost them (evicted, flushed): only the L1 copies remain
        redis_client.delete(*[f"cg:{{{k}}}" for k in keys])
    request = {
        "prefix": pb.InvalidateRequest(prefixes=["inv:"]),
        "tag": pb.InvalidateRequest(tags=["sku-7"]),
        "class": pb.InvalidateRequest(classes=["inventory"]),
    }[how]
    out = await a.stub.Invalidate(request)
    if how != "class" and in_l2:
        assert out.removed == len(keys)
    await eventually(lambda: not any(k in gw.server.l1 for gw in (a, b) for k in keys))
    for gw in (a, b):
        for key in keys:
            assert (await gw.stub.Get(pb.GetRequest(key=key))).status == pb.STATUS_MISS
        assert (await gw.stub.Get(pb.GetRequest(key="other:1"))).value == b"keep"
    # The class lives on: new writes are read back normally.
    await b.stub.Set(pb.SetRequest(key="inv:0", value=b"again"))
    assert (await a.stub.Get(pb.GetRequest(key="inv:0"))).value == b"again"


async def test_class_invalidation_is_a_generation_bump(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    for i in range(50):
        await gateway.stub.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
    redis_client.config_resetstat()
    out = await gateway.stub.Invalidate(pb.InvalidateRequest(classes=["default"]))
    assert out.removed == 0
    stats = redis_client.info("commandstats")
    assert "cmdstat_scan" not in stats and "cmdstat_unlink" not in stats
    assert stats["cmdstat_incrby"]["calls"] == 1
    got = await gateway.stub.Get(pb.GetRequest(key="k3"))
    assert got.status == pb.STATUS_MISS


async def test_lost_subscription_flushes_l1_and_resets_subscribers(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory()
    await cache_everywhere([gw], "k", b"v")
    stream = gw.stub.Subscribe(pb.SubscribeRequest())
    await stream.initial_metadata()
    assert redis_client.client_kill_filter(_type="pubsub") >= 1
    first = await asyncio.wait_for(stream.read(), 3)
    assert first.kind == pb.EVENT_KIND_RESET
    assert "k" not in gw.server.l1
    assert gw.server.stats.l1_flushes >= 1
    # It re-subscribes by itself, and L1 works again.
    await eventually(lambda: gw.server.bus.live and gw.server.cache.fills_allowed, 5)
    await gw.stub.Get(pb.GetRequest(key="k"))
    assert "k" in gw.server.l1
    stream.cancel()


async def test_subscribe_filters_by_prefix_and_class(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(CLASSES)
    by_prefix = gw.stub.Subscribe(pb.SubscribeRequest(prefixes=["inv:1"]))
    by_class = gw.stub.Subscribe(pb.SubscribeRequest(classes=["counter"]))
    everything = gw.stub.Subscribe(pb.SubscribeRequest())
    for stream in (by_prefix, by_class, everything):
        await stream.initial_metadata()
    await gw.stub.Invalidate(pb.InvalidateRequest(keys=["inv:10", "inv:2", "rate:x"]))
    await gw.stub.Invalidate(pb.InvalidateRequest(classes=["inventory"]))
    await gw.stub.Invalidate(pb.InvalidateRequest(tags=["t"]))
    got = [await asyncio.wait_for(by_prefix.read(), 2) for _ in range(3)]
    assert list(got[0].keys) == ["inv:10"]
    assert list(got[1].classes) == ["inventory"]  # a class may have keys under the prefix
    assert list(got[2].tags) == ["t"]  # tags name no keys: always delivered
    got = [await asyncio.wait_for(by_class.read(), 2) for _ in range(2)]
    assert list(got[0].keys) == ["rate:x"]
    assert list(got[1].tags) == ["t"]  # the inventory class event was filtered out
    got = [await asyncio.wait_for(everything.read(), 2) for _ in range(3)]
    assert list(got[0].keys) == ["inv:10", "inv:2", "rate:x"]
    assert [e.origin for e in got] == [gw.server.origin] * 3
    assert gw.server.origin.startswith(gw.server.gateway_id + "/")
    for stream in (by_prefix, by_class, everything):
        stream.cancel()


async def test_subscribe_since_replays_exactly_the_missed_events(
    gateway_factory: GatewayFactory,
) -> None:
    a, b = await gateway_factory(), await gateway_factory()
    first = await a.stub.Invalidate(pb.InvalidateRequest(keys=["e0"]))
    missed = [
        (await a.stub.Invalidate(pb.InvalidateRequest(keys=[f"e{i}"]))).event_id
        for i in range(1, 6)
    ]
    stream = b.stub.Subscribe(pb.SubscribeRequest(since=first.event_id))
    replay = [await asyncio.wait_for(stream.read(), 2) for _ in range(5)]
    assert [e.id for e in replay] == missed
    assert [list(e.keys) for e in replay] == [[f"e{i}"] for i in range(1, 6)]
    live = await a.stub.Invalidate(pb.InvalidateRequest(keys=["e6"]))
    nxt = await asyncio.wait_for(stream.read(), 2)
    assert (nxt.id, list(nxt.keys)) == (live.event_id, ["e6"])
    stream.cancel()


async def test_since_older_than_the_stream_keeps_starts_with_reset(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(invalidation__stream_max_len=5)
    first = await gw.stub.Invalidate(pb.InvalidateRequest(keys=["old"]))
    for i in range(300):  # MAXLEN ~ trims in whole macro-nodes (100 entries)
        await gw.stub.Invalidate(pb.InvalidateRequest(keys=[f"k{i}"]))
    stream = gw.stub.Subscribe(pb.SubscribeRequest(since=first.event_id))
    head = await asyncio.wait_for(stream.read(), 2)
    assert head.kind == pb.EVENT_KIND_RESET
    stream.cancel()


async def test_a_slow_subscriber_gets_reset_not_unbounded_memory(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(invalidation__subscriber_queue=10)
    # A fixed 64 kB flow-control window (no BDP probing), so that a reader that stops
    # reading stops the gateway's writes soon.
    channel = grpc.aio.insecure_channel(gw.address, options=[("grpc.http2.bdp_probe", 0)])
    stream = cache_pb2_grpc.CacheServiceStub(channel).Subscribe(pb.SubscribeRequest())
    await stream.initial_metadata()
    (queue,) = gw.server.hub._queues
    # The subscriber reads nothing: once gRPC's flow-control window is full (~40 kB
    # events), the gateway's queue for it fills, and it is dropped for a RESET.
    for i in range(100):
        keys = [f"{i}:{j}:" + "x" * 400 for j in range(100)]
        await gw.stub.Invalidate(pb.InvalidateRequest(keys=keys))
        assert len(queue) <= 10
    assert gw.server.stats.subscriber_resets + queue._overflowed >= 1
    for _ in range(50):  # what was already in flight, then the RESET
        event = await asyncio.wait_for(stream.read(), 2)
        assert isinstance(event, pb.InvalidationEvent)
        if event.kind == pb.EVENT_KIND_RESET:
            break
    else:
        raise AssertionError("no RESET")
    assert gw.server.stats.subscriber_resets >= 1
    # After the RESET it carries on with live events.
    live = await gw.stub.Invalidate(pb.InvalidateRequest(keys=["after"]))
    for _ in range(50):
        event = await asyncio.wait_for(stream.read(), 2)
        assert isinstance(event, pb.InvalidationEvent)
        if event.id == live.event_id:
            break
    else:
        raise AssertionError("the live event after the RESET never came")
    stream.cancel()
    await channel.close(None)


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (pb.InvalidateRequest(), "at least one"),
        (pb.InvalidateRequest(keys=[""]), "keys[0] must not be empty"),
        (pb.InvalidateRequest(prefixes=[""]), "prefixes[0]"),
        (pb.InvalidateRequest(classes=["nope"]), "'nope' is not a key class"),
        (pb.InvalidateRequest(tags=["x" * 600]), "tags[0] must be at most"),
    ],
)
async def test_bad_invalidations_are_invalid_arguments(
    gateway: RunningGateway, request_: pb.InvalidateRequest, words: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gateway.stub.Invalidate(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (err.value.details() or "")


async def test_bad_subscriptions_are_invalid_arguments(gateway: RunningGateway) -> None:
    for request_, words in [
        (pb.SubscribeRequest(since="yesterday"), "not an event id"),
        (pb.SubscribeRequest(classes=["nope"]), "not a key class"),
    ]:
        stream = gateway.stub.Subscribe(request_)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (err.value.details() or "")


async def test_tags_are_validated_on_set(gateway: RunningGateway) -> None:
    for tags, words in [([""], "tags[0] must not be empty"), (["t"] * 33, "at most 32")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gateway.stub.Set(pb.SetRequest(key="k", value=b"v", tags=tags))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (err.value.details() or "")
    got = await gateway.stub.Set(pb.SetRequest(key="k", value=b"v", tags=["a", "b"]))
    assert got.outcome == pb.SET_OUTCOME_STORED
    read = await gateway.stub.Get(pb.GetRequest(key="k"))
    assert list(read.tags) == ["a", "b"]


async def test_one_invalidate_of_many_tags_removes_each_tags_keys(
    gateway: RunningGateway,
) -> None:
    """The tags of one call are walked concurrently (a few at a time): every one is
    applied, and what no tag names stays."""
    tags = [f"page-{i}" for i in range(40)]
    for i, tag in enumerate(tags):
        for j in range(3):
            await gateway.stub.Set(pb.SetRequest(key=f"p:{i}:{j}", value=b"v", tags=[tag]))
    await gateway.stub.Set(pb.SetRequest(key="kept", value=b"v", tags=["page-other"]))
    out = await gateway.stub.Invalidate(pb.InvalidateRequest(tags=tags))
    assert out.removed == 120
    gateway.server.l1.clear()
    got = await gateway.stub.GetMany(
        pb.GetManyRequest(keys=[f"p:{i}:{j}" for i in range(40) for j in range(3)] + ["kept"])
    )
    assert [r.status for r in got.results] == [pb.STATUS_MISS] * 120 + [pb.STATUS_HIT]


async def test_tags_over_a_chunk_are_walked_to_the_end(gateway: RunningGateway) -> None:
    """The first chunk of every index is read in one round trip; what is past it is
    walked on tag by tag."""
    for i in range(7):
        await gateway.stub.Set(pb.SetRequest(key=f"big:{i}", value=b"v", tags=["big"]))
    await gateway.stub.Set(pb.SetRequest(key="small:0", value=b"v", tags=["small"]))
    await gateway.stub.Set(pb.SetRequest(key="kept", value=b"v", tags=["other"]))
    store = gateway.server.store
    assert await store.delete_tags(["big", "empty", "small"], chunk=3) == 8
    gateway.server.l1.clear()
    keys = [f"big:{i}" for i in range(7)] + ["small:0", "kept"]
    got = await gateway.stub.GetMany(pb.GetManyRequest(keys=keys))
    assert [r.status for r in got.results] == [pb.STATUS_MISS] * 8 + [pb.STATUS_HIT]
