"""Write-behind against the example origin over PostgreSQL (and the misbehaving origin):
a Set is acknowledged once journaled and cached; the flusher stores it later, in batches,
collapsed by key, retried while the origin is down, claimed from a dead gateway,
dead-lettered when the origin refuses it."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis
from redis.exceptions import TimeoutError as RedisTimeout
from rich.console import Console

from cachegw import top
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import origin_pb2 as opb
from cachegw_gateway.config import RedisConfig
from cachegw_gateway.journal import GROUP, STORE, Journal
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from cachegw_gateway.writes import SetItem
from tests.client.test_top import _poll
from tests.conftest import GatewayFactory, RunningGateway
from tests.origin.conftest import TABLE, OriginProcess, start_origin
from tests.origin.test_origin_faults import BAD_ORIGIN

SHARDS = 2


def wb_toml(address: str, *, claim_idle: float = 5.0, max_attempts: int = 3) -> str:
    return f"""
[origin]
timeout_seconds = 1.0

[write_behind]
shards = {SHARDS}
flush_interval_seconds = 0.02
claim_idle_seconds = {claim_idle}
retry_initial_seconds = 0.05
retry_max_seconds = 0.4
max_attempts = {max_attempts}

[[classes]]
name = "items"
patterns = ["wb:*"]
ttl_seconds = 60
jitter = 0
origin = "{address}"
read_policy = "read-through"
write_policy = "behind"
"""


async def until(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Bounded: until `await check()` holds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {within}s")
        await asyncio.sleep(0.05)


async def written(db: asyncpg.Connection, key: str) -> tuple[bytes, int] | None:
    got = await db.fetchrow(f"SELECT value, write_version FROM {TABLE} WHERE key = $1", key)
    return None if got is None else (bytes(got["value"]), got["write_version"])


async def figures(gw: RunningGateway) -> pb.ClassStats:
    reply = await gw.stub.Stats(pb.StatsRequest(classes=["items"]))
    stats: pb.ClassStats = reply.classes[0]
    return stats


def journal_left(redis_client: redis.Redis) -> int:
    return sum(int(redis_client.xlen(f"cg:{{wb:items:{n}}}:journal")) for n in range(SHARDS))


async def test_a_set_is_cached_at_once_and_reaches_the_origin_later(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
) -> None:
    gw = await gateway_factory(wb_toml(pg_origin.address), server__gateway_id="a")
    first = await gw.stub.Set(pb.SetRequest(key="wb:one", value=b"one", tags=["t"]))
    assert first.outcome == pb.SET_OUTCOME_STORED
    got = await gw.stub.Get(pb.GetRequest(key="wb:one"))
    assert (got.status, got.value, got.version) == (pb.STATUS_HIT, b"one", first.version)
    await until(lambda: _is(db, "wb:one", (b"one", first.version)))
    second = await gw.stub.Set(pb.SetRequest(key="wb:one", value=b"two"))
    assert second.version > first.version
    await until(lambda: _is(db, "wb:one", (b"two", second.version)))
    await until(lambda: _flushed(gw, 2))
    stats = await figures(gw)
    assert stats.wb_journaled == 2 and stats.wb_dead_lettered == 0
    assert journal_left(redis_client) == 0  # settled entries are deleted
    assert pg_origin.loads("wb:one") == 0  # written behind: never loaded


async def _is(db: asyncpg.Connection, key: str, want: tuple[bytes, int] | None) -> bool:
    return await written(db, key) == want


async def _flushed(gw: RunningGateway, n: int) -> bool:
    return (await figures(gw)).wb_flushed >= n


async def test_a_delete_journals_a_remove_and_answers_not_found_at_once(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    gw = await gateway_factory(wb_toml(pg_origin.address), server__gateway_id="a")
    stored = await gw.stub.Set(pb.SetRequest(key="wb:gone", value=b"here"))
    await until(lambda: _is(db, "wb:gone", (b"here", stored.version)))
    deleted = await gw.stub.Delete(pb.DeleteRequest(keys=["wb:gone"]))
    assert deleted.deleted == 1
    got = await gw.stub.Get(pb.GetRequest(key="wb:gone"))
    assert got.status == pb.STATUS_NOT_FOUND  # a tombstone: no load of the old row
    await until(lambda: _is(db, "wb:gone", None))
    removed = await db.fetchval(f"SELECT write_version FROM {TABLE}_removed WHERE key = 'wb:gone'")
    assert removed > stored.version
    # A write after the removal creates the key again.
    again = await gw.stub.Set(pb.SetRequest(key="wb:gone", value=b"back"))
    assert again.version > removed
    await until(lambda: _is(db, "wb:gone", (b"back", again.version)))
    assert pg_origin.loads("wb:gone") == 0


async def _journal(redis_server: ManagedRedis) -> tuple[RedisStore, Journal]:
    store = RedisStore.from_config(RedisConfig(), redis_server.url)
    return store, Journal(store, SHARDS, 1000)


async def test_repeated_writes_of_a_key_are_collapsed_into_one_store(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_server: ManagedRedis,
) -> None:
    store, journal = await _journal(redis_server)
    try:  # journaled before any flusher runs: one batch holds all 50
        versions = [
            await journal.append("items", STORE, opb.StoreEntry(key="wb:hot", value=b"%d" % i))
            for i in range(50)
        ]
    finally:
        await store.close()
    assert versions == sorted(versions) and len(set(versions)) == 50
    gw = await gateway_factory(wb_toml(pg_origin.address), server__gateway_id="a")
    await until(lambda: _is(db, "wb:hot", (b"49", versions[-1])))
    await until(lambda: _flushed(gw, 50))
    stats = await figures(gw)
    assert stats.wb_collapsed == 49 and stats.wb_origin_calls == 1
    assert len(pg_origin.calls("Store", "wb:hot")) == 1


async def test_writes_wait_for_an_origin_that_is_down_and_land_when_it_is_back(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    gw = await gateway_factory(
        wb_toml(address), server__gateway_id="a", telemetry__metrics_listen="127.0.0.1:0"
    )
    acked = [
        await gw.stub.Set(pb.SetRequest(key=f"wb:down:{i}", value=b"v%d" % i)) for i in range(5)
    ]
    assert {a.outcome for a in acked} == {pb.SET_OUTCOME_STORED}

    async def retried() -> bool:
        s = await figures(gw)
        return s.wb_retries >= 3 and s.wb_backlog == 5 and s.wb_lag_ms > 0

    await until(retried)
    address_port = gw.server.metrics_address
    assert address_port is not None
    text = await asyncio.to_thread(_metrics, address_port)
    assert 'cachegw_wb_backlog{class="items"} 5.0' in text
    assert "# TYPE cachegw_wb_lag_ms gauge" in text
    view = top.TopView([gw.address])
    view.update(await asyncio.to_thread(_poll, [gw.address]))
    console = Console(record=True, width=250, color_system=None)
    console.print(view.render())
    shown = console.export_text()
    assert "write-behind" in shown
    row = [ln for ln in shown.splitlines() if " items " in ln][-1]  # its table is the last
    cells = [cell.strip() for cell in row.split("│")]
    assert (cells[-4], cells[-2]) == ("5", "0")  # backlog, dead letters
    args = ["-m", "cachegw.origin.postgres", "--dsn", _dsn(pg_origin), "--table", TABLE]
    late = start_origin(args, tmp_path, "late-origin", address)
    try:
        for i, a in enumerate(acked):
            want = (b"v%d" % i, a.version)
            await until(partial(_is, db, f"wb:down:{i}", want))
        await until(lambda: _backlog(gw, 0))
        assert journal_left(redis_client) == 0
    finally:
        late.stop()


def _dsn(origin: OriginProcess) -> str:
    args = origin.proc.args
    assert isinstance(args, list)
    return str(args[args.index("--dsn") + 1])


def _metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
    return text


async def _backlog(gw: RunningGateway, n: int) -> bool:
    return (await figures(gw)).wb_backlog == n


async def test_the_pending_entries_of_a_dead_gateway_are_claimed(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_server: ManagedRedis,
    redis_client: redis.Redis,
) -> None:
    store, journal = await _journal(redis_server)
    try:
        versions = {
            f"wb:orphan:{i}": await journal.append(
                "items", STORE, opb.StoreEntry(key=f"wb:orphan:{i}", value=b"o")
            )
            for i in range(20)
        }
    finally:
        await store.close()
    # A gateway "dead" read them all, then died before settling any.
    for n in range(SHARDS):
        redis_client.xreadgroup(GROUP, "dead", {f"cg:{{wb:items:{n}}}:journal": ">"}, count=100)
    pending = sum(
        redis_client.xpending(f"cg:{{wb:items:{n}}}:journal", GROUP)["pending"]
        for n in range(SHARDS)
    )
    assert pending == 20
    gw = await gateway_factory(
        wb_toml(pg_origin.address, claim_idle=0.5), server__gateway_id="alive"
    )
    for key, version in versions.items():
        await until(partial(_is, db, key, (b"o", version)))
    stats = await figures(gw)
    assert stats.wb_claimed >= 20
    await until(lambda: _backlog(gw, 0))
    assert journal_left(redis_client) == 0


async def test_consumers_gone_for_good_are_forgotten_but_not_with_entries(
    redis_server: ManagedRedis, redis_client: redis.Redis
) -> None:
    store, journal = await _journal(redis_server)
    try:
        await journal.append("items", STORE, opb.StoreEntry(key="wb:held", value=b"v"))
        target = journal.shard_of("items", "wb:held")
        await journal.read(target, "holder", 10, own=False)  # "holder" gets the entry
        for name in ("empty", "me"):
            redis_client.xgroup_createconsumer(target.journal, GROUP, name)
        assert await journal.forget_consumers(target, "me", -1) == 1
        names = {c["name"] for c in redis_client.xinfo_consumers(target.journal, GROUP)}
        assert b"holder" in names and b"empty" not in names
        assert await journal.forget_consumers(target, "me", 3_600_000) == 0
    finally:
        await store.close()


@pytest.fixture
def bad_origin(tmp_path: Path) -> Iterator[OriginProcess]:
    origin = start_origin([BAD_ORIGIN], tmp_path, "bad-origin")
    yield origin
    origin.stop(signal.SIGKILL)


async def test_an_entry_the_origin_refuses_is_dead_lettered_not_retried(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(wb_toml(bad_origin.address), server__gateway_id="a")
    for key, value in (("wb:poison", b"refuse"), ("wb:fine", b"ok")):
        out = await gw.stub.Set(pb.SetRequest(key=key, value=value))
        assert out.outcome == pb.SET_OUTCOME_STORED  # acknowledged: the journal has it

    async def settled() -> bool:
        s = await figures(gw)
        return s.wb_dead_lettered == 1 and s.wb_flushed == 1 and s.wb_backlog == 0

    await until(settled)
    dead = _dead_letters(redis_client)
    assert [(d[b"id"] != b"", b"not allowed" in d[b"why"]) for d in dead] == [(True, True)]
    assert opb.StoreEntry.FromString(dead[0][b"e"]).key == "wb:poison"
    assert len(bad_origin.calls("Store", "wb:poison")) == 1  # not retried
    assert (await figures(gw)).wb_retries == 0


def _b(raw: object) -> bytes:
    return raw if isinstance(raw, bytes) else str(raw).encode()


def _dead_letters(redis_client: redis.Redis) -> list[dict[bytes, bytes]]:
    out: list[dict[bytes, bytes]] = []
    for n in range(SHARDS):
        for _, fields in redis_client.xrange(f"cg:{{wb:items:{n}}}:dead"):  # type: ignore[union-attr]
            out.append({_b(k): _b(v) for k, v in (fields or {}).items()})
    return out


async def test_unusable_answers_dead_letter_the_batch_after_max_attempts(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(wb_toml(bad_origin.address, max_attempts=3), server__gateway_id="a")
    await gw.stub.Set(pb.SetRequest(key="wb:garbage", value=b"garbage"))

    async def dead() -> bool:
        return (await figures(gw)).wb_dead_lettered == 1

    await until(dead)
    assert len(bad_origin.calls("Store", "wb:garbage")) == 3
    (letter,) = _dead_letters(redis_client)
    assert b"after 3 unusable answers" in letter[b"why"]
    assert journal_left(redis_client) == 0


async def test_conditional_writes_are_refused_with_a_clear_status(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(wb_toml(pg_origin.address), server__gateway_id="a")
    for request in (
        pb.SetRequest(key="wb:c", value=b"x", if_version=0),
        pb.SetRequest(key="wb:c", value=b"x", condition=pb.SET_CONDITION_IF_ABSENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.stub.Set(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "write-behind" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.SetMany(pb.SetManyRequest(entries=[pb.SetRequest(key="wb:c", value=b"x")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert journal_left(redis_client) == 0  # nothing half-applied


def _version_of(result: object) -> int:
    """The write version a journal call returned (`append`, or `append_and_set`)."""
    if isinstance(result, tuple):
        return int(result[1])
    assert isinstance(result, int)
    return result


@pytest.mark.parametrize("one_step", [True, False], ids=["one-step", "two-steps"])
async def test_a_caller_leaving_mid_write_leaves_journal_and_cache_written(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    one_step: bool,
) -> None:
    """One Redis journals and caches in one script (`one-step`); a Cluster in two calls,
    journal first (`two-steps`, forced here on one Redis: the same code). A caller that
    leaves right after the journal took the write, or whose deadline passes while Redis
    is slow, leaves both written."""
    gw = await gateway_factory(wb_toml(pg_origin.address), server__gateway_id="a")
    server = gw.server
    journal = server.journal
    journal.one_step = one_step
    name = "append_and_set" if one_step else "append"
    real = getattr(journal, name)
    caller: asyncio.Task[object] | None = None
    journaled: list[int] = []

    async def journal_then_leave(*args: object) -> object:
        result = await real(*args)
        journaled.append(_version_of(result))
        assert caller is not None
        caller.cancel()  # the caller leaves right after the journal took the write
        await asyncio.sleep(0)
        return result

    monkeypatch.setattr(journal, name, journal_then_leave)
    kc = server.policy.classify("wb:left")
    caller = asyncio.create_task(server.cache.set(SetItem("wb:left", b"left", kc)))
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert len(journaled) == 1

    async def cached() -> bool:
        got = await gw.stub.Get(pb.GetRequest(key="wb:left"))
        return (got.status, got.value, got.version) == (pb.STATUS_HIT, b"left", journaled[0])

    await until(cached, within=5)
    await until(lambda: _is(db, "wb:left", (b"left", journaled[0])))

    # A deadline that passes while the journal is slow: DEADLINE_EXCEEDED, and both land.
    async def slow(*args: object) -> object:
        await asyncio.sleep(0.3)
        result = await real(*args)
        journaled.append(_version_of(result))
        return result

    monkeypatch.setattr(journal, name, slow)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Set(pb.SetRequest(key="wb:late", value=b"late"), timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(
        lambda: _is(db, "wb:late", (b"late", journaled[-1])) if len(journaled) == 2 else _false()
    )
    got = await gw.stub.Get(pb.GetRequest(key="wb:late"))
    assert (got.value, got.version) == (b"late", journaled[-1])


@pytest.mark.parametrize("one_step", [True, False], ids=["one-step", "two-steps"])
async def test_a_journal_reply_lost_after_redis_applied_it(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    one_step: bool,
) -> None:
    """Redis ran the journal script and its reply never came (a timeout): the caller gets
    UNAVAILABLE saying it may have been applied; what Redis applied reaches the origin
    (one step: the value is cached too; two steps: the cache was not touched)."""
    gw = await gateway_factory(wb_toml(pg_origin.address), server__gateway_id="a")
    journal = gw.server.journal
    journal.one_step = one_step
    name = "_append_and_set" if one_step else "_append"
    script = getattr(journal, name)

    async def applied_then_lost(keys: object, args: object, client: object = None) -> object:
        await script(keys=keys, args=args)
        raise RedisTimeout("Timeout reading from socket")

    monkeypatch.setattr(journal, name, applied_then_lost)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Set(pb.SetRequest(key="wb:lost", value=b"lost"))
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "reply was lost" in details
    assert ("journaled and cached" in details) == one_step
    monkeypatch.undo()
    await until(lambda: _has(db, "wb:lost", b"lost"))
    if one_step:
        got = await gw.stub.Get(pb.GetRequest(key="wb:lost"))
        assert (got.status, got.value) == (pb.STATUS_HIT, b"lost")


async def _has(db: asyncpg.Connection, key: str, value: bytes) -> bool:
    got = await written(db, key)
    return got is not None and got[0] == value


async def _false() -> bool:
    return False


def test_write_behind_config_is_checked(tmp_path: Path) -> None:
    from cachegw_gateway.config import ConfigError, config_warnings
    from tests.conftest import make_config

    bad = [
        ('write_policy = "behind"', "origin is required"),
        ('write_policy = "behind"\norigin = "127.0.0.1:7000"', "needs read_policy"),
    ]
    for extra, says in bad:
        toml = f'[[classes]]\nname = "x"\npatterns = ["x:*"]\n{extra}\n'
        with pytest.raises(ConfigError, match=says):
            make_config(tmp_path, "redis://127.0.0.1:1", toml)
    with pytest.raises(ConfigError, match=r"write_behind\.shards must be in"):
        make_config(tmp_path, "redis://127.0.0.1:1", "[write_behind]\nshards = 0\n")
    toml = (
        "[write_behind]\nclaim_idle_seconds = 1\nretry_max_seconds = 10\n"
        '[[classes]]\nname = "x"\npatterns = ["x:*"]\norigin = "127.0.0.1:7000"\n'
        'read_policy = "read-through"\nwrite_policy = "behind"\n'
    )
    warned = config_warnings(make_config(tmp_path, "redis://127.0.0.1:1", toml))
    assert any("claim_idle_seconds (1) is not above twice" in w for w in warned)
    assert any("retry_max_seconds (10) is not below half" in w for w in warned)
    with pytest.raises(ConfigError, match="retry_max_seconds must be >="):
        make_config(
            tmp_path,
            "redis://127.0.0.1:1",
            "[write_behind]\nretry_initial_seconds = 2\nretry_max_seconds = 1\n",
        )
