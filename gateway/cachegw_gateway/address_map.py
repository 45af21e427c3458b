"""``[redis] address_map``: where to reach the nodes of a Redis Cluster whose announced
addresses this gateway cannot use (NAT, Kubernetes port-forwards, a proxy per node).

A cluster tells its clients where its nodes are, by the address each node announces
(``cluster-announce-ip``/``-port``, or the one it bound): in CLUSTER SLOTS and in every
MOVED and ASK redirection. A gateway outside the cluster's network, or one meant to go
through a proxy, must connect somewhere else; the map says where, node by node:

    [redis]
    address_map = { "10.0.0.5:6379" = "127.0.0.1:7001", "10.0.0.6:6379" = "127.0.0.1:7002" }

It is applied wherever a node's address enters the gateway: the URL's seed nodes, every
address of CLUSTER SLOTS (redis-py's ``address_remap``), MOVED and ASK redirections
(redis-py 8.1 follows those to the announced address, so `follow_redirections` maps them
too) and the invalidation bus's node connections. An address not in the map is used as
announced. No target may also be an announced address in the map (no chains, no swaps):
the map is then idempotent, and applying it to an address already mapped changes nothing.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from urllib.parse import urlsplit

from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.exceptions import AskError, MovedError

log = logging.getLogger(__name__)

Address = tuple[str, int]
EXAMPLE = '"10.0.0.5:6379" = "127.0.0.1:7001"'


def _host(host: str) -> str:
    """One spelling per host: IP literals compressed (``0:0::1`` is ``::1``), names in
    lower case (DNS is case-insensitive)."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower()


def parse_address(text: str) -> Address:
    """``host:port`` (IPv6 in brackets) -> (host, port); ValueError saying why."""
    if not text:
        raise ValueError("is empty, not host:port")
    if any(ch.isspace() for ch in text):
        raise ValueError("is not host:port (no spaces)")
    if "/" in text or "@" in text or "?" in text or "#" in text:
        raise ValueError("is not host:port (an address, not a URL)")
    if text.count(":") > 1 and not text.startswith("["):
        raise ValueError("is not host:port: an IPv6 host goes in brackets, [::1]:7000")
    try:
        split = urlsplit(f"//{text}")
        port, host = split.port, split.hostname
    except ValueError:  # a port that is not a number, brackets around no IPv6 address
        raise ValueError("is not host:port with a port 1..65535 (IPv6 in brackets)") from None
    if port is None or not host or not 1 <= port <= 65535:
        raise ValueError("is not host:port with a port 1..65535")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                "is not host:port: the host in brackets is not an IPv6 address"
            ) from None
    return _host(host), port


def parse_text(text: str) -> dict[str, str]:
    """The environment variable's and the flag's form, ``announced=target[,...]``, as a
    table; ValueError saying which entry is wrong (its message follows the key's name)."""
    out: dict[str, str] = {}
    for raw in text.split(","):
        entry = raw.strip()
        announced, eq, target = entry.partition("=")
        if not eq:
            raise ValueError(
                f": entries are announced=target, comma-separated, e.g. "
                f"10.0.0.5:6379=127.0.0.1:7001 (got {entry!r})"
            )
        announced, target = announced.strip(), target.strip()
        if announced in out:
            raise ValueError(f" maps {announced!r} twice")
        out[announced] = target
    return out


def check(table: Mapping[str, str]) -> dict[Address, Address]:
    """Every entry parsed and the map's rules checked. ValueError's message follows the
    key's name: ``["10.0.0.5:6379"] must be ...`` or ``: ...``."""
    pairs: dict[Address, Address] = {}
    spelled: dict[Address, str] = {}
    for announced, target in table.items():
        try:
            source = parse_address(announced)
        except ValueError as exc:
            raise ValueError(
                f": the announced address {announced!r} {exc}, e.g. '10.0.0.5:6379'"
            ) from None
        if not isinstance(target, str):
            raise ValueError(f'["{announced}"] must be a string "host:port" (got {target!r})')
        try:
            to = parse_address(target)
        except ValueError as exc:
            raise ValueError(f'["{announced}"] = {target!r} {exc}, e.g. "127.0.0.1:7001"') from None
        if source in pairs:
            raise ValueError(
                f": {spelled[source]!r} and {announced!r} are the same address, mapped twice"
            )
        pairs[source] = to
        spelled[source] = announced
    for source, to in pairs.items():
        if to in pairs and to != source:
            raise ValueError(
                f'["{spelled[source]}"] = "{_name(to)}" is itself mapped (to '
                f'"{_name(pairs[to])}"): the map is applied once, so a target cannot be an '
                "announced address (no chains or swaps)"
            )
    return pairs


def _name(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AddressMap:
    """The checked map, callable as redis-py's ``address_remap``: (host, port) of a node
    as announced -> where to connect. Idempotent (see the module's docstring)."""

    def __init__(self, table: Mapping[str, str] | None = None) -> None:
        self._pairs = check(table or {})

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def __call__(self, address: tuple[str, int | str]) -> Address:
        host, port = address[0], int(address[1])
        return self._pairs.get((_host(host), port), (host, port))


class _MappedNodesManager(NodesManager):
    """redis-py's nodes manager, with MOVED and ASK addresses mapped (see
    `follow_redirections`). No state of its own: an instance's class can be swapped."""

    __slots__ = ()

    def _mapped(self, host: str, port: int | str) -> tuple[str, int]:
        remap = self.address_remap
        return remap((host, int(port))) if remap is not None else (host, int(port))

    def get_node(
        self,
        host: str | None = None,
        port: int | None = None,
        node_name: str | None = None,
    ) -> ClusterNode | None:
        if host and port:
            host, port = self._mapped(host, port)
        elif node_name:
            name_host, _, name_port = node_name.rpartition(":")
            if name_host and name_port.isdigit():
                node_name = "{}:{}".format(*self._mapped(name_host, name_port))
        return super().get_node(host, port, node_name)

    async def move_slot(self, e: AskError | MovedError) -> None:
        e.host, e.port = self._mapped(e.host, e.port)
        e.node_addr = (e.host, e.port)
        await super().move_slot(e)


def follow_redirections(client: RedisCluster) -> None:
    """Make `client` map MOVED and ASK addresses with its ``address_remap`` too.

    redis-py applies ``address_remap`` to CLUSTER SLOTS only; a MOVED (a failover, a
    resharded slot) sends it to the announced address, and an ASK (a slot being moved)
    looks the announced address up among the nodes it knows by their mapped ones, and
    finds none (https://github.com/redis/redis-py/issues/3382). Both go through its
    nodes manager's ``get_node`` and ``move_slot``, which `_MappedNodesManager` maps
    first; this client's manager becomes one (its other clients are left alone)."""
    nodes = client.nodes_manager
    if type(nodes) is NodesManager:
        nodes.__class__ = _MappedNodesManager
    else:  # a redis-py whose manager is another class: leave it (and say so)
        log.warning(
            "redis.address_map: MOVED and ASK redirections may not be mapped (redis-py's "
            "cluster nodes manager is %s)",
            type(nodes).__name__,
        )
