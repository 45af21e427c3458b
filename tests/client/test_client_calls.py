"""The shared call layer without a network: argument checks, conversions, decoding, errors."""

from __future__ import annotations

import inspect
import math
import pickle

import grpc
import pytest

import cachegw
from cachegw import _calls
from cachegw.errors import CacheError, InvalidArgument, error_from_rpc
from cachegw.models import Entry, SetOutcome, Status, Tier
from cachegw.v1 import cache_pb2 as pb


@pytest.mark.parametrize(
    ("ttl", "ms"), [(1.5, 1500), (0.1, 100), (60, 60_000), (0.0001, 1), (0.0015, 2)]
)
def test_ttl_seconds_to_ms(ttl: float, ms: int) -> None:
    assert (
        _calls.set_("k", b"v", ttl=ttl, tags=(), lease_token=b"", if_version=None).request.ttl_ms
        == ms
    )


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, 1e300])
def test_bad_ttl(ttl: float) -> None:
    with pytest.raises(InvalidArgument, match="ttl"):
        _calls.set_("k", b"v", ttl=ttl, tags=(), lease_token=b"", if_version=None)


def test_max_wait() -> None:
    def sent(max_wait: float | None) -> int:
        call = _calls.lookup("k", lease=True, max_wait=max_wait, allow_stale=False)
        return call.request.max_wait_ms

    assert sent(None) == 0
    assert sent(0.25) == 250
    assert sent(1e12) == 2**32 - 1  # capped: the call's deadline bounds the wait anyway
    with pytest.raises(InvalidArgument, match="max_wait"):
        sent(0)


def test_key_checks() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        _calls.get("")
    with pytest.raises(TypeError, match="str"):
        _calls.get(b"k")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="UTF-8"):
        _calls.get("bad\udcff")
    assert _calls.get("ключ").request.key == "ключ"
    with pytest.raises(TypeError, match="single str"):
        _calls.delete("abc")
    with pytest.raises(InvalidArgument, match="empty"):
        _calls.get_many(["a", ""])


def test_set_argument_checks() -> None:
    def set_(**kwargs: object) -> pb.SetRequest:
        args: dict[str, object] = {"ttl": None, "tags": (), "lease_token": b"", "if_version": None}
        args.update(kwargs)
        value = args.pop("value", b"v")
        return _calls.set_("k", value, **args).request  # type: ignore[arg-type]

    assert set_(value="é").value == "é".encode()
    assert set_(value=bytearray(b"ab")).value == b"ab"
    assert set_(value=memoryview(b"cd")).value == b"cd"
    with pytest.raises(TypeError, match="value"):
        set_(value=5)
    with pytest.raises(InvalidArgument, match="UTF-8"):
        set_(value="\udcff")
    with pytest.raises(TypeError, match="single str"):
        set_(tags="abc")
    with pytest.raises(InvalidArgument, match="tags"):
        set_(tags=["ok", ""])
    with pytest.raises(TypeError, match="lease_token"):
        set_(lease_token="tok")
    with pytest.raises(InvalidArgument, match="if_version"):
        set_(if_version=-1)
    with pytest.raises(TypeError, match="if_version"):
        set_(if_version=True)
    assert set_(if_version=0).HasField("if_version")
    assert set_(if_version=2**64 - 1).if_version == 2**64 - 1
    for bad in (0, 2**53, -1):
        with pytest.raises(InvalidArgument, match="origin_version"):
            set_(origin_version=bad)
    with pytest.raises(TypeError, match="origin_version"):
        set_(origin_version=1.0)
    assert set_(origin_version=2**53 - 1).origin_version == 2**53 - 1
    assert not set_().HasField("origin_version")


def test_deadline() -> None:
    assert _calls.deadline(5.0, _calls.DEFAULT) == 5.0
    assert _calls.deadline(5.0, None) is None
    assert _calls.deadline(None, 1.0) == 1.0


def test_decode_entry() -> None:
    unknown_tier = pb.GetResponse(status=pb.STATUS_LEASED, lease_token=b"t", tier=9)  # type: ignore[arg-type]
    entry = _calls.decode_entry(unknown_tier)
    assert entry == Entry(Status.LEASED, None, Tier.NONE, b"t")


@pytest.mark.parametrize("status", [pb.STATUS_UNSPECIFIED, 42])
def test_unknown_status_is_an_error_not_a_guess(status: int) -> None:
    response = pb.GetResponse(status=status, value=b"v")  # type: ignore[arg-type]
    for decode in (_calls.decode_entry, _calls.get("k").decode):
        with pytest.raises(CacheError, match="status") as caught:
            decode(response)
        assert caught.value.code is grpc.StatusCode.UNKNOWN


def test_unknown_set_outcome_is_an_error() -> None:
    with pytest.raises(CacheError, match="outcome"):
        _calls.decode_set(pb.SetResponse(outcome=pb.SET_OUTCOME_UNSPECIFIED))
    result = _calls.decode_set(pb.SetResponse(outcome=pb.SET_OUTCOME_STORED, ttl_ms=2500))
    assert (result.outcome, result.ttl) == (SetOutcome.STORED, 2.5)


def test_get_many_needs_one_result_per_key() -> None:
    hit = pb.GetResponse(status=pb.STATUS_HIT, value=b"v")
    with pytest.raises(CacheError, match="1 results for 2 keys"):
        _calls.get_many(["a", "b"]).decode(pb.GetManyResponse(results=[hit]))
    with pytest.raises(CacheError, match="2 results for 1 keys"):
        _calls.lookup_many(["a"], allow_stale=False).decode(pb.GetManyResponse(results=[hit, hit]))


def test_error_from_a_bare_rpc_error() -> None:
    error = error_from_rpc(grpc.RpcError())
    assert type(error) is CacheError
    assert error.code is grpc.StatusCode.UNKNOWN
    assert error.details == "unknown"


def test_error_text_and_pickling() -> None:
    specific = cachegw.Unavailable("redis is down")
    assert str(specific) == "redis is down"
    assert specific.code is grpc.StatusCode.UNAVAILABLE
    assert isinstance(cachegw.InvalidArgument("x"), ValueError)
    generic = CacheError("boom", code=grpc.StatusCode.INTERNAL)
    assert str(generic) == "INTERNAL: boom"
    assert repr(generic) == "CacheError('boom', code=StatusCode.INTERNAL)"
    for error in (specific, generic):
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), copy.code, copy.details) == (type(error), error.code, error.details)


def test_sync_and_async_clients_have_the_same_api() -> None:
    def api(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    sync_api, async_api = api(cachegw.Client), api(cachegw.AsyncClient)
    assert sync_api.keys() == async_api.keys()
    assert set(sync_api) >= {"get", "lookup", "get_many", "lookup_many", "set", "delete", "close"}
    for name, signature in sync_api.items():
        method = getattr(cachegw.AsyncClient, name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name
        if name == "get_or_load":  # the async loader may also be a coroutine function
            sync_params = [p.replace(annotation="") for p in signature.parameters.values()]
            async_params = [p.replace(annotation="") for p in async_api[name].parameters.values()]
            assert sync_params == async_params, name
            continue
        assert signature.parameters == async_api[name].parameters, name
    # Auto-batching of concurrent get()s is asyncio's alone (one event loop, its ticks).
    async_init = inspect.signature(cachegw.AsyncClient)
    assert "batch_gets" in async_init.parameters
    assert inspect.signature(cachegw.Client) == async_init.replace(
        parameters=[p for p in async_init.parameters.values() if p.name != "batch_gets"]
    )
