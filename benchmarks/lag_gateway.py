"""A gateway for benchmarks/bench_invalidation.py: `cachegw serve` plus a loop-lag monitor.

The gateway is the ordinary one (`cachegw_gateway.main.serve`, the configuration loaded
the same way); next to it, on its event loop, a task sleeps `--tick-ms` over and over
and measures how late it wakes up. A late tick means the loop was busy with something
else (or the process was not scheduled). Each tick at least `--threshold-ms` late is
printed as one line:

    lag <wall clock at the end of the tick, s> <lag ms> <loop-thread CPU during the tick, ms>

The CPU figure (the event loop thread's own CPU time over the tick) tells a stall of
the gateway's own making (CPU ~ lag) from the machine not running it (CPU ~ 0).

    .venv/bin/python benchmarks/lag_gateway.py --listen 127.0.0.1:PORT \\
        --redis-url redis://127.0.0.1:6379/0 [--config FILE] [--gateway-id gw0]

SIGTERM stops it like `cachegw serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from cachegw_gateway.config import load_config
from cachegw_gateway.main import serve
from cachegw_gateway.telemetry import logs


async def monitor(tick: float, threshold: float) -> None:
    out = sys.stdout
    clock, cpu = time.perf_counter, time.thread_time
    while True:
        t0, c0 = clock(), cpu()
        await asyncio.sleep(tick)
        lag = clock() - t0 - tick
        if lag >= threshold:
            busy = cpu() - c0
            out.write(f"lag {time.time():.6f} {lag * 1000:.3f} {busy * 1000:.3f}\n")
            out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--listen", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--config")
    p.add_argument("--gateway-id", default="gw")
    p.add_argument("--redis-prefix", default="cg")
    p.add_argument("--tick-ms", type=float, default=1.0)
    p.add_argument("--threshold-ms", type=float, default=1.0)
    a = p.parse_args(argv)
    overrides = {
        "server.listen": a.listen,
        "redis.url": a.redis_url,
        "redis.prefix": a.redis_prefix,
        "server.gateway_id": a.gateway_id,
    }
    config = load_config(a.config, env={}, overrides=overrides)
    logs.setup("WARNING", "text")

    async def run() -> int:
        task = asyncio.create_task(monitor(a.tick_ms / 1000, a.threshold_ms / 1000))
        try:
            return await serve(config, a.redis_url)
        finally:
            task.cancel()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
