"""Origin load, hit rate and latency with refresh-ahead off and on, under a Zipf workload.

C callers over two gateway processes read K keys of a read-through class, picked with a
Zipf law (exponent s: a few keys take most reads), with a short TTL, so hot keys expire
(and are loaded again) many times per case. Two cases, each with keys, gateways and an
origin process of its own, warmed up (unmeasured), then measured in interleaved windows
(off, on; on, off; ...):

  (off) read-through: a key is loaded when a reader finds it expired, under the lease
        (one Load per key across the gateways; its readers wait for it);
  (on)  the same, plus refresh_ahead: hot keys (the gateways' hot-key sketches) are
        reloaded before they expire, at most --rate per second across the gateways.

The origin is tests/origin/flaky_origin.py (rows in memory) with every Load taking
--load-ms (an expensive recomputation, the case refresh-ahead is for). Printed per case:
origin keys loaded per second (from the origin's log), the reloads refresh-ahead did and
skipped for the rate (the gateways' Stats), hit rate (reads answered from the cache
without loading or waiting for a load: 1 - (loads + waits) / reads, from Stats), p50 /
p99 of one Get as the caller sees it, errors. A missed aim makes the script exit 1.

Run (from the repository root, after `make setup`):

    .venv/bin/python benchmarks/bench_refresh_ahead.py            # about 70 s
    .venv/bin/python benchmarks/bench_refresh_ahead.py --quick    # about 35 s
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc

from benchmarks.harness import (
    Aim,
    check_aims,
    fmt_number,
    percentile,
    render_table,
    sigterm_as_interrupt,
    start_gateways,
)
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis, free_port

AIMS = [
    Aim("hit rate gain", "(on) - (off) hit rate, percentage points", ">=", 0.0, ""),
    Aim("p99 ratio", "(on) p99 / (off) p99", "<=", 1.0),
    Aim(
        "refresh within rate",
        "(on) reloads / (windows x ceil(rate) + rate x seconds)",
        "<=",
        1.0,
    ),
    Aim("errors", "failed reads, both cases", "==", 0, "count"),
]

FLAKY_ORIGIN = Path(__file__).resolve().parent.parent / "tests" / "origin" / "flaky_origin.py"

CONFIG = """
[origin]
timeout_seconds = 2.0

