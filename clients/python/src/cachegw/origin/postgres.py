"""An example origin over one PostgreSQL table (asyncpg): a complete `cachegw.origin.Origin`.

    pip install 'cachegw[postgres]'
    python -m cachegw.origin.postgres --dsn postgresql://app@127.0.0.1/shop \\
        --table products --create --listen 127.0.0.1:7000

The table (``--create`` makes it, and the version sequence, when missing)::

    CREATE SEQUENCE <table>_versions;
    CREATE TABLE <table> (
        key     text PRIMARY KEY,
        value   bytea NOT NULL,
        tags    text[] NOT NULL DEFAULT '{}',
        version bigint NOT NULL,
        write_version bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE <table>_removed (key text PRIMARY KEY, write_version bigint NOT NULL);

Versions come from one sequence for the whole table: every store and every removal of a
key takes the next number, so a key's versions only grow, even across a removal and a
re-insert (what origin.proto's "Versions" asks for, and what lets the gateways order
concurrent writers). A compare-and-set store (``if_version``) is one conditional
statement. Load is one ``SELECT ... WHERE key = ANY($1)`` for the whole batch.

Write-behind (StoreEntry.write_version): a store or removal carrying a write version is
applied only when it is above the key's last one, kept in ``write_version`` (and, for a
removed key, in ``<table>_removed``: a tombstone, so that an older store delivered late
cannot bring the key back); otherwise it is answered as a conflict and nothing changes.
Each such write is one transaction holding an advisory lock on the key, so concurrent
flushes of one key from several gateways are ordered by version, not by arrival.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from cachegw.origin import (
    Conflict,
    Found,
    Origin,
    OriginUnavailable,
    Refused,
    StoreAnswer,
    Stored,
    Write,
)

__all__ = ["PostgresOrigin", "main"]

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# What says the database cannot be reached, as opposed to a bug in a statement.
UNREACHABLE = (
    OSError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
)


def _like_escape(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class PostgresOrigin(Origin):
    """Keys, values, tags and versions in one table."""

    def __init__(self, dsn: str, table: str, *, pool_size: int = 10) -> None:
        super().__init__()
        if not _IDENT.fullmatch(table):
            raise ValueError(f"table must be a lower-case SQL identifier (got {table!r})")
        self.dsn = dsn
        self.table = table
        self.sequence = f"{table}_versions"
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def connect(self, *, create: bool = False) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)
        if create:
            async with self._pool.acquire() as conn:
                await conn.execute(self.schema())

    def schema(self) -> str:
        return (
            f"CREATE SEQUENCE IF NOT EXISTS {self.sequence};\n"
            f"CREATE TABLE IF NOT EXISTS {self.table} (\n"
            "    key text PRIMARY KEY,\n"
            "    value bytea NOT NULL,\n"
            "    tags text[] NOT NULL DEFAULT '{}',\n"
            "    version bigint NOT NULL\n"
            ");\n"
            f"ALTER TABLE {self.table} ADD COLUMN IF NOT EXISTS "
            "write_version bigint NOT NULL DEFAULT 0;\n"
            f"CREATE TABLE IF NOT EXISTS {self.table}_removed (\n"
            "    key text PRIMARY KEY,\n"
            "    write_version bigint NOT NULL\n"
            ");"
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise OriginUnavailable("not connected to PostgreSQL (call connect() first)")
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            return list(await self.pool.fetch(sql, *args))
        except UNREACHABLE as exc:
            raise OriginUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    # -- the origin --------------------------------------------------------------------

    async def load(self, keys: Sequence[str]) -> Mapping[str, Found | None]:
        rows = await self._fetch(
            f"SELECT key, value, tags, version FROM {self.table} WHERE key = ANY($1::text[])",
            list(keys),
        )
        return {
            r["key"]: Found(bytes(r["value"]), version=r["version"], tags=tuple(r["tags"]))
            for r in rows
        }

    async def store(self, entries: Sequence[Write]) -> Sequence[StoreAnswer]:
        return [
            await (self._store_written(e) if e.write_version is not None else self._store_one(e))
            for e in entries
        ]

    async def _held(self, conn: asyncpg.Connection, key: str) -> int:
        """Under the key's advisory lock: the write version of its last write-behind
        store or removal (0 = none)."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)
        held: int = await conn.fetchval(
            f"SELECT greatest((SELECT write_version FROM {self.table} WHERE key = $1), "
            f"(SELECT write_version FROM {self.table}_removed WHERE key = $1), 0)",
            key,
        )
        return held

    async def _store_written(self, e: Write) -> StoreAnswer:
        t, seq = self.table, self.sequence
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if (e.write_version or 0) <= await self._held(conn, e.key):
                    current = await conn.fetchval(f"SELECT version FROM {t} WHERE key = $1", e.key)
                    return Conflict(current or 0)
                version: int = await conn.fetchval(
                    f"INSERT INTO {t} (key, value, tags, version, write_version) "
                    f"VALUES ($1, $2, $3, nextval('{seq}'), $4) ON CONFLICT (key) DO UPDATE "
                    "SET value = excluded.value, tags = excluded.tags, "
                    "version = excluded.version, write_version = excluded.write_version "
                    "RETURNING version",
                    e.key,
                    e.value,
                    list(e.tags),
                    e.write_version,
                )
                await conn.execute(f"DELETE FROM {t}_removed WHERE key = $1", e.key)
        except asyncpg.exceptions.DataError as exc:
            return Refused(f"PostgreSQL refused the value: {exc}")
        except UNREACHABLE as exc:
            raise OriginUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
        return Stored(version)

    async def remove_written(
        self, keys: Sequence[str], write_versions: Sequence[int]
    ) -> Mapping[str, int]:
        t, seq = self.table, self.sequence
        gone: dict[str, int] = {}
        try:
            async with self.pool.acquire() as conn:
                for key, written in zip(keys, write_versions, strict=True):
                    async with conn.transaction():
                        if written <= await self._held(conn, key):
                            continue
                        existed = await conn.fetchval(
                            f"DELETE FROM {t} WHERE key = $1 RETURNING true", key
                        )
                        await conn.execute(
                            f"INSERT INTO {t}_removed (key, write_version) VALUES ($1, $2) "
                            "ON CONFLICT (key) DO UPDATE "
                            "SET write_version = excluded.write_version",
                            key,
                            written,
                        )
                        if existed:
                            gone[key] = await conn.fetchval(f"SELECT nextval('{seq}')")
        except UNREACHABLE as exc:
            raise OriginUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
        return gone

    async def _store_one(self, e: Write) -> StoreAnswer:
        t, seq = self.table, self.sequence
        if e.if_version is None:
            # The version of an update is drawn once the row is locked (not in VALUES,
            # which runs before): of two concurrent writers, the one that commits last
            # gets the higher version, as the contract requires.
            sql = (
                f"INSERT INTO {t} (key, value, tags, version) "
                f"VALUES ($1, $2, $3, nextval('{seq}')) ON CONFLICT (key) DO UPDATE "
                f"SET value = excluded.value, tags = excluded.tags, version = nextval('{seq}') "
                "RETURNING version"
            )
            args: tuple[Any, ...] = (e.key, e.value, list(e.tags))
        elif e.if_version == 0:
            sql = (
                f"INSERT INTO {t} (key, value, tags, version) "
                f"VALUES ($1, $2, $3, nextval('{seq}')) ON CONFLICT (key) DO NOTHING "
                "RETURNING version"
            )
            args = (e.key, e.value, list(e.tags))
        else:
            sql = (
                f"UPDATE {t} SET value = $2, tags = $3, version = nextval('{seq}') "
                "WHERE key = $1 AND version = $4 RETURNING version"
            )
            args = (e.key, e.value, list(e.tags), e.if_version)
        try:
            rows = await self._fetch(sql, *args)
        except asyncpg.exceptions.DataError as exc:  # e.g. a value the column refuses
            return Refused(f"PostgreSQL refused the value: {exc}")
        if rows:
            return Stored(rows[0]["version"])
        current = await self._fetch(f"SELECT version FROM {t} WHERE key = $1", e.key)
        return Conflict(current[0]["version"] if current else 0)

    async def remove(self, keys: Sequence[str]) -> Mapping[str, int]:
        rows = await self._fetch(
            f"WITH gone AS (DELETE FROM {self.table} WHERE key = ANY($1::text[]) RETURNING key) "
            f"SELECT key, nextval('{self.sequence}') AS version FROM gone",
            list(keys),
        )
        return {r["key"]: r["version"] for r in rows}

    async def list_keys(self, prefix: str, limit: int, page_token: str) -> tuple[list[str], str]:
        limit = limit or 1000
        rows = await self._fetch(
            f"SELECT key FROM {self.table} WHERE key LIKE $1 ESCAPE '\\' AND key > $2 "
            "ORDER BY key LIMIT $3",
            _like_escape(prefix) + "%",
            page_token,
            limit,
        )
        keys = [r["key"] for r in rows]
        return keys, (keys[-1] if len(keys) == limit else "")


async def _run(args: argparse.Namespace) -> None:
    origin = PostgresOrigin(args.dsn, args.table, pool_size=args.pool_size)
    await origin.connect(create=args.create)
    try:
        await origin.serve(args.listen)
    finally:
        await origin.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cachegw.origin.postgres",
        description="A cachegw origin (cachegw.v1.Origin) over one PostgreSQL table.",
    )
    parser.add_argument("--dsn", required=True, help="postgresql://user@host:port/db")
    parser.add_argument("--table", default="cachegw_data", help="the table (default %(default)s)")
    parser.add_argument("--listen", default="127.0.0.1:7000", help="host:port to serve on")
    parser.add_argument("--create", action="store_true", help="create the table if missing")
    parser.add_argument("--pool-size", type=int, default=10, help="PostgreSQL connections")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
