"""Warmup from the origins: rebuilding a cold cache (after a Redis node was lost or
flushed) from the source of truth, at a rate the origin can take.

What a Warmup asks for is gone through in batches of ``origin.warm_batch_keys`` keys, in
this order: the given keys, the recorded hot set (the deployment's record in Redis and
this gateway's own hottest keys), then the keys under each given prefix, as the origins
of the classes such keys can fall in list them (the origin's optional `List`, a page a
batch). For each batch:

1. One Redis read of all its keys (fresh values are copied into L1: the old Warmup). A
   key Redis holds fresh is counted `loaded` and not asked of any origin, so a rebuild
   called again (after a deadline, a failure, a gateway restart) only loads what is
   still missing: it is idempotent, and `resume` spares it the keys already gone through.
2. The missing keys of classes with an origin take tokens from that origin's bucket in
   Redis (originrate.py: ``origin.warm_keys_per_second``, shared by every gateway); the
   call waits for them, or stops when they would come after its deadline.
3. Each key's lease is taken as a read-through miss takes it (leases.py), without
   waiting: a key another caller is loading is left to it (`skipped`), one stored
   meanwhile is `loaded`. So a rebuild and the Gets it races never load a key twice, and
   a Delete or Invalidate that lands during the load refuses its fill.
4. One `Load` per origin for the granted keys, stored in one pipeline with the origin's
   versions, as read-through stores them (the Set script never lets an older version
   replace a newer cached one); NOT_FOUND is cached as a tombstone where the class has
   negative_ttl_seconds.

The first failure (the origin's, or Redis's) ends the call: what was stored stays, the
answer says how many keys failed, why (`error`) and where to carry on (`resume`). So
does the caller's deadline: a batch is not started without time left for it. Bad input
and a prefix whose origin cannot list (UNIMPLEMENTED, checked before anything is loaded)
are statuses, as anywhere else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import envelope
from cachegw_gateway.l2 import L2Unavailable, RedisStore
from cachegw_gateway.leases import Leases, LeaseToken
from cachegw_gateway.origin import Limits, OriginError, Origins
from cachegw_gateway.originrate import OriginRate
from cachegw_gateway.policy import KeyClass, PolicyTable
from cachegw_gateway.reads import ReadPath
from cachegw_gateway.redis_errors import L2OutOfMemory
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.validation import InvalidRequest
from cachegw_gateway.writes import SetItem, WriteOutcome, WritePath

# Time kept back from the caller's deadline for the answer.
ANSWER_MARGIN = 0.2
# A batch is not started without the time the previous ones took (their slowest, times
# SAFETY) left before the margin; the first is assumed to take FIRST_BATCH_SECONDS. A
# Load is not sent without the time storing took (at least MIN_STORE_SECONDS) left.
FIRST_BATCH_SECONDS = 0.5
MIN_STORE_SECONDS = 0.15
SAFETY = 1.5
# Waits for one batch's tokens (each as long as the bucket says): a bound, not a rate.
MAX_RATE_WAITS = 10_000

_KEYS, _HOT, _PREFIXES = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Position:
    """Where a Warmup stopped: the phase (given keys, hot keys, prefixes), the offset in
    its key list (or the prefix), the origin of that prefix, and the origin's page token."""

    phase: int = _KEYS
    index: int = 0
    origin: int = 0
    token: str = ""

    def encode(self) -> str:
        return f"r1:{self.phase}:{self.index}:{self.origin}:{self.token}"

    @classmethod
    def parse(cls, text: str) -> Position:
        parts = text.split(":", 4)
        try:
            if len(parts) != 5 or parts[0] != "r1":
                raise ValueError
            phase, index, origin = int(parts[1]), int(parts[2]), int(parts[3])
            if phase not in (_KEYS, _HOT, _PREFIXES) or index < 0 or origin < 0:
                raise ValueError
        except ValueError:
            raise InvalidRequest(
                f"resume {text[:60]!r} is not a resume token this gateway gave (pass back "
                "the `resume` of an earlier answer, with the same request)"
            ) from None
        return cls(phase, index, origin, parts[4])


@dataclass(slots=True)
class Progress:
    loaded: int = 0
    missing: int = 0
    origin_loaded: int = 0
    not_found: int = 0
    failed: int = 0
    listed: int = 0
    skipped: int = 0
    error: str = ""
    retry_after_ms: int = 0
    at: Position = field(default_factory=Position)
    # What batches and their stores took so far in this call (seconds, the slowest).
    batch_seconds: float = FIRST_BATCH_SECONDS
    store_seconds: float = MIN_STORE_SECONDS

    def answer(self, done: bool) -> pb.WarmupResponse:
        return pb.WarmupResponse(
            loaded=self.loaded,
            missing=self.missing,
            origin_loaded=self.origin_loaded,
            not_found=self.not_found,
            failed=self.failed,
            listed=self.listed,
            skipped=self.skipped,
            done=done,
            resume="" if done else self.at.encode(),
            error=self.error,
            retry_after_ms=self.retry_after_ms,
        )


