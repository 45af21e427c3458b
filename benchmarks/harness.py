"""Generic pieces for the benchmarks in this folder.

- percentiles and medians of latency samples;
- bounded measurement loops, asyncio (N tasks sharing one client) and sync;
- interleaved rounds (A, B, C, A, B, C, ...) and per-round ratios, reported as medians,
  because the machines we run on are small and noisy: only ratios measured in one run
  mean anything;
- server processes started the way a user starts them, ready when standard gRPC health
  says SERVING, always stopped (SIGTERM, then SIGKILL);
- a plain-text table.

Nothing here knows about cachegw; a benchmark script assembles these.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachegw_gateway.managed_redis import free_port

# -- statistics -----------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linearly interpolated."""
    if not sorted_values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100 (got {q})")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement of one case: how many operations in how long, and each latency.

    CPU figures are seconds of CPU used during the measured part (warm-up excluded) by
    this process (`client_cpu_s`) and by the target process (`server_cpu_s`, NaN when
    not probed).
    """

    ops: int
    seconds: float
    latencies_ns: Sequence[int]
    # Items per operation (e.g. keys per batch), for items/s.
    items_per_op: int = 1
    client_cpu_s: float = math.nan
    server_cpu_s: float = math.nan

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else math.nan

    @property
    def items_per_s(self) -> float:
        return self.ops_per_s * self.items_per_op

    def latency_us(self, q: float) -> float:
        return percentile(sorted(self.latencies_ns), q) / 1000

    @property
    def client_cpu_us_per_op(self) -> float:
        return self.client_cpu_s * 1e6 / self.ops if self.ops else math.nan

    @property
    def server_cpu_us_per_op(self) -> float:
        return self.server_cpu_s * 1e6 / self.ops if self.ops else math.nan


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over rounds of one case's per-round figures."""

    rounds: int
    ops_per_s: float
    items_per_s: float
    p50_us: float
    p99_us: float
    client_cpu_us_per_op: float
    server_cpu_us_per_op: float


def summarize(samples: Sequence[Sample]) -> Summary:
    return Summary(
        rounds=len(samples),
        ops_per_s=median([s.ops_per_s for s in samples]),
        items_per_s=median([s.items_per_s for s in samples]),
        p50_us=median([s.latency_us(50) for s in samples]),
        p99_us=median([s.latency_us(99) for s in samples]),
        client_cpu_us_per_op=median([s.client_cpu_us_per_op for s in samples]),
        server_cpu_us_per_op=median([s.server_cpu_us_per_op for s in samples]),
    )


def round_ratios(numerator: Sequence[Sample], denominator: Sequence[Sample]) -> list[float]:
    """The throughput ratio numerator/denominator of each round, paired by round."""
    return [
        a.ops_per_s * a.items_per_op / (b.ops_per_s * b.items_per_op)
        for a, b in zip(numerator, denominator, strict=True)
        if b.ops_per_s > 0
    ]


def median_ratio(numerator: Sequence[Sample], denominator: Sequence[Sample]) -> float:
    """Median over rounds of the throughput ratio numerator/denominator, paired by round.

    Pairing by round cancels slow drifts of the machine that hit both cases alike.
    """
    return median(round_ratios(numerator, denominator))


