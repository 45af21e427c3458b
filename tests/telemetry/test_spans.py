"""The span tree of a call: a SERVER span per RPC with the cache's attributes, Redis
commands as its children, and the caller's trace context as its parent."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import redis
from opentelemetry.trace import SpanKind, StatusCode

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.telemetry import tracing
from tests.conftest import eventually
from tests.telemetry.conftest import GET, TracedFactory, TracedGateway, attrs

CLASSES = '[[classes]]\nname = "catalog"\npatterns = ["catalog:*"]\n'
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


async def _fresh_get(gw: TracedGateway, key: str) -> pb.GetResponse:
    gw.server.l1.clear()
    gw.clear()
    return await gw.stub.Get(pb.GetRequest(key=key))


async def test_miss_hit_l2_and_hit_l1(traced_factory: TracedFactory) -> None:
    gw = await traced_factory(CLASSES)

    reply = await _fresh_get(gw, "catalog:absent")
    assert reply.status == pb.STATUS_MISS
    (span,) = gw.server_spans()
    assert span.kind == SpanKind.SERVER
    assert span.parent is None  # no caller context: a root
    a = attrs(span)
    assert a["rpc.system"] == "grpc" and a["rpc.method"] == "Get"
    assert a["rpc.service"] == "cachegw.v1.CacheService"
    assert a["rpc.grpc.status_code"] == 0
    assert a["cachegw.key_class"] == "catalog"
    assert a["cachegw.tier"] == "miss"
    assert a["cachegw.coalesced"] is False
    (redis_span,) = gw.children(span)
    assert redis_span.kind == SpanKind.CLIENT
    # The pipelined read, one round trip: the value, its TTL and the class generation.
    assert redis_span.name == "GET PTTL GET"
    assert attrs(redis_span)["db.system"] == "redis"
    assert redis_span.context.trace_id == span.context.trace_id

    await gw.stub.Set(pb.SetRequest(key="catalog:1", value=b"v"))
    await _fresh_get(gw, "catalog:1")
    (span,) = gw.server_spans()
    assert attrs(span)["cachegw.tier"] == "l2"
    assert [c.name for c in gw.children(span)] == ["GET PTTL GET"]

    gw.clear()
    reply = await gw.stub.Get(pb.GetRequest(key="catalog:1"))
    assert reply.tier == pb.TIER_L1
    (span,) = gw.server_spans()
    assert attrs(span)["cachegw.tier"] == "l1"
    assert attrs(span)["cachegw.key_class"] == "catalog"
    assert gw.children(span) == []  # an L1 hit never touches Redis


async def test_coalesced_calls_share_one_redis_read(
    traced_factory: TracedFactory, redis_client: redis.Redis
) -> None:
    gw = await traced_factory()
    await gw.stub.Set(pb.SetRequest(key="hot", value=b"v"))
    gw.server.l1.clear()
    gw.clear()
    # Redis holds the first read for a moment, so every other Get arrives while it is in
    # flight (with spans to build, calls are slow enough to miss it otherwise).
    redis_client.client_pause(300)
    replies = await asyncio.gather(*(gw.stub.Get(pb.GetRequest(key="hot")) for _ in range(30)))
    assert all(r.value == b"v" for r in replies)

    spans = gw.server_spans()
    assert len(spans) == 30
    from_redis = [s for s in spans if attrs(s)["cachegw.tier"] == "l2"]
    leaders = [s for s in from_redis if not attrs(s)["cachegw.coalesced"]]
    joined = [s for s in from_redis if attrs(s)["cachegw.coalesced"]]
    assert len(leaders) == 1 and joined, "30 concurrent Gets: one read, the rest joined it"
    assert [c.name for c in gw.children(leaders[0])] == ["GET PTTL GET"]
    assert all(gw.children(s) == [] for s in joined)  # they waited on the leader's read
    assert gw.server.cache.reads.coalesced == len(joined)


async def test_getmany_and_set_spans(traced_factory: TracedFactory) -> None:
    gw = await traced_factory(CLASSES)
    await gw.stub.Set(pb.SetRequest(key="catalog:a", value=b"1"))
    (set_span,) = gw.server_spans("cachegw.v1.CacheService/Set")
    assert attrs(set_span)["cachegw.key_class"] == "catalog"
    # One round trip: one script reads the class generation and writes (see l2.py).
    assert [c.name for c in gw.children(set_span)] == ["EVALSHA"]
    gw.clear()
    await gw.stub.GetMany(pb.GetManyRequest(keys=["catalog:a", "b"]))
    (span,) = gw.server_spans("cachegw.v1.CacheService/GetMany")
    assert attrs(span)["cachegw.keys"] == 2
    assert attrs(span)["cachegw.l1_hits"] == 1  # "catalog:a" was filled by the Set
    assert [c.name for c in gw.children(span)] == ["GET PTTL GET"]  # only "b" went to Redis


async def test_failed_call_is_an_error_span(traced_factory: TracedFactory) -> None:
    gw = await traced_factory()
    gw.clear()
    try:
        await gw.stub.Get(pb.GetRequest(key=""))
    except Exception as exc:  # INVALID_ARGUMENT
        assert "key" in str(exc)
    # The span ends as the handler's abort unwinds, which can come after the caller has
    # the status (it failed once under load).
    await eventually(lambda: len(gw.server_spans()) == 1)
    (span,) = gw.server_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert attrs(span)["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT
    assert "INVALID_ARGUMENT" in (span.status.description or "")


async def test_caller_traceparent_is_the_parent(traced_factory: TracedFactory) -> None:
    gw = await traced_factory(telemetry__sample_ratio="0")  # only callers' samples count
    gw.clear()
    sampled = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
    await gw.stub.Get(pb.GetRequest(key="k"), metadata=sampled)
    (span,) = gw.server_spans()
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and span.parent.is_remote
    assert f"{span.parent.span_id:016x}" == PARENT_ID

    # The caller's "not sampled" is followed too, and with ratio 0 no root is kept.
    gw.clear()
    await gw.stub.Get(
        pb.GetRequest(key="k"), metadata=(("traceparent", sampled[0][1][:-2] + "00"),)
    )
    await gw.stub.Get(pb.GetRequest(key="k"))
    assert gw.spans() == []  # their Redis reads are not recorded either


async def test_tracing_off_installs_nothing(traced_factory: TracedFactory) -> None:
    gw = await traced_factory(tracing_on=False)
    await gw.stub.Get(pb.GetRequest(key="k"))
    assert gw.spans() == []
    assert not gw.server.telemetry.tracing
    assert not hasattr(gw.server.store.client, "_is_instrumented_by_opentelemetry") or not (
        gw.server.store.client._is_instrumented_by_opentelemetry
    )


async def test_annotate_sets_lease_attributes_on_the_current_span(
    traced_factory: TracedFactory,
) -> None:
    """The hook the lease code uses (names.LEASE, names.LEASE_WAIT_MS). After the lease
    work lands, assert its spans here the same way: attrs(span)["cachegw.lease"]."""
    gw = await traced_factory()
    assert gw.provider is not None
    tracer = gw.provider.get_tracer("test")
    with tracer.start_as_current_span("lease-path") as span:
        tracing.annotate(lease="waited", lease_wait_ms=12.5)
    assert attrs(span)["cachegw.lease"] == "waited"
    assert attrs(span)["cachegw.lease_wait_ms"] == 12.5
    tracing.annotate(lease="granted")  # outside any span: nothing happens, nothing fails


CLIENT_SCRIPT = """
import asyncio, json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # the application's setup, before the clients

