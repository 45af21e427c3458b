"""What the example starts when it is not given one: a throwaway PostgreSQL (with
pg_stat_statements, for the query counts), a Redis, a gateway. Everything started is
stopped and removed by whoever started it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachegw_gateway.managed_postgres import ManagedPostgres
from cachegw_gateway.managed_redis import free_port
from shop import db

HERE = Path(__file__).resolve().parent.parent
GATEWAY_CONFIG = HERE / "cachegw.shop.toml"


def managed_postgres() -> ManagedPostgres:
    return ManagedPostgres(
        {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.max": "1000"}
    )


async def prepare(dsn: str, products: int, *, reseed: bool = False) -> None:
    """The schema, pg_stat_statements when the server has it, and the seed when the
    catalog is empty (or `reseed`)."""
    conn = await asyncpg.connect(dsn)
    try:
        await db.create_schema(conn)
        # Not preloaded (a server of yours): the demo counts transactions instead.
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if reseed or not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM products)"):
            await db.seed(conn, products)
    finally:
        await conn.close()


def gateway_config(origin: str) -> str:
    return GATEWAY_CONFIG.read_text().replace("{origin}", origin)


class GatewayProcess:
    """`cachegw serve` with the shop's classes, on a free loopback port, until stop()."""

    def __init__(self, redis_url: str, origin: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="shop-gateway-"))
        config = self.folder / "cachegw.toml"
        config.write_text(gateway_config(origin))
        self.address = f"127.0.0.1:{free_port()}"
        self.log = self.folder / "gateway.log"
        cachegw = Path(sys.executable).parent / "cachegw"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(cachegw),
                    "serve",
                    "--config",
                    str(config),
                    "--redis-url",
                    redis_url,
                    "--listen",
                    self.address,
                    "--log-level",
                    "WARNING",
                    "--grace",
                    "1",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._wait_serving()

    def _wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        output = self.log.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"the gateway did not start:\n{output}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()
