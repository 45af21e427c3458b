"""The Prometheus endpoint: `GET /metrics` from a thread, figures read at scrape time.

prometheus_client serves HTTP in a daemon thread, so a scrape never waits on the event
loop's queue of requests; the collector asks the loop for a `Snapshot` (a few
microseconds of copying) and formats it in that thread. Nothing here runs per request.
Names are ``cachegw_*``; docs/observability.md lists them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cachegw_gateway.stats import CLASS_GAUGES
from cachegw_gateway.telemetry.latency import BOUNDS
from cachegw_gateway.telemetry.snapshot import GAUGE_FIELDS, Snapshot

P = "cachegw_"
SCRAPE_TIMEOUT = 5.0  # seconds the event loop has to hand over a snapshot

# Help texts; a counter added to stats.py later is exported too, with a generic text.
_CLASS_HELP = {
    "sets": "Sets stored, per class.",
    "deletes": "Keys deleted, per class.",
    "stale": "STALE answers (stale-while-revalidate), per class.",
    "leases_granted": "Leases granted (LEASED answers, refreshes included), per class.",
    "lease_waits": "Callers that waited server-side for another holder's fill, per class.",
    "lease_wait_timeouts": "Lease waiters whose wait ran out (answered MISS), per class.",
    "leases_taken_over": "Leases granted after the previous holder's expired, per class.",
    "lease_fills": "Sets with a valid lease token, per class.",
    "lease_fills_refused": "Sets whose lease token was no longer valid, per class.",
    "refreshes": "Early-refresh leases handed out (XFetch or stale window), per class.",
    "stale_if_error": "STALE answers from a last known copy while Redis failed, per class.",
    "origin_loads": "Keys loaded from the class's origin (read-through), per class.",
    "origin_load_calls": "Load calls made to the class's origin, per class.",
    "origin_not_found": "Keys the class's origin said do not exist, per class.",
    "not_found": "NOT_FOUND answers (from the origin or a cached NOT_FOUND), per class.",
    "origin_stores": "Entries the class's origin stored (write-through), per class.",
    "origin_errors": "Origin calls that failed (any status), per class.",
    "warm_loaded": "Keys Warmup loaded from the class's origin and stored, per class.",
    "warm_not_found": "Keys Warmup asked of the class's origin that it does not have, per class.",
    "warm_failed": "Keys Warmup could not load (the origin or Redis failed), per class.",
    "wb_journaled": "Write-behind Sets and Deletes journaled (acknowledged), per class.",
    "wb_flushed": "Write-behind journal entries settled with the origin by this gateway.",
    "wb_origin_calls": "Write-behind Store and Remove calls the origin answered, per class.",
    "wb_collapsed": "Write-behind entries settled unsent: a newer one of the key was in the batch.",
    "wb_superseded": "Write-behind entries the origin answered VERSION_CONFLICT (it had newer).",
    "wb_retries": "Write-behind flush attempts that failed and were retried, per class.",
    "wb_dead_lettered": "Write-behind entries moved to the dead-letter stream, per class.",
    "wb_claimed": "Write-behind entries claimed from a gateway idle too long, per class.",
    "wb_backlog": "Write-behind journal entries not yet settled (whole deployment), per class.",
    "wb_lag_ms": "Age of the oldest unsettled write-behind entry, ms (whole deployment).",
    "fail_safe_errors": "STALE answers of the last value because the origin failed, per class.",
    "fail_safe_timeouts": "STALE answers of the last value at the soft timeout, per class.",
    "refresh_ahead_loads": "Hot keys reloaded and stored before they expired, per class.",
    "refresh_ahead_rate_limited": "Due reloads skipped: refresh_ahead_rate used up, per class.",
    "refresh_ahead_failed": "Refresh-ahead reloads that failed (origin or Redis), per class.",
    "refresh_ahead_superseded": "Reloads a newer write or load overtook (not stored), per class.",
}
_GATEWAY_HELP = {
    "invalidations_published": "Invalidation events this gateway published.",
    "invalidations_received": "Invalidation events this gateway's subscription delivered.",
    "l1_flushes": "Whole-L1 flushes (subscription lost, oversized events).",
    "subscribers": "Subscribe streams open now.",
    "subscriber_resets": "RESET events sent to Subscribe streams.",
    "redis_errors": "Redis calls that failed (timeouts, refused connections, error replies).",
    "redis_reconnects": "Redis pub/sub connections re-established.",
    "redis_up": "1 when the last Redis call or health probe succeeded and Redis takes writes.",
    "envelope_mismatches": "Stored values in a format this gateway does not read (misses).",
    "breaker_state": "The Redis circuit breaker: 0 closed, 1 open, 2 half-open, -1 none.",
    "breaker_trips": "Times the Redis circuit breaker opened.",
    "breaker_refused": "Redis calls the open circuit breaker refused (failed fast, not sent).",
    "rpcs_in_flight": "Unary calls being served now (admission: server.max_concurrent_rpcs).",
    "rpcs_shed": "Calls refused with RESOURCE_EXHAUSTED: too many in flight (load shed).",
    "rpcs_expired_on_arrival": "Calls whose deadline passed before they were served.",
    "subscribers_refused": "Subscribe streams refused: too many in all or from one host.",
    "answers_too_large": "GetMany answers refused for exceeding server.max_response_bytes.",
    "warmups_running": "Warmup calls loading from origins now.",
    "auth_unauthenticated": "Calls and streams refused or ended UNAUTHENTICATED (auth).",
    "auth_permission_denied": "Calls refused PERMISSION_DENIED: the method needs a permission "
    "the credential lacks.",
    "auth_streams_ended": "Subscribe streams ended because their credential was removed, "
    "expired or no longer verifies.",
    "auth_reload_errors": "Reloads of the tokens or JWT key file that failed (kept the previous).",
    "auth_credentials": "Tokens, certificate identities and JWT keys in force.",
}
_L1_GAUGES = {
    "entries": "Entries in the L1 now.",
    "bytes": "Memory the L1's entries take now, as charged against l1.max_bytes (keys, "
    "answers and the objects around them as allocated, the L1's own structures).",
    "max_entries": "The L1's entry bound.",
    "max_bytes": "The L1's byte bound.",
}
_L1_COUNTERS = {
    "hits": "L1 lookups that found a fresh entry.",
    "misses": "L1 lookups that found nothing fresh.",
    "evictions": "L1 entries evicted to make room.",
    "expirations": "L1 entries dropped because their TTL ran out.",
    "admissions_refused": "L1 fills refused by TinyLFU admission.",
}


def families(snap: Snapshot) -> Iterator[Metric]:
    """Every metric family of one snapshot."""
    info = InfoMetricFamily(f"{P}gateway", "This gateway's identity and tracing setup.")
    labels = {
        "gateway_id": snap.gateway_id,
        "trace_exporter": snap.trace_exporter,
        "trace_sample_ratio": f"{snap.sample_ratio:g}",
    }
    if snap.workers:  # a worker under a supervisor (`--workers N`)
        labels["worker"] = str(snap.worker_index)
    info.add_metric([], labels)
    yield info
    yield GaugeMetricFamily(
        f"{P}uptime_seconds", "Seconds since the gateway started.", value=snap.uptime_seconds
    )

    hits = CounterMetricFamily(f"{P}hits", "Reads answered with a value, per class and tier.",
                               labels=["class", "tier"])  # fmt: skip
    misses = CounterMetricFamily(f"{P}misses", "Reads that found nothing, per class.",
                                 labels=["class"])  # fmt: skip
    per_class: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for name in sorted(snap.classes):
        counts = snap.classes[name]
        hits.add_metric([name, "l1"], counts.get("hits_l1", 0))
        hits.add_metric([name, "l2"], counts.get("hits_l2", 0))
        misses.add_metric([name], counts.get("misses", 0))
        for key, value in counts.items():
            if key in ("hits_l1", "hits_l2", "misses"):
                continue
            family = per_class.get(key)
            if family is None:
                doc = _CLASS_HELP.get(key, f"ClassCounters.{key}, per class.")
                make = GaugeMetricFamily if key in CLASS_GAUGES else CounterMetricFamily
                family = per_class[key] = make(f"{P}{key}", doc, labels=["class"])
            family.add_metric([name], value)
    yield hits
    yield misses
    yield from per_class.values()

    for key, value in snap.gateway.items():
        doc = _GATEWAY_HELP.get(key, f"GatewayStats.{key}.")
        if key in GAUGE_FIELDS:
            yield GaugeMetricFamily(f"{P}{key}", doc, value=value)
        else:
            yield CounterMetricFamily(f"{P}{key}", doc, value=value)
    replies = CounterMetricFamily(
        f"{P}redis_error_replies",
        "Error replies from Redis by kind (READONLY, LOADING, BUSY, MASTERDOWN, OOM, ...), "
        "counted in cachegw_redis_errors_total too.",
        labels=["kind"],
    )
    for kind in sorted(snap.redis_error_replies):
        replies.add_metric([kind], snap.redis_error_replies[kind])
    yield replies
    nodes = GaugeMetricFamily(
        f"{P}redis_breaker_node_state",
        "Redis Cluster: the circuit breaker of each node that is not closed (1 open, "
        "2 half-open); the worst of them is cachegw_breaker_state.",
        labels=["node"],
    )
    for node in sorted(snap.breaker_nodes):
        nodes.add_metric([node], snap.breaker_nodes[node])
    yield nodes
    origin_state = GaugeMetricFamily(
        f"{P}origin_breaker_state",
        "Each origin's circuit breaker: 0 closed, 1 open, 2 half-open, -1 none.",
        labels=["origin"],
    )
    origin_trips = CounterMetricFamily(
        f"{P}origin_breaker_trips", "Times an origin's circuit breaker opened.",
        labels=["origin"],
    )  # fmt: skip
    origin_refused = CounterMetricFamily(
        f"{P}origin_breaker_refused",
        "Origin calls the open circuit breaker refused (failed fast, not sent).",
        labels=["origin"],
    )
    for address in sorted(snap.origins):
        o = snap.origins[address]
        origin_state.add_metric([address], o.breaker_state)
        origin_trips.add_metric([address], o.breaker_trips)
        origin_refused.add_metric([address], o.breaker_refused)
    yield origin_state
    yield origin_trips
    yield origin_refused
    yield from _tenant_metrics(snap)
    yield GaugeMetricFamily(
        f"{P}redis_ping_seconds",
        "Round trip of the last successful Redis health probe (PING).",
        value=snap.redis_ping_seconds,
    )
    yield GaugeMetricFamily(
        f"{P}asyncio_tasks",
        "asyncio tasks alive in the gateway process (steady under steady load).",
        value=snap.process.get("asyncio_tasks", 0),
    )

    for key, doc in _L1_GAUGES.items():
        yield GaugeMetricFamily(f"{P}l1_{key}", doc, value=snap.l1.get(key, 0))
    for key, doc in _L1_COUNTERS.items():
        yield CounterMetricFamily(f"{P}l1_{key}", doc, value=snap.l1.get(key, 0))

    yield CounterMetricFamily(
        f"{P}coalesced",
        "Reads that joined another caller's in-flight Redis read (request coalescing).",
        value=snap.coalesced,
    )
    yield CounterMetricFamily(
        f"{P}redis_reads", "Redis reads started for L1 misses (one per key or batch).",
        value=snap.redis_reads,
    )  # fmt: skip

    latency = HistogramMetricFamily(
        f"{P}rpc_duration_seconds",
        "Time inside the gateway's handler per RPC, from parsed request to answer.",
        labels=["method"],
    )
    errors = CounterMetricFamily(
        f"{P}rpc_errors", "RPCs that ended with a non-OK status, per method and code.",
        labels=["method", "code"],
    )  # fmt: skip
    for method in sorted(snap.rpcs):
        r = snap.rpcs[method]
        cumulative, running = [], 0
        for bound, count in zip((*BOUNDS, float("inf")), r.buckets, strict=True):
            running += count
            cumulative.append((_le(bound), running))
        latency.add_metric([method], cumulative, r.total_seconds)
        for code in sorted(r.errors):
            errors.add_metric([method, code], r.errors[code])
    yield latency
    yield errors


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class SnapshotCollector(Collector):
    """Asks the gateway's event loop for a snapshot at each scrape (from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, take: Callable[[], Snapshot]) -> None:
        self._loop = loop
        self._take = take
        self._loop_thread = threading.get_ident()

    def snapshot(self) -> Snapshot:
        if threading.get_ident() == self._loop_thread:
            return self._take()

        async def take() -> Snapshot:
            return self._take()

        future = asyncio.run_coroutine_threadsafe(take(), self._loop)
        return future.result(SCRAPE_TIMEOUT)

    def collect(self) -> Iterable[Metric]:
        return list(families(self.snapshot()))


