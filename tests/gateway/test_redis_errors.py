"""redis_errors: every failure of a Redis call becomes a documented exception with a kind
and an actionable message; scripts: EVALSHA with reloading after NOSCRIPT, alone and in
pipelines (without a SCRIPT EXISTS round trip).

Error replies are built the way redis-py builds them from the wire (its parser's
`parse_error` on Redis's real reply texts), which covers the kinds no single-node test
topology produces here: CLUSTERDOWN, TRYAGAIN, MOVED, CROSSSLOT, MISCONF, NOREPLICAS
and the authentication errors. READONLY, MASTERDOWN, LOADING, BUSY, OOM and NOSCRIPT
are also produced by real redis-server processes in test_redis_trouble.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.exceptions import (
    ClusterDownError,
    DataError,
    InvalidResponse,
    MasterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import l2, redis_errors, scripts
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.redis_errors import (
    L2ErrorReply,
    L2OutcomeUnknown,
    L2OutOfMemory,
    L2Unavailable,
    classify,
)
from tests.conftest import RunningGateway


def parse(reply: str) -> Exception:
    """The exception redis-py raises for `reply` (an error reply's text, as on the wire)."""
    exc: Exception = BaseParser.parse_error(reply)  # type: ignore[no-untyped-call]
    return exc


# (reply as Redis sends it, kind, marks Redis down, writes refused, words of the advice)
REPLIES = [
    ("READONLY You can't write against a read only replica.", "READONLY", True, True,
     "point --redis-url at the primary"),
    ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
     "MASTERDOWN", True, True, "replica-serve-stale-data"),
    ("LOADING Redis is loading the dataset in memory", "LOADING", True, False,
     "retry in a few seconds"),
    ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN "
     "NOSAVE.", "BUSY", True, False, "SCRIPT KILL"),
    ("OOM command not allowed when used memory > 'maxmemory'.", "OOM", False, False,
     "raise maxmemory"),
    ("NOSCRIPT No matching script. Please use EVAL.", "NOSCRIPT", False, False, "retry"),
    ("CLUSTERDOWN The cluster is down", "CLUSTERDOWN", True, False, "retry later"),
    ("CLUSTERDOWN Hash slot not served", "CLUSTERDOWN", True, False, "retry later"),
    ("TRYAGAIN Multiple keys request during rehashing of slot", "TRYAGAIN", False, False,
     "retry"),
    ("MOVED 3999 127.0.0.1:6381", "MOVED", False, False, "standalone Redis only"),
    ("CROSSSLOT Keys in request don't hash to the same slot", "CROSSSLOT", False, False,
     "standalone Redis only"),
    ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to "
     "persist to disk.", "MISCONF", True, True, "persist"),
    ("NOREPLICAS Not enough good replicas to write.", "NOREPLICAS", True, True,
     "min-replicas-to-write"),
    ("NOAUTH Authentication required.", "NOAUTH", True, False, "redis.password_file"),
    ("WRONGPASS invalid username-password pair or user is disabled.", "WRONGPASS", True,
     False, "$CACHEGW_REDIS_PASSWORD"),
    ("ERR The user executing the script can't run this command or subcommand script: "
     "abc, on @user_script:5.", "NOPERM", False, False, "ACL LOG"),  # (in a script)
    ("NOPERM User default has no permissions to run the 'evalsha' command", "NOPERM",
     False, False, "ACL SETUSER"),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", "WRONGTYPE",
     False, False, "--redis-prefix"),
    ("ERR Error running script (call to f_1234): @user_script:1: oops", "ERR", False,
     False, "retry"),
    ("SOMENEWCODE a reply this gateway has never seen", "OTHER", False, False, "retry"),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "kind", "down", "refused", "advice"), REPLIES)
def test_error_replies_are_classified(
    reply: str, kind: str, down: bool, refused: bool, advice: str
) -> None:
    exc = parse(reply)
    for write in (False, True):  # Redis answered: the write was refused, not maybe applied
        err = classify(exc, write=write)
        assert isinstance(err, L2ErrorReply) and isinstance(err, L2Unavailable)
        assert not isinstance(err, L2OutcomeUnknown)
        assert (err.kind, err.mark_down, err.writes_refused, err.is_reply) == (
            kind,
            down,
            refused,
            True,
        )
        assert isinstance(err, L2OutOfMemory) == (kind == "OOM")
        message = str(err)
        code = reply.split(" ", 1)[0]
        assert message.startswith(f"redis answered {code}: ")
        assert advice in message
        assert reply.split(" ", 1)[1][:20] in message  # what Redis said, quoted


def test_replies_built_without_a_status_code_are_classified_by_class() -> None:
    cases: list[tuple[Exception, str]] = [
        (ReadOnlyError("You can't write against a read only replica."), "READONLY"),
        (MasterDownError("Link with MASTER is down"), "MASTERDOWN"),
        (ClusterDownError("The cluster is down"), "CLUSTERDOWN"),
        (TryAgainError("Multiple keys request during rehashing of slot"), "TRYAGAIN"),
        (NoScriptError("No matching script."), "NOSCRIPT"),
        (redis.ResponseError("BUSY Redis is busy running a script."), "BUSY"),
        (redis.ResponseError("something without a code"), "ERR"),
    ]
    for exc, kind in cases:
        assert classify(exc).kind == kind, exc


def test_a_long_reply_is_cut_in_the_message() -> None:
    err = classify(parse("ERR " + "x" * 5000))
    assert len(str(err)) < 1000 and str(err).endswith("...)")


