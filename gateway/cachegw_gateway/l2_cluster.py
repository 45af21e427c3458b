"""Redis Cluster as L2: `ClusterStore`, a `RedisStore` whose every script touches one slot.

A key's value, lease, counter and limiter share the slot of ``{K}`` (see l2.py), so the
scripts on one key run as they do on one Redis: lease checks, compare-and-set, fills.
What crosses slots on a standalone Redis is split here:

    <p>:{meta}:events   the audit stream       (one slot: Subscribe's total order)
    <p>:{meta}:gens     hash: class -> generation  (same slot: a class bump and its
                        event could be one script; they are two calls, bump first)
    <p>:tag:<T>         tag index, in T's own slot
    channel <p>:events, <p>:fills   classic pub/sub (a cluster forwards every PUBLISH
                        to every node; the bus listens on the meta slot's primary,
                        where events are published: see `_pubsub_client`)

**Generations live in memory.** A read cannot fetch the class generation beside the
value (another slot, often another node), and every read of a deployment asking one
node would make it the hot spot of the whole cluster. So each gateway holds the
generations: loaded in bulk (HGETALL) when its subscription goes live, raised by its own
Invalidate(class), and re-read when another gateway's class event arrives. Between that
event and the re-read, and whenever the subscription is not live, the generations are
*untrusted*: each read then fetches the ones it needs beside its values (one more
command in the same pipeline). The cost: the generation bump reaches another gateway's
L2 reads when its event does (the propagation delay, as for L1), instead of at once.

**A write and its event are two calls.** The Set script writes the value (one slot);
the event is then appended and published by the publish script (the meta slot). When
that second call fails the write stands and the event is sent again in the background
(a few times): until it lands, other gateways may serve their L1 copy, within their
class's ``l1_ttl`` (the bound docs/consistency.md gives for a lost event). A write whose
reply never came (a timeout, a dropped connection) may have been applied: its event is
published all the same (an event only evicts). Tag index entries are added *before*
the value is written, so a tag invalidation never misses a written value; an entry
whose write then failed only costs a needless eviction.

**A circuit breaker per primary** (breaker.py's `NodeBreakers`): a call is split by the
node its keys live on (by the client's slot map), and each node's share goes through
that node's breaker. A dead primary's keys fail fast (or answer from L1) while the
other nodes serve as usual; a call that must reach every primary (prefix invalidation)
is refused while any of them is open. A refused call sends nothing, so redis-py would
never learn that the slots moved to a promoted replica: while a node's breaker is not
closed, the slot map is read again (at most every `MAP_REFRESH_EVERY`), and the keys
then go to the new primary, whose breaker is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cachegw_gateway import redis_connect, redis_errors, redis_url
from cachegw_gateway.address_map import AddressMap, follow_redirections
from cachegw_gateway.breaker import CLOSED, NodeBreakers
from cachegw_gateway.config import BreakerConfig, RedisConfig
from cachegw_gateway.l2 import (
    _INDEX_STEP,
    _SET_SCRIPT_TEMPLATE,
    L2Entry,
    L2Unavailable,
    RedisStore,
    SetCall,
    SetResult,
    _Calls,
)
from cachegw_gateway.scripts import Script
from cachegw_gateway.stats import GatewayStats

log = logging.getLogger(__name__)

# The Set script with the generation given by the gateway (ARGV[16], after the Set
# script's own 15) instead of read from Redis, and without the tag indexes and the event
# (other slots: see above).
_CLUSTER_SET_SCRIPT = _SET_SCRIPT_TEMPLATE.replace("GENERATION", "tonumber(ARGV[16])").replace(
    "PUBLISH_EVENT", ""
)

# KEYS[1] a tag index. ARGV[1] member (the cache key), ARGV[2] score (the value's expiry,
# ms since the epoch), ARGV[3] now (ms), ARGV[4] the value's PX.
_INDEX_SCRIPT = _INDEX_STEP.format(
    index="KEYS[1]", score="ARGV[2]", member="ARGV[1]", now="ARGV[3]", px="ARGV[4]"
)

# KEYS value, lease, counter, limiter of one key (one slot). Returns 1 if a value was
# removed. The lease goes in the same step: a fill whose load predates the delete is
# refused.
_DELETE_KEY_SCRIPT = """
local gone = redis.call('UNLINK', KEYS[1])
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4])
return gone
"""

# KEYS[1] a tag index; ARGV pairs (member, score as read). Removes the members whose
# score is unchanged (one re-indexed meanwhile stays, for the next Invalidate(tag)).
_TAG_PRUNE_SCRIPT = """
local m = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[1], ARGV[i])
    m = m + 1
  end
