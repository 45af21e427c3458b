"""`cachegw serve --workers N`: one port, N gateway processes under a supervisor.

Real `cachegw serve` processes over loopback and a real redis-server. Each channel here
has its own connection (a local subchannel pool), so fresh channels land on workers as
the kernel's SO_REUSEPORT hashing spreads them, and a kept channel stays on its worker.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import grpc
import pytest
from rich.console import Console

from cachegw import top
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.config import ConfigError, load_config
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.telemetry.aggregate import merge
from cachegw_gateway.workers import WORKER_ENV, WorkersError, WorkerSlot, cores, resolve_count
from tests.conftest import BIN, GatewayProcess

Start = Callable[..., GatewayProcess]
SERVING = re.compile(
    r"cachegw\.supervisor: serving on (\S+) with (\d+) workers \(pids ([\d, ]+);.*?metrics (\S+)\)"
)
TRIES = 200  # fresh channels tried to reach a given worker


@contextmanager
def channel(address: str) -> Iterator[cache_pb2_grpc.CacheServiceStub]:
    """A stub on a channel with a connection of its own (not shared with other channels
    of this process, as gRPC does by default for the same target)."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        yield cache_pb2_grpc.CacheServiceStub(ch)


def stats(address: str) -> pb.StatsResponse:
    with channel(address) as stub:
        reply: pb.StatsResponse = stub.Stats(pb.StatsRequest(), timeout=5)
        return reply


