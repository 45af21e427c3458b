"""The load the chaos routines serve while they break things, and what it saw.

Each gateway has one writer, which owns its own keys and writes them one at a time with
increasing sequence numbers (the value is the number), and readers that Get any key
through their gateway. Every call is recorded (gateway, operation, start, end, status),
and every read with the sequence number it returned, so that afterwards:

- errors are counted by status within any time window;
- a read is *stale beyond b* when, before the read started, a write of a newer number
  of that key had been acknowledged more than b seconds earlier. A MISS is never stale
  (a lost node loses data: that is a miss, not an old value).

One writer per key makes "newer" well defined: its writes are sequential, and a write
that failed without an answer may have been applied (a higher number), never a lower.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc

OK = "OK"


@dataclass
class Gateway:
    name: str
    address: str
    channel: grpc.aio.Channel
    stub: cache_pb2_grpc.CacheServiceAsyncStub

    @classmethod
    def connect(cls, name: str, address: str) -> Gateway:
        channel = grpc.aio.insecure_channel(address)
        return cls(name, address, channel, cache_pb2_grpc.CacheServiceStub(channel))


@dataclass(slots=True)
class Call:
    gw: int
    op: str
    start: float
    end: float
    code: str


@dataclass(slots=True)
class Read:
    gw: int
    start: float
    key: str
    seq: int  # -1: a MISS


@dataclass
class Ledger:
    """Acknowledged writes per key, in order: (ack time, sequence number)."""

    acks: dict[str, tuple[list[float], list[int]]] = field(default_factory=dict)

    def ack(self, key: str, seq: int, at: float) -> None:
        times, seqs = self.acks.setdefault(key, ([], []))
        times.append(at)
        seqs.append(seq)

    def newest_before(self, key: str, t: float) -> int:
        """The newest number of `key` acknowledged before `t` (-1: none)."""
        times, seqs = self.acks.get(key, ((), ()))
        i = bisect.bisect_left(times, t)
        return seqs[i - 1] if i else -1


@dataclass(frozen=True)
class Window:
    """What the load saw between two moments."""

    calls: int
    errors: Counter[str]
    gets: int
    get_p50_ms: float
    get_p99_ms: float
    over_deadline: int  # calls that ended later than their deadline plus slack

    def errors_text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "0"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values.sort()
    return values[min(len(values) - 1, round((len(values) - 1) * q / 100))]


class Load:
    """Writers and readers on every gateway until stop(); all in this event loop."""

    def __init__(
        self,
        gateways: Sequence[Gateway],
        *,
        keys_per_writer: int = 20,
        readers_per_gateway: int = 2,
        deadline: float = 1.5,
        pause: float = 0.004,
        slack: float = 1.0,
    ) -> None:
        self.gateways = list(gateways)
        self.deadline = deadline
        self.slack = slack
        self._pause = pause
        self._readers = readers_per_gateway
        self.keys = [[f"hot:{g}:{j}" for j in range(keys_per_writer)] for g in range(len(gateways))]
        self._all_keys = [k for ks in self.keys for k in ks]
        self.ledger = Ledger()
        self.calls: list[Call] = []
        self.reads: list[Read] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._rand = random.Random(7)

    def start(self) -> None:
        for g in range(len(self.gateways)):
            self._tasks.append(asyncio.create_task(self._writer(g)))
            for _ in range(self._readers):
                self._tasks.append(asyncio.create_task(self._reader(g)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait(self._tasks, timeout=self.deadline + 5)

    async def _writer(self, g: int) -> None:
        stub, keys = self.gateways[g].stub, self.keys[g]
        seqs = dict.fromkeys(keys, 0)
        i = 0
        while not self._stop.is_set():
            key = keys[i % len(keys)]
            i += 1
            seqs[key] += 1
            seq = seqs[key]
            start = time.monotonic()
            code = OK
            try:
                await stub.Set(pb.SetRequest(key=key, value=b"%d" % seq), timeout=self.deadline)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            end = time.monotonic()
            if code == OK:
                self.ledger.ack(key, seq, end)
            self.calls.append(Call(g, "Set", start, end, code))
            await asyncio.sleep(self._pause)

    async def _reader(self, g: int) -> None:
        stub = self.gateways[g].stub
        while not self._stop.is_set():
            key = self._rand.choice(self._all_keys)
            start = time.monotonic()
            code = OK
            try:
                got = await stub.Get(pb.GetRequest(key=key), timeout=self.deadline)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            end = time.monotonic()
            self.calls.append(Call(g, "Get", start, end, code))
            if code == OK:
                seq = int(got.value) if got.status == pb.STATUS_HIT else -1
                self.reads.append(Read(g, start, key, seq))
            await asyncio.sleep(self._pause)

    # -- what it saw -------------------------------------------------------------------------

    def window(self, since: float, until: float, gws: Sequence[int] | None = None) -> Window:
        calls = [c for c in self.calls if since <= c.start < until and (gws is None or c.gw in gws)]
        gets = [(c.end - c.start) * 1000 for c in calls if c.op == "Get"]
        n_gets = len(gets)
        return Window(
            calls=len(calls),
            errors=Counter(c.code for c in calls if c.code != OK),
            gets=n_gets,
            get_p50_ms=_pct(gets, 50),
            get_p99_ms=_pct(gets, 99),
            over_deadline=sum(1 for c in calls if c.end - c.start > self.deadline + self.slack),
        )

    def stale(self, since: float, until: float, bound: float) -> int:
        """Reads started in [since, until) that were stale beyond `bound` seconds."""
        return sum(
            1
            for r in self.reads
            if since <= r.start < until
            and 0 <= r.seq < self.ledger.newest_before(r.key, r.start - bound)
        )

    def first_ok(self, op: str, g: int, after: float) -> float | None:
        """When the first successful `op` sent at `g` after `after` ended."""
        oks = [
            c.end
            for c in self.calls
            if c.gw == g and c.op == op and c.start >= after and c.code == OK
        ]
        return min(oks) if oks else None


async def probe(gateways: Sequence[Gateway], n: int, deadline: float = 1.5) -> str:
    """The data plane works end to end: every gateway writes, reads from L1 (which it
    fills only while its invalidation subscription is live), and sees within a second
    a value another gateway rewrote. One attempt: "" when it passed, else what failed."""
    key = f"probe:{n}"
    step = "Set"
    try:
        await gateways[0].stub.Set(pb.SetRequest(key=key, value=b"1"), timeout=deadline)
        for gw in gateways:
            step = f"Get at {gw.name}"
            for _ in range(2):
                got = await gw.stub.Get(pb.GetRequest(key=key), timeout=deadline)
            if got.value != b"1":
                return f"{gw.name} read {got.value!r} for 1"
            if got.tier != pb.TIER_L1:
                return f"{gw.name} did not fill L1 (its subscription is not live)"
        step = "rewrite"
        await gateways[-1].stub.Set(pb.SetRequest(key=key, value=b"2"), timeout=deadline)
        until = time.monotonic() + 1.0
        for gw in gateways:
            step = f"Get at {gw.name}"
            while True:
                got = await gw.stub.Get(pb.GetRequest(key=key), timeout=deadline)
                if got.value == b"2":
                    break
                if time.monotonic() > until:
                    return f"{gw.name} still read {got.value!r} 1 s after the rewrite"
                await asyncio.sleep(0.01)
        for gw in gateways:
            step = f"Set at {gw.name}"
            await gw.stub.Set(pb.SetRequest(key=f"{key}:{gw.name}", value=b"w"), timeout=deadline)
    except grpc.aio.AioRpcError as exc:
        return f"{step}: {exc.code().name}"
    return ""


_probes = iter(range(1, 1 << 62))


@dataclass
class Recovery:
    at: float | None  # when the probe passed (monotonic), None: not within the bound
    failures: Counter[str] = field(default_factory=Counter)  # failed attempts, by reason


async def wait_recovered(gateways: Sequence[Gateway], within: float) -> Recovery:
    """Probe until it passes, at most `within` seconds."""
    deadline = time.monotonic() + within
    out = Recovery(None)
    while time.monotonic() < deadline:
        failed = await probe(gateways, next(_probes))
        if not failed:
            out.at = time.monotonic()
            return out
        out.failures[failed] += 1
        await asyncio.sleep(0.1)
    return out
