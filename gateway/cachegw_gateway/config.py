"""Gateway configuration: a TOML file, environment variables and CLI flags.

Precedence, lowest first: defaults, the file, the environment, CLI overrides. Everything
is checked once, at start; a `ConfigError` names where the value came from, the key and
the rule, e.g. ``cachegw.toml: classes[1].ttl_seconds must be > 0 (got -5)``, so a person
can fix it without reading code. Every key is described in docs/config.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachegw_gateway import address_map, cluster_url, redis_auth, redis_tls, redis_url


class ConfigError(ValueError):
    """The configuration breaks a rule; the message says which, and where it was set."""


# The gateway's gRPC messages, received and sent, are at most this (server.py).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The largest `max_value_bytes`: a value travels in one message (a Set request, a Get
# answer) with its key, tags and a few fields, so it must leave room for them (1 MiB).
MAX_VALUE_BYTES = MAX_MESSAGE_BYTES - 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    grace_seconds: float = 5.0
    # On SIGTERM: report NOT_SERVING and keep serving this long, so that load balancers
    # (health checks, Kubernetes readiness) stop sending calls before the port closes.
    drain_delay_seconds: float = 0.0
    max_key_bytes: int = 512
    max_ttl_seconds: float = 30 * 86400.0
    max_batch_keys: int = 1000
    gateway_id: str = ""  # "" = hostname-pid (load_config fills it in)
    # Close each client connection after this long (0 = never), so that long-lived
    # channels spread again over workers and pods; in-flight calls get the grace period,
    # then streams end with UNAVAILABLE and clients reconnect (Subscribe resumes).
    max_connection_age_seconds: float = 0.0
    max_connection_age_grace_seconds: float = 30.0
    # Admission (admission.py): refused at once beyond these, instead of queued.
    max_concurrent_rpcs: int = 2048  # unary calls in flight
    max_subscribers: int = 10_000  # Subscribe streams open
    max_subscribers_per_peer: int = 1000  # ... from one client host
    max_response_bytes: int = 32 * 1024 * 1024  # one GetMany answer
    # Gateway processes sharing `listen` under one supervisor (supervisor.py): a count,
    # or "auto" for one per core this process may run on. 1 = no supervisor.
    workers: int | str = 1
    # gRPC server reflection (grpcurl and the like list the services); health stays on.
    reflection: bool = True
    # TLS on the gRPC port (tls.py): PEM certificate (chain) and its unencrypted key; with
    # a client CA, client certificates signed by it are required (mutual TLS). The files
    # are read again when they change: new connections get the new certificate.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""


@dataclass(frozen=True)
class AuthConfig:
    """Bearer tokens and permissions on every CacheService call (auth.py): ``[auth]``.
    Off by default: `make run` serves loopback without tokens."""

    enabled: bool = False
    # TOML of [[tokens]] (hashes of static tokens) and [[identities]] (client
    # certificates), reloaded when it changes; see tokens.py.
    tokens_file: str = ""
    # Signed tokens (JWT): the key(s) to verify them with, reloaded when the file changes.
    jwt_key_file: str = ""
    jwt_algorithm: str = "HS256"  # HS256/384/512 (shared secret), RS*, PS256, ES256/384, EdDSA
    jwt_issuer: str = ""  # "" = any iss
    jwt_audience: str = ""  # "" = tokens must carry no aud
    jwt_leeway_seconds: float = 0.0  # clock skew allowed on exp/nbf
    reload_seconds: float = 1.0  # how often the files are checked, and open streams
    cache_size: int = 10_000  # verified tokens remembered (a known token costs no hash)


@dataclass(frozen=True)
class BreakerConfig:
    """The circuit breaker in front of Redis (breaker.py): ``[redis.breaker]``."""

    enabled: bool = True
    failures: int = 5  # consecutive failures that open it; 0 = this rule off
    failure_rate: float = 0.5  # share of failed calls over `window_seconds`; 0 = rule off
    window_seconds: float = 10.0
    min_calls: int = 20  # calls in the window before the rate counts
    cooldown_seconds: float = 0.5  # open this long, then one probe (half-open)


@dataclass(frozen=True)
class RedisConfig:
    url: str = ""  # the shared Redis; "" = none given (serve refuses unless `embedded`)
    # With no url: start a private redis-server child ("managed"). Explicit, because
    # gateways started that way share nothing (no L2, no invalidation); `make run` asks.
    embedded: bool = False
    prefix: str = "cg"
    socket_timeout: float = 1.0
    connect_timeout: float = 1.0
    max_connections: int = 64
    managed_port: int = 0  # 0 = a free port
    # Redis Cluster: node address as the cluster announces it ("host:port") -> where this
    # gateway connects instead (NAT, port-forwards, proxies); see address_map.py.
    address_map: dict[str, str] = field(default_factory=dict)
    # ACL user and password when the URL carries none (redis_auth.py: precedence). The
    # password itself only from the environment, never from the config file; or a file
    # holding it, read again for every new connection (rotation without a restart).
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    # The Sentinels' own credentials (requirepass / an ACL user on the Sentinels).
    sentinel_username: str = ""
    sentinel_password: str = field(default="", repr=False)
    sentinel_password_file: str = ""
    # TLS (rediss://, rediss+sentinel://, rediss+cluster://; redis_tls.py): PEM files of
    # the CA that signed Redis's certificate ("" = the system's CAs) and of this
    # gateway's client certificate and key (mutual TLS, `tls-auth-clients yes`).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Check that Redis's certificate names the host connected to. Turn off only for
    # certificates that name neither the host nor its IP (the chain is checked anyway).
    tls_check_hostname: bool = True
    breaker: BreakerConfig = field(default_factory=BreakerConfig)  # [redis.breaker]


@dataclass(frozen=True)
class OriginConfig:
    """How a gateway calls the origins its classes name (origin.py): ``[origin]``. Each
    distinct address gets its own client with these settings: deadline, concurrency limit
    and circuit breaker."""

    timeout_seconds: float = 1.0  # per call; less when the caller's deadline is nearer
    max_in_flight: int = 32  # calls in flight to one origin from one gateway
    # Warmup from an origin (rebuild.py): keys per second one origin serves to warm-ups,
    # all gateways together (a token bucket per origin in Redis), and keys per Load.
    warm_keys_per_second: float = 1000.0
    warm_batch_keys: int = 500
    breaker: BreakerConfig = field(default_factory=BreakerConfig)  # [origin.breaker]


@dataclass(frozen=True)
class WriteBehindConfig:
    """The journal of write-behind classes and its flusher (writebehind.py, journal.py):
    ``[write_behind]``."""

    shards: int = 4  # journal streams per class, each its own hash tag (Cluster slot)
    batch_size: int = 256  # journal entries one flush reads and settles (one Store call)
    flush_interval_seconds: float = 0.1  # an idle flusher looks for new entries this often
    claim_idle_seconds: float = 30.0  # another gateway's entries idle this long are claimed
    retry_initial_seconds: float = 0.1  # first wait after a failed flush; doubled each time
    retry_max_seconds: float = 10.0  # the longest wait between two attempts
    max_attempts: int = 10  # unusable answers for a batch before its entries are dead-lettered
    dead_letter_max_len: int = 100_000  # entries kept in each dead-letter stream


@dataclass(frozen=True)
class TenantsConfig:
    """Tenants (with ``[auth]`` on every call names one; tenancy.py): ``[tenants]``. Each
    tenant's keys live in their own key space (space.py); the quotas below apply to every
    tenant unless a ``[[tenant]]`` entry names its own."""

    max_per_gateway: int = 16  # tenant spaces one gateway process holds at once
    # Each tenant's L1; 0 = l1.max_bytes / max_per_gateway (the L1 bound holds in all).
    l1_max_bytes: int = 0
    l1_max_entries: int = 0  # 0 = l1.max_entries / max_per_gateway
    # Calls per second across every gateway (a token bucket in Redis); 0 = no limit.
    requests_per_second: float = 0.0
    burst: int = 0  # calls allowed at once after a quiet spell; 0 = one second's worth
    max_subscribers: int = 0  # Subscribe streams open at once across gateways; 0 = no limit


@dataclass(frozen=True)
class TenantConfig:
    """One ``[[tenant]]`` entry: a tenant's own quotas (unset = the ``[tenants]`` value);
    the tenants named here get their key space at start."""

    name: str
    requests_per_second: float | None = None
    burst: int | None = None
    max_subscribers: int | None = None


@dataclass(frozen=True)
class L1Config:
    max_entries: int = 100_000
    max_bytes: int = 256 * 1024 * 1024
    admission: str = "lru"  # "lru" | "tinylfu"
    warm_keys: int = 1000  # hot keys loaded from Redis into L1 at start; 0 = none
    # Bytes of the last known copies kept for classes with stale_if_error_seconds.
    stale_if_error_max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class InvalidationConfig:
    stream_max_len: int = 100_000  # events kept in Redis for Subscribe(since=...)
    subscriber_queue: int = 1000  # events buffered per Subscribe stream before RESET
    subscriber_queue_bytes: int = 4 * 1024 * 1024  # ... and their bytes (events vary in size)
    resubscribe_max_backoff_seconds: float = 2.0


# Lease defaults, sized against the clients' default deadline (5 s: `timeout=5.0` in
# clients/python's Client and AsyncClient). A waiter that arrives just after a lease was
# granted must be able to outwait it if its holder dies (then it takes the lease over)
# and still be answered before its deadline; with a lease longer than that deadline, as
# the former 10 s was, every waiter gave up with a MISS and loaded by itself: the
# stampede the lease is for. A load typically costs milliseconds to a few hundred (the
# product's p95 target is sub-second), so 3 s is ample for a live holder; a class with
# slower loads raises lease_timeout_seconds, and its callers then need a longer deadline.
# The longest wait stays above the lease (a waiter without a deadline still outwaits a
# dead holder, with a second to spare for the takeover) and below the client deadline
# (a default client gets the gateway's answer, not DEADLINE_EXCEEDED).
DEFAULT_LEASE_TIMEOUT_SECONDS = 3.0
DEFAULT_MAX_WAIT_SECONDS = 4.0


# Rate limits (Allow): the bounds a limit must keep, in the config and in a request.
RATE_ALGORITHMS = ("gcra", "sliding_window")
MAX_RATE = 1_000_000_000  # requests (or cost units) per period, and the largest burst
MAX_RATE_PERIOD_SECONDS = 86_400.0  # one day
MIN_RATE_PERIOD_SECONDS = 0.001  # one millisecond, the resolution of period_ms
# A GCRA limit's emission interval (period / rate) must be at least this: one request
# per microsecond per key, so the script's microsecond arithmetic stays exact.
MIN_EMISSION_INTERVAL_US = 1
# The longest a full GCRA burst takes to come back (burst * period / rate).
MAX_BURST_REFILL_SECONDS = 30 * 86_400.0


@dataclass(frozen=True)
class RateLimitConfig:
    """A named rate limit of a key class: `rate` per `period_seconds`, bursts of `burst`."""

    rate: int
    period_seconds: float
    burst: int = 0  # GCRA: requests allowed at once; 0 = `rate`
    algorithm: str = "gcra"  # "gcra" | "sliding_window"


@dataclass(frozen=True)
class KeyClassConfig:
    name: str
    patterns: tuple[str, ...] = ()
    ttl_seconds: float = 300.0
    jitter: float = 0.1  # fraction in [0, 1); TTLs are only ever shortened by it
    l1: bool = True
    l1_ttl_seconds: float = 30.0
    max_value_bytes: int = 1024 * 1024
    jitter_mode: str = "random"  # "random" | "deterministic" (per key and write-time bucket)
    invalidation: str = "events"  # "events" | "ttl"
    lease_timeout_seconds: float = DEFAULT_LEASE_TIMEOUT_SECONDS
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS  # 0 = never wait
    early_refresh_beta: float = 0.0  # XFetch; 0 = off
    stale_seconds: float = 0.0  # stale-while-revalidate window; 0 = off
    # Stale-if-error: while Redis fails, the last copy read is answered STALE for this
    # long past its fresh life; 0 = off.
    stale_if_error_seconds: float = 0.0
    rate_limit: RateLimitConfig | None = None  # Allow's limit for keys of this class
    # Where the data comes from (origin.proto): the origin's host:port, and who loads
    # and stores through it.
    origin: str = ""
    read_policy: str = "cache-aside"  # | "read-through": the gateway loads misses
    # | "through": Set stores in the origin first | "behind": Set is journaled, and
    # flushed to the origin in the background
    write_policy: str = "around"
    negative_ttl_seconds: float = 0.0  # read-through: NOT_FOUND is cached this long
    # Fail-safe (read-through, failsafe.py): while the origin fails or is slow, the last
    # value is answered STALE up to this long past its fresh life (Redis keeps it that
    # long); 0 = off. A caller with such a value waits soft_timeout_seconds for the load
    # (0 = the whole load), then is answered STALE while the load goes on; a Load of the
    # class gives up after hard_timeout_seconds (0 = origin.timeout_seconds).
    fail_safe_seconds: float = 0.0
    soft_timeout_seconds: float = 0.0
    hard_timeout_seconds: float = 0.0
    # Refresh-ahead (read-through, refreshahead.py): hot keys are reloaded this long
    # before they expire (0 = refresh_ahead_fraction of ttl_seconds), at most
    # refresh_ahead_rate reloads per second across every gateway.
    refresh_ahead: bool = False
    refresh_ahead_before_seconds: float = 0.0
    refresh_ahead_fraction: float = 0.2
    refresh_ahead_rate: float = 0.0


@dataclass(frozen=True)
class TelemetryConfig:
    exporter: str = "none"  # "none" (tracing off) | "console" | "otlp"
    otlp_endpoint: str = "http://127.0.0.1:4317"  # OTLP/gRPC collector
    sample_ratio: float = 1.0  # of traces started here; a caller's sampled flag is followed
    metrics_listen: str = ""  # "" = no /metrics endpoint; host:port (port 0 = a free one)
    log_format: str = "text"  # "text" | "json"
    service_name: str = "cachegw"  # service.name of spans


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    l1: L1Config = field(default_factory=L1Config)
    invalidation: InvalidationConfig = field(default_factory=InvalidationConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    origin: OriginConfig = field(default_factory=OriginConfig)
    write_behind: WriteBehindConfig = field(default_factory=WriteBehindConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    classes: tuple[KeyClassConfig, ...] = ()
    default_class: KeyClassConfig = field(default_factory=lambda: KeyClassConfig("default"))
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    tenant: tuple[TenantConfig, ...] = ()


CONFIG_ENV = "CACHEGW_CONFIG"
ENV_VARS: Mapping[str, str] = {
    "CACHEGW_REDIS_URL": "redis.url",
    "CACHEGW_EMBEDDED_REDIS": "redis.embedded",
    "CACHEGW_LISTEN": "server.listen",
    "CACHEGW_REDIS_PREFIX": "redis.prefix",
    "CACHEGW_GATEWAY_ID": "server.gateway_id",
    "CACHEGW_TRACE_EXPORTER": "telemetry.exporter",
    "CACHEGW_OTLP_ENDPOINT": "telemetry.otlp_endpoint",
    "CACHEGW_METRICS_LISTEN": "telemetry.metrics_listen",
    "CACHEGW_LOG_FORMAT": "telemetry.log_format",
    "CACHEGW_REDIS_ADDRESS_MAP": "redis.address_map",
    "CACHEGW_REDIS_USERNAME": "redis.username",
    "CACHEGW_REDIS_PASSWORD": "redis.password",
    "CACHEGW_REDIS_PASSWORD_FILE": "redis.password_file",
    "CACHEGW_REDIS_SENTINEL_USERNAME": "redis.sentinel_username",
    "CACHEGW_REDIS_SENTINEL_PASSWORD": "redis.sentinel_password",
    "CACHEGW_REDIS_SENTINEL_PASSWORD_FILE": "redis.sentinel_password_file",
    "CACHEGW_REDIS_TLS_CA": "redis.tls_ca",
    "CACHEGW_REDIS_TLS_CERT": "redis.tls_cert",
    "CACHEGW_REDIS_TLS_KEY": "redis.tls_key",
    "CACHEGW_REDIS_TLS_CHECK_HOSTNAME": "redis.tls_check_hostname",
    "CACHEGW_WORKERS": "server.workers",
    "CACHEGW_AUTH": "auth.enabled",
    "CACHEGW_TOKENS_FILE": "auth.tokens_file",
    "CACHEGW_JWT_KEY_FILE": "auth.jwt_key_file",
    "CACHEGW_SERVER_TLS_CERT": "server.tls_cert",
    "CACHEGW_SERVER_TLS_KEY": "server.tls_key",
    "CACHEGW_SERVER_TLS_CLIENT_CA": "server.tls_client_ca",
}
ADMISSION_POLICIES = ("lru", "tinylfu")
JITTER_MODES = ("random", "deterministic")
INVALIDATION_MODES = ("events", "ttl")
TRACE_EXPORTERS = ("none", "console", "otlp")
LOG_FORMATS = ("text", "json")
READ_POLICIES = ("cache-aside", "read-through")
WRITE_POLICIES = ("around", "through", "behind")
DEFAULT_CLASS_NAME = "default"

# Tables that take plain keys, and the keys of each (the default class has no name/patterns).
_TABLES: dict[str, type[Any]] = {
    "server": ServerConfig,
    "redis": RedisConfig,
    "l1": L1Config,
    "invalidation": InvalidationConfig,
    "telemetry": TelemetryConfig,
    "default_class": KeyClassConfig,
    "redis.breaker": BreakerConfig,  # a table inside a table: [redis.breaker]
    "origin": OriginConfig,
    "origin.breaker": BreakerConfig,
    "write_behind": WriteBehindConfig,
    "tenants": TenantsConfig,
    "auth": AuthConfig,
}
_FIXED = {"default_class": ("name", "patterns")}
# Secrets a config file must not hold (files get shared and committed): the environment
# or a file of their own instead. Their values are never quoted in a message.
_ENV_ONLY = {
    "redis.password": "$CACHEGW_REDIS_PASSWORD, redis.password_file or the URL",
    "redis.sentinel_password": ("$CACHEGW_REDIS_SENTINEL_PASSWORD or redis.sentinel_password_file"),
}
_TOP_LEVEL = (*(t for t in _TABLES if "." not in t), "classes", "tenant")
_CLASS_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_INT = re.compile(r"[+-]?[0-9][0-9_]*")
_OTLP_ENDPOINT = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):[0-9]{1,5}/?")


def _keys(cls: type[Any], table: str = "") -> dict[str, str]:
    """Field name -> annotation string (``from __future__`` keeps annotations as text)."""
    fixed = _FIXED.get(table, ())
    return {
        f.name: str(f.type)
        for f in dataclasses.fields(cls)
        if f.name not in fixed and f"{table}.{f.name}" not in _TABLES
    }


_CLASS_KEYS = _keys(KeyClassConfig)
_TENANT_KEYS = _keys(TenantConfig)
_DOTTED = [f"{t}.{k}" for t, cls in _TABLES.items() for k in _keys(cls, t)]


def _num(value: object) -> str:
    """Numbers as a person wrote them: -5 rather than -5.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _unknown(where: str, key: str, known: list[str] | tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{where}: unknown key {key}{hint}")


_KIND_NAMES = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "tuple[str, ...]": "a list of strings",
    "RateLimitConfig | None": "a table, e.g. { rate = 100, period_seconds = 60 }",
    "int | str": "a positive integer or 'auto'",
    "dict[str, str]": f"a table of announced = target addresses, e.g. {{ {address_map.EXAMPLE} }}",
}
_RATE_LIMIT_KEYS = {"rate": "int", "period_seconds": "float", "burst": "int", "algorithm": "str"}


