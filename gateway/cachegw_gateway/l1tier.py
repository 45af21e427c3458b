"""This gateway's L1 and the rules for what may enter it.

The native L1 holds encoded HIT answers. What makes it safe is deciding which Redis
answers may be copied in, and that is this module's one job:

- an L1 copy expires no later than the fresh life of the Redis entry it copies, counted
  from a moment before the Redis call was sent, and before XFetch might pick a refresher;
- every Redis call whose answer may fill L1 (a read, or a write storing a value) takes a
  `FillTicket` before it is sent. A write or invalidation of the key in between takes
  the key's ticket away, and a broad invalidation (prefix, tag, class, lost
  subscription) starts a new epoch that voids every ticket: such answers never fill L1,
  since they may carry the value from before;
- a write that starts detaches the key's in-flight read, so Gets that arrive after it
  read Redis anew instead of joining a read that may predate it;
- L1 is only filled while this gateway's invalidation subscription is live;
- classes with stale-if-error also keep their last copy aside (lastknown.py), under the
  same rules, to answer STALE while Redis cannot be reached (`error_answer`).

Broad invalidations cost what they evict: entries are indexed in the L1 by class and
tag (groups) and by key order (prefixes), never found by walking the whole cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachegw_gateway import envelope, wire
from cachegw_gateway.config import L1Config
from cachegw_gateway.freshness import l1_horizon_ms
from cachegw_gateway.l2 import L2Entry
from cachegw_gateway.lastknown import LastKnown
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.stats import ClassCounters, GatewayStats
from cachegw_native.batch import l1_results
from cachegw_native.coalescer import Coalescer
from cachegw_native.hotkeys import HotKeys
from cachegw_native.l1 import L1Cache, footprint

log = logging.getLogger(__name__)

# An L1 entry: the encoded HIT answer with tier L1 (no TTL), the monotonic time at which
# the Redis entry's fresh life ends, its class's counters (so a hit counts itself
# without classifying the key), and what goes before the answer as a GetMany result
# (see wire.result_framing).
L1Value = tuple[bytes, float, ClassCounters, bytes]


def new_l1(c: L1Config) -> L1Cache:
    """The gateway's L1 for `[l1]`. With charge_overhead, `l1.max_bytes` bounds the memory
    its entries take, the L1's own structures included (see entry_charge)."""
    return L1Cache(c.max_entries, c.max_bytes, admission=c.admission, charge_overhead=True)


def entry_charge(key: str, value: L1Value) -> int:
    """What an L1 entry is charged for the Python objects it holds: the key, the tuple,
    the answer, the deadline and the framing, each as allocated (the class's counters
    are shared). The L1 (charge_overhead=True) adds its own memory for the entry, its
    groups and their names: together the process memory the entry takes (docs/config.md,
    `l1.max_bytes`)."""
    body, fresh_until, _, framing = value
    return footprint(key, value, body, fresh_until, framing)


def class_group(name: str) -> str:
    return f"c:{name}"


def tag_group(tag: str) -> str:
    return f"t:{tag}"


@dataclass(slots=True)
class FillTicket:
    """Taken before a Redis call whose answer may fill L1; see `L1Tier.settle`."""

    keys: list[str]
    tokens: list[object]
    epoch: int
    sent_at: float


