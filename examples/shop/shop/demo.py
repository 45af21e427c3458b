"""`make demo`: the same load against each mode in turn, and a table per mode.

For each mode the API runs as its own process (`python -m shop serve`), the gateway as
`cachegw serve`, Redis as a managed redis-server, PostgreSQL as one throwaway cluster
shared by the modes (seeded once). Phases, each measured on its own: steady state; a
mass expiry (every cached value dropped at once: FLUSHDB for redis-py, a class-wide
invalidation for the gateway); Redis stopped for 10 s. Database queries come from
PostgreSQL's pg_stat_statements (calls of statements on the shop's tables).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from cachegw import AsyncClient
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from shop import services
from shop.loadgen import STALE_BOUND, Phase, Workload, drive
from shop.modes import MODES

CATEGORIES = 20
HOT_KEYS = 10
EXPIRY_WINDOW = 5.0  # seconds after the mass expiry in which hot-key loads are counted
BURST = 50  # concurrent reads of the hottest product sent as everything expires
CLASSES = ["product", "catalog", "inventory", "pricing", "quote"]
QUERIES = (
    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
    "WHERE query ~* '\\m(products|prices|inventory|categories)\\M' "
    "AND query !~* 'pg_stat_statements'"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", default="", help="PostgreSQL; none: a throwaway cluster")
    parser.add_argument("--products", type=int, default=100_000, help="seed size")
    parser.add_argument(
        "--rate",
        type=float,
        default=50.0,
        help="requests per second (the no-cache mode fell behind at 100 on the 2-core VM "
        "the README's table comes from)",
    )
    parser.add_argument(
        "--prewarm",
        type=int,
        default=5000,
        help="before the warm-up, read the N most popular products (detail, price, stock), "
        "every listing page asked for without a text search, every quote basket and every "
        "missing product once through the API, in every mode alike",
    )
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds, not measured")
    parser.add_argument(
        "--no-warm-start",
        dest="warm_start",
        action="store_false",
        help="cachegw mode: no warm start (the API's Warmup of the catalog from its origin)",
    )
    parser.add_argument("--steady", type=float, default=30.0, help="seconds")
    parser.add_argument("--expiry", type=float, default=20.0, help="seconds")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds Redis is down")
    parser.add_argument("--modes", default=",".join(MODES), help="which, in order")
    parser.add_argument("--log-level", default="WARNING")


@dataclass
class Row:
    mode: str
    phase: str
    seconds: float
    result: Phase
    db_queries: float
    reads: int
    loads: int
    hot_loads: int | None = None

    @property
    def db_rate(self) -> float:
        return self.db_queries / self.result.elapsed

    def cells(self) -> list[str]:
        r = self.result
        hit = (
            "-"
            if self.mode == "none" or not self.reads
            else f"{100 * (1 - self.loads / self.reads):.1f}%"
        )
        return [
            self.mode,
            self.phase,
            f"{r.requests / r.elapsed:.0f}",
            f"{self.db_queries / r.elapsed:.0f}",
            f"{1000 * r.percentile(50):.1f}",
            f"{1000 * r.percentile(95):.1f}",
            f"{1000 * r.percentile(99):.1f}",
            hit,
            str(r.stale),
            str(r.errors),
            "-" if self.hot_loads is None else str(self.hot_loads),
        ]


HEADER = [
    "mode",
    "phase",
    "req/s",
    "DB q/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "hit rate",
    "stale",
    "errors",
    "hot-key loads",
]


def table(rows: list[Row]) -> str:
    cells = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]

    def line(c: list[str]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells[1:]]
    return "\n".join(out)


class Stats:
    """PostgreSQL's count of queries on the shop's tables, and the API's counters."""

    def __init__(self, conn: asyncpg.Connection, http: httpx.AsyncClient, hot: list[int]) -> None:
        self.conn = conn
        self.http = http
        self.hot = hot

    async def queries(self) -> float:
        try:
            return float(await self.conn.fetchval(QUERIES))
        except asyncpg.PostgresError:  # no pg_stat_statements: transactions instead
            return float(
                await self.conn.fetchval(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                    "WHERE datname = current_database()"
                )
            )

    async def api(self) -> dict[str, Any]:
        ids = ",".join(map(str, self.hot))
        r = await self.http.get("/_stats", params={"ids": ids})
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body


