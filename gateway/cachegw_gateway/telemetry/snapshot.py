"""One read of every figure a gateway keeps, taken on its event loop.

The Prometheus endpoint and the Stats RPC both answer from a `Snapshot`, so they always
agree. Taking one copies a few dozen integers and the L1's `stats()`; nothing on the
request path changes for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.origin import Origins
from cachegw_gateway.stats import ClassCounters, GatewayStats
from cachegw_gateway.telemetry.latency import BOUNDS, RpcLatency
from cachegw_gateway.validation import InvalidRequest
from cachegw_native.coalescer import Coalescer
from cachegw_native.hotkeys import HotKeys
from cachegw_native.l1 import L1Cache

# GatewayStats fields that are gauges (a level now); every other int field is a count.
GAUGE_FIELDS = frozenset(
    {
        "subscribers",
        "redis_up",
        "breaker_state",
        "rpcs_in_flight",
        "warmups_running",
        "auth_credentials",
    }
)
# GatewayStats.breaker_state (breaker.py: -1 none, 0 closed, 1 open, 2 half-open) on the wire.
_BREAKER_STATES = {
    0: pb.BREAKER_STATE_CLOSED,
    1: pb.BREAKER_STATE_OPEN,
    2: pb.BREAKER_STATE_HALF_OPEN,
}
_NOT_FIGURES = frozenset({"classes", "started_at", "error_replies", "breaker_nodes"})
MAX_TOP_KEYS = 1000


@dataclass(frozen=True, slots=True)
class RpcFigures:
    buckets: tuple[int, ...]
    total_seconds: float
    errors: dict[str, int]

    @property
    def calls(self) -> int:
        return sum(self.buckets)


@dataclass(frozen=True, slots=True)
class Snapshot:
    gateway_id: str
    uptime_seconds: float
    classes: dict[str, dict[str, int]]  # class -> ClassCounters fields
    gateway: dict[str, int]  # GatewayStats counters and gauges (redis_up as 0/1)
    l1: dict[str, int]  # L1Cache.stats()
    coalesced: int
    redis_reads: int
    redis_ping_seconds: float
    rpcs: dict[str, RpcFigures]
    trace_exporter: str
    sample_ratio: float
    hot_keys: list[tuple[str, int]] = field(default_factory=list)
    redis_error_replies: dict[str, int] = field(default_factory=dict)  # kind -> count
    # Redis Cluster: node -> breaker state (breaker.py), the nodes not closed.
    breaker_nodes: dict[str, int] = field(default_factory=dict)
    # The process: resident memory, open file descriptors, asyncio tasks (a soak's
    # figures: none of them may grow under steady load).
    process: dict[str, int] = field(default_factory=dict)
    # Origin address -> its breaker's figures (every origin the classes name).
    origins: dict[str, OriginFigures] = field(default_factory=dict)
    # Under a supervisor (`--workers N`): this worker's index and N; 0 workers = none.
    worker_index: int = 0
    workers: int = 0
    pid: int = 0
    # With tenants: tenant -> its quota refusals and L1 use on this gateway (metrics.py
    # exports them with a `tenant` label; never in a tenant's Stats).
    tenants: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class Sources:
    """Where a gateway keeps its figures; `snapshot()` reads them all at once."""

    gateway_id: str
    stats: GatewayStats
    l1: L1Cache
    reads: Coalescer[Any]
    hotkeys: HotKeys
    latency: RpcLatency
    redis_ping_seconds: Callable[[], float]
    trace_exporter: str
    sample_ratio: float
    origins: Origins | None = None
    worker_index: int = 0
    workers: int = 0

    def snapshot(self, top_keys: int = 0) -> Snapshot:
        s = self.stats
        gateway = {
            f.name: int(getattr(s, f.name))
            for f in dataclasses.fields(s)
            if f.name not in _NOT_FIGURES
        }
        rpcs = {
            method: RpcFigures(tuple(h.buckets), h.total_seconds, dict(h.errors))
            for method, h in self.latency.methods.items()
        }
        return Snapshot(
            gateway_id=self.gateway_id,
            uptime_seconds=s.uptime,
            classes={name: c.as_dict() for name, c in s.classes.items()},
            gateway=gateway,
            l1=dict(self.l1.stats()),
            coalesced=self.reads.coalesced,
            redis_reads=self.reads.flights,
            redis_ping_seconds=self.redis_ping_seconds(),
            rpcs=rpcs,
            trace_exporter=self.trace_exporter,
            sample_ratio=self.sample_ratio,
            hot_keys=self.hotkeys.top(min(top_keys, MAX_TOP_KEYS)) if top_keys > 0 else [],
            redis_error_replies=dict(s.error_replies),
            breaker_nodes=dict(s.breaker_nodes),
            process=process_figures(),
            origins=origin_figures(self.origins),
            worker_index=self.worker_index,
            workers=self.workers,
            pid=os.getpid(),
        )


def process_figures() -> dict[str, int]:
    """RSS (bytes), open file descriptors and asyncio tasks of this process, now (Linux
    /proc; 0 where not available). Called on the event loop."""
    out = {"rss_bytes": 0, "open_fds": 0, "asyncio_tasks": 0}
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as statm:
        out["rss_bytes"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError):
        out["open_fds"] = len(os.listdir("/proc/self/fd"))
    with contextlib.suppress(RuntimeError):
        out["asyncio_tasks"] = len(asyncio.all_tasks())
    return out


def hit_rate(counts: dict[str, int]) -> float:
    """Share of reads answered with a value (stale included); 0 with no reads."""
    hits = counts.get("hits_l1", 0) + counts.get("hits_l2", 0) + counts.get("stale", 0)
    reads = hits + counts.get("misses", 0)
    return hits / reads if reads else 0.0


_CLASS_FIELDS = frozenset(f.name for f in dataclasses.fields(ClassCounters))


def stats_response(snap: Snapshot, classes: Sequence[str] = ()) -> pb.StatsResponse:
    """The Stats answer for `snap`, limited to `classes` (none = all).

    Raises InvalidRequest for a class this gateway does not know.
    """
    unknown = [c for c in classes if c not in snap.classes]
    if unknown:
        raise InvalidRequest(
            f"classes: unknown class {unknown[0]!r}; this gateway has "
            f"{', '.join(sorted(snap.classes))}"
        )
    wanted = list(classes) if classes else sorted(snap.classes)
    g, l1 = snap.gateway, snap.l1
    resp = pb.StatsResponse(
        gateway_id=snap.gateway_id,
        uptime_ms=int(snap.uptime_seconds * 1000),
        envelope_mismatches=g.get("envelope_mismatches", 0),
        coalesced=snap.coalesced,
        redis_reads=snap.redis_reads,
        invalidations_published=g.get("invalidations_published", 0),
        invalidations_received=g.get("invalidations_received", 0),
        l1_flushes=g.get("l1_flushes", 0),
        subscribers=g.get("subscribers", 0),
        subscriber_resets=g.get("subscriber_resets", 0),
        redis=pb.RedisStats(
            up=bool(g.get("redis_up", 0)),
            ping_ms=snap.redis_ping_seconds * 1000,
            errors=g.get("redis_errors", 0),
            reconnects=g.get("redis_reconnects", 0),
            error_replies=snap.redis_error_replies,
            breaker_state=_BREAKER_STATES.get(
                g.get("breaker_state", -1), pb.BREAKER_STATE_UNSPECIFIED
            ),
            breaker_trips=g.get("breaker_trips", 0),
            breaker_refused=g.get("breaker_refused", 0),
            breaker_nodes={
                node: _BREAKER_STATES.get(state, pb.BREAKER_STATE_UNSPECIFIED)
                for node, state in snap.breaker_nodes.items()
            },
        ),
        l1=pb.L1Stats(**{k: v for k, v in l1.items() if k in pb.L1Stats.DESCRIPTOR.fields_by_name}),
        process=pb.ProcessStats(**snap.process),
        admission=pb.AdmissionStats(
            rpcs_in_flight=g.get("rpcs_in_flight", 0),
            rpcs_shed=g.get("rpcs_shed", 0),
            rpcs_expired_on_arrival=g.get("rpcs_expired_on_arrival", 0),
            subscribers_refused=g.get("subscribers_refused", 0),
            answers_too_large=g.get("answers_too_large", 0),
        ),
        auth=pb.AuthStats(
            unauthenticated=g.get("auth_unauthenticated", 0),
            permission_denied=g.get("auth_permission_denied", 0),
            streams_ended=g.get("auth_streams_ended", 0),
            reload_errors=g.get("auth_reload_errors", 0),
            credentials=g.get("auth_credentials", 0),
        ),
        latency_bounds_ms=[b * 1000 for b in BOUNDS],
        trace_exporter=snap.trace_exporter,
        trace_sample_ratio=snap.sample_ratio,
        warmups_running=g.get("warmups_running", 0),
        worker_index=snap.worker_index,
        workers=snap.workers,
        pid=snap.pid,
    )
    proto_fields = pb.ClassStats.DESCRIPTOR.fields_by_name
    for name in wanted:
        counts = snap.classes[name]
        known = {k: v for k, v in counts.items() if k in proto_fields and k in _CLASS_FIELDS}
        resp.classes.append(pb.ClassStats(name=name, hit_rate=hit_rate(counts), **known))
    for method in sorted(snap.rpcs):
        r = snap.rpcs[method]
        resp.rpcs.append(
            pb.RpcStats(
                method=method,
                calls=r.calls,
                errors=sum(r.errors.values()),
                total_ms=r.total_seconds * 1000,
                latency_buckets=r.buckets,
            )
        )
    resp.hot_keys.extend(pb.HotKey(key=k, count=c) for k, c in snap.hot_keys)
    for address in sorted(snap.origins):
        o = snap.origins[address]
        resp.origins.append(
            pb.OriginStats(
                address=address,
                breaker_state=_BREAKER_STATES.get(o.breaker_state, pb.BREAKER_STATE_UNSPECIFIED),
                breaker_trips=o.breaker_trips,
                breaker_refused=o.breaker_refused,
            )
        )
    return resp


@dataclass(frozen=True, slots=True)
class OriginFigures:
    """One origin client's circuit breaker (origin.py): state as breaker.py numbers it
    (-1 when origin.breaker.enabled = false), times it opened, calls it refused."""

    breaker_state: int
    breaker_trips: int
    breaker_refused: int


def worker_summaries(rows: Sequence[dict[str, Any]]) -> list[pb.WorkerSummary]:
    """The supervisor's summaries (worker_status.py) on the wire; unknown keys ignored."""
    names = set(pb.WorkerSummary.DESCRIPTOR.fields_by_name)
    out = []
    for row in rows:
        try:
            out.append(pb.WorkerSummary(**{k: v for k, v in row.items() if k in names}))
        except (TypeError, ValueError):  # not what this gateway's supervisor sends
            continue
    return out


