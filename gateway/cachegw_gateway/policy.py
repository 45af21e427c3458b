"""Key classes at run time: which policy a key falls under, and its jittered TTL."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import translate

from cachegw_gateway.config import (
    DEFAULT_LEASE_TIMEOUT_SECONDS,
    DEFAULT_MAX_WAIT_SECONDS,
    GatewayConfig,
    KeyClassConfig,
    RateLimitConfig,
)

# classify() runs per request; this many recent answers are remembered (~1 MB at 100 B keys).
MEMO_SIZE = 10_000
_WILDCARDS = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A rate limit as Allow applies it (ratelimit.py): `rate` per `period_ms`."""

    rate: int
    period_ms: int
    burst: int  # GCRA: requests allowed at once (resolved: never 0); sliding window: 0
    algorithm: str  # "gcra" | "sliding_window"

    @classmethod
    def from_config(cls, c: RateLimitConfig) -> RateLimit:
        gcra = c.algorithm == "gcra"
        return cls(
            rate=c.rate,
            period_ms=max(1, round(c.period_seconds * 1000)),
            burst=(c.burst or c.rate) if gcra else 0,
            algorithm=c.algorithm,
        )


@dataclass(frozen=True, slots=True)
class KeyClass:
    name: str
    ttl_ms: int
    jitter: float
    l1: bool
    l1_ttl_ms: int
    max_value_bytes: int
    deterministic_jitter: bool = False
    # Sets publish an event so other gateways drop their L1 copies ("events"), or copies
    # age out within l1_ttl_ms ("ttl"). Delete and Invalidate always publish.
    events: bool = True
    # Defaults sized against the clients' default deadline: see config.py.
    lease_timeout_ms: int = round(DEFAULT_LEASE_TIMEOUT_SECONDS * 1000)
    max_wait_ms: int = round(DEFAULT_MAX_WAIT_SECONDS * 1000)
    early_refresh_beta: float = 0.0
    stale_ms: int = 0
    stale_if_error_ms: int = 0  # see l1tier.LastKnown
    rate_limit: RateLimit | None = None  # Allow's limit when a request names none
    # The class's origin (host:port, "" = none) and how the gateway uses it (origin.py).
    origin: str = ""
    read_through: bool = False  # misses are loaded by the gateway, under the lease
    write_through: bool = False  # Set stores in the origin first
    write_behind: bool = False  # Set is journaled, then flushed to the origin (writebehind.py)
    negative_ttl_ms: int = 0  # read-through: how long a NOT_FOUND is cached; 0 = not
    # Fail-safe (failsafe.py): the last value is answered STALE up to this long past its
    # fresh life while the origin fails or is slow; callers with one wait soft_timeout_ms
    # for the load (0 = all of it); a Load gives up after hard_timeout_ms (0 = the
    # origin's timeout).
    fail_safe_ms: int = 0
    soft_timeout_ms: int = 0
    hard_timeout_ms: int = 0
    # Refresh-ahead (refreshahead.py): hot keys reloaded when their fresh life left is at
    # most refresh_ahead_before_ms (0 = off), at most refresh_ahead_rate per second.
    refresh_ahead_before_ms: int = 0
    refresh_ahead_rate: float = 0.0

    @property
    def keep_ms(self) -> int:
        """How long Redis keeps a value past its fresh life: the stale window, or the
        fail-safe window when longer."""
        return max(self.stale_ms, self.fail_safe_ms)

    @classmethod
    def from_config(cls, c: KeyClassConfig) -> KeyClass:
        return cls(
            name=c.name,
            ttl_ms=max(1, round(c.ttl_seconds * 1000)),
            jitter=c.jitter,
            l1=c.l1,
            l1_ttl_ms=max(1, round(c.l1_ttl_seconds * 1000)),
            max_value_bytes=c.max_value_bytes,
            deterministic_jitter=c.jitter_mode == "deterministic",
            events=c.invalidation == "events",
            lease_timeout_ms=max(1, round(c.lease_timeout_seconds * 1000)),
            max_wait_ms=round(c.max_wait_seconds * 1000),
            early_refresh_beta=c.early_refresh_beta,
            stale_ms=round(c.stale_seconds * 1000),
            stale_if_error_ms=round(c.stale_if_error_seconds * 1000),
            rate_limit=None if c.rate_limit is None else RateLimit.from_config(c.rate_limit),
            origin=c.origin,
            read_through=c.read_policy == "read-through",
            write_through=c.write_policy == "through",
            write_behind=c.write_policy == "behind",
            negative_ttl_ms=round(c.negative_ttl_seconds * 1000),
            fail_safe_ms=round(c.fail_safe_seconds * 1000),
            soft_timeout_ms=round(c.soft_timeout_seconds * 1000),
            hard_timeout_ms=round(c.hard_timeout_seconds * 1000),
            refresh_ahead_before_ms=_refresh_before_ms(c),
            refresh_ahead_rate=c.refresh_ahead_rate if c.refresh_ahead else 0.0,
        )

    def ttl_for_write(self, key: str, ttl_ms: int | None, now_ms: int) -> int:
        """The fresh TTL of one write: the given or class TTL, shortened by jitter."""
        base = self.ttl_ms if ttl_ms is None else ttl_ms
        if self.deterministic_jitter:
            return jittered_ttl_ms(base, self.jitter, lambda: key_fraction(key, now_ms // base))
        return jittered_ttl_ms(base, self.jitter)


def _refresh_before_ms(c: KeyClassConfig) -> int:
    if not c.refresh_ahead:
        return 0
    before = c.refresh_ahead_before_seconds or c.refresh_ahead_fraction * c.ttl_seconds
    return max(1, round(before * 1000))


@dataclass(frozen=True, slots=True)
class _Rule:
    """One class's patterns, split by how cheaply they can be tested."""

    prefixes: tuple[str, ...]  # "catalog:*" -> one str.startswith over the tuple
    exact: frozenset[str]  # no wildcard at all -> a set lookup
    glob: Callable[[str], object] | None  # the rest -> one compiled alternation
    kc: KeyClass
    heads: tuple[str, ...] = ()  # each pattern up to its first wildcard

    def may_hold(self, prefix: str) -> bool:
        """Some key starting with `prefix` may match (the heads agree as far as both go)."""
        return any(h.startswith(prefix) or prefix.startswith(h) for h in self.heads)

    def holds_all(self, prefix: str) -> bool:
        """Every key starting with `prefix` matches."""
        return prefix.startswith(self.prefixes)

    @classmethod
    def build(cls, patterns: Sequence[str], kc: KeyClass) -> _Rule:
        prefixes: list[str] = []
        exact: set[str] = set()
        globs: list[str] = []
        for p in patterns:
            if not _WILDCARDS.search(p):
                exact.add(p)
            elif p.endswith("*") and not _WILDCARDS.search(p[:-1]):
                prefixes.append(p[:-1])
            else:
                globs.append(p)
        # fnmatch.translate + re keeps case: fnmatch.fnmatch folds it on Windows and macOS.
        glob = re.compile("|".join(map(translate, globs))).match if globs else None
        heads = tuple(p[: m.start()] if (m := _WILDCARDS.search(p)) else p for p in patterns)
        return cls(tuple(prefixes), frozenset(exact), glob, kc, heads)

    def matches(self, key: str) -> bool:
        return (
            key.startswith(self.prefixes)
            or key in self.exact
            or (self.glob is not None and self.glob(key) is not None)
        )


class PolicyTable:
    """Maps keys to classes: the first class, in config order, with a matching pattern;
    the default class when none matches."""

    def __init__(
        self,
        classes: Sequence[KeyClassConfig],
        default: KeyClassConfig,
        *,
        memo_size: int = MEMO_SIZE,
    ) -> None:
        self._rules = [_Rule.build(c.patterns, KeyClass.from_config(c)) for c in classes]
        self._default = KeyClass.from_config(default)
        self._classes = (*(r.kc for r in self._rules), self._default)
        self._by_name = {kc.name: kc for kc in self._classes}
        self._memo: dict[str, KeyClass] = {}
        self._memo_size = memo_size

    @classmethod
    def from_config(cls, config: GatewayConfig) -> PolicyTable:
        return cls(config.classes, config.default_class)

    @property
    def classes(self) -> tuple[KeyClass, ...]:
        """Every class in config order, the default last."""
        return self._classes

    @property
    def default(self) -> KeyClass:
        return self._default

    def by_name(self, name: str) -> KeyClass | None:
        return self._by_name.get(name)

    def may_hold(self, prefix: str) -> list[KeyClass]:
        """The classes a key starting with `prefix` may fall in, in order (a superset)."""
        out: list[KeyClass] = []
        for rule in self._rules:
            if rule.may_hold(prefix):
                out.append(rule.kc)
            if rule.holds_all(prefix):
                return out
        return [*out, self._default]

    def classify(self, key: str) -> KeyClass:
        kc = self._memo.get(key)
        if kc is not None:
            return kc
        kc = self._default
        for rule in self._rules:
            if rule.matches(key):
                kc = rule.kc
                break
        if len(self._memo) >= self._memo_size:
            # Clearing beats LRU bookkeeping on every call; hot keys come straight back.
            self._memo.clear()
        self._memo[key] = kc
        return kc


def jittered_ttl_ms(
    base_ttl_ms: int, jitter: float, rand: Callable[[], float] = random.random
) -> int:
    """The TTL to store a write with: uniform in [base * (1 - jitter), base], at least 1 ms.

    Jitter spreads the expiries of keys written together so they are not all refilled in
    the same instant. It only ever shortens the TTL: the configured TTL is the staleness
    bound the class promises its readers ("never older than TTL + epsilon"), so a longer
    draw would break that promise, while a shorter one costs only an earlier refill.
    """
    if base_ttl_ms <= 1 or not jitter > 0:  # `not >` also catches nan
        return max(1, base_ttl_ms)
    # Clamped, so a bad rand() or jitter can never lengthen the TTL or zero it.
    u = rand()
    u = u if 0.0 <= u <= 1.0 else (1.0 if u > 1.0 else 0.0)
    return max(1, base_ttl_ms - int(base_ttl_ms * min(jitter, 1.0) * u))


def key_fraction(key: str, bucket: int) -> float:
    """A number in [0, 1) that depends only on `key` and `bucket` (deterministic jitter).

    Every gateway that writes `key` within the same time bucket (one base TTL long) draws
    the same jitter, so repeated writes of a key keep one expiry phase while different
    keys stay spread; the next bucket draws anew. blake2b rather than hash(): Python's
    str hash is salted per process, and gateways must agree.
    """
    digest = hashlib.blake2b(f"{bucket}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