class _Stop(Exception):
    """The call ends here (a failure, the deadline, the rate); Progress says why."""


@dataclass(frozen=True, slots=True)
class _Want:
    key: str
    kc: KeyClass
    unusable: int | None


Sleep = Callable[[float], Awaitable[None]]


class Rebuild:
    def __init__(
        self,
        store: RedisStore,
        reads: ReadPath,
        writes: WritePath,
        leases: Leases,
        origins: Origins,
        policy: PolicyTable,
        stats: GatewayStats,
        *,
        hot_keys: Callable[[], Awaitable[list[str]]],
        max_ttl_ms: int,
        max_key_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._reads = reads
        self._writes = writes
        self._leases = leases
        self._origins = origins
        self._policy = policy
        self._stats = stats
        self._hot_keys = hot_keys
        self._max_ttl_ms = max_ttl_ms
        self._max_key_bytes = max_key_bytes
        self._clock = clock
        self._sleep = sleep
        config = origins.clients[0].config
        self._rate = OriginRate(store, config)
        self.batch = config.warm_batch_keys

    def list_origins(self, prefix: str) -> list[str]:
        """The origins that may hold keys under `prefix`, in class order."""
        found = [kc.origin for kc in self._policy.may_hold(prefix) if kc.origin]
        return list(dict.fromkeys(found))

    async def run(
        self,
        keys: Sequence[str],
        *,
        hot_keys: bool,
        prefixes: Sequence[str],
        resume: str,
        time_remaining: float | None,
    ) -> pb.WarmupResponse:
        deadline = None if time_remaining is None else self._clock() + time_remaining
        at = Position.parse(resume) if resume else Position()
        listing = [self.list_origins(p) for p in prefixes]
        for prefix, origins in zip(prefixes, listing, strict=True):
            if not origins:
                raise InvalidRequest(
                    f"prefixes: no class with an origin can hold keys under {prefix!r}, so "
                    "there is nothing to list (warm such keys by `keys`)"
                )
        if at.phase == _PREFIXES and (
            at.index >= len(prefixes) or at.origin >= len(listing[at.index])
        ):
            raise InvalidRequest("resume does not fit this request's prefixes (send the same)")
        progress = Progress(at=at)
        self._stats.warmups_running += 1
        try:
            # Every prefix's first page first: an origin that cannot list fails the call
            # before anything is loaded.
            pages = await self._first_pages(prefixes, listing, at, deadline)
            await self._go(keys, hot_keys, prefixes, listing, pages, progress, deadline)
        except _Stop:
            return progress.answer(done=False)
        finally:
            self._stats.warmups_running -= 1
        return progress.answer(done=True)

    async def _first_pages(
        self,
        prefixes: Sequence[str],
        listing: Sequence[list[str]],
        at: Position,
        deadline: float | None,
    ) -> dict[tuple[int, int], tuple[str, tuple[list[str], str]]]:
        """(i, j) -> (the token the page was asked with, (its keys, the next token))."""
        pages: dict[tuple[int, int], tuple[str, tuple[list[str], str]]] = {}
        for i, (prefix, origins) in enumerate(zip(prefixes, listing, strict=True)):
            for j, origin in enumerate(origins):
                if at.phase == _PREFIXES and (i, j) < (at.index, at.origin):
                    continue  # gone through before
                token = at.token if (at.phase, at.index, at.origin) == (_PREFIXES, i, j) else ""
                pages[i, j] = token, await self._list(origin, prefix, token, deadline)
        return pages

    async def _list(
        self, origin: str, prefix: str, token: str, deadline: float | None
    ) -> tuple[list[str], str]:
        client = self._origins.client(origin)
        return await client.list_keys(
            prefix, self.batch, token, self._max_key_bytes, self._before(deadline, ANSWER_MARGIN)
        )

    @staticmethod
    def _before(deadline: float | None, margin: float) -> float | None:
        return None if deadline is None else deadline - margin

    async def _go(
        self,
        keys: Sequence[str],
        hot_keys: bool,
        prefixes: Sequence[str],
        listing: Sequence[list[str]],
        pages: dict[tuple[int, int], tuple[str, tuple[list[str], str]]],
        progress: Progress,
        deadline: float | None,
    ) -> None:
        at = progress.at
        if at.phase == _KEYS:
            await self._walk(_KEYS, keys, at.index, progress, deadline)
            at = Position(_HOT)
        if at.phase == _HOT:
            if hot_keys:
                try:
                    hot = await self._hot_keys()
                except L2Unavailable as exc:
                    self._fail(progress, exc, 0, Position(_HOT))
                await self._walk(_HOT, hot, at.index, progress, deadline)
            at = Position(_PREFIXES)
        for i, origins in enumerate(listing):
            for j, origin in enumerate(origins):
                if (i, j) < (at.index, at.origin):
                    continue
                fetched_with, (page, next_token) = pages[i, j]
                owns = self._owned_by(origin)
                while True:
                    # A page whose batch stopped short is listed again on resume.
                    here = Position(_PREFIXES, i, j, fetched_with)
                    mine = [k for k in page if owns(k)]
                    progress.listed += len(mine)
                    await self._batch(mine, progress, deadline, here)
                    if not next_token:
                        break
                    after = Position(_PREFIXES, i, j, next_token)
                    self._check_time(progress, deadline, after)
                    try:
                        page, following = await self._list(
                            origin, prefixes[i], next_token, deadline
                        )
                    except OriginError as exc:
                        self._fail(progress, exc, 0, after)
                    fetched_with, next_token = next_token, following

    def _owned_by(self, origin: str) -> Callable[[str], bool]:
        """Whether a listed key's class loads from `origin` (another class's keys under
        the same prefix are left to their own origin's listing)."""
        classify = self._policy.classify
        return lambda key: classify(key).origin == origin

    async def _walk(
        self,
        phase: int,
        keys: Sequence[str],
        start: int,
        progress: Progress,
        deadline: float | None,
    ) -> None:
        for i in range(start, len(keys), self.batch):
            await self._batch(keys[i : i + self.batch], progress, deadline, Position(phase, i))

    def _left(self, deadline: float | None) -> float:
        """Seconds left before the answer must go (inf without a deadline)."""
        return float("inf") if deadline is None else deadline - ANSWER_MARGIN - self._clock()

    def _check_time(self, progress: Progress, deadline: float | None, here: Position) -> None:
        if self._left(deadline) < progress.batch_seconds * SAFETY:
            progress.at = here
            raise _Stop

    def _fail(self, progress: Progress, exc: Exception, keys: int, here: Position) -> NoReturn:
        progress.failed += keys
        if not progress.error:
            if isinstance(exc, OriginError):
                name = exc.code.name
            else:
                name = "RESOURCE_EXHAUSTED" if isinstance(exc, L2OutOfMemory) else "UNAVAILABLE"
            progress.error = f"{name}: {exc}"
        progress.at = here
        raise _Stop from exc

    async def _batch(
        self, keys: Sequence[str], progress: Progress, deadline: float | None, here: Position
    ) -> None:
        """One batch: read Redis, load what is missing from the origins, store it."""
        if not keys:
            return
        self._check_time(progress, deadline, here)
        started = self._clock()
        distinct = list(dict.fromkeys(keys))
        try:
            entries = await self._reads.read_many(distinct)
        except L2Unavailable as exc:
            self._fail(progress, exc, len(distinct), here)
        wanted: dict[str, list[_Want]] = {}
        for key, entry in zip(distinct, entries, strict=True):
            if self._reads.is_fresh(key, entry):
                progress.loaded += 1
                continue
            kc = self._policy.classify(key)
            if not kc.origin:
                progress.missing += 1
                continue
            unusable = None if entry is None else entry.envelope.version
            wanted.setdefault(kc.origin, []).append(_Want(key, kc, unusable))
        for origin, want in wanted.items():
            await self._take_tokens(origin, len(want), progress, deadline, here)
            await self._load(origin, want, progress, deadline, here)
        progress.batch_seconds = max(progress.batch_seconds, self._clock() - started)

    async def _take_tokens(
        self, origin: str, n: int, progress: Progress, deadline: float | None, here: Position
    ) -> None:
        for _ in range(MAX_RATE_WAITS):
            try:
                wait_ms = await self._rate.take(origin, n)
            except L2Unavailable as exc:
                self._fail(progress, exc, n, here)
            if wait_ms == 0:
                return
            if wait_ms / 1000 + progress.batch_seconds * SAFETY > self._left(deadline):
                progress.retry_after_ms = wait_ms
                progress.at = here
                raise _Stop
            await self._sleep(wait_ms / 1000)
        progress.at = here
        raise _Stop

    async def _load(
        self,
        origin: str,
        want: Sequence[_Want],
        progress: Progress,
        deadline: float | None,
        here: Position,
    ) -> None:
        attempts = await asyncio.gather(
            *(self._leases.try_once(w.key, w.kc, w.unusable, False) for w in want),
            return_exceptions=True,
        )
        granted: list[tuple[_Want, LeaseToken]] = []
        unsure: list[_Want] = []  # granted, or failed: not loaded by this call
        failure: BaseException | None = None
        for w, got in zip(want, attempts, strict=True):
            if isinstance(got, bytes):
                progress.loaded += 1  # stored meanwhile
            elif got is None:
                progress.skipped += 1  # another caller is loading it
            else:
                unsure.append(w)
                if isinstance(got, LeaseToken):
                    granted.append((w, got))
                else:
                    failure = got
        if failure is not None:
            for w, token in granted:
                self._leases.abandon(w.key, token)
            if not isinstance(failure, L2Unavailable):
                raise failure
            self._count_failed(unsure)
            self._fail(progress, failure, len(unsure), here)
        if not granted:
            return
        try:
            await self._load_granted(origin, granted, progress, deadline, here)
        except BaseException:
            for w, token in granted:
                self._leases.abandon(w.key, token)  # a no-op for the leases a fill ended
            raise

    async def _load_granted(
        self,
        origin: str,
        granted: Sequence[tuple[_Want, LeaseToken]],
        progress: Progress,
        deadline: float | None,
        here: Position,
    ) -> None:
        wants = [w for w, _ in granted]
        client = self._origins.client(origin)
        limits = Limits(
            [w.kc.max_value_bytes for w in wants], self._max_ttl_ms, self._max_key_bytes
        )
        store_room = progress.store_seconds * SAFETY
        if self._left(deadline) < store_room + MIN_STORE_SECONDS:
            # No time for a Load and its store: given back (the caller abandons the
            # leases), gone through again on resume.
            progress.at = here
            raise _Stop
        for name in {w.kc.name for w in wants}:
            self._stats.for_class(name).origin_load_calls += 1
        try:
            loaded = await client.load(
                [w.key for w in wants], limits, self._before(deadline, ANSWER_MARGIN + store_room)
            )
        except OriginError as exc:
            for name in {w.kc.name for w in wants}:
                self._stats.for_class(name).origin_errors += 1
            self._count_failed(wants)
            self._fail(progress, exc, len(wants), here)
        items: list[SetItem] = []
        stored_at: list[int] = []
        for i, ((w, token), got) in enumerate(zip(granted, loaded, strict=True)):
            counters = self._stats.for_class(w.kc.name)
            counters.origin_loads += 1
            if got.found:
                item = SetItem(
                    w.key,
                    got.value,
                    w.kc,
                    ttl_ms=got.ttl_ms,
                    tags=got.tags,
                    lease_token=token,
                    origin_version=got.version or None,
                )
            else:
                counters.origin_not_found += 1
                if not w.kc.negative_ttl_ms:
                    self._leases.abandon(w.key, token)
                    counters.warm_not_found += 1
                    progress.not_found += 1
                    continue
                item = SetItem(
                    w.key,
                    b"",
                    w.kc,
                    ttl_ms=w.kc.negative_ttl_ms,
                    lease_token=token,
                    origin_version=got.version,
                    flags=envelope.NOT_FOUND,
                )
            items.append(item)
            stored_at.append(i)
        if not items:
            return
        outcomes: list[WriteOutcome | L2Unavailable]
        storing = self._clock()
        try:
            outcomes = await self._writes.set_many(items)
        except L2Unavailable as exc:
            outcomes = [exc] * len(items)
        progress.store_seconds = max(progress.store_seconds, self._clock() - storing)
        first: L2Unavailable | None = None
        for i, out in zip(stored_at, outcomes, strict=True):
            w, got = wants[i], loaded[i]
            counters = self._stats.for_class(w.kc.name)
            if isinstance(out, L2Unavailable):
                first = first or out
                counters.warm_failed += 1
                progress.failed += 1
            elif out.lease_invalid:
                progress.skipped += 1  # a write, a delete or an invalidation overtook it
            elif not got.found:
                counters.warm_not_found += 1
                progress.not_found += 1
            else:
                counters.warm_loaded += 1  # stored, or a newer cached version kept
                progress.origin_loaded += 1
        if first is not None:
            self._fail(progress, first, 0, here)

    def _count_failed(self, wants: Sequence[_Want]) -> None:
        for w in wants:
            self._stats.for_class(w.kc.name).warm_failed += 1