class ModeRun:
    """One mode: its processes, its phases, its rows."""

    def __init__(self, mode: str, dsn: str, args: argparse.Namespace) -> None:
        self.mode = mode
        self.dsn = dsn
        self.args = args
        self.redis: ManagedRedis | None = None
        self.gateway: services.GatewayProcess | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.hot_result: int | None = None
        self.burst_errors = 0

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "shop",
            "serve",
            "--mode",
            self.mode,
            "--dsn",
            self.dsn,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "ERROR",
        ]
        if self.mode != "none":
            self.redis = ManagedRedis()
            self.redis.start()
        if self.mode == "redis":
            assert self.redis is not None
            cmd += ["--redis-url", self.redis.url]
        if self.mode == "cachegw":
            assert self.redis is not None
            origin = f"127.0.0.1:{free_port()}"
            self.gateway = services.GatewayProcess(self.redis.url, origin)
            cmd += ["--gateway", self.gateway.address, "--origin-listen", origin]
            if not self.args.warm_start:
                cmd.append("--no-warm")
        env = {**os.environ, "PYTHONPATH": str(services.HERE)}
        self.api = subprocess.Popen(cmd, env=env)

    async def wait_ready(self, http: httpx.AsyncClient) -> None:
        for _ in range(300):
            assert self.api is not None
            if self.api.poll() is not None:
                raise RuntimeError(f"the {self.mode} API exited ({self.api.returncode})")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/health")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the {self.mode} API did not answer in 30 s")

    def stop(self) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.send_signal(signal.SIGTERM)
            try:
                self.api.wait(20)
            except subprocess.TimeoutExpired:
                self.api.kill()
                self.api.wait(5)
        if self.gateway is not None:
            self.gateway.stop()
        if self.redis is not None:
            self.redis.stop()

    async def expire_everything(self) -> None:
        if self.mode == "redis":
            assert self.redis is not None
            r = aioredis.Redis.from_url(self.redis.url)
            await r.flushdb()
            await r.aclose()
        elif self.mode == "cachegw":
            assert self.gateway is not None
            async with AsyncClient(self.gateway.address) as cache:
                await cache.invalidate(classes=CLASSES)

    async def outage(self, seconds: float) -> None:
        """Redis stopped 2 s into the phase, started again (same port) `seconds` later."""
        await asyncio.sleep(2)
        if self.redis is None:
            return
        await asyncio.to_thread(self.redis.stop)
        await asyncio.sleep(seconds)
        await asyncio.to_thread(self.redis.start)


