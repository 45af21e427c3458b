"""gRPC unary calls driven by h2load (nghttp2's HTTP/2 load generator, written in C).

A Python client on the same two cores as the server takes much of the CPU a Python
server needs, so a Python-driven benchmark shows the pair, not the server. h2load sends
the same request over and over with very little CPU: what it measures is the server's
own ceiling. A gRPC unary call is an HTTP/2 POST to `/<service>/<method>` with headers
`content-type: application/grpc` and `te: trailers` and a length-prefixed body (1 byte
compressed flag 0, 4-byte big-endian length, the serialized request).

h2load counts HTTP statuses, not gRPC ones (grpc-status travels in the trailers), so a
run is checked three ways: every request succeeded with a 2xx; the DATA bytes received
are exactly requests x the framed answer's length (an error answer has no message, a
different answer another length); and before the run one call with the same body
through `nghttp` (same package) shows `grpc-status: 0` and the expected answer.

Debian/Ubuntu: `apt-get install nghttp2-client` (`make bench` installs it as root).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import process_cpu_seconds

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
INSTALL_HINT = (
    "h2load not found: it is in Debian's nghttp2-client package "
    "(apt-get install nghttp2-client; `make bench` installs it when run as root)"
)


class H2LoadMissing(RuntimeError):
    pass


class H2LoadFailed(RuntimeError):
    pass


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def h2load_binary() -> str:
    exe = shutil.which("h2load")
    if exe is None:
        raise H2LoadMissing(INSTALL_HINT)
    return exe


def h2load_version() -> str:
    out = subprocess.run(
        [h2load_binary(), "--version"], capture_output=True, text=True, timeout=10
    ).stdout
    return out.strip() or "?"


@dataclass(frozen=True, slots=True)
class H2Run:
    """One h2load run: counts, wall time, and the server's CPU over the run."""

    requests: int
    succeeded: int
    status_2xx: int
    data_bytes: int
    seconds: float
    server_cpu_s: float

    @property
    def calls_per_s(self) -> float:
        return self.succeeded / self.seconds if self.seconds > 0 else math.nan


_FINISHED = re.compile(r"finished in ([\d.]+)(ms|s),")
_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded")
_CODES = re.compile(r"status codes: (\d+) 2xx")
_DATA = re.compile(r"traffic: .*?, .*?headers.*?, [\d.]+\w*B \((\d+)\) data")


def parse_output(out: str) -> tuple[int, int, int, int, float]:
    """(requests, succeeded, 2xx, data bytes, seconds) from h2load's summary."""
    finished = _FINISHED.search(out)
    requests = _REQUESTS.search(out)
    codes = _CODES.search(out)
    data = _DATA.search(out)
    if not (finished and requests and codes and data):
        raise H2LoadFailed(f"cannot read h2load's summary:\n{out[-2000:]}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return (
        int(requests.group(1)),
        int(requests.group(2)),
        int(codes.group(1)),
        int(data.group(1)),
        seconds,
    )


def run_h2load(
    address: str,
    path: str,
    body: Path,
    requests: int,
    clients: int,
    streams: int,
    server_pid: int | None = None,
    timeout: float = 120.0,
) -> H2Run:
    """`requests` calls of `path` with `body` over `clients` connections x `streams`."""
    argv = [h2load_binary(), "-n", str(requests), "-c", str(clients), "-m", str(streams),
            "-t", "1", "-d", str(body)]  # fmt: skip
    for header in GRPC_HEADERS:
        argv += ["-H", header]
    argv.append(f"http://{address}{path}")
    cpu0 = process_cpu_seconds(server_pid) if server_pid is not None else math.nan
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    cpu1 = process_cpu_seconds(server_pid) if server_pid is not None else math.nan
    if proc.returncode != 0:
        raise H2LoadFailed(f"h2load exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    total, ok, c2xx, data, seconds = parse_output(proc.stdout)
    return H2Run(total, ok, c2xx, data, seconds, cpu1 - cpu0)


def check_run(run: H2Run, framed_answer_len: int, where: str) -> None:
    """Every request answered 2xx with exactly one whole answer of the expected size."""
    expected = run.requests * framed_answer_len
    if run.succeeded != run.requests or run.status_2xx != run.requests:
        raise H2LoadFailed(
            f"{where}: {run.succeeded} of {run.requests} succeeded, {run.status_2xx} 2xx"
        )
    if run.data_bytes != expected:
        raise H2LoadFailed(
            f"{where}: {run.data_bytes} DATA bytes for {run.requests} calls, expected "
            f"{expected} ({framed_answer_len} each): some answers were not the expected one"
        )


def nghttp_call(address: str, path: str, body: Path, timeout: float = 10.0) -> tuple[str, bytes]:
    """One call with `body` through nghttp: (grpc-status, the answer's message bytes).

    Raises H2LoadMissing when nghttp is not installed (it ships with h2load)."""
    exe = shutil.which("nghttp")
    if exe is None:
        raise H2LoadMissing("nghttp not found (Debian's nghttp2-client package)")
    argv = [exe, "-d", str(body)]
    for header in GRPC_HEADERS:
        argv += ["-H", header]
    argv.append(f"http://{address}{path}")
    verbose = subprocess.run([*argv[:1], "-nv", *argv[1:]], capture_output=True, timeout=timeout)
    status = re.search(rb"grpc-status: (\d+)", verbose.stdout)
    answer = subprocess.run(argv, capture_output=True, timeout=timeout).stdout
    if len(answer) < 5 or answer[0] != 0:
        raise H2LoadFailed(f"nghttp: no gRPC message in the answer ({answer[:40]!r})")
    length = int.from_bytes(answer[1:5], "big")
    message = answer[5 : 5 + length]
    if len(message) != length:
        raise H2LoadFailed("nghttp: truncated gRPC message")
    return (status.group(1).decode() if status else "missing"), message