def origin_figures(origins: Origins | None) -> dict[str, OriginFigures]:
    if origins is None:
        return {}
    return {
        c.address: OriginFigures(
            c.gauges.breaker_state if c.breaker is not None else -1,
            c.gauges.breaker_trips,
            c.gauges.breaker_refused,
        )
        for c in origins.clients
    }


def merge_snapshots(base: Snapshot, parts: list[Snapshot]) -> Snapshot:
    """The gateway-wide figures: `base` (calls per RPC, admission, the process) plus every
    tenant space's counts. Levels that are states (Redis up, breaker) take the worst."""
    if not parts:
        return base
    gateway = dict(base.gateway)
    classes = {name: dict(c) for name, c in base.classes.items()}
    l1 = dict(base.l1)
    errors = dict(base.redis_error_replies)
    nodes = dict(base.breaker_nodes)
    coalesced, reads = base.coalesced, base.redis_reads
    for p in parts:
        for k, v in p.gateway.items():
            if k == "redis_up":
                gateway[k] = min(gateway.get(k, 1), v)
            elif k == "breaker_state":
                gateway[k] = max(gateway.get(k, -1), v)
            else:
                gateway[k] = gateway.get(k, 0) + v
        for name, counts in p.classes.items():
            into = classes.setdefault(name, {})
            for k, v in counts.items():
                into[k] = into.get(k, 0) + v
        for k, v in p.l1.items():
            l1[k] = l1.get(k, 0) + v
        for k, v in p.redis_error_replies.items():
            errors[k] = errors.get(k, 0) + v
        for k, v in p.breaker_nodes.items():
            nodes[k] = max(nodes.get(k, 0), v)
        coalesced += p.coalesced
        reads += p.redis_reads
    return dataclasses.replace(
        base,
        gateway=gateway,
        classes=classes,
        l1=l1,
        redis_error_replies=errors,
        breaker_nodes=nodes,
        coalesced=coalesced,
        redis_reads=reads,
    )
