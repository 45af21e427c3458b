"""Redis as L2: every Redis command the gateway sends goes through `RedisStore`.

Layout (``<p>`` is the deployment prefix, ``redis.prefix``):

    <p>:{K}          the value of cache key K, in an envelope (envelope.py)
    <p>:{K}:lease    the lease token of K while a caller holds the right to fill it
    <p>:{K}:n        K's counter (Incr): a plain Redis integer
    <p>:{K}:rl       K's rate-limiter state (Allow)
    <p>:gen:<class>  the class generation; Invalidate(class) increments it
    <p>:tag:<T>      sorted set: keys written with tag T, scored by their expiry (ms)
    <p>:events       stream: recent invalidation events (Subscribe(since=...) replays it)
    <p>:hotkeys      sorted set: the deployment's hottest keys (re-warming after restart)
    channel <p>:events  every invalidation event, as published
    channel <p>:fills   the key of every value that landed where a lease was held

The braces are a Redis Cluster hash tag: a key's value and lease share a slot whatever
the key's characters (see `hash_tag`). A write is one script (Set: lease, generation,
value, tag indexes and event; Delete: values, leases and event), so that a write applied
is a write published: atomic on a standalone or Sentinel-managed Redis. Those scripts
touch several slots; the Cluster layout has to split them (docs/consistency.md).

Reads pipeline GET and PTTL (one round trip however many keys) because an L1 copy must
never outlive the Redis entry: Redis's own remaining TTL bounds it, not a clock here.

Failures: every call runs inside `with self._reading:` or `with self._writing:`, which
turns whatever Redis or the connection did into an `L2Unavailable` (redis_errors.py),
counts it and marks Redis down where that is the truth; the same place asks the circuit
breaker (breaker.py) first, which refuses calls at once while Redis is known to be
unreachable. Reads are sent once more after a dropped connection or a timeout; writes
never are (see redis_connect.py). ``<p>:probe``
never exists: while Redis refuses writes, the health probe UNLINKs it to learn when it
takes them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from cachegw_gateway import cluster_url, envelope, redis_connect, redis_errors
from cachegw_gateway.breaker import Breaker, BreakerOpen
from cachegw_gateway.config import BreakerConfig, RedisConfig
from cachegw_gateway.redis_errors import UNAVAILABLE_ERRORS as UNAVAILABLE_ERRORS
from cachegw_gateway.redis_errors import L2Unavailable as L2Unavailable
from cachegw_gateway.scripts import Script, load_all
from cachegw_gateway.stats import GatewayStats

log = logging.getLogger(__name__)

T = TypeVar("T")

_NOT_RUN = object()  # run_each: a call whose script never ran

# A read that lost its connection or timed out is sent once more after this long.
READ_RETRY_DELAY = 0.01

_VERSION_OF_OLD = f"""
local ver = 0
if old and string.len(old) >= {envelope.PREFIX_SIZE}
    and string.byte(old, 1) == {envelope.MAGIC} then
  ver = struct.unpack('>I8', old, {envelope.VERSION_OFFSET + 1})
end
"""

# The generation's offset inside the tail the Set script receives (after the prefix).
_GEN_IN_TAIL = envelope.GENERATION_OFFSET - envelope.PREFIX_SIZE

# publish(stream, payload, channel, maxlen): appends `payload` (an encoded
# InvalidationEvent without id; '' = no event) to the audit stream and publishes it on
# `channel` with its id prepended as field 1 (protobuf accepts fields in any order), so
# every receiver sees the stream's id. Returns the id ('' without an event).
_PUBLISH_FN = """
local function publish(stream, payload, channel, maxlen)
  if payload == '' then return '' end
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'e', payload)
  redis.call('PUBLISH', channel, string.char(10, string.len(id)) .. id .. payload)
  return id
