"""Bad input: INVALID_ARGUMENT with a message a person can act on, and nothing reaches Redis."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayFactory, RunningGateway

SMALL = """
[server]
max_key_bytes = 16
max_batch_keys = 4
max_ttl_seconds = 3600

[default_class]
max_value_bytes = 100
"""


def _redis_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    # This test's own INFO and CONFIG RESETSTAT, and the gateway's health probe (PING on a
    # connection it may have to open), are the only commands allowed.
    allowed = ("cmdstat_info", "cmdstat_config", "cmdstat_ping", "cmdstat_hello", "cmdstat_client")
    return sum(v["calls"] for k, v in stats.items() if not k.startswith(allowed))


async def _expect_invalid(call: Awaitable[Any], *fragments: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details() or ""
    for fragment in fragments:
        assert fragment in details, details


CASES: list[tuple[str, Callable[[Any], Awaitable[Any]], tuple[str, ...]]] = [
    ("empty key get", lambda s: s.Get(pb.GetRequest(key="")), ("key must not be empty",)),
    (
        "empty key set",
        lambda s: s.Set(pb.SetRequest(key="", value=b"v")),
        ("key must not be empty",),
    ),
    (
        "long key",
        lambda s: s.Get(pb.GetRequest(key="k" * 17)),
        ("key must be at most 16 bytes", "got 17"),
    ),
    (
        "long multibyte key",
        lambda s: s.Set(pb.SetRequest(key="é" * 9, value=b"v")),
        ("at most 16 bytes", "got 18"),
    ),
    (
        "value over class limit",
        lambda s: s.Set(pb.SetRequest(key="k", value=b"x" * 101)),
        ("value is 101 bytes", "'default' allows at most 100"),
    ),
    (
        "negative ttl",
        lambda s: s.Set(pb.SetRequest(key="k", value=b"v", ttl_ms=-5)),
        ("ttl_ms must be positive (got -5)",),
    ),
    (
        "zero ttl",
        lambda s: s.Set(pb.SetRequest(key="k", value=b"v", ttl_ms=0)),
        ("ttl_ms must be positive",),
    ),
    (
        "absurd ttl",
        lambda s: s.Set(pb.SetRequest(key="k", value=b"v", ttl_ms=10**12)),
        ("ttl_ms must be at most 3600000",),
    ),
    (
        "batch too large",
        lambda s: s.GetMany(pb.GetManyRequest(keys=["a", "b", "c", "d", "e"])),
        ("keys has 5 entries; at most 4",),
    ),
    (
        "bad key inside a batch",
        lambda s: s.GetMany(pb.GetManyRequest(keys=["a", ""])),
        ("keys[1] must not be empty",),
    ),
    (
        "bad key in delete",
        lambda s: s.Delete(pb.DeleteRequest(keys=["a", "x" * 40])),
        ("keys[1] must be at most 16 bytes",),
    ),
]


@pytest.mark.parametrize(("name", "call", "fragments"), CASES, ids=[c[0] for c in CASES])
async def test_rejected_before_redis(
    gateway_factory: GatewayFactory,
    redis_client: redis.Redis,
    name: str,
    call: Callable[[Any], Awaitable[Any]],
    fragments: tuple[str, ...],
) -> None:
    gw = await gateway_factory(SMALL)
    redis_client.config_resetstat()
    await _expect_invalid(call(gw.stub), *fragments)
    assert _redis_calls(redis_client) == 0


def _raw(gw: RunningGateway, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return gw.channel.unary_unary(f"/cachegw.v1.CacheService/{method}", None, None)


async def test_unknown_fields_are_ignored(gateway: RunningGateway) -> None:
    # proto3: a field this gateway does not know (a newer client's) is skipped, so a
    # rolling upgrade can put new clients in front of old gateways.
    field_99_varint = b"\x98\x06\x01"  # tag (99 << 3) | 0, value 1
    field_99_bytes = b"\x9a\x06\x03abc"  # tag (99 << 3) | 2, length 3
    field_25_varint = b"\xc8\x01\x01"  # tag (25 << 3) | 0, value 1
    miss = await _raw(gateway, "Get")(pb.GetRequest(key="k").SerializeToString() + field_99_varint)
    assert pb.GetResponse.FromString(miss).status == pb.STATUS_MISS
    request = pb.SetRequest(key="k", value=b"v").SerializeToString()
    stored = pb.SetResponse.FromString(await _raw(gateway, "Set")(request + field_25_varint))
    assert stored.outcome == pb.SET_OUTCOME_STORED
    for extra in (field_99_varint, field_99_bytes, field_99_bytes + field_99_varint):
        raw = await _raw(gateway, "Get")(pb.GetRequest(key="k").SerializeToString() + extra)
        hit = pb.GetResponse.FromString(raw)
        assert (hit.status, hit.value) == (pb.STATUS_HIT, b"v")
    # An unknown field before the known ones (fields may come in any order).
    raw = await _raw(gateway, "GetMany")(
        field_99_bytes + pb.GetManyRequest(keys=["k", "other"]).SerializeToString()
    )
    answer = pb.GetManyResponse.FromString(raw)
    assert [r.status for r in answer.results] == [pb.STATUS_HIT, pb.STATUS_MISS]


async def test_undecodable_bytes_are_rejected(gateway: RunningGateway) -> None:
    # Field 1 (key) as a length-delimited string holding invalid UTF-8.
    await _expect_invalid(
        _raw(gateway, "Get")(b"\x0a\x02\xff\xfe"), "not a valid cachegw.v1.GetRequest"
    )
    # A truncated message.
    await _expect_invalid(_raw(gateway, "Set")(b"\x0a\x10ab"), "not a valid cachegw.v1.SetRequest")


async def test_gateway_keeps_serving_after_bad_input(gateway: RunningGateway) -> None:
    for _ in range(3):
        await _expect_invalid(_raw(gateway, "Get")(b"\xff\xff\xff"), "not a valid")
    await gateway.stub.Set(pb.SetRequest(key="ok", value=b"fine"))
    assert (await gateway.stub.Get(pb.GetRequest(key="ok"))).value == b"fine"