def test_failures_without_a_reply() -> None:
    read = classify(RedisConnectionError("Connection closed by server."))
    assert type(read) is L2Unavailable
    assert (read.kind, read.mark_down, read.is_reply) == ("connection", True, False)
    assert str(read).startswith("redis (L2) is unavailable, retry later")

    write = classify(RedisConnectionError("Connection closed by server."), write=True)
    assert isinstance(write, L2OutcomeUnknown)
    assert "may or may not have been applied" in str(write)
    assert classify(RedisTimeoutError("Timeout reading from 127.0.0.1:1"), write=True).kind == (
        "timeout"
    )
    assert classify(ConnectionResetError(104, "Connection reset by peer")).kind == "connection"
    assert classify(TimeoutError()).kind == "timeout"
    assert classify(InvalidResponse("Protocol Error: b'x'")).kind == "protocol"
    client = classify(DataError("Invalid input of type: 'dict'"), write=True)
    assert (type(client), client.kind, client.mark_down) == (L2Unavailable, "client", False)


def _raised_from(exc: BaseException, cause: BaseException) -> BaseException:
    """`exc` as redis-py raises it: ``raise exc from cause``."""
    try:
        raise exc from cause
    except BaseException as raised:
        return raised


def test_a_cluster_client_that_reaches_no_node_is_unavailable() -> None:
    """What redis-py's RedisCluster raises when no node gives it the slot map (a gateway
    cut off from every node: tests/cluster/test_cluster_partition.py) is no RedisError;
    it was answered UNKNOWN. Nothing was sent, so a write is not 'outcome unknown'."""
    refused = _raised_from(
        RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least "
            "one reachable node: Error 111 connecting to 127.0.0.1:7000."
        ),
        RedisConnectionError("Error 111 connecting to 127.0.0.1:7000. Connection refused."),
    )
    assert isinstance(refused, redis_errors.FAILURES)
    for write in (False, True):
        err = classify(refused, write=write)
        assert (type(err), err.kind, err.mark_down) == (L2Unavailable, "connection", True)
        assert "could not be reached" in str(err) and "nothing was sent" in str(err)
    silent = _raised_from(RedisClusterException("cannot be connected"), RedisTimeoutError("x"))
    assert classify(silent).kind == "timeout"
    assert classify(SlotNotCoveredError("Slot 42 is not covered by the cluster.")).kind == (
        "connection"
    )
    other = classify(RedisClusterException("No targets were found to execute"), write=True)
    assert (type(other), other.kind, other.mark_down) == (L2Unavailable, "client", False)


def test_only_lost_connections_and_timeouts_are_worth_a_second_read() -> None:
    assert redis_errors.retryable(RedisConnectionError("Connection closed by server."))
    assert redis_errors.retryable(RedisTimeoutError("Timeout reading"))
    assert redis_errors.retryable(ConnectionResetError())
    for answered in ("LOADING Redis is loading", "NOAUTH Authentication required.", "BUSY x"):
        assert not redis_errors.retryable(parse(answered))


def test_error_replies_inside_pipeline_results() -> None:
    readonly = parse("READONLY You can't write against a read only replica.")
    assert redis_errors.first_error([b"v", 12, None]) is None
    assert redis_errors.raise_first([b"v", 12]) == [b"v", 12]
    assert redis_errors.first_error([b"v", readonly, NoScriptError("x")]) is readonly
    with pytest.raises(ReadOnlyError):
        redis_errors.raise_first([b"v", readonly])


def test_l2_keeps_exporting_what_other_modules_import() -> None:
    assert l2.L2Unavailable is redis_errors.L2Unavailable
    assert l2.UNAVAILABLE_ERRORS is redis_errors.UNAVAILABLE_ERRORS


# -- the gateway: no Redis error reaches a caller as UNKNOWN ------------------------------


async def test_an_unexpected_reply_is_unavailable_with_what_redis_said(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    redis_client.hset("cg:{h}", "field", "value")  # not a string: GET answers WRONGTYPE
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gateway.stub.Get(pb.GetRequest(key="h"), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "WRONGTYPE" in (err.value.details() or "")
    stats = await gateway.stub.Stats(pb.StatsRequest())
    assert dict(stats.redis.error_replies) == {"WRONGTYPE": 1}
    assert stats.redis.up  # Redis is fine; one key is not


async def test_a_redis_error_that_bypassed_the_store_is_not_unknown(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> bytes:
        raise redis.ResponseError("BUSY Redis is busy running a script.")

    monkeypatch.setattr(gateway.server.cache, "complete_many", broken)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gateway.stub.GetMany(pb.GetManyRequest(keys=["a"]), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "BUSY" in (err.value.details() or "")


# -- scripts ------------------------------------------------------------------------------

COUNT = "return redis.call('INCR', KEYS[1])"
ECHO = "return ARGV[1]"


@pytest.fixture
async def aclient(redis_server: ManagedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def _calls(client: redis.Redis, command: str) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_script_lost_by_redis_is_loaded_and_run_once(
    aclient: aioredis.Redis, redis_client: redis.Redis
) -> None:
    count = scripts.Script(aclient, COUNT)
    assert count.sha == redis_client.script_load(COUNT)  # the SHA1 Redis computes
    redis_client.script_flush()
    redis_client.config_resetstat()
    assert await count(keys=["n"]) == 1
    assert int(redis_client.get("n") or 0) == 1  # ran exactly once
    assert (_calls(redis_client, "evalsha"), _calls(redis_client, "script|load")) == (2, 1)
    assert await count(keys=["n"]) == 2
    with pytest.raises(TypeError):
        await count(keys=["n"], client=aclient.pipeline())
