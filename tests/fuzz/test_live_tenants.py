"""The live fuzz run again, against a gateway with tokens and tenants ([auth] on): every
call goes through authentication, the tenant router, the key-prefix scope checks and a
tenant's call rate before its space. The caller's token is limited to key prefixes, so
PERMISSION_DENIED is documented here too; nothing may answer UNKNOWN or INTERNAL, and the
gateway must be healthy afterwards (the same checks as test_live.py, whose properties
run here with this module's gateway and client)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayProcess
from tests.fuzz import test_live as live
from tests.fuzz.conftest import CONFIG, serve_for_fuzzing
from tests.fuzz.harness import FuzzClient

TOKEN = "cgw_fuzz-scoped-token"
# Scopes that fuzzed keys hit and miss (edgy keys, "rl:", "win:", "fuzz:", "after").
TOKENS = f"""
[[tokens]]
name = "fuzzer"
hash = "sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}"
tenant = "fuzz"
permissions = ["all"]
prefixes = ["rl:", "win:", "fuzz:", "after", "\\u0000", "{{", "*"]
"""
TENANTS = """
[auth]
enabled = true
reload_seconds = 0.2

[tenants]
requests_per_second = 100000
max_subscribers = 64
"""


@pytest.fixture(scope="module")
def fuzz_gateway(
    tmp_path_factory: pytest.TempPathFactory, fuzz_redis: ManagedRedis
) -> Iterator[GatewayProcess]:
    folder: Path = tmp_path_factory.mktemp("fuzztenants")
    tokens = folder / "tokens.toml"
    tokens.write_text(TOKENS)
    config = CONFIG + TENANTS
    yield from serve_for_fuzzing(folder, config, fuzz_redis.url, "--tokens-file", str(tokens))


@pytest.fixture(scope="module")
def fuzz_client(fuzz_gateway: GatewayProcess) -> Iterator[FuzzClient]:
    with grpc.insecure_channel(fuzz_gateway.address) as channel:
        yield FuzzClient(
            channel,
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            also=frozenset({grpc.StatusCode.PERMISSION_DENIED}),
        )


# test_live.py's properties, collected here with this module's fixtures; the health
# check last, after the fuzzing (pytest runs a module's tests in this order).
test_edgy_messages = live.test_edgy_messages
test_mutated_and_random_bytes = live.test_mutated_and_random_bytes
test_concurrent_bursts = live.test_concurrent_bursts
test_gateway_healthy_afterwards = live.test_gateway_healthy_afterwards
