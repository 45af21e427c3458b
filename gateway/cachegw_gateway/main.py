"""`cachegw serve`: configuration, logging, tracing, the managed Redis, signals, graceful
shutdown. Logs are one line per event (start, stop, Redis changes, configuration
problems), never one per request."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from cachegw_gateway import auth
from cachegw_gateway.config import (
    LOG_FORMATS,
    TRACE_EXPORTERS,
    ConfigError,
    GatewayConfig,
    check_redis_choice,
    config_warnings,
    load_config,
)
from cachegw_gateway.managed_redis import ManagedRedis, RedisServerNotFound
from cachegw_gateway.redis_auth import describe as describe_credentials
from cachegw_gateway.redis_url import parse as parse_redis_url
from cachegw_gateway.redis_url import redact
from cachegw_gateway.server import GatewayServer
from cachegw_gateway.supervisor import Supervisor
from cachegw_gateway.telemetry import logs, tracing
from cachegw_gateway.tls import TlsFiles
from cachegw_gateway.workers import (
    WorkersError,
    WorkerSlot,
    report_ready,
    resolve_count,
    watch_parent,
)

log = logging.getLogger("cachegw")
# Error replies that say the gateway's credentials or permissions are wrong.
AUTH_FAILURES = ("NOAUTH", "WRONGPASS", "NOPERM")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cachegw serve",
        description="Run the cachegw gateway against a shared Redis (--redis-url), or with "
        "--embedded-redis against a private redis-server it starts and stops itself.",
    )
    p.add_argument("--config", help="TOML config file (default: $CACHEGW_CONFIG)")
    p.add_argument("--listen", help="host:port to serve gRPC on (default 127.0.0.1:50051)")
    p.add_argument("--redis-url", help="redis://host:port/db of the shared Redis")
    p.add_argument(
        "--embedded-redis",
        action="store_true",
        default=None,  # not given: the file or environment decides
        help="with no Redis URL, start a private local redis-server (shared with no other "
        "gateway: for development)",
    )
    p.add_argument("--redis-prefix", help="prefix of every Redis key of this deployment")
    p.add_argument(
        "--redis-address-map",
        metavar="ANNOUNCED=TARGET[,...]",
        help="on a Redis Cluster, connect to TARGET (host:port) wherever the cluster names "
        "ANNOUNCED: for NAT, port-forwards or a proxy per node",
    )
    p.add_argument(
        "--redis-username", help="Redis ACL user when the URL names none ($CACHEGW_REDIS_USERNAME)"
    )
    p.add_argument(
        "--redis-password-file",
        metavar="FILE",
        help="file holding the Redis password, read for each new connection (the password "
        "itself: in the URL or $CACHEGW_REDIS_PASSWORD, never a flag)",
    )
    p.add_argument("--redis-tls-ca", metavar="FILE", help="PEM CA of Redis's certificate")
    p.add_argument(
        "--redis-tls-cert", metavar="FILE", help="PEM client certificate for Redis (mTLS)"
    )
    p.add_argument("--redis-tls-key", metavar="FILE", help="PEM key of --redis-tls-cert")
    p.add_argument(
        "--redis-tls-no-check-hostname",
        action="store_false",
        dest="redis_tls_check_hostname",
        default=None,
        help="accept a Redis certificate that does not name the host (chain still verified)",
    )
    p.add_argument("--gateway-id", help="name of this gateway in events and stats")
    p.add_argument(
        "--workers",
        help="gateway processes sharing the port under one supervisor: a count, or 'auto' "
        "for one per core (default 1: no supervisor)",
    )
    p.add_argument(
        "--auth",
        action="store_true",
        default=None,
        help="require a token on every CacheService call ([auth] enabled; needs "
        "--tokens-file or --jwt-key-file)",
    )
    p.add_argument(
        "--tokens-file",
        metavar="FILE",
        help="TOML of token hashes and certificate identities, reloaded on change",
    )
    p.add_argument("--jwt-key-file", metavar="FILE", help="key(s) that verify signed tokens (JWT)")
    p.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        default=None,
        help="do not serve gRPC server reflection (health checking stays)",
    )
    p.add_argument(
        "--tls-cert", metavar="FILE", help="serve gRPC over TLS with this PEM certificate (chain)"
    )
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    p.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require client certificates signed by this PEM CA (mutual TLS)",
    )
    p.add_argument("--grace", type=float, help="seconds to drain in-flight calls on stop")
    p.add_argument(
        "--drain-delay",
        type=float,
        help="seconds to keep serving after SIGTERM while NOT_SERVING (load balancers notice)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", choices=LOG_FORMATS, help="text (default) or json lines")
    p.add_argument(
        "--trace-exporter", choices=TRACE_EXPORTERS, help="spans to none (default), console, otlp"
    )
    p.add_argument("--otlp-endpoint", help="OTLP/gRPC collector, e.g. http://127.0.0.1:4317")
    p.add_argument("--sample-ratio", type=float, help="share of new traces recorded, 0..1")
    p.add_argument(
        "--metrics-listen", help="host:port of the Prometheus /metrics endpoint (default: none)"
    )
    return p


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    flags = {
        "server.listen": args.listen,
        "redis.url": args.redis_url,
        "redis.embedded": args.embedded_redis,
        "redis.prefix": args.redis_prefix,
        "redis.address_map": args.redis_address_map,
        "redis.username": args.redis_username,
        "redis.password_file": args.redis_password_file,
        "redis.tls_ca": args.redis_tls_ca,
        "redis.tls_cert": args.redis_tls_cert,
        "redis.tls_key": args.redis_tls_key,
        "redis.tls_check_hostname": args.redis_tls_check_hostname,
        "server.gateway_id": args.gateway_id,
        "server.workers": args.workers,
        "server.reflection": args.reflection,
        "auth.enabled": args.auth,
        "auth.tokens_file": args.tokens_file,
        "auth.jwt_key_file": args.jwt_key_file,
        "server.tls_cert": args.tls_cert,
        "server.tls_key": args.tls_key,
        "server.tls_client_ca": args.tls_client_ca,
        "server.grace_seconds": args.grace,
        "server.drain_delay_seconds": args.drain_delay,
        "telemetry.log_format": args.log_format,
        "telemetry.exporter": args.trace_exporter,
        "telemetry.otlp_endpoint": args.otlp_endpoint,
        "telemetry.sample_ratio": args.sample_ratio,
        "telemetry.metrics_listen": args.metrics_listen,
    }
    return {k: v for k, v in flags.items() if v is not None}


async def serve(
    config: GatewayConfig,
    redis_url: str,
    tracer_provider: TracerProvider | None = None,
    worker: WorkerSlot | None = None,
) -> int:
    server = GatewayServer(config, redis_url, tracer_provider=tracer_provider, worker=worker)
    try:
        await server.start()
    except (OSError, RuntimeError) as exc:
        log.error(
            "cannot listen on %s: %s",
            config.server.listen,
            exc,
            extra={"event": "listen_failed", "listen": config.server.listen},
        )
        await server.telemetry.stop()
        await server.store.close()
        return 1
    target = parse_redis_url(redis_url)
    credentials = describe_credentials(config.redis, target)
    if not await server.store.ping():
        why = server.store.last_probe_error
        if why is not None and why.kind in AUTH_FAILURES:
            # Retrying cannot help: say so loudly, with what to fix (never the secret).
            log.error(
                "redis at %s refused this gateway (%s; %s): %s",
                redact(redis_url),
                why.kind,
                credentials,
                why,
                extra={"event": "redis_auth_failed", "redis": redact(redis_url), "kind": why.kind},
            )
        else:
            log.warning(
                "redis at %s does not answer yet; serving L1 only until it does%s",
                redact(redis_url),
                f" ({why})" if why is not None else "",
                extra={"event": "redis_down", "redis": redact(redis_url)},
            )
    t = config.telemetry
    metrics = server.metrics_address
    log.info(
        "serving on %s%s (redis %s%s, %s; metrics %s; tracing %s)",
        server.address,
        _security(server),
        redact(redis_url),
        " over TLS" if target.tls else "",
        credentials,
        f"http://{metrics}/metrics" if metrics else "off",
        f"{t.exporter} at {t.sample_ratio:g}" if tracer_provider is not None else "off",
        extra={
            "event": "start",
            "listen": server.address,
            "tls": "mtls" if server.tls and server.tls.mutual else "tls" if server.tls else "off",
            "gateway_id": config.server.gateway_id,
            "redis": redact(redis_url),
            "redis_tls": target.tls,
            "metrics": metrics,
            "trace_exporter": t.exporter if tracer_provider is not None else "none",
            "sample_ratio": t.sample_ratio,
        },
    )

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    orphaned = None
    if worker is not None:
        report_ready(worker, port=server.port, metrics=metrics)
        orphaned = asyncio.create_task(watch_parent(stopping.set))
    await stopping.wait()
    if orphaned is not None:
        orphaned.cancel()
    log.info(
        "stopping: NOT_SERVING; serving %.1fs more while load balancers notice, then ending "
        "Subscribe streams and draining in-flight calls for up to %.1fs",
        config.server.drain_delay_seconds,
        config.server.grace_seconds,
        extra={
            "event": "stopping",
            "drain_delay_seconds": config.server.drain_delay_seconds,
            "grace_seconds": config.server.grace_seconds,
        },
    )
    await server.stop()
    log.info("stopped", extra={"event": "stop"})
    return 0


def _security(server: GatewayServer) -> str:
    tls = server.tls
    if tls is None:
        return " in plaintext"
    if tls.mutual:
        return f" with mutual TLS (certificate {tls.files.cert}, client CA {tls.files.client_ca})"
    return f" with TLS (certificate {tls.files.cert})"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        worker = WorkerSlot.from_env()  # set when a supervisor started this process
        config = load_config(args.config, overrides=_overrides(args))
        check_redis_choice(config)
        auth.check_config(config.auth)
        TlsFiles.check(config.server)  # a bad file stops here, before any worker starts
        count = 1 if worker is not None else resolve_count(config.server.workers)
    except (ConfigError, WorkersError) as exc:
        fmt = args.log_format or os.environ.get("CACHEGW_LOG_FORMAT") or "text"
        if fmt == "json":
            logs.setup(args.log_level, "json")
            log.error("configuration error: %s", exc, extra={"event": "config_error"})
        else:
            print(f"cachegw: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(
        args.log_level,
        config.telemetry.log_format,
        worker=worker.index if worker is not None else None,
    )
    if worker is None:  # the supervisor's log says it once for all workers
        for problem in config_warnings(config):
            log.warning("configuration: %s", problem, extra={"event": "config_warning"})

    managed: ManagedRedis | None = None
    redis_url = config.redis.url
    if not redis_url:  # asked for (redis.embedded): check_redis_choice passed
        managed = ManagedRedis(port=config.redis.managed_port)
        try:
            managed.start()
        except RedisServerNotFound as exc:
            print(f"cachegw: {exc}", file=sys.stderr)
            return 2
        redis_url = managed.url
        log.info(
            "started a managed redis-server at %s (pid %s), private to this gateway",
            redis_url,
            managed.pid,
            extra={"event": "managed_redis_start", "redis": redis_url},
        )
    provider = None
    try:
        if count > 1:
            return Supervisor(config, redis_url, argv, count).run()
        # The one place a tracer provider is made: libraries use the application's.
        provider = tracing.build_provider(config.telemetry, config.server.gateway_id)
        if provider is not None:
            trace.set_tracer_provider(provider)
        return asyncio.run(serve(config, redis_url, provider, worker))
    finally:
        if provider is not None:
            provider.shutdown()  # flushes the spans still batched
        if managed is not None:
            managed.stop()
            log.info("stopped the managed redis-server", extra={"event": "managed_redis_stop"})


if __name__ == "__main__":
    sys.exit(main())