end
"""

# One tag index entry: the member scored by its value's expiry (GT: an entry never
# shrinks, so two racing writes cannot leave it expiring before the value it names),
# expired members pruned, and the index kept alive as long as its longest member.
_INDEX_STEP = """redis.call('ZADD', {index}, 'GT', {score}, {member})
  redis.call('ZREMRANGEBYSCORE', {index}, '-inf', {now})
  if redis.call('PTTL', {index}) < tonumber({px}) then
    redis.call('PEXPIRE', {index}, {px})
  end"""

_INDEX_IN_SET = _INDEX_STEP.format(
    index="KEYS[i]", score="ARGV[11]", member="ARGV[6]", now="ARGV[12]", px="ARGV[2]"
)

# One Set, one script, one round trip: the lease check, the class generation, the
# compare-and-set, the write, its tag index entries and its invalidation event are one
# atomic step, so that a write applied is a write indexed and published (never one
# without the other, whatever happens to the caller or the connection).
# KEYS[1] value, KEYS[2] lease, KEYS[3] class generation, KEYS[4] events stream,
# KEYS[5..] tag indexes. ARGV[1] envelope tail (after the entry version), ARGV[2] PX ms,
# ARGV[3] required current version ('' = any), ARGV[4] lease token ('' = a plain
# write), ARGV[5] fills channel, ARGV[6] the cache key, ARGV[7] the lease's class
# generation, ARGV[8] event ('' = none), ARGV[9] events channel, ARGV[10] stream MAXLEN,
# ARGV[11] expiry (ms since the epoch; the tag index score), ARGV[12] now (ms), ARGV[13]
# condition ('' = none, 'absent', 'present'), ARGV[14] the origin's version of the value
# ('' = none: the entry version is the stored one + 1), ARGV[15] the envelope's format
# byte. Returns {outcome, version, replaced, generation, event id}: outcome 1 stored, 0
# version conflict, -1 lease invalid, 2 condition failed, 3 superseded: a live value of
# a newer origin version is stored (a write or load through the origin that another one
# overtook; the cache never goes back to an older state of the origin; a lease given
# with it ends, since the newer value answers its waiters). Equal versions store (the
# same state of the origin: a reload renews the TTL). A fill whose lease predates
# Invalidate(class) is refused and ends the lease. A write ends any lease on the key
# (the holder's load may predate it) and wakes the gateways waiting for that lease. A
# plain write is stamped with the generation Redis holds; the event goes out only when a
# value was replaced (only then can another gateway hold a copy), and not by the same
# origin version of it (a reload of an unchanged value, e.g. refresh-ahead: every copy
# elsewhere is that very value; `replaced` is then 0).
_SET_SCRIPT_TEMPLATE = f"""
{_PUBLISH_FN}
local lease = redis.call('GET', KEYS[2])
local gen = GENERATION
if ARGV[4] ~= '' then
  if lease ~= ARGV[4] then
    return {{-1, 0, 0, gen, ''}}
  end
  if tonumber(ARGV[7]) ~= gen then
    redis.call('DEL', KEYS[2])
    redis.call('PUBLISH', ARGV[5], ARGV[6])
    return {{-1, 0, 0, gen, ''}}
  end
end
local old = redis.call('GET', KEYS[1])
{_VERSION_OF_OLD}
-- A value of an older class generation is dead: absent for a condition, older than any
-- origin version.
local alive = old ~= false
if alive and ver > 0 and string.len(old) >= {envelope.GENERATION_OFFSET + 4} then
  alive = struct.unpack('>I4', old, {envelope.GENERATION_OFFSET + 1}) == gen
end
if ARGV[13] ~= '' then
  if (ARGV[13] == 'absent') == alive then
    return {{2, ver, 0, gen, ''}}
  end
end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= ver then
  return {{0, ver, 0, gen, ''}}
end
local same = false
if ARGV[14] ~= '' then
  local want = tonumber(ARGV[14])
  -- The same state of the origin again (a reload): other copies hold this very value.
  same = alive and want > 0 and ver == want
  if alive and ver > want then
    if ARGV[4] ~= '' then
      redis.call('DEL', KEYS[2])
      redis.call('PUBLISH', ARGV[5], ARGV[6])
    end
    return {{3, ver, 0, gen, ''}}
  end
  ver = want
else
  ver = ver + 1
end
local tail = string.sub(ARGV[1], 1, {_GEN_IN_TAIL}) .. struct.pack('>I4', gen)
  .. string.sub(ARGV[1], {_GEN_IN_TAIL + 5})
redis.call('SET', KEYS[1],
  string.char({envelope.MAGIC}, tonumber(ARGV[15])) .. struct.pack('>I8', ver) .. tail,
  'PX', ARGV[2])
for i = 5, #KEYS do
  {_INDEX_IN_SET}
end
if lease then
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
local id = ''
local replaced = 0
if old and not same then
  replaced = 1
  PUBLISH_EVENT
