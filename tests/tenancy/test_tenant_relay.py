"""Two regions with tenants: one `cachegw relay` per tenant, given the tenant's Redis
prefix (`--prefix <redis.prefix>:t:<tenant>`), carries that tenant's invalidations to the
other region, and nothing of another tenant. Real redis-servers, `cachegw serve` per
region with auth on, a real relay process."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from cachegw.client import Client
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from tests.conftest import BIN, GatewayProcess
from tests.relay_regions import wait_until
from tests.tenancy.test_isolation import TOKENS, auth_toml, tokens_file


@pytest.fixture
def two_regions(
    tmp_path: Path, gateway_process: Callable[..., GatewayProcess]
) -> Iterator[tuple[dict[str, Client], dict[str, Client], str, str]]:
    config = tmp_path / "cachegw.toml"
    config.write_text(auth_toml(tokens_file(tmp_path)))
    with ManagedRedis() as ra, ManagedRedis() as rb:
        regions = []
        for name, server in (("a", ra), ("b", rb)):
            gw = gateway_process(
                "--config", str(config), "--redis-url", server.url, "--gateway-id", f"gw-{name}"
            )
            regions.append({t: Client(gw.address, token=TOKENS[t]) for t in TOKENS})
        log = tmp_path / "relay.log"
        with log.open("wb") as out:
            relay = subprocess.Popen(
                [str(BIN / "cachegw"), "relay",
                 "--region", f"a={ra.url}", "--region", f"b={rb.url}",
                 "--prefix", "cg:t:alpha", "--metrics-port", str(free_port()),
                 "--block-ms", "200"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        # Ready once each direction holds its checkpoint (written before tailing).
        with redis.Redis.from_url(ra.url) as ca, redis.Redis.from_url(rb.url) as cb:
            wait_until(
                lambda: (
                    relay.poll() is not None
                    or (
                        cb.exists("cg:t:alpha:relay:a") == 1
                        and ca.exists("cg:t:alpha:relay:b") == 1
                    )
                ),
                what="relay checkpoints",
            )
        assert relay.poll() is None, log.read_text()
        try:
            yield regions[0], regions[1], ra.url, rb.url
        finally:
            relay.terminate()
            relay.wait(15)
            for region in regions:
                for c in region.values():
                    c.close()


def test_a_tenants_relay_carries_its_invalidations_only(
    two_regions: tuple[dict[str, Client], dict[str, Client], str, str],
) -> None:
    a, b, _, _ = two_regions
    for tenant in TOKENS:
        for region in (a, b):
            assert region[tenant].set("shared", f"{tenant}-v").stored
            assert region[tenant].get("shared") == f"{tenant}-v".encode()  # into L1 too
    a["alpha"].invalidate(keys=["shared"])
    wait_until(lambda: b["alpha"].get("shared") is None, what="alpha's key gone in b")
    a["beta"].invalidate(keys=["shared"])  # beta has no relay: b keeps beta's value
    assert b["beta"].get("shared") == b"beta-v"
    b["alpha"].set("back", "x")
    assert a["alpha"].set("back", "x").stored
    assert a["alpha"].get("back") == b"x"
    b["alpha"].invalidate(keys=["back"])  # the other way
    wait_until(lambda: a["alpha"].get("back") is None, what="alpha's key gone in a")
