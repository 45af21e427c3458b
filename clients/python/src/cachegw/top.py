"""`cachegw top`: a live view of one or more gateways, drawn from their Stats RPC.

Every poll asks each gateway for its counters (in parallel, each bounded by the
timeout); rates, hit rates and p99 are computed from the difference between the last
two answers of a gateway (its own uptime is the clock), so they describe the last
interval, not the time since start. The first frame, with nothing to subtract, shows
figures since the gateway started. Needs rich (``pip install 'cachegw[top]'``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cachegw._security import Bearer, TLSConfig, TokenSource, bearer, resolve_tls, sync_channel
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc

__all__ = ["Reading", "TopView", "poll", "run"]

# RPCs that are traffic (Stats is the viewer itself, Subscribe a long-lived stream).
_TRAFFIC_EXCLUDED = frozenset({"Stats", "Subscribe"})


@dataclass(frozen=True)
class Reading:
    """One poll of one gateway: its Stats answer, or why there is none."""

    target: str
    stats: pb.StatsResponse | None
    error: str = ""


def poll(
    stubs: dict[str, cache_pb2_grpc.CacheServiceStub],
    timeout: float,
    top_keys: int,
    bearer: Bearer | None = None,
) -> list[Reading]:
    """Stats of every target, asked in parallel (with the token of `bearer`, if any)."""
    request = pb.StatsRequest(top_keys=top_keys)
    metadata = bearer.metadata() if bearer is not None else None
    futures = {
        t: stub.Stats.future(request, timeout=timeout, metadata=metadata)
        for t, stub in stubs.items()
    }
    readings = []
    for target, future in futures.items():
        try:
            readings.append(Reading(target, future.result()))
        except grpc.RpcError as exc:
            readings.append(Reading(target, None, f"{exc.code().name}: {exc.details()}"))
    return readings


def quantile(bounds_ms: Sequence[float], buckets: Sequence[int], q: float) -> float:
    """Estimated q-quantile in ms from histogram buckets (see the gateway's latency.py)."""
    total = sum(buckets)
    if total == 0:
        return math.nan
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i >= len(bounds_ms):
                return bounds_ms[-1]
            lo = bounds_ms[i - 1] if i else 0.0
            return lo + (bounds_ms[i] - lo) * max(0.0, rank - seen) / count
        seen += count
    return bounds_ms[-1] if bounds_ms else math.nan


@dataclass
class _Window:
    """What changed between two readings of one gateway, over `seconds`."""

    now: pb.StatsResponse
    before: pb.StatsResponse | None
    seconds: float

    def delta(self, now: int, before: int) -> int:
        return now - before if self.before is not None else now

    def rate(self, now: int, before: int) -> float:
        return self.delta(now, before) / self.seconds if self.seconds > 0 else math.nan


def _window(now: pb.StatsResponse, before: pb.StatsResponse | None) -> _Window:
    if before is not None and (
        before.gateway_id != now.gateway_id or before.uptime_ms >= now.uptime_ms
    ):
        before = None  # restarted or a different gateway behind the address
    start = before.uptime_ms if before is not None else 0
    return _Window(now, before, (now.uptime_ms - start) / 1000)


@dataclass
class TopView:
    """The last two readings of each target, and the frame drawn from them."""

    targets: list[str]
    hot_keys: int = 5
    _last: dict[str, Reading] = field(default_factory=dict)
    _previous: dict[str, pb.StatsResponse] = field(default_factory=dict)

    def update(self, readings: Sequence[Reading]) -> None:
        for reading in readings:
            old = self._last.get(reading.target)
            if old is not None and old.stats is not None:
                self._previous[reading.target] = old.stats
            self._last[reading.target] = reading

    def render(self) -> RenderableType:
        gateways = Table(title="cachegw gateways", title_justify="left", expand=False)
        for name, justify in [
            ("target", "left"), ("gateway", "left"), ("uptime", "right"), ("QPS", "right"),
            ("hit %", "right"), ("p99 Get", "right"), ("p99 all", "right"),
            ("L1 bytes", "right"), ("L1 entries", "right"), ("evict/s", "right"),
            ("coalesced/s", "right"), ("subs", "right"), ("redis", "left"),
        ]:  # fmt: skip
            gateways.add_column(name, justify=justify)  # type: ignore[arg-type]
        classes = Table(title="per class", title_justify="left")
        for name in ("gateway", "class", "reads/s", "hit %", "L1 %", "L2 %", "miss/s",
                     "lease waits/s", "lease timeouts/s"):  # fmt: skip
            classes.add_column(name, justify="left" if name in ("gateway", "class") else "right")
        behind = Table(
            title="write-behind (backlog and lag: the whole journal)", title_justify="left"
        )
        for name in ("gateway", "class", "journaled/s", "flushed/s", "origin calls/s",
                     "retries/s", "backlog", "lag", "dead letters"):  # fmt: skip
            behind.add_column(name, justify="left" if name in ("gateway", "class") else "right")
        hot = Table(title="hot keys", title_justify="left")
        for name in ("gateway", "key", "count"):
            hot.add_column(name, justify="right" if name == "count" else "left")

        for target in self.targets:
            reading = self._last.get(target)
            if reading is None or reading.stats is None:
                error = reading.error if reading is not None else "no answer yet"
                gateways.add_row(target, Text(error, style="bold red"), *[""] * 11)
                continue
            w = _window(reading.stats, self._previous.get(target))
            gateways.add_row(target, *self._gateway_cells(w))
            for c in w.now.classes:
                if _hits_reads(c)[1] == 0 and not c.sets:
                    continue  # a class nobody used yet: keep the table short
                classes.add_row(w.now.gateway_id, c.name, *self._class_cells(w, c))
            for c in w.now.classes:
                if c.wb_journaled or c.wb_flushed or c.wb_backlog:
                    behind.add_row(w.now.gateway_id, c.name, *self._behind_cells(w, c))
            for h in w.now.hot_keys[: self.hot_keys]:
                hot.add_row(w.now.gateway_id, h.key, f"{h.count:,}")
        workers = self._workers_table()
        supervised = [
            r.target
            for r in (self._last.get(t) for t in self.targets)
            if r is not None and r.stats is not None and r.stats.workers
        ]
        if supervised:
            gateways.caption = (
                f"{', '.join(supervised)}: worker processes share the port; the row above "
                "is the worker the connection reached, every worker is under 'workers' "
                "(the deployment's totals are on the supervisor's /metrics)"
            )
            gateways.caption_justify = "left"
        parts: list[RenderableType] = [gateways]
        if workers.row_count:
            parts.append(workers)
        parts.append(classes)
        if behind.row_count:
            parts.append(behind)
        if hot.row_count:
            parts.append(hot)
        return Group(*parts)

    def _workers_table(self) -> Table:
        """One row per worker process of each target under a supervisor, from the
        summaries its Stats answer carries (StatsResponse.worker_summaries)."""
        table = Table(title="workers", title_justify="left")
        for name in ("target", "worker", "pid", "state", "restarts", "calls/s", "in flight",
                     "L1 entries", "L1 bytes", "RSS", "uptime"):  # fmt: skip
            table.add_column(name, justify="left" if name in ("target", "state") else "right")
        for target in self.targets:
            reading = self._last.get(target)
            if reading is None or reading.stats is None:
                continue
            before = self._previous.get(target)
            old = {w.index: w for w in before.worker_summaries} if before is not None else {}
            for w in reading.stats.worker_summaries:
                table.add_row(target, *_worker_cells(w, old.get(w.index)))
        return table

    # -- cells ---------------------------------------------------------------------------

    def _gateway_cells(self, w: _Window) -> list[str | Text]:
        now, before = w.now, w.before
        old_rpcs = {r.method: r for r in before.rpcs} if before is not None else {}
        calls = sum(
            w.delta(r.calls, old_rpcs[r.method].calls if r.method in old_rpcs else 0)
            for r in now.rpcs
            if r.method not in _TRAFFIC_EXCLUDED
        )
        old_classes = {c.name: c for c in before.classes} if before is not None else {}
        hits = reads = 0
        for c in now.classes:
            o = old_classes.get(c.name)
            c_hits, c_reads = _hits_reads(c)
            o_hits, o_reads = _hits_reads(o) if o is not None else (0, 0)
            hits, reads = hits + w.delta(c_hits, o_hits), reads + w.delta(c_reads, o_reads)
        get_buckets = _bucket_delta(now, before, "Get")
        all_buckets = [0] * (len(now.latency_bounds_ms) + 1)
        for r in now.rpcs:
            if r.method not in _TRAFFIC_EXCLUDED:
                for i, n in enumerate(_bucket_delta(now, before, r.method)):
                    all_buckets[i] += n
        l1 = now.l1
        b_old = before.l1.evictions if before is not None else 0
        co_old = before.coalesced if before is not None else 0
        redis = (
            Text(f"up {now.redis.ping_ms:.1f} ms", style="green")
            if now.redis.up
            else Text("DOWN", style="bold red")
        )
        # On a Redis Cluster: which nodes' breakers (the others are closed).
        open_nodes = sorted(now.redis.breaker_nodes)
        nodes = f" ({', '.join(open_nodes)})" if open_nodes else ""
        if now.redis.breaker_state == pb.BREAKER_STATE_OPEN:
            redis.append(f" breaker OPEN{nodes}", style="bold red")
        elif now.redis.breaker_state == pb.BREAKER_STATE_HALF_OPEN:
            redis.append(f" breaker half-open{nodes}", style="yellow")
        if now.redis.errors:
            redis.append(f" ({now.redis.errors:,} errors)")
        worker = f" (worker {now.worker_index} of {now.workers})" if now.workers else ""
        return [
            now.gateway_id + worker,
            _duration(now.uptime_ms / 1000),
            _number(calls / w.seconds if w.seconds > 0 else math.nan),
            _percent(hits, reads),
            _ms(quantile(now.latency_bounds_ms, get_buckets, 0.99)),
            _ms(quantile(now.latency_bounds_ms, all_buckets, 0.99)),
            _fill(l1.bytes, l1.max_bytes, _size(l1.max_bytes)),
            _fill(l1.entries, l1.max_entries, f"{l1.max_entries:,}"),
            _number(w.rate(l1.evictions, b_old)),
            _number(w.rate(now.coalesced, co_old)),
            f"{now.subscribers:,}",
            redis,
        ]

    def _class_cells(self, w: _Window, c: pb.ClassStats) -> list[str]:
        o = {x.name: x for x in w.before.classes}.get(c.name) if w.before is not None else None

        def d(field_name: str) -> int:
            return w.delta(getattr(c, field_name), getattr(o, field_name) if o else 0)

        hits, reads = _hits_reads(c)
        ohits, oreads = _hits_reads(o) if o is not None else (0, 0)
        dreads = w.delta(reads, oreads)
        per_s = (lambda n: n / w.seconds) if w.seconds > 0 else (lambda n: math.nan)
        return [
            _number(per_s(dreads)),
            _percent(w.delta(hits, ohits), dreads),
            _percent(d("hits_l1"), dreads),
            _percent(d("hits_l2"), dreads),
            _number(per_s(d("misses"))),
            _number(per_s(d("lease_waits"))),
            _number(per_s(d("lease_wait_timeouts"))),
        ]

    def _behind_cells(self, w: _Window, c: pb.ClassStats) -> list[str]:
        o = {x.name: x for x in w.before.classes}.get(c.name) if w.before is not None else None

        def per_s(field_name: str) -> str:
            n = w.delta(getattr(c, field_name), getattr(o, field_name) if o else 0)
            return _number(n / w.seconds if w.seconds > 0 else math.nan)

        return [
            per_s("wb_journaled"),
            per_s("wb_flushed"),
            per_s("wb_origin_calls"),
            per_s("wb_retries"),
            f"{c.wb_backlog:,}",
            f"{c.wb_lag_ms / 1000:.1f} s",
            f"{c.wb_dead_lettered:,}",
        ]


def _worker_cells(w: pb.WorkerSummary, before: pb.WorkerSummary | None) -> list[str | Text]:
    if not w.pid:
        state = Text("restarting", style="bold red")
    elif not w.serving:
        state = Text("starting", style="yellow")
    elif not w.answered:
        state = Text("no answer", style="yellow")
    else:
        state = Text("serving", style="green")
    if not w.answered:
        return [str(w.index), str(w.pid or "-"), state, f"{w.restarts:,}", *["-"] * 6]
    # Rates over the time between two summaries of the same process (its own uptime).
    same = before is not None and before.answered and before.pid == w.pid
    if before is not None and same and before.uptime_ms < w.uptime_ms:
        calls = (w.calls - before.calls) / ((w.uptime_ms - before.uptime_ms) / 1000)
    elif before is not None and same:
        calls = math.nan  # the same figures as last time (the supervisor's half-second cache)
    else:
        calls = w.calls / (w.uptime_ms / 1000) if w.uptime_ms > 0 else math.nan
    return [
        str(w.index),
        str(w.pid),
        state,
        f"{w.restarts:,}",
        _number(calls),
        f"{w.rpcs_in_flight:,}",
        f"{w.l1_entries:,}",
        _size(w.l1_bytes),
        _size(w.rss_bytes),
        _duration(w.uptime_ms / 1000),
    ]


def _hits_reads(c: pb.ClassStats) -> tuple[int, int]:
    hits = c.hits_l1 + c.hits_l2 + c.stale
    return hits, hits + c.misses


def _bucket_delta(now: pb.StatsResponse, before: pb.StatsResponse | None, method: str) -> list[int]:
    cur = next((list(r.latency_buckets) for r in now.rpcs if r.method == method), [])
    if before is None:
        return cur
    old = next((list(r.latency_buckets) for r in before.rpcs if r.method == method), [])
    if len(old) != len(cur):
        return cur
    return [a - b for a, b in zip(cur, old, strict=True)]


def _number(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:,.0f}" if x >= 10 else f"{x:,.1f}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f} ms"


