"""The gateway's L1-hit read path against its floor and against direct Redis.

In one run, against one Redis (a managed redis-server this script starts and stops):

  (a) the gateway, `cachegw serve` as its own process: Get of a hot key that is an L1 hit
      (Set first, then a warm-up Get; each case checks it is answered from L1);
  (b) the floor: benchmarks/floor_server.py, a bare grpc.aio server with the gateway's
      server options answering with bytes encoded at Set time through raw-bytes handlers
      (a Get is one dictionary lookup on the request bytes; a GetMany one lookup per key
      and a join): the fastest a Python gRPC server answers these calls;
  (c) redis-py (asyncio client, hiredis parser) GET / MGET of the same keys and values,
      stored plainly in the same Redis (for scale only: no aim).

Python clients: grpc.aio stubs on one channel for (a) and (b), at concurrency 1 and 64
(64 asyncio tasks sharing the channel or one redis-py pool), and the sync grpc channel at
concurrency 1. The Python client shares the machine's cores with the server, so the
server's own ceiling is measured too, with h2load (C, nghttp2-client): the same Get and
GetMany bodies POSTed as gRPC unary calls over 4 connections x 16 streams, every answer
checked (see benchmarks/h2load_grpc.py), with the server's CPU time per call read from
/proc. Then GetMany of 100 keys (all L1 hits) the same ways. Cases run in interleaved
rounds (A, B, C, A, B, C, ...); the table shows medians over rounds, throughput ratios
are the median of per-round ratios. The aims are in AIMS below; a missed aim makes the
script exit 1.

Run (from the repository root, after `make setup`; h2load: `make bench` installs it):

    .venv/bin/python benchmarks/bench_gateway.py              # about 2 minutes
    .venv/bin/python benchmarks/bench_gateway.py --quick      # under 40 s (smoke test)
    .venv/bin/python benchmarks/bench_gateway.py --rounds 9 --only 'h2'

Every process it starts is stopped on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

# `python benchmarks/bench_gateway.py` puts only benchmarks/ on the path: add the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc
import redis
import redis.asyncio as aioredis
from redis.utils import HIREDIS_AVAILABLE

from benchmarks.h2load_grpc import (
    H2LoadFailed,
    H2LoadMissing,
    check_run,
    grpc_frame,
    h2load_binary,
    h2load_version,
    nghttp_call,
    run_h2load,
)
from benchmarks.harness import (
    Aim,
    Budget,
    Case,
    Results,
    Sample,
    ServerProcess,
    check_aims,
    fmt_number,
    fmt_ratio,
    measure_async,
    measure_sync,
    render_table,
    run_interleaved,
    sigterm_as_interrupt,
)
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis, free_port

BIN = Path(sys.executable).parent
FLOOR_SERVER = Path(__file__).resolve().parent / "floor_server.py"

# The gateway keeps the benchmark's keys in L1 for the whole run (the default class's
# L1 TTL of 30 s would send a Get to Redis every 30 s).
GATEWAY_CONFIG = """\
[default_class]
ttl_seconds = 7200
l1_ttl_seconds = 3600
"""

CALL_TIMEOUT = 10.0  # seconds, per RPC or Redis command: a stuck target fails the run
HOT_KEY = "bench:hot"

# The aims: the gateway's L1-hit path within 10 % of the pre-encoded floor, for one Get
# and for a GetMany of 100 keys (values/s), seen by a Python client and by h2load (the
# server's own ceiling). Each figure is the median per-round ratio gateway / floor.
# (Retired: "GetMany beats redis-py MGET": one Python gRPC call costs more than a Redis
# round trip whatever the gateway does; the near cache is how a service beats Redis.)
AIM_FLOOR = 0.90
AIMS = [
    Aim("Get c=1", "Get calls/s, gateway / floor, grpc.aio client, 1 in flight", ">=", AIM_FLOOR),
    Aim("Get c=64", "the same, 64 in flight on one channel", ">=", AIM_FLOOR),
    Aim("Get h2load", "Get calls/s, gateway / floor, h2load 4 conn x 16 streams", ">=", AIM_FLOOR),
    Aim("GetMany c=1", "GetMany(100) values/s, gateway / floor, grpc.aio, 1", ">=", AIM_FLOOR),
    Aim("GetMany c=64", "the same, 64 in flight", ">=", AIM_FLOOR),
    Aim("GetMany h2load", "GetMany(100) values/s, gateway / floor, h2load", ">=", AIM_FLOOR),
]
# table row (gateway case) -> aim
AIM_OF_CASE = {
    "get.c1.gateway": "Get c=1",
    "get.c64.gateway": "Get c=64",
    "get.h2.gateway": "Get h2load",
    "many.c1.gateway": "GetMany c=1",
    "many.c64.gateway": "GetMany c=64",
    "many.h2.gateway": "GetMany h2load",
}
GET_PATH = "/cachegw.v1.CacheService/Get"
GET_MANY_PATH = "/cachegw.v1.CacheService/GetMany"


@dataclass(frozen=True)
class Settings:
    rounds: int
    budget: Budget
    value_size: int
    batch: int
    concurrency: int
    only: str
    h2_clients: int
    h2_streams: int


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        description="Gateway L1-hit Get/GetMany vs the pre-encoded grpc.aio floor vs redis-py.",
    )
    p.add_argument("--quick", action="store_true", help="short run (< 40 s), for smoke tests")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 2)")
    p.add_argument("--seconds", type=float, help="measured seconds per case and round")
    p.add_argument("--value-size", type=int, default=100, help="value bytes (default 100)")
    p.add_argument("--batch", type=int, default=100, help="keys per GetMany/MGET (default 100)")
    p.add_argument("--concurrency", type=int, default=64, help="the high concurrency (64)")
    p.add_argument("--h2load-clients", type=int, default=4, help="h2load connections (4)")
    p.add_argument("--h2load-streams", type=int, default=16, help="streams per connection (16)")
    p.add_argument(
        "--only", default="", help="run only cases whose name matches this regex (e.g. h2)"
    )
    a = p.parse_args(argv)
    rounds = a.rounds if a.rounds is not None else (2 if a.quick else 5)
    seconds = a.seconds if a.seconds is not None else (0.3 if a.quick else 1.0)
    warmup = 0.1 if a.quick else 0.2
    if rounds < 1 or seconds <= 0 or a.value_size < 0 or a.batch < 1 or a.concurrency < 1:
        p.error("--rounds, --seconds, --batch, --concurrency must be positive")
    if a.h2load_clients < 1 or a.h2load_streams < 1:
        p.error("--h2load-clients and --h2load-streams must be positive")
    return Settings(
        rounds=rounds,
        budget=Budget(seconds=seconds, warmup_seconds=warmup, timeout=60.0),
        value_size=a.value_size,
        batch=a.batch,
        concurrency=a.concurrency,
        only=a.only,
        h2_clients=a.h2load_clients,
        h2_streams=a.h2load_streams,
    )


# -- targets --------------------------------------------------------------------------


class Clients:
    """One client per target and technology, opened once and shared by every case."""

    def __init__(self, gateway: str, floor: str, redis_url: str) -> None:
        self.gw_channel = grpc.aio.insecure_channel(gateway)
        self.floor_channel = grpc.aio.insecure_channel(floor)
        self.gw = cache_pb2_grpc.CacheServiceStub(self.gw_channel)
        self.floor = cache_pb2_grpc.CacheServiceStub(self.floor_channel)
        self.gw_sync_channel = grpc.insecure_channel(gateway)
        self.floor_sync_channel = grpc.insecure_channel(floor)
        self.gw_sync = cache_pb2_grpc.CacheServiceStub(self.gw_sync_channel)
        self.floor_sync = cache_pb2_grpc.CacheServiceStub(self.floor_sync_channel)
        self.redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=CALL_TIMEOUT, socket_connect_timeout=CALL_TIMEOUT
        )

    async def close(self) -> None:
        try:
            await self.gw_channel.close(None)
            await self.floor_channel.close(None)
            await self.redis.aclose()
        finally:
            self.gw_sync_channel.close()
            self.floor_sync_channel.close()


def batch_keys(n: int) -> list[str]:
    return [f"bench:batch:{i:04d}" for i in range(n)]


def make_value(size: int, seed: int) -> bytes:
    pattern = f"value-{seed:04d}-".encode()
    return (pattern * (size // len(pattern) + 1))[:size]


async def populate(c: Clients, s: Settings) -> None:
    """Store the hot key and the batch in all three targets, then check each answers."""
    keys = [HOT_KEY, *batch_keys(s.batch)]
    values = {k: make_value(s.value_size, i) for i, k in enumerate(keys)}
    for key, value in values.items():
        for stub in (c.gw, c.floor):
            reply = await stub.Set(pb.SetRequest(key=key, value=value), timeout=CALL_TIMEOUT)
            if reply.outcome != pb.SET_OUTCOME_STORED:
                raise RuntimeError(f"Set {key!r} was not stored: {reply}")
    await c.redis.mset(values)
    # The warm-up reads; they also prove the gateway answers from L1.
    await check_get(c.gw, values[HOT_KEY], "gateway")
    await check_get(c.floor, values[HOT_KEY], "floor")
    await check_get_many(c.gw, keys[1:], [values[k] for k in keys[1:]], "gateway")
    await check_get_many(c.floor, keys[1:], [values[k] for k in keys[1:]], "floor")
    if await c.redis.get(HOT_KEY) != values[HOT_KEY]:
        raise RuntimeError("redis GET does not return the stored value")
    if await c.redis.mget(keys[1:]) != [values[k] for k in keys[1:]]:
        raise RuntimeError("redis MGET does not return the stored values")


def _check_hit(reply: pb.GetResponse, value: bytes | None, where: str) -> None:
    if reply.status != pb.STATUS_HIT or reply.tier != pb.TIER_L1:
        status = pb.Status.Name(reply.status)
        tier = pb.Tier.Name(reply.tier)
        raise RuntimeError(f"{where}: expected an L1 HIT, got {status} from {tier}")
    if value is not None and reply.value != value:
        raise RuntimeError(f"{where}: wrong value ({len(reply.value)} bytes)")


async def check_get(
    stub: cache_pb2_grpc.CacheServiceAsyncStub, value: bytes | None, name: str
) -> None:
    reply = await stub.Get(pb.GetRequest(key=HOT_KEY), timeout=CALL_TIMEOUT)
    _check_hit(reply, value, f"{name} Get {HOT_KEY}")


async def check_get_many(
    stub: cache_pb2_grpc.CacheServiceAsyncStub,
    keys: list[str],
    values: list[bytes] | None,
    name: str,
) -> None:
    reply = await stub.GetMany(pb.GetManyRequest(keys=keys), timeout=CALL_TIMEOUT)
    if len(reply.results) != len(keys):
        raise RuntimeError(f"{name} GetMany: {len(reply.results)} results for {len(keys)} keys")
    for i, r in enumerate(reply.results):
        _check_hit(r, None if values is None else values[i], f"{name} GetMany {keys[i]}")


# -- h2load: the server's own ceiling --------------------------------------------------

H2_CASES = ("get.h2.gateway", "get.h2.floor", "many.h2.gateway", "many.h2.floor")


def wants_h2load(s: Settings) -> bool:
    return not s.only or any(re.search(s.only, name) for name in H2_CASES)


@dataclass(frozen=True)
class H2Plan:
    """What the h2load cases send, how long each answer must be, how many calls a run."""

    bodies: dict[str, Path]  # "get" / "many" -> framed request
    answer_len: dict[tuple[str, str], int]  # (method, target) -> framed answer bytes
    requests: dict[str, int]  # method -> calls per run


async def gateway_calls(stub: cache_pb2_grpc.CacheServiceAsyncStub, method: str) -> tuple[int, int]:
    """(calls, errors) of one RPC method so far, from the gateway's Stats."""
    stats = await stub.Stats(pb.StatsRequest(), timeout=CALL_TIMEOUT)
    for rpc in stats.rpcs:
        if rpc.method == method:
            return rpc.calls, rpc.errors
    return 0, 0


