"""The relay's `Link` in process, against two real redis-servers: what each kind of event
does in the destination, what a fault at each write leaves behind, and when the source
stream counts as having lost events (tests/test_regions.py runs the real processes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import events
from cachegw_gateway.config import RedisConfig
from cachegw_gateway.l2 import L2Unavailable, RedisStore
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.relay import Link, Region, drop_cached_values
from cachegw_gateway.relay_main import UsageError, main, parse_regions
from tests.conftest import eventually
from tests.faults import ReplyDropper


@dataclass
class Pair:
    src: RedisStore
    dst: RedisStore
    src_r: redis.Redis
    dst_r: redis.Redis
    src_server: ManagedRedis
    dst_url: str

    def link(self, block_ms: int = 1000) -> Link:
        a, b = Region("a", self.src_server.url), Region("b", self.dst_url)
        return Link(a, self.src, b, self.dst, block_ms=block_ms)

    async def emit(self, **kw: list[str]) -> str:
        """An event published in the source the way a gateway does."""
        payload = events.make(origin="gw-a", **kw).SerializeToString()
        return await self.src.publish(payload, 1000)

    def dst_events(self) -> list[pb.InvalidationEvent]:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.dst_r.xrange("cg:events")  # type: ignore[assignment]
        return [pb.InvalidationEvent.FromString(fields[b"e"]) for _, fields in entries]

    def cache(self, *keys: str) -> None:
        for key in keys:
            self.dst_r.set(f"cg:{{{key}}}", b"v")

    def cached(self, key: str) -> bool:
        return self.dst_r.exists(f"cg:{{{key}}}") == 1


def store(url: str) -> RedisStore:
    return RedisStore.from_config(RedisConfig(prefix="cg", socket_timeout=5.0), url)


@pytest.fixture
def servers() -> Iterator[tuple[ManagedRedis, ManagedRedis]]:
    with ManagedRedis() as a, ManagedRedis() as b:
        yield a, b


async def make_pair(a: ManagedRedis, dst_url: str, b: ManagedRedis) -> Pair:
    return Pair(
        store(a.url),
        store(dst_url),
        redis.Redis.from_url(a.url),
        redis.Redis.from_url(b.url),
        a,
        dst_url,
    )


@pytest.fixture
async def pair(servers: tuple[ManagedRedis, ManagedRedis]) -> AsyncIterator[Pair]:
    a, b = servers
    p = await make_pair(a, b.url, b)
    yield p
    await close(p)


async def close(p: Pair) -> None:
    await p.src.close()
    await p.dst.close()
    p.src_r.close()
    p.dst_r.close()


async def test_each_kind_of_event_is_applied_in_the_destination(pair: Pair) -> None:
    link = pair.link()
    await link.load_checkpoint()
    pair.cache("k1", "k2", "p:1", "p:2", "q:1", "t:1", "mixed", "m:1")
    pair.dst_r.zadd("cg:tag:T", {"t:1": 2**50})
    ids = [
        await pair.emit(keys=["k1", "k2"]),
        await pair.emit(prefixes=["p:"]),
        await pair.emit(tags=["T"]),
        await pair.emit(classes=["prod"]),
        await pair.emit(keys=["mixed"], prefixes=["m:"]),
    ]
    assert await link.catch_up() == 5
    assert not any(pair.cached(k) for k in ("k1", "k2", "p:1", "p:2", "t:1", "mixed", "m:1"))
    assert pair.cached("q:1")
    assert pair.dst_r.get("cg:gen:prod") == b"1"
    # One copy each (a batch's copies are applied concurrently: in any order).
    by_id = {c.relayed_id: c for c in pair.dst_events()}
    copies = [by_id[eid] for eid in ids]
    assert len(by_id) == len(pair.dst_events()) == 5
    assert [list(c.keys) for c in copies] == [["k1", "k2"], [], [], [], ["mixed"]]
    assert [c.relayed_from for c in copies] == ["a"] * 5
    assert copies[1].prefixes == ["p:"] and copies[2].tags == ["T"]
    assert copies[3].classes == ["prod"] and copies[4].prefixes == ["m:"]
    assert link.stats.applied == 5 and link.stats.behind == 0


async def test_relayed_copies_are_never_carried_on(pair: Pair) -> None:
    link = pair.link()
    await link.load_checkpoint()
    copy = events.make(origin="relay:b", keys=["k"])
    copy.relayed_from = "b"
    await pair.src.publish(copy.SerializeToString(), 1000)
    pair.cache("k")
    assert await link.catch_up() == 1
    assert pair.cached("k") and pair.dst_events() == []
    assert link.stats.skipped == 1


async def test_a_fault_at_the_apply_applies_it_again(
    servers: tuple[ManagedRedis, ManagedRedis],
) -> None:
    a, b = servers
    async with ReplyDropper(b.host, b.port) as proxy:
        p = await make_pair(a, proxy.url, b)
        try:
            link = p.link()
            await link.load_checkpoint()
            before = link.cursor
            p.cache("victim")
            eid = await p.emit(keys=["victim"])
            proxy.drop_reply_to(b"victim")  # the delete script ran, its reply is lost
            with pytest.raises(L2Unavailable):
                await link.step(block=False)
            assert link.cursor == before  # not checkpointed: applied again next round
            assert await link.catch_up() == 1
            assert not p.cached("victim")
            assert [c.relayed_id for c in p.dst_events()] == [eid, eid]  # twice, harmless
            assert p.dst_r.get("cg:relay:a") == f"{eid} 1".encode()
        finally:
            await close(p)


async def test_a_fault_at_the_checkpoint_applies_the_batch_again(
    servers: tuple[ManagedRedis, ManagedRedis],
) -> None:
    a, b = servers
    async with ReplyDropper(b.host, b.port) as proxy:
        p = await make_pair(a, proxy.url, b)
        try:
            link = p.link()
            await link.load_checkpoint()
            saved = p.dst_r.get("cg:relay:a")
            eid = await p.emit(keys=["x"])
            proxy.drop_reply_to(b"cg:relay:a")  # the SET ran or not: unknown to the link
            with pytest.raises(L2Unavailable):
                await link.step(block=False)
            # A new process starts from whatever Redis holds: never past an applied-but-
            # unrecorded event, at worst applying it once more.
            p.dst_r.set("cg:relay:a", saved or b"")
            again = p.link()
            assert await again.catch_up() == 1
            assert [c.relayed_id for c in p.dst_events()] == [eid, eid]
            assert again.stats.fallbacks == 0
        finally:
            await close(p)


async def test_a_fault_after_a_prefix_was_applied_publishes_it_on_the_next_round(
    servers: tuple[ManagedRedis, ManagedRedis],
) -> None:
    a, b = servers
    async with ReplyDropper(b.host, b.port) as proxy:
        p = await make_pair(a, proxy.url, b)
        try:
            link = p.link()
            await link.load_checkpoint()
            p.cache("pv:1", "pv:2")
            eid = await p.emit(prefixes=["pv:"])
            proxy.drop_reply_to(eid.encode())  # only the copy names it: its publication
            with pytest.raises(L2Unavailable):
                await link.step(block=False)
            assert not p.cached("pv:1")  # the SCAN and UNLINK ran before the fault
            assert await link.catch_up() == 1
            assert [c.relayed_id for c in p.dst_events()] == [eid, eid]
        finally:
            await close(p)


async def test_a_fault_inside_the_fallback_takes_it_again(
    servers: tuple[ManagedRedis, ManagedRedis],
) -> None:
    a, b = servers
    async with ReplyDropper(b.host, b.port) as proxy:
        p = await make_pair(a, proxy.url, b)
        try:
            link = p.link()
            await link.load_checkpoint()
            for i in range(3):
                await p.emit(keys=[f"k{i}"])
            p.src_r.xtrim("cg:events", maxlen=1, approximate=False)
            p.cache("unnamed")
            proxy.drop_reply_to(b"relay:a")  # the RESET's publication (its origin)
            with pytest.raises(L2Unavailable):
                await link.step(block=False)
            assert not p.cached("unnamed")  # flushed, RESET sent, not checkpointed
            p.cache("again")
            await link.catch_up()
            assert link.stats.fallbacks == 1 and not p.cached("again")
            kinds = [c.kind for c in p.dst_events()]
            assert kinds == [pb.EVENT_KIND_RESET] * 2
            last = p.src_r.xinfo_stream("cg:events")["last-generated-id"]
            assert p.dst_r.get("cg:relay:a") == last + b" 3"
            assert await link.catch_up() == 0 and link.stats.fallbacks == 1
        finally:
            await close(p)


async def test_the_loop_outlives_a_destination_outage(
    pair: Pair, servers: tuple[ManagedRedis, ManagedRedis]
) -> None:
    link = pair.link(block_ms=100)
    stopping = asyncio.Event()
    task = asyncio.create_task(link.run(stopping, max_backoff=0.2))
    try:
        await eventually(lambda: link.stats.up and link.cursor is not None)
        servers[1].stop()
        await pair.emit(keys=["during"])
        await eventually(lambda: link.stats.errors > 0 and not link.stats.up)
        servers[1].start()  # same port, empty
        pair.cache("after")
        await pair.emit(keys=["after"])
        # `up` is set once the batch is checkpointed, a moment after the apply itself.
        await eventually(lambda: not pair.cached("after") and link.stats.up, within=15)
        assert not task.done()
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)


async def test_a_restart_resumes_from_the_checkpoint(pair: Pair) -> None:
    first = pair.link()
    await first.load_checkpoint()
    await pair.emit(keys=["one"])
    assert await first.catch_up() == 1
    second_id = await pair.emit(keys=["two"])
    pair.cache("two")
    later = pair.link()  # a new process: the checkpoint says where the first stopped
    assert await later.catch_up() == 1
    assert not pair.cached("two")
    assert [c.relayed_id for c in pair.dst_events()][-1] == second_id


async def test_trimming_that_keeps_every_event_after_the_checkpoint_is_no_loss(
    pair: Pair,
) -> None:
    link = pair.link()
    await link.load_checkpoint()
    for i in range(5):
        await pair.emit(keys=[f"old{i}"])
    assert await link.catch_up() == 5
    for i in range(3):
        await pair.emit(keys=[f"new{i}"])
    # The checkpoint's own entry is trimmed, every later one kept: nothing was lost.
    pair.src_r.xtrim("cg:events", maxlen=3, approximate=False)
    pair.cache("unnamed", "new0")
    assert await link.catch_up() == 3
    assert link.stats.fallbacks == 0
    assert pair.cached("unnamed") and not pair.cached("new0")
    # One more trimmed away before it was read: that is a loss.
    await pair.emit(keys=["a"])
    await pair.emit(keys=["b"])
    pair.src_r.xtrim("cg:events", maxlen=1, approximate=False)
    assert await link.catch_up() == 1
    assert link.stats.fallbacks == 1
    assert not pair.cached("unnamed")


async def test_a_source_stream_made_again_is_a_loss(
    pair: Pair, servers: tuple[ManagedRedis, ManagedRedis]
) -> None:
    link = pair.link()
    await link.load_checkpoint()
    for i in range(3):
        await pair.emit(keys=[f"k{i}"])
    assert await link.catch_up() == 3
    servers[0].restart()  # no persistence: the stream is gone
    pair.cache("unnamed")
    assert await settle(link) == 0  # no stream now, but there was one: a loss
    assert link.stats.fallbacks == 1 and not pair.cached("unnamed")
    # Carries on with the new stream from its start.
    pair.cache("later")
    await pair.emit(keys=["later"])
    assert await settle(link) == 1
    assert link.stats.fallbacks == 1 and not pair.cached("later")


async def settle(link: Link, attempts: int = 3) -> int:
    """`catch_up`, past the connections a Redis restart broke (the relay's loop retries
    the same way)."""
    for _ in range(attempts - 1):
        try:
            return await link.catch_up()
        except L2Unavailable:
            continue
    return await link.catch_up()


async def test_writes_lost_by_a_failover_are_a_loss(pair: Pair) -> None:
    link = pair.link()
    await link.load_checkpoint()
    ids = [await pair.emit(keys=[f"k{i}"]) for i in range(3)]
    assert await link.catch_up() == 3
    # The new primary never got the last event the relay had read, then took writes.
    entries: list[tuple[bytes, dict[bytes, bytes]]] = pair.src_r.xrange("cg:events")  # type: ignore[assignment]
    pair.src_r.delete("cg:events")
    for eid, fields in entries[:2]:
        pair.src_r.xadd("cg:events", fields, id=eid)  # type: ignore[arg-type]
    pair.src_r.xadd("cg:events", {"e": events.make(origin="gw", keys=["n"]).SerializeToString()})
    pair.cache("unnamed")
    await link.catch_up()
    assert link.stats.fallbacks == 1 and not pair.cached("unnamed")
    kept: list[tuple[bytes, object]] = pair.src_r.xrange("cg:events")  # type: ignore[assignment]
    assert ids[2].encode() not in [e for e, _ in kept]


async def test_a_destination_that_lost_writes_gets_them_again(pair: Pair) -> None:
    """A failover in the destination to a replica the last writes had not reached: the
    copy and the checkpoint written after it are gone together (tests/sentinel/
    test_sentinel_relay.py does it for real). A quiet round finds the older checkpoint
    and applies again what followed it."""
    link = pair.link()
    await link.load_checkpoint()
    before = pair.dst_r.get("cg:relay:a")
    assert before is not None
    pair.cache("lost")
    eid = await pair.emit(keys=["lost"])
    assert await link.catch_up() == 1
    assert not pair.cached("lost")
    pair.cache("lost")  # what the new primary holds: the value, the older checkpoint
    pair.dst_r.set("cg:relay:a", before)
    assert await link.catch_up() == 1  # the quiet round goes back, the next applies
    assert not pair.cached("lost")
    assert (link.stats.rewinds, link.stats.fallbacks) == (1, 0)
    assert pair.dst_r.get("cg:relay:a") == f"{eid} 1".encode()
    assert [c.relayed_id for c in pair.dst_events()] == [eid, eid]


async def test_a_checkpoint_gone_back_is_never_written_past(pair: Pair) -> None:
    link = pair.link()
    await link.load_checkpoint()
    before = pair.dst_r.get("cg:relay:a")
    assert before is not None
    await pair.emit(keys=["one"])
    assert await link.catch_up() == 1
    pair.cache("one")
    pair.dst_r.set("cg:relay:a", before)  # lost with the copy of "one"
    second = await pair.emit(keys=["two"])
    pair.cache("two")
    # "two" is applied; the checkpoint it finds is not the one written last: it is kept
    # (a crash now resumes before "one"), and the link goes back to it.
    assert await link.step(block=False) == 1
    assert not pair.cached("two")
    assert pair.dst_r.get("cg:relay:a") == before and link.stats.rewinds == 1
    assert await link.catch_up() == 2
    assert not pair.cached("one")
    assert pair.dst_r.get("cg:relay:a") == f"{second} 2".encode()


async def test_a_checkpoint_gone_from_the_destination_is_a_loss(pair: Pair) -> None:
    """Gone while the link runs: the destination lost data (all of it after a restart
    without persistence; its last writes after a failover to a replica that never had
    the checkpoint): what to apply again is unknown, so the fallback."""
    link = pair.link()
    await link.load_checkpoint()
    await pair.emit(keys=["k"])
    assert await link.catch_up() == 1
    pair.dst_r.delete("cg:relay:a")
    pair.cache("unnamed")
    assert await link.catch_up() == 0  # a quiet round finds it gone
    assert link.stats.fallbacks == 1 and not pair.cached("unnamed")
    pair.dst_r.delete("cg:relay:a")
    pair.cache("unnamed")
    await pair.emit(keys=["k2"])
    assert await link.catch_up() == 1  # so does a batch's checkpoint write
    assert link.stats.fallbacks == 2 and not pair.cached("unnamed")
    last = pair.src_r.xinfo_stream("cg:events")["last-generated-id"]
    assert pair.dst_r.get("cg:relay:a") == last + b" 2"
    assert link.stats.rewinds == 0


async def test_a_checkpoint_written_by_another_relay_is_carried_on_from(pair: Pair) -> None:
    link, other = pair.link(), pair.link()  # two relays for the same pair of regions
    await link.load_checkpoint()
    await other.load_checkpoint()
    await pair.emit(keys=["one"])
    assert await link.catch_up() == 1
    two = await pair.emit(keys=["two"])
    # `other` applies both, finds link's checkpoint, goes back to it and applies "two"
    # again (harmless, as a second relay is: twice the work).
    assert await other.catch_up() == 3
    assert (other.stats.rewinds, other.stats.fallbacks) == (1, 0)
    assert pair.dst_r.get("cg:relay:a") == f"{two} 2".encode()
    # `link` applies "two" too and finds other's checkpoint where it is: no going back.
    assert await link.catch_up() == 1
    assert (link.cursor, link.stats.rewinds, link.stats.fallbacks) == (other.cursor, 0, 0)
    assert await link.catch_up() == 0 and await other.catch_up() == 0
    assert (link.stats.rewinds, other.stats.rewinds) == (0, 1)


async def test_an_unreadable_checkpoint_is_a_loss(pair: Pair) -> None:
    await pair.emit(keys=["k"])
    pair.dst_r.set("cg:relay:a", b"garbage")
    pair.cache("unnamed")
    link = pair.link()
    assert await link.catch_up() == 0
    assert link.stats.fallbacks == 1 and not pair.cached("unnamed")
    last = pair.src_r.xinfo_stream("cg:events")["last-generated-id"]
    assert pair.dst_r.get("cg:relay:a") == last + b" 1"


async def test_an_unreadable_event_flushes_the_destination(pair: Pair) -> None:
    link = pair.link()
    await link.load_checkpoint()
    pair.src_r.xadd("cg:events", {"e": b"\xff\xff not protobuf"})
    pair.cache("unnamed")
    pair.dst_r.set("cg:{c}:n", 7)  # a counter: region-local data, kept
    assert await link.catch_up() == 1
    assert link.stats.fallbacks == 1 and not pair.cached("unnamed")
    assert pair.dst_r.get("cg:{c}:n") == b"7"
    kinds = [c.kind for c in pair.dst_events()]
    assert kinds == [pb.EVENT_KIND_RESET]


async def test_drop_cached_values_keeps_counters_and_other_prefixes(pair: Pair) -> None:
    pair.dst_r.mset({f"cg:{{k{i}}}": b"v" for i in range(2500)})  # several SCAN batches
    pair.dst_r.set("cg:{k0}:lease", b"t")
    pair.dst_r.set("cg:{k0}:n", 1)
    pair.dst_r.set("cg:{k0}:rl", b"x")
    pair.dst_r.set("other:{k0}", b"v")
    assert await drop_cached_values(pair.dst, scan_count=1000) == 2500
    names: list[bytes] = pair.dst_r.keys("*")  # type: ignore[assignment]
    left = sorted(k.decode() for k in names)
    assert left == ["cg:{k0}:n", "cg:{k0}:rl", "other:{k0}"]


def test_a_filtered_copy_keeps_its_region() -> None:
    copy = events.make(origin="relay:a", keys=["x:1", "y:1"])
    copy.relayed_from, copy.relayed_id = "a", "1-0"
    picked = events.EventFilter(["x:"], [], lambda key: "default").select(copy)
    assert picked is not None and list(picked.keys) == ["x:1"]
    assert (picked.relayed_from, picked.relayed_id) == ("a", "1-0")


@pytest.mark.parametrize(
    ("regions", "prefixes", "message"),
    [
        (["a=redis://127.0.0.1:1/0"], [], "exactly two"),
        (["a=redis://127.0.0.1:1/0", "a=redis://127.0.0.1:2/0"], [], "same name"),
        (["a b=redis://x", "b=redis://y"], [], "NAME=URL"),
        (["a=", "b=redis://y"], [], "no Redis URL"),
        (["a=redis://x", "b=redis://y"], ["c=cg"], "no region is named"),
        (["a=redis://x", "b=redis://x"], [], "same Redis and prefix"),
    ],
)
def test_bad_regions_are_refused(regions: list[str], prefixes: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_regions(regions, prefixes)


def test_prefixes_per_region() -> None:
    a, b = parse_regions(["eu=redis://x", "us=redis://x"], ["app", "us=other"])
    assert (a.prefix, b.prefix) == ("app", "other")


def test_the_command_says_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--region", "a=redis://127.0.0.1:1/0"]) == 2
    assert "exactly two" in capsys.readouterr().err
    assert main(["--region", "a=http://x", "--region", "b=redis://127.0.0.1:1/0", "--once"]) == 2
    assert "'http://x'" in capsys.readouterr().err