# -- CPU accounting -------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """CPU time used so far by every thread of process `pid` (Linux /proc; NaN elsewhere).

    Sums the nanosecond run times of /proc/PID/task/*/schedstat; falls back to the
    clock-tick utime+stime of /proc/PID/stat.
    """
    total_ns = 0
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            try:
                with open(f"{task.path}/schedstat") as f:
                    total_ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that just exited
        if total_ns:
            return total_ns / 1e9
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


class CpuMeter:
    """CPU used by this process and (optionally) one other process between marks."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self._own = 0.0
        self._other = math.nan

    def _read(self) -> tuple[float, float]:
        other = process_cpu_seconds(self.pid) if self.pid is not None else math.nan
        return time.process_time(), other

    def start(self) -> None:
        self._own, self._other = self._read()

    def stop(self) -> tuple[float, float]:
        own, other = self._read()
        return own - self._own, other - self._other


# -- measurement loops ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budget:
    """How long one measurement runs: a warm-up, then `seconds`, never more than `max_ops`.

    `timeout` bounds the wall time of one measurement whatever the target does.
    """

    seconds: float
    warmup_seconds: float
    max_ops: int = 5_000_000
    timeout: float = 60.0


async def measure_async(
    call: Callable[[], Awaitable[object]],
    concurrency: int,
    budget: Budget,
    items_per_op: int = 1,
    server_pid: int | None = None,
) -> Sample:
    """`concurrency` tasks each awaiting `call()` in a loop, sharing whatever `call` uses.

    With `server_pid`, that process's CPU time over the measured part is recorded too.
    """
    if budget.warmup_seconds > 0:
        await _run_tasks(call, concurrency, budget.warmup_seconds, budget.max_ops, budget.timeout)
    gc.collect()
    meter = CpuMeter(server_pid)
    meter.start()
    latencies, seconds = await _run_tasks(
        call, concurrency, budget.seconds, budget.max_ops, budget.timeout
    )
    own, other = meter.stop()
    return Sample(len(latencies), seconds, latencies, items_per_op, own, other)


async def _run_tasks(
    call: Callable[[], Awaitable[object]],
    concurrency: int,
    seconds: float,
    max_ops: int,
    limit: float,
) -> tuple[list[int], float]:
    latencies: list[int] = []
    record = latencies.append
    clock = time.perf_counter_ns
    per_task = max(1, max_ops // concurrency)
    start = clock()
    deadline = start + int(seconds * 1e9)

    async def worker() -> None:
        for _ in range(per_task):
            t0 = clock()
            await call()
            t1 = clock()
            record(t1 - t0)
            if t1 >= deadline:
                return

    async with asyncio.timeout(seconds + limit):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, (clock() - start) / 1e9


def measure_sync(
    call: Callable[[], object],
    budget: Budget,
    items_per_op: int = 1,
    server_pid: int | None = None,
) -> Sample:
    """`call()` in a loop on this thread (concurrency 1)."""
    if budget.warmup_seconds > 0:
        _run_sync(call, budget.warmup_seconds, budget.max_ops)
    gc.collect()
    meter = CpuMeter(server_pid)
    meter.start()
    latencies, seconds = _run_sync(call, budget.seconds, budget.max_ops)
    own, other = meter.stop()
    return Sample(len(latencies), seconds, latencies, items_per_op, own, other)


def _run_sync(call: Callable[[], object], seconds: float, max_ops: int) -> tuple[list[int], float]:
    latencies: list[int] = []
    record = latencies.append
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    for _ in range(max_ops):
        t0 = clock()
        call()
        t1 = clock()
        record(t1 - t0)
        if t1 >= deadline:
            break
    return latencies, (clock() - start) / 1e9


# -- interleaved rounds ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """A named measurement; `run` performs one (warm-up included) and returns it."""

    name: str
    run: Callable[[], Sample]


@dataclass(slots=True)
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def summary(self, name: str) -> Summary:
        return summarize(self.samples[name])

    def ratio(self, numerator: str, denominator: str) -> float:
        return median_ratio(self.samples[numerator], self.samples[denominator])

    def spread(self, numerator: str, denominator: str) -> str:
        """The lowest and highest per-round ratio, e.g. "rounds 0.81-1.07"."""
        ratios = round_ratios(self.samples[numerator], self.samples[denominator])
        return f"rounds {min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""


def run_interleaved(
    cases: Sequence[Case],
    rounds: int,
    progress: Callable[[int, Case, Sample], None] | None = None,
    rotate: bool = False,
) -> Results:
    """Each round runs every case once, in the given order: A, B, C, A, B, C, ...

    With `rotate`, round r starts at case r: A, B, C, B, C, A, C, A, B, ..., so that no
    case always runs right after the same one (a case can leave work behind, e.g. a
    batch of spans still being exported). `progress` is called after every case."""
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique: {names}")
    results = Results({c.name: [] for c in cases})
    for r in range(rounds):
        shift = r % len(cases) if rotate and cases else 0
        for case in [*cases[shift:], *cases[:shift]]:
            sample = case.run()
            results.samples[case.name].append(sample)
            if progress is not None:
                progress(r, case, sample)
    return results


# -- processes ------------------------------------------------------------------------


def wait_serving(
    address: str,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll standard gRPC health (overall service "") until SERVING, at most `timeout` s;
    over TLS with `credentials`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError(f"the server for {address} exited before it was SERVING")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{address} not SERVING after {timeout}s: {last}")


class ServerProcess:
    """A gRPC server run as its own process; `start()` returns once health says SERVING.

    Output goes to `log`. The child gets its own session, so a Ctrl-C in the terminal
    reaches only the benchmark, which then stops the child itself.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        address: str,
        log: Path,
        env: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.name = name
        self.credentials = credentials  # for the health check of a TLS port
        self.argv = list(argv)
        self.address = address
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.proc.pid

    def start(self, ready_timeout: float = 30.0) -> ServerProcess:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        try:
            wait_serving(
                self.address,
                ready_timeout,
                alive=lambda: self.running,
                credentials=self.credentials,
            )
        except BaseException as exc:
            self.stop()
            if not isinstance(exc, KeyboardInterrupt):
                tail = self.log.read_text(errors="replace")[-2000:]
                print(f"--- {self.name} output ({self.log}) ---\n{tail}", file=sys.stderr)
            raise
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Safe to call more than once."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks stop child processes."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def python_env(*paths: Path) -> dict[str, str]:
    """os.environ with `paths` in front of PYTHONPATH."""
    env = dict(os.environ)
    parts = [str(p) for p in paths]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


# -- output ---------------------------------------------------------------------------


def fmt_number(value: float, digits: int = 0) -> str:
    """A number with thousands separators; '-' for NaN."""
    if math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: str = "") -> str:
    """A plain table. `right` holds one character per column: 'r' right-aligns it.

    A row that is empty draws a separator line.
    """
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            align_right = i < len(right) and right[i] == "r"
            out.append(cell.rjust(widths[i]) if align_right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(headers), rule]
    for row in rows:
        lines.append(rule if not row else line(row))
    return "\n".join(lines)


def start_gateways(
    stack: ExitStack, n: int, redis_url: str, config_toml: str, work: Path
) -> list[ServerProcess]:
    """`n` `cachegw serve` processes on free ports sharing `redis_url`, stopped by `stack`."""
    config = work / "gateways.toml"
    config.write_text(config_toml)
    gateways = []
    for i in range(n):
        address = f"127.0.0.1:{free_port()}"
        argv = [
            str(Path(sys.executable).parent / "cachegw"), "serve", "--listen", address,
            "--redis-url", redis_url, "--config", str(config), "--gateway-id", f"gw{i}",
            "--log-level", "WARNING",
        ]  # fmt: skip
        gateways.append(
            stack.enter_context(ServerProcess(f"gw{i}", argv, address, work / f"gw{i}.log"))
        )
    return gateways


# -- aims -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Aim:
    """What a benchmark promises: `figure` compared with `threshold` by `op`.

    Scripts define their aims in a table near the top; `check_aims` prints met / NOT met
    per aim and says whether all were met (the script then exits 1 if not).
    """

    name: str
    figure: str
    op: str  # ">=", "<=", "==" (a count) or "<"
    threshold: float
    unit: str = "x"

    def met(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.op == ">=":
            return value >= self.threshold
        if self.op == "<=":
            return value <= self.threshold
        if self.op == "<":
            return value < self.threshold
        if self.op == "==":
            return value == self.threshold
        raise ValueError(f"unknown comparison {self.op!r}")


def _fmt_figure(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "count":
        return f"{value:g}"
    if unit == "":
        return f"{value:.2f}"
    return f"{value:.2f} {unit}"


def check_aims(
    aims: Sequence[Aim], measured: dict[str, float], notes: dict[str, str] | None = None
) -> bool:
    """Print the aims table; True when every measured aim is met.

    An aim missing from `measured` was not run (excluded by --only, or impossible here:
    `notes` says why) and is shown as "not measured", which does not fail the run.
    """
    notes = notes or {}
    rows = []
    all_met = True
    for aim in aims:
        wanted = f"{aim.op} {_fmt_figure(aim.threshold, aim.unit)}"
        value = measured.get(aim.name)
        if value is None:
            verdict, shown = "not measured", "-"
        else:
            ok = aim.met(value)
            all_met &= ok
            verdict, shown = ("met" if ok else "NOT met"), _fmt_figure(value, aim.unit)
        row = [aim.name, aim.figure, shown, wanted, verdict]
        if notes:
            row.append(notes.get(aim.name, ""))
        rows.append(row)
    headers = ["aim", "figure", "measured", "aim", "verdict"] + (["note"] if notes else [])
    print("\naims")
    print(render_table(headers, rows, right="llrrll"))
    print("all aims met" if all_met else "some aims NOT met (exit status 1)")
    return all_met
