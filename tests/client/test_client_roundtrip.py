"""Both clients against the gateway double: every method, decoding, errors, deadlines.

Tests taking `any_client` run twice: over `Client` and over `AsyncClient`.
"""

from __future__ import annotations

import socket

import grpc
import pytest

import cachegw
from cachegw import (
    AsyncClient,
    CacheError,
    Client,
    DeadlineExceeded,
    Entry,
    InvalidArgument,
    SetOutcome,
    SetResult,
    Status,
    Tier,
)
from cachegw.v1 import cache_pb2 as pb
from tests.client.conftest import DEFAULT_TTL_MS, Gateway


async def test_set_get_delete(any_client: AsyncClient, fake_gateway: Gateway) -> None:
    assert await any_client.get("k") is None
    result = await any_client.set("k", b"\x00value\xff")
    assert result == SetResult(SetOutcome.STORED, 1, DEFAULT_TTL_MS / 1000, "default")
    assert result.stored
    assert await any_client.get("k") == b"\x00value\xff"
    assert await any_client.delete("k", "absent") == 1
    assert await any_client.get("k") is None
    assert await any_client.delete() == 0


async def test_an_empty_value_is_a_hit(any_client: AsyncClient) -> None:
    await any_client.set("empty", b"")
    assert await any_client.get("empty") == b""
    assert (await any_client.lookup("empty")).hit


async def test_str_values_are_utf8(any_client: AsyncClient, fake_gateway: Gateway) -> None:
    await any_client.set("greeting", "grüß dich")
    assert fake_gateway.servicer.store["greeting"].value == "grüß dich".encode()
    assert await any_client.get("greeting") == "grüß dich".encode()


async def test_set_sends_ttl_tags_and_version(
    any_client: AsyncClient, fake_gateway: Gateway
) -> None:
    result = await any_client.set("k", b"v", ttl=1.5, tags=["t1", "t2"], if_version=0)
    assert (result.outcome, result.ttl) == (SetOutcome.STORED, 1.5)
    sent = fake_gateway.servicer.requests[-1]
    assert isinstance(sent, pb.SetRequest)
    assert (sent.ttl_ms, list(sent.tags), sent.if_version) == (1500, ["t1", "t2"], 0)

    await any_client.set("plain", b"v")
    plain = fake_gateway.servicer.requests[-1]
    assert isinstance(plain, pb.SetRequest)
    assert not plain.HasField("ttl_ms")
    assert not plain.HasField("if_version")
    assert not plain.HasField("origin_version")

    await any_client.set("row", b"v", origin_version=12)
    versioned = fake_gateway.servicer.requests[-1]
    assert isinstance(versioned, pb.SetRequest)
    assert versioned.origin_version == 12


async def test_compare_and_set(any_client: AsyncClient) -> None:
    first = await any_client.set("k", b"1")
    conflict = await any_client.set("k", b"2", if_version=first.version + 10)
    assert conflict.outcome is SetOutcome.VERSION_CONFLICT
    assert not conflict.stored
    assert conflict.version == first.version
    again = await any_client.set("k", b"2", if_version=first.version)
    assert again.stored
    assert again.version > first.version


async def test_lease_then_fill(any_client: AsyncClient, fake_gateway: Gateway) -> None:
    entry = await any_client.lookup("k", lease=True, max_wait=0.25)
    sent = fake_gateway.servicer.requests[-1]
    assert isinstance(sent, pb.GetRequest)
    assert (sent.lease, sent.max_wait_ms, sent.allow_stale) == (True, 250, False)
    assert entry.status is Status.LEASED
    assert entry.tier is Tier.ORIGIN
    assert not entry.hit
    assert entry.value is None
    assert entry.lease_token == b"lease:k"

    refused = await any_client.set("k", b"v", lease_token=b"not-the-token")
    assert refused.outcome is SetOutcome.LEASE_INVALID
    filled = await any_client.set("k", b"v", lease_token=entry.lease_token)
    assert filled.stored

    hit = await any_client.lookup("k")
    assert hit == Entry(
        status=Status.HIT,
        value=b"v",
        tier=Tier.L1,
        ttl_remaining=DEFAULT_TTL_MS / 1000,
        version=filled.version,
        key_class="default",
    )
    assert hit.hit


