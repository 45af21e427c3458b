"""The managed redis-server child: start/stop/kill/restart, ports, loopback only, no disk,
a clear error without the binary, and no leaked server when its parent dies."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cachegw_gateway import managed_redis
from cachegw_gateway.managed_redis import (
    INSTALL_HINT,
    ManagedRedis,
    RedisServerNotFound,
    find_redis_server,
    free_port,
)

# redis-py retries a refused connection with backoff by default; these tests want the truth.
NO_RETRY = Retry(NoBackoff(), 0)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def gone(pid: int) -> bool:
    """No such process, or only its zombie (a container's init may not reap orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with redis.Redis(host=host, port=port, socket_timeout=0.5, retry=NO_RETRY) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Free as a server sees it: it can bind and listen (SO_REUSEADDR, as Redis does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()
        except OSError:
            return False
    return True


@pytest.fixture
def server() -> Iterator[ManagedRedis]:
    with ManagedRedis() as m:
        yield m


@pytest.fixture
def client(server: ManagedRedis) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(server.url, socket_timeout=2, retry=NO_RETRY)
    yield c
    c.close()


# -- start and stop ---------------------------------------------------------------------------


def test_start_answers_ping(server: ManagedRedis, client: redis.Redis) -> None:
    assert server.running and server.pid is not None and server.port > 0
    assert server.host == "127.0.0.1"
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert client.ping()
    assert client.set("k", b"v") and client.get("k") == b"v"
    assert client.info("server")["process_id"] == server.pid


def test_binds_loopback_and_keeps_nothing_on_disk(
    server: ManagedRedis, client: redis.Redis
) -> None:
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert client.config_get("save")["save"] == ""
    assert client.config_get("appendonly")["appendonly"] == "no"
    folder = Path(str(client.config_get("dir")["dir"]))
    assert folder.is_dir() and folder.name.startswith("cachegw-redis-")
    server.stop()
    assert not folder.exists()  # its temp dir goes with it


def test_stop_kills_the_process_and_frees_the_port(server: ManagedRedis) -> None:
    pid, port = server.pid, server.port
    assert pid is not None and not port_is_free(port)
    server.stop()
    assert not server.running and server.pid is None
    assert gone(pid)
    assert not answers(port)
    assert port_is_free(port)
    server.stop()  # idempotent
    assert server.port == port  # kept, so a later start() comes back on it


def test_restart_comes_back_on_the_same_port_empty(
    server: ManagedRedis, client: redis.Redis
) -> None:
    client.set("k", b"v")
    pid, port, url = server.pid, server.port, server.url
    server.restart()
    assert server.running and server.port == port and server.url == url
    assert server.pid != pid and pid is not None and gone(pid)
    assert client.get("k") is None  # no persistence: a restart starts empty
    assert client.ping()  # the same client reconnects to the same URL


def test_kill_is_abrupt_and_start_recovers(server: ManagedRedis, client: redis.Redis) -> None:
    pid, port = server.pid, server.port
    assert pid is not None
    server.kill()
    assert not server.running and server.pid == pid  # still known, for failure tests
    assert gone(pid)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    server.kill()  # no-op when already dead
    server.start()
    assert server.running and server.port == port and client.ping()


def test_two_instances_at_once() -> None:
    with ManagedRedis() as a, ManagedRedis() as b:
        assert a.port != b.port and a.pid != b.pid
        with redis.Redis.from_url(a.url) as ca, redis.Redis.from_url(b.url) as cb:
            ca.set("k", b"a")
            cb.set("k", b"b")
            assert (ca.get("k"), cb.get("k")) == (b"a", b"b")
        b.stop()
        assert answers(a.port) and not answers(b.port)


def test_a_chosen_port() -> None:
    port = free_port()
    with ManagedRedis(port=port) as m:
        assert m.port == port and answers(port)


def test_start_is_a_noop_while_running(server: ManagedRedis) -> None:
    pid = server.pid
    server.start()
    assert server.pid == pid


def test_context_manager_stops_on_error() -> None:
    m = ManagedRedis()
    with pytest.raises(KeyError), m:
        pid = m.pid
        raise KeyError("boom")
    assert pid is not None and gone(pid) and not m.running


def test_ipv6_loopback() -> None:
    try:
        free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with ManagedRedis(host="::1") as m:
        assert m.url == f"redis://[::1]:{m.port}/0"
        assert answers(m.port, "::1")


# -- ports that are taken -----------------------------------------------------------------------


def test_a_taken_fixed_port_fails_with_the_server_log() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        m = ManagedRedis(port=port)
        with pytest.raises(RuntimeError) as info:
            m.start(timeout=5)
        assert f"127.0.0.1:{port}" in str(info.value)
        assert "in use" in str(info.value)  # the tail of redis-server's own log
        assert not m.running and m.pid is None


def test_never_mistakes_another_redis_for_its_own(server: ManagedRedis) -> None:
    other = ManagedRedis(port=server.port)
    with pytest.raises(RuntimeError, match="exited with status"):
        other.start(timeout=5)
    assert server.running


def test_retries_with_a_new_port_when_the_picked_one_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken, taken])

        def racy_free_port(host: str = "127.0.0.1") -> int:
            return next(picks, None) or free_port(host)

        monkeypatch.setattr(managed_redis, "free_port", racy_free_port)
        with ManagedRedis() as m:
            assert m.port != taken and answers(m.port)