from cachegw import AsyncClient, Client

tracer = trace.get_tracer("shop")
with tracer.start_as_current_span("checkout-sync"):
    with Client(sys.argv[1]) as client:
        client.get("cart:1")

async def main():
    async with AsyncClient(sys.argv[1]) as client:
        with tracer.start_as_current_span("checkout-async"):
            await client.get("cart:2")

asyncio.run(main())
print(json.dumps([
    {"name": s.name, "kind": s.kind.name, "span": f"{s.context.span_id:016x}",
     "trace": f"{s.context.trace_id:032x}",
     "parent": f"{s.parent.span_id:016x}" if s.parent else None}
    for s in exporter.get_finished_spans()
]))
"""


async def test_python_client_propagates_its_trace(
    traced_factory: TracedFactory, tmp_path: Path
) -> None:
    gw = await traced_factory(telemetry__sample_ratio="0")
    gw.clear()
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        gw.server.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    client_spans = {s["name"] + s["trace"]: s for s in json.loads(out)}
    by_name = {s["name"]: s for s in json.loads(out) if s["kind"] != "CLIENT"}
    server_spans = gw.server_spans()
    assert len(server_spans) == 2  # both sampled by the caller, though the ratio is 0
    for caller in ("checkout-sync", "checkout-async"):
        root = by_name[caller]
        (rpc,) = [
            s
            for s in client_spans.values()
            if s["kind"] == "CLIENT" and s["parent"] == root["span"] and s["name"] == GET
        ]
        (server,) = [s for s in server_spans if f"{s.context.trace_id:032x}" == root["trace"]]
        assert server.parent is not None
        assert f"{server.parent.span_id:016x}" == rpc["span"]


async def test_lease_spans_say_granted_waited_and_timed_out(traced_factory: TracedFactory) -> None:
    gw = await traced_factory("[default_class]\nmax_wait_seconds = 0.3\n")
    holder = await gw.stub.Get(pb.GetRequest(key="cold", lease=True))
    assert holder.status == pb.STATUS_LEASED
    (span,) = gw.server_spans()
    assert (attrs(span)["cachegw.lease"], attrs(span)["cachegw.tier"]) == ("granted", "miss")
    # A waiter answered by the holder's fill.
    gw.clear()
    waiter = asyncio.ensure_future(gw.stub.Get(pb.GetRequest(key="cold", lease=True)))
    # Waiting at the gateway (not merely sent: under load it could arrive after the
    # fill), and for long enough to show in lease_wait_ms.
    await eventually(lambda: gw.server.stats.classes["default"].lease_waits == 1)
    await asyncio.sleep(0.06)
    fill = pb.SetRequest(key="cold", value=b"v", lease_token=holder.lease_token)
    await gw.stub.Set(fill)
    assert (await waiter).value == b"v"
    (span,) = gw.server_spans()
    a = attrs(span)
    assert a["cachegw.lease"] == "waited" and a["cachegw.lease_wait_ms"] >= 50
    # A waiter whose wait runs out.
    other = await gw.stub.Get(pb.GetRequest(key="other", lease=True))
    assert other.status == pb.STATUS_LEASED
    gw.clear()
    late = await gw.stub.Get(pb.GetRequest(key="other", lease=True))
    assert late.status == pb.STATUS_MISS
    (span,) = gw.server_spans()
    assert attrs(span)["cachegw.lease"] == "timed_out"
    assert 250 <= attrs(span)["cachegw.lease_wait_ms"] < 1000