async def test_release_lease(any_client: AsyncClient, fake_gateway: Gateway) -> None:
    entry = await any_client.lookup("k", lease=True)
    assert await any_client.release_lease("k", entry.lease_token) is True
    sent = fake_gateway.servicer.requests[-1]
    assert isinstance(sent, pb.ReleaseLeaseRequest)
    assert (sent.key, sent.lease_token) == ("k", b"lease:k")
    assert await any_client.release_lease("k", entry.lease_token) is False
    sent_before = len(fake_gateway.servicer.requests)
    with pytest.raises(InvalidArgument, match="lease_token"):
        await any_client.release_lease("k", b"")
    with pytest.raises(TypeError, match="lease_token must be bytes"):
        await any_client.release_lease("k", "lease:k")  # type: ignore[arg-type]
    assert len(fake_gateway.servicer.requests) == sent_before  # checked before sending


async def test_every_entry_field_is_decoded(any_client: AsyncClient, fake_gateway: Gateway) -> None:
    fake_gateway.servicer.canned["stale"] = pb.GetResponse(
        status=pb.STATUS_STALE,
        value=b"old",
        tier=pb.TIER_L2,
        lease_token=b"tok",
        refresh=True,
        ttl_remaining_ms=1234,
        version=7,
        key_class="catalog",
    )
    entry = await any_client.lookup("stale", allow_stale=True)
    sent = fake_gateway.servicer.requests[-1]
    assert isinstance(sent, pb.GetRequest)
    assert sent.allow_stale
    assert entry == Entry(Status.STALE, b"old", Tier.L2, b"tok", True, 1.234, 7, "catalog")
    assert entry.hit
    assert await any_client.get("stale") == b"old"


async def test_a_miss_drops_any_value_and_an_unset_tier_is_none(
    any_client: AsyncClient, fake_gateway: Gateway
) -> None:
    fake_gateway.servicer.canned["odd"] = pb.GetResponse(status=pb.STATUS_MISS, value=b"junk")
    entry = await any_client.lookup("odd")
    assert (entry.status, entry.value, entry.tier) == (Status.MISS, None, Tier.NONE)
    assert await any_client.get("odd") is None


async def test_get_many_keeps_order(any_client: AsyncClient, fake_gateway: Gateway) -> None:
    await any_client.set("a", b"1")
    await any_client.set("c", b"3")
    assert await any_client.get_many(["c", "b", "a", "c"]) == [b"3", None, b"1", b"3"]
    assert await any_client.get_many(iter(["a"])) == [b"1"]

    entries = await any_client.lookup_many(("a", "b"), allow_stale=True)
    sent = fake_gateway.servicer.requests[-1]
    assert isinstance(sent, pb.GetManyRequest)
    assert (list(sent.keys), sent.allow_stale) == (["a", "b"], True)
    assert [e.status for e in entries] == [Status.HIT, Status.MISS]
    assert [e.value for e in entries] == [b"1", None]


async def test_local_checks_never_reach_the_gateway(
    any_client: AsyncClient, fake_gateway: Gateway
) -> None:
    with pytest.raises(cachegw.InvalidArgument, match="key must not be empty"):
        await any_client.get("")
    with pytest.raises(TypeError):
        await any_client.get_many("abc")
    with pytest.raises(cachegw.InvalidArgument, match="ttl"):
        await any_client.set("k", b"v", ttl=0)
    assert fake_gateway.servicer.requests == []


ERRORS = [
    (grpc.StatusCode.INVALID_ARGUMENT, cachegw.InvalidArgument),
    (grpc.StatusCode.NOT_FOUND, cachegw.NotFound),
    (grpc.StatusCode.FAILED_PRECONDITION, cachegw.FailedPrecondition),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, cachegw.ResourceExhausted),
    (grpc.StatusCode.UNAVAILABLE, cachegw.Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, cachegw.DeadlineExceeded),
    (grpc.StatusCode.UNAUTHENTICATED, cachegw.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, cachegw.PermissionDenied),
    (grpc.StatusCode.UNIMPLEMENTED, cachegw.Unimplemented),
    (grpc.StatusCode.INTERNAL, CacheError),
    (grpc.StatusCode.DATA_LOSS, CacheError),
]