def spot_check(address: str, method: str, body: Path, keys: list[str], values: list[bytes]) -> int:
    """One call with the exact h2load body through nghttp: grpc-status 0 and an L1 HIT of
    the expected value(s). Returns the framed answer's length."""
    path = GET_PATH if method == "get" else GET_MANY_PATH
    status, message = nghttp_call(address, path, body)
    where = f"{address}{path} via nghttp"
    if status != "0":
        raise H2LoadFailed(f"{where}: grpc-status {status}, expected 0")
    if method == "get":
        _check_hit(pb.GetResponse.FromString(message), values[0], where)
    else:
        reply = pb.GetManyResponse.FromString(message)
        if len(reply.results) != len(keys):
            raise H2LoadFailed(f"{where}: {len(reply.results)} results for {len(keys)} keys")
        for r, v in zip(reply.results, values, strict=True):
            _check_hit(r, v, where)
    return 5 + len(message)


def prepare_h2load(s: Settings, work: Path, gateway: str, floor: str) -> H2Plan:
    """Request bodies, spot checks, and the calls per run (about --seconds at the gateway's
    rate, measured by a first run that also warms both servers up)."""
    keys = batch_keys(s.batch)
    bodies = {
        "get": work / "get.grpc",
        "many": work / "get_many.grpc",
    }
    bodies["get"].write_bytes(grpc_frame(pb.GetRequest(key=HOT_KEY).SerializeToString()))
    bodies["many"].write_bytes(grpc_frame(pb.GetManyRequest(keys=keys).SerializeToString()))
    hot_value = [make_value(s.value_size, 0)]
    batch_values = [make_value(s.value_size, i + 1) for i in range(len(keys))]
    answer_len: dict[tuple[str, str], int] = {}
    requests: dict[str, int] = {}
    for method in ("get", "many"):
        wanted = ([HOT_KEY], hot_value) if method == "get" else (keys, batch_values)
        path = GET_PATH if method == "get" else GET_MANY_PATH
        for target, address in (("gateway", gateway), ("floor", floor)):
            answer_len[method, target] = spot_check(address, method, bodies[method], *wanted)
            probe = 2000 if method == "get" else 200
            first = run_h2load(address, path, bodies[method], probe, s.h2_clients, s.h2_streams)
            check_run(first, answer_len[method, target], f"{target} {method} (warm-up)")
            if target == "gateway":
                requests[method] = max(200, round(first.calls_per_s * s.budget.seconds))
    return H2Plan(bodies, answer_len, requests)


