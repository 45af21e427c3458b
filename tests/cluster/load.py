"""A bounded mixed load for the cluster fault tests: concurrent Gets and Sets through
real clients, every call with a deadline, every outcome recorded."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from cachegw import AsyncClient
from cachegw.errors import CacheError

DEADLINE = 1.0  # seconds, every call
# A call may end this much after its deadline on a loaded 2-core machine (the client's
# own timer, the event loop's lateness); far below any socket timeout.
LATENESS = 0.75
DOCUMENTED = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


@dataclass
class Outcome:
    op: str
    key: str
    started: float
    elapsed: float
    code: str  # "OK" or the status name
    value: bytes | None = None


@dataclass
class Load:
    clients: list[AsyncClient]
    keys: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, workers_per_client: int = 4, write_share: float = 0.2) -> None:
        for i, client in enumerate(self.clients):
            for w in range(workers_per_client):
                rng = random.Random(i * 100 + w)
                self._tasks.append(asyncio.create_task(self._work(client, rng, write_share)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _work(self, client: AsyncClient, rng: random.Random, write_share: float) -> None:
        n = 0
        while not self._stop.is_set() and n < 100_000:
            n += 1
            key = rng.choice(self.keys)
            write = rng.random() < write_share
            started = time.monotonic()
            value: bytes | None = None
            try:
                if write:
                    await client.set(key, f"{key}@{started:.6f}".encode(), timeout=DEADLINE)
                else:
                    value = await client.get(key, timeout=DEADLINE)
                code = "OK"
            except CacheError as exc:
                code = exc.code.name
            elapsed = time.monotonic() - started
            self.outcomes.append(
                Outcome("set" if write else "get", key, started, elapsed, code, value)
            )
            await asyncio.sleep(0.005)

    def codes(self) -> Counter[str]:
        return Counter(o.code for o in self.outcomes)

    def late(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.elapsed > DEADLINE + LATENESS]

    def undocumented(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != "OK" and o.code not in DOCUMENTED]
