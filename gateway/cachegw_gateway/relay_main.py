"""`cachegw relay`: link two regions' invalidation streams, both ways, in one process.

    cachegw relay --region eu=redis://10.0.0.1:6379/0 --region us=redis://10.1.0.1:6379/0 \\
        [--prefix cg | --prefix eu=cg --prefix us=cg] [--metrics-listen 127.0.0.1:9465]

TLS Redis (rediss://...) takes --tls-ca / --tls-cert / --tls-key / --tls-no-check-hostname,
for both regions; an ACL user and password come from each region's URL, or from
--username [NAME=]USER and --password-file [NAME=]FILE (redis_auth.py's precedence).

It logs each link's lag every --report-every seconds and serves Prometheus metrics when
asked; `--once` applies what is pending each way, prints the figures as JSON and exits.
The work itself is in relay.py; docs/regions.md says what it guarantees.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachegw_gateway import redis_tls
from cachegw_gateway.config import LOG_FORMATS, RedisConfig
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.redis_auth import read_password_file
from cachegw_gateway.redis_url import redact
from cachegw_gateway.relay import Link, LinkStats, Region
from cachegw_gateway.telemetry import logs

log = logging.getLogger("cachegw.relay")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
STOP_WAIT = 5.0  # seconds a link has to finish its round on stop


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cachegw relay",
        description="Carry invalidation events between two regions' Redis, both ways.",
    )
    p.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a region: its name and Redis URL (give exactly two)",
    )
    p.add_argument(
        "--prefix",
        action="append",
        default=[],
        metavar="[NAME=]PREFIX",
        help="redis.prefix of the regions' gateways (default cg), or of one region",
    )
    p.add_argument(
        "--stream-max-len",
        type=int,
        default=100_000,
        help="MAXLEN of the events the relay appends (the gateways' invalidation."
        "stream_max_len; default 100000)",
    )
    p.add_argument("--tls-ca", metavar="FILE", help="PEM CA of the Redis certificates")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM key of --tls-cert")
    p.add_argument(
        "--tls-no-check-hostname",
        action="store_true",
        help="accept a Redis certificate that does not name the host (chain still verified)",
    )
    p.add_argument(
        "--username",
        action="append",
        default=[],
        metavar="[NAME=]USER",
        help="Redis ACL user when a region's URL names none (of one region with NAME=)",
    )
    p.add_argument(
        "--password-file",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="file holding the Redis password when a region's URL carries none",
    )
    p.add_argument("--block-ms", type=int, default=1000, help="XREAD BLOCK (default 1000)")
    p.add_argument("--report-every", type=float, default=5.0, help="seconds between lag log lines")
    p.add_argument("--metrics-listen", help="host:port of a Prometheus /metrics endpoint")
    p.add_argument("--metrics-port", type=int, help="the same on 127.0.0.1:PORT")
    p.add_argument(
        "--once",
        action="store_true",
        help="apply what is pending each way, print the figures as JSON, exit",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text")
    return p


def parse_regions(specs: Sequence[str], prefixes: Sequence[str]) -> tuple[Region, Region]:
    if len(specs) != 2:
        raise UsageError(f"give exactly two --region NAME=URL (got {len(specs)})")
    names: list[str] = []
    urls: list[str] = []
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not _NAME.fullmatch(name):
            raise UsageError(f"--region {spec!r}: expected NAME=URL, NAME of [A-Za-z0-9_.-]")
        if not url:
            raise UsageError(f"--region {name}: no Redis URL")
        names.append(name)
        urls.append(url)
    if names[0] == names[1]:
        raise UsageError(f"the two regions have the same name {names[0]!r}")
    common = "cg"
    own: dict[str, str] = {}
    for item in prefixes:
        name, sep, prefix = item.partition("=")
        if not sep:
            common = item
        elif name in names:
            own[name] = prefix
        else:
            raise UsageError(f"--prefix {item!r}: no region is named {name!r}")
    a, b = (Region(n, u, own.get(n, common)) for n, u in zip(names, urls, strict=True))
    for region in (a, b):
        if not region.prefix:
            raise UsageError(f"region {region.name}: empty prefix")
    if (a.url, a.prefix) == (b.url, b.prefix):
        raise UsageError("both regions name the same Redis and prefix")
    return a, b


def per_region(items: Sequence[str], names: Sequence[str], flag: str) -> dict[str, str]:
    """``[NAME=]VALUE`` flags: VALUE for region NAME, or for every region."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if sep and name in names:
            out[name] = value
        elif sep and _NAME.fullmatch(name) and "/" not in item:
            raise UsageError(f"{flag} {item!r}: no region is named {name!r}")
        else:
            out.update({n: item for n in names})
    return out