[[classes]]
name = "{name}"
patterns = ["{name}*"]
ttl_seconds = {ttl}
jitter = 0.1
origin = "{origin}"
read_policy = "read-through"
{refresh}refresh_ahead = true
refresh_ahead_fraction = {fraction}
refresh_ahead_rate = {rate}
"""


@dataclass
class Settings:
    callers: int
    keys: int
    zipf: float
    gateways: int
    ttl: float
    seconds: float
    rounds: int
    warmup: float
    think: float
    load_ms: float
    rate: float
    fraction: float


@dataclass
class Tally:
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


_LOAD_LINE = re.compile(r"origin Load: (\d+) keys")


def keys_loaded(log: Path) -> int:
    return sum(int(m.group(1)) for m in _LOAD_LINE.finditer(log.read_text(errors="replace")))


def zipf_weights(n: int, s: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (rank**s) for rank in range(1, n + 1)))


async def class_totals(
    stubs: Sequence[cache_pb2_grpc.CacheServiceStub], name: str
) -> dict[str, int]:
    out: dict[str, int] = {}
    for stub in stubs:
        reply: pb.StatsResponse = await stub.Stats(pb.StatsRequest(classes=[name]))  # type: ignore[misc]
        for fd, value in reply.classes[0].ListFields():
            if isinstance(value, int):
                out[fd.name] = out.get(fd.name, 0) + value
    return out


async def run_case(
    s: Settings,
    stubs: Sequence[cache_pb2_grpc.CacheServiceStub],
    prefix: str,
    tally: Tally,
    seconds: float,
) -> None:
    weights = zipf_weights(s.keys, s.zipf)
    population = [f"{prefix}:{k}" for k in range(s.keys)]

    async def caller(i: int, until: float) -> None:
        rng = random.Random(i)
        await asyncio.sleep(rng.random() * s.think)
        while time.monotonic() < until:
            key = rng.choices(population, cum_weights=weights)[0]
            started = time.perf_counter()
            try:
                stub = rng.choice(stubs)
                got: pb.GetResponse = await stub.Get(pb.GetRequest(key=key), timeout=10)  # type: ignore[misc]
                if got.status != pb.STATUS_HIT:
                    tally.errors += 1
            except grpc.aio.AioRpcError:
                tally.errors += 1
            tally.latencies.append(time.perf_counter() - started)
            await asyncio.sleep(s.think)

    until = time.monotonic() + seconds
    await asyncio.gather(*(caller(i, until) for i in range(s.callers)))


@dataclass
class Case:
    name: str
    stubs: list[cache_pb2_grpc.CacheServiceStub]
    origin_log: Path
    tally: Tally = field(default_factory=Tally)
    elapsed: float = 0.0
    loads: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    async def window(self, s: Settings, seconds: float) -> None:
        """One measured window: reads, origin keys loaded, Stats deltas, summed up."""
        before_stats = await class_totals(self.stubs, self.name)
        before_loads = keys_loaded(self.origin_log)
        started = time.monotonic()
        await run_case(s, self.stubs, self.name, self.tally, seconds)
        self.elapsed += time.monotonic() - started
        self.loads += keys_loaded(self.origin_log) - before_loads
        after = await class_totals(self.stubs, self.name)
        for k, v in after.items():
            self.stats[k] = self.stats.get(k, 0) + v - before_stats.get(k, 0)

    def report(self) -> tuple[list[str], dict[str, float]]:
        d, lat = self.stats, sorted(self.tally.latencies)
        reads = d.get("hits_l1", 0) + d.get("hits_l2", 0) + d.get("stale", 0) + d.get("misses", 0)
        waited = d.get("misses", 0) + d.get("lease_waits", 0)
        hit_rate = max(0.0, 1 - waited / reads) if reads else float("nan")
        refreshes = d.get("refresh_ahead_loads", 0)
        row = [
            f"({self.name}) refresh-ahead {self.name}",
            fmt_number(len(lat)),
            f"{self.loads / self.elapsed:.1f}",
            f"{refreshes / self.elapsed:.1f}",
            fmt_number(d.get("refresh_ahead_rate_limited", 0)),
            f"{hit_rate * 100:.2f} %",
            f"{percentile(lat, 50) * 1000:.1f}",
            f"{percentile(lat, 99) * 1000:.1f}",
            fmt_number(self.tally.errors),
        ]
        figures = {
            "hit": hit_rate,
            "p99": percentile(lat, 99),
            "refreshes": refreshes,
            "elapsed": self.elapsed,
            "errors": self.tally.errors,
        }
        return row, figures


async def run_all(
    s: Settings, gateways: dict[str, list[str]], logs: dict[str, Path]
) -> tuple[list[list[str]], dict[str, dict[str, float]]]:
    """Warm both cases up, then measure them in interleaved windows (off, on; on, off;
    ...), so that the machine's other load falls on both alike."""
    channels = {c: [grpc.aio.insecure_channel(a) for a in gateways[c]] for c in gateways}
    cases = {
        c: Case(c, [cache_pb2_grpc.CacheServiceStub(ch) for ch in channels[c]], logs[c])
        for c in gateways
    }
    try:
        for case in cases.values():  # every key loaded once, the hot ones tracked
            await run_case(s, case.stubs, case.name, Tally(), s.warmup)
        order = ["off", "on"]
        for r in range(s.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                await cases[name].window(s, s.seconds / s.rounds)
            print(f"round {r + 1}/{s.rounds} done", file=sys.stderr)
    finally:
        for chs in channels.values():
            for channel in chs:
                await channel.close(None)
    rows, figures = [], {}
    for name in order:
        rows.append(cases[name].report()[0])
        figures[name] = cases[name].report()[1]
    return rows, figures


def measured_aims(s: Settings, f: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        "hit rate gain": (f["on"]["hit"] - f["off"]["hit"]) * 100,
        "p99 ratio": f["on"]["p99"] / f["off"]["p99"],
        # GCRA's bound per measured window (each may start with a full bucket).
        "refresh within rate": f["on"]["refreshes"]
        / (s.rounds * math.ceil(s.rate) + s.rate * f["on"]["elapsed"]),
        "errors": float(f["off"]["errors"] + f["on"]["errors"]),
    }


def start_origin(work: Path, load_ms: float) -> tuple[subprocess.Popen[bytes], str, Path]:
    address = f"127.0.0.1:{free_port()}"
    log, mode = work / "origin.log", work / "origin-mode"
    mode.write_text(f"slow {load_ms / 1000}" if load_ms > 0 else "ok")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(FLAKY_ORIGIN), "--mode-file", str(mode), "--listen", address],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return proc, address, log
            except grpc.FutureTimeoutError:
                continue
    proc.kill()
    proc.wait(5)
    raise RuntimeError(f"the origin did not start: {log.read_text(errors='replace')[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--callers", type=int, default=40)
    p.add_argument("--keys", type=int, default=250, help="(a gateway tracks 256 hot keys)")
    p.add_argument("--zipf", type=float, default=1.1, help="the Zipf exponent")
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--ttl", type=float, default=2.0, help="seconds")
    p.add_argument("--seconds", type=float, default=24.0, help="measured, per case")
    p.add_argument("--rounds", type=int, default=3, help="interleaved windows per case")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds before, not measured")
    p.add_argument("--think", type=float, default=0.02, help="seconds between a caller's reads")
    p.add_argument("--load-ms", type=float, default=20.0, help="each origin Load takes this")
    p.add_argument("--rate", type=float, default=200.0, help="refresh_ahead_rate, per second")
    p.add_argument("--fraction", type=float, default=0.3, help="refresh_ahead_fraction")
    p.add_argument("--quick", action="store_true", help="8 s per case in 2 rounds, 3 s warm-up")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.rounds, a.warmup = 8.0, 2, 3.0
    return Settings(
        a.callers, a.keys, a.zipf, a.gateways, a.ttl, a.seconds, a.rounds, a.warmup, a.think,
        a.load_ms, a.rate, a.fraction,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cachegw-refresh-"))
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            store = stack.enter_context(ManagedRedis())
            gateways: dict[str, list[str]] = {}
            logs: dict[str, Path] = {}
            for case in ("off", "on"):
                # Each case its own origin (its Loads counted apart) and gateways (a
                # gateway's hot-key sketch holds 256 keys: not the other case's).
                folder = work / case
                folder.mkdir()
                proc, origin, logs[case] = start_origin(folder, s.load_ms)
                stack.callback(stop, proc)
                config = CONFIG.format(
                    ttl=s.ttl,
                    origin=origin,
                    rate=s.rate,
                    fraction=s.fraction,
                    refresh="" if case == "on" else "#",
                    name=case,
                )
                started = start_gateways(stack, s.gateways, store.url, config, folder)
                gateways[case] = [g.address for g in started]
            rows, figures = asyncio.run(run_all(s, gateways, logs))
            measured = measured_aims(s, figures)
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    print(
        f"refresh-ahead benchmark: {s.callers} callers over {s.gateways} gateways, {s.keys} "
        f"keys drawn with Zipf s={s.zipf:g}, TTL {s.ttl:g} s (jitter 0.1), think "
        f"{s.think * 1000:g} ms, {s.seconds:g} s per case in {s.rounds} interleaved rounds "
        f"after {s.warmup:g} s of warm-up; "
        f"origin Loads take {s.load_ms:g} ms; refresh-ahead: {s.fraction:g} of the TTL "
        f"before expiry, at most {s.rate:g}/s"
    )
    print(
        render_table(
            [
                "case",
                "reads",
                "origin keys/s",
                "refreshed/s",
                "rate-limited",
                "hit rate",
                "p50 ms",
                "p99 ms",
                "errors",
            ],
            rows,
            right="lrrrrrrrr",
        )
    )
    print(
        "hit rate: reads answered from the cache without loading or waiting for a load; "
        "origin keys/s: every key the origin loaded (misses and refreshes)."
    )
    return 0 if check_aims(AIMS, measured) else 1


if __name__ == "__main__":
    sys.exit(main())
