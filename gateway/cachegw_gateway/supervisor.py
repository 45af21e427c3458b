"""`cachegw serve --workers N`: one port, N gateway processes.

The supervisor binds the listen address itself with SO_REUSEPORT and never listens on
it: the bound socket keeps the port reserved (port 0 becomes a real one here), and each
worker binds the same port with SO_REUSEPORT, so the kernel spreads new connections over
the workers' listening sockets. Workers are fresh interpreters (fork + exec of
``python -m cachegw_gateway.main``), started before the supervisor makes any gRPC object
(it never makes one: no server, no channel, no gRPC thread), so none of gRPC's fork
caveats apply. Each worker is a full gateway, kept coherent with the others by
invalidation events as separate gateways are (workers.py).

The supervisor restarts a worker that exits (with backoff, and a log line), answers
SIGTERM/SIGINT by sending SIGTERM to every worker (each runs its graceful drain:
NOT_SERVING, drain delay, streams ended, grace) and exits 0 once all have exited 0, and
serves the Prometheus endpoint with its workers' figures added up (telemetry/aggregate.py).
With an embedded Redis the supervisor owns the redis-server and the workers share it.
If the supervisor itself dies, Linux sends each worker SIGTERM (PR_SET_PDEATHSIG) and
the workers drain; elsewhere they notice their parent changed within a second.

Nothing here imports gRPC.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from cachegw_gateway.config import GatewayConfig
from cachegw_gateway.managed_redis import dies_with_parent
from cachegw_gateway.redis_url import redact
from cachegw_gateway.telemetry.aggregate import WorkersCollector, WorkerView
from cachegw_gateway.worker_status import StatusServer
from cachegw_gateway.workers import WORKER_ENV, WorkerSlot

log = logging.getLogger("cachegw.supervisor")

TICK = 0.05  # seconds between looks at the workers
START_TIMEOUT = 60.0  # seconds for every worker to serve at the first start
BACKOFF_MIN = 0.5  # seconds before a worker that exited is started again, doubled ...
BACKOFF_MAX = 30.0  # ... up to this while it keeps exiting soon after starting
STABLE_SECONDS = 30.0  # a worker that served this long starts again after BACKOFF_MIN
STOP_MARGIN = 10.0  # seconds past drain delay + grace before a worker is killed


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """A socket bound (not listening) to `listen` with SO_REUSEPORT, and host:port with
    the port it got. Raises OSError when the address cannot be bound.

    The port is first bound without SO_REUSEPORT, which fails while anything holds it,
    SO_REUSEPORT or not: another supervisor's workers must never share it by accident."""
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    infos = socket.getaddrinfo(
        bare or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.bind(addr)
        addr = (addr[0], probe.getsockname()[1], *addr[2:])
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock, f"{host}:{sock.getsockname()[1]}"


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    status_fd: int = -1  # read end of its status pipe
    pending: bytes = b""
    metrics: str | None = None
    serving: bool = False
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_MIN
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)

    def view(self) -> WorkerView:
        proc = self.proc
        running = proc is not None and proc.returncode is None
        return WorkerView(
            self.index,
            proc.pid if running and proc is not None else 0,
            self.metrics,
            self.restarts,
            self.serving,
        )


