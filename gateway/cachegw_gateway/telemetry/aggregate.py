"""The supervisor's /metrics: its workers' figures added up (`--workers N`).

Each worker serves its own /metrics on a private loopback port (reported to the
supervisor when it starts); at each scrape the supervisor reads them all and merges
series of the same name and labels: counters and histogram buckets are summed, as are
gauges of amounts (L1 entries and bytes, calls in flight, Subscribe streams, bounds);
gauges of a state take the worst (`cachegw_redis_up` the minimum, breaker states, ping
time and uptime the maximum). Series that carry a worker's identity (the info metric's
gateway id) stay one per worker. The supervisor adds its own: workers configured and
serving, restarts, and calls served per worker (`worker` label), to see the spread.

A worker that does not answer a scrape (starting, restarting) is left out of that one;
its counters restart from 0 after a restart, which Prometheus' rate() treats as a reset.
Nothing here imports gRPC.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

P = "cachegw_"
SCRAPE_TIMEOUT = 2.0  # seconds a worker has to answer
MIN_GAUGES = frozenset({f"{P}redis_up"})
MAX_GAUGES = frozenset(
    {
        f"{P}uptime_seconds",
        f"{P}breaker_state",
        f"{P}redis_ping_seconds",
        f"{P}redis_breaker_node_state",
    }
)
_CALLS = f"{P}rpc_duration_seconds_count"


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the supervisor knows of one worker at scrape time."""

    index: int
    pid: int  # 0 while none runs
    metrics: str | None  # host:port of its private /metrics, once it serves
    restarts: int
    serving: bool = False  # reported serving and not exited since


def scrape(address: str, timeout: float = SCRAPE_TIMEOUT) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as reply:
        text: str = reply.read().decode()
        return text


def merge(texts: Sequence[str]) -> list[Metric]:
    """The families of several workers' expositions, added up as the module says."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            out = merged.get(family.name)
            if out is None:
                out = merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            series = values[family.name]
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = series.get(key)
                if old is None:
                    series[key] = s.value
                elif family.type == "gauge" and family.name in MIN_GAUGES:
                    series[key] = min(old, s.value)
                elif family.type == "gauge" and family.name in MAX_GAUGES:
                    series[key] = max(old, s.value)
                else:
                    series[key] = old + s.value
    for name, out in merged.items():
        for (sample, labels), value in values[name].items():
            out.add_sample(sample, dict(labels), value)
    return list(merged.values())


def calls_served(text: str) -> float:
    """RPCs a worker has answered (all methods), from its exposition."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == _CALLS:
                total += s.value
    return total


# What a worker's summary (StatsResponse.worker_summaries) takes from its exposition.
_SUMMARY_GAUGES = {
    f"{P}rpcs_in_flight": "rpcs_in_flight",
    f"{P}l1_entries": "l1_entries",
    f"{P}l1_bytes": "l1_bytes",
    "process_resident_memory_bytes": "rss_bytes",
}
_NOT_TRAFFIC = frozenset({"Stats", "Subscribe"})  # the viewer itself, long-lived streams


def summarize(text: str) -> dict[str, int]:
    """One worker's summary from its exposition: calls answered (without Stats and
    Subscribe), calls in flight, L1 entries and bytes, RSS, uptime in ms."""
    out = dict.fromkeys(("calls", *_SUMMARY_GAUGES.values(), "uptime_ms"), 0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == _CALLS and s.labels.get("method") not in _NOT_TRAFFIC:
                out["calls"] += int(s.value)
            elif s.name in _SUMMARY_GAUGES:
                out[_SUMMARY_GAUGES[s.name]] = int(s.value)
            elif s.name == f"{P}uptime_seconds":
                out["uptime_ms"] = int(s.value * 1000)
    return out


class WorkersCollector(Collector):
    """Collects the merged figures of the workers `views()` lists (from the scrape
    thread; `views` must be safe to call from there)."""

    def __init__(self, configured: int, views: Callable[[], Sequence[WorkerView]]) -> None:
        self._configured = configured
        self._views = views

    def collect(self) -> Iterable[Metric]:
        views = list(self._views())
        texts: list[str] = []
        calls = CounterMetricFamily(
            f"{P}worker_calls", "RPCs each worker has answered since it started.", labels=["worker"]
        )
        for view in views:
            if view.metrics is None:
                continue
            try:
                text = scrape(view.metrics)
            except OSError:  # gone or restarting: left out of this scrape
                continue
            texts.append(text)
            calls.add_metric([str(view.index)], calls_served(text))
        yield from merge(texts)
        yield GaugeMetricFamily(
            f"{P}workers", "Worker processes configured (--workers).", value=self._configured
        )
        yield GaugeMetricFamily(
            f"{P}workers_serving",
            "Workers whose figures this scrape read (running and serving).",
            value=len(texts),
        )
        restarts = CounterMetricFamily(
            f"{P}worker_restarts", "Times each worker was started again after it exited.",
            labels=["worker"],
        )  # fmt: skip
        for view in views:
            restarts.add_metric([str(view.index)], view.restarts)
        yield restarts
        yield calls