class FlashCrowd:
    """`n` open HTTP/1.1 connections that each send one GET at the same moment."""

    def __init__(self, streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
        self.streams = streams

    @classmethod
    async def open(cls, port: int, n: int) -> FlashCrowd:
        return cls(
            list(
                await asyncio.gather(
                    *(asyncio.open_connection("127.0.0.1", port) for _ in range(n))
                )
            )
        )

    async def get(self, path: str, timeout: float = 30.0) -> list[int]:  # noqa: ASYNC109
        """Every connection's request written at once; each answer's status (0: none)."""
        request = f"GET {path} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n".encode()
        for _, writer in self.streams:
            writer.write(request)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
            try:
                status = await asyncio.wait_for(reader.readline(), timeout)
                await asyncio.wait_for(reader.read(), timeout)  # the rest, to the close
                return int(status.split()[1])
            except (OSError, TimeoutError, ValueError, IndexError):
                return 0
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        return list(await asyncio.gather(*(answer(r, w) for r, w in self.streams)))


async def wait_warm(http: httpx.AsyncClient, limit: float = 600.0) -> None:
    """The cachegw API rebuilds the catalog in the gateway from its origin at start (a
    Warmup by prefix, resumed until done): wait for it, and say how long it took."""
    print("== cachegw: warm start (the whole catalog, by Warmup from the origin)", flush=True)
    deadline = time.monotonic() + limit
    while True:
        r = await http.get("/_stats", params={"ids": ""})
        r.raise_for_status()
        warm = r.json().get("warm", {})
        if warm.get("done"):
            print(f"   done: {warm}", flush=True)
            return
        if time.monotonic() > deadline:
            print(f"   not done after {limit:g} s, going on: {warm}", flush=True)
            return
        await asyncio.sleep(1.0)


async def prewarm(
    http: httpx.AsyncClient,
    reads: list[tuple[str, str, dict[str, Any] | None]],
    concurrency: int = 16,
) -> None:
    queue = iter(reads)

    async def worker() -> None:
        for method, path, data in queue:
            with contextlib.suppress(httpx.HTTPError):
                if method == "GET":
                    await http.get(path, params=data)
                else:
                    await http.request(method, path, json=data)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(
    name: str,
    run: ModeRun,
    stats: Stats,
    work: Workload,
    http: httpx.AsyncClient,
    seconds: float,
    rate: float,
    during: Any = None,
) -> Row:
    q0, a0 = await stats.queries(), await stats.api()
    phase = Phase()
    load = asyncio.create_task(drive(http, work, phase, rate=rate, seconds=seconds))
    hot_loads = None
    if during is not None:
        await during(a0)
    await load
    if name == "mass expiry":
        hot_loads = run.hot_result
        phase.errors += run.burst_errors
    q1, a1 = await stats.queries(), await stats.api()
    reads = sum(a1["reads"].values()) - sum(a0["reads"].values())
    loads = sum(a1["loads"].values()) - sum(a0["loads"].values())
    if phase.error_kinds:
        print(f"  {run.mode} {name}: errors {dict(phase.error_kinds)}", flush=True)
    by_kind = {
        kind: n - a0["loads"].get(kind, 0)
        for kind, n in sorted(a1["loads"].items())
        if n - a0["loads"].get(kind, 0)
    }
    print(f"  {run.mode} {name}: database queries for reads, by kind {by_kind}", flush=True)
    print(f"  {run.mode} {name}: p95 ms by kind {phase.p95_by_kind()}", flush=True)
    return Row(run.mode, name, seconds, phase, q1 - q0, reads, loads, hot_loads)


async def run_mode(
    mode: str, dsn: str, args: argparse.Namespace, conn: asyncpg.Connection
) -> list[Row]:
    run = ModeRun(mode, dsn, args)
    work = Workload(args.products, CATEGORIES)
    hot = work.products.hottest(HOT_KEYS)
    rows: list[Row] = []
    run.start()
    try:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{run.port}", timeout=10.0, limits=limits, trust_env=False
        ) as http:
            await run.wait_ready(http)
            stats = Stats(conn, http, hot)
            if mode == "cachegw" and args.warm_start:
                await wait_warm(http)
            known = work.known_reads(args.prewarm)
            print(
                f"== {mode}: {len(known)} reads a running cache holds: the {args.prewarm} most "
                "popular products, the listing pages, quotes and missing products",
                flush=True,
            )
            await prewarm(http, known)
            print(f"== {mode}: warming up for {args.warmup:g} s", flush=True)
            await drive(http, work, Phase(), rate=args.rate, seconds=args.warmup)
            print(f"== {mode}: steady state", flush=True)
            rows.append(await measure("steady", run, stats, work, http, args.steady, args.rate))

            async def expiry(before: dict[str, Any]) -> None:
                # The crowd is on the site before it comes (its connections open), and
                # its requests leave together: written in one pass, as a crowd's do, not
                # one at a time through the HTTP client.
                crowd = await FlashCrowd.open(run.port, BURST)
                base, since = await stats.api(), time.monotonic()
                await run.expire_everything()
                statuses = await crowd.get(f"/products/{hot[0]}")
                run.burst_errors = sum(1 for status in statuses if status != 200)
                await asyncio.sleep(EXPIRY_WINDOW)
                after = await stats.api()
                # Each of its own writes in the window rightly costs a product one reload.
                run.hot_result = max(
                    after["product_loads"][str(i)]
                    - base["product_loads"][str(i)]
                    - sum(1 for t, _ in work.versions.acked.get(("prod", i), []) if t >= since)
                    for i in hot
                )

            print(f"== {mode}: mass expiry", flush=True)
            rows.append(
                await measure("mass expiry", run, stats, work, http, args.expiry, args.rate, expiry)
            )

            async def outage(before: dict[str, Any]) -> None:
                await run.outage(args.outage)

            print(f"== {mode}: Redis stopped for {args.outage:g} s", flush=True)
            rows.append(
                await measure(
                    "Redis down", run, stats, work, http, args.outage + 6, args.rate, outage
                )
            )
    finally:
        run.stop()
    return rows


