"""The write-behind flusher: one per gateway, writing the journal (journal.py) to the
origins in batches.

Every gateway runs one task per shard of each write-behind class, as consumer
``<gateway id>`` of the shard's consumer group. A task, in a loop:

1. takes a batch: first the entries delivered to this consumer before and never
   settled (a gateway restarted with the same id picks up its own), then, every
   `claim_idle_seconds / 2`, the entries another consumer has held for longer than
   `claim_idle_seconds` (XAUTOCLAIM: a gateway that died mid-flush), else new ones;
2. collapses it: per key only the newest write (the highest write version) is sent; the
   older ones are settled with it (`wb_collapsed`);
3. sends one Store (values, each with its write_version; split when over
   `MAX_CALL_BYTES`) and one Remove (keys of write-behind Deletes, with theirs);
4. on an answer, settles (XACK + XDEL) what the origin stored, removed, or answered
   VERSION_CONFLICT for (it holds a newer write: a redelivery, `wb_superseded`), and
   moves what it REFUSED to the dead-letter stream (`wb_dead_lettered`);
5. on a failure, waits and sends the entries not yet answered again: exponential
   backoff from `retry_initial_seconds` to `retry_max_seconds`, with jitter, for as
   long as the origin is unreachable, slow, busy or behind its open breaker (nothing is
   given up while it is down); an answer the gateway cannot use (an origin bug)
   `max_attempts` times in a row moves the batch to the dead-letter stream instead of
   retrying it forever. While it waits, the task resets the idle time of its entries
   (`Journal.keep`), so that other gateways do not take it for dead.

Entries are settled only after the origin answered for them, so a gateway killed at
any point leaves them pending: they are flushed again, by the same gateway when it
restarts with its id or by another after `claim_idle_seconds`. Sending twice is safe:
the origin orders writes by write_version and refuses older ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cachegw.v1 import origin_pb2 as opb
from cachegw_gateway.config import WriteBehindConfig
from cachegw_gateway.journal import REMOVE, STORE, BadEntry, Entry, Journal, Shard
from cachegw_gateway.l2 import L2Unavailable
from cachegw_gateway.origin import MAX_VERSION, OriginBadAnswer, OriginClient, OriginError, Origins
from cachegw_gateway.policy import KeyClass, PolicyTable
from cachegw_gateway.stats import ClassCounters, GatewayStats

log = logging.getLogger("cachegw.writebehind")

MAX_CALL_BYTES = 8 * 1024 * 1024  # values per Store call (the origin's message limit is 64 MiB)
FIGURES_EVERY = 1.0  # seconds between two reads of the backlog and the lag
LOG_EVERY = 10.0  # seconds between two log lines about one shard's failures
# A consumer (a gateway) holding nothing and idle this long is gone: its name is deleted
# from the group (a live flusher touches the group every flush_interval_seconds).
FORGET_CONSUMERS_MS = 3_600_000


class _Stopping(Exception):
    """The gateway is stopping: leave the batch pending."""


@dataclass(slots=True)
class _Batch:
    """A batch in hand: the newest write of each key, what they settle, the answers so far."""

    winners: list[Entry]
    collapsed: list[Entry]
    answered: dict[str, str] = field(default_factory=dict)  # entry id -> outcome
    refused: dict[str, str] = field(default_factory=dict)  # entry id -> the origin's reason


def collapse(entries: Sequence[Entry]) -> tuple[list[Entry], list[Entry]]:
    """(the newest write of each key in journal order, the older writes it supersedes)."""
    newest: dict[str, Entry] = {}
    for e in entries:
        held = newest.get(e.key)
        if held is None or e.write_version > held.write_version:
            newest[e.key] = e
    keep = {e.id for e in newest.values()}
    winners = [e for e in entries if e.id in keep]
    return winners, [e for e in entries if e.id not in keep]


class Flusher:
    def __init__(
        self,
        journal: Journal,
        origins: Origins,
        policy: PolicyTable,
        stats: GatewayStats,
        config: WriteBehindConfig,
        consumer: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._journal = journal
        self._origins = origins
        self._stats = stats
        self._config = config
        self.consumer = consumer
        self._clock = clock
        self._rand = rand
        self._classes = [kc for kc in policy.classes if kc.write_behind]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._claim_idle_ms = max(1, round(config.claim_idle_seconds * 1000))

    def __bool__(self) -> bool:
        return bool(self._classes)

    def start(self) -> None:
        for kc in self._classes:
            for shard in self._journal.shards_of(kc.name):
                self._tasks.append(asyncio.create_task(self._run(kc, shard)))
            self._tasks.append(asyncio.create_task(self._figures_forever(kc)))

    async def stop(self, within: float = 5.0) -> None:
        """Finish the calls in flight (within `within` seconds), leave the rest pending."""
        self._stop.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=within)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks = []

    async def _pause(self, seconds: float) -> None:
        """Sleep, or raise _Stopping as soon as the gateway stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stop.is_set():
            raise _Stopping

    def _backoff(self, delay: float) -> float:
        """`delay` with up to 20 % jitter, so gateways do not retry in step."""
        return delay * (0.8 + 0.4 * self._rand())

    # -- the loop of one shard ------------------------------------------------------------

    async def _run(self, kc: KeyClass, shard: Shard) -> None:
        counters = self._stats.for_class(kc.name)
        client = self._origins.client(kc.origin)
        config, journal = self._config, self._journal
        own = True
        cursor = "0-0"
        next_claim = 0.0
        delay = config.retry_initial_seconds
        last_log = -LOG_EVERY
        try:
            while not self._stop.is_set():
                try:
                    if own and next_claim == 0.0:  # the first round: the group exists
                        await journal.ensure_group(shard)
                    entries: list[Entry] = []
                    bad: list[BadEntry] = []
                    now = self._clock()
                    if now >= next_claim:
                        entries, bad, cursor = await journal.claim(
                            shard, self.consumer, self._claim_idle_ms, config.batch_size, cursor
                        )
                        counters.wb_claimed += len(entries) + len(bad)
                        if cursor == "0-0":
                            next_claim = now + config.claim_idle_seconds / 2
                            await journal.forget_consumers(
                                shard, self.consumer, FORGET_CONSUMERS_MS
                            )
                    if not entries and not bad:
                        entries, bad = await journal.read(
                            shard, self.consumer, config.batch_size, own=own
                        )
                        if own and not entries and not bad:
                            own = False
                            continue
                    if bad:
                        moved = await journal.dead_letter(
                            shard, [(b.entry_id, str(b)) for b in bad]
                        )
                        counters.wb_dead_lettered += moved
                        log.error(
                            "%s: %d unreadable journal entries dead-lettered", shard.journal, moved
                        )
                    if not entries:
                        await self._pause(config.flush_interval_seconds)
                        continue
                    await self._flush(kc, shard, client, entries, counters)
                    delay = config.retry_initial_seconds
                except L2Unavailable as exc:
                    if "NOGROUP" in str(exc) and await self._made_again(shard):
                        continue  # Redis had lost the stream (or never had it)
                    if self._clock() - last_log >= LOG_EVERY:
                        last_log = self._clock()
                        log.warning(
                            "write-behind %s: redis failed (%s); trying again", shard.journal, exc
                        )
                    await self._pause(self._backoff(delay))
                    delay = min(delay * 2, config.retry_max_seconds)
                except (_Stopping, asyncio.CancelledError):
                    raise
                except Exception:  # a bug here must not end this shard's flushing
                    log.exception("write-behind %s: flush failed; trying again", shard.journal)
                    await self._pause(config.retry_max_seconds)
        except _Stopping:
            return

    async def _made_again(self, shard: Shard) -> bool:
        try:
            await self._journal.ensure_group(shard)
        except L2Unavailable:
            return False
        return True

    # -- one batch ------------------------------------------------------------------------

    async def _flush(
        self,
        kc: KeyClass,
        shard: Shard,
        client: OriginClient,
        entries: list[Entry],
        counters: ClassCounters,
    ) -> None:
        config = self._config
        winners, collapsed = collapse(entries)
        batch = _Batch(winners, collapsed)
        delay = config.retry_initial_seconds
        attempts = 0
        kept = self._clock()
        last_log = -LOG_EVERY
        dead_reason = ""
        while True:
            try:
                await self._send(client, batch, counters)
                break
            except OriginError as exc:
                counters.origin_errors += 1
                counters.wb_retries += 1
                if isinstance(exc, OriginBadAnswer):
                    attempts += 1
                    if attempts >= config.max_attempts:
                        dead_reason = f"after {attempts} unusable answers: {exc}"
                        break
                if self._clock() - last_log >= LOG_EVERY:
                    last_log = self._clock()
                    log.warning(
                        "write-behind %s: %d entries not flushed yet (%s); trying again",
                        shard.journal,
                        len(entries),
                        exc,
                    )
            await self._pause(self._backoff(delay))
            delay = min(delay * 2, config.retry_max_seconds)
            if self._clock() - kept >= config.claim_idle_seconds / 4:
                kept = self._clock()
                with contextlib.suppress(L2Unavailable):
                    await self._journal.keep(
                        shard, self.consumer, [e.id for e in entries], self._claim_idle_ms // 4
                    )
        dead: list[tuple[str, str]] = []
        settle: list[str] = []
        if dead_reason:
            log.error(
                "write-behind %s: dead-lettering %d entries %s",
                shard.journal,
                len(entries),
                dead_reason,
            )
            dead = [(e.id, dead_reason) for e in entries]
        else:
            for e in winners:
                reason = batch.refused.get(e.id)
                if reason is not None:
                    dead.append((e.id, f"origin {kc.origin} refused it: {reason}"))
                else:
                    settle.append(e.id)
            settle += [e.id for e in collapsed]
            counters.wb_collapsed += len(collapsed)
        await self._finish(shard, settle, dead, counters)

    async def _finish(
        self, shard: Shard, settle: list[str], dead: list[tuple[str, str]], counters: ClassCounters
    ) -> None:
        """Settle and dead-letter what the origin answered, retrying Redis until it takes
        it (the origin has the writes: sending them again would be harmless, but waste)."""
        delay = self._config.retry_initial_seconds
        while settle or dead:
            try:
                if dead:
                    counters.wb_dead_lettered += await self._journal.dead_letter(shard, dead)
                    dead = []
                if settle:
                    await self._journal.settle(shard, settle)
                    counters.wb_flushed += len(settle)
                    settle = []
            except L2Unavailable as exc:
                log.info(
                    "write-behind %s: could not settle the entries yet (%s)", shard.journal, exc
                )
                await self._pause(self._backoff(delay))
                delay = min(delay * 2, self._config.retry_max_seconds)

    async def _send(self, client: OriginClient, batch: _Batch, counters: ClassCounters) -> None:
        """Send the winners not answered yet: Stores in calls of at most MAX_CALL_BYTES,
        then one Remove. Raises OriginError; what was answered before stays answered."""
        todo = [e for e in batch.winners if e.id not in batch.answered]
        stores = [e for e in todo if e.op == STORE]
        removes = [e for e in todo if e.op == REMOVE]
        chunk: list[Entry] = []
        size = 0
        for e in stores:
            n = len(e.store.value) + len(e.key) + 64
            if chunk and size + n > MAX_CALL_BYTES:
                await self._store(client, chunk, batch, counters)
                chunk, size = [], 0
            chunk.append(e)
            size += n
        if chunk:
            await self._store(client, chunk, batch, counters)
        if removes:
            await self._remove(client, removes, batch, counters)

    async def _store(
        self, client: OriginClient, chunk: list[Entry], batch: _Batch, counters: ClassCounters
    ) -> None:
        request = opb.StoreRequest()
        for e in chunk:
            one = request.entries.add()
            one.CopyFrom(e.store)
            one.write_version = e.write_version
        raw = await client._call("Store", request.SerializeToString(), None)
        counters.wb_origin_calls += 1
        where = f"origin {client.address} Store of {len(chunk)} write-behind entries"
        try:
            answer = opb.StoreResponse.FromString(raw)
        except Exception as exc:
            raise OriginBadAnswer(f"{where}: the answer is not a StoreResponse ({exc})") from None
        if len(answer.results) != len(chunk):
            raise OriginBadAnswer(
                f"{where}: answered {len(answer.results)} results for {len(chunk)} entries"
            )
        checked: list[tuple[Entry, str, str]] = []
        for i, (e, r) in enumerate(zip(chunk, answer.results, strict=True)):
            at = f"{where}: results[{i}] ({e.key!r})"
            if r.key != e.key:
                raise OriginBadAnswer(f"{at} is for key {r.key!r}: one result per entry, in order")
            if r.version > MAX_VERSION:
                raise OriginBadAnswer(f"{at} has version {r.version}, not below 2^53")
            if r.outcome == opb.STORE_OUTCOME_STORED:
                checked.append((e, "stored", ""))
            elif r.outcome == opb.STORE_OUTCOME_VERSION_CONFLICT:
                checked.append((e, "superseded", ""))
            elif r.outcome == opb.STORE_OUTCOME_REFUSED:
                checked.append((e, "refused", r.message or "no reason given"))
            else:
                raise OriginBadAnswer(f"{at} has outcome {r.outcome}")
        for e, outcome, message in checked:  # the whole answer is checked before any is used
            batch.answered[e.id] = outcome
            if outcome == "stored":
                counters.origin_stores += 1
            elif outcome == "superseded":
                counters.wb_superseded += 1
            else:
                batch.refused[e.id] = message

    async def _remove(
        self, client: OriginClient, removes: list[Entry], batch: _Batch, counters: ClassCounters
    ) -> None:
        request = opb.RemoveRequest(
            keys=[e.key for e in removes], write_versions=[e.write_version for e in removes]
        )
        raw = await client._call("Remove", request.SerializeToString(), None)
        counters.wb_origin_calls += 1
        where = f"origin {client.address} Remove of {len(removes)} write-behind keys"
        try:
            answer = opb.RemoveResponse.FromString(raw)
        except Exception as exc:
            raise OriginBadAnswer(f"{where}: the answer is not a RemoveResponse ({exc})") from None
        if len(answer.results) != len(removes) or any(
            r.key != e.key for e, r in zip(removes, answer.results, strict=False)
        ):
            raise OriginBadAnswer(f"{where}: the results are not one per key, in order")
        for e in removes:
            batch.answered[e.id] = "removed"

    # -- figures --------------------------------------------------------------------------

    async def _figures_forever(self, kc: KeyClass) -> None:
        counters = self._stats.for_class(kc.name)
        shards = self._journal.shards_of(kc.name)
        try:
            while not self._stop.is_set():
                with contextlib.suppress(L2Unavailable):
                    counters.wb_backlog, counters.wb_lag_ms = await self._journal.figures(shards)
                await self._pause(FIGURES_EVERY)
        except _Stopping:
            return