class Supervisor:
    """Runs `count` workers on `config.server.listen` until SIGTERM or SIGINT."""

    def __init__(
        self, config: GatewayConfig, redis_url: str, argv: Sequence[str], count: int
    ) -> None:
        self.config = config
        self.redis_url = redis_url
        self.argv = list(argv)  # the user's flags, given to every worker
        self.count = count
        self.address = config.server.listen
        self._workers = [_Worker(i) for i in range(count)]
        self._stop = threading.Event()
        self._metrics: WSGIServer | None = None
        self._metrics_thread: threading.Thread | None = None
        self.metrics_address: str | None = None
        # Every worker's figures, for the workers' Stats answers (worker_status.py).
        self._status = StatusServer(self.views)

    # -- running --------------------------------------------------------------------------

    def run(self) -> int:
        try:
            reserved, self.address = reserve_port(self.config.server.listen)
        except OSError as exc:
            log.error(
                "cannot listen on %s: %s",
                self.config.server.listen,
                exc,
                extra={"event": "listen_failed", "listen": self.config.server.listen},
            )
            return 1
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._start_metrics()
            self._status.start()
            for w in self._workers:
                self._spawn(w)
            if not self._wait_all_serving():
                if self._stop.is_set():  # asked to stop while starting: a normal stop
                    return self._drain()
                self._stop_workers()
                return 1
            self._log_serving()
            while not self._stop.is_set():
                self._tick()
                self._stop.wait(TICK)
            return self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_metrics()
            self._status.stop()
            for w in self._workers:
                self._close_status(w)
            reserved.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def views(self) -> list[WorkerView]:
        """The workers as the metrics collector sees them (from its thread)."""
        return [w.view() for w in list(self._workers)]

    # -- workers --------------------------------------------------------------------------

    def _command(self, slot: WorkerSlot) -> list[str]:
        # Later flags win: the reserved port, a name of its own and a private metrics
        # endpoint for the supervisor to read; the managed Redis's URL when the supervisor
        # runs one (a configured URL reaches the worker as it reached the supervisor, and
        # stays off the command line).
        redis = ["--redis-url", self.redis_url] if self.redis_url != self.config.redis.url else []
        return [
            sys.executable,
            "-m",
            "cachegw_gateway.main",
            *self.argv,
            "--listen",
            self.address,
            *redis,
            "--gateway-id",
            slot.gateway_id(self.config.server.gateway_id),
            "--metrics-listen",
            "127.0.0.1:0",
        ]

    def _spawn(self, w: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        slot = WorkerSlot(w.index, self.count, write_fd, self._status.address)
        try:
            w.proc = subprocess.Popen(
                self._command(slot),
                stdin=subprocess.DEVNULL,
                env={**os.environ, WORKER_ENV: slot.env_value()},
                pass_fds=(write_fd,),
                # SIGTERM if the supervisor dies, so that the worker drains. Spawned from
                # the main thread, which lives as long as the supervisor.
                preexec_fn=dies_with_parent(os.getpid(), signal.SIGTERM),
            )
        finally:
            os.close(write_fd)
        self._close_status(w)
        w.status_fd = read_fd
        w.pending, w.metrics, w.serving = b"", None, False
        w.started_at = time.monotonic()
        w.restart_at = None

    def _close_status(self, w: _Worker) -> None:
        if w.status_fd >= 0:
            os.close(w.status_fd)
            w.status_fd = -1

    def _read_status(self, w: _Worker) -> None:
        """Take the worker's report (one JSON line once it serves), if it came."""
        if w.status_fd < 0:
            return
        try:
            chunk = os.read(w.status_fd, 4096)
        except BlockingIOError:
            return
        if not chunk:  # the worker closed it (exited)
            self._close_status(w)
            return
        w.pending += chunk
        while b"\n" in w.pending:
            line, w.pending = w.pending.split(b"\n", 1)
            try:
                report = json.loads(line)
            except ValueError:
                continue
            w.metrics = report.get("metrics")
            if not w.serving and w.proc is not None:
                w.serving = True
                if w.restarts:
                    log.info(
                        "worker %d serving again (pid %d)",
                        w.index,
                        w.proc.pid,
                        extra={"event": "worker_serving", "worker": w.index, "pid": w.proc.pid},
                    )

    def _exited(self, w: _Worker) -> int | None:
        """The worker's exit status if it has exited (its status pipe drained first)."""
        if w.proc is None:
            return None
        code = w.proc.poll()
        if code is not None:
            self._read_status(w)
        return code

    def _wait_all_serving(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.serving for w in self._workers):
            for w in self._workers:
                self._read_status(w)
                code = self._exited(w)
                if code is not None and not w.serving:
                    log.error(
                        "worker %d exited before serving (%s); stopping",
                        w.index,
                        describe_exit(code),
                        extra={"event": "worker_failed", "worker": w.index, "code": code},
                    )
                    return False
            if self._stop.is_set():
                log.info("stopped before every worker served", extra={"event": "stop"})
                return False
            if time.monotonic() > deadline:
                log.error(
                    "workers not serving after %.0fs; stopping",
                    START_TIMEOUT,
                    extra={"event": "worker_failed"},
                )
                return False
            self._stop.wait(TICK)
        return True

    def _log_serving(self) -> None:
        pids = [w.proc.pid for w in self._workers if w.proc is not None]
        metrics = self.metrics_address
        log.info(
            "serving on %s with %d workers (pids %s; redis %s; metrics %s)",
            self.address,
            self.count,
            ", ".join(map(str, pids)),
            redact(self.redis_url),
            f"http://{metrics}/metrics" if metrics else "off",
            extra={
                "event": "start",
                "listen": self.address,
                "workers": self.count,
                "pids": pids,
                "gateway_id": self.config.server.gateway_id,
                "metrics": metrics,
            },
        )

    def _tick(self) -> None:
        now = time.monotonic()
        for w in self._workers:
            self._read_status(w)
            if w.restart_at is not None:
                if now >= w.restart_at:
                    w.restarts += 1
                    self._spawn(w)
                    assert w.proc is not None
                    log.info(
                        "started worker %d again (pid %d, restart %d)",
                        w.index,
                        w.proc.pid,
                        w.restarts,
                        extra={"event": "worker_restart", "worker": w.index, "pid": w.proc.pid},
                    )
                continue
            code = self._exited(w)
            if code is None:
                continue
            assert w.proc is not None
            if now - w.started_at >= STABLE_SECONDS:
                w.backoff = BACKOFF_MIN
            log.warning(
                "worker %d (pid %d) exited (%s); starting it again in %.1fs",
                w.index,
                w.proc.pid,
                describe_exit(code),
                w.backoff,
                extra={
                    "event": "worker_exit",
                    "worker": w.index,
                    "pid": w.proc.pid,
                    "code": code,
                    "restart_in": w.backoff,
                },
            )
            w.exit_codes.append(code)
            w.serving, w.metrics = False, None
            w.restart_at = now + w.backoff
            w.backoff = min(BACKOFF_MAX, w.backoff * 2)

    # -- stopping -------------------------------------------------------------------------

    def _drain(self) -> int:
        s = self.config.server
        for w in self._workers:
            self._read_status(w)
        live = [w for w in self._workers if w.proc is not None and w.proc.poll() is None]
        log.info(
            "stopping: SIGTERM to %d workers; each reports NOT_SERVING, serves %.1fs more, "
            "then ends Subscribe streams and drains in-flight calls for up to %.1fs",
            len(live),
            s.drain_delay_seconds,
            s.grace_seconds,
            extra={"event": "stopping", "workers": len(live)},
        )
        starting = {w.index for w in live if not w.serving}
        codes = self._stop_workers()
        # A worker still starting has nothing to drain: SIGTERM ends it before its handler
        # is installed, and that is a clean stop too.
        failed = {
            i: c
            for i, c in codes.items()
            if c != 0 and not (i in starting and c == -signal.SIGTERM)
        }
        if failed:
            log.warning(
                "workers that did not drain cleanly: %s",
                ", ".join(f"{i} ({describe_exit(c)})" for i, c in sorted(failed.items())),
                extra={"event": "stop", "failed": failed},
            )
            return 1
        log.info("stopped %d workers", len(codes), extra={"event": "stop"})
        return 0

    def _stop_workers(self) -> dict[int, int]:
        """SIGTERM every running worker, wait for them (killing any left after the drain
        delay, the grace and a margin); their exit statuses by index."""
        s = self.config.server
        running = {
            w.index: w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None
        }
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + s.drain_delay_seconds + s.grace_seconds + STOP_MARGIN
        codes: dict[int, int] = {}
        for index, proc in running.items():
            try:
                codes[index] = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "worker %d (pid %d) still running after its drain; killing it",
                    index,
                    proc.pid,
                    extra={"event": "worker_killed", "worker": index, "pid": proc.pid},
                )
                proc.kill()
                codes[index] = proc.wait()
        return codes

    # -- metrics --------------------------------------------------------------------------

    def _start_metrics(self) -> None:
        listen = self.config.telemetry.metrics_listen
        if not listen:
            return
        host, _, port = listen.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(self.count, self.views))
        self._metrics, self._metrics_thread = start_http_server(
            int(port), host.strip("[]"), registry
        )
        self.metrics_address = f"{host}:{self._metrics.server_port}"

    def _stop_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None
        if self._metrics_thread is not None:
            self._metrics_thread.join(timeout=5)
            self._metrics_thread = None
