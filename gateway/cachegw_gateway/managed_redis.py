"""A managed local `redis-server` child: the gateway's default Redis and the tests' Redis.

The child binds loopback only, keeps nothing on disk (``--save "" --appendonly no``, its
own temp dir) and dies with its parent: Linux PR_SET_PDEATHSIG, set between fork and exec,
covers a SIGKILLed parent; an atexit hook covers a normal exit.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

INSTALL_HINT = (
    "redis-server was not found on PATH; install it "
    "(Debian/Ubuntu: apt-get install redis-server) or set --redis-url"
)
_START_ATTEMPTS = 5  # fresh ports to try when the one picked was taken meanwhile
_OWN_FLAGS = ("--port", "--bind", "--dir", "--logfile", "--daemonize")


class RedisServerNotFound(RuntimeError):
    """No redis-server binary; the message says what to install."""


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerNotFound(INSTALL_HINT)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller must cope with losing the race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- dying with the parent --------------------------------------------------------------


def _resolve_prctl() -> Callable[..., int] | None:
    # Looked up here, in the parent: the child must not dlopen between fork and exec,
    # where another thread of the parent may have held the loader lock.
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _resolve_prctl()
_PR_SET_PDEATHSIG = 1


def dies_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when its parent (`parent_pid`) dies (Linux; the
    gateway's workers ask for SIGTERM, to drain). Fork from a thread that lives as long as
    the parent, as `_spawn` does."""

    def setup() -> None:  # runs in the child, between fork and exec
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return setup


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
# A start() from a short-lived thread (asyncio.to_thread, a test helper) would see its
# Redis killed when that thread ends, so children are forked from the main thread or,
# failing that, from one spawner thread that lives as long as the process.
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn(args: list[str], out: int) -> subprocess.Popen[bytes]:
    def popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=dies_with_parent(os.getpid()),  # KILL: nothing to save
            start_new_session=False,
            # Its own process group: a ^C at the terminal must not stop Redis while the
            # gateway is still draining calls that need it; the gateway stops it after.
            process_group=0,
        )

    if threading.current_thread() is threading.main_thread():
        return popen()
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(1, "cachegw-redis-spawner")
    return _spawner.submit(popen).result()


# Instances with a live child, stopped at interpreter exit (strong refs on purpose: an
# instance dropped without stop() must still not leak its server).
_live: set[ManagedRedis] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop()


# -- the server ---------------------------------------------------------------------------


def _server_pid(host: str, port: int) -> int | None:
    """The pid the Redis on host:port reports (INFO server), or None if none answers yet.

    A raw socket rather than redis-py: its client retries a refused connection with
    backoff, which would stretch every poll of a server that is still starting."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"INFO server\r\n")
            buf = b""
            while len(buf) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    return None
                buf += chunk
                head, sep, body = buf.partition(b"\r\n")
                if sep and not head.startswith(b"$"):
                    return None  # an error reply, e.g. -LOADING
                if sep and len(body) >= int(head[1:]):
                    match = re.search(rb"^process_id:(\d+)", body, re.MULTILINE)
                    return int(match.group(1)) if match else None
    except (OSError, ValueError):
        return None
    return None


class ManagedRedis:
    """One redis-server child on a loopback port; a context manager (start/stop).

    ``ManagedRedis(config="...")`` writes that text as the server's config file, passed
    first, which Sentinel mode needs (``extra_args=["--sentinel"]``).
    """

    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        config: str = "",
    ) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"a managed redis-server binds a loopback IP only (got {host!r})")
        clash = [a for a in extra_args if a in _OWN_FLAGS]
        if clash:
            raise ValueError(f"extra_args must not set {', '.join(clash)}: ManagedRedis does")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535 (got {port})")
        self._host = host
        self._port = port  # 0 until the first start picks one; then kept for restart()
        self._fixed_port = port != 0
        self._extra = list(extra_args)
        self._binary = binary
        self._config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ManagedRedis {self._host}:{self._port} pid={self.pid} {state}>"

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"redis://{host}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """The child's pid; still set after kill(), None once stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _binary_path(self) -> str:
        if self._binary is None:
            return find_redis_server()
        found = shutil.which(self._binary)
        if found is None:
            raise RedisServerNotFound(f"{self._binary}: no such executable. {INSTALL_HINT}")
        return found

    def _log_tail(self, limit: int = 3000) -> str:
        if self._dir is None:
            return "(no log)"
        parts = []
        for name in ("stdout.log", "redis.log"):
            path = self._dir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        text = "".join(parts).strip()
        return text[-limit:] if text else "(empty log)"

    def _launch(self, binary: str, port: int) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="cachegw-redis-"))
        args = [binary]
        if self._config:
            conf = self._dir / "redis.conf"
            conf.write_text(self._config)
            args.append(str(conf))  # a config file must come first on the command line
        args += [
            "--port", str(port),
            "--bind", self._host,
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            *self._extra,
        ]  # fmt: skip
        with (self._dir / "stdout.log").open("wb") as out:  # config errors go to stdout
            self._proc = _spawn(args, out.fileno())
        self._port = port
        _live.add(self)

    def start(self, timeout: float = 10.0) -> None:
        """Start the child and wait (at most `timeout` s) until it answers PING as itself.

        Without a fixed port a free one is picked, and another up to 4 times if that port
        was taken before the child could bind it. A no-op while running.
        """
        if self.running:
            return
        self._cleanup()  # after a kill(): forget the dead child and its dir
        binary = self._binary_path()
        deadline = time.monotonic() + timeout
        keep_port = self._fixed_port or self._port != 0  # restart() comes back on its port
        for _ in range(1 if keep_port else _START_ATTEMPTS):
            port = self._port if keep_port else free_port(self._host)
            self._launch(binary, port)
            assert self._proc is not None
            while self._proc.poll() is None and time.monotonic() < deadline:
                # Our own child, not a stranger that already had the port: then ours
                # fails to bind, and we must not take the stranger for it.
                if _server_pid(self._host, port) == self._proc.pid:
                    return
                time.sleep(0.02)
            exited = self._proc.poll()
            failure = (
                f"exited with status {exited}"
                if exited is not None
                else f"did not answer within {timeout:g}s"
            )
            log = self._log_tail()
            self._cleanup()
            if not keep_port:
                self._port = 0
            if exited is None or time.monotonic() >= deadline:
                break
        raise RuntimeError(f"redis-server on {self._host}:{port} {failure}; its log ends:\n{log}")

    def _cleanup(self, timeout: float = 5.0) -> None:
        """SIGTERM, SIGKILL after `timeout`, reap, and remove the temp dir."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _live.discard(self)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the child (SIGTERM, SIGKILL after `timeout`); idempotent. The port is kept,
        so a later start() or restart() comes back on it."""
        self._cleanup(timeout)

    def kill(self) -> None:
        """SIGKILL now, as a crash would (failure tests). stop() or start() cleans up."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop, then start again on the same port (clients reconnect to the same URL)."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> ManagedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# A forked copy of this process (multiprocessing) does not own our children.
os.register_at_fork(after_in_child=_live.clear)
