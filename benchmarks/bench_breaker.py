"""The circuit breaker against a hung Redis: two gateways on one Redis, one with the
breaker (as configured by default, but a 1 s cool-down) and one without (the reference),
in the same run.

Run:  .venv/bin/python benchmarks/bench_breaker.py [--rounds 3] [--hang 3] [--callers 20]

Each round SIGSTOPs the redis-server for --hang seconds while --callers concurrent
callers per gateway Get keys no L1 holds (each call with a 5 s deadline), then SIGCONTs
it and times the first Set that succeeds on each gateway. Printed per gateway: calls
answered during the hang, their latency (p50/p99), the recovery time; and the ratios.
Redis's socket_timeout is 0.5 s here (1 s by default), so the reference's failing Get
takes about 1 s (a read is sent once more after a timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc

from benchmarks.harness import Aim, check_aims, median, percentile, render_table
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.config import load_config
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.server import GatewayServer

SOCKET_TIMEOUT = 0.5
COOLDOWN = 1.0
AIMS = [
    Aim("fail fast", "failing Get p50, breaker / no breaker", "<=", 0.05),
    Aim("answers", "Gets answered during the hang, breaker / no breaker", ">=", 10.0),
    Aim("recovery", "SIGCONT to the first stored Set with the breaker", "<=", 4.0, "s"),
]

_ids = itertools.count()


async def _gateway(tmp: Path, url: str, breaker: bool) -> GatewayServer:
    path = tmp / f"{'on' if breaker else 'off'}.toml"
    path.write_text(
        f"[redis]\nsocket_timeout = {SOCKET_TIMEOUT}\n"
        f"[redis.breaker]\nenabled = {str(breaker).lower()}\ncooldown_seconds = {COOLDOWN}\n"
    )
    config = load_config(path, env={}, overrides={"redis.url": url, "server.listen": "127.0.0.1:0"})
    server = GatewayServer(config, url)
    await server.start()
    return server


async def _hammer(
    stub: cache_pb2_grpc.CacheServiceAsyncStub, until: float, callers: int
) -> list[float]:
    latencies: list[float] = []

    async def caller() -> None:
        while time.monotonic() < until:
            started = time.monotonic()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Get(pb.GetRequest(key=f"cold-{next(_ids)}"), timeout=5)
            latencies.append(time.monotonic() - started)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies


async def _recovery(stub: cache_pb2_grpc.CacheServiceAsyncStub, since: float) -> float:
    deadline = since + 30
    while time.monotonic() < deadline:
        try:
            await stub.Set(pb.SetRequest(key="probe", value=b"v"), timeout=5)
            return time.monotonic() - since
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.01)
    return float("nan")


async def main(rounds: int, hang: float, callers: int) -> int:
    with ManagedRedis() as redis_server, tempfile.TemporaryDirectory() as tmp:
        on = await _gateway(Path(tmp), redis_server.url, breaker=True)
        off = await _gateway(Path(tmp), redis_server.url, breaker=False)
        channels = [grpc.aio.insecure_channel(gw.address) for gw in (on, off)]
        stubs: list[cache_pb2_grpc.CacheServiceAsyncStub] = [
            cache_pb2_grpc.CacheServiceStub(c) for c in channels
        ]
        figures: dict[str, list[list[float]]] = {"on": [], "off": []}
        recoveries: dict[str, list[float]] = {"on": [], "off": []}
        try:
            for _ in range(rounds):
                assert redis_server.pid is not None
                os.kill(redis_server.pid, signal.SIGSTOP)
                try:
                    until = time.monotonic() + hang
                    lat_on, lat_off = await asyncio.gather(
                        *(_hammer(stub, until, callers) for stub in stubs)
                    )
                finally:
                    os.kill(redis_server.pid, signal.SIGCONT)
                healed = time.monotonic()
                rec_on, rec_off = await asyncio.gather(*(_recovery(s, healed) for s in stubs))
                figures["on"].append(sorted(lat_on))
                figures["off"].append(sorted(lat_off))
                recoveries["on"].append(rec_on)
                recoveries["off"].append(rec_off)
                await asyncio.sleep(1.0)  # let in-flight probes settle between rounds
            stats = await stubs[0].Stats(pb.StatsRequest())
        finally:
            for channel in channels:
                await channel.close(None)
            for gw in (on, off):
                await gw.stop(grace=0)

    rows = []
    per: dict[str, tuple[float, float, float, float]] = {}
    for name in ("on", "off"):
        p50 = median([percentile(r, 50) for r in figures[name]])
        p99 = median([percentile(r, 99) for r in figures[name]])
        calls = median([float(len(r)) for r in figures[name]])
        rec = median(recoveries[name])
        per[name] = (calls, p50, p99, rec)
        label = "(a) breaker" if name == "on" else "(b) no breaker"
        rows.append([label, f"{calls:.0f}", f"{p50 * 1000:.1f}", f"{p99 * 1000:.1f}",
                     f"{rec:.2f}"])  # fmt: skip
    print(
        f"hung Redis (SIGSTOP) for {hang:g} s, {callers} callers per gateway, {rounds} rounds "
        f"(medians); socket_timeout {SOCKET_TIMEOUT} s, cool-down {COOLDOWN} s"
    )
    print(render_table(["gateway", "Gets answered", "p50 ms", "p99 ms", "recovery s"], rows,
                       right="lrrrr"))  # fmt: skip
    print(
        f"breaker: {stats.redis.breaker_trips} trips, {stats.redis.breaker_refused} calls "
        "refused over all rounds"
    )
    measured = {
        "fail fast": per["on"][1] / per["off"][1],
        "answers": per["on"][0] / per["off"][0],
        "recovery": per["on"][3],
    }
    return 0 if check_aims(AIMS, measured) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hang", type=float, default=3.0)
    parser.add_argument("--callers", type=int, default=20)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.rounds, args.hang, args.callers)))