end
return m
"""

# KEYS[1] the generations hash; ARGV the classes. Returns their new generations.
_BUMP_SCRIPT = """
local out = {}
for i = 1, #ARGV do
  out[i] = redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
end
return out
"""

RELOAD_EVERY = 1.0  # seconds between two re-reads of the generations after a failed one
PUBLISH_ATTEMPTS = 5  # an event that could not be published is sent again this often
PUBLISH_RETRY_DELAY = 0.2  # seconds before the first resend; doubled each time
MAP_REFRESH_EVERY = 0.25  # seconds between two slot-map reads while a node's breaker is open


class ClusterStore(RedisStore):
    """See the module's docstring: the same interface as `RedisStore`, one slot a script."""

    in_memory_generations = True

    def __init__(
        self,
        client: RedisCluster,
        prefix: str,
        stats: GatewayStats | None = None,
        seeds: Sequence[tuple[str, int]] = (),
        node_client: Any = None,
        breaker: BreakerConfig | None = None,
    ) -> None:
        # RedisCluster speaks the same commands as Redis (not a subclass, hence the cast).
        # No breaker for the whole store (one dead primary would refuse the calls to
        # every healthy node too): one per node instead.
        super().__init__(cast(aioredis.Redis, client), prefix, stats, self._pubsub_client)
        self.node_breakers = (
            NodeBreakers(breaker, self.stats) if breaker is not None and breaker.enabled else None
        )
        self._cluster = client
        self._seeds = list(seeds)
        self._node_client = node_client  # (host, port) -> aioredis.Redis, for the bus
        # Bus sessions since it was last live (see _pubsub_client); the fallback nodes are
        # taken in turn from a random start, so gateways spread over them.
        self._bus_attempts = 0
        self._bus_turn = random.randrange(1 << 16)
        meta = f"{prefix}:{{meta}}"
        self.events_key = f"{meta}:events"
        self.gens_key = f"{meta}:gens"
        self._cset_script = Script(self._client, _CLUSTER_SET_SCRIPT)
        self._index_script = Script(self._client, _INDEX_SCRIPT)
        self._delete_key_script = Script(self._client, _DELETE_KEY_SCRIPT)
        self._prune_script = Script(self._client, _TAG_PRUNE_SCRIPT)
        self._bump_script = Script(self._client, _BUMP_SCRIPT)
        self._gens: dict[str, int] = {}
        self._gens_trusted = False
        self._gens_epoch = 0  # raised by every class event: an older re-read is not used
        self._bus_live = False
        self._reloading = False
        self._last_reload = -RELOAD_EVERY
        self._tasks: set[asyncio.Task[None]] = set()
        self._map_refreshing = False
        self._last_map_refresh = -MAP_REFRESH_EVERY

    @classmethod
    def from_url(
        cls, config: RedisConfig, url: str, stats: GatewayStats | None = None
    ) -> ClusterStore:
        target = redis_url.parse(url)
        # Every node address goes through redis.address_map once: the seeds here, the
        # slot map's (address_remap) and redirections' in redis-py, the bus's below.
        remap = AddressMap(config.address_map)
        seeds = [remap(seed) for seed in target.hosts]
        # Credentials (a provider, redis_auth.py) and TLS (rediss+cluster://) of every
        # node connection: the cluster client's and the bus's.
        secure = redis_connect.security(config, target)
        common: dict[str, Any] = {
            "socket_timeout": config.socket_timeout,
            "socket_connect_timeout": config.connect_timeout,
            **secure,
        }
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            max_connections=config.max_connections,
            # No automatic resend after a lost reply (see RedisStore.from_config); MOVED
            # and ASK redirections are followed all the same (the command did not run).
            retry=Retry(NoBackoff(), 0),
            require_full_coverage=False,
            address_remap=remap if remap else None,
            ssl=target.tls,
            **common,
        )
        if remap:
            follow_redirections(client)

        def node_client(host: str, port: int) -> aioredis.Redis:
            host, port = remap((host, port))  # idempotent: the nodes' are mapped already
            return aioredis.Redis(
                host=host,
                port=port,
                ssl=target.tls,
                retry=Retry(NoBackoff(), 0),
                **{**common, "socket_timeout": max(config.socket_timeout, 5.0)},
            )

        return cls(client, config.prefix, stats, seeds, node_client, config.breaker)

    # -- nodes and their breakers -------------------------------------------------------

    def _node_of(self, rkey: str) -> str | None:
        """The primary holding `rkey` by the client's slot map (None before it has one)."""
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(self._cluster.keyslot(rkey))
        except Exception:  # no slot map yet, or the slot is not covered: redis-py decides
            return None
        return None if node is None else str(node.name)

    def _by_node(self, rkeys: Sequence[str]) -> dict[str | None, list[int]]:
        """The positions of `rkeys`, grouped by the node holding them."""
        groups: dict[str | None, list[int]] = {}
        for i, rkey in enumerate(rkeys):
            groups.setdefault(self._node_of(rkey), []).append(i)
        return groups

    def calls(self, rkeys: Sequence[str] = (), *, write: bool) -> _Calls:
        """`RedisStore.calls` through the breakers of the nodes holding `rkeys` (with no
        keys: of every primary)."""
        nb = self.node_breakers
        if nb is None:
            return _Calls(self, (), write=write)
        if rkeys:
            names = {self._node_of(rkey) for rkey in rkeys}
        else:
            names = {str(node.name) for node in self._cluster.get_primaries()}
        breakers = [nb[name] for name in sorted(n for n in names if n)]
        if any(b.state != CLOSED for b in breakers):
            self._refresh_map_soon()
        return _Calls(self, breakers, write=write)

    def _refresh_map_soon(self) -> None:
        """Read the slot map again in the background (see the module's docstring)."""
        now = time.monotonic()
        if self._map_refreshing or now - self._last_map_refresh < MAP_REFRESH_EVERY:
            return
        self._last_map_refresh = now
        self._map_refreshing = True
        self._spawn(self._refresh_map())

    async def _refresh_map(self) -> None:
        try:
            await self._cluster.nodes_manager.initialize()
        except Exception as exc:  # no node answered: the next refusal tries again
            log.info("could not read the cluster's slot map: %s", exc)
        finally:
            self._map_refreshing = False

    # -- the bus's connection -----------------------------------------------------------

    def _pubsub_client(self) -> aioredis.Redis:
        """A connection to one node for the bus. Classic pub/sub reaches every node, but
        a message crosses the cluster bus to reach the others: 16 ms at the median here
        against 0.3 ms on the node that published it (benchmarks/bench_cluster.py). So
        the bus listens on the primary of the audit stream's slot, where every event is
        published; when a session there failed, the next one tries another node (events
        still arrive, later) and the one after the stream's node again."""
        self._bus_attempts += 1
        if self._bus_attempts % 2 == 1:
            try:
                node = self._cluster.get_node_from_key(self.events_key)
            except Exception:  # no slot map yet, or the slot has no node: any node will do
                node = None
            if node is not None:
                return cast(aioredis.Redis, self._node_client(node.host, int(node.port)))
        known = [(n.host, n.port) for n in self._cluster.get_nodes()] or self._seeds
        host, port = known[self._bus_turn % len(known)]
        self._bus_turn += 1
        return cast(aioredis.Redis, self._node_client(host, int(port)))

    # -- generations --------------------------------------------------------------------

    def _raise_generations(self, seen: dict[str, int]) -> None:
        for name, gen in seen.items():
            if gen > self._gens.get(name, 0):
                self._gens[name] = gen

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reload(self, *, replace_all: bool) -> None:
        self._last_reload = time.monotonic()
        self._spawn(self._reload_generations(replace_all=replace_all))

    async def _reload_generations(self, *, replace_all: bool) -> None:
        epoch = self._gens_epoch
        self._reloading = True
        try:
            with self.calls([self.gens_key], write=False):
                raw = await self._retrying(lambda: self._client.hgetall(self.gens_key))
        except L2Unavailable as exc:
            log.info("could not read the class generations (reads fetch them): %s", exc)
            return
        finally:
            self._reloading = False
        seen = {_text(k): int(v) for k, v in (raw or {}).items()}
        if epoch != self._gens_epoch or not self._bus_live:
            return  # an event came meanwhile (or the bus dropped): stay untrusted
        if replace_all:
            self._gens = seen
        else:
            self._raise_generations(seen)
        self._gens_trusted = True

    def on_subscription(self, live: bool) -> None:
        super().on_subscription(live)
        self._bus_live = live
        if live:
            self._bus_attempts = 0
        self._gens_epoch += 1
        self._gens_trusted = False
        if live:
            # Whatever this gateway missed while not subscribed is in the hash.
            self._reload(replace_all=True)

    def on_class_event(self) -> None:
        self._gens_epoch += 1
        self._gens_trusted = False
        self._reload(replace_all=False)

    async def generation(self, key_class: str) -> int:
        if not self._gens_trusted:
            with self.calls([self.gens_key], write=False):
                raw = await self._retrying(lambda: self._client.hget(self.gens_key, key_class))
            self._raise_generations({key_class: int(raw or 0)})
        return self._gens.get(key_class, 0)

    def generation_keys(self, key_class: str) -> list[str]:
        return []

    # -- reads --------------------------------------------------------------------------

    async def read(
        self, keys: Sequence[str], classes: Iterable[str]
    ) -> tuple[list[L2Entry | None], dict[str, int]]:
        """GET and PTTL of every key, one pipeline per node, sent to the nodes
        concurrently (each through its node's breaker); the generations from memory, or
        fetched beside the values while untrusted. Any node's failure fails the read."""
        class_names = list(classes)
        fetch = bool(class_names) and not self._gens_trusted
        reload_due = time.monotonic() - self._last_reload >= RELOAD_EVERY
        if fetch and self._bus_live and not self._reloading and reload_due:
            # A re-read failed (Redis was down): try again, at most once a second.
            self._reload(replace_all=False)
        rkeys = [self.redis_key(key) for key in keys]
        groups = self._by_node(rkeys)
        gens_node = self._node_of(self.gens_key) if fetch else None
        if fetch and gens_node not in groups:
            groups[gens_node] = []

        async def read_node(at: list[int], gens: bool) -> list[Any]:
            async def once() -> list[Any]:
                async with self._client.pipeline(transaction=False) as pipe:
                    for i in at:
                        pipe.get(rkeys[i])
                        pipe.pttl(rkeys[i])
                    if gens:
                        pipe.hmget(self.gens_key, class_names)
                    return redis_errors.raise_first(await pipe.execute(raise_on_error=False))

            touched = [rkeys[i] for i in at] + ([self.gens_key] if gens else [])
            with self.calls(touched, write=False):
                return await self._retrying(once)

        parts = [(at, fetch and node == gens_node) for node, at in groups.items()]
        if len(parts) == 1:
            replies = [await read_node(*parts[0])]
        else:
            done = await asyncio.gather(*(read_node(*p) for p in parts), return_exceptions=True)
            for reply in done:
                if isinstance(reply, BaseException):
                    raise reply
            replies = cast(list[list[Any]], done)
        found: list[Any] = [None] * (2 * len(keys))
        for (at, gens), reply in zip(parts, replies, strict=True):
            for n, i in enumerate(at):
                found[2 * i], found[2 * i + 1] = reply[2 * n], reply[2 * n + 1]
            if gens:
                self._raise_generations(
                    {n: int(g or 0) for n, g in zip(class_names, reply[-1], strict=True)}
                )
        out: list[L2Entry | None] = []
        for i, key in enumerate(keys):
            raw, pttl = found[2 * i], found[2 * i + 1]
            out.append(None if raw is None or pttl == -2 else self._decode(key, raw, pttl))
        return out, {n: self._gens.get(n, 0) for n in class_names}

    # -- writes -------------------------------------------------------------------------

    def _cluster_set_args(self, call: SetCall, now_ms: int, gen: int) -> list[Any]:
        _, args = self._set_keys_args(call, now_ms)
        return [*args, gen]

    def _index_calls(self, call: SetCall, now_ms: int) -> list[tuple[list[str], list[Any]]]:
        return [
            ([self.tag_key(tag)], [call.key, call.expires_at_ms, now_ms, call.px_ms])
            for tag in call.tags
        ]

    async def set(self, call: SetCall) -> SetResult:
        """Index the tags, write the value (one script, the key's slot), then publish the
        event if a value was replaced, or may have been (see the module's docstring)."""
        now_ms = time.time_ns() // 1_000_000
        gen = await self.generation(call.key_class)
        if call.tags:
            for reply in await self.run_each(self._index_script, self._index_calls(call, now_ms)):
                if isinstance(reply, L2Unavailable):
                    raise reply
        rkey = self.redis_key(call.key)
        try:
            with self.calls([rkey], write=True):
                reply = await self._cset_script(
                    keys=[rkey, self.lease_key(call.key)],
                    args=self._cluster_set_args(call, now_ms, gen),
                )
        except L2Unavailable as exc:
            if call.event and _maybe_applied(exc):
                await self._publish_events([(call.event, call.max_events)])
            raise
        result = SetResult.from_reply(reply)
        if result.stored and result.replaced and call.event:
            event_id = await self._publish_event(call.event, call.max_events)
            result = replace(result, event_id=event_id)
        return result

    async def set_many(self, calls: Sequence[SetCall]) -> list[SetResult | L2Unavailable]:
        now_ms = time.time_ns() // 1_000_000
        gens = {name: await self.generation(name) for name in {c.key_class for c in calls}}
        out: list[SetResult | L2Unavailable | None] = [None] * len(calls)
        # Tag indexes first: an item whose indexing failed is not written.
        index_calls: list[tuple[list[str], list[Any]]] = []
        owners: list[int] = []
        for i, call in enumerate(calls):
            for one in self._index_calls(call, now_ms):
                index_calls.append(one)
                owners.append(i)
        if index_calls:
            indexed = await self.run_each(self._index_script, index_calls)
            for i, reply in zip(owners, indexed, strict=True):
                if isinstance(reply, L2Unavailable) and out[i] is None:
                    out[i] = reply
        todo = [i for i in range(len(calls)) if out[i] is None]
        replies = await self.run_each(
            self._cset_script,
            [
                (
                    [self.redis_key(calls[i].key), self.lease_key(calls[i].key)],
                    self._cluster_set_args(calls[i], now_ms, gens[calls[i].key_class]),
                )
                for i in todo
            ],
        )
        for i, reply in zip(todo, replies, strict=True):
            out[i] = reply if isinstance(reply, L2Unavailable) else SetResult.from_reply(reply)
        # The events of the writes that replaced a value (or may have: no reply), in one
        # pipeline.
        eventful = [
            i
            for i in todo
            if calls[i].event
            and (
                (isinstance(r := out[i], SetResult) and r.stored and r.replaced)
                or (isinstance(r, L2Unavailable) and _maybe_applied(r))
            )
        ]
        if eventful:
            ids = await self._publish_events(
                [(calls[i].event, calls[i].max_events) for i in eventful]
            )
            for i, event_id in zip(eventful, ids, strict=True):
                if isinstance(r := out[i], SetResult):
                    out[i] = replace(r, event_id=event_id)
        return [cast(SetResult | L2Unavailable, r) for r in out]

    async def run_each(
        self, script: Script, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
    ) -> list[Any | L2Unavailable]:
        """`RedisStore.run_each`, one pipeline per node (concurrently, each through its
        node's breaker). A node's failed round trip is the failure of each of its calls:
        the other nodes' replies stand."""
        groups = self._by_node([keys[0] if keys else "" for keys, _ in calls])

        async def on_node(at: list[int]) -> list[Any | L2Unavailable]:
            try:
                return await RedisStore.run_each(self, script, [calls[i] for i in at])
            except L2Unavailable as exc:
                return [exc] * len(at)

        parts = list(groups.values())
        if len(parts) == 1:
            replies = [await on_node(parts[0])]
        else:
            replies = await asyncio.gather(*(on_node(at) for at in parts))
        out: list[Any | L2Unavailable] = [None] * len(calls)
        for at, reply in zip(parts, replies, strict=True):
            for i, one in zip(at, reply, strict=True):
                out[i] = one
        return out

    async def _publish_event(self, payload: bytes, max_len: int) -> str:
        return (await self._publish_events([(payload, max_len)]))[0]

    async def _publish_events(self, events: Sequence[tuple[bytes, int]]) -> list[str]:
        """Publish the events of applied writes; one that fails is sent again later."""
        calls = [
            ([self.events_key], [max_len, payload, self.events_channel])
            for payload, max_len in events
        ]
        try:
            replies = await self.run_each(self._publish_script, calls)
        except L2Unavailable as exc:
            replies = [exc] * len(calls)
        ids: list[str] = []
        for (payload, max_len), reply in zip(events, replies, strict=True):
            if isinstance(reply, L2Unavailable):
                self._spawn(self._publish_later(payload, max_len, reply))
                ids.append("")
            else:
                self.stats.invalidations_published += 1
                ids.append(_text(reply))
        return ids

    async def _publish_later(self, payload: bytes, max_len: int, first: L2Unavailable) -> None:
        """Send an applied write's event again. One whose reply was lost may have gone
        out already: then it goes out twice, which is harmless (an event only evicts)."""
        delay = PUBLISH_RETRY_DELAY
        log.warning("a write's invalidation event was not published (%s): sending it again", first)
        for _ in range(PUBLISH_ATTEMPTS):
            await asyncio.sleep(delay)
            try:
                await self.publish(payload, max_len)
                return
            except L2Unavailable:
                delay *= 2
        log.error(
            "gave up publishing a write's invalidation event: other gateways may serve their "
            "L1 copy until it expires (the class's l1_ttl)"
        )

    async def delete_each(
        self, keys: Sequence[str], *, event: bytes = b"", max_events: int = 10_000
    ) -> tuple[int, str, list[bool]]:
        """Each key's value, lease, counter and limiter removed by one script in its slot
        (one pipeline over the nodes), then the event published. When some key failed,
        the event still goes out (what was removed must be evicted elsewhere) and the
        first failure is raised."""
        replies = await self.run_each(
            self._delete_key_script,
            [
                (
                    [
                        self.redis_key(key),
                        self.lease_key(key),
                        self.counter_key(key),
                        self.limiter_key(key),
                    ],
                    [],
                )
                for key in keys
            ],
        )
        failure = next((r for r in replies if isinstance(r, L2Unavailable)), None)
        event_id = ""
        if event:
            if failure is None:
                event_id = await self.publish(event, max_events)
            else:
                with contextlib.suppress(L2Unavailable):
                    await self.publish(event, max_events)
        if failure is not None:
            raise failure
        each = [bool(int(cast(int, r))) for r in replies]
        return sum(each), event_id, each

    async def _remove_tag_chunk(
        self, index: str, pairs: Sequence[tuple[bytes, bytes]]
    ) -> tuple[int, int]:
        """As on one Redis, in two steps (the members live in other slots): remove their
        values and leases, each in its slot, then the index entries whose score is
        unchanged (a member re-indexed meanwhile stays indexed)."""
        rkeys = [self.redis_key(_text(member)) for member, _score in pairs]
        with self.calls(rkeys, write=True):
            async with self._client.pipeline(transaction=False) as pipe:
                for member, _score in pairs:
                    key = _text(member)
                    pipe.execute_command("UNLINK", self.lease_key(key))
                    pipe.execute_command("UNLINK", self.redis_key(key))
                replies = redis_errors.raise_first(await pipe.execute(raise_on_error=False))
        args: list[bytes] = []
        for member, score in pairs:
            args += (member, score)
        with self.calls([index], write=True):
            pruned = int(await self._prune_script(keys=[index], args=args))
        return sum(int(r) for r in replies[1::2]), pruned

    async def bump_generations(self, classes: Sequence[str]) -> dict[str, int]:
        with self.calls([self.gens_key], write=True):
            replies = await self._bump_script(keys=[self.gens_key], args=list(classes))
        gens = {name: int(g) for name, g in zip(classes, replies, strict=True)}
        self._raise_generations(gens)
        return gens

    async def _ping_all(self) -> bool:
        """Every primary answers: with one down, part of the keyspace is (redis_up false
        until its replica takes over). Each primary is pinged on its own: a node whose
        breaker's cool-down is over is closed or reopened by its answer, and the breakers
        of nodes that are no longer primaries are dropped."""
        nb = self.node_breakers
        if nb is None:
            return bool(await self._cluster.ping(target_nodes=RedisCluster.PRIMARIES))
        if any(b.state != CLOSED for b in nb) and not self._map_refreshing:
            # Probe the primaries of now, not a failed-over one (see _refresh_map_soon).
            self._last_map_refresh = time.monotonic()
            self._map_refreshing = True
            await self._refresh_map()
        primaries = self._cluster.get_primaries()
        nb.forget_all_but(str(node.name) for node in primaries)
        deciding = {str(node.name) for node in primaries if nb[str(node.name)].probe_due()}
        answers = await asyncio.gather(
            *(self._cluster.ping(target_nodes=node) for node in primaries),
            return_exceptions=True,
        )
        first: BaseException | None = None
        for node, answer in zip(primaries, answers, strict=True):
            err = None
            if isinstance(answer, BaseException):
                if not isinstance(answer, redis_errors.FAILURES):
                    raise answer
                err = redis_errors.classify(answer, write=False)
                first = first or answer
            if str(node.name) in deciding:
                nb[str(node.name)].probed(err)
        if first is not None:
            raise first
        return bool(primaries)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._cluster.aclose()


def _text(raw: object) -> str:
    return raw.decode(errors="surrogateescape") if isinstance(raw, bytes) else str(raw)


def _maybe_applied(err: L2Unavailable) -> bool:
    """Whether a write that failed with `err` may have been applied: no reply came (a
    timeout, a dropped connection). Refused before sending (the breaker) or answered
    with an error reply: it was not."""
    return err.kind in (redis_errors.TIMEOUT, redis_errors.CONNECTION, redis_errors.PROTOCOL)
