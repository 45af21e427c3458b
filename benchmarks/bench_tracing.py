"""What tracing costs the gateway's L1-hit Get: off, on at 100 % sampling, on at 1 %,
with spans dropped in process and exported over OTLP/gRPC to a loopback receiver.

In one run, against one Redis (a managed redis-server this script starts and stops),
six gateways run as their own processes (benchmarks/traced_gateway.py: `serve` with a
tracer provider built like `[telemetry]` builds it), and an OTLP/gRPC trace receiver
(benchmarks/otlp_receiver.py, its own process: parses and counts what it gets):

  off          tracing off (no provider: no span code on the request path)
  off-b        the same again, so the off/off-b ratio shows this machine's noise
  on-100       every call traced (a SERVER span, its attributes, the batch processor),
               spans dropped by the exporter
  on-1         1 % of calls traced (the sampler decides per call), spans dropped
  on-100-otlp  every call traced, spans exported by the OTLP exporter to the receiver
  on-1-otlp    1 % of calls traced, exported to the receiver

bench_gateway.py's Get case (a hot key answered from L1, grpc.aio stubs on one channel)
runs against each, at concurrency 1 and 64, and driven by h2load (4 connections x 16
streams, every answer checked: the server's own cost, without a Python client on the
same cores), in interleaved rounds (the order rotated each round). Reported: throughput
and server CPU per call (medians over rounds), the median per-round ratio to `off`, and
how many spans the receiver got against the Get calls each OTLP gateway served. The
aims, judged on the h2load runs, are in AIMS below (a missed aim makes the script exit
1). Then, in this process and
without gRPC, the per-call cost of each piece on its own: the no-op `annotate()` the
cache code calls, the latency wrapper, the span wrapper.

Run (from the repository root, after `make setup`):

    .venv/bin/python benchmarks/bench_tracing.py            # about 2 minutes
    .venv/bin/python benchmarks/bench_tracing.py --quick    # under 40 s (smoke test)

Every process it starts is stopped on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `python benchmarks/bench_tracing.py` puts only benchmarks/ on the path: add the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc

from benchmarks.bench_gateway import (
    CALL_TIMEOUT,
    GATEWAY_CONFIG,
    HOT_KEY,
    check_get,
    make_value,
    redis_server_version,
)
from benchmarks.h2load_grpc import (
    H2LoadFailed,
    H2LoadMissing,
    check_run,
    grpc_frame,
    h2load_binary,
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
    process_cpu_seconds,
    render_table,
    run_interleaved,
    sigterm_as_interrupt,
)
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from cachegw_gateway.telemetry import tracing
from cachegw_gateway.telemetry.latency import RpcLatency

LAUNCHER = Path(__file__).resolve().parent / "traced_gateway.py"
RECEIVER = Path(__file__).resolve().parent / "otlp_receiver.py"

# 1 % sampling must cost at most 5 % of the gateway's throughput with tracing off
# (median per-round ratio), whether spans are dropped in process or exported over OTLP.
# Judged on the h2load-driven runs: the gateway's own ceiling. The same ratios with a
# Python client (c=1, c=64) are printed without an aim: that client shares the two cores
# with the gateway, and there the off-b/off control alone moves by up to 30 % between
# runs on the development machine.
AIM_ON_1 = 0.95
AIMS = [
    Aim("on-1 h2load", "Get calls/s, 1 % sampled, spans dropped / off", ">=", AIM_ON_1),
    Aim("on-1-otlp h2load", "Get calls/s, 1 % sampled, OTLP to loopback / off", ">=", AIM_ON_1),
]
GET_PATH = "/cachegw.v1.CacheService/Get"
H2_CLIENTS, H2_STREAMS = 4, 16  # as bench_gateway.py's h2load cases

OTLP = "{otlp}"  # replaced by the receiver's endpoint
# name -> launcher flags
TARGETS: dict[str, list[str]] = {
    "off": ["--off"],
    "off-b": ["--off"],
    "on-100": ["--sample-ratio", "1"],
    "on-1": ["--sample-ratio", "0.01"],
    "on-100-otlp": ["--sample-ratio", "1", "--otlp-endpoint", OTLP],
    "on-1-otlp": ["--sample-ratio", "0.01", "--otlp-endpoint", OTLP],
}


@dataclass(frozen=True)
class Settings:
    rounds: int
    budget: Budget
    value_size: int
    concurrency: int
    micro_calls: int


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description="Tracing off / on 100 % / on 1 %: Get from L1.")
    p.add_argument("--quick", action="store_true", help="short run (< 40 s), for smoke tests")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 2)")
    p.add_argument("--seconds", type=float, help="measured seconds per case and round")
    p.add_argument("--value-size", type=int, default=100, help="value bytes (default 100)")
    p.add_argument("--concurrency", type=int, default=64, help="the high concurrency (64)")
    a = p.parse_args(argv)
    rounds = a.rounds if a.rounds is not None else (2 if a.quick else 5)
    seconds = a.seconds if a.seconds is not None else (0.3 if a.quick else 0.8)
    if rounds < 1 or seconds <= 0 or a.value_size < 0 or a.concurrency < 1:
        p.error("--rounds, --seconds, --concurrency must be positive")
    return Settings(
        rounds=rounds,
        budget=Budget(seconds=seconds, warmup_seconds=0.1 if a.quick else 0.2, timeout=60.0),
        value_size=a.value_size,
        concurrency=a.concurrency,
        micro_calls=20_000 if a.quick else 200_000,
    )


# -- end to end -----------------------------------------------------------------------


@dataclass(frozen=True)
class H2Plan:
    """The framed Get body, each gateway's framed answer length, calls per run."""

    body: Path
    answer_len: dict[str, int]
    requests: int


