"""The circuit breaker in front of Redis: when Redis is unreachable, stop asking it.

Without it, every call to a hung Redis waits for `redis.socket_timeout` (a pool of
connections each stuck that long), and every caller pays it. The breaker counts the
outcome of each Redis call (`RedisStore`'s ``with store.reading:`` / ``writing:``):

- **closed** (normal): calls go through. It opens after `failures` consecutive failures,
  or when at least `min_calls` calls ended within the last `window_seconds` and the
  share of them that failed reached `failure_rate`.
- **open**: every call is refused at once with `BreakerOpen` (UNAVAILABLE, nothing sent
  to Redis; reads still answer from L1 and stale-if-error copies). After
  `cooldown_seconds` it goes
- **half-open**: one call goes through as a probe (the next call, or the health probe's
  PING, whichever comes first), the others are still refused. The probe succeeding
  closes the breaker, failing opens it again for another cool-down.

Which failures count. Only those that say Redis cannot serve the gateway at all: no
reply (a timeout, a refused or dropped connection, a reply that is not RESP) and the
error replies of a Redis that serves nothing now: LOADING (loading its dataset), BUSY
(a script blocks it), MASTERDOWN (a replica without its primary refuses reads too) and
CLUSTERDOWN. Every other error reply is an answer: Redis is reachable, and failing fast
would refuse calls that work. OOM, READONLY, MISCONF and NOREPLICAS refuse writes but
reads still succeed (a READONLY is also what a Sentinel failover must see, to follow the
new primary); NOSCRIPT is repaired by loading the script again; TRYAGAIN is a slot on
the move; NOAUTH, WRONGPASS, NOPERM, WRONGTYPE and ERR are configuration or data
errors whose own message is more use to the caller than "breaker open". Those count as
calls that succeeded. A call cancelled by its caller says nothing about Redis and is not
counted either way (a cancelled probe frees the probe's place).

Calls in flight when the state changes (sent before the breaker opened, still waiting
for a hung Redis) are not counted when they end: only calls admitted in the current
state decide the next one.

On a Redis Cluster each primary has a breaker of its own (`NodeBreakers`): a dead
primary's calls fail fast while the other nodes' keys are served as usual. A call is
admitted when every node it touches admits it; it counts for its node when it touched
one (a call spread over nodes is split by node first, see l2_cluster.py).

The same machine guards each origin (origin.py): `Breaker` takes what it protects as
parameters (its name in the log, which failures count, the error a refused call raises,
the gauges it keeps); the defaults are Redis's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from cachegw_gateway.config import BreakerConfig
from cachegw_gateway.redis_errors import CONNECTION, PROTOCOL, TIMEOUT, L2Unavailable

log = logging.getLogger("cachegw.redis")

CLOSED, OPEN, HALF_OPEN = 0, 1, 2  # the `breaker_state` gauge; -1 = no breaker
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half-open"}
DISABLED = -1

# Failures that mean Redis cannot serve the gateway (see the module's docstring).
COUNTED_KINDS = frozenset({CONNECTION, TIMEOUT, PROTOCOL, "LOADING", "BUSY", "MASTERDOWN",
                           "CLUSTERDOWN"})  # fmt: skip

BREAKER = "breaker"  # the `kind` of a refused call

_BUCKETS = 10  # the failure-rate window is kept as this many slices


def counts(err: Exception) -> bool:
    """Whether `err` says Redis is unreachable or unhealthy (opens the breaker)."""
    return isinstance(err, L2Unavailable) and err.kind in COUNTED_KINDS


class BreakerOpen(L2Unavailable):
    """Refused by the open breaker: nothing was sent to Redis (UNAVAILABLE)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind=BREAKER, mark_down=False)


class Group:
    """Where a breaker reports its state: the `breaker_state` gauge (one breaker), or a
    `NodeBreakers` summing up its nodes' breakers."""

    def changed(self, breaker: Breaker) -> None:
        raise NotImplementedError


class BreakerGauges(Protocol):
    """Where a breaker keeps its figures (GatewayStats for Redis's)."""

    breaker_state: int
    breaker_trips: int
    breaker_refused: int


def redis_refusal(when: str, reason: str, node: str = "") -> str:
    whose = f"circuit breaker for redis node {node}" if node else "circuit breaker"
    return (
        f"redis (L2) is unavailable: the gateway's {whose} is open, so this call "
        f"was not sent to redis and not applied (an Invalidate of prefixes, tags or "
        f"classes may have applied its first steps: repeat it); retry later: {when}. "
        f"It opened after {reason}"
    )


