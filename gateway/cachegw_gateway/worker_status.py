"""Every worker's figures, for any worker's Stats answer (`cachegw serve --workers N`).

A Stats call reaches one worker (the one its connection landed on), yet `cachegw top`
should show them all. The supervisor knows its workers and their private /metrics
endpoints, so it serves a private loopback endpoint, ``GET /workers``, answering a JSON
list with one summary per worker: index, pid, serving, restarts, and (when its /metrics
answered) calls, calls in flight, L1 entries and bytes, RSS and uptime. Every worker is
given the endpoint's address (workers.py) and adds the list to its Stats answers
(StatsResponse.worker_summaries).

The supervisor reads the workers' /metrics in parallel, each bounded by a timeout, and
keeps the result for `max_age` seconds, so a burst of Stats calls costs one round of
scrapes. A worker reading its own /metrics from within its Stats handler is fine: the
handler awaits the answer off the event loop, which stays free to take the snapshot.
Nothing here imports gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cachegw_gateway.telemetry.aggregate import WorkerView, scrape, summarize

log = logging.getLogger("cachegw.supervisor")

PATH = "/workers"
SCRAPE_TIMEOUT = 1.0  # seconds a worker's /metrics has to answer
MAX_AGE = 0.5  # seconds a round of scrapes is reused
FETCH_TIMEOUT = 1.5  # seconds a worker waits for the supervisor


Summary = dict[str, Any]


class StatusServer:
    """The supervisor's `GET /workers` on 127.0.0.1 (a port of its own)."""

    def __init__(
        self,
        views: Callable[[], Sequence[WorkerView]],
        *,
        max_age: float = MAX_AGE,
        timeout: float = SCRAPE_TIMEOUT,
    ) -> None:
        self._views = views
        self._max_age = max_age
        self._timeout = timeout
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Summary]] | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="worker-status")
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""

    def start(self) -> str:
        status = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != PATH:
                    self.send_error(404)
                    return
                body = json.dumps(status.summaries()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one request per Stats call: not worth a log line

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="worker-status", daemon=True
        )
        self._thread.start()
        self.address = f"127.0.0.1:{self._httpd.server_port}"
        return self.address

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def summaries(self) -> list[Summary]:
        """Every worker's summary, at most `max_age` seconds old."""
        with self._lock:  # concurrent askers share one round of scrapes
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self._max_age:
                return self._cached[1]
            views = list(self._views())
            futures = [
                self._pool.submit(scrape, v.metrics, self._timeout) if v.metrics else None
                for v in views
            ]
            out = []
            for view, future in zip(views, futures, strict=True):
                row: Summary = {
                    "index": view.index,
                    "pid": view.pid,
                    "serving": view.serving,
                    "restarts": view.restarts,
                    "answered": False,
                }
                if future is not None:
                    try:
                        row |= summarize(future.result())
                        row["answered"] = True
                    except (OSError, ValueError):  # gone, restarting, or slow
                        pass
                out.append(row)
            self._cached = (time.monotonic(), out)
            return out


def _fetch(address: str, timeout: float) -> list[Summary]:
    with urllib.request.urlopen(f"http://{address}{PATH}", timeout=timeout) as reply:
        rows = json.loads(reply.read())
    if not isinstance(rows, list):
        raise ValueError("not a list")
    return rows


async def fetch_summaries(address: str) -> list[Summary]:
    """The supervisor's summaries of every worker; [] when it does not answer within
    FETCH_TIMEOUT (a Stats answer goes out without them rather than fail)."""
    try:
        return await asyncio.to_thread(_fetch, address, FETCH_TIMEOUT)
    except (OSError, ValueError) as exc:
        log.debug("no worker summaries from the supervisor at %s: %r", address, exc)
        return []