def region_configs(args: argparse.Namespace, regions: Sequence[Region]) -> dict[str, RedisConfig]:
    """Each region's Redis settings: TLS for all, credentials per region (UsageError)."""
    names = [r.name for r in regions]
    users = per_region(args.username, names, "--username")
    files = per_region(args.password_file, names, "--password-file")
    out = {}
    for region in regions:
        config = RedisConfig(
            prefix=region.prefix,
            # A blocked XREAD must not look like a dead connection.
            socket_timeout=args.block_ms / 1000 + 4.0,
            username=users.get(region.name, ""),
            password_file=files.get(region.name, ""),
            tls_ca=args.tls_ca or "",
            tls_cert=args.tls_cert or "",
            tls_key=args.tls_key or "",
            tls_check_hostname=not args.tls_no_check_hostname,
        )
        try:
            redis_tls.check(config)
            if config.password_file:
                read_password_file(config.password_file)
        except redis_tls.TlsConfigError as exc:
            raise UsageError(f"--{exc.key.replace('_', '-')} {exc}") from None
        except ValueError as exc:
            raise UsageError(f"--password-file of region {region.name} {exc}") from None
        out[region.name] = config
    return out


def open_store(region: Region, config: RedisConfig) -> RedisStore:
    return RedisStore.from_config(config, region.url)


def figures(links: Iterable[Link]) -> dict[str, dict[str, object]]:
    return {link.name: asdict(link.stats) for link in links}


def lag_line(link: Link, now_ms: int) -> str:
    s = link.stats
    if s.last_applied_ms:
        newest = (
            f"newest applied event {s.last_delay_ms} ms after its publication, "
            f"{max(0, now_ms - s.last_applied_ms) / 1000:.1f}s ago"
        )
    else:
        newest = "no event applied yet"
    return (
        f"relay {link.name}: {s.behind} events behind, {newest}; applied {s.applied}, "
        f"skipped {s.skipped} (relayed copies), fallbacks {s.fallbacks}, rewinds {s.rewinds}, "
        f"errors {s.errors}"
        f"{'' if s.up else ', DOWN'}"
    )


class RelayCollector(Collector):
    """Reads the links' plain figures at scrape time (from the HTTP thread: copies)."""

    def __init__(self, links: Sequence[Link]) -> None:
        self._links = links

    def collect(self) -> Iterable[Metric]:
        labels = ["source", "dest"]
        now_ms = time.time_ns() // 1_000_000
        behind = GaugeMetricFamily(
            "cachegw_relay_behind_events", "Source events not yet applied.", labels=labels
        )
        age = GaugeMetricFamily(
            "cachegw_relay_last_applied_age_seconds",
            "Now minus the source time of the newest applied event.",
            labels=labels,
        )
        delay = GaugeMetricFamily(
            "cachegw_relay_last_delay_seconds",
            "Source publication to destination publication of the newest applied event.",
            labels=labels,
        )
        up = GaugeMetricFamily(
            "cachegw_relay_up", "1 when the last round reached both Redis.", labels=labels
        )
        counters = {
            field: CounterMetricFamily(f"cachegw_relay_{field}", text, labels=labels)
            for field, text in (
                ("applied", "Events applied in the destination."),
                ("skipped", "Relayed copies seen in the source (never carried on)."),
                ("fallbacks", "Destination flushes because source events were lost."),
                (
                    "rewinds",
                    "Times the destination's checkpoint was not the one last written "
                    "(it lost writes): what followed it was applied again.",
                ),
                ("errors", "Failed rounds (Redis trouble on either side), retried."),
            )
        }
        for link in self._links:
            s: LinkStats = replace(link.stats)
            names = [link.source.name, link.dest.name]
            behind.add_metric(names, s.behind)
            if s.last_applied_ms:
                age.add_metric(names, max(0, now_ms - s.last_applied_ms) / 1000)
                delay.add_metric(names, s.last_delay_ms / 1000)
            up.add_metric(names, 1 if s.up else 0)
            for field, family in counters.items():
                family.add_metric(names, getattr(s, field))
        return [behind, age, delay, up, *counters.values()]


