"""One `cachegw serve` process on a real redis-server for a whole fuzz module (starting
one per hypothesis example would cost more than the examples), and the client that
fuzzes it. FUZZ_EXAMPLES sets how many examples each live property runs (`make fuzz`)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cachegw_gateway.managed_redis import ManagedRedis, free_port
from tests.conftest import BIN, GatewayProcess, wait_serving
from tests.fuzz.harness import FuzzClient

MAX_KEY_BYTES = 64  # small, so that keys past the limit are cheap to generate

# Classes for every kind of key the RPCs treat differently: a default class, one with a
# rate limit of each algorithm, one without L1. Leases are short: a fuzzed Get takes
# leases it never fills, and a later Get of the key (max_wait_ms up to 49 days) waits
# until the lease ends or its deadline is near.
LEASES = "lease_timeout_seconds = 0.2\nmax_wait_seconds = 0.5"
CONFIG = f"""
[server]
max_key_bytes = {MAX_KEY_BYTES}
max_batch_keys = 16
max_ttl_seconds = 86400

[default_class]
max_value_bytes = 1024
{LEASES}

[[classes]]
name = "limited"
patterns = ["rl:*"]
rate_limit = {{ rate = 5, period_seconds = 1, burst = 3 }}
{LEASES}

[[classes]]
name = "window"
patterns = ["win:*"]
l1 = false
{LEASES}
[classes.rate_limit]
rate = 4
period_seconds = 1
algorithm = "sliding_window"
"""


def examples(default: int) -> int:
    """How many examples a live property runs: FUZZ_EXAMPLES, or `default`."""
    return int(os.environ.get("FUZZ_EXAMPLES", default))


@pytest.fixture(scope="module")
def fuzz_redis() -> Iterator[ManagedRedis]:
    with ManagedRedis() as server:
        yield server


def serve_for_fuzzing(
    folder: Path, config_text: str, redis_url: str, *flags: str
) -> Iterator[GatewayProcess]:
    """A `cachegw serve` process with `config_text`, SERVING, stopped afterwards."""
    config = folder / "cachegw.toml"
    config.write_text(config_text)
    address = f"127.0.0.1:{free_port()}"
    log = folder / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "cachegw"), "serve", "--listen", address, "--config", str(config),
             "--redis-url", redis_url, *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    gp = GatewayProcess(proc, address, log)
    try:
        wait_serving(address, alive=lambda: proc.poll() is None)
        yield gp
    finally:
        gp.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def fuzz_gateway(
    tmp_path_factory: pytest.TempPathFactory, fuzz_redis: ManagedRedis
) -> Iterator[GatewayProcess]:
    yield from serve_for_fuzzing(tmp_path_factory.mktemp("fuzzgw"), CONFIG, fuzz_redis.url)


@pytest.fixture(scope="module")
def fuzz_client(fuzz_gateway: GatewayProcess) -> Iterator[FuzzClient]:
    with grpc.insecure_channel(fuzz_gateway.address) as channel:
        yield FuzzClient(channel)