class NodeGauges(BreakerGauges, Protocol):
    """A Cluster store's figures: the gauges, and the nodes whose breaker is not closed."""

    breaker_nodes: dict[str, int]


class _Window:
    """Calls and failures over the last `seconds`, in `_BUCKETS` slices (O(1) per call)."""

    __slots__ = ("_calls", "_failed", "_slot", "_width")

    def __init__(self, seconds: float) -> None:
        self._width = seconds / _BUCKETS
        self._slot = [-1] * _BUCKETS  # the absolute slice number each bucket holds
        self._calls = [0] * _BUCKETS
        self._failed = [0] * _BUCKETS

    def add(self, now: float, failed: bool) -> None:
        n = int(now / self._width)
        i = n % _BUCKETS
        if self._slot[i] != n:
            self._slot[i], self._calls[i], self._failed[i] = n, 0, 0
        self._calls[i] += 1
        self._failed[i] += failed

    def totals(self, now: float) -> tuple[int, int]:
        oldest = int(now / self._width) - _BUCKETS + 1
        calls = failed = 0
        for i in range(_BUCKETS):
            if self._slot[i] >= oldest:
                calls += self._calls[i]
                failed += self._failed[i]
        return calls, failed

    def clear(self) -> None:
        self._slot = [-1] * _BUCKETS


class Breaker:
    """One per `RedisStore` (per Cluster node: `NodeBreakers`; and one per origin
    client); single-threaded (the gateway's event loop). `subject` names what it guards
    in log lines, `counting` says which failures count, `refuse(message)` is what a
    refused call raises, and `refusal(when, reason)` its message. `node` names the Cluster
    node it guards ("" otherwise); `group` is where it reports its state, instead of the
    `breaker_state` gauge."""

    def __init__(
        self,
        config: BreakerConfig,
        stats: BreakerGauges,
        *,
        clock: Callable[[], float] = time.monotonic,
        subject: str = "redis",
        counting: Callable[[Exception], bool] = counts,
        refuse: Callable[[str], Exception] = BreakerOpen,
        refusal: Callable[[str, str], str] = redis_refusal,
        logger: logging.Logger = log,
        node: str = "",
        group: Group | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self._stats = stats
        self._group = group
        self._clock = clock
        self._subject = subject
        self._counts = counting
        self._refuse = refuse
        self._refusal_text = refusal
        self._log = logger
        self._state = CLOSED
        self._epoch = 0  # bumped on every change of state: see `admit`
        self._consecutive = 0
        self._window = _Window(config.window_seconds)
        self._open_until = 0.0
        self._probing = False  # half-open: the probe is in flight
        self.reason = ""  # why it last opened
        if group is None:
            stats.breaker_state = CLOSED

    @property
    def state(self) -> int:
        return self._state

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self._state]

    # -- calls --------------------------------------------------------------------------

    def admit(self) -> int:
        """Before a Redis call: its ticket (the epoch it was admitted in), or
        `BreakerOpen` when the breaker refuses it."""
        if self._state == CLOSED:
            return self._epoch
        if self._state == OPEN and self._clock() >= self._open_until:
            self._move(HALF_OPEN, "cool-down over: letting one call through as a probe")
        if self._state == HALF_OPEN and not self._probing:
            self._probing = True
            return self._epoch
        self._stats.breaker_refused += 1
        raise self._refuse(self._refusal())

    def done(self, ticket: int, err: Exception | None) -> None:
        """A call admitted with `ticket` ended: answered (`err` None, or an error reply
        that does not count) or failed with `err`."""
        if ticket != self._epoch:
            return  # admitted before the last change of state: see the docstring
        failed = err is not None and self._counts(err)
        if self._state == HALF_OPEN:
            self._probing = False
            if failed:
                self._trip(f"the half-open probe failed: {err}")
            else:
                self._close("a call went through")
            return
        now = self._clock()
        self._window.add(now, failed)
        if not failed:
            self._consecutive = 0
            return
        self._consecutive += 1
        c = self.config
        if c.failures and self._consecutive >= c.failures:
            self._trip(f"{self._consecutive} consecutive failures (last: {err})")
            return
        if c.failure_rate:
            calls, bad = self._window.totals(now)
            if calls >= c.min_calls and bad >= c.failure_rate * calls:
                self._trip(
                    f"{bad} of the last {calls} calls failed within "
                    f"{c.window_seconds:g}s (failure_rate {c.failure_rate:g}; last: {err})"
                )

    def cancelled(self, ticket: int) -> None:
        """A call admitted with `ticket` was cancelled: no verdict on Redis."""
        if ticket == self._epoch and self._state == HALF_OPEN:
            self._probing = False

    # -- the health probe ---------------------------------------------------------------

    def probe_due(self) -> bool:
        """Whether the health probe's PING may decide the state: the breaker is open and
        its cool-down is over, or half-open with no probe in flight."""
        if self._state == OPEN:
            return self._clock() >= self._open_until
        return self._state == HALF_OPEN and not self._probing

    def probed(self, err: Exception | None) -> None:
        """The health probe's outcome, taken when `probe_due()` held before it was sent."""
        if self._state == CLOSED:
            return
        if err is not None and self._counts(err):
            self._trip(f"the health probe failed: {err}")
        else:
            self._close("the health probe was answered")

    def heard_from_redis(self, why: str) -> None:
        """Redis answered on another connection (the invalidation subscription went live
        again: after a failover, on the new primary): whatever the breaker feared is over,
        so it closes now rather than after its cool-down and a probe. Without this, a
        gateway whose subscription was back (which also ends the copies set aside for the
        outage) refused every read for up to a cool-down more."""
        if self._state != CLOSED:
            self._close(why)

    # -- transitions --------------------------------------------------------------------

    def _refusal(self) -> str:
        left = max(0.0, self._open_until - self._clock())
        when = (
            "a probe call is in flight"
            if self._state == HALF_OPEN
            else f"a probe goes through in {left:.1f}s"
        )
        return self._refusal_text(when, self.reason)

    def _move(self, state: int, why: str) -> None:
        before = self.state_name
        self._state = state
        self._epoch += 1
        if self._group is None:
            self._stats.breaker_state = state
        else:
            self._group.changed(self)
        level = logging.WARNING if state == OPEN else logging.INFO
        self._log.log(
            level,
            "%s circuit breaker %s -> %s: %s",
            self._subject,
            before,
            self.state_name,
            why,
            extra={
                "event": f"breaker_{self.state_name.replace('-', '_')}",
                "breaker_from": before,
                "redis_node": self.node,
            },
        )

    def _trip(self, reason: str) -> None:
        self.reason = reason
        self._open_until = self._clock() + self.config.cooldown_seconds
        self._probing = False
        self._stats.breaker_trips += 1
        self._move(
            OPEN,
            f"{reason}; failing calls fast for {self.config.cooldown_seconds:g}s",
        )

    def _close(self, why: str) -> None:
        self._consecutive = 0
        self._window.clear()
        self._probing = False
        self._move(CLOSED, why)


