"""/metrics scraped over HTTP and the Stats RPC, against the work a test did."""

from __future__ import annotations

import asyncio
import math
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachegw.v1 import cache_pb2 as pb
from tests.telemetry.conftest import TracedFactory, TracedGateway

CLASSES = (
    '[[classes]]\nname = "catalog"\npatterns = ["catalog:*"]\n'
    '[[classes]]\nname = "session"\npatterns = ["session:*"]\n'
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> tuple[Samples, str]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def do_work(gw: TracedGateway) -> None:
    """3 Sets, 2 L1 hits, 1 L2 hit, 2 misses, 1 Delete, 1 rejected Get."""
    for key in ("catalog:1", "catalog:2", "session:1"):
        await gw.stub.Set(pb.SetRequest(key=key, value=b"v" * 10))
    await gw.stub.Get(pb.GetRequest(key="catalog:1"))
    await gw.stub.Get(pb.GetRequest(key="catalog:1"))
    gw.server.l1.delete("catalog:2")
    await gw.stub.Get(pb.GetRequest(key="catalog:2"))
    await gw.stub.Get(pb.GetRequest(key="catalog:none"))
    await gw.stub.Get(pb.GetRequest(key="session:none"))
    await gw.stub.Delete(pb.DeleteRequest(keys=["session:1"]))
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.stub.Get(pb.GetRequest(key=""))


async def test_metrics_and_stats_count_the_work(traced_factory: TracedFactory) -> None:
    gw = await traced_factory(CLASSES, tracing_on=False, telemetry__metrics_listen="127.0.0.1:0")
    address = gw.server.metrics_address
    assert address is not None and not address.endswith(":0")
    await do_work(gw)
    gw.server.hotkeys.add("catalog:1", 5)  # on top of what the reads counted
    samples, text = await asyncio.to_thread(scrape, address)
    stats = await gw.stub.Stats(pb.StatsRequest(top_keys=3))

    assert value(samples, "cachegw_hits_total", **{"class": "catalog", "tier": "l1"}) == 2
    assert value(samples, "cachegw_hits_total", **{"class": "catalog", "tier": "l2"}) == 1
    assert value(samples, "cachegw_misses_total", **{"class": "catalog"}) == 1
    assert value(samples, "cachegw_misses_total", **{"class": "session"}) == 1
    assert value(samples, "cachegw_sets_total", **{"class": "catalog"}) == 2
    assert value(samples, "cachegw_deletes_total", **{"class": "session"}) == 1
    assert value(samples, "cachegw_lease_waits_total", **{"class": "catalog"}) == 0
    assert value(samples, "cachegw_rpc_duration_seconds_count", method="Get") == 6
    assert value(samples, "cachegw_rpc_duration_seconds_count", method="Set") == 3
    assert value(samples, "cachegw_rpc_errors_total", method="Get", code="INVALID_ARGUMENT") == 1
    assert value(samples, "cachegw_redis_up") == 1
    assert value(samples, "cachegw_l1_entries") == len(gw.server.l1)
    assert value(samples, "cachegw_l1_max_bytes") == gw.server.l1.max_bytes
    assert value(samples, "cachegw_redis_reads_total") == 3  # catalog:2 and both misses
    gw_info = value(samples, "cachegw_gateway_info", gateway_id=stats.gateway_id,
                    trace_exporter="none", trace_sample_ratio="0")  # fmt: skip
    assert gw_info == 1
    assert "# TYPE cachegw_rpc_duration_seconds histogram" in text

    # The Stats RPC says the same.
    by_class = {c.name: c for c in stats.classes}
    assert set(by_class) == {"catalog", "session", "default"}
    catalog = by_class["catalog"]
    assert (catalog.hits_l1, catalog.hits_l2, catalog.misses, catalog.sets) == (2, 1, 1, 2)
    assert math.isclose(catalog.hit_rate, 3 / 4)
    assert by_class["session"].deletes == 1
    rpcs = {r.method: r for r in stats.rpcs}
    assert rpcs["Get"].calls == 6 and rpcs["Get"].errors == 1
    assert len(rpcs["Get"].latency_buckets) == len(stats.latency_bounds_ms) + 1
    for i, bound in enumerate(stats.latency_bounds_ms):
        cumulative = sum(rpcs["Get"].latency_buckets[: i + 1])
        assert value(samples, "cachegw_rpc_duration_seconds_bucket", method="Get",
                     le=repr(bound / 1000)) == cumulative  # fmt: skip
    assert stats.l1.entries == value(samples, "cachegw_l1_entries")
    assert stats.l1.bytes == value(samples, "cachegw_l1_bytes")
    assert stats.redis_reads == 3 and stats.redis.up and stats.redis.errors == 0
    assert stats.trace_exporter == "none"
    # Every Get counts (hits and misses); catalog:1 was read twice.
    assert (stats.hot_keys[0].key, stats.hot_keys[0].count) == ("catalog:1", 7)
    assert {h.key for h in stats.hot_keys[1:]} <= {"catalog:2", "catalog:none", "session:none"}


async def test_stats_filters_classes(traced_factory: TracedFactory) -> None:
    gw = await traced_factory(CLASSES, tracing_on=False)
    stats = await gw.stub.Stats(pb.StatsRequest(classes=["session"]))
    assert [c.name for c in stats.classes] == ["session"]
    assert list(stats.hot_keys) == []  # top_keys 0: none asked for
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Stats(pb.StatsRequest(classes=["nope"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown class 'nope'" in (err.value.details() or "")


async def test_tracing_setup_is_reported(traced_factory: TracedFactory) -> None:
    gw = await traced_factory(telemetry__sample_ratio="0.25")
    stats = await gw.stub.Stats(pb.StatsRequest())
    assert (stats.trace_exporter, stats.trace_sample_ratio) == ("console", 0.25)


async def test_no_metrics_endpoint_by_default(traced_factory: TracedFactory) -> None:
    gw = await traced_factory(tracing_on=False)
    assert gw.server.metrics_address is None