def _coerce(where: str, value: object, kind: str, text_ok: bool) -> object:
    """Check a value against a field's type. Env vars and flags arrive as text (`text_ok`),
    so only those may be parsed; a TOML value must already have the right type."""
    if kind.endswith(" | None") and kind != "RateLimitConfig | None":
        kind = kind.removesuffix(" | None")  # optional in [[tenant]]: left out = unset
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text_ok and isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text_ok and isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value.strip())
    elif kind == "float":
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif text_ok and isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is not None:
            if not math.isfinite(number):  # nan would slip through every "> 0" check
                raise ConfigError(f"{where} must be a finite number (got {value!r})")
            return number
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "int | str":  # server.workers
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        text = value.strip() if text_ok and isinstance(value, str) else ""
        if _INT.fullmatch(text) and int(text) >= 1:
            return int(text)
    elif kind == "tuple[str, ...]":
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif kind == "RateLimitConfig | None":
        if isinstance(value, dict):
            return _rate_limit(where, value)
    elif kind == "dict[str, str]":  # redis.address_map; its entries are checked later
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(item, str):
                    shown = str(item).lower() if isinstance(item, bool) else repr(item)
                    raise ConfigError(
                        f'{where}["{key}"] must be a string "host:port" (got {shown})'
                    )
            return dict(value)
        if text_ok and isinstance(value, str):
            try:
                return address_map.parse_text(value)
            except ValueError as exc:
                raise ConfigError(f"{where}{exc}") from None
    else:  # pragma: no cover - a new field type needs a rule here
        raise AssertionError(f"no coercion for {kind}")
    if isinstance(value, bool):
        shown = str(value).lower()  # as TOML spells it
    else:
        shown = _num(value) if isinstance(value, int | float) else repr(value)
    raise ConfigError(f"{where} must be {_KIND_NAMES[kind]} (got {shown})")


