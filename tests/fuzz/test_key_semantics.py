"""What fuzzing points at, checked for meaning: keys, prefixes and tags made of the
characters Redis key building treats specially (glob characters for the prefix SCAN,
Cluster hash-tag braces, backslashes, NUL and control characters) act on exactly the
keys they name, on a real gateway and redis-server."""

from __future__ import annotations

import random

import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import free_port
from tests.conftest import GatewayFactory, RunningGateway, eventually

# Characters that a glob, a hash tag or an escape could give meaning to, and plain ones.
ALPHABET = ["a", "b", "*", "?", "[", "]", "^", "-", "\\", "{", "}", "\x00", "\n", "\x7f", "é"]


def _keys(rng: random.Random, n: int, longest: int) -> list[str]:
    out = {"".join(rng.choices(ALPHABET, k=rng.randint(1, longest))) for _ in range(n)}
    return sorted(out)


async def _present(gw: RunningGateway, keys: list[str]) -> set[str]:
    got = await gw.stub.GetMany(pb.GetManyRequest(keys=keys))
    return {k for k, r in zip(keys, got.results, strict=True) if r.status == pb.STATUS_HIT}


async def test_prefix_invalidation_removes_exactly_the_keys_with_that_prefix(
    gateway_factory: GatewayFactory,
) -> None:
    # Two gateways: the one invalidating (L1 and Redis) and another whose L1 copies go
    # by the published event (events.py's prefix filter).
    a, b = await gateway_factory(), await gateway_factory()
    rng = random.Random(12)
    for _ in range(25):  # bounded: 25 rounds of up to 40 keys
        keys = _keys(rng, 40, 4)
        prefix = rng.choice([*keys, *_keys(rng, 5, 2)])[: rng.randint(1, 3)]
        await a.stub.SetMany(
            pb.SetManyRequest(entries=[pb.SetRequest(key=k, value=b"v") for k in keys])
        )
        for i in range(0, len(keys), 100):
            await b.stub.GetMany(pb.GetManyRequest(keys=keys[i : i + 100]))
        doomed = {k for k in keys if k.startswith(prefix)}
        out = await a.stub.Invalidate(pb.InvalidateRequest(prefixes=[prefix]))
        assert out.removed == len(doomed), (prefix, sorted(doomed))
        # Keys that the prefix would match as a glob (a*, a?, [ab]) but do not start
        # with it are still there, on both gateways.
        await eventually(lambda d=doomed: not any(k in b.server.l1 for k in d))  # type: ignore[misc]
        for gw in (a, b):
            assert await _present(gw, keys) == set(keys) - doomed, (prefix, gw.address)
        await a.stub.Delete(pb.DeleteRequest(keys=keys[:16]))
        if len(keys) > 16:
            await a.stub.DeleteMany(pb.DeleteManyRequest(keys=keys[16:32]))
            await a.stub.DeleteMany(pb.DeleteManyRequest(keys=keys[32:]))


async def test_a_prefix_ending_in_a_brace_spares_the_key_before_it(gateway: RunningGateway) -> None:
    # Prefix "user}" scanned cg:{user}* and so also matched cg:{user} (the value of key
    # "user"), its lease, counter and limiter: "user" does not start with "user}".
    await gateway.stub.Set(pb.SetRequest(key="user", value=b"keep"))
    await gateway.stub.Incr(pb.IncrRequest(key="user", delta=5))
    await gateway.stub.Set(pb.SetRequest(key="user}x", value=b"drop"))
    out = await gateway.stub.Invalidate(pb.InvalidateRequest(prefixes=["user}"]))
    assert out.removed == 1
    assert await _present(gateway, ["user", "user}x"]) == {"user"}
    gateway.server.l1.clear()
    assert await _present(gateway, ["user"]) == {"user"}
    assert (await gateway.stub.Incr(pb.IncrRequest(key="user", delta=0))).value == 5


async def test_tags_with_glob_brace_and_control_characters(gateway: RunningGateway) -> None:
    tags = ["*", "a*", "[a]", "{t}", "}", "\\", "\x00", "t\x00x", "\n", "tag:*", "😀"]
    for i, tag in enumerate(tags):
        await gateway.stub.Set(pb.SetRequest(key=f"k{i}", value=b"v", tags=[tag]))
    # "*" names only the values tagged "*", not every tag's.
    for i, tag in enumerate(tags):
        out = await gateway.stub.Invalidate(pb.InvalidateRequest(tags=[tag]))
        assert out.removed == 1, tag
        left = await _present(gateway, [f"k{j}" for j in range(len(tags))])
        assert left == {f"k{j}" for j in range(i + 1, len(tags))}, tag


async def test_keys_with_odd_characters_round_trip(gateway: RunningGateway) -> None:
    keys = [
        "\x00",
        "a\x00b",
        "}",
        "}x",
        "{",
        "{}",
        "}{",
        "\\",
        "\\}",
        "*",
        "?",
        "[",
        "k:lease",
        "x}:lease",
    ]
    for key in keys:
        stored = await gateway.stub.Set(pb.SetRequest(key=key, value=key.encode() + b"!"))
        assert stored.outcome == pb.SET_OUTCOME_STORED, key
    gateway.server.l1.clear()  # read them from Redis, not L1
    got = await gateway.stub.GetMany(pb.GetManyRequest(keys=keys))
    assert [r.value for r in got.results] == [k.encode() + b"!" for k in keys]
    # No two keys share a Redis key: deleting one leaves the others.
    deleted = await gateway.stub.DeleteMany(pb.DeleteManyRequest(keys=keys[::2]))
    assert list(deleted.deleted) == [True] * len(keys[::2])
    assert await _present(gateway, keys) == set(keys[1::2])


WRITE_BEHIND = """
[[classes]]
name = "behind"
patterns = ["x:*"]
origin = "127.0.0.1:{port}"
read_policy = "read-through"
write_policy = "behind"
"""


async def test_prefix_invalidation_spares_the_write_behind_journal(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    # The journal of writes not yet stored in the origin is <p>:{wb:<class>:<n>}:journal:
    # a SCAN for keys starting "wb" (cg:{wb*) matches it. Invalidate(prefixes=["wb"])
    # used to delete it, and with it writes the origin never got. (No origin listens:
    # the write stays journaled.)
    gw = await gateway_factory(WRITE_BEHIND.format(port=free_port()))
    await gw.stub.Set(pb.SetRequest(key="x:1", value=b"pending"))
    wb_keys: list[bytes] = redis_client.keys("cg:{wb:*")  # type: ignore[assignment]
    journals = [k for k in wb_keys if k.endswith(b":journal")]
    assert journals and sum(redis_client.xlen(k) for k in journals) >= 1
    before = sorted(redis_client.keys("cg:{wb:*"))
    await gw.stub.Set(pb.SetRequest(key="wb:mine", value=b"v"))  # a user key under "wb"
    for prefix in ("w", "wb", "wb:", "wb:behind"):
        await gw.stub.Invalidate(pb.InvalidateRequest(prefixes=[prefix]))
    assert sorted(redis_client.keys("cg:{wb:*")) == before
    assert sum(redis_client.xlen(k) for k in journals) >= 1
    assert (await gw.stub.Get(pb.GetRequest(key="wb:mine"))).status == pb.STATUS_MISS