class MetricsServer:
    """`GET /metrics` on `listen` (host:port; port 0 = a free one), in a daemon thread.

    Create and start it on the gateway's event loop.
    """

    def __init__(self, listen: str, take: Callable[[], Snapshot]) -> None:
        self.listen = listen
        self._take = take
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> int:
        host, _, port = self.listen.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(asyncio.get_running_loop(), self._take))
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ...
        ProcessCollector(registry=registry)
        self._httpd, self._thread = start_http_server(int(port), host.strip("[]"), registry)
        self.port = self._httpd.server_port
        return self.port

    async def stop(self) -> None:
        """Stop serving; the wait for the serving thread happens off the event loop."""
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _tenant_metrics(snap: Snapshot) -> Iterable[Metric]:
    """With tenants ([auth] on): their number here, and per tenant its quota refusals and
    L1 use (the operator's view; a tenant sees its own figures in its Stats)."""
    if not snap.tenants:
        return
    yield GaugeMetricFamily(
        f"{P}tenants", "Tenant key spaces this gateway holds.", value=len(snap.tenants)
    )
    refused = CounterMetricFamily(
        f"{P}tenant_quota_refused",
        "Calls refused RESOURCE_EXHAUSTED over a tenant's quota: `rate` (calls per second "
        "across gateways) or `streams` (Subscribe streams open across gateways).",
        labels=["tenant", "quota"],
    )
    entries = GaugeMetricFamily(
        f"{P}tenant_l1_entries", "Entries in a tenant's L1 on this gateway.", labels=["tenant"]
    )
    size = GaugeMetricFamily(
        f"{P}tenant_l1_bytes", "Bytes charged to a tenant's L1 on this gateway.",
        labels=["tenant"],
    )  # fmt: skip
    for name in sorted(snap.tenants):
        t = snap.tenants[name]
        refused.add_metric([name, "rate"], t.get("rate_refused", 0))
        refused.add_metric([name, "streams"], t.get("streams_refused", 0))
        entries.add_metric([name], t.get("l1_entries", 0))
        size.add_metric([name], t.get("l1_bytes", 0))
    yield refused
    yield entries
    yield size