def prepare_h2load(s: Settings, work: Path, addresses: dict[str, str], value: bytes) -> H2Plan:
    """Spot-check the h2load body on every gateway through nghttp (grpc-status 0, an L1
    HIT of the value) and size a run to about --seconds at the `off` gateway's rate."""
    body = work / "get.grpc"
    body.write_bytes(grpc_frame(pb.GetRequest(key=HOT_KEY).SerializeToString()))
    answer_len = {}
    for name, address in addresses.items():
        status, message = nghttp_call(address, GET_PATH, body)
        reply = pb.GetResponse.FromString(message)
        if status != "0" or reply.status != pb.STATUS_HIT or reply.tier != pb.TIER_L1:
            raise H2LoadFailed(f"{name}: grpc-status {status}, {reply.status}/{reply.tier}")
        if reply.value != value:
            raise H2LoadFailed(f"{name}: wrong value through nghttp")
        answer_len[name] = 5 + len(message)
    first = run_h2load(addresses["off"], GET_PATH, body, 2000, H2_CLIENTS, H2_STREAMS)
    check_run(first, answer_len["off"], "off (warm-up)")
    return H2Plan(body, answer_len, max(200, round(first.calls_per_s * s.budget.seconds)))


def build_cases(
    stubs: dict[str, cache_pb2_grpc.CacheServiceAsyncStub],
    pids: dict[str, int],
    s: Settings,
    runner: asyncio.Runner,
    addresses: dict[str, str],
    h2: H2Plan,
) -> list[Case]:
    request = pb.GetRequest(key=HOT_KEY)
    cases = []
    for name in stubs:

        def make_h2(name: str = name) -> Callable[[], Sample]:
            def run() -> Sample:
                runner.run(check_get(stubs[name], None, name))  # still an L1 hit
                result = run_h2load(addresses[name], GET_PATH, h2.body, h2.requests,
                                    H2_CLIENTS, H2_STREAMS, pids[name])  # fmt: skip
                check_run(result, h2.answer_len[name], f"{name} via h2load")
                return Sample(result.succeeded, result.seconds, [], 1, math.nan,
                              result.server_cpu_s)  # fmt: skip

            return run

        cases.append(Case(f"h2.{name}", make_h2()))
    for concurrency in (1, s.concurrency):
        for name, stub in stubs.items():

            def make(
                stub: cache_pb2_grpc.CacheServiceAsyncStub = stub,
                concurrency: int = concurrency,
                pid: int = pids[name],
                name: str = name,
            ) -> Callable[[], Sample]:
                async def get() -> object:
                    return await stub.Get(request, timeout=CALL_TIMEOUT)

                async def run() -> Sample:
                    await check_get(stub, None, name)  # still an L1 hit (untimed)
                    return await measure_async(get, concurrency, s.budget, 1, pid)

                return lambda: runner.run(run())

            cases.append(Case(f"c{concurrency}.{name}", make()))
    return cases


