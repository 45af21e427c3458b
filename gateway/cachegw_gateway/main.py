"""`cachegw serve`: configuration, the managed Redis, signals, graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from cachegw_gateway.config import ConfigError, GatewayConfig, load_config
from cachegw_gateway.managed_redis import ManagedRedis, RedisServerNotFound
from cachegw_gateway.server import GatewayServer

log = logging.getLogger("cachegw")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cachegw serve",
        description="Run the cachegw gateway. With no Redis URL configured it starts and "
        "stops a local redis-server of its own.",
    )
    p.add_argument("--config", help="TOML config file (default: $CACHEGW_CONFIG)")
    p.add_argument("--listen", help="host:port to serve gRPC on (default 127.0.0.1:50051)")
    p.add_argument("--redis-url", help="redis://host:port/db of the shared Redis")
    p.add_argument("--redis-prefix", help="prefix of every Redis key of this deployment")
    p.add_argument("--gateway-id", help="name of this gateway in events and stats")
    p.add_argument("--grace", type=float, help="seconds to drain in-flight calls on stop")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    flags = {
        "server.listen": args.listen,
        "redis.url": args.redis_url,
        "redis.prefix": args.redis_prefix,
        "server.gateway_id": args.gateway_id,
        "server.grace_seconds": args.grace,
    }
    return {k: v for k, v in flags.items() if v is not None}


async def serve(config: GatewayConfig, redis_url: str) -> int:
    server = GatewayServer(config, redis_url)
    try:
        await server.start()
    except (OSError, RuntimeError) as exc:
        log.error("cannot listen on %s: %s", config.server.listen, exc)
        await server.store.close()
        return 1
    if not await server.store.ping():
        log.warning("redis at %s does not answer yet; serving L1 only until it does", redis_url)
    log.info("serving on %s (redis %s)", server.address, redis_url)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping: draining in-flight calls for up to %.1fs", config.server.grace_seconds)
    await server.stop()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"cachegw: configuration error: {exc}", file=sys.stderr)
        return 2

    managed: ManagedRedis | None = None
    redis_url = config.redis.url
    if not redis_url:
        managed = ManagedRedis(port=config.redis.managed_port)
        try:
            managed.start()
        except RedisServerNotFound as exc:
            print(f"cachegw: {exc}", file=sys.stderr)
            return 2
        redis_url = managed.url
        log.info("started a managed redis-server at %s (pid %s)", redis_url, managed.pid)
    try:
        return asyncio.run(serve(config, redis_url))
    finally:
        if managed is not None:
            managed.stop()
            log.info("stopped the managed redis-server")


if __name__ == "__main__":
    sys.exit(main())