def wait_for(check: Callable[[], object], what: str, within: float = 20.0) -> object:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not after {within}s"
        time.sleep(0.05)


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`, from /proc."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, ppid = text.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.add(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rpartition(")")[2].split()[0] != "Z"


def supervisor_started(gw: GatewayProcess) -> tuple[list[int], str]:
    """(worker pids, metrics address) from the supervisor's start line, once logged."""
    match = wait_for(lambda: SERVING.search(gw.output()), "the supervisor's start line")
    assert isinstance(match, re.Match)
    pids = [int(p) for p in match.group(3).split(", ")]
    metrics = match.group(4).removeprefix("http://").removesuffix("/metrics")
    return pids, metrics


def reach(address: str, index: int) -> None:
    """Bounded: fresh channels until one lands on worker `index`."""
    for _ in range(TRIES):
        if stats(address).worker_index == index:
            return
    raise AssertionError(f"worker {index} not reached in {TRIES} fresh channels")


@contextmanager
def pinned(address: str, index: int) -> Iterator[cache_pb2_grpc.CacheServiceStub]:
    """A stub whose connection is to worker `index` (fresh channels until one is)."""
    for _ in range(TRIES):
        with channel(address) as stub:
            if stub.Stats(pb.StatsRequest(), timeout=5).worker_index == index:
                yield stub
                return
    raise AssertionError(f"worker {index} not reached in {TRIES} fresh channels")


def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_both_workers_serve_the_port_and_metrics_add_up(
    gateway_process: Start, redis_server: ManagedRedis
) -> None:
    gw = gateway_process(
        "--workers", "2", "--redis-url", redis_server.url,
        "--gateway-id", "gw", "--metrics-listen", "127.0.0.1:0",
    )  # fmt: skip
    pids, metrics = supervisor_started(gw)
    assert set(pids) == children(gw.proc.pid)  # the workers are the supervisor's children
    seen: dict[int, pb.StatsResponse] = {}
    gets = 0
    for _ in range(TRIES):  # calls from fresh channels reach both workers
        with channel(gw.address) as stub:
            stub.Get(pb.GetRequest(key="spread"), timeout=5)
            gets += 1
            reply = stub.Stats(pb.StatsRequest(), timeout=5)
        seen[reply.worker_index] = reply
        if len(seen) == 2 and gets >= 10:
            break
    assert sorted(seen) == [0, 1], seen.keys()
    for index, reply in seen.items():
        assert reply.workers == 2
        assert reply.gateway_id == f"gw-w{index}"
        assert reply.pid in pids
    assert seen[0].pid != seen[1].pid

    # /metrics of the supervisor: every worker's figures, added up.
    figures = scrape(metrics)
    assert figures['cachegw_rpc_duration_seconds_count{method="Get"}'] == gets
    assert figures['cachegw_misses_total{class="default"}'] == gets
    per_worker = [figures[f'cachegw_worker_calls_total{{worker="{i}"}}'] for i in (0, 1)]
    assert all(calls > 0 for calls in per_worker)
    assert figures["cachegw_workers"] == 2 and figures["cachegw_workers_serving"] == 2
    assert figures["cachegw_redis_up"] == 1
    assert figures["cachegw_l1_max_entries"] == 2 * seen[0].l1.max_entries
    for index in (0, 1):
        info = f'cachegw_gateway_info{{gateway_id="gw-w{index}",trace_exporter="none",'
        assert any(name.startswith(info) for name in figures), index

    # `cachegw top` names the worker it reads, and says where the totals are.
    proc = subprocess.run(
        [str(BIN / "cachegw"), "top", gw.address, "--count", "1"],
        capture_output=True, timeout=30, check=False, env={"COLUMNS": "250", "PATH": str(BIN)},
    )  # fmt: skip
    text = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert re.search(r"gw-w[01] \(worker [01] of 2\)", text), text
    assert "every worker is under 'workers'" in " ".join(text.split())
    for pid in pids:  # a row per worker process, whichever worker answered Stats
        assert re.search(rf"\b{pid}\b.*serving", text), text
    assert gw.stop() == 0


def summaries(stub: cache_pb2_grpc.CacheServiceStub) -> dict[int, pb.WorkerSummary]:
    reply = stub.Stats(pb.StatsRequest(), timeout=5)
    return {w.index: w for w in reply.worker_summaries}


def calls_seen(
    stub: cache_pb2_grpc.CacheServiceStub, calls: tuple[int, int]
) -> dict[int, pb.WorkerSummary] | None:
    """The summaries once they show `calls` for workers 0 and 1."""
    rows = summaries(stub)
    return rows if tuple(rows[i].calls for i in (0, 1) if i in rows) == calls else None


def render(view: top.TopView) -> str:
    console = Console(record=True, width=250, color_system=None)
    console.print(view.render())
    return console.export_text()


def test_any_workers_stats_and_top_show_every_worker(
    gateway_process: Start, redis_server: ManagedRedis
) -> None:
    gw = gateway_process("--workers", "2", "--redis-url", redis_server.url)
    pids, _ = supervisor_started(gw)
    with pinned(gw.address, 0) as w0, pinned(gw.address, 1) as w1:
        w0.Set(pb.SetRequest(key="k", value=b"v"), timeout=5)
        for _ in range(30):
            w0.Get(pb.GetRequest(key="k"), timeout=5)
        for _ in range(5):
            w1.Get(pb.GetRequest(key="k"), timeout=5)
        for stub, index in ((w0, 0), (w1, 1)):
            assert stub.Stats(pb.StatsRequest(), timeout=5).worker_index == index
            # The supervisor reuses a round of scrapes for half a second: wait for one
            # taken after the calls above (Stats and Subscribe are not counted).
            rows = wait_for(
                partial(calls_seen, stub, (31, 5)),
                f"worker {index}'s Stats showing both workers' calls",
            )
            assert isinstance(rows, dict) and sorted(rows) == [0, 1]
            assert {w.pid for w in rows.values()} == set(pids)
            for w in rows.values():
                assert w.serving and w.answered and w.restarts == 0
                assert w.rss_bytes > 0 and w.uptime_ms > 0
                assert w.rpcs_in_flight <= 1  # at most a Stats call being answered
                assert w.l1_entries == 1 and w.l1_bytes > 0  # each holds its own copy of k

        # `cachegw top`: one row per worker, rates over two polls.
        view = top.TopView([gw.address])
        with grpc.insecure_channel(gw.address) as ch:
            stubs = {gw.address: cache_pb2_grpc.CacheServiceStub(ch)}
            view.update(top.poll(stubs, timeout=5, top_keys=0))
            for _ in range(20):
                w1.Get(pb.GetRequest(key="k"), timeout=5)
            time.sleep(0.6)  # past the supervisor's reuse of its last scrapes
            view.update(top.poll(stubs, timeout=5, top_keys=0))
        text = render(view)
        rows = [line for line in text.splitlines() if gw.address in line and "serving" in line]
        assert len(rows) == 2, text
        cells = [[c.strip() for c in row.strip("│ ").split("│")] for row in rows]
        for index, (row, pid) in enumerate(zip(cells, pids, strict=True)):
            assert row[1:5] == [str(index), str(pid), "serving", "0"], text
        assert float(cells[1][5].replace(",", "")) > 0, text  # worker 1's calls/s

        # A killed worker shows restarting or starting, then serving again with a new pid.
        os.kill(pids[1], signal.SIGKILL)
        replaced = wait_for(
            lambda: (w := summaries(w0)[1]).restarts == 1 and w.serving and w.answered and w,
            "worker 1 replaced in worker 0's Stats",
        )
        assert isinstance(replaced, pb.WorkerSummary) and replaced.pid not in pids
        assert replaced.calls == 0  # a new process: its counters start again
    assert gw.stop() == 0


def test_an_invalidation_through_one_worker_evicts_the_other_workers_copy(
    gateway_process: Start, redis_server: ManagedRedis
) -> None:
    gw = gateway_process("--workers", "2", "--redis-url", redis_server.url)
    supervisor_started(gw)  # both serve
    with pinned(gw.address, 0) as w0, pinned(gw.address, 1) as w1:
        assert w0.Set(pb.SetRequest(key="p:1", value=b"old"), timeout=5).outcome == (
            pb.SET_OUTCOME_STORED
        )
        for stub in (w0, w1):  # each worker holds its own L1 copy
            stub.Get(pb.GetRequest(key="p:1"), timeout=5)
            reply = stub.Get(pb.GetRequest(key="p:1"), timeout=5)
            assert (reply.status, reply.tier, reply.value) == (pb.STATUS_HIT, pb.TIER_L1, b"old")
        received = w0.Stats(pb.StatsRequest(), timeout=5).invalidations_received
        assert w1.Invalidate(pb.InvalidateRequest(keys=["p:1"]), timeout=5).removed == 1
        wait_for(
            lambda: w0.Get(pb.GetRequest(key="p:1"), timeout=5).status == pb.STATUS_MISS,
            "worker 0 evicting its copy",
        )
        assert w0.Stats(pb.StatsRequest(), timeout=5).invalidations_received > received
    assert gw.stop() == 0


def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(
    gateway_process: Start, redis_server: ManagedRedis
) -> None:
    gw = gateway_process("--workers", "2", "--redis-url", redis_server.url)
    supervisor_started(gw)
    with pinned(gw.address, 0) as w0:
        victim = w0.Stats(pb.StatsRequest(), timeout=5).pid
    os.kill(victim, signal.SIGKILL)
    # Reaped by the supervisor: every thread of it gone, so its listening socket is closed
    # (connections queued there when it died were reset: clients retry those).
    exited = f"worker 0 (pid {victim}) exited (killed by SIGKILL); starting it again in"
    wait_for(lambda: exited in gw.output(), "the supervisor noticing")
    for i in range(20):  # the other worker answers every new connection meanwhile
        with channel(gw.address) as stub:
            assert stub.Set(pb.SetRequest(key=f"k:{i}", value=b"v"), timeout=5).outcome == (
                pb.SET_OUTCOME_STORED
            )
    wait_for(lambda: "worker 0 serving again" in gw.output(), "worker 0 replaced")
    workers = children(gw.proc.pid)
    assert len(workers) == 2 and victim not in workers
    reach(gw.address, 0)  # the new worker 0 serves the port
    reach(gw.address, 1)
    assert gw.stop() == 0
    assert not any(alive(pid) for pid in workers)


def test_sigterm_drains_every_worker_and_exits_0_with_nothing_left(
    gateway_process: Start,
) -> None:
    gw = gateway_process("--workers", "2", "--embedded-redis", "--grace", "5")
    pids, _ = supervisor_started(gw)
    family = children(gw.proc.pid)  # the workers and the managed redis-server
    assert set(pids) < family and len(family) == 3
    ended: list[grpc.StatusCode] = []
    with pinned(gw.address, 1) as w1:
        stream = w1.Subscribe(pb.SubscribeRequest(prefixes=["d:"]))

        def read() -> None:
            try:
                for _ in stream:
                    pass
            except grpc.RpcError as exc:
                ended.append(exc.code())

        reader = threading.Thread(target=read)
        reader.start()
        wait_for(lambda: w1.Stats(pb.StatsRequest(), timeout=5).subscribers == 1, "stream open")
        gw.proc.send_signal(signal.SIGTERM)
        reader.join(timeout=20)
        assert not reader.is_alive()
    assert gw.proc.wait(timeout=30) == 0
    assert ended == [grpc.StatusCode.UNAVAILABLE]  # the clients' cue to subscribe again
    out = gw.output()
    for index in (0, 1):  # each worker ran its graceful drain
        assert f"cachegw[w{index}]: stopping: NOT_SERVING" in out
        assert f"cachegw[w{index}]: stopped" in out
    assert "stopped 2 workers" in out
    wait_for(lambda: not any(alive(pid) for pid in family), "every child gone", within=10)


def test_workers_drain_and_exit_when_the_supervisor_is_killed(gateway_process: Start) -> None:
    gw = gateway_process("--workers", "2", "--embedded-redis")
    pids, _ = supervisor_started(gw)
    family = children(gw.proc.pid)  # the workers and the managed redis-server
    assert set(pids) < family and len(family) == 3
    gw.proc.kill()
    gw.proc.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in family), "no orphaned process", within=20)
    out = gw.output()
    for index in (0, 1):
        assert f"cachegw[w{index}]: stopping: NOT_SERVING" in out


def test_a_second_supervisor_cannot_share_the_port(
    gateway_process: Start, redis_server: ManagedRedis
) -> None:
    gw = gateway_process("--workers", "2", "--redis-url", redis_server.url)
    second = subprocess.run(
        [str(BIN / "cachegw"), "serve", "--workers", "2", "--listen", gw.address,
         "--redis-url", redis_server.url],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert second.returncode == 1, second
    assert f"cannot listen on {gw.address}" in second.stderr.decode()
    assert gw.stop() == 0


def test_workers_setting(tmp_path: Path) -> None:
    assert resolve_count(3) == 3
    assert resolve_count("auto") == cores() == len(os.sched_getaffinity(0))
    config = tmp_path / "c.toml"
    for text, expected in (("workers = 4", 4), ('workers = "auto"', "auto"), ("", 1)):
        config.write_text(f"[server]\n{text}\n")
        assert load_config(config, env={}).server.workers == expected
    assert load_config(env={"CACHEGW_WORKERS": "auto"}).server.workers == "auto"
    assert load_config(env={}, overrides={"server.workers": "2"}).server.workers == 2
    for bad in ("workers = 0", 'workers = "many"', "workers = true"):
        config.write_text(f"[server]\n{bad}\n")
        with pytest.raises(
            ConfigError, match=r"server\.workers must be a positive integer or 'auto'"
        ):
            load_config(config, env={})


def test_merged_figures_sum_counters_and_take_the_worst_state() -> None:
    def worker(up: int, ping: float, calls: int, in_flight: int) -> str:
        return (
            "# TYPE cachegw_redis_up gauge\n"
            f"cachegw_redis_up {up}\n"
            "# TYPE cachegw_redis_ping_seconds gauge\n"
            f"cachegw_redis_ping_seconds {ping}\n"
            "# TYPE cachegw_rpcs_in_flight gauge\n"
            f"cachegw_rpcs_in_flight {in_flight}\n"
            "# TYPE cachegw_hits counter\n"
            f'cachegw_hits_total{{class="a",tier="l1"}} {calls}\n'
            "# TYPE cachegw_rpc_duration_seconds histogram\n"
            f'cachegw_rpc_duration_seconds_bucket{{method="Get",le="+Inf"}} {calls}\n'
            f'cachegw_rpc_duration_seconds_count{{method="Get"}} {calls}\n'
            f'cachegw_rpc_duration_seconds_sum{{method="Get"}} {calls / 1000}\n'
        )

    merged = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in merge([worker(1, 0.001, 5, 2), worker(0, 0.003, 7, 1)])
        for s in family.samples
    }
    assert merged[("cachegw_redis_up", ())] == 0  # not up unless every worker is
    assert merged[("cachegw_redis_ping_seconds", ())] == 0.003
    assert merged[("cachegw_rpcs_in_flight", ())] == 3
    assert merged[("cachegw_hits_total", (("class", "a"), ("tier", "l1")))] == 12
    assert merged[("cachegw_rpc_duration_seconds_count", (("method", "Get"),))] == 12
    bucket = (("le", "+Inf"), ("method", "Get"))
    assert merged[("cachegw_rpc_duration_seconds_bucket", bucket)] == 12


def test_worker_slot_from_env() -> None:
    slot = WorkerSlot(1, 2, 7, "127.0.0.1:4000")
    assert WorkerSlot.from_env({WORKER_ENV: slot.env_value()}) == slot
    assert WorkerSlot.from_env({WORKER_ENV: "1/2/7"}) == WorkerSlot(1, 2, 7, "")
    assert WorkerSlot.from_env({}) is None
    for bad in ("1/2", "2/2/7", "a/2/7", "1/2/7/x/y"):
        with pytest.raises(WorkersError):
            WorkerSlot.from_env({WORKER_ENV: bad})