def report(results: Results, s: Settings) -> str:
    headers = ["case", "tracing", "ops/s", "p50 us", "p99 us", "srv cpu us", "ops ratio",
               "cpu ratio", "aim"]  # fmt: skip
    rows: list[list[str]] = []
    modes = [("c1", "c=1"), (f"c{s.concurrency}", f"c={s.concurrency}"),
             ("h2", f"h2load {H2_CLIENTS}x{H2_STREAMS}")]  # fmt: skip
    for mode, label in modes:
        base = f"{mode}.off"
        for name in TARGETS:
            case = f"{mode}.{name}"
            m = results.summary(case)
            b = results.summary(base)
            ratio = results.ratio(case, base)
            aim = ""
            if name in ("on-1", "on-1-otlp") and mode == "h2":
                aim = f">={AIM_ON_1:.2f} {'met' if ratio >= AIM_ON_1 else 'NOT met'}"
            rows.append([
                f"Get L1 hit, {label}", name,
                fmt_number(m.ops_per_s), fmt_number(m.p50_us, 1), fmt_number(m.p99_us, 1),
                fmt_number(m.server_cpu_us_per_op, 1),
                "1.00 (base)" if name == "off" else fmt_ratio(ratio),
                "1.00 (base)" if name == "off" else fmt_ratio(
                    m.server_cpu_us_per_op / b.server_cpu_us_per_op),
                aim,
            ])  # fmt: skip
        rows.append([])
    return render_table(headers, rows[:-1], right="llrrrrrrl")


# -- in process: each piece alone -----------------------------------------------------