class MetricsEndpoint:
    def __init__(self, listen: str, links: Sequence[Link]) -> None:
        host, _, port = listen.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RelayCollector(links))
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(int(port), host.strip("[]"), registry)
        self.address = f"{host}:{self._httpd.server_port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


async def run(args: argparse.Namespace, a: Region, b: Region) -> int:
    try:
        configs = region_configs(args, (a, b))
        stores = {r.name: open_store(r, configs[r.name]) for r in (a, b)}
    except (UsageError, ValueError) as exc:  # ValueError: a URL the Redis layer refuses
        print(f"cachegw relay: {exc}", file=sys.stderr)
        return 2
    links = [
        Link(
            src,
            stores[src.name],
            dst,
            stores[dst.name],
            stream_max_len=args.stream_max_len,
            block_ms=args.block_ms,
        )
        for src, dst in ((a, b), (b, a))
    ]
    try:
        if args.once:
            return await _once(links)
        return await _forever(args, links)
    finally:
        for store in stores.values():
            with contextlib.suppress(Exception):
                await store.close()


async def _once(links: Sequence[Link]) -> int:
    status = 0
    for link in links:
        try:
            await link.catch_up()
        except Exception as exc:  # RelayError, or Redis trouble: --once does not retry
            link.stats.errors += 1
            log.error("relay %s: %s", link.name, exc, extra={"event": "relay_error"})
            status = 1
    print(json.dumps(figures(links)), flush=True)
    return status


async def _forever(args: argparse.Namespace, links: Sequence[Link]) -> int:
    listen = args.metrics_listen or (
        f"127.0.0.1:{args.metrics_port}" if args.metrics_port is not None else None
    )
    try:
        metrics = MetricsEndpoint(listen, links) if listen else None
    except (OSError, ValueError) as exc:
        log.error("cannot serve metrics on %s: %s", listen, exc, extra={"event": "listen_failed"})
        return 1
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info(
        "relaying %s: %s (%s) <-> %s (%s); metrics %s",
        " and ".join(link.name for link in links),
        links[0].source.name,
        redact(links[0].source.url),
        links[0].dest.name,
        redact(links[0].dest.url),
        f"http://{metrics.address}/metrics" if metrics else "off",
        extra={"event": "relay_start", "metrics": metrics.address if metrics else None},
    )
    tasks = [asyncio.create_task(link.run(stopping), name=f"relay {link.name}") for link in links]
    status = 0
    try:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), args.report_every)
            ended = [t for t in tasks if t.done()]
            if ended and not stopping.is_set():  # a RelayError: retrying cannot help
                for task in ended:
                    why = None if task.cancelled() else task.exception()
                    log.error("%s ended: %s", task.get_name(), why, extra={"event": "relay_failed"})
                status = 1
                break
            now_ms = time.time_ns() // 1_000_000
            for link in links:
                log.info(
                    lag_line(link, now_ms),
                    extra={"event": "relay_lag", "link": link.name, **asdict(link.stats)},
                )
    finally:
        stopping.set()
        _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT)
        for task in pending:  # blocked in a read: a cancel ends it
            task.cancel()
        await asyncio.wait(tasks, timeout=STOP_WAIT)
        if metrics is not None:
            await asyncio.to_thread(metrics.stop)
    log.info("relay stopped", extra={"event": "relay_stop"})
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        a, b = parse_regions(args.region, args.prefix)
        if args.block_ms < 1 or args.report_every <= 0 or args.stream_max_len < 1:
            raise UsageError("--block-ms, --report-every and --stream-max-len must be positive")
    except UsageError as exc:
        print(f"cachegw relay: {exc}", file=sys.stderr)
        return 2
    logs.setup(args.log_level, args.log_format)
    return asyncio.run(run(args, a, b))


if __name__ == "__main__":
    sys.exit(main())
