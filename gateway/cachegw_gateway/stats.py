"""The gateway's own counters: plain integers bumped on the request path.

Hot paths only do ``counters.hits_l1 += 1`` on an object they already hold (an L1 entry
keeps a reference to its class's `ClassCounters`), so counting costs a few tens of
nanoseconds and no lookup. Telemetry (the Stats RPC, the Prometheus endpoint, OpenTelemetry
observable instruments) reads these numbers when asked; nothing here exports anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

# ClassCounters fields that are gauges (a level now); every other one is a count.
CLASS_GAUGES = frozenset({"wb_backlog", "wb_lag_ms"})


@dataclass(slots=True)
class ClassCounters:
    """Per key class; every field is a monotonic count."""

    hits_l1: int = 0
    hits_l2: int = 0
    misses: int = 0
    stale: int = 0  # STALE answers (stale-while-revalidate and stale-if-error)
    stale_if_error: int = 0  # STALE answers from a last known copy while Redis failed
    sets: int = 0
    deletes: int = 0
    leases_granted: int = 0  # LEASED answers, fills included
    lease_waits: int = 0  # callers that waited server-side for another holder's fill
    lease_wait_timeouts: int = 0  # waiters answered MISS because their wait ran out
    leases_taken_over: int = 0  # leases granted after a previous holder's expired
    lease_fills: int = 0  # Sets with a valid lease token
    lease_fills_refused: int = 0  # Sets whose lease token was no longer valid
    refreshes: int = 0  # early refresh leases handed out (XFetch or stale window)
    # The class's origin (read-through, write-through; origin.py).
    origin_loads: int = 0  # keys loaded from the origin
    origin_load_calls: int = 0  # Load calls made
    origin_not_found: int = 0  # keys the origin said do not exist
    not_found: int = 0  # NOT_FOUND answers (from the origin or a cached NOT_FOUND)
    origin_stores: int = 0  # entries the origin stored (write-through)
    origin_errors: int = 0  # origin calls that failed (any status)
    # Warmup from the origin (rebuild.py): keys loaded and stored, keys the origin does
    # not have, keys that failed (the origin or Redis).
    warm_loaded: int = 0
    warm_not_found: int = 0
    warm_failed: int = 0
    # Write-behind (writebehind.py): see ClassStats in cache.proto. The last two are
    # gauges of the deployment's journal (CLASS_GAUGES).
    wb_journaled: int = 0
    wb_flushed: int = 0
    wb_origin_calls: int = 0
    wb_collapsed: int = 0
    wb_superseded: int = 0
    wb_retries: int = 0
    wb_dead_lettered: int = 0
    wb_claimed: int = 0
    wb_backlog: int = 0
    wb_lag_ms: int = 0
    # Fail-safe (failsafe.py): STALE answers of the last value because the origin failed,
    # or because the load outlasted the class's soft timeout (both counted in `stale`).
    fail_safe_errors: int = 0
    fail_safe_timeouts: int = 0
    # Refresh-ahead (refreshahead.py): hot keys reloaded and stored before they expired,
    # due reloads skipped because the class's refresh_ahead_rate was used up, reloads
    # that failed (the origin or Redis), and reloads a newer write or load overtook.
    refresh_ahead_loads: int = 0
    refresh_ahead_rate_limited: int = 0
    refresh_ahead_failed: int = 0
    refresh_ahead_superseded: int = 0

    @property
    def reads(self) -> int:
        return self.hits_l1 + self.hits_l2 + self.stale + self.misses

    @property
    def hit_rate(self) -> float:
        reads = self.reads
        return (self.hits_l1 + self.hits_l2 + self.stale) / reads if reads else 0.0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class GatewayStats:
    """Gateway-wide counters and gauges, plus one `ClassCounters` per key class."""

    classes: dict[str, ClassCounters] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    # Invalidation.
    invalidations_published: int = 0  # events this gateway published
    invalidations_received: int = 0  # events this gateway's subscription delivered
    l1_flushes: int = 0  # whole-L1 flushes (subscription lost, oversized events)
    subscribers: int = 0  # Subscribe streams open now (a gauge)
    subscriber_resets: int = 0  # RESETs sent to Subscribe streams
    # Redis.
    redis_errors: int = 0  # Redis calls that failed (timeouts, refused connections, errors)
    # Error replies from Redis by kind (READONLY, LOADING, BUSY, MASTERDOWN, OOM, ...; see
    # redis_errors.py), counted in redis_errors too. Not a plain figure: snapshot.py and
    # metrics.py export it with a `kind` label.
    error_replies: dict[str, int] = field(default_factory=dict)
    redis_reconnects: int = 0  # pub/sub connections re-established
    redis_up: bool = True  # the last Redis call or probe succeeded, writes taken (a gauge)
    envelope_mismatches: int = 0  # stored values in a format this gateway does not read
    # The circuit breaker in front of Redis (breaker.py): its state (a gauge: 0 closed,
    # 1 open, 2 half-open, -1 no breaker), times it opened, calls it refused.
    breaker_state: int = -1
    breaker_trips: int = 0
    breaker_refused: int = 0
    # Admission (admission.py): unary calls in flight now (a gauge), calls refused because
    # too many were in flight, calls whose deadline passed before they were served,
    # Subscribe streams refused (too many in all or from one host), GetMany answers
    # refused for their size.
    rpcs_in_flight: int = 0
    rpcs_shed: int = 0
    rpcs_expired_on_arrival: int = 0
    subscribers_refused: int = 0
    answers_too_large: int = 0
    # On a Redis Cluster (a breaker per node): the nodes whose breaker is not closed, and
    # its state. Exported with a `node` label (snapshot.py, metrics.py).
    breaker_nodes: dict[str, int] = field(default_factory=dict)
    warmups_running: int = 0  # Warmup calls loading from origins now (a gauge)
    # Authentication (auth.py): calls refused UNAUTHENTICATED or PERMISSION_DENIED,
    # Subscribe streams ended because their credential stopped holding, reloads of the
    # tokens or key file that failed (the previous contents stayed), and the tokens,
    # identities and JWT keys in force (a gauge).
    auth_unauthenticated: int = 0
    auth_permission_denied: int = 0
    auth_streams_ended: int = 0
    auth_reload_errors: int = 0
    auth_credentials: int = 0

    def for_class(self, name: str) -> ClassCounters:
        counters = self.classes.get(name)
        if counters is None:
            counters = self.classes[name] = ClassCounters()
        return counters

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_at