def _rate_limit(where: str, table: Mapping[str, object]) -> RateLimitConfig:
    """A rate_limit table, key by key (its rules are checked with the class's)."""
    values: dict[str, Any] = {}
    for key, item in table.items():
        if key not in _RATE_LIMIT_KEYS:
            src, _, at = where.rpartition(": ")
            raise _unknown(src, f"{at}.{key}", [f"{at}.{k}" for k in _RATE_LIMIT_KEYS])
        values[key] = _coerce(f"{where}.{key}", item, _RATE_LIMIT_KEYS[key], text_ok=False)
    for key in ("rate", "period_seconds"):
        if key not in values:
            raise ConfigError(f"{where}.{key} is required")
    return RateLimitConfig(**values)


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


class _Sources:
    """Which layer set each dotted key, so an error can point at the file, the env var
    or the flag that needs changing."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.origin: dict[str, str] = {}

    def where(self, dotted: str) -> str:
        return f"{self.origin.get(dotted, self.default)}: {dotted}"


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    src = os.fspath(path)
    try:
        with Path(src).expanduser().open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{src}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{src}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{src}: cannot read the config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{src}: not valid TOML: the file is not UTF-8") from None


def _layer_file(
    src: str, doc: Mapping[str, Any], tables: dict[str, dict[str, object]], sources: _Sources
) -> list[tuple[str, dict[str, object]]]:
    """File values into `tables`; returns the [[classes]] entries, checked and coerced."""
    for top, value in doc.items():
        if top not in _TOP_LEVEL:
            raise _unknown(src, top, _TOP_LEVEL)
        if top in ("classes", "tenant"):
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {top} must be a table ([{top}]), got {value!r}")
        allowed = _keys(_TABLES[top], top)
        for key, item in value.items():
            dotted = f"{top}.{key}"
            if dotted in _TABLES:
                _layer_subtable(src, dotted, item, tables, sources)
                continue
            if top == "default_class" and key in ("name", "patterns"):
                raise ConfigError(
                    f"{src}: {dotted} is not allowed: the default class is named "
                    f"'{DEFAULT_CLASS_NAME}' and takes every key no class pattern matches"
                )
            if key not in allowed:
                raise _unknown(src, dotted, [f"{top}.{k}" for k in allowed])
            if dotted in _ENV_ONLY:
                raise ConfigError(
                    f"{src}: {dotted} is not read from a config file (files get shared and "
                    f"committed); give it in {_ENV_ONLY[dotted]}"
                )
            tables[top][key] = _coerce(f"{src}: {dotted}", item, allowed[key], text_ok=False)
            sources.origin[dotted] = src

    return _array_of_tables(src, doc, "classes", _CLASS_KEYS)


def _array_of_tables(
    src: str, doc: Mapping[str, Any], name: str, keys: Mapping[str, str]
) -> list[tuple[str, dict[str, object]]]:
    """The entries of [[name]], each checked key by key and coerced; every one needs a
    name. Returns (where, values) pairs."""
    entries = doc.get(name, [])
    if isinstance(entries, dict):
        raise ConfigError(f"{src}: {name} must be an array of tables: write [[{name}]]")
    if not isinstance(entries, list):
        raise ConfigError(f"{src}: {name} must be an array of tables ([[{name}]])")
    out: list[tuple[str, dict[str, object]]] = []
    for i, entry in enumerate(entries):
        at = f"{name}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{src}: {at} must be a table (got {entry!r})")
        values: dict[str, object] = {}
        for key, item in entry.items():
            if key not in keys:
                raise _unknown(src, f"{at}.{key}", [f"{at}.{k}" for k in keys])
            values[key] = _coerce(f"{src}: {at}.{key}", item, keys[key], text_ok=False)
        if "name" not in values:
            raise ConfigError(f"{src}: {at}.name is required")
        out.append((f"{src}: {at}", values))
    return out


def _tenant_entries(src: str, doc: Mapping[str, Any]) -> list[TenantConfig]:
    """The [[tenant]] entries, checked and coerced."""
    return [_make(TenantConfig, v) for _, v in _array_of_tables(src, doc, "tenant", _TENANT_KEYS)]


def _layer_subtable(
    src: str, name: str, value: object, tables: dict[str, dict[str, object]], sources: _Sources
) -> None:
    """A table inside a table, e.g. [redis.breaker]: its keys into tables[name]."""
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: {name} must be a table ([{name}]), got {value!r}")
    allowed = _keys(_TABLES[name], name)
    for key, item in value.items():
        dotted = f"{name}.{key}"
        if key not in allowed:
            raise _unknown(src, dotted, [f"{name}.{k}" for k in allowed])
        tables[name][key] = _coerce(f"{src}: {dotted}", item, allowed[key], text_ok=False)
        sources.origin[dotted] = src


def _layer_text(
    origin: str, dotted: str, value: object, tables: dict[str, dict[str, object]], s: _Sources
) -> None:
    """One env var or CLI override: a dotted key such as ``redis.url``."""
    table, _, key = dotted.rpartition(".")
    allowed = _keys(_TABLES[table], table) if table in _TABLES else {}
    if key not in allowed:
        raise _unknown(origin, dotted, _DOTTED)
    tables[table][key] = _coerce(f"{origin}: {dotted}", value, allowed[key], text_ok=True)
    s.origin[dotted] = origin


# -- validation ------------------------------------------------------------------------


def _positive(where: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{where} must be > 0 (got {_num(value)})")


def _check_listen(where: str, listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    example = "e.g. 127.0.0.1:50051 or [::1]:50051"
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ConfigError(
            f"{where} must be host:port with a port 0..65535, {example} (got {listen!r})"
        )
    if host.startswith("[") or ":" in host:
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else None
        try:
            ipaddress.IPv6Address(inner or "")
        except ValueError:
            raise ConfigError(
                f"{where}: an IPv6 host must be a valid address in brackets, {example} "
                f"(got {listen!r})"
            ) from None
    elif any(c.isspace() for c in host):
        raise ConfigError(f"{where}: the host must not contain spaces (got {listen!r})")


def _check_address(where: str, address: str, whose: str) -> None:
    """host:port of a server to call: as a listen address, but port 0 means nothing."""
    _check_listen(where, address)
    if int(address.rpartition(":")[2]) == 0:
        raise ConfigError(f"{where} must name {whose} port, 1..65535 (got {address!r})")


def _check_class(where: Callable[[str], str], kc: KeyClassConfig, max_ttl: float) -> None:
    if not _CLASS_NAME.fullmatch(kc.name):
        raise ConfigError(
            f"{where('name')} must be non-empty letters, digits, '_', '.' or '-' (got {kc.name!r})"
        )
    for i, pattern in enumerate(kc.patterns):
        if not pattern:
            raise ConfigError(f"{where(f'patterns[{i}]')} must not be empty")
    _positive(where("ttl_seconds"), kc.ttl_seconds)
    if kc.ttl_seconds > max_ttl:
        raise ConfigError(
            f"{where('ttl_seconds')} must be <= server.max_ttl_seconds ({_num(max_ttl)}) "
            f"(got {_num(kc.ttl_seconds)})"
        )
    if not 0 <= kc.jitter < 1:
        raise ConfigError(f"{where('jitter')} must be in [0, 1) (got {_num(kc.jitter)})")
    _positive(where("l1_ttl_seconds"), kc.l1_ttl_seconds)
    _positive(where("max_value_bytes"), kc.max_value_bytes)
    if kc.max_value_bytes > MAX_VALUE_BYTES:
        raise ConfigError(
            f"{where('max_value_bytes')} must be <= {MAX_VALUE_BYTES} (63 MiB): a value "
            f"travels in one gRPC message of at most {MAX_MESSAGE_BYTES} bytes (64 MiB) with "
            f"its key and tags (got {kc.max_value_bytes})"
        )
    if kc.jitter_mode not in JITTER_MODES:
        raise ConfigError(
            f"{where('jitter_mode')} must be 'random' or 'deterministic' (got {kc.jitter_mode!r})"
        )
    if kc.invalidation not in INVALIDATION_MODES:
        raise ConfigError(
            f"{where('invalidation')} must be 'events' or 'ttl' (got {kc.invalidation!r})"
        )
    _positive(where("lease_timeout_seconds"), kc.lease_timeout_seconds)
    if kc.lease_timeout_seconds > 3600:
        raise ConfigError(
            f"{where('lease_timeout_seconds')} must be <= 3600 "
            f"(got {_num(kc.lease_timeout_seconds)})"
        )
    if not 0 <= kc.max_wait_seconds <= 3600:
        raise ConfigError(
            f"{where('max_wait_seconds')} must be in [0, 3600] (got {_num(kc.max_wait_seconds)})"
        )
    if not 0 <= kc.early_refresh_beta <= 100:
        raise ConfigError(
            f"{where('early_refresh_beta')} must be in [0, 100], 0 = off "
            f"(got {_num(kc.early_refresh_beta)})"
        )
    if not 0 <= kc.stale_seconds <= max_ttl:
        raise ConfigError(
            f"{where('stale_seconds')} must be in [0, server.max_ttl_seconds], 0 = off "
            f"(got {_num(kc.stale_seconds)})"
        )
    if not 0 <= kc.stale_if_error_seconds <= max_ttl:
        raise ConfigError(
            f"{where('stale_if_error_seconds')} must be in [0, server.max_ttl_seconds], "
            f"0 = off (got {_num(kc.stale_if_error_seconds)})"
        )
    if kc.rate_limit is not None:
        _check_rate_limit(lambda key: where(f"rate_limit.{key}"), kc.rate_limit)
    _check_origin_policy(where, kc, max_ttl)


def _check_origin_policy(where: Callable[[str], str], kc: KeyClassConfig, max_ttl: float) -> None:
    if kc.read_policy not in READ_POLICIES:
        raise ConfigError(
            f"{where('read_policy')} must be 'cache-aside' (callers load misses) or "
            f"'read-through' (the gateway loads them from `origin`) (got {kc.read_policy!r})"
        )
    if kc.write_policy not in WRITE_POLICIES:
        raise ConfigError(
            f"{where('write_policy')} must be 'around' (Set writes the cache only), "
            f"'through' (Set stores in `origin` first) or 'behind' (Set is journaled and "
            f"stored in `origin` in the background) (got {kc.write_policy!r})"
        )
    if kc.origin:
        _check_address(where("origin"), kc.origin, "an origin's")
    uses = [f"read_policy = {kc.read_policy!r}"] if kc.read_policy == "read-through" else []
    if kc.write_policy in ("through", "behind"):
        uses.append(f"write_policy = {kc.write_policy!r}")
    if uses and not kc.origin:
        raise ConfigError(
            f"{where('origin')} is required with {' and '.join(uses)}: the host:port of the "
            "service implementing cachegw.v1.Origin (protos/cachegw/v1/origin.proto), "
            'e.g. origin = "127.0.0.1:7000"'
        )
    if kc.write_policy in ("through", "behind") and kc.read_policy != "read-through":
        raise ConfigError(
            f"{where('write_policy')} {kc.write_policy!r} needs read_policy = 'read-through': the "
            "cache orders write-through writes by the origin's versions, and values that "
            "callers fill themselves (cache-aside) carry none, so a fill could hide a newer "
            "write"
        )
    if not 0 <= kc.negative_ttl_seconds <= max_ttl:
        raise ConfigError(
            f"{where('negative_ttl_seconds')} must be in [0, server.max_ttl_seconds], "
            f"0 = off (got {_num(kc.negative_ttl_seconds)})"
        )
    if kc.negative_ttl_seconds and kc.read_policy != "read-through":
        raise ConfigError(
            f"{where('negative_ttl_seconds')} needs read_policy = 'read-through': only a "
            "gateway that loads from the origin learns that a key does not exist "
            f"(got {_num(kc.negative_ttl_seconds)})"
        )


MAX_REFRESH_AHEAD_RATE = 1_000_000.0  # reloads per second: one per microsecond (GCRA)


def _check_fail_safe_and_refresh(
    where: Callable[[str], str], kc: KeyClassConfig, origin: OriginConfig
) -> None:
    """fail_safe_seconds, soft/hard_timeout_seconds and refresh_ahead*: read-through only."""
    through = kc.read_policy == "read-through"

    def needs_through(key: str, value: object) -> None:
        if not through:
            raise ConfigError(
                f"{where(key)} needs read_policy = 'read-through': only a class the gateway "
                f"loads itself has origin loads to guard or to run ahead (got {value!r})"
            )

    if not 0 <= kc.fail_safe_seconds <= 30 * 86400:
        raise ConfigError(
            f"{where('fail_safe_seconds')} must be in [0, 2592000] (30 days), 0 = off "
            f"(got {_num(kc.fail_safe_seconds)})"
        )
    for key in ("soft_timeout_seconds", "hard_timeout_seconds"):
        value = getattr(kc, key)
        if not 0 <= value <= 3600:
            raise ConfigError(f"{where(key)} must be in [0, 3600], 0 = off (got {_num(value)})")
    if kc.fail_safe_seconds:
        needs_through("fail_safe_seconds", kc.fail_safe_seconds)
    if kc.hard_timeout_seconds:
        needs_through("hard_timeout_seconds", kc.hard_timeout_seconds)
        if kc.hard_timeout_seconds >= kc.lease_timeout_seconds:
            raise ConfigError(
                f"{where('hard_timeout_seconds')} must be below lease_timeout_seconds "
                f"({_num(kc.lease_timeout_seconds)}): a Load that outlives its lease lets "
                "another caller load the key a second time "
                f"(got {_num(kc.hard_timeout_seconds)})"
            )
    hard = kc.hard_timeout_seconds or origin.timeout_seconds
    if kc.soft_timeout_seconds:
        if not kc.fail_safe_seconds:
            raise ConfigError(
                f"{where('soft_timeout_seconds')} needs fail_safe_seconds > 0: a soft timeout "
                "answers the last value STALE, and without fail-safe none is kept "
                f"(got {_num(kc.soft_timeout_seconds)})"
            )
        if kc.soft_timeout_seconds >= hard:
            which = "hard_timeout_seconds" if kc.hard_timeout_seconds else "origin.timeout_seconds"
            raise ConfigError(
                f"{where('soft_timeout_seconds')} must be below {which} ({_num(hard)}): past "
                "the hard timeout the load has given up, so there is nothing left to wait for "
                f"(got {_num(kc.soft_timeout_seconds)})"
            )
    if not 0 <= kc.refresh_ahead_rate <= MAX_REFRESH_AHEAD_RATE:
        raise ConfigError(
            f"{where('refresh_ahead_rate')} must be in [0, {_num(MAX_REFRESH_AHEAD_RATE)}] "
            f"reloads per second (got {_num(kc.refresh_ahead_rate)})"
        )
    if not 0 < kc.refresh_ahead_fraction < 1:
        raise ConfigError(
            f"{where('refresh_ahead_fraction')} must be in (0, 1): the share of ttl_seconds "
            f"before expiry when a hot key is reloaded (got {_num(kc.refresh_ahead_fraction)})"
        )
    if not 0 <= kc.refresh_ahead_before_seconds < kc.ttl_seconds:
        raise ConfigError(
            f"{where('refresh_ahead_before_seconds')} must be in [0, ttl_seconds) "
            f"([0, {_num(kc.ttl_seconds)})), 0 = refresh_ahead_fraction of ttl_seconds "
            f"(got {_num(kc.refresh_ahead_before_seconds)})"
        )
    if kc.refresh_ahead:
        needs_through("refresh_ahead", True)
        if not kc.refresh_ahead_rate:
            raise ConfigError(
                f"{where('refresh_ahead_rate')} is required with refresh_ahead = true: the "
                "most reloads per second the class's origin may get from refresh-ahead, "
                "across every gateway (e.g. refresh_ahead_rate = 50)"
            )


def _check_rate_limit(where: Callable[[str], str], rl: RateLimitConfig) -> None:
    if rl.algorithm not in RATE_ALGORITHMS:
        raise ConfigError(
            f"{where('algorithm')} must be 'gcra' or 'sliding_window' (got {rl.algorithm!r})"
        )
    if not 1 <= rl.rate <= MAX_RATE:
        raise ConfigError(f"{where('rate')} must be in [1, {MAX_RATE}] (got {rl.rate})")
    if not MIN_RATE_PERIOD_SECONDS <= rl.period_seconds <= MAX_RATE_PERIOD_SECONDS:
        raise ConfigError(
            f"{where('period_seconds')} must be in [{MIN_RATE_PERIOD_SECONDS}, "
            f"{_num(MAX_RATE_PERIOD_SECONDS)}] (1 ms to 1 day) (got {_num(rl.period_seconds)})"
        )
    period_ms = round(rl.period_seconds * 1000)
    if rl.algorithm == "gcra":
        if rl.rate > period_ms * 1000 // MIN_EMISSION_INTERVAL_US:
            raise ConfigError(
                f"{where('rate')}: at most one request per microsecond per key, so rate must "
                f"be <= period_seconds * 1000000 ({period_ms * 1000}) (got {rl.rate})"
            )
        if not 0 <= rl.burst <= MAX_RATE:
            raise ConfigError(
                f"{where('burst')} must be in [0, {MAX_RATE}], 0 = rate (got {rl.burst})"
            )
        burst = rl.burst or rl.rate
        if burst * rl.period_seconds / rl.rate > MAX_BURST_REFILL_SECONDS:
            raise ConfigError(
                f"{where('burst')}: a full burst must come back within 30 days "
                f"(burst * period_seconds / rate <= {_num(MAX_BURST_REFILL_SECONDS)}) "
                f"(got {burst})"
            )
    elif rl.burst:
        raise ConfigError(
            f"{where('burst')} is not used by algorithm 'sliding_window' (at most `rate` per "
            f"any period): leave it out (got {rl.burst})"
        )


def _under(prefix: str) -> Callable[[str], str]:
    return lambda key: f"{prefix}.{key}"


def _validate(c: GatewayConfig, s: _Sources, class_where: list[str]) -> None:
    w = s.where
    _check_listen(w("server.listen"), c.server.listen)
    if not c.server.drain_delay_seconds >= 0:
        raise ConfigError(
            f"{w('server.drain_delay_seconds')} must be >= 0 "
            f"(got {_num(c.server.drain_delay_seconds)})"
        )
    if c.server.grace_seconds < 0:
        raise ConfigError(
            f"{w('server.grace_seconds')} must be >= 0 (got {_num(c.server.grace_seconds)})"
        )
    for key in (
        "max_key_bytes",
        "max_ttl_seconds",
        "max_batch_keys",
        "max_concurrent_rpcs",
        "max_subscribers",
        "max_subscribers_per_peer",
        "max_response_bytes",
    ):
        _positive(w(f"server.{key}"), getattr(c.server, key))
    if c.server.max_response_bytes > MAX_MESSAGE_BYTES:
        raise ConfigError(
            f"{w('server.max_response_bytes')} must be <= {MAX_MESSAGE_BYTES} (gRPC's message "
            f"limit here; got {c.server.max_response_bytes})"
        )
    for key in ("max_connection_age_seconds", "max_connection_age_grace_seconds"):
        value = getattr(c.server, key)
        if not value >= 0:
            raise ConfigError(f"{w(f'server.{key}')} must be >= 0 (got {_num(value)})")
    _check_tls_keys(w, c.server)
    if any(not ch.isprintable() or ch.isspace() for ch in c.server.gateway_id):
        raise ConfigError(
            f"{w('server.gateway_id')} must not contain spaces or control characters "
            f"(got {c.server.gateway_id!r})"
        )

    if c.redis.url:
        try:
            redis_url.parse(c.redis.url)
        except redis_url.RedisUrlError as exc:
            raise ConfigError(f"{w('redis.url')} {exc}") from None
    prefix = c.redis.prefix
    if not prefix or any(ch in "{}" or ch.isspace() for ch in prefix):
        raise ConfigError(
            f"{w('redis.prefix')} must be non-empty, without spaces or braces "
            f"(braces are Redis Cluster hash tags) (got {prefix!r})"
        )
    for key in ("socket_timeout", "connect_timeout", "max_connections"):
        _positive(w(f"redis.{key}"), getattr(c.redis, key))
    if not 0 <= c.redis.managed_port <= 65535:
        raise ConfigError(
            f"{w('redis.managed_port')} must be 0..65535, 0 for a free port "
            f"(got {c.redis.managed_port})"
        )
    try:
        address_map.check(c.redis.address_map)
    except ValueError as exc:
        raise ConfigError(f"{w('redis.address_map')}{exc}") from None
    _check_breaker(w, c.redis.breaker, "redis.breaker.")
    _check_redis_secrets(w, c.redis)
    _positive(w("origin.timeout_seconds"), c.origin.timeout_seconds)
    if c.origin.timeout_seconds > 3600:
        raise ConfigError(
            f"{w('origin.timeout_seconds')} must be <= 3600 (got {_num(c.origin.timeout_seconds)})"
        )
    _positive(w("origin.max_in_flight"), c.origin.max_in_flight)
    if not 0.001 <= c.origin.warm_keys_per_second <= 1_000_000:
        raise ConfigError(
            f"{w('origin.warm_keys_per_second')} must be in [0.001, 1000000] "
            f"(got {_num(c.origin.warm_keys_per_second)})"
        )
    if not 1 <= c.origin.warm_batch_keys <= 10_000:
        raise ConfigError(
            f"{w('origin.warm_batch_keys')} must be in [1, 10000] (got {c.origin.warm_batch_keys})"
        )
    _check_breaker(w, c.origin.breaker, "origin.breaker.")
    _check_write_behind(w, c.write_behind)
    _check_tenants(w, c)
    _check_auth(w, c.auth)

    for key in ("stream_max_len", "subscriber_queue", "subscriber_queue_bytes"):
        _positive(w(f"invalidation.{key}"), getattr(c.invalidation, key))
    _positive(
        w("invalidation.resubscribe_max_backoff_seconds"),
        c.invalidation.resubscribe_max_backoff_seconds,
    )

    _positive(w("l1.max_entries"), c.l1.max_entries)
    _positive(w("l1.max_bytes"), c.l1.max_bytes)
    _positive(w("l1.stale_if_error_max_bytes"), c.l1.stale_if_error_max_bytes)
    if c.l1.warm_keys < 0:
        raise ConfigError(f"{w('l1.warm_keys')} must be >= 0, 0 = off (got {c.l1.warm_keys})")
    if c.l1.admission not in ADMISSION_POLICIES:
        raise ConfigError(
            f"{w('l1.admission')} must be 'lru' or 'tinylfu' (got {c.l1.admission!r})"
        )

    _check_telemetry(c, s)

    seen: dict[str, str] = {}
    for kc, at in zip(c.classes, class_where, strict=True):
        _check_class(_under(at), kc, c.server.max_ttl_seconds)
        _check_fail_safe_and_refresh(_under(at), kc, c.origin)
        if not kc.patterns:
            raise ConfigError(
                f'{at}.patterns must list at least one key glob, e.g. ["{kc.name}:*"]'
            )
        if kc.name == DEFAULT_CLASS_NAME:
            raise ConfigError(f"{at}.name 'default' is reserved; configure it in [default_class]")
        if kc.name in seen:
            raise ConfigError(f"{at}.name {kc.name!r} is already used by {seen[kc.name]}")
        seen[kc.name] = at.rpartition(": ")[2]
    _check_class(lambda key: w(f"default_class.{key}"), c.default_class, c.server.max_ttl_seconds)
    _check_fail_safe_and_refresh(lambda key: w(f"default_class.{key}"), c.default_class, c.origin)


TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# A tenant's call rate is a GCRA bucket of rate x 1000 per 1000 s (quotas.py), whose
# emission interval must stay at least a microsecond.
MAX_TENANT_RATE = 1_000_000


def _check_quota(where: str, rate: float | None, burst: int | None, subs: int | None) -> None:
    if rate is not None and not 0 <= rate <= MAX_TENANT_RATE:
        raise ConfigError(
            f"{where}requests_per_second must be in [0, {MAX_TENANT_RATE}], 0 = no limit "
            f"(got {_num(rate)})"
        )
    if burst is not None and not 0 <= burst <= MAX_RATE:
        raise ConfigError(f"{where}burst must be in [0, {MAX_RATE}] (got {burst})")
    if subs is not None and subs < 0:
        raise ConfigError(f"{where}max_subscribers must be >= 0, 0 = no limit (got {subs})")


def _check_tenants(w: Callable[[str], str], c: GatewayConfig) -> None:
    t = c.tenants
    _positive(w("tenants.max_per_gateway"), t.max_per_gateway)
    for key in ("l1_max_bytes", "l1_max_entries"):
        if getattr(t, key) < 0:
            raise ConfigError(f"{w(f'tenants.{key}')} must be >= 0 (got {getattr(t, key)})")
    _check_quota("tenants.", t.requests_per_second, t.burst, t.max_subscribers)
    if len(c.tenant) > t.max_per_gateway:
        raise ConfigError(
            f"{len(c.tenant)} [[tenant]] entries, but tenants.max_per_gateway is "
            f"{t.max_per_gateway}: every tenant named gets its key space at start; raise it"
        )
    seen: set[str] = set()
    for i, e in enumerate(c.tenant):
        at = f"tenant[{i}]."
        if not TENANT_NAME.fullmatch(e.name):
            raise ConfigError(
                f"{at}name must be 1-32 of a-z, 0-9, '_' and '-', starting with a letter or "
                f"digit (got {e.name!r})"
            )
        if e.name in seen:
            raise ConfigError(f"{at}name: tenant {e.name!r} is named twice")
        seen.add(e.name)
        _check_quota(at, e.requests_per_second, e.burst, e.max_subscribers)


def _check_redis_secrets(w: Callable[[str], str], r: RedisConfig) -> None:
    """The password files and TLS files can be read (and the TLS ones are PEM that
    belongs together), so that a typo shows at start, not at the first connection."""
    for key in ("password_file", "sentinel_password_file"):
        path = getattr(r, key)
        if path:
            try:
                redis_auth.read_password_file(path)
            except ValueError as exc:
                raise ConfigError(f"{w(f'redis.{key}')} {exc}") from None
    try:
        redis_tls.check(r)
    except redis_tls.TlsConfigError as exc:
        raise ConfigError(f"{w(f'redis.{exc.key}')} {exc}") from None


def _check_tls_keys(w: Callable[[str], str], server: ServerConfig) -> None:
    """The TLS keys go together; the files themselves are read and checked by tls.py
    when the gateway starts."""
    if server.tls_cert and not server.tls_key:
        raise ConfigError(
            f"{w('server.tls_cert')} needs server.tls_key (--tls-key): the certificate's "
            "private key, PEM, unencrypted"
        )
    if server.tls_key and not server.tls_cert:
        raise ConfigError(
            f"{w('server.tls_key')} needs server.tls_cert (--tls-cert): the server's "
            "certificate, PEM, for that key"
        )
    if server.tls_client_ca and not server.tls_cert:
        raise ConfigError(
            f"{w('server.tls_client_ca')} needs server.tls_cert and server.tls_key "
            "(--tls-cert, --tls-key): client certificates are asked for over TLS only"
        )


def _check_write_behind(w: Callable[[str], str], wb: WriteBehindConfig) -> None:
    at = "write_behind."
    if not 1 <= wb.shards <= 1024:
        raise ConfigError(f"{w(at + 'shards')} must be in [1, 1024] (got {wb.shards})")
    if not 1 <= wb.batch_size <= 10_000:
        raise ConfigError(f"{w(at + 'batch_size')} must be in [1, 10000] (got {wb.batch_size})")
    for key in ("flush_interval_seconds", "retry_initial_seconds", "retry_max_seconds"):
        value = getattr(wb, key)
        if not 0 < value <= 3600:
            raise ConfigError(f"{w(at + key)} must be in (0, 3600] (got {_num(value)})")
    if wb.retry_max_seconds < wb.retry_initial_seconds:
        raise ConfigError(
            f"{w(at + 'retry_max_seconds')} must be >= retry_initial_seconds "
            f"({_num(wb.retry_initial_seconds)}) (got {_num(wb.retry_max_seconds)})"
        )
    if not 0.1 <= wb.claim_idle_seconds <= 86_400:
        raise ConfigError(
            f"{w(at + 'claim_idle_seconds')} must be in [0.1, 86400] "
            f"(got {_num(wb.claim_idle_seconds)})"
        )
    if wb.max_attempts < 1:
        raise ConfigError(f"{w(at + 'max_attempts')} must be >= 1 (got {wb.max_attempts})")
    _positive(w(at + "dead_letter_max_len"), wb.dead_letter_max_len)


JWT_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "ES256",
    "ES384",
    "EdDSA",
)


def _check_auth(w: Callable[[str], str], a: AuthConfig) -> None:
    if a.jwt_algorithm not in JWT_ALGORITHMS:
        raise ConfigError(
            f"{w('auth.jwt_algorithm')} must be one of {', '.join(JWT_ALGORITHMS)} "
            f"(got {a.jwt_algorithm!r})"
        )
    if not 0.05 <= a.reload_seconds <= 60:
        raise ConfigError(
            f"{w('auth.reload_seconds')} must be in [0.05, 60]: a removed token keeps working "
            f"this long (got {_num(a.reload_seconds)})"
        )
    if not 0 <= a.jwt_leeway_seconds <= 300:
        raise ConfigError(
            f"{w('auth.jwt_leeway_seconds')} must be in [0, 300] (got {_num(a.jwt_leeway_seconds)})"
        )
    if not 1 <= a.cache_size <= 10_000_000:
        raise ConfigError(f"{w('auth.cache_size')} must be in [1, 10000000] (got {a.cache_size})")
    if a.enabled and not a.tokens_file and not a.jwt_key_file:
        raise ConfigError(
            f"{w('auth.enabled')} is true, but neither auth.tokens_file nor auth.jwt_key_file is "
            "set: no call could be authenticated (`cachegw token hash` makes a token and its "
            "entry for a tokens file)"
        )


def _check_breaker(w: Callable[[str], str], b: BreakerConfig, at: str) -> None:
    if b.failures < 0:
        raise ConfigError(
            f"{w(at + 'failures')} must be >= 0, 0 = only the failure rate opens the breaker "
            f"(got {b.failures})"
        )
    if not 0 <= b.failure_rate <= 1:
        raise ConfigError(
            f"{w(at + 'failure_rate')} must be in [0, 1], 0 = only consecutive failures open "
            f"the breaker (got {_num(b.failure_rate)})"
        )
    if b.enabled and b.failures == 0 and b.failure_rate == 0:
        raise ConfigError(
            f"{w(at + 'failures')} and {at}failure_rate are both 0: nothing would open the "
            "breaker; set enabled = false to turn it off"
        )
    if not 0 < b.window_seconds <= 3600:
        raise ConfigError(
            f"{w(at + 'window_seconds')} must be in (0, 3600] (got {_num(b.window_seconds)})"
        )
    if b.min_calls < 1:
        raise ConfigError(f"{w(at + 'min_calls')} must be >= 1 (got {b.min_calls})")
    if not 0 < b.cooldown_seconds <= 3600:
        raise ConfigError(
            f"{w(at + 'cooldown_seconds')} must be in (0, 3600] (got {_num(b.cooldown_seconds)})"
        )


def _check_telemetry(c: GatewayConfig, s: _Sources) -> None:
    w, t = s.where, c.telemetry
    if t.exporter not in TRACE_EXPORTERS:
        raise ConfigError(
            f"{w('telemetry.exporter')} must be 'none', 'console' or 'otlp' (got {t.exporter!r})"
        )
    if t.exporter == "otlp" and not _OTLP_ENDPOINT.fullmatch(t.otlp_endpoint):
        raise ConfigError(
            f"{w('telemetry.otlp_endpoint')} must be the collector's OTLP/gRPC address, "
            f"http://host:port (plaintext) or https://host:port (TLS), "
            f"e.g. http://127.0.0.1:4317 (got {t.otlp_endpoint!r})"
        )
    if not 0 <= t.sample_ratio <= 1:
        raise ConfigError(
            f"{w('telemetry.sample_ratio')} must be in [0, 1] (got {_num(t.sample_ratio)})"
        )
    if t.metrics_listen:
        _check_listen(w("telemetry.metrics_listen"), t.metrics_listen)
        if t.metrics_listen == c.server.listen and not t.metrics_listen.endswith(":0"):
            raise ConfigError(
                f"{w('telemetry.metrics_listen')} must differ from server.listen "
                f"(both are {t.metrics_listen!r})"
            )
    if t.log_format not in LOG_FORMATS:
        raise ConfigError(
            f"{w('telemetry.log_format')} must be 'text' or 'json' (got {t.log_format!r})"
        )
    if not t.service_name or any(ch.isspace() for ch in t.service_name):
        raise ConfigError(
            f"{w('telemetry.service_name')} must be non-empty, without spaces "
            f"(got {t.service_name!r})"
        )


NO_REDIS = (
    "no Redis configured: give the shared Redis with --redis-url redis://HOST:6379/0 "
    "($CACHEGW_REDIS_URL, or url in [redis] of the config file), or pass --embedded-redis "
    "($CACHEGW_EMBEDDED_REDIS=1, or embedded = true in [redis]) to start a private "
    "redis-server for this gateway alone (gateways started that way share no L2 and no "
    "invalidations)"
)


def check_redis_choice(c: GatewayConfig) -> None:
    """What `cachegw serve` needs on top of a valid config: a Redis URL, or an explicit
    request for an embedded one. Raises ConfigError (NO_REDIS) otherwise."""
    if not c.redis.url and not c.redis.embedded:
        raise ConfigError(NO_REDIS)


def config_warnings(c: GatewayConfig) -> list[str]:
    """Settings that are valid but probably not what was meant (logged at start)."""
    t = c.telemetry
    out = []
    named = [(f"classes[{i}] ({kc.name})", kc) for i, kc in enumerate(c.classes)]
    for at, kc in [*named, ("default_class", c.default_class)]:
        if kc.read_policy == "read-through":
            out += _read_through_warnings(at, kc, c.origin)
        if kc.origin and kc.read_policy != "read-through" and kc.write_policy == "around":
            out.append(
                f"{at}: origin {kc.origin!r} is not used: read_policy is 'cache-aside' and "
                "write_policy 'around'"
            )
        if 0 < kc.max_wait_seconds <= kc.lease_timeout_seconds:
            out.append(
                f"{at}: max_wait_seconds ({_num(kc.max_wait_seconds)}) is not above "
                f"lease_timeout_seconds ({_num(kc.lease_timeout_seconds)}): a caller waiting "
                "on a holder that died gives up before its lease ends, so none takes it "
                "over and each loads by itself"
            )
    behind = [kc for kc in (*c.classes, c.default_class) if kc.write_policy == "behind"]
    if behind and c.write_behind.claim_idle_seconds <= 2 * c.origin.timeout_seconds:
        out.append(
            f"write_behind.claim_idle_seconds ({_num(c.write_behind.claim_idle_seconds)}) is "
            f"not above twice origin.timeout_seconds ({_num(c.origin.timeout_seconds)}): a "
            "live gateway's entries may be claimed by another while its Store is in flight "
            "(harmless with an origin that honours write_version, but sent twice)"
        )
    if behind and c.write_behind.retry_max_seconds >= c.write_behind.claim_idle_seconds / 2:
        out.append(
            f"write_behind.retry_max_seconds ({_num(c.write_behind.retry_max_seconds)}) is "
            f"not below half of claim_idle_seconds ({_num(c.write_behind.claim_idle_seconds)}): "
            "while the origin is down, another gateway may claim a live gateway's batch "
            "between two of its attempts"
        )
    if c.redis.address_map and not cluster_url.is_cluster(c.redis.url):
        out.append(
            "redis.address_map is not used: it maps the node addresses a Redis Cluster "
            "announces, and redis.url is not a redis+cluster:// URL"
        )
    out += _redis_warnings(c.redis)
    if not c.auth.enabled and (c.auth.tokens_file or c.auth.jwt_key_file):
        out.append(
            "auth.tokens_file or auth.jwt_key_file is set but auth.enabled is false: every "
            "call is served without a token"
        )
    if t.exporter == "none" and t.sample_ratio != 1.0:
        out.append("telemetry.sample_ratio has no effect: telemetry.exporter is 'none'")
    if t.exporter != "none" and t.sample_ratio == 0:
        out.append("telemetry.sample_ratio is 0: only calls whose caller sampled them are traced")
    return out


def _redis_warnings(r: RedisConfig) -> list[str]:
    out: list[str] = []
    if not r.url:
        return out
    target = redis_url.parse(r.url)
    tls_keys = [k for k in ("tls_ca", "tls_cert", "tls_key") if getattr(r, k)]
    if tls_keys and not target.tls:
        out.append(
            f"redis.{', redis.'.join(tls_keys)} not used: redis.url is not a TLS URL "
            "(rediss://, rediss+sentinel:// or rediss+cluster://)"
        )
    if target.password is not None and (r.password or r.password_file):
        out.append(
            "redis.url carries a password: it is used, and $CACHEGW_REDIS_PASSWORD / "
            "redis.password_file are not"
        )
    elif r.password and r.password_file:
        out.append(
            "redis.password_file is not used: $CACHEGW_REDIS_PASSWORD is set and comes first"
        )
    sentinel = [
        k
        for k in ("sentinel_username", "sentinel_password", "sentinel_password_file")
        if getattr(r, k)
    ]
    if sentinel and target.kind != "sentinel":
        out.append(f"redis.{sentinel[0]} is not used: redis.url is not a Sentinel URL")
    return out


def _read_through_warnings(at: str, kc: KeyClassConfig, origin: OriginConfig) -> list[str]:
    out = []
    # (A class's hard_timeout_seconds replaces the origin's timeout, and is checked.)
    if not kc.hard_timeout_seconds and origin.timeout_seconds >= kc.lease_timeout_seconds:
        out.append(
            f"{at}: origin.timeout_seconds ({_num(origin.timeout_seconds)}) is not below "
            f"lease_timeout_seconds ({_num(kc.lease_timeout_seconds)}): a slow Load can "
            "outlive its lease, and a waiting caller then loads the key a second time"
        )
    if kc.early_refresh_beta or kc.stale_seconds:
        out.append(
            f"{at}: early_refresh_beta and stale_seconds do not refresh a read-through "
            "class (the gateway hands no refresh lease to callers there): entries are "
            "loaded again when they expire; refresh_ahead reloads hot keys before, and "
            "fail_safe_seconds answers the last value STALE while the origin fails"
        )
    return out


def _make(cls: type[Any], values: Mapping[str, object]) -> Any:
    """A dataclass from values already checked key by key against its fields."""
    return cls(**values)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> GatewayConfig:
    """Defaults < the TOML file (`path`, else $CACHEGW_CONFIG) < env vars < `overrides`.

    `env` defaults to os.environ; pass {} to ignore it. `overrides` holds dotted keys such
    as ``{"redis.url": ..., "server.listen": ...}`` (how the CLI passes its flags); their
    values may be text, as flags are. Empty env vars count as unset. Raises ConfigError.
    """
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    src = os.fspath(path) if path is not None else "defaults"
    sources = _Sources(src)
    tables: dict[str, dict[str, object]] = {name: {} for name in _TABLES}

    class_entries: list[tuple[str, dict[str, object]]] = []
    tenant_entries: list[TenantConfig] = []
    if path is not None:
        doc = _read_file(path)
        class_entries = _layer_file(src, doc, tables, sources)
        tenant_entries = _tenant_entries(src, doc)
    for var, dotted in ENV_VARS.items():
        if env.get(var):
            _layer_text(f"environment {var}", dotted, env[var], tables, sources)
    for dotted, value in (overrides or {}).items():
        _layer_text("command line", dotted, value, tables, sources)

    config = GatewayConfig(
        server=_make(ServerConfig, tables["server"]),
        redis=_make(
            RedisConfig,
            {**tables["redis"], "breaker": _make(BreakerConfig, tables["redis.breaker"])},
        ),
        l1=_make(L1Config, tables["l1"]),
        invalidation=_make(InvalidationConfig, tables["invalidation"]),
        telemetry=_make(TelemetryConfig, tables["telemetry"]),
        origin=_make(
            OriginConfig,
            {**tables["origin"], "breaker": _make(BreakerConfig, tables["origin.breaker"])},
        ),
        write_behind=_make(WriteBehindConfig, tables["write_behind"]),
        auth=_make(AuthConfig, tables["auth"]),
        classes=tuple(_make(KeyClassConfig, values) for _, values in class_entries),
        default_class=_make(
            KeyClassConfig, {"name": DEFAULT_CLASS_NAME, **tables["default_class"]}
        ),
        tenants=_make(TenantsConfig, tables["tenants"]),
        tenant=tuple(tenant_entries),
    )
    _validate(config, sources, [at for at, _ in class_entries])
    if not config.server.gateway_id:
        gateway_id = f"{socket.gethostname()}-{os.getpid()}"
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, gateway_id=gateway_id)
        )
    return config
