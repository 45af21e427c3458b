"""``redis+cluster://`` URLs (``rediss+cluster://`` with TLS): the seed nodes of a Redis
Cluster (config.py validates them at start, l2_cluster.py connects with them)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

SCHEME = "redis+cluster://"
TLS_SCHEME = "rediss+cluster://"


def is_cluster(url: str) -> bool:
    return url.startswith((SCHEME, TLS_SCHEME))


def parse_seeds(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """(seed nodes, username, password) of ``redis+cluster://[user:pass@]h:p[,h:p...]``.

    Raises ValueError with a message that never repeats the password."""
    if not is_cluster(url):
        raise ValueError(f"a cluster URL starts with {SCHEME} or {TLS_SCHEME}")
    rest = url.partition("://")[2]
    userinfo, at, hosts = rest.rpartition("@")
    if not at:
        userinfo, hosts = "", rest
    hosts, _, tail = hosts.partition("/")
    if tail.strip("/") or "?" in hosts:
        raise ValueError(
            "a cluster URL names seed nodes only (redis[s]+cluster://host:port[,host:port...]); "
            "a cluster has one database, so no /db or options"
        )
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    seeds: list[tuple[str, int]] = []
    for part in hosts.split(","):
        # Reuse urlsplit's host:port rules (IPv6 in brackets).
        split = urlsplit(f"//{part.strip()}")
        try:
            port = split.port
        except ValueError:
            port = None
        if not split.hostname or port is None:
            raise ValueError(f"cluster seed {part.strip()!r} is not host:port")
        seeds.append((split.hostname, port))
    return seeds, username, password
