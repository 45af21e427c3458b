"""The `cachegw` command: `serve` starts a gateway, `get`/`set`/`del` are for quick use.

    cachegw serve [gateway flags...]        # needs the cachegw-gateway package
    cachegw relay --region A=URL --region B=URL [...]  # link two regions (the same)
    cachegw token hash|sign [...]           # provision tokens for [auth] (the same)
    cachegw get KEY [--verbose]             # the value on stdout; a miss exits 1
    cachegw set KEY VALUE [--ttl S] [--tag T ...]   # VALUE "-" reads stdin
    cachegw del KEY [KEY ...]               # prints how many existed
    cachegw incr KEY [DELTA] [--ttl S]      # prints the counter's new value
    cachegw touch KEY [--ttl S]             # a new TTL; a missing key exits 1
    cachegw allow KEY [--rate N --period S [--burst N] [--sliding]] [--cost N]
                                            # allowed (exit 0) or refused (exit 1)
    cachegw ttl KEY                         # fresh seconds left; a missing key exits 1
    cachegw invalidate [KEY ...] [--prefix P] [--tag T] [--class C]   # everywhere
    cachegw watch [--prefix P] [--class C] [--since ID] [--count N]   # invalidation events
    cachegw top [TARGET ...] [--interval S] [--count N]  # live view (needs cachegw[top])

`--target` (default $CACHEGW_TARGET, else 127.0.0.1:50051), `--timeout` and the security
options go before or after the subcommand: `--tls` (the system's CAs), `--tls-ca FILE`,
`--tls-cert FILE --tls-key FILE` (mutual TLS), `--tls-server-name NAME`, `--token-file FILE`
or `--token TOKEN` (each also from the environment: $CACHEGW_TLS, $CACHEGW_TLS_CA,
$CACHEGW_TLS_CERT, $CACHEGW_TLS_KEY, $CACHEGW_TLS_SERVER_NAME, $CACHEGW_TOKEN_FILE,
$CACHEGW_TOKEN; a flag wins over its variable). The token is never printed. Errors print
`cachegw: <message>` on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from cachegw._security import TLSConfig, TokenSource
from cachegw.client import DEFAULT_TARGET, Client
from cachegw.errors import CacheError
from cachegw.models import Entry

__all__ = ["main"]

TARGET_ENV = "CACHEGW_TARGET"
# Commands that belong to the gateway package: their flags go to its module's main().
_GATEWAY_COMMANDS = {
    "serve": "cachegw_gateway.main",
    "relay": "cachegw_gateway.relay_main",
    "token": "cachegw_gateway.token_main",
}
_COMMON_OPTIONS = (
    "--target",
    "--timeout",
    "--tls-ca",
    "--tls-cert",
    "--tls-key",
    "--tls-server-name",
    "--token",
    "--token-file",
)
_COMMON_FLAGS = ("--tls",)
# Option -> the environment variable read when it is not given.
SECURITY_ENV = {
    "tls": "CACHEGW_TLS",
    "tls_ca": "CACHEGW_TLS_CA",
    "tls_cert": "CACHEGW_TLS_CERT",
    "tls_key": "CACHEGW_TLS_KEY",
    "tls_server_name": "CACHEGW_TLS_SERVER_NAME",
    "token": "CACHEGW_TOKEN",
    "token_file": "CACHEGW_TOKEN_FILE",
}
_TRUE = ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = _gateway_command(args)
    if command is not None:
        return _serve(*command)
    parser = _parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help, or a usage error (argparse printed it)
        return exc.code if isinstance(exc.code, int) else 2
    target = getattr(ns, "target", None) or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    timeout: float = getattr(ns, "timeout", 5.0)
    try:
        tls, token = security(ns)
        client = Client(target, timeout=timeout if timeout > 0 else None, tls=tls, token=token)
    except (ValueError, TypeError) as exc:  # a TLS file or a token that cannot be used
        return _fail(str(exc), status=2)
    try:
        with client:
            return cast(int, ns.run(client, ns))
    except CacheError as exc:
        return _fail(f"{type(exc).__name__}: {exc}")
    except (OSError, ValueError) as exc:  # stdin, stdout, or the token file
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    # --target/--timeout are accepted on both levels; SUPPRESS keeps a subcommand's parser
    # from overwriting what was given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=argparse.SUPPRESS,
        help=f"gateway address (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="deadline of the call (default: 5; 0 = none)",
    )
    common.add_argument(
        "--tls",
        action="store_true",
        default=argparse.SUPPRESS,
        help="connect over TLS, trusting the system's CAs (implied by the other --tls-*)",
    )
    common.add_argument(
        "--tls-ca",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="PEM CA certificates that signed the gateway's certificate",
    )
    common.add_argument(
        "--tls-cert",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="this client's PEM certificate, for a gateway asking for one (mutual TLS)",
    )
    common.add_argument(
        "--tls-key", default=argparse.SUPPRESS, metavar="FILE", help="the --tls-cert's PEM key"
    )
    common.add_argument(
        "--tls-server-name",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="the name in the gateway's certificate, when not the target's host",
    )
    common.add_argument(
        "--token-file",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="a file holding the bearer token (read for each call)",
    )
    common.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="the bearer token (visible to other users in the process list: prefer "
        "$CACHEGW_TOKEN or --token-file)",
    )
    parser = argparse.ArgumentParser(
        prog="cachegw",
        description="cachegw cache gateway: serve, get/set/del keys, or watch gateways (top).",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Only for --help: `serve`, `relay` and `token` never reach argparse (_gateway_command).
    commands.add_parser(
        "serve", help="start a gateway (needs cachegw-gateway); `cachegw serve --help`"
    )
    commands.add_parser(
        "relay",
        help="carry invalidations between two regions (needs cachegw-gateway); "
        "`cachegw relay --help`",
    )
    commands.add_parser(
        "token",
        help="make a token and its tokens-file entry, or sign a JWT (needs cachegw-gateway); "
        "`cachegw token --help`",
    )

    get = commands.add_parser("get", parents=[common], help="print a key's value")
    get.add_argument("key")
    get.add_argument(
        "-v", "--verbose", action="store_true", help="also print status, tier, TTL, version"
    )
    get.set_defaults(run=_get)

    set_ = commands.add_parser("set", parents=[common], help="store a value")
    set_.add_argument("key")
    set_.add_argument("value", help='the value; "-" reads it from stdin')
    set_.add_argument("--ttl", type=float, metavar="SECONDS", help="default: the class TTL")
    set_.add_argument("--tag", action="append", default=[], dest="tags", help="a tag (repeatable)")
    set_.set_defaults(run=_set)

    delete = commands.add_parser("del", parents=[common], help="delete keys")
    delete.add_argument("keys", nargs="+", metavar="KEY")
    delete.set_defaults(run=_del)

    incr = commands.add_parser(
        "incr", parents=[common], help="add DELTA (default 1) to a counter, print its value"
    )
    incr.add_argument("key")
    incr.add_argument("delta", type=int, nargs="?", default=1, help="may be negative")
    incr.add_argument(
        "--ttl", type=float, metavar="SECONDS", help="of a counter this creates (default: class)"
    )
    incr.set_defaults(run=_incr)

    touch = commands.add_parser("touch", parents=[common], help="give a key a new TTL")
    touch.add_argument("key")
    touch.add_argument("--ttl", type=float, metavar="SECONDS", help="default: the class TTL")
    touch.set_defaults(run=_touch)

    allow = commands.add_parser(
        "allow", parents=[common], help="ask a rate limit; exit 1 when refused"
    )
    allow.add_argument("key")
    allow.add_argument("--rate", type=int, help="requests per period (default: the class's)")
    allow.add_argument("--period", type=float, metavar="SECONDS", help="with --rate")
    allow.add_argument("--burst", type=int, help="GCRA: requests at once (default: rate)")
    allow.add_argument("--cost", type=int, default=1, help="what this request costs")
    allow.add_argument(
        "--sliding", action="store_true", help="a sliding-window counter instead of GCRA"
    )
    allow.set_defaults(run=_allow)

    ttl = commands.add_parser("ttl", parents=[common], help="print a value's fresh seconds left")
    ttl.add_argument("key")
    ttl.set_defaults(run=_ttl)

    inv = commands.add_parser(
        "invalidate", parents=[common], help="remove keys by key, prefix, tag or class"
    )
    inv.add_argument("keys", nargs="*", metavar="KEY")
    inv.add_argument("--prefix", action="append", default=[], dest="prefixes")
    inv.add_argument("--tag", action="append", default=[], dest="tags")
    inv.add_argument("--class", action="append", default=[], dest="classes")
    inv.set_defaults(run=_invalidate)

    watch = commands.add_parser(
        "watch", parents=[common], help="print invalidation events as they happen"
    )
    watch.add_argument("--prefix", action="append", default=[], dest="prefixes")
    watch.add_argument("--class", action="append", default=[], dest="classes")
    watch.add_argument("--since", default="", help="replay events after this event id first")
    watch.add_argument("--count", type=int, default=0, help="stop after N events (0 = never)")
    watch.set_defaults(run=_watch)

    top = commands.add_parser(
        "top", parents=[common], help="live view of gateways: QPS, hit rate, p99, L1, Redis"
    )
    top.add_argument("targets", nargs="*", metavar="TARGET", help="gateways (default: --target)")
    top.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="default 2")
    top.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N frames (0 = never)"
    )
    top.add_argument("--keys", type=int, default=5, metavar="N", help="hot keys per gateway")
    top.set_defaults(run=_top)
    return parser


def _gateway_command(args: list[str]) -> tuple[str, list[str]] | None:
    """(module, its flags) if `args` is a serve or relay command, else None.

    Everything after `serve` belongs to the gateway, so argparse must not see it; only
    this command's own options may come first (and are of no use to serve).
    """
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _GATEWAY_COMMANDS:
            return _GATEWAY_COMMANDS[arg], args[i + 1 :]
        if arg in _COMMON_OPTIONS:
            i += 2
        elif arg in _COMMON_FLAGS or arg.split("=", 1)[0] in _COMMON_OPTIONS:
            i += 1
        else:
            return None
    return None


def _setting(ns: argparse.Namespace, name: str) -> str:
    value = getattr(ns, name, None)
    return str(value) if value is not None else os.environ.get(SECURITY_ENV[name], "")


def security(ns: argparse.Namespace) -> tuple[TLSConfig | None, TokenSource]:
    """The TLS settings and the token source of the options and the environment."""
    ca, cert, key = (_setting(ns, n) or None for n in ("tls_ca", "tls_cert", "tls_key"))
    server_name = _setting(ns, "tls_server_name") or None
    wanted = getattr(ns, "tls", False) or os.environ.get("CACHEGW_TLS", "").lower() in _TRUE
    tls = None
    if wanted or ca or cert or key or server_name:
        tls = TLSConfig(ca=ca, cert=cert, key=key, server_name=server_name)
    return tls, _token(ns)


def _token(ns: argparse.Namespace) -> TokenSource:
    """--token-file or --token, else $CACHEGW_TOKEN, else $CACHEGW_TOKEN_FILE."""
    flag, file_flag = getattr(ns, "token", None), getattr(ns, "token_file", None)
    if flag and file_flag:
        raise ValueError("give --token or --token-file, not both")
    if file_flag:
        return _token_file(file_flag)
    if flag:
        return str(flag)
    if os.environ.get(SECURITY_ENV["token"]):
        return os.environ[SECURITY_ENV["token"]]
    path = os.environ.get(SECURITY_ENV["token_file"])
    return _token_file(path) if path else None


def _token_file(path: str) -> Callable[[], str]:
    """A token source reading `path` for each call, so that a rotated token is used."""

    def read() -> str:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the token file {path}: {exc.strerror}") from None

    read()  # an unreadable file fails here, before any call
    return read


def _get(client: Client, ns: argparse.Namespace) -> int:
    entry = client.lookup(ns.key)
    if ns.verbose:
        print(_describe(entry), file=sys.stderr)
    if entry.value is None:
        print("miss", file=sys.stderr)
        return 1
    _write_stdout(entry.value)
    return 0


def _set(client: Client, ns: argparse.Namespace) -> int:
    # argv carries undecodable bytes as surrogates; fsencode gives the bytes back.
    value = sys.stdin.buffer.read() if ns.value == "-" else os.fsencode(ns.value)
    result = client.set(ns.key, value, ttl=ns.ttl, tags=ns.tags)
    if not result.stored:
        return _fail(f"not stored: {result.outcome.name}")
    print(f"stored version={result.version} ttl={result.ttl:g}s class={result.key_class}")
    return 0


def _del(client: Client, ns: argparse.Namespace) -> int:
    print(client.delete(*ns.keys))
    return 0


def _incr(client: Client, ns: argparse.Namespace) -> int:
    print(client.incr(ns.key, ns.delta, ttl=ns.ttl))
    return 0


def _touch(client: Client, ns: argparse.Namespace) -> int:
    if not client.touch(ns.key, ttl=ns.ttl):
        print("missing", file=sys.stderr)
        return 1
    print("touched")
    return 0


def _allow(client: Client, ns: argparse.Namespace) -> int:
    algorithm = "sliding_window" if ns.sliding else None
    result = client.allow(
        ns.key, rate=ns.rate, period=ns.period, burst=ns.burst, cost=ns.cost, algorithm=algorithm
    )
    word = "allowed" if result.allowed else "refused"
    print(
        f"{word} remaining={result.remaining} retry-after={result.retry_after:g}s "
        f"reset-after={result.reset_after:g}s"
    )
    return 0 if result.allowed else 1


def _ttl(client: Client, ns: argparse.Namespace) -> int:
    left = client.ttl(ns.key)
    if left is None:
        print("missing", file=sys.stderr)
        return 1
    print(f"{left:g}")
    return 0


def _invalidate(client: Client, ns: argparse.Namespace) -> int:
    result = client.invalidate(ns.keys, prefixes=ns.prefixes, tags=ns.tags, classes=ns.classes)
    print(f"removed={result.removed} event={result.event_id}")
    return 0


def _watch(client: Client, ns: argparse.Namespace) -> int:
    events = client.subscribe(prefixes=ns.prefixes, classes=ns.classes, since=ns.since)
    for seen, event in enumerate(events, 1):
        parts = [event.id or "-", event.kind.name]
        for name in ("keys", "prefixes", "tags", "classes"):
            values = getattr(event, name)
            if values:
                parts.append(f"{name}={','.join(values)}")
        parts.append(f"origin={event.origin or '-'}")
        print(" ".join(parts), flush=True)
        if ns.count and seen >= ns.count:
            break
    return 0


def _top(client: Client, ns: argparse.Namespace) -> int:
    try:
        from cachegw import top
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] == "rich":
            return _fail("top needs rich: pip install 'cachegw[top]'", status=2)
        raise
    if ns.interval <= 0 or ns.count < 0 or ns.keys < 0:
        return _fail("--interval must be > 0, --count and --keys >= 0", status=2)
    return top.run(
        ns.targets or [client.target],
        interval=ns.interval,
        count=ns.count,
        timeout=client.timeout or 2.0,
        hot_keys=ns.keys,
        tls=client.tls,
        token=security(ns)[1],
    )


def _describe(entry: Entry) -> str:
    parts = [
        f"status={entry.status.name}",
        f"tier={entry.tier.name}",
        f"ttl={entry.ttl_remaining:g}s",
        f"version={entry.version}",
        f"class={entry.key_class or '-'}",
    ]
    if entry.lease_token:
        parts.append("lease=yes")
    return " ".join(parts)


def _write_stdout(value: bytes) -> None:
    out = sys.stdout
    buffer = getattr(out, "buffer", None)
    if buffer is None:  # a text-only stream put in place of stdout
        out.write(value.decode("utf-8", "backslashreplace"))
        return
    out.flush()
    buffer.write(value)
    if out.isatty():
        buffer.write(b"\n")
    buffer.flush()


def _serve(module_name: str, gateway_args: Sequence[str]) -> int:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name in ("cachegw_gateway", module_name):
            return _fail(
                "this command needs the gateway, which is not installed: "
                "pip install cachegw-gateway",
                status=2,
            )
        return _fail(f"cannot start the gateway: {exc}", status=2)
    gateway_main = cast(Callable[[Sequence[str] | None], int], module.main)
    return gateway_main(list(gateway_args))


def _fail(message: str, *, status: int = 1) -> int:
    print(f"cachegw: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
