"""`python -m shop serve`: the API in one mode, on uvicorn. With no DSN, a throwaway
PostgreSQL seeded with the catalog; in the redis and cachegw modes with no Redis or
gateway given, a private redis-server (and gateway); all removed on exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import asyncpg
import uvicorn

from cachegw_gateway.managed_redis import ManagedRedis
from shop import services
from shop.app import create_app
from shop.db import Counters, Database
from shop.modes import MODES, Catalog
from shop.modes.gateway import GatewayCatalog
from shop.modes.rediscache import RedisCatalog
from shop.origin import ShopOrigin

log = logging.getLogger("shop")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="cachegw")
    parser.add_argument("--dsn", default="", help="PostgreSQL; none: a throwaway cluster")
    parser.add_argument("--products", type=int, default=100_000, help="seed size")
    parser.add_argument("--redis-url", default="", help="redis mode; none: a private one")
    parser.add_argument(
        "--gateway",
        default="",
        help="cachegw mode: host:port of a gateway "
        "whose read-through classes name --origin-listen as their origin; "
        "none: a private gateway and Redis",
    )
    parser.add_argument(
        "--origin-listen",
        default="127.0.0.1:0",
        help="cachegw mode: where the shop serves the gateway's loads",
    )
    parser.add_argument(
        "--no-warm",
        dest="warm",
        action="store_false",
        help="cachegw mode: do not rebuild the catalog in the gateway from the origin at start",
    )
    parser.add_argument("--listen", default="127.0.0.1:8000", help="HTTP host:port")
    parser.add_argument("--pool-size", type=int, default=20, help="PostgreSQL connections")
    parser.add_argument("--log-level", default="WARNING")


async def run(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if not dsn:
            pg = stack.enter_context(services.managed_postgres())
            dsn = pg.dsn
            log.warning("PostgreSQL: a throwaway cluster at %s (removed on exit)", dsn)
        await services.prepare(dsn, args.products)
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=args.pool_size)
        db = Database(pool, Counters())
        origin: ShopOrigin | None = None
        catalog: Catalog
        if args.mode == "none":
            catalog = Catalog(db)
        elif args.mode == "redis":
            url = args.redis_url or stack.enter_context(ManagedRedis()).url
            catalog = RedisCatalog(db, url)
        else:
            origin = ShopOrigin(db)
            port = await origin.start(args.origin_listen)
            target = args.gateway
            if not target:
                redis = stack.enter_context(ManagedRedis())
                address = f"{args.origin_listen.rsplit(':', 1)[0]}:{port}"
                gateway = services.GatewayProcess(redis.url, address)
                stack.callback(gateway.stop)
                target = gateway.address
            catalog = GatewayCatalog(db, target, warm=args.warm)
        host, _, http_port = args.listen.rpartition(":")
        app = create_app(catalog)
        config = uvicorn.Config(
            app,
            host=host,
            port=int(http_port),
            log_level=args.log_level.lower(),
            access_log=False,
            lifespan="on",
        )
        try:
            await uvicorn.Server(config).serve()
        finally:
            if origin is not None:
                await origin.stop(0.5)
            await pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shop")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the API")
    add_arguments(serve)
    demo = commands.add_parser("demo", help="the three-way comparison (make demo)")
    from shop import demo as demo_module

    demo_module.add_arguments(demo)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        asyncio.run(run(args))
    else:
        demo_module.main(args)
