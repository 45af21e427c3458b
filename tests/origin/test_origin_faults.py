"""Bad origin answers, a slow, a crashing and a missing origin: every call ends with a
clear status within its deadline, nothing unusable reaches the cache, and the lease is
released so that the next caller tries again. The origin is tests/origin/bad_origin.py,
its own process."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.config import OriginConfig
from cachegw_gateway.managed_redis import free_port
from cachegw_gateway.origin import Limits, OriginBusy, OriginClient
from tests.conftest import GatewayFactory, RunningGateway
from tests.origin.conftest import OriginProcess, start_origin

BAD_ORIGIN = str(Path(__file__).with_name("bad_origin.py"))


@pytest.fixture
def bad_origin(tmp_path: Path) -> Iterator[OriginProcess]:
    origin = start_origin([BAD_ORIGIN], tmp_path, "bad-origin")
    yield origin
    origin.stop(signal.SIGKILL)


def toml(address: str, *, timeout: float = 0.5, failures: int = 5) -> str:
    return f"""
[origin]
timeout_seconds = {timeout}
[origin.breaker]
failures = {failures}
cooldown_seconds = 30

[default_class]
origin = "{address}"
read_policy = "read-through"
write_policy = "through"
max_value_bytes = 1024
negative_ttl_seconds = 30
"""


async def status_of(gw: RunningGateway, key: str, within: float = 5.0) -> tuple[str, str]:
    try:
        got = await gw.stub.Get(pb.GetRequest(key=key), timeout=within)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return pb.Status.Name(got.status).removeprefix("STATUS_"), got.value.decode()


def cached(redis_client: redis.Redis, key: str) -> bool:
    return bool(redis_client.exists(f"cg:{{{key}}}", f"cg:{{{key}}}:lease"))


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("garbage:k", "not a LoadResponse"),
        ("unspecified:k", "neither FOUND nor NOT_FOUND"),
        ("count:k", "0 results for 1 keys"),
        ("wrongkey:k", "is for key 'someone-else'"),
        ("big:k", "over its class's max_value_bytes (1024)"),
        ("ttl:k", "has ttl_ms -5"),
        ("version:k", "not below 2^53"),
        ("tags:k", "a tag of 0 bytes"),
        ("internal:k", "failed with INTERNAL: a bug in the origin"),
    ],
)
async def test_a_bad_load_answer_is_failed_precondition_and_caches_nothing(
    gateway_factory: GatewayFactory,
    bad_origin: OriginProcess,
    redis_client: redis.Redis,
    key: str,
    says: str,
) -> None:
    gw = await gateway_factory(toml(bad_origin.address))
    for attempt in (1, 2):
        code, details = await status_of(gw, key)
        assert code == "FAILED_PRECONDITION", details
        assert says in details and bad_origin.address in details
        assert "nothing was cached" in details
        assert not cached(redis_client, key)  # no value, and the lease was released
        assert bad_origin.loads(key) == attempt  # so the next caller loads at once


async def test_an_unavailable_origin_is_unavailable_and_the_next_caller_tries_again(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(bad_origin.address))
    for attempt in (1, 2):
        code, details = await status_of(gw, "unavailable:k")
        assert (code, "the database is down" in details) == ("UNAVAILABLE", True)
        assert bad_origin.loads("unavailable:k") == attempt
    assert not cached(redis_client, "unavailable:k")


async def test_a_slow_origin_is_deadline_exceeded_at_the_origin_timeout(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(bad_origin.address, timeout=0.3))
    for attempt in (1, 2):
        code, details = await status_of(gw, "slow:k")
        assert code == "DEADLINE_EXCEEDED"
        assert "did not answer within 0.3s" in details  # its own load, not a wait for one
        assert bad_origin.loads("slow:k") == attempt
    assert not cached(redis_client, "slow:k")


async def test_a_get_many_with_one_bad_key_fails_whole_and_caches_none_of_it(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(bad_origin.address))
    keys = ["ok:a", "big:b", "ok:c"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.GetMany(pb.GetManyRequest(keys=keys), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not any(cached(redis_client, k) for k in keys)
    got = await gw.stub.GetMany(pb.GetManyRequest(keys=["ok:a", "ok:c", "gone:d"]), timeout=5)
    assert [(r.status, r.value) for r in got.results] == [
        (pb.STATUS_HIT, b"v:ok:a"),
        (pb.STATUS_HIT, b"v:ok:c"),
        (pb.STATUS_NOT_FOUND, b""),
    ]


async def test_a_crashing_origin_is_unavailable_and_found_again_once_restarted(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess, tmp_path: Path
) -> None:
    gw = await gateway_factory(toml(bad_origin.address))
    assert await status_of(gw, "ok:before") == ("HIT", "v:ok:before")
    code, details = await status_of(gw, "crash:k")
    assert code == "UNAVAILABLE", details
    assert bad_origin.proc.wait(10) == 3
    code, _ = await status_of(gw, "ok:meanwhile")
    assert code == "UNAVAILABLE"  # nobody there
    # The same address again, the way an operator restarts it.
    restarted = start_origin([BAD_ORIGIN], tmp_path, "restarted", bad_origin.address)
    try:
        deadline = time.monotonic() + 10
        while (got := await status_of(gw, "ok:after"))[0] != "HIT":
            assert time.monotonic() < deadline, got  # grpc reconnects within ~1 s
            await asyncio.sleep(0.1)
        assert got == ("HIT", "v:ok:after")
    finally:
        restarted.stop(signal.SIGKILL)


async def test_the_breaker_stops_calling_a_missing_origin(
    gateway_factory: GatewayFactory,
) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    gw = await gateway_factory(toml(nobody, failures=3))
    for i in range(3):
        code, details = await status_of(gw, f"k{i}")
        assert code == "UNAVAILABLE" and "circuit breaker" not in details
    code, details = await status_of(gw, "k3")
    assert code == "UNAVAILABLE"
    assert "circuit breaker for it is open" in details and "nothing was sent" in details
    # A write-through Set is refused the same way, before anything changes.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "nothing changed in the cache" in (err.value.details() or "")


async def test_a_load_goes_on_for_the_waiters_when_its_caller_leaves(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess
) -> None:
    gw = await gateway_factory(toml(bad_origin.address, timeout=2.0))
    code, _ = await status_of(gw, "slowok:k", within=0.2)  # the load takes 0.6 s
    assert code == "DEADLINE_EXCEEDED"
    assert await status_of(gw, "slowok:k") == ("HIT", "v:slowok:k")
    assert bad_origin.loads("slowok:k") == 1  # the second caller got the first one's load


async def test_a_load_that_a_write_overtook_never_hides_the_write(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess
) -> None:
    gw = await gateway_factory(toml(bad_origin.address, timeout=2.0))
    loading = asyncio.ensure_future(gw.stub.Get(pb.GetRequest(key="slowok:raced"), timeout=5))
    deadline = time.monotonic() + 5
    while not bad_origin.loads("slowok:raced"):  # the load is in flight (0.6 s)
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    written = await gw.stub.Set(pb.SetRequest(key="slowok:raced", value=b"written"))
    assert written.outcome == pb.SET_OUTCOME_STORED
    loaded = await loading
    assert loaded.value == b"v:slowok:raced"  # its answer: the origin's state when it read
    got = await gw.stub.Get(pb.GetRequest(key="slowok:raced"))
    assert (got.value, got.version) == (b"written", written.version)


async def test_write_through_failures_leave_the_cache_as_it_was_or_drop_the_key(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(bad_origin.address, timeout=0.5))
    key = "ok:w"
    assert await status_of(gw, key) == ("HIT", f"v:{key}")
    for value, code, says in [
        (b"unavailable", grpc.StatusCode.UNAVAILABLE, "the database is down"),
        (b"refuse", grpc.StatusCode.INVALID_ARGUMENT, "refused the value of 'ok:w': not allowed"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.stub.Set(pb.SetRequest(key=key, value=value), timeout=5)
        assert err.value.code() == code and says in (err.value.details() or "")
        assert await status_of(gw, key) == ("HIT", f"v:{key}")  # unchanged
    conflict = await gw.stub.Set(pb.SetRequest(key=key, value=b"conflict", if_version=7))
    assert (conflict.outcome, conflict.version) == (pb.SET_OUTCOME_VERSION_CONFLICT, 3)
    assert await status_of(gw, key) == ("HIT", f"v:{key}")
    assert bad_origin.loads(key) == 1
    # Sent, and no usable answer: the origin may have stored it, so the entry goes.
    for value, code in [
        (b"slow", grpc.StatusCode.DEADLINE_EXCEEDED),
        (b"garbage", grpc.StatusCode.FAILED_PRECONDITION),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.stub.Set(pb.SetRequest(key=key, value=value), timeout=5)
        assert err.value.code() == code
        assert "the cached entry was dropped" in (err.value.details() or "")
        assert not redis_client.exists(f"cg:{{{key}}}")
        assert await status_of(gw, key) == ("HIT", f"v:{key}")  # loaded again
    assert bad_origin.loads(key) == 3


async def test_the_concurrency_limit_refuses_a_call_that_finds_no_slot_in_time(
    bad_origin: OriginProcess,
) -> None:
    client = OriginClient(bad_origin.address, OriginConfig(timeout_seconds=2.0, max_in_flight=1))
    limits = Limits([1024], 60_000, 512)
    try:
        holder = asyncio.ensure_future(client.load(["slow:a"], limits, None))
        deadline = time.monotonic() + 5
        while not bad_origin.loads("slow:a"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        with pytest.raises(OriginBusy) as err:
            await client.load(["ok:b"], limits, time.monotonic() + 0.3)
        assert "origin.max_in_flight" in str(err.value)
        assert bad_origin.loads("ok:b") == 0  # nothing was sent
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        loaded = await client.load(["ok:c"], limits, None)  # the slot came back
        assert loaded[0].value == b"v:ok:c"
    finally:
        await client.close()


async def test_a_get_many_waits_for_keys_another_gateway_is_loading(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess
) -> None:
    a = await gateway_factory(toml(bad_origin.address, timeout=2.0))
    b = await gateway_factory(toml(bad_origin.address, timeout=2.0))
    first = asyncio.ensure_future(a.stub.Get(pb.GetRequest(key="slowok:shared"), timeout=5))
    deadline = time.monotonic() + 5
    while not bad_origin.loads("slowok:shared"):  # a holds the lease and loads (0.6 s)
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    got = await b.stub.GetMany(pb.GetManyRequest(keys=["slowok:shared", "ok:own"]), timeout=5)
    assert [r.value for r in got.results] == [b"v:slowok:shared", b"v:ok:own"]
    assert (await first).value == b"v:slowok:shared"
    assert bad_origin.loads("slowok:shared") == 1  # b waited for a's load
    assert bad_origin.loads("ok:own") == 1


async def test_a_get_many_whose_caller_leaves_still_fills_what_it_loads(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess
) -> None:
    gw = await gateway_factory(toml(bad_origin.address, timeout=2.0))
    keys = ["slowok:m1", "slowok:m2"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.GetMany(pb.GetManyRequest(keys=keys), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    got = await gw.stub.GetMany(pb.GetManyRequest(keys=keys), timeout=5)
    assert [r.value for r in got.results] == [b"v:slowok:m1", b"v:slowok:m2"]
    assert bad_origin.loads() == 1  # one Load of both, finished for the second caller