end
return {{1, ver, replaced, gen, id}}
"""
_SET_SCRIPT = _SET_SCRIPT_TEMPLATE.replace(
    "GENERATION", "tonumber(redis.call('GET', KEYS[3]) or '0')"
).replace("PUBLISH_EVENT", "id = publish(KEYS[4], ARGV[8], ARGV[9], ARGV[10])")

# Delete: KEYS[1] events stream, then value, lease, counter and limiter of each key.
# ARGV[1] event ('' = none), ARGV[2] events channel, ARGV[3] stream MAXLEN. Removes all,
# then publishes, in one step. Returns {values removed, event id, per key 1 or 0}.
# Ending a lease refuses a fill whose load started before the delete.
_DELETE_SCRIPT = f"""
{_PUBLISH_FN}
local n = 0
local each = {{}}
for i = 2, #KEYS, 4 do
  local gone = redis.call('UNLINK', KEYS[i])
  redis.call('UNLINK', KEYS[i + 1], KEYS[i + 2], KEYS[i + 3])
  n = n + gone
  each[#each + 1] = gone
end
return {{n, publish(KEYS[1], ARGV[1], ARGV[2], ARGV[3]), each}}
"""

# Tag invalidation, one chunk: KEYS[1] the tag index, then value and lease of each
# member; ARGV the members' scores as read. A member is removed (value, lease and index
# entry) only if its score is unchanged: a Set that re-indexed it meanwhile stays
# indexed, so a later Invalidate(tag) still finds it. Returns {values removed, index
# entries removed}.
_TAG_CHUNK_SCRIPT = """
local n, m = 0, 0
for i = 1, #ARGV, 2 do
  local j = (i + 1) / 2
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('UNLINK', KEYS[2 * j])
    redis.call('UNLINK', KEYS[2 * j + 1])
    redis.call('ZREM', KEYS[1], ARGV[i])
    m = m + 1
  end
end
return {n, m}
"""

# KEYS[1] value, KEYS[2] lease. ARGV[1] token, ARGV[2] lease PX ms, ARGV[3] the version
# of a value the caller found unusable ('' = none: any stored value is an answer).
# Returns {1, value, pttl} when a usable value is stored, {2} when the lease was granted,
# {3, lease pttl} when another caller holds it.
_ACQUIRE_SCRIPT = f"""
local old = redis.call('GET', KEYS[1])
if old then
  {_VERSION_OF_OLD}
  if ARGV[3] == '' or tostring(ver) ~= ARGV[3] then
    return {{1, old, redis.call('PTTL', KEYS[1])}}
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {{2}}
end
return {{3, redis.call('PTTL', KEYS[2])}}
"""

# KEYS[1] lease. ARGV[1] token, ARGV[2] fills channel, ARGV[3] the cache key. Ends the
# lease only if this token still holds it (compare-and-delete), never touching the value,
# and wakes the gateways waiting for it. Returns 1 when released, 0 otherwise.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] events stream. ARGV[1] MAXLEN, ARGV[2] encoded InvalidationEvent without id,
# ARGV[3] channel. The published message is the event with its id prepended as field 1
# (protobuf accepts fields in any order), so every receiver sees the stream's id.
_PUBLISH_SCRIPT = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
redis.call('PUBLISH', ARGV[3], string.char(10, string.len(id)) .. id .. ARGV[2])
return id
"""


@dataclass(frozen=True, slots=True)
class L2Entry:
    envelope: envelope.Envelope
    # Milliseconds left in Redis; -1 when the key has no expiry (not written by us).
    pttl_ms: int


@dataclass(frozen=True, slots=True)
class SetCall:
    """One Set, as the Set script takes it (see _SET_SCRIPT)."""

    key: str
    tail: bytes  # the envelope after the entry version
    px_ms: int
    if_version: int | None = None
    lease_token: bytes = b""
    key_class: str = ""
    lease_generation: int = 0
    tags: Sequence[str] = ()
    expires_at_ms: int = 0
    event: bytes = b""
    max_events: int = 10_000
    condition: str = ""  # '', 'absent' or 'present'
    # The origin's version of the value (read- and write-through): stored as the entry
    # version, unless a live entry of a newer one is there (superseded). None = the
    # stored version + 1.
    origin_version: int | None = None
    format: int = envelope.FORMAT_VERSION  # envelope.format_of(the tail's flags)


@dataclass(frozen=True, slots=True)
class SetResult:
    stored: bool
    version: int
    replaced: bool = False  # a value existed before this write
    lease_invalid: bool = False
    generation: int = 0  # the class generation Redis held when the write ran
    event_id: str = ""  # the invalidation event the write published, if any
    condition_failed: bool = False
    superseded: bool = False  # a live entry of a newer origin version stays

    @classmethod
    def from_reply(cls, reply: Any) -> SetResult:
        outcome, version, replaced, generation, event_id = reply
        return cls(
            stored=outcome == 1,
            version=int(version),
            replaced=bool(replaced),
            lease_invalid=outcome == -1,
            generation=int(generation),
            event_id=_text(event_id),
            condition_failed=outcome == 2,
            superseded=outcome == 3,
        )


@dataclass(frozen=True, slots=True)
class Acquired:
    """What a lease attempt found: a stored value, the lease, or another holder."""

    entry: L2Entry | None = None  # a usable-looking value (still to be checked)
    granted: bool = False
    holder_pttl_ms: int = 0  # with neither: how long the other holder's lease has left
    raw_mismatch: bool = False  # a value was stored but is not a readable envelope


def _text(raw: object) -> str:
    return raw.decode(errors="surrogateescape") if isinstance(raw, bytes) else str(raw)


def _stream_id(raw: object) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def hash_tag(key: str) -> str:
    """`key` as it stands between the braces of its Redis keys.

    Redis Cluster hashes the text between the first '{' and the first '}' after it, or
    the whole name when that text is empty. A key beginning with '}' would leave it empty
    and put a value and its lease in different slots; such keys (and, to keep the
    mapping one-to-one, keys beginning with a backslash) get a backslash in front.
    Depending only on the first character, the mapping keeps prefixes: a key starts with
    P exactly when its tag starts with P's tag."""
    return "\\" + key if key[:1] in ("}", "\\") else key


def key_of_tag(tag: str) -> str:
    """The cache key whose `hash_tag` is `tag` (its inverse)."""
    return tag[1:] if tag[:1] == "\\" else tag


# The endings of the Redis keys made from one cache key (value, lease, counter, limiter):
# nothing else under ``<p>:{`` ends so (the write-behind journal's ``{wb:...}:journal``,
# ``:ver``, ``:dead``; a Cluster's ``{meta}:events``, ``{meta}:gens``).
_KEY_ENDINGS = (b"}", b"}:lease", b"}:n", b"}:rl")


def glob_escape(text: str) -> str:
    """`text` matched literally inside a Redis glob pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _Calls:
    """``with store._reading:`` / ``with store._writing:`` around Redis calls (a new one
    per call): the one place where a failure becomes an `L2Unavailable` (classified by
    redis_errors, counted and reported by `RedisStore._down`), where an answer marks
    Redis up, and where the circuit breakers (breaker.py) of the nodes the call goes to
    admit it or refuse it before anything is sent, and learn how it ended. A call that
    touched several nodes (a Cluster store's multi-node calls) and failed is no verdict
    on any of them: which one failed is not known."""

    __slots__ = ("_breakers", "_store", "_tickets", "_write")

    def __init__(self, store: RedisStore, breakers: Sequence[Breaker], *, write: bool) -> None:
        self._store = store
        self._breakers = breakers
        self._write = write
        self._tickets: list[int] = []

    def __enter__(self) -> None:
        tickets = self._tickets
        try:
            for breaker in self._breakers:
                tickets.append(breaker.admit())  # raises BreakerOpen: nothing is sent
        except BreakerOpen:
            self._cancel()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if exc is None:
            self._store._answered()
            for breaker, ticket in zip(self._breakers, self._tickets, strict=True):
                breaker.done(ticket, None)
        elif isinstance(exc, redis_errors.FAILURES) and not isinstance(exc, L2Unavailable):
            err = self._store._down(exc, write=self._write)
            self._failed(err)
            raise err from exc
        elif isinstance(exc, L2Unavailable):
            self._failed(exc)
        else:  # cancelled, or a bug here: no verdict on Redis
            self._cancel()
        return False

    def _failed(self, err: L2Unavailable) -> None:
        if len(self._tickets) == 1:
            self._breakers[0].done(self._tickets[0], err)
        else:
            self._cancel()

    def _cancel(self) -> None:
        for breaker, ticket in zip(self._breakers, self._tickets, strict=False):
            breaker.cancelled(ticket)


# After a connection failure, the pool's idle connections are dropped at most this often.
DROP_IDLE_EVERY = 0.2


class RedisStore:
    # False: the scripts read class generations from Redis beside the values (one Redis
    # holds every key). A Cluster store holds them in memory instead (l2_cluster.py).
    in_memory_generations = False

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        stats: GatewayStats | None = None,
        pubsub_factory: Callable[[], aioredis.Redis] | None = None,
        breaker: BreakerConfig | None = None,
        *,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._on_close = on_close
        self.pubsub_client: Callable[[], aioredis.Redis] = pubsub_factory or (lambda: client)
        self.prefix = prefix
        self._key_head = f"{prefix}:{{".encode()  # what every key's Redis keys start with
        self._set_script = Script(client, _SET_SCRIPT)
        self._delete_script = Script(client, _DELETE_SCRIPT)
        self._tag_chunk_script = Script(client, _TAG_CHUNK_SCRIPT)
        self._acquire_script = Script(client, _ACQUIRE_SCRIPT)
        self._publish_script = Script(client, _PUBLISH_SCRIPT)
        self._release_script = Script(client, _RELEASE_SCRIPT)
        # The kind of error reply (READONLY, MASTERDOWN, ...) that said Redis refuses
        # every write, until a write goes through again; "" while writes are accepted.
        self._writes_refused = ""
        # Why the last health probe failed (None: it did not): logged by the start line
        # and by the watch when Redis goes down.
        self.last_probe_error: L2Unavailable | None = None
        self.probe_key = f"{prefix}:probe"
        self.stats = GatewayStats() if stats is None else stats
        # None (no breaker) unless given; from_config passes redis.breaker.
        self.breaker = (
            Breaker(breaker, self.stats) if breaker is not None and breaker.enabled else None
        )
        self._breakers: tuple[Breaker, ...] = () if self.breaker is None else (self.breaker,)
        self._mismatch_logged = -60.0
        self._idle_dropped_at = -DROP_IDLE_EVERY
        self._drops: set[asyncio.Task[None]] = set()
        self.events_key = f"{prefix}:events"
        self.events_channel = f"{prefix}:events"
        self.fills_channel = f"{prefix}:fills"
        self.hotkeys_key = f"{prefix}:hotkeys"

    def calls(self, rkeys: Sequence[str] = (), *, write: bool) -> _Calls:
        """``with store.calls([...], write=...):`` around a Redis call on `rkeys` (Redis
        keys; none: the call may go to any node). Failures become `L2Unavailable`,
        counted; the circuit breaker admits the call first (on a Cluster, the breakers
        of the nodes holding `rkeys`). A write is never sent again: its lost reply says
        so."""
        return _Calls(self, self._breakers, write=write)

    @property
    def _reading(self) -> _Calls:
        return self.calls(write=False)

    @property
    def _writing(self) -> _Calls:
        return self.calls(write=True)

    @property
    def reading(self) -> _Calls:
        """``with store.reading:`` around a read of Redis made outside this class (a
        module with scripts of its own) that may go to any node: see `calls`."""
        return self.calls(write=False)

    @property
    def writing(self) -> _Calls:
        """The same for a write."""
        return self.calls(write=True)

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client (telemetry instruments it when tracing is on)."""
        return self._client

    @property
    def envelope_mismatches(self) -> int:
        """Stored values this gateway could not read (served as misses)."""
        return self.stats.envelope_mismatches

    @classmethod
    def from_config(
        cls, config: RedisConfig, url: str, stats: GatewayStats | None = None
    ) -> RedisStore:
        """The store for `url`: standalone or Sentinel (redis_connect.py, which also says
        why redis-py never retries a command here), or a Cluster (l2_cluster.py)."""
        if cluster_url.is_cluster(url):
            from cachegw_gateway.l2_cluster import ClusterStore  # imports this module

            return ClusterStore.from_url(config, url, stats)
        clients = redis_connect.connect(config, url)
        return cls(
            clients.client,
            config.prefix,
            stats,
            clients.pubsub_client,
            breaker=config.breaker,
            on_close=clients.close,
        )

    def _down(self, exc: BaseException, *, write: bool = False) -> L2Unavailable:
        """The failure of a call (a write if `write`), classified and counted."""
        err = redis_errors.classify(exc, write=write)
        stats = self.stats
        stats.redis_errors += 1
        if err.is_reply:
            stats.error_replies[err.kind] = stats.error_replies.get(err.kind, 0) + 1
        if err.writes_refused:
            self._writes_refused = err.kind
        if err.mark_down:
            stats.redis_up = False
        if not err.is_reply:
            self._drop_idle_connections()
        return err

    def _drop_idle_connections(self) -> None:
        """A connection failed: the pool's idle ones may be just as dead (Redis restarted,
        failed over, or a network path reset). Closing them now makes the next calls
        connect afresh, rather than each fail once on a dead connection: a write that
        fails is never sent again, so every such failure would reach a caller. At most
        once per DROP_IDLE_EVERY while failures go on (a connection in use at the first
        failure returns to the pool later)."""
        pool = getattr(self._client, "connection_pool", None)  # none on a Cluster client
        now = time.monotonic()
        if pool is None or now - self._idle_dropped_at < DROP_IDLE_EVERY:
            return
        self._idle_dropped_at = now
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(pool.disconnect(inuse_connections=False))
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    def _answered(self) -> None:
        """Redis answered a call: it is up, unless it refuses writes. Only the health
        probe ends that (`ping`): a write call can answer without having written (a
        script that found a version conflict runs on a replica)."""
        if not self._writes_refused:
            self.stats.redis_up = True

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """A read, sent once more after a dropped connection or a timeout (safe: a read
        changes nothing). Never for writes: see redis_connect.py."""
        try:
            return await call()
        except redis_errors.UNAVAILABLE_ERRORS as exc:
            if not redis_errors.retryable(exc):
                raise
            self._drop_idle_connections()  # the others may be as dead as this one
        await asyncio.sleep(READ_RETRY_DELAY)
        return await call()

    # -- layout -------------------------------------------------------------------------

    def redis_key(self, key: str) -> str:
        return f"{self.prefix}:{{{hash_tag(key)}}}"

    def lease_key(self, key: str) -> str:
        return f"{self.prefix}:{{{hash_tag(key)}}}:lease"

    def counter_key(self, key: str) -> str:
        """K's counter (Incr), beside its value in the same slot."""
        return f"{self.prefix}:{{{hash_tag(key)}}}:n"

    def limiter_key(self, key: str) -> str:
        """K's rate-limiter state (Allow), beside its value in the same slot."""
        return f"{self.prefix}:{{{hash_tag(key)}}}:rl"

    def gen_key(self, key_class: str) -> str:
        return f"{self.prefix}:gen:{key_class}"

    def tag_key(self, tag: str) -> str:
        return f"{self.prefix}:tag:{tag}"

    def generation_keys(self, key_class: str) -> list[str]:
        """The keys a script reads `key_class`'s generation from (none: in memory)."""
        return [self.gen_key(key_class)]

    async def generation(self, key_class: str) -> int:
        """`key_class`'s generation, for a store that holds them in memory."""
        raise NotImplementedError("one Redis: the scripts read the generation themselves")

    def on_subscription(self, live: bool) -> None:
        """The invalidation subscription went live or was lost: live, Redis answers (see
        `Breaker.heard_from_redis`); a Cluster store also reloads its generations."""
        if live and self.breaker is not None:
            self.breaker.heard_from_redis("the invalidation subscription is live again")

    def on_class_event(self) -> None:
        """Another gateway published a class invalidation (see l2_cluster.py)."""

    def _decode(self, key: str, raw: bytes, pttl: int) -> L2Entry | None:
        try:
            return L2Entry(envelope.decode(raw), pttl)
        except envelope.EnvelopeError as exc:
            self.stats.envelope_mismatches += 1
            # One line a minute at most: a foreign value read on every request must not
            # turn into a log line per request (the counter has the full figure).
            now = time.monotonic()
            if now - self._mismatch_logged >= 60:
                self._mismatch_logged = now
                log.warning(
                    "treating %s as a miss: %s (%d unreadable values so far)",
                    key[:80],
                    exc,
                    self.stats.envelope_mismatches,
                )
            return None

    # -- reads --------------------------------------------------------------------------

    async def read(
        self, keys: Sequence[str], classes: Iterable[str]
    ) -> tuple[list[L2Entry | None], dict[str, int]]:
        """One round trip: GET and PTTL of every key, and the generation of each class."""
        class_names = list(classes)

        async def once() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    rkey = self.redis_key(key)
                    pipe.get(rkey)
                    pipe.pttl(rkey)
                for name in class_names:
                    pipe.get(self.gen_key(name))
                return redis_errors.raise_first(await pipe.execute(raise_on_error=False))

        with self._reading:
            replies = await self._retrying(once)
        out: list[L2Entry | None] = []
        for i, key in enumerate(keys):
            raw, pttl = replies[2 * i], replies[2 * i + 1]
            if raw is None or pttl == -2:
                out.append(None)
            else:
                out.append(self._decode(key, raw, pttl))
        gens_raw = replies[2 * len(keys) :]
        gens = {name: int(g or 0) for name, g in zip(class_names, gens_raw, strict=True)}
        return out, gens

    # -- writes -------------------------------------------------------------------------

    def _set_keys_args(self, call: SetCall, now_ms: int) -> tuple[list[str], list[Any]]:
        keys = [
            self.redis_key(call.key),
            self.lease_key(call.key),
            self.gen_key(call.key_class),
            self.events_key,
            *(self.tag_key(t) for t in call.tags),
        ]
        args: list[Any] = [
            call.tail,
            call.px_ms,
            "" if call.if_version is None else call.if_version,
            call.lease_token,
            self.fills_channel,
            call.key,
            call.lease_generation,
            call.event,
            self.events_channel,
            call.max_events,
            call.expires_at_ms,
            now_ms,
            call.condition,
            "" if call.origin_version is None else call.origin_version,
            call.format,
        ]
        return keys, args

    async def set(self, call: SetCall) -> SetResult:
        """Write one value, index its tags and publish its event when it replaced a value:
        one script, one round trip (see _SET_SCRIPT)."""
        keys, args = self._set_keys_args(call, time.time_ns() // 1_000_000)
        with self._writing:
            reply = await self._set_script(keys=keys, args=args)
        return SetResult.from_reply(reply)

    async def set_many(self, calls: Sequence[SetCall]) -> list[SetResult | L2Unavailable]:
        """Many Sets in one pipeline (one round trip), each its own script: per call its
        result or its failure (an error reply: OOM, READONLY...). A failure of the whole
        round trip (the connection) raises."""
        now_ms = time.time_ns() // 1_000_000
        replies = await self.run_each(
            self._set_script, [self._set_keys_args(call, now_ms) for call in calls]
        )
        return [r if isinstance(r, L2Unavailable) else SetResult.from_reply(r) for r in replies]

    async def run_each(
        self, script: Script, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
    ) -> list[Any | L2Unavailable]:
        """`script` once per (keys, args), in one pipeline: per call its reply or its
        failure; a failure of the whole round trip (no reply: the connection) raises.
        Calls that found the script missing (NOSCRIPT: they did not run) are sent
        again once, after loading it. (EVALSHA through ``execute_command``: redis-py
        refuses its ``evalsha`` method in a Cluster pipeline, but routes the command by
        its keys like any other.)"""
        out: list[Any] = [_NOT_RUN] * len(calls)
        todo = list(range(len(calls)))
        first_keys = [keys[0] for keys, _ in calls if keys]
        for attempt in range(2):
            with self.calls(first_keys, write=True):
                async with self._client.pipeline(transaction=False) as pipe:
                    for i in todo:
                        keys, args = calls[i]
                        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
                # No reply at all (a Cluster pipeline reports a node's timeout per
                # command): the round trip failed, and the breaker must hear of it.
                lost = next((r for r in replies if isinstance(r, UNAVAILABLE_ERRORS)), None)
                if lost is not None:
                    raise lost
                if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                    await load_all(self._client)
            missing: list[int] = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    missing.append(i)
                elif isinstance(reply, Exception):
                    out[i] = self._down(reply, write=True)
                else:
                    out[i] = reply
            todo = missing
            if not todo:
                break
        return [
            self._down(NoScriptError("NOSCRIPT"), write=True) if r is _NOT_RUN else r for r in out
        ]

    async def acquire(
        self, key: str, token: bytes, lease_ms: int, unusable_version: int | None
    ) -> Acquired:
        """Take the lease of `key` unless a (new) value is stored or another caller holds it."""
        with self.calls([self.lease_key(key)], write=True):
            reply = await self._acquire_script(
                keys=[self.redis_key(key), self.lease_key(key)],
                args=[token, lease_ms, "" if unusable_version is None else unusable_version],
            )
        kind = int(reply[0])
        if kind == 1:
            entry = self._decode(key, reply[1], int(reply[2]))
            return Acquired(entry=entry, raw_mismatch=entry is None)
        if kind == 2:
            return Acquired(granted=True)
        return Acquired(holder_pttl_ms=max(0, int(reply[1])))

    async def release(self, key: str, token: bytes) -> bool:
        """End `key`'s lease if `token` still holds it; the stored value is left alone."""
        with self.calls([self.lease_key(key)], write=True):
            released = await self._release_script(
                keys=[self.lease_key(key)], args=[token, self.fills_channel, key]
            )
        return bool(int(released))

    async def delete(
        self, keys: Sequence[str], *, event: bytes = b"", max_events: int = 10_000
    ) -> tuple[int, str]:
        """Remove each key's value, lease, counter and limiter state and publish `event`,
        in one script;
        returns (values removed, event id). Ending a lease refuses a fill whose load
        started before the delete."""
        removed, event_id, _ = await self.delete_each(keys, event=event, max_events=max_events)
        return removed, event_id

    async def delete_each(
        self, keys: Sequence[str], *, event: bytes = b"", max_events: int = 10_000
    ) -> tuple[int, str, list[bool]]:
        """`delete`, also saying per key whether a value existed."""
        rkeys = [self.events_key]
        for key in keys:
            rkeys += (
                self.redis_key(key),
                self.lease_key(key),
                self.counter_key(key),
                self.limiter_key(key),
            )
        with self._writing:
            removed, event_id, each = await self._delete_script(
                keys=rkeys, args=[event, self.events_channel, max_events]
            )
        return int(removed), _text(event_id), [bool(int(x)) for x in each]

    async def unlink(self, keys: Sequence[str]) -> int:
        """`delete` without an event (Invalidate publishes one event for all it names)."""
        return (await self.delete(keys))[0]

    def _key_starts(self, rkey: bytes, prefix: str) -> bool:
        """Whether `rkey` is the value, lease, counter or limiter of a cache key starting
        with `prefix`. The SCAN pattern also matches the gateway's own keys that share
        the ``<p>:{`` shape (write-behind journals; a Cluster's events and generations):
        Invalidate(prefixes=["wb"]) must not delete a journal of writes not yet stored."""
        head = self._key_head
        if not rkey.startswith(head):
            return False
        for ending in _KEY_ENDINGS:
            if rkey.endswith(ending) and len(rkey) > len(head) + len(ending):
                tag = rkey[len(head) : -len(ending)].decode(errors="surrogateescape")
                return key_of_tag(tag).startswith(prefix)
        return False

    async def delete_prefixes(self, prefixes: Sequence[str], batch: int = 1000) -> int:
        """Delete every value (and lease, counter, limiter) whose key starts with one of
        `prefixes`.

        SCAN over the keyspace: O(keys in Redis), in batches, never blocking Redis."""
        removed = 0
        with self._writing:
            for prefix in prefixes:
                match = f"{glob_escape(self.redis_key(prefix)[:-1])}*"
                doomed: list[bytes] = []
                async for rkey in self._client.scan_iter(match=match, count=batch):
                    if not self._key_starts(rkey, prefix):
                        continue
                    doomed.append(rkey)
                    if len(doomed) >= batch:
                        removed += await self._unlink_counting_values(doomed)
                        doomed = []
                if doomed:
                    removed += await self._unlink_counting_values(doomed)
        return removed

    async def _unlink_counting_values(self, rkeys: list[bytes]) -> int:
        async with self._client.pipeline(transaction=False) as pipe:
            for rkey in rkeys:
                # Not pipe.unlink(): on a cluster pipeline redis-py makes it a coroutine
                # (it splits keys by slot), which never queues the command.
                pipe.execute_command("UNLINK", rkey)
            replies = redis_errors.raise_first(await pipe.execute(raise_on_error=False))
        # Values end with the closing brace of their hash tag; leases end with ":lease".
        return sum(int(r) for k, r in zip(rkeys, replies, strict=True) if k.endswith(b"}"))

    async def delete_tags(self, tags: Sequence[str], chunk: int = 1000) -> int:
        """`delete_tag` for each of `tags`, with the first chunk of every index read in
        one round trip: a call naming dozens of tags, most of them empty, costs about
        what one tag does (tag by tag, a page's worth took tens of ms of client CPU).
        An index with more than a chunk is walked on by `delete_tag`. Returns the values
        removed."""
        if len(tags) == 1:
            return await self.delete_tag(tags[0], chunk)
        indexes = [self.tag_key(tag) for tag in tags]
        with self.calls(indexes, write=False):
            async with self._client.pipeline(transaction=False) as pipe:
                for index in indexes:
                    pipe.zrange(index, 0, chunk - 1, withscores=True, score_cast_func=bytes)
                firsts = redis_errors.raise_first(await pipe.execute(raise_on_error=False))
        removed = 0
        for tag, index, members in zip(tags, indexes, firsts, strict=True):
            if not members:
                continue
            pairs: list[tuple[bytes, bytes]] = list(members)
            gone, _ = await self._remove_tag_chunk(index, pairs)
            removed += gone
            if len(pairs) >= chunk:  # more than a chunk: the rest, as for one tag
                removed += await self.delete_tag(tag, chunk)
        return removed

    async def delete_tag(self, tag: str, chunk: int = 1000) -> int:
        """Delete every key indexed under `tag`, and exactly the index entries read.

        Walks the index in chunks of `chunk` members (never loading it whole); a Set that
        re-indexes a member meanwhile keeps its entry (see _TAG_CHUNK_SCRIPT). Bounded:
        at most the index's size at the start, in chunks, plus one. Returns the values
        removed."""
        index = self.tag_key(tag)
        removed = skipped = 0
        with self.calls([index], write=False):
            rounds = int(await self._client.zcard(index)) // chunk + 2
        for _ in range(rounds):
            with self.calls([index], write=False):
                members = await self._client.zrange(
                    index, skipped, skipped + chunk - 1, withscores=True, score_cast_func=bytes
                )
            if not members:
                break
            pairs: list[tuple[bytes, bytes]] = list(members)  # type: ignore[arg-type]
            gone, pruned = await self._remove_tag_chunk(index, pairs)
            removed += gone
            # Members left in place (re-indexed meanwhile) are stepped over next time.
            skipped += len(pairs) - pruned
            if len(pairs) < chunk:
                break
        return removed

    async def _remove_tag_chunk(
        self, index: str, pairs: Sequence[tuple[bytes, bytes]]
    ) -> tuple[int, int]:
        """One chunk of `delete_tag` (members with their scores as read): (values
        removed, index entries removed), in one script (see _TAG_CHUNK_SCRIPT)."""
        keys: list[str] = []
        args: list[bytes] = []
        for member, score in pairs:
            key = _text(member)
            keys += (self.redis_key(key), self.lease_key(key))
            args += (member, score)
        with self.calls([index], write=True):
            counts = await self._tag_chunk_script(keys=[index, *keys], args=args)
        return int(counts[0]), int(counts[1])

    async def bump_generations(self, classes: Sequence[str]) -> dict[str, int]:
        with self._writing:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in classes:
                    pipe.incr(self.gen_key(name))
                replies = redis_errors.raise_first(await pipe.execute(raise_on_error=False))
        return {name: int(g) for name, g in zip(classes, replies, strict=True)}

    # -- events -------------------------------------------------------------------------

    async def publish(self, payload: bytes, max_len: int) -> str:
        """Append an event to the audit stream and publish it; returns its id."""
        with self.calls([self.events_key], write=True):
            event_id = await self._publish_script(
                keys=[self.events_key], args=[max_len, payload, self.events_channel]
            )
        self.stats.invalidations_published += 1
        return event_id.decode() if isinstance(event_id, bytes) else str(event_id)

    async def events_after(self, since: str, count: int) -> list[tuple[str, bytes]]:
        """Up to `count` events of the audit stream after id `since`, oldest first."""
        with self.calls([self.events_key], write=False):
            entries = await self._retrying(
                lambda: self._client.xrange(self.events_key, min=f"({since}", count=count)
            )
        out: list[tuple[str, bytes]] = []
        for entry_id, fields in entries or ():
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            payload = (fields or {}).get(b"e", b"")
            out.append((eid, payload if isinstance(payload, bytes) else payload.encode()))
        return out

    async def events_lost_after(self, since: tuple[int, int]) -> bool:
        """Whether the audit stream may no longer hold every event after `since`.

        Lost when `since` is older than the oldest entry kept (trimming removed the
        oldest; conservative: the event right after `since` may be that oldest one), when
        the stream is gone (Redis lost it, or nothing was ever published), and when this
        stream never held `since` although it is not older than the oldest entry: a
        failover promoted a replica that async replication had not yet given `since`
        (it is then newer than the stream's last id, or missing between two entries), so
        the events around it may be lost too. One round trip: XINFO STREAM and an XRANGE
        of `since` alone."""
        sid = f"{since[0]}-{since[1]}"

        async def once() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xinfo_stream(self.events_key)
                pipe.xrange(self.events_key, min=sid, max=sid, count=1)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

        with self.calls([self.events_key], write=False):
            info, found = await self._retrying(once)
            if isinstance(info, Exception):
                if redis_errors.no_such_key(info):
                    return True  # no such stream
                raise info
            if isinstance(found, Exception):
                raise found
        first = info.get("first-entry")
        last = _stream_id(info.get("last-generated-id") or b"0-0")
        if since == last:
            return False  # nothing after it (an empty, fully trimmed stream included)
        if since > last or not first or _stream_id(first[0]) > since:
            return True
        return not found  # within the kept range: it must be an entry of this stream

    # -- hot keys -----------------------------------------------------------------------

    async def record_hot_keys(self, top: Sequence[tuple[str, int]], keep: int) -> None:
        """Merge this gateway's hottest keys into the deployment's list (best effort)."""
        if not top:
            return
        with self.calls([self.hotkeys_key], write=True):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(self.hotkeys_key, dict(top), gt=True)
                pipe.zremrangebyrank(self.hotkeys_key, 0, -keep - 1)
                pipe.expire(self.hotkeys_key, 7 * 86400)
                redis_errors.raise_first(await pipe.execute(raise_on_error=False))

    async def hot_keys(self, n: int) -> list[str]:
        with self.calls([self.hotkeys_key], write=False):
            members = await self._retrying(
                lambda: self._client.zrevrange(self.hotkeys_key, 0, n - 1)
            )
        return [m.decode(errors="surrogateescape") for m in members if isinstance(m, bytes)]

    async def load_scripts(self) -> None:
        """Load the Lua scripts up front, so that each one's first call is one round trip
        (a Redis that loses them later is handled by `Script`)."""
        with self._writing:
            await load_all(self._client)

    async def ping(self) -> bool:
        """The health probe: PING, and while Redis refuses writes (a replica, ...) a
        write that changes nothing, to learn when it takes them again. Not counted as
        calls; Redis counts as up only when it answers and takes writes. Once the circuit
        breaker's cool-down is over, the probe closes or reopens it."""
        refused = self._writes_refused

        async def once() -> bool:
            if refused:
                await self._client.unlink(self.probe_key)
            return await self._ping_all()

        # Past the breaker's cool-down the probe decides it (no call needs to be risked).
        decides = self.breaker is not None and self.breaker.probe_due()
        err: L2Unavailable | None = None
        try:
            up = await self._retrying(once)
        except redis_errors.FAILURES as exc:
            err = redis_errors.classify(exc, write=bool(refused))
            if err.writes_refused:
                self._writes_refused = err.kind
            up = False
        else:
            if refused and self._writes_refused == refused:
                self._writes_refused = ""
        self.last_probe_error = err
        if decides and self.breaker is not None:
            self.breaker.probed(err)
        up = up and not self._writes_refused
        self.stats.redis_up = up
        return up

    async def _ping_all(self) -> bool:
        return bool(await self._client.ping())

    async def close(self) -> None:
        await self._client.aclose(close_connection_pool=True)
        if self._on_close is not None:
            await self._on_close()
