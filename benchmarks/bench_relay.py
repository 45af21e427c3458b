"""Relay lag between two regions, and the events/s one relay sustains.

In one run, on this host: two managed redis-servers (regions a and b), two `cachegw
serve` processes in a (a0 takes the writes, a1 is the same-region reference) and one in
b, and a `cachegw relay` process linking a and b, all started the way a user starts
them.

1. Lag. Per event: a fresh key is Set in both regions and read until each observing
   gateway serves it from L1 (a1 and b0); then Invalidate(key) through a0. Timed from
   the start of the Invalidate call until the gateway's Get no longer answers the old
   value: b0 (across the relay) and a1 (same region, the reference: the pub/sub hop
   the relay adds to). p50 / p99 / max, and the ratio of the medians.
2. Throughput. --burst key events (as a gateway publishes them) are appended to a's
   stream in pipelined batches while the relay runs; timed from the first append until
   the relay's checkpoint in b reaches the last one: the events/s it applies in b (each
   a delete script there plus its copy on b's stream and channel).

The aims are in AIMS below; a missed aim makes the script exit 1 (timings on a shared
2-core host are noisy: the aims are loose).

Run (from the repository root, after `make setup`):

    .venv/bin/python benchmarks/bench_relay.py            # about 30 s
    .venv/bin/python benchmarks/bench_relay.py --quick    # about 10 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (
    Aim,
    ServerProcess,
    check_aims,
    fmt_number,
    median,
    percentile,
    render_table,
    sigterm_as_interrupt,
    start_gateways,
)
from cachegw.aio import AsyncClient
from cachegw.models import Tier
from cachegw_gateway import events
from cachegw_gateway.managed_redis import ManagedRedis

AIMS = [
    Aim("relay lag p50", "Invalidate in a -> b's gateway stops serving (p50)", "<", 50.0, "ms"),
    Aim("relay lag p99", "the same, p99", "<", 500.0, "ms"),
    Aim("relay hop", "cross-region / same-region lag (medians)", "<=", 3.0),
    Aim("relay throughput", "key events applied in b per second", ">=", 1000.0, ""),
]
POLL_LIMIT = 5.0  # seconds one observation may take before the run is declared broken


def relay_process(stack: ExitStack, a_url: str, b_url: str, work: Path) -> subprocess.Popen[bytes]:
    log = work / "relay.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "cachegw"), "relay",
             "--region", f"a={a_url}", "--region", f"b={b_url}", "--log-level", "WARNING"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    stack.callback(stop)
    return proc


async def until_gone(client: AsyncClient, key: str, t0: float) -> float:
    """ms from `t0` until `client` no longer serves `key`."""
    deadline = t0 + POLL_LIMIT
    while await client.get(key) is not None:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{key} still served {POLL_LIMIT}s after its Invalidate")
    return (time.perf_counter() - t0) * 1000


async def in_l1(client: AsyncClient, key: str) -> None:
    for _ in range(100):
        if (await client.lookup(key)).tier == Tier.L1:
            return
    raise RuntimeError(f"{key} never reached L1")


async def lag(n: int, a0: str, a1: str, b0: str) -> tuple[list[float], list[float]]:
    writer, same, other = AsyncClient(a0), AsyncClient(a1), AsyncClient(b0)
    cross: list[float] = []
    local: list[float] = []
    try:
        for i in range(n):
            key = f"lag:{i}"
            await writer.set(key, b"a")
            await other.set(key, b"b")
            await in_l1(same, key)
            await in_l1(other, key)
            t0 = time.perf_counter()
            watch = asyncio.gather(until_gone(other, key, t0), until_gone(same, key, t0))
            await writer.invalidate([key])
            b_ms, a_ms = await watch
            cross.append(b_ms)
            local.append(a_ms)
    finally:
        for c in (writer, same, other):
            await c.close()
    return cross, local


def throughput(a_url: str, b_url: str, burst: int) -> tuple[float, float]:
    """(events/s, seconds) for `burst` key events appended to a's stream at once."""
    ra, rb = redis.Redis.from_url(a_url), redis.Redis.from_url(b_url)
    try:
        payloads = [
            events.make(origin="bench", keys=[f"burst:{i}"]).SerializeToString()
            for i in range(burst)
        ]
        t0 = time.perf_counter()
        last = b""
        for start in range(0, burst, 1000):
            with ra.pipeline(transaction=False) as pipe:
                for payload in payloads[start : start + 1000]:
                    pipe.xadd("cg:events", {"e": payload}, maxlen=1_000_000, approximate=True)
                last = pipe.execute()[-1]
        deadline = time.monotonic() + 120
        while True:
            checkpoint = bytes(rb.get("cg:relay:a") or b"")  # type: ignore[arg-type]
            if checkpoint.split(b" ")[0] == last:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the relay did not catch up within 120 s")
            time.sleep(0.005)
        seconds = time.perf_counter() - t0
        return burst / seconds, seconds
    finally:
        ra.close()
        rb.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=300, help="events timed for the lag")
    p.add_argument("--burst", type=int, default=20_000, help="events for the throughput")
    p.add_argument("--quick", action="store_true", help="100 events, a burst of 5000")
    args = p.parse_args(argv)
    n, burst = (100, 5000) if args.quick else (args.events, args.burst)
    t_start = time.monotonic()
    with sigterm_as_interrupt(), ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ra = stack.enter_context(ManagedRedis())
        rb = stack.enter_context(ManagedRedis())
        (work / "a").mkdir()
        (work / "b").mkdir()
        gw_a: list[ServerProcess] = start_gateways(stack, 2, ra.url, "", work / "a")
        gw_b: list[ServerProcess] = start_gateways(stack, 1, rb.url, "", work / "b")
        relay = relay_process(stack, ra.url, rb.url, work)
        deadline = time.monotonic() + 30
        check = redis.Redis.from_url(rb.url)
        while not check.exists("cg:relay:a"):
            if relay.poll() is not None or time.monotonic() > deadline:
                print((work / "relay.log").read_text(errors="replace"), file=sys.stderr)
                raise RuntimeError("the relay did not start")
            time.sleep(0.05)
        check.close()

        cross, local = asyncio.run(lag(n, gw_a[0].address, gw_a[1].address, gw_b[0].address))
        rate, seconds = throughput(ra.url, rb.url, burst)

    rows = []
    for name, values in (("b0 (other region, via relay)", cross), ("a1 (same region)", local)):
        s = sorted(values)
        rows.append(
            [name, str(len(s))] + [f"{percentile(s, q):.2f}" for q in (50, 99)] + [f"{s[-1]:.2f}"]
        )
    print("\n1. lag: Invalidate(key) through a0 -> the gateway stops serving the old value (ms)")
    print(render_table(["observer", "events", "p50", "p99", "max"], rows, right="lrrrr"))
    print(f"cross-region / same-region (medians): {median(cross) / median(local):.2f}x")
    print(f"\n2. throughput: {burst} key events appended to a at once")
    print(
        render_table(
            ["events", "seconds", "events/s"],
            [[str(burst), f"{seconds:.2f}", fmt_number(rate)]],
            right="rrr",
        )
    )
    measured = {
        "relay lag p50": percentile(sorted(cross), 50),
        "relay lag p99": percentile(sorted(cross), 99),
        "relay hop": median(cross) / median(local),
        "relay throughput": rate,
    }
    met = check_aims(AIMS, measured)
    print(f"total wall time {time.monotonic() - t_start:.0f} s")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