# -- errors -------------------------------------------------------------------------------------


def test_missing_binary_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerNotFound) as info:
        find_redis_server()
    assert str(info.value) == INSTALL_HINT
    assert "apt-get install redis-server" in INSTALL_HINT and "--redis-url" in INSTALL_HINT
    with pytest.raises(RedisServerNotFound, match="apt-get install redis-server"):
        ManagedRedis().start()


def test_a_missing_explicit_binary(tmp_path: Path) -> None:
    m = ManagedRedis(binary=str(tmp_path / "redis-server"))
    with pytest.raises(RedisServerNotFound, match=r"no such executable.*apt-get install"):
        m.start()
    assert not m.running


def test_found_on_path() -> None:
    assert Path(find_redis_server()).name == "redis-server"


def test_bad_arguments_fail_with_the_server_log() -> None:
    with pytest.raises(RuntimeError, match="Bad directive"):
        ManagedRedis(extra_args=["--no-such-directive", "1"]).start(timeout=5)


def test_extra_args_and_config_text() -> None:
    with (
        ManagedRedis(
            config="maxmemory 10mb\n", extra_args=["--maxmemory-policy", "allkeys-lru"]
        ) as m,
        redis.Redis.from_url(m.url) as c,
    ):
        assert c.config_get("maxmemory")["maxmemory"] == str(10 * 1024 * 1024)
        assert c.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::", "localhost", "example.com"])
def test_only_loopback_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        ManagedRedis(host=host)


@pytest.mark.parametrize("flag", ["--port", "--bind", "--dir"])
def test_extra_args_cannot_take_over_its_own_flags(flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        ManagedRedis(extra_args=[flag, "x"])


# -- the child never outlives its parent ----------------------------------------------------------

CHILD_SCRIPT = """
import sys, time
from cachegw_gateway.managed_redis import ManagedRedis
m = ManagedRedis()
m.start()
print(m.pid, m.port, m._dir, flush=True)
if sys.argv[1] == "sleep":
    time.sleep(60)
elif sys.argv[1] == "raise":
    raise SystemExit("exiting without stop()")
"""


def run_parent(mode: str) -> tuple[subprocess.Popen[str], int, int, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        proc.wait()
        raise AssertionError("the parent did not report its redis-server")
    pid, port, folder = line.split()
    return proc, int(pid), int(port), Path(folder)


def _reap(pid: int) -> None:
    # Only if the test failed: do not leave our own stray server behind.
    if not gone(pid):
        os.kill(pid, signal.SIGKILL)


def test_child_dies_when_its_parent_is_sigkilled() -> None:
    proc, pid, port, _ = run_parent("sleep")
    try:
        assert answers(port)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: gone(pid), timeout=10), "redis-server outlived its parent"
        assert not answers(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        _reap(pid)


@pytest.mark.parametrize("mode", ["return", "raise"])
def test_child_is_stopped_when_its_parent_exits_without_stop(mode: str) -> None:
    proc, pid, port, folder = run_parent(mode)
    try:
        proc.wait(20)
        assert gone(pid) and not answers(port)
        assert not folder.exists()  # atexit ran stop(), which removes the temp dir
    finally:
        proc.stdout.close()  # type: ignore[union-attr]
        _reap(pid)


def test_start_from_a_short_lived_thread_survives_the_thread() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* ends; the server must not.
    m = ManagedRedis()
    errors: list[BaseException] = []

    def start() -> None:
        try:
            m.start()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=start)
    worker.start()
    worker.join(30)
    try:
        assert not errors and not worker.is_alive()
        time.sleep(0.3)
        assert m.running and answers(m.port)
    finally:
        m.stop()


def test_runs_in_its_own_process_group(server: ManagedRedis) -> None:
    # A ^C at the terminal (SIGINT to our group) must not stop Redis under a draining gateway.
    assert server.pid is not None
    assert os.getpgid(server.pid) == server.pid != os.getpgid(0)
