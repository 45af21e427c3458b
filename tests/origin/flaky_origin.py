"""An origin whose health a test changes while it runs (fail-safe, refresh-ahead), its own
process, built on the Python base class:

    python tests/origin/flaky_origin.py --listen 127.0.0.1:PORT --mode-file PATH

Rows live in memory, numbered by one version counter shared by every key: a key is
created at its first Load (value ``<key>@<version>``), a Store replaces it with a new
version (if_version honoured). Every Load reads the mode file first (absent = ok):

    ok              answer at once
    down            UNAVAILABLE ("the database is down"), nothing read
    slow SECONDS    read the rows, then answer them that late

A Load that starts while another Load of one of its keys is in flight logs ``origin
overlap: <key>`` (the refresh-ahead tests check that gateways never load a key twice at
once). Every call is logged as the base class does (``origin Load: N keys: a, b``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from cachegw.origin import Conflict, Found, Origin, OriginUnavailable, StoreAnswer, Stored, Write

log = logging.getLogger("cachegw.origin")


class FlakyOrigin(Origin):
    def __init__(self, mode_file: Path) -> None:
        super().__init__()
        self._mode_file = mode_file
        self._rows: dict[str, tuple[bytes, int]] = {}
        self._version = 0
        self._loading: dict[str, int] = {}

    def _mode(self) -> list[str]:
        try:
            return self._mode_file.read_text().split() or ["ok"]
        except FileNotFoundError:
            return ["ok"]

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    async def load(self, keys: Sequence[str]) -> Mapping[str, Found | None]:
        for key in keys:
            if self._loading.get(key):
                log.info("origin overlap: %s", key)
            self._loading[key] = self._loading.get(key, 0) + 1
        try:
            mode = self._mode()
            if mode[0] == "down":
                raise OriginUnavailable("the database is down")
            out: dict[str, Found | None] = {}
            for key in keys:
                if key not in self._rows:
                    version = self._next_version()
                    self._rows[key] = (f"{key}@{version}".encode(), version)
                value, version = self._rows[key]
                out[key] = Found(value, version=version)
            if mode[0] == "slow":  # what it read, late (a write may land meanwhile)
                await asyncio.sleep(float(mode[1]))
            return out
        finally:
            for key in keys:
                self._loading[key] -= 1

    async def store(self, entries: Sequence[Write]) -> Sequence[StoreAnswer]:
        answers: list[StoreAnswer] = []
        for e in entries:
            current = self._rows.get(e.key, (b"", 0))[1]
            if e.if_version is not None and e.if_version != current:
                answers.append(Conflict(current))
                continue
            version = self._next_version()
            self._rows[e.key] = (e.value, version)
            answers.append(Stored(version))
        return answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--mode-file", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(FlakyOrigin(args.mode_file).serve(args.listen))


if __name__ == "__main__":
    main()