class L1Tier:
    def __init__(
        self,
        l1: L1Cache,
        stats: GatewayStats,
        *,
        hotkeys: HotKeys | None = None,
        last_known: LastKnown | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._l1 = l1
        self._last_known = last_known
        self._stats = stats
        self._hotkeys = hotkeys
        self._clock = clock
        # Redis reads in flight, one per key (request coalescing).
        self.reads: Coalescer[L2Entry | None] = Coalescer()
        # key -> token of the Redis call whose answer may fill L1; a write drops it.
        self._fill_tokens: dict[str, object] = {}
        self._epoch = 0
        self._fills_allowed = False  # until the invalidation subscription is live
        # L1 as it was when the invalidation subscription dropped: served only while Redis
        # cannot be reached, within each copy's own L1 deadline (see flush()).
        self._fallback: dict[str, tuple[L1Value, float]] = {}

    @property
    def l1(self) -> L1Cache:
        return self._l1

    @property
    def fills_allowed(self) -> bool:
        return self._fills_allowed

    # -- the hit path ----------------------------------------------------------------------

    def answer(self, key: str) -> bytes | None:
        """The encoded answer from L1, or None. Never touches Redis."""
        hit: L1Value | None = self._l1.get(key)  # type: ignore[assignment]
        if hit is None:
            return None
        body, fresh_until, counters, _ = hit
        counters.hits_l1 += 1
        if self._hotkeys is not None:
            self._hotkeys.add(key)
        return body + wire.ttl_field(int((fresh_until - self._clock()) * 1000))

    def answer_many(self, keys: list[str]) -> tuple[list[bytes], list[int]]:
        """GetMany's L1 part, as pieces of the encoded GetManyResponse for bytes.join:
        five per key (framing, answer, a fixed-width TTL in three), and the positions of
        the keys L1 did not answer (their pieces are empty, to be filled in). The loop
        is native (cachegw_native.batch): one clock read per batch, no encoding."""
        return l1_results(self._l1, keys, self._clock(), self._hotkeys, wire.TTL_TABLES)

    def fallback_answer(self, key: str) -> bytes | None:
        """A copy set aside when the subscription dropped, while Redis cannot be reached."""
        saved = self._fallback.get(key)
        if saved is None:
            return None
        (body, fresh_until, counters, _), until = saved
        now = self._clock()
        if now >= until:
            del self._fallback[key]
            return None
        counters.hits_l1 += 1
        return body + wire.ttl_field(int((fresh_until - now) * 1000))

    def error_answer(self, key: str) -> bytes | None:
        """What a read may answer when Redis failed it: the copy set aside when the
        subscription dropped (HIT, within its L1 deadline), else the class's last known
        copy (STALE, within stale_if_error_seconds past its fresh life), else None."""
        answer = self.fallback_answer(key)
        if answer is None and self._last_known is not None:
            answer = self._last_known.answer(key)
        return answer

    # -- fills -----------------------------------------------------------------------------

    def ticket(self, keys: Sequence[str]) -> FillTicket:
        tokens = [object() for _ in keys]
        for key, token in zip(keys, tokens, strict=True):
            self._fill_tokens[key] = token
        return FillTicket(list(keys), tokens, self._epoch, self._clock())

    def settle(self, ticket: FillTicket) -> list[bool]:
        """Per key of `ticket`, whether its answer may fill L1: no write, invalidation or
        other call of the key overtook it. Returns the tokens either way; a key whose
        token was taken by a later call loses that one's too (it may predate this one's
        effect)."""
        same_epoch = ticket.epoch == self._epoch
        out: list[bool] = []
        for key, token in zip(ticket.keys, ticket.tokens, strict=True):
            current = self._fill_tokens.pop(key, None)
            out.append(same_epoch and current is token)
        return out

    def fill(
        self,
        key: str,
        kc: KeyClass,
        env: envelope.Envelope,
        fresh_left_ms: int,
        since: float,
    ) -> None:
        """Copy an entry into L1 for at most min(class L1 TTL, its fresh life left, the
        time before XFetch may pick a refresher), counted from `since`."""
        if not self._fills_allowed or fresh_left_ms <= 0 or env.flags:
            return  # a tombstone (cached NOT_FOUND) lives in Redis only
        groups = (class_group(kc.name), *(tag_group(t) for t in env.tags))
        if kc.stale_if_error_ms and self._last_known is not None:
            counters = self._stats.for_class(kc.name)
            self._last_known.keep(key, kc, env, fresh_left_ms, since, counters, groups)
        if not kc.l1:
            return
        l1_ttl = l1_horizon_ms(env, kc, fresh_left_ms) / 1000
        elapsed = self._clock() - since
        if l1_ttl <= elapsed:
            return
        body = wire.hit_body(env.value, env.version, kc.name, env.tags) + wire.TIER_L1
        counters = self._stats.for_class(kc.name)
        value: L1Value = (body, since + fresh_left_ms / 1000, counters, wire.result_framing(body))
        # The L1 counts its TTL from now; subtract what already passed since `since`.
        self._l1.set(key, value, entry_charge(key, value), l1_ttl - elapsed, groups)

    # -- forgetting ------------------------------------------------------------------------

    def detach(self, key: str) -> None:
        """A write or invalidation of `key` starts or ended: drop the copy, void the
        ticket of any call in flight for it, and let later Gets read Redis anew."""
        self._fallback.pop(key, None)
        if self._last_known is not None:
            self._last_known.forget(key)
        self._fill_tokens.pop(key, None)
        self.reads.forget(key)
        self._l1.delete(key)

    def evict(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> None:
        """Forget everything an invalidation names. Costs what it removes (plus the
        calls in flight), whatever the L1 holds."""
        for key in keys:
            self.detach(key)
        if not (prefixes or tags or classes):
            return
        self.new_epoch()
        self._fallback = {}
        for prefix in prefixes:
            self._l1.delete_prefix(prefix)
        for tag in tags:
            self._l1.delete_group(tag_group(tag))
        for name in classes:
            self._l1.delete_group(class_group(name))
        last = self._last_known
        if last is not None:
            for prefix in prefixes:
                last.forget_prefix(prefix)
            for tag in tags:
                last.forget_group(tag_group(tag))
            for name in classes:
                last.forget_group(class_group(name))

    def new_epoch(self) -> None:
        """No Redis call in flight now may fill L1 when it lands."""
        self._epoch += 1
        self._fill_tokens.clear()
        self.reads.forget_all()

    def flush(self, reason: str, *, keep_fallback: bool = False) -> None:
        """Drop all of L1: this gateway may have missed invalidations.

        With `keep_fallback` (the subscription dropped), the copies are set aside and
        answered only while Redis cannot be reached: each within its own L1 deadline,
        which is inside the class's promise (an L1 copy is at most l1_ttl old even when
        an invalidation was missed), and better than UNAVAILABLE. Any later flush drops
        them for good (events evict them meanwhile, as they evict L1). The last known copies of
        stale-if-error classes are kept too (only with `keep_fallback`)."""
        self._fallback = {}
        if not keep_fallback and self._last_known is not None:
            self._last_known.clear()
        if keep_fallback:
            now = self._clock()
            for key, value in self._l1.items():
                left = self._l1.expires_in(key)
                if left is not None:
                    self._fallback[key] = (value, now + left)  # type: ignore[assignment]
        self._l1.clear()
        self.new_epoch()
        self._stats.l1_flushes += 1
        log.info("L1 flushed: %s", reason)

    def suspend_fills(self) -> None:
        self._fills_allowed = False

    def resume_fills(self) -> None:
        """The subscription is (again) live: calls sent before may have missed an event
        (a new epoch). The copies set aside for an outage stay, still answered only when
        a Redis read fails and each within its own L1 deadline (the bound a lost event
        allows): the subscription can come back before reads do (a Cluster whose
        generations' node is the one failing over, a breaker still open), and events
        from now on evict them as they evict L1."""
        self.new_epoch()
        if self._last_known is not None:
            self._last_known.clear()
        self._fills_allowed = True
