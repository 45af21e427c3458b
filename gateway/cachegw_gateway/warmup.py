"""Warm-up: filling L1 from Redis on request and at start, and the deployment's record of
hot keys that a starting gateway re-warms from."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.l2 import L2Unavailable, RedisStore
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.reads import ReadPath
from cachegw_gateway.writes import SetItem, WritePath
from cachegw_native.hotkeys import HotKeys

log = logging.getLogger(__name__)

# How many hot keys each gateway tracks and records, and how often it records them.
HOT_KEYS_TRACKED = 256
HOT_KEYS_KEPT = 10_000
HOT_KEYS_PERIOD = 30.0
# Recorded hot keys a Warmup(hot_keys=true) loads.
WARM_HOT_KEYS = 1000


class Warmup:
    def __init__(
        self, store: RedisStore, reads: ReadPath, writes: WritePath, hotkeys: HotKeys
    ) -> None:
        self._store = store
        self._reads = reads
        self._writes = writes
        self._hotkeys = hotkeys

    async def warm(self, keys: Sequence[str], batch: int = 1000) -> tuple[int, int]:
        """Copy `keys` from Redis into L1; returns (loaded, missing)."""
        loaded = missing = 0
        for i in range(0, len(keys), batch):
            chunk = list(dict.fromkeys(keys[i : i + batch]))
            entries = await self._reads.read_many(chunk)
            for key, entry in zip(chunk, entries, strict=True):
                if self._reads.is_fresh(key, entry):
                    loaded += 1
                else:
                    missing += 1
        return loaded, missing

    async def warmup(
        self,
        keys: Sequence[str],
        entries: Sequence[tuple[pb.WarmupEntry, KeyClass]],
        *,
        hot_keys: bool,
    ) -> pb.WarmupResponse:
        """Store `entries` (each a Set), then copy `keys` (and the recorded hot keys) into
        L1."""
        stored = 0
        for entry, kc in entries:
            ttl = entry.ttl_ms if entry.HasField("ttl_ms") else None
            out = await self._writes.set(SetItem(entry.key, entry.value, kc, ttl))
            stored += out.stored
        wanted = list(keys)
        if hot_keys:
            wanted += await self._store.hot_keys(WARM_HOT_KEYS)
        loaded, missing = await self.warm(wanted)
        return pb.WarmupResponse(loaded=loaded, missing=missing, stored=stored)

    async def warm_from_hot_keys(self, count: int) -> None:
        """At start: load the deployment's `count` hottest keys (best effort)."""
        try:
            keys = await self._store.hot_keys(count)
            loaded, _ = await self.warm(keys)
        except L2Unavailable as exc:
            log.warning("could not re-warm L1 from the recorded hot keys: %s", exc)
            return
        if keys:
            log.info("re-warmed L1 with %d of the %d recorded hot keys", loaded, len(keys))

    async def record_hot_keys(self) -> None:
        """Merge this gateway's hottest keys into the deployment's list, then age them."""
        await self._store.record_hot_keys(self._hotkeys.top(HOT_KEYS_TRACKED), HOT_KEYS_KEPT)
        self._hotkeys.decay()

    async def record_hot_keys_forever(self) -> None:
        while True:
            await asyncio.sleep(HOT_KEYS_PERIOD)
            try:
                await self.record_hot_keys()
            except L2Unavailable as exc:
                log.debug("hot keys not recorded: %s", exc)