def verdicts(rows: list[Row]) -> list[str]:
    by = {(r.mode, r.phase): r for r in rows}
    out: list[str] = []

    def get(mode: str, phase: str) -> Row | None:
        return by.get((mode, phase))

    none, gw, rd = get("none", "steady"), get("cachegw", "steady"), get("redis", "steady")
    if none and gw:
        fewer = 1 - gw.db_rate / max(none.db_rate, 1e-9)
        p95 = 1 - gw.result.percentile(95) / none.result.percentile(95)
        out.append(
            f"cachegw vs no cache, steady: {100 * fewer:.1f}% fewer DB queries/s "
            f"(aim >= 90%: {'met' if fewer >= 0.9 else 'MISSED'}), p95 {100 * p95:.1f}% "
            f"lower (aim >= 80%: {'met' if p95 >= 0.8 else 'MISSED'})"
        )
    if rd and none:
        fewer = 1 - rd.db_rate / max(none.db_rate, 1e-9)
        p95 = 1 - rd.result.percentile(95) / none.result.percentile(95)
        out.append(
            f"redis-py vs no cache, steady: {100 * fewer:.1f}% fewer DB queries/s, "
            f"p95 {100 * p95:.1f}% lower"
        )
    ge, re_ = get("cachegw", "mass expiry"), get("redis", "mass expiry")
    if ge and ge.hot_loads is not None:
        against = f" (redis-py: {re_.hot_loads})" if re_ and re_.hot_loads is not None else ""
        out.append(
            f"mass expiry: most DB loads of one of the {HOT_KEYS} hottest products in "
            f"the {EXPIRY_WINDOW:g} s after it: cachegw {ge.hot_loads}{against} "
            f"(aim 1: {'met' if ge.hot_loads <= 1 else 'MISSED'})"
        )
    stale = sum(r.result.stale for r in rows if r.mode == "cachegw")
    if any(r.mode == "cachegw" for r in rows):
        rstale = sum(r.result.stale for r in rows if r.mode == "redis")
        out.append(
            f"stale reads beyond {STALE_BOUND:g} s after a write: cachegw {stale}, "
            f"redis-py {rstale} (aim 0 for cachegw: {'met' if stale == 0 else 'MISSED'})"
        )
    gd, rdd = get("cachegw", "Redis down"), get("redis", "Redis down")
    if gd:
        against = f" (redis-py: {rdd.result.errors})" if rdd else ""
        out.append(
            f"Redis stopped: errors cachegw {gd.result.errors}{against} "
            f"(aim 0: {'met' if gd.result.errors == 0 else 'MISSED'})"
        )
    return out


async def amain(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        print(f"unknown modes: {', '.join(sorted(unknown))} (choose from {', '.join(MODES)})")
        return 2
    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if not dsn:
            dsn = stack.enter_context(services.managed_postgres()).dsn
        started = time.monotonic()
        await services.prepare(dsn, args.products, reseed=True)
        print(
            f"seeded {args.products} products in {CATEGORIES} categories "
            f"in {time.monotonic() - started:.1f} s",
            flush=True,
        )
        conn = await asyncpg.connect(dsn)
        rows: list[Row] = []
        try:
            for mode in modes:
                rows += await run_mode(mode, dsn, args, conn)
        finally:
            await conn.close()
    print()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node() or 'host'}: "
        f"{os.cpu_count()} cores, {args.products} products, {args.rate:g} requests/s, "
        f"stale bound {STALE_BOUND:g} s"
    )
    print(table(rows))
    print()
    for line in verdicts(rows):
        print(line)
    return 0


def main(args: argparse.Namespace) -> None:
    sys.exit(asyncio.run(amain(args)))