# The gauge's order of gravity: a store whose nodes disagree shows the worst of them.
_GRAVITY = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class NodeBreakers(Group):
    """A breaker per Redis Cluster node ("host:port"), made on a node's first call.

    `breaker_state` shows the worst of them and `breaker_nodes` every node whose breaker
    is not closed; trips and refusals add up. `forget_all_but` drops the breakers of nodes
    that are no longer primaries (a failed-over primary's stays open otherwise, and would
    show in Stats forever)."""

    def __init__(
        self,
        config: BreakerConfig,
        stats: NodeGauges,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._stats = stats
        self._clock = clock
        self._nodes: dict[str, Breaker] = {}
        stats.breaker_state = CLOSED
        stats.breaker_nodes = {}

    def __getitem__(self, node: str) -> Breaker:
        breaker = self._nodes.get(node)
        if breaker is None:
            breaker = self._nodes[node] = Breaker(
                self.config,
                self._stats,
                clock=self._clock,
                node=node,
                group=self,
                subject=f"redis node {node}",
                refusal=lambda when, reason: redis_refusal(when, reason, node),
            )
        return breaker

    def __iter__(self) -> Iterator[Breaker]:
        return iter(list(self._nodes.values()))

    def forget_all_but(self, nodes: Iterable[str]) -> None:
        keep = set(nodes)
        for name in [n for n in self._nodes if n not in keep]:
            del self._nodes[name]
        self._refresh()

    def changed(self, breaker: Breaker) -> None:
        self._refresh()

    def _refresh(self) -> None:
        states = {name: b.state for name, b in self._nodes.items() if b.state != CLOSED}
        self._stats.breaker_nodes = states
        self._stats.breaker_state = max(states.values(), key=_GRAVITY.__getitem__, default=CLOSED)