# -- cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A table row: the case name and how it is shown."""

    name: str
    scenario: str
    target: str
    client: str


@dataclass(frozen=True)
class Pids:
    """The processes whose CPU time each case charges to the server side."""

    gateway: int
    floor: int
    redis: int | None


def build_cases(
    c: Clients,
    s: Settings,
    runner: asyncio.Runner,
    pids: Pids,
    addresses: tuple[str, str],
    h2: H2Plan | None,
) -> tuple[list[Case], list[Row | None]]:
    budget = s.budget
    keys = batch_keys(s.batch)
    get_req = pb.GetRequest(key=HOT_KEY)
    many_req = pb.GetManyRequest(keys=keys)

    def aio_case(
        call: Callable[[], Awaitable[object]],
        concurrency: int,
        items: int,
        pid: int | None,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> Callable[[], Sample]:
        async def run() -> Sample:
            if before is not None:
                await before()
            return await measure_async(call, concurrency, budget, items, pid)

        return lambda: runner.run(run())

    def sync_case(
        call: Callable[[], object],
        pid: int | None,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> Callable[[], Sample]:
        def run() -> Sample:
            if before is not None:
                runner.run(_awaited(before()))
            return measure_sync(call, budget, 1, pid)

        return run

    def h2_case(method: str, target: str) -> Callable[[], Sample]:
        """One h2load run, checked: every answer whole; at the gateway, Stats agrees."""
        assert h2 is not None
        is_gw = target == "gateway"
        address = addresses[0] if is_gw else addresses[1]
        path = GET_PATH if method == "get" else GET_MANY_PATH
        rpc = "Get" if method == "get" else "GetMany"
        items = 1 if method == "get" else s.batch
        n = h2.requests[method]

        def run() -> Sample:
            before = (0, 0)
            if is_gw:
                runner.run(_awaited(gw_still_l1() if method == "get" else gw_batch_still_l1()))
                before = runner.run(gateway_calls(c.gw, rpc))
            pid = pids.gateway if is_gw else pids.floor
            result = run_h2load(
                address, path, h2.bodies[method], n, s.h2_clients, s.h2_streams, pid
            )
            check_run(result, h2.answer_len[method, target], f"{target} {rpc} via h2load")
            if is_gw:
                calls, errors = runner.run(gateway_calls(c.gw, rpc))
                if calls - before[0] != n or errors != before[1]:
                    raise H2LoadFailed(
                        f"gateway {rpc} via h2load: Stats counted {calls - before[0]} calls "
                        f"and {errors - before[1]} errors for {n} requests"
                    )
            return Sample(result.succeeded, result.seconds, [], items, math.nan,
                          result.server_cpu_s)  # fmt: skip

        return run

    # Before each gateway case (untimed): the keys are still answered from L1.
    def gw_still_l1() -> Awaitable[None]:
        return check_get(c.gw, None, "gateway")

    def gw_batch_still_l1() -> Awaitable[None]:
        return check_get_many(c.gw, keys, None, "gateway")

    async def gw_get() -> object:
        return await c.gw.Get(get_req, timeout=CALL_TIMEOUT)

    async def floor_get() -> object:
        return await c.floor.Get(get_req, timeout=CALL_TIMEOUT)

    async def redis_get() -> object:
        return await c.redis.get(HOT_KEY)

    async def gw_many() -> object:
        return await c.gw.GetMany(many_req, timeout=CALL_TIMEOUT)

    async def floor_many() -> object:
        return await c.floor.GetMany(many_req, timeout=CALL_TIMEOUT)

    async def redis_mget() -> object:
        return await c.redis.mget(keys)

    def gw_get_sync() -> object:
        return c.gw_sync.Get(get_req, timeout=CALL_TIMEOUT)

    def floor_get_sync() -> object:
        return c.floor_sync.Get(get_req, timeout=CALL_TIMEOUT)

    hi = s.concurrency
    nb = s.batch
    gw, fl, rd = pids.gateway, pids.floor, pids.redis
    get_label = f"Get {s.value_size} B"
    many_label = f"GetMany {nb}x{s.value_size} B"
    specs: list[tuple[Row, Callable[[], Sample]] | None] = [
        (Row("get.c1.gateway", f"{get_label}, c=1", "(a) gateway", "grpc.aio"),
         aio_case(gw_get, 1, 1, gw, gw_still_l1)),
        (Row("get.c1.floor", "", "(b) floor", "grpc.aio"), aio_case(floor_get, 1, 1, fl)),
        (Row("get.c1.redis", "", "(c) redis-py GET", "redis.asyncio"),
         aio_case(redis_get, 1, 1, rd)),
        (Row("get.c1.gateway.sync", "", "(a) gateway", "grpc sync"),
         sync_case(gw_get_sync, gw, gw_still_l1)),
        (Row("get.c1.floor.sync", "", "(b) floor", "grpc sync"), sync_case(floor_get_sync, fl)),
        None,
        (Row(f"get.c{hi}.gateway", f"{get_label}, c={hi}", "(a) gateway", "grpc.aio"),
         aio_case(gw_get, hi, 1, gw, gw_still_l1)),
        (Row(f"get.c{hi}.floor", "", "(b) floor", "grpc.aio"), aio_case(floor_get, hi, 1, fl)),
        (Row(f"get.c{hi}.redis", "", "(c) redis-py GET", "redis.asyncio"),
         aio_case(redis_get, hi, 1, rd)),
        None,
        (Row("many.c1.gateway", f"{many_label}, c=1", "(a) gateway", "grpc.aio"),
         aio_case(gw_many, 1, nb, gw, gw_batch_still_l1)),
        (Row("many.c1.floor", "", "(b) floor", "grpc.aio"), aio_case(floor_many, 1, nb, fl)),
        (Row("many.c1.redis", "", "(c) redis-py MGET", "redis.asyncio"),
         aio_case(redis_mget, 1, nb, rd)),
        None,
        (Row(f"many.c{hi}.gateway", f"{many_label}, c={hi}", "(a) gateway", "grpc.aio"),
         aio_case(gw_many, hi, nb, gw, gw_batch_still_l1)),
        (Row(f"many.c{hi}.floor", "", "(b) floor", "grpc.aio"),
         aio_case(floor_many, hi, nb, fl)),
        (Row(f"many.c{hi}.redis", "", "(c) redis-py MGET", "redis.asyncio"),
         aio_case(redis_mget, hi, nb, rd)),
    ]  # fmt: skip
    if h2 is not None:
        h2_label = f"h2load {s.h2_clients}x{s.h2_streams}"
        specs += [
            None,
            (Row("get.h2.gateway", f"{get_label}, {h2_label}", "(a) gateway", "h2load"),
             h2_case("get", "gateway")),
            (Row("get.h2.floor", "", "(b) floor", "h2load"), h2_case("get", "floor")),
            None,
            (Row("many.h2.gateway", f"{many_label}, {h2_label}", "(a) gateway", "h2load"),
             h2_case("many", "gateway")),
            (Row("many.h2.floor", "", "(b) floor", "h2load"), h2_case("many", "floor")),
        ]  # fmt: skip
    pattern = re.compile(s.only) if s.only else None
    cases: list[Case] = []
    rows: list[Row | None] = []
    for spec in specs:
        if spec is None:
            if rows and rows[-1] is not None:
                rows.append(None)
            continue
        row, run = spec
        if pattern is None or pattern.search(row.name):
            cases.append(Case(row.name, run))
            rows.append(row)
    while rows and rows[-1] is None:
        rows.pop()
    return cases, rows


async def _awaited(work: Awaitable[None]) -> None:
    await work


# -- report ---------------------------------------------------------------------------


def counterpart(name: str, letter: str) -> str:
    """get.c1.gateway.sync -> get.c1.floor.sync ('b') / get.c1.redis ('c')."""
    parts = name.split(".")
    parts[2] = {"b": "floor", "c": "redis"}[letter]
    if letter == "c":
        parts = parts[:3]
    return ".".join(parts)


def aim_of(case: str, s: Settings) -> str | None:
    """The aim a gateway case's a/b ratio is held to: get.c64.gateway -> "Get c=64"."""
    parts = case.split(".")
    if len(parts) != 3 or parts[2] != "gateway":
        return None
    method = {"get": "Get", "many": "GetMany"}[parts[0]]
    mode = {"c1": "c=1", f"c{s.concurrency}": "c=64", "h2": "h2load"}.get(parts[1])
    return None if mode is None else f"{method} {mode}"


def measured_aims(results: Results, s: Settings) -> tuple[dict[str, float], dict[str, str]]:
    """Each aim's figure, and the range of its per-round ratios (the noise)."""
    out, notes = {}, {}
    for case in results.samples:
        aim = aim_of(case, s)
        floor = counterpart(case, "b")
        if aim is not None and floor in results.samples:
            out[aim] = results.ratio(case, floor)
            notes[aim] = results.spread(case, floor)
    return out, notes


def ratio_cells(results: Results, row: Row, letter: str, s: Settings) -> tuple[str, str]:
    if not row.target.startswith("(a)"):
        return "", ""
    other = counterpart(row.name, letter)
    if letter == "c" and (row.name.endswith(".sync") or ".h2." in row.name):
        return "", ""
    if other not in results.samples:
        return "n/a", ""
    value = results.ratio(row.name, other)
    aim = aim_of(row.name, s) if letter == "b" else None
    if aim is None:
        return fmt_ratio(value), ""
    met = value >= AIM_FLOOR
    return fmt_ratio(value), f">={AIM_FLOOR:.2f} {'met' if met else 'NOT met'}"


def report(results: Results, rows: Sequence[Row | None], s: Settings) -> str:
    headers = [
        "scenario", "target", "client", "ops/s", "values/s", "p50 us", "p99 us",
        "srv cpu", "cli cpu", "a/b", "aim", "a/c",
    ]  # fmt: skip
    table: list[list[str]] = []
    for row in rows:
        if row is None:
            table.append([])
            continue
        m = results.summary(row.name)
        ab, ab_aim = ratio_cells(results, row, "b", s)
        ac, _ = ratio_cells(results, row, "c", s)
        table.append([
            row.scenario, row.target, row.client,
            fmt_number(m.ops_per_s), fmt_number(m.items_per_s),
            fmt_number(m.p50_us, 1), fmt_number(m.p99_us, 1),
            fmt_number(m.server_cpu_us_per_op, 1), fmt_number(m.client_cpu_us_per_op, 1),
            ab, ab_aim, ac,
        ])  # fmt: skip
    out = [render_table(headers, table, right="lllrrrrrrrlr")]
    names = results.samples
    for target in ("gateway", "floor"):
        sync, aio = f"get.c1.{target}.sync", f"get.c1.{target}"
        if sync in names and aio in names:
            out.append(
                f"sync grpc channel vs grpc.aio, Get c=1, {target}: "
                f"{fmt_ratio(results.ratio(sync, aio))}x the throughput"
            )
    out.append(
        "ops/s, values/s, p50, p99: medians over rounds; a/b, a/c: median per-round "
        "throughput ratio of the gateway to (b) the floor / (c) redis-py "
        f"({s.rounds} rounds of about {s.budget.seconds:g} s per case).\n"
        "srv cpu / cli cpu: CPU us per call used by the target process (gateway, floor or "
        "redis-server) / by this client process, all threads. With a Python client on the "
        "same 2 cores the pair is measured; the h2load rows (a C client, every answer "
        "checked) show the server's own ceiling and CPU per call."
    )
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------


def redis_server_version() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        return "?"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


def run(s: Settings) -> int:
    use_h2 = wants_h2load(s)
    if use_h2:
        try:
            h2load_binary()
        except H2LoadMissing as exc:
            print(f"bench_gateway: {exc}", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="cachegw-bench-"))
    config = work / "gateway.toml"
    config.write_text(GATEWAY_CONFIG)
    t0 = time.monotonic()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        store = stack.enter_context(ManagedRedis())
        gw_addr = f"127.0.0.1:{free_port()}"
        gateway = ServerProcess(
            "gateway",
            [str(BIN / "cachegw"), "serve", "--listen", gw_addr, "--redis-url", store.url,
             "--config", str(config), "--log-level", "WARNING"],
            gw_addr,
            work / "gateway.log",
        )  # fmt: skip
        stack.enter_context(gateway)
        floor_addr = f"127.0.0.1:{free_port()}"
        floor = ServerProcess(
            "floor",
            [sys.executable, str(FLOOR_SERVER), "--listen", floor_addr],
            floor_addr,
            work / "floor.log",
        )
        stack.enter_context(floor)
        print(
            f"redis-server {redis_server_version()} pid {store.pid} at {store.url}; "
            f"gateway pid {gateway.pid} at {gw_addr}; floor pid {floor.pid} at {floor_addr}",
            file=sys.stderr,
        )
        runner = stack.enter_context(asyncio.Runner())
        clients = Clients(gw_addr, floor_addr, store.url)
        stack.callback(lambda: runner.run(clients.close()))
        runner.run(populate(clients, s))
        pids = Pids(gateway.pid, floor.pid, store.pid)
        h2 = prepare_h2load(s, work, gw_addr, floor_addr) if use_h2 else None
        cases, rows = build_cases(clients, s, runner, pids, (gw_addr, floor_addr), h2)
        if not cases:
            print(f"no case matches --only {s.only!r}", file=sys.stderr)
            return 2
        started = time.monotonic()

        def progress(r: int, case: Case, sample: Sample) -> None:
            if case is cases[-1]:
                elapsed = time.monotonic() - started
                print(f"round {r + 1}/{s.rounds} done ({elapsed:.0f} s)", file=sys.stderr)

        results = run_interleaved(cases, s.rounds, progress)
        for proc in (gateway, floor):
            if not proc.running:
                raise RuntimeError(f"the {proc.name} process died during the run")
    print(header(s, use_h2))
    print(report(results, rows, s))
    met = check_aims(AIMS, *measured_aims(results, s))
    print(f"total wall time {time.monotonic() - t0:.0f} s")
    return 0 if met else 1


def header(s: Settings, h2: bool) -> str:
    return (
        f"cachegw gateway benchmark: value {s.value_size} B, batch {s.batch} keys, "
        f"concurrency 1 and {s.concurrency}, {s.rounds} interleaved rounds x "
        f"{s.budget.seconds:g} s (+{s.budget.warmup_seconds:g} s warm-up) per case\n"
        f"python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"redis-py {redis.__version__} (hiredis {'on' if HIREDIS_AVAILABLE else 'OFF'}), "
        f"redis-server {redis_server_version()}, {os.cpu_count()} CPUs, "
        f"{platform.machine()} {platform.system()}" + (f", {h2load_version()}" if h2 else "")
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return run(settings)
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
