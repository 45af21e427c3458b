"""What TLS, mutual TLS and a bearer token cost an L1-hit Get, against plaintext.

Run:  .venv/bin/python benchmarks/bench_tls.py [--rounds 9] [--seconds 2]
                                                [--gateway-arg ARG ...]

Six `cachegw serve` processes on one managed redis-server, the same config: plaintext,
TLS (`--tls-cert/--tls-key`) and mutual TLS (`--tls-client-ca` too), each once without
auth and once with `--auth` and a tokens file (every call's token checked, and served
from the token's tenant space: tenancy.py); certificates made here (ECDSA P-256, as
tests/tlscerts.py makes them). One blocking `cachegw.Client` per case, its connection
made before the warm-up, asks `get()` of one L1-hot key of 100 B in a loop (one call in
flight: time per call). Cases, in interleaved rounds (the order rotates every round):

- plaintext; plaintext+token (auth on: the cost of the token check on the hit path);
- tls; tls+token; mtls (a client certificate too); mtls+token.

With `--call-credentials`, bare generated stubs over TLS too: no token, the token as
call metadata (what the clients do), and the token as gRPC call credentials (which grpc
Python runs on a new thread per call; these go to the TLS gateway without auth, which
does not look at the token: the cost of carrying it).

Aim (issue 12): an L1-hit Get with TLS and a token takes <= 1.2x the time of a plaintext
one, measured in the same run (medians of per-round ratios). The table also shows each
case's CPU per call (client and gateway added, from /proc) against plaintext's: on a
machine shared with other work the times move with the scheduling, the CPU much less.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc

from benchmarks.harness import (
    Aim,
    Budget,
    Case,
    Sample,
    ServerProcess,
    check_aims,
    measure_sync,
    median,
    render_table,
    run_interleaved,
)
from cachegw import Client, TLSConfig
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from tests.tlscerts import CA

KEY = "bench:tls"
VALUE = b"v" * 100
CONFIG = """
[default_class]
ttl_seconds = 3600
l1_ttl_seconds = 3600
"""
TOKEN = "cgw_bench-token-0123456789abcdef0123456789abcdef"
TOKENS = f"""
[[tokens]]
name = "bench"
hash = "sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}"
tenant = "bench"
permissions = ["all"]
"""
AIMS = [
    Aim("tls+token", "time per L1-hit Get, TLS + checked token / plaintext", "<=", 1.2),
]


def start_gateway(
    stack: ExitStack,
    name: str,
    redis_url: str,
    work: Path,
    flags: list[str],
    credentials: grpc.ChannelCredentials | None,
) -> ServerProcess:
    address = f"127.0.0.1:{free_port()}"
    config = work / "gateway.toml"
    config.write_text(CONFIG)
    argv = [
        str(Path(sys.executable).parent / "cachegw"), "serve", "--listen", address,
        "--redis-url", redis_url, "--config", str(config), "--gateway-id", name,
        "--log-level", "WARNING", *flags,
    ]  # fmt: skip
    process = ServerProcess(name, argv, address, work / f"{name}.log", credentials=credentials)
    return stack.enter_context(process)


def main(args: argparse.Namespace) -> int:
    budget = Budget(seconds=args.seconds, warmup_seconds=0.5)
    token = TOKEN
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ca = CA()
        cert, key = ca.server().write(work, "server")
        ca_file = work / "ca.crt"
        ca_file.write_bytes(ca.pem)
        client_cert, client_key = ca.client("bench").write(work, "client")
        tls = TLSConfig(ca=ca_file)
        mtls = TLSConfig(ca=ca_file, cert=client_cert, key=client_key)
        tls_flags = ["--tls-cert", str(cert), "--tls-key", str(key)]
        extra = list(args.gateway_arg)
        tokens = work / "tokens.toml"
        tokens.write_text(TOKENS)
        auth = ["--auth", "--tokens-file", str(tokens)]
        redis = stack.enter_context(ManagedRedis())
        server_only = grpc.ssl_channel_credentials(ca.pem)
        mutual = grpc.ssl_channel_credentials(
            ca.pem, client_key.read_bytes(), client_cert.read_bytes()
        )
        mtls_flags = [*tls_flags, "--tls-client-ca", str(ca_file)]
        gateways = {
            name: start_gateway(stack, name, redis.url, work, [*flags, *extra], creds)
            for name, flags, creds in [
                ("plaintext", [], None),
                ("plaintext-auth", auth, None),
                ("tls", tls_flags, server_only),
                ("tls-auth", [*tls_flags, *auth], server_only),
                ("mtls", mtls_flags, mutual),
                ("mtls-auth", [*mtls_flags, *auth], mutual),
            ]
        }
        tls_gw = gateways["tls"]

        def client(gw: ServerProcess, settings: TLSConfig | None, with_token: bool) -> Client:
            made = Client(gw.address, tls=settings, token=token if with_token else None)
            stack.callback(made.close)
            made.set(KEY, VALUE)
            for _ in range(3):  # into the gateway's L1
                assert made.get(KEY) == VALUE
            return made

        def case(name: str, c: Client, pid: int) -> Case:
            get: Callable[[], object] = lambda: c.get(KEY)  # noqa: E731
            return Case(name, lambda: measure_sync(get, budget, server_pid=pid))

        def raw(
            name: str,
            credentials: grpc.ChannelCredentials,
            metadata: tuple[tuple[str, str], ...] | None = None,
        ) -> Case:
            """A bare generated stub on a channel with these credentials (no Client)."""
            channel = grpc.secure_channel(tls_gw.address, credentials)
            stack.callback(channel.close)
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            request = pb.GetRequest(key=KEY)
            assert stub.Get(request, timeout=5).value == VALUE
            get: Callable[[], object] = lambda: stub.Get(  # noqa: E731
                request, timeout=5, metadata=metadata
            )
            return Case(name, lambda: measure_sync(get, budget, server_pid=tls_gw.pid))

        def on(gw: str, settings: TLSConfig | None, with_token: bool) -> Case:
            name = gw.replace("-auth", "+token")
            return case(name, client(gateways[gw], settings, with_token), gateways[gw].pid)

        cases = [
            on("plaintext", None, False),
            on("plaintext-auth", None, True),
            on("tls", tls, False),
            on("tls-auth", tls, True),
            on("mtls", mtls, False),
            on("mtls-auth", mtls, True),
        ]
        if args.call_credentials:  # why the clients send the token as plain metadata
            call_creds = grpc.access_token_call_credentials(token)
            cases += [
                raw("stub tls", server_only),
                raw(
                    "stub tls+metadata",
                    server_only,
                    (("authorization", f"Bearer {token}"),),
                ),
                raw(
                    "stub tls+call-creds",
                    grpc.composite_channel_credentials(server_only, call_creds),
                ),
            ]

        def progress(r: int, c: Case, s: Sample) -> None:
            print(
                f"round {r + 1} {c.name}: {1e6 / s.ops_per_s:.0f} us/call "
                f"(p99 {s.latency_us(99):.0f} us)",
                flush=True,
            )

        results = run_interleaved(cases, args.rounds, progress, rotate=True)

    def cpu(x: Sample) -> float:
        return x.client_cpu_us_per_op + x.server_cpu_us_per_op

    def cpu_ratio(name: str) -> float:
        pairs = zip(results.samples[name], results.samples["plaintext"], strict=True)
        return median([cpu(a) / cpu(b) for a, b in pairs])

    rows = []
    for c in cases:
        summary = results.summary(c.name)
        ratio = results.ratio("plaintext", c.name)  # time ratio: plaintext calls/s over its
        rows.append(
            [
                c.name,
                f"{1e6 / summary.ops_per_s:.0f}",
                f"{summary.p50_us:.0f}",
                f"{summary.p99_us:.0f}",
                f"{summary.client_cpu_us_per_op:.0f}",
                f"{summary.server_cpu_us_per_op:.0f}",
                f"{ratio:.2f}x",
                results.spread("plaintext", c.name) if c.name != "plaintext" else "",
                f"{cpu_ratio(c.name):.2f}x",
            ]
        )
    print()
    print(
        f"L1-hit Get of 100 B, blocking Client, one call in flight, {args.rounds} interleaved "
        f"rounds of {args.seconds:g} s; +token: a gateway with auth on checks it (tenant "
        "space); client and gateways share this machine's cores"
    )
    print(
        render_table(
            [
                "case",
                "us/call",
                "p50 us",
                "p99 us",
                "client CPU us",
                "gateway CPU us",
                "time / plaintext",
                "per round",
                "CPU / plaintext",
            ],
            rows,
            right="lrrrrrrlr",
        )
    )
    ok = check_aims(AIMS, {"tls+token": results.ratio("plaintext", "tls+token")})
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--call-credentials",
        action="store_true",
        help="also time bare stubs over TLS: no token, the token as metadata, the token "
        "as gRPC call credentials",
    )
    parser.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="a flag for every gateway, e.g. --gateway-arg=--config=auth.toml (repeatable)",
    )
    sys.exit(main(parser.parse_args()))