@pytest.mark.parametrize(("code", "error"), ERRORS, ids=[code.name for code, _ in ERRORS])
async def test_status_codes_map_to_exceptions(
    any_client: AsyncClient, fake_gateway: Gateway, code: grpc.StatusCode, error: type[CacheError]
) -> None:
    fake_gateway.servicer.failure = (code, f"the {code.name} details")
    for call in (
        any_client.get("k"),
        any_client.lookup("k"),
        any_client.get_many(["k"]),
        any_client.lookup_many(["k"]),
        any_client.set("k", b"v"),
        any_client.delete("k"),
    ):
        with pytest.raises(CacheError) as caught:
            await call
        assert type(caught.value) is error
        assert caught.value.code == code
        assert caught.value.details == f"the {code.name} details"
        assert f"the {code.name} details" in str(caught.value)


async def test_message_carries_the_server_details(
    any_client: AsyncClient, fake_gateway: Gateway
) -> None:
    details = "key must be at most 512 bytes (got 600)"
    fake_gateway.servicer.failure = (grpc.StatusCode.INVALID_ARGUMENT, details)
    with pytest.raises(cachegw.InvalidArgument) as caught:
        await any_client.get("k" * 600)
    assert f"{type(caught.value).__name__}: {caught.value}" == f"InvalidArgument: {details}"


async def test_per_call_timeout(any_client: AsyncClient, fake_gateway: Gateway) -> None:
    fake_gateway.servicer.delay = 5.0
    with pytest.raises(DeadlineExceeded) as caught:
        await any_client.get("k", timeout=0.2)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(caught.value, TimeoutError)
    with pytest.raises(DeadlineExceeded):
        await any_client.set("k", b"v", timeout=0.2)


def test_default_timeout_and_override_sync(fake_gateway: Gateway) -> None:
    fake_gateway.servicer.delay = 0.5
    with Client(fake_gateway.target, timeout=0.1) as client:
        with pytest.raises(DeadlineExceeded):
            client.get("k")
        assert client.get("k", timeout=10.0) is None
        assert client.get("k", timeout=None) is None


async def test_default_timeout_and_override_async(fake_gateway: Gateway) -> None:
    fake_gateway.servicer.delay = 0.5
    async with AsyncClient(fake_gateway.target, timeout=0.1) as client:
        with pytest.raises(DeadlineExceeded):
            await client.get("k")
        assert await client.get("k", timeout=10.0) is None
        assert await client.get("k", timeout=None) is None


def test_channel_options_reach_the_channel(fake_gateway: Gateway) -> None:
    options = [("grpc.max_receive_message_length", 64)]
    with Client(fake_gateway.target, channel_options=options) as client:
        client.set("big", b"x" * 1000)
        with pytest.raises(cachegw.ResourceExhausted):
            client.get("big")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_no_gateway_is_unavailable_sync() -> None:
    with (
        Client(f"127.0.0.1:{_closed_port()}", timeout=10) as client,
        pytest.raises(cachegw.Unavailable) as caught,
    ):
        client.get("k")
    assert caught.value.details


async def test_no_gateway_is_unavailable_async() -> None:
    async with AsyncClient(f"127.0.0.1:{_closed_port()}", timeout=10) as client:
        with pytest.raises(cachegw.Unavailable):
            await client.get("k")


async def test_close_is_explicit_too(fake_gateway: Gateway) -> None:
    sync_client = Client(fake_gateway.target)
    assert sync_client.get("k") is None
    sync_client.close()
    async_client = AsyncClient(fake_gateway.target)
    assert await async_client.get("k") is None
    await async_client.close()
    assert repr(async_client) == f"AsyncClient({fake_gateway.target!r}, timeout=5.0)"
