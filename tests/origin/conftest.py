"""Fixtures of the origin tests: one throwaway PostgreSQL cluster and one example origin
process (`python -m cachegw.origin.postgres`, started the way a user starts it) per test
module, and the table's rows written straight into PostgreSQL, as the data's owner would.

Every Load and Store the origin serves is one INFO line in its log
(``origin Load: 3 keys: a, b, c``): `PgOrigin.loads(key)` counts the calls that named a
key, which is how the tests count origin calls."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

from cachegw_gateway.managed_redis import free_port
from tests.pg import ManagedPostgres

TABLE = "items"


@dataclass
class OriginProcess:
    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def calls(self, method: str, key: str | None = None) -> list[str]:
        """The log lines of `method` calls (that named `key`, when given)."""
        lines = [ln for ln in self.output().splitlines() if f"origin {method}: " in ln]
        if key is None:
            return lines
        pattern = re.compile(rf"(: |, ){re.escape(key)}(,|$)")
        return [ln for ln in lines if pattern.search(ln)]

    def loads(self, key: str | None = None) -> int:
        return len(self.calls("Load", key))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_origin(address: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Bounded: until the origin's port takes a gRPC connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
    raise TimeoutError(f"origin at {address} not serving (exit status {proc.poll()})")


def start_origin(
    script: list[str], folder: Path, name: str, address: str | None = None
) -> OriginProcess:
    """`python <script...> --listen ADDRESS` (a free port unless given), serving."""
    address = address or f"127.0.0.1:{free_port()}"
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *script, "--listen", address],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    origin = OriginProcess(proc, address, log)
    try:
        wait_origin(address, proc)
    except TimeoutError as exc:
        origin.stop(signal.SIGKILL)
        raise AssertionError(f"{exc}\n--- origin output ---\n{origin.output()}") from exc
    return origin


@pytest.fixture(scope="module")
def pg() -> Iterator[ManagedPostgres]:
    with ManagedPostgres() as server:
        yield server


@pytest.fixture(scope="module")
def pg_origin(
    pg: ManagedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OriginProcess]:
    folder = tmp_path_factory.mktemp("origin")
    origin = start_origin(
        ["-m", "cachegw.origin.postgres", "--dsn", pg.dsn, "--table", TABLE, "--create"],
        folder,
        "pg-origin",
    )
    yield origin
    origin.stop()


@pytest.fixture
async def db(pg: ManagedPostgres, pg_origin: OriginProcess) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the origin's database (the table exists: the origin made it)."""
    conn = await asyncpg.connect(pg.dsn)
    try:
        yield conn
    finally:
        await asyncio.wait_for(conn.close(), 10)


async def put_row(db: asyncpg.Connection, key: str, value: bytes, tags: list[str] = []) -> int:  # noqa: B006
    """Write a row as the data's owner would (not through the gateway); its version."""
    version: int = await db.fetchval(
        f"INSERT INTO {TABLE} (key, value, tags, version) "
        f"VALUES ($1, $2, $3, nextval('{TABLE}_versions')) ON CONFLICT (key) DO UPDATE "
        "SET value = excluded.value, tags = excluded.tags, version = excluded.version "
        "RETURNING version",
        key,
        value,
        tags,
    )
    return version


async def row(db: asyncpg.Connection, key: str) -> tuple[bytes, int] | None:
    got = await db.fetchrow(f"SELECT value, version FROM {TABLE} WHERE key = $1", key)
    return None if got is None else (bytes(got["value"]), got["version"])