class _Context:
    """Just enough of a grpc.aio servicer context for the wrappers."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None


async def _per_call_ns(handler: Callable[[Any, Any], Awaitable[Any]], calls: int) -> float:
    ctx = _Context()
    request = pb.GetRequest(key=HOT_KEY)
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        await handler(request, ctx)
    return (time.perf_counter_ns() - t0) / calls


def micro(calls: int) -> str:
    from benchmarks.traced_gateway import DiscardExporter
    from cachegw_gateway.config import TelemetryConfig

    async def bare(request: Any, context: Any) -> bytes:
        return b""

    def annotate_loop() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            tracing.annotate(tier="l1")
        return (time.perf_counter_ns() - t0) / calls

    def empty_loop() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            pass
        return (time.perf_counter_ns() - t0) / calls

    rows = []
    off = annotate_loop() - empty_loop()
    rows.append(["annotate(tier=...) with tracing off", fmt_number(off, 0)])

    async def measure() -> None:
        base = await _per_call_ns(bare, calls)
        timed = RpcLatency().timed("Get", bare)
        rows.append(["latency histogram wrapper (always on)",
                     fmt_number(await _per_call_ns(timed, calls) - base, 0)])  # fmt: skip
        for ratio in (1.0, 0.01):
            provider = tracing.build_provider(
                TelemetryConfig(sample_ratio=ratio), "bench", DiscardExporter()
            )
            assert provider is not None
            spans = tracing.ServerSpans(
                provider, "cachegw.v1.CacheService", lambda k: "default", ratio
            )
            tracing.enable()
            try:
                traced = spans.unary("Get", bare)
                ns = await _per_call_ns(traced, calls) - base
            finally:
                tracing.disable()
                provider.shutdown()
            rows.append([f"span wrapper, sampling {ratio:.0%}", fmt_number(ns, 0)])

    asyncio.run(measure())
    return render_table(["piece (in process, no gRPC)", "ns per call"], rows, right="lr")


# -- main -----------------------------------------------------------------------------


def run(s: Settings) -> int:
    try:
        h2load_binary()
    except H2LoadMissing as exc:
        print(f"bench_tracing: {exc}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cachegw-bench-tracing-"))
    config = work / "gateway.toml"
    config.write_text(GATEWAY_CONFIG)
    t0 = time.monotonic()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        store = stack.enter_context(ManagedRedis())
        receiver_addr = f"127.0.0.1:{free_port()}"
        receiver = ServerProcess(
            "otlp-receiver",
            [sys.executable, str(RECEIVER), "--listen", receiver_addr],
            receiver_addr,
            work / "receiver.log",
        )
        stack.enter_context(receiver)
        procs: dict[str, ServerProcess] = {}
        for name, flags in TARGETS.items():
            address = f"127.0.0.1:{free_port()}"
            flags = [f.replace(OTLP, f"http://{receiver_addr}") for f in flags]
            # A prefix each: one gateway's Set of the hot key would otherwise publish an
            # invalidation that evicts the others' L1 copies.
            argv = [sys.executable, str(LAUNCHER), "--listen", address,
                    "--redis-url", store.url, "--redis-prefix", f"bench-{name}",
                    "--config", str(config), "--gateway-id", name, *flags]  # fmt: skip
            server = ServerProcess(name, argv, address, work / f"{name}.log")
            procs[name] = stack.enter_context(server)
        runner = stack.enter_context(asyncio.Runner())
        channels = {n: grpc.aio.insecure_channel(p.address) for n, p in procs.items()}

        async def close() -> None:
            for channel in channels.values():
                await channel.close(None)

        stack.callback(lambda: runner.run(close()))
        stubs = {n: cache_pb2_grpc.CacheServiceStub(ch) for n, ch in channels.items()}

        async def populate() -> None:
            value = make_value(s.value_size, 0)
            for name, stub in stubs.items():
                await stub.Set(pb.SetRequest(key=HOT_KEY, value=value), timeout=CALL_TIMEOUT)
                await check_get(stub, value, name)

        runner.run(populate())
        addresses = {n: p.address for n, p in procs.items()}
        h2 = prepare_h2load(s, work, addresses, make_value(s.value_size, 0))
        cases = build_cases(stubs, {n: p.pid for n, p in procs.items()}, s, runner, addresses, h2)
        started = time.monotonic()

        done = [0]

        def progress(r: int, case: Case, sample: Sample) -> None:
            done[0] += 1
            if done[0] % len(cases) == 0:
                elapsed = time.monotonic() - started
                print(f"round {r + 1}/{s.rounds} done ({elapsed:.0f} s)", file=sys.stderr)

        # Rotated: the gateway exporting 100 % of its spans keeps working after its turn.
        results = run_interleaved(cases, s.rounds, progress, rotate=True)
        calls = runner.run(get_calls(stubs))
        receiver_cpu = process_cpu_seconds(receiver.pid)
        for proc in procs.values():
            if not proc.running:
                raise RuntimeError(f"the {proc.name} gateway died during the run")
            proc.stop()  # flushes the spans still batched
        dropped = {
            n: p.log.read_text(errors="replace").strip().rsplit("spans exported: ", 1)[-1]
            for n, p in procs.items()
            if "otlp" not in n and not n.startswith("off")
        }
        if not receiver.running:
            raise RuntimeError("the OTLP receiver died during the run")
        receiver.stop()
        received = received_spans(receiver.log.read_text(errors="replace"))
    print(
        f"cachegw tracing benchmark: Get of a {s.value_size} B value from L1, concurrency "
        f"1 and {s.concurrency}, {s.rounds} interleaved rounds x {s.budget.seconds:g} s\n"
        f"python {platform.python_version()}, grpcio {grpc.__version__}, redis-server "
        f"{redis_server_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    print(report(results, s))
    print(
        "ops ratio: median per-round throughput ratio to `off`; cpu ratio: server CPU per "
        "call relative to `off`.\nSpans given to the dropping exporter: "
        + ", ".join(f"{n} {c}" for n, c in dropped.items())
        + ".\nSpans the OTLP receiver got, of the Get calls served (warm-ups included): "
        + ", ".join(
            f"{n} {fmt_number(received.get(n, 0))} of {fmt_number(calls[n])}"
            for n in TARGETS
            if "otlp" in n
        )
        + f" (receiver CPU {receiver_cpu:.1f} s over the run). Spans include those of "
        "Set, Stats and the gateway's Redis health probes; fewer spans than Get calls at "
        "100 % would mean the batch processor dropped some."
    )
    print()
    print(micro(s.micro_calls))
    measured, notes = {}, {}
    # The control: what noise alone does to the same ratio.
    control = f"off-b/off {results.ratio('h2.off-b', 'h2.off'):.2f}"
    for name in ("on-1", "on-1-otlp"):
        measured[f"{name} h2load"] = results.ratio(f"h2.{name}", "h2.off")
        notes[f"{name} h2load"] = f"{results.spread(f'h2.{name}', 'h2.off')}; {control}"
    met = check_aims(AIMS, measured, notes)
    print(f"total wall time {time.monotonic() - t0:.0f} s")
    return 0 if met else 1


async def get_calls(stubs: dict[str, cache_pb2_grpc.CacheServiceAsyncStub]) -> dict[str, int]:
    """Get calls each gateway served so far (its Stats)."""
    out = {}
    for name, stub in stubs.items():
        stats = await stub.Stats(pb.StatsRequest(), timeout=CALL_TIMEOUT)
        out[name] = sum(r.calls for r in stats.rpcs if r.method == "Get")
    return out


def received_spans(log: str) -> dict[str, int]:
    """The receiver's closing lines: `received <instance> <spans> <calls>`."""
    out = {}
    for line in log.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "received":
            out[parts[1]] = int(parts[2])
    return out


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