def _fill(used: int, limit: int, shown: str) -> str:
    if not limit:
        return f"{used:,}"
    share = 100 * used / limit
    return f"{share:.1f}% of {shown}" if share < 10 else f"{share:.0f}% of {shown}"


def _size(n: int) -> str:
    """Bytes in binary units: 268435456 -> 256M."""
    for unit in ("", "K", "M"):
        if n < 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}G"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def run(
    targets: Sequence[str],
    *,
    interval: float = 2.0,
    count: int = 0,
    timeout: float = 2.0,
    hot_keys: int = 5,
    console: Console | None = None,
    tls: TLSConfig | bool | None = None,
    token: TokenSource = None,
) -> int:
    """Draw the view until Ctrl-C, or `count` frames (0 = no limit); one frame without a
    live screen when `count` is 1 or the output is not a terminal. `tls` and `token` as
    for `cachegw.Client`, the same for every target."""
    console = console or Console()
    settings = resolve_tls(tls)
    auth = None
    for t in targets:  # each is checked: over plaintext a token goes to loopback only
        auth = bearer(token, target=t, secure=settings is not None)
    channels = {t: sync_channel(t, settings, ()) for t in targets}
    try:
        stubs = {t: cache_pb2_grpc.CacheServiceStub(ch) for t, ch in channels.items()}
        view = TopView(list(targets), hot_keys)
        if count == 1 or not console.is_terminal:
            frames = max(count, 1)
            for i in range(frames):
                if i:
                    time.sleep(interval)
                view.update(poll(stubs, timeout, hot_keys, auth))
            console.print(view.render())
            return 0
        view.update(poll(stubs, timeout, hot_keys, auth))
        with Live(view.render(), console=console, auto_refresh=False) as live:
            frame = 1
            while count == 0 or frame < count:
                time.sleep(interval)
                view.update(poll(stubs, timeout, hot_keys, auth))
                live.update(view.render(), refresh=True)
                frame += 1
        return 0
    finally:
        for channel in channels.values():
            channel.close()
