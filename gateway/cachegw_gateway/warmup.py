"""Warm-up: filling L1 from Redis on request and at start, and the deployment's record of
hot keys that a starting gateway re-warms from. With origins configured, a Warmup also
loads what Redis lacks from the keys' origins (rebuild.py), and stores the entries of
write-through classes in their origin first (writethrough.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.l2 import L2Unavailable, RedisStore
from cachegw_gateway.origin import OriginError
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.reads import ReadPath
from cachegw_gateway.rebuild import Rebuild
from cachegw_gateway.validation import InvalidRequest
from cachegw_gateway.writes import SetItem, WritePath
from cachegw_gateway.writethrough import WriteThrough
from cachegw_native.hotkeys import HotKeys

log = logging.getLogger(__name__)

# How many hot keys each gateway tracks and records, and how often it records them.
HOT_KEYS_TRACKED = 256
HOT_KEYS_KEPT = 10_000
HOT_KEYS_PERIOD = 30.0
# Recorded hot keys a Warmup(hot_keys=true) loads.
WARM_HOT_KEYS = 1000


async def hot_set(store: RedisStore, hotkeys: HotKeys) -> list[str]:
    """The keys a rebuild loads for `hot_keys`: the deployment's record (which a lost Redis
    node loses too), then this gateway's own hottest keys."""
    recorded = await store.hot_keys(HOT_KEYS_KEPT)
    own = [key for key, _ in hotkeys.top(HOT_KEYS_TRACKED)]
    return list(dict.fromkeys([*recorded, *own]))


class Warmup:
    def __init__(
        self,
        store: RedisStore,
        reads: ReadPath,
        writes: WritePath,
        hotkeys: HotKeys,
        *,
        rebuild: Rebuild | None = None,
        write_through: WriteThrough | None = None,
    ) -> None:
        self._store = store
        self._reads = reads
        self._writes = writes
        self._hotkeys = hotkeys
        self._rebuild = rebuild
        self._write_through = write_through

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
        prefixes: Sequence[str] = (),
        resume: str = "",
        time_remaining: float | None = None,
    ) -> pb.WarmupResponse:
        """Store `entries` (each a Set; write-through ones in their origin first, one Store
        per origin; not again when resuming), then copy `keys` (and the recorded hot keys)
        into L1, loading from their origins what Redis lacks (rebuild.py), and the keys
        under `prefixes` as the origins list them."""
        if self._rebuild is None and (prefixes or resume):
            raise InvalidRequest(
                "prefixes and resume load from origins, and no class of this gateway has one"
            )
        stored = failed = 0
        error = ""
        items = [
            SetItem(e.key, e.value, kc, e.ttl_ms if e.HasField("ttl_ms") else None)
            for e, kc in ([] if resume else entries)
        ]
        through: list[SetItem] = []
        for item in items:
            if item.kc.write_through and self._write_through is not None:
                through.append(item)
            else:
                stored += (await self._writes.set(item)).stored
        if through and self._write_through is not None:
            for out in await self._write_through.set_many(through):
                if isinstance(out, OriginError):
                    failed += 1
                    error = error or f"{out.code.name}: {out}"
                else:
                    stored += out.stored
        if self._rebuild is not None:
            answer = await self._rebuild.run(
                keys,
                hot_keys=hot_keys,
                prefixes=prefixes,
                resume=resume,
                time_remaining=time_remaining,
            )
            answer.stored = stored
            answer.failed += failed
            answer.error = answer.error or error
            return answer
        wanted = list(keys)
        if hot_keys:
            wanted += await self._store.hot_keys(WARM_HOT_KEYS)
        loaded, missing = await self.warm(wanted)
        return pb.WarmupResponse(loaded=loaded, missing=missing, stored=stored, done=True)

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
