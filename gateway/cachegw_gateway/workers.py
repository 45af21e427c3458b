"""The worker side of `cachegw serve --workers N` (the supervisor is supervisor.py).

A worker is a whole gateway in a fresh interpreter (its own L1, coalescer, invalidation
subscription and Subscribe streams), started by the supervisor as
``python -m cachegw_gateway.main <the user's flags> --listen host:PORT ...`` with
``CACHEGW_WORKER=<index>/<count>/<fd>/<status>`` in its environment. It binds the
supervisor's port with SO_REUSEPORT (the kernel spreads new connections over the
workers), writes one JSON line to the inherited pipe `fd` once it serves (its pid, port
and private metrics address), adds the summaries of every worker that the supervisor
serves at `status` (host:port, worker_status.py) to its Stats answers, and drains and
exits when its supervisor is gone: Linux delivers SIGTERM then (PR_SET_PDEATHSIG, set by
the supervisor between fork and exec), and `watch_parent` notices a changed parent
elsewhere.

Nothing here imports gRPC: the supervisor imports this module too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

WORKER_ENV = "CACHEGW_WORKER"
PARENT_POLL_SECONDS = 1.0


class WorkersError(ValueError):
    """A worker count that cannot be used."""


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Which worker this process is: `index` of `count` (0-based), where it reports, and
    where the supervisor tells every worker's figures (empty: nowhere)."""

    index: int
    count: int
    status_fd: int = -1
    status_address: str = ""

    def env_value(self) -> str:
        return f"{self.index}/{self.count}/{self.status_fd}/{self.status_address}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSlot | None:
        """This process's slot when a supervisor started it, else None."""
        value = (os.environ if environ is None else environ).get(WORKER_ENV, "")
        if not value:
            return None
        parts = value.split("/")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            index, count, fd = (int(part) for part in parts[:3])
        except ValueError:
            raise WorkersError(
                f"{WORKER_ENV} must be index/count/fd[/status host:port] (got {value!r})"
            ) from None
        if not 0 <= index < count:
            raise WorkersError(f"{WORKER_ENV}: index {index} is not below count {count}")
        return cls(index, count, fd, parts[3] if len(parts) == 4 else "")

    def gateway_id(self, base: str) -> str:
        return f"{base}-w{self.index}"


def cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_count(workers: int | str) -> int:
    """`server.workers` as a number: "auto" is one per core."""
    if workers == "auto":
        return cores()
    if isinstance(workers, int) and workers >= 1:
        return workers
    raise WorkersError(f"server.workers must be a positive integer or 'auto' (got {workers!r})")


def report_ready(slot: WorkerSlot, *, port: int, metrics: str | None) -> None:
    """Tell the supervisor this worker serves (one JSON line on the status pipe)."""
    if slot.status_fd < 0:
        return
    line = json.dumps({"pid": os.getpid(), "port": port, "metrics": metrics}) + "\n"
    with contextlib.suppress(OSError):  # the supervisor is gone: watch_parent stops us
        os.write(slot.status_fd, line.encode())


async def watch_parent(on_gone: Callable[[], None], poll: float = PARENT_POLL_SECONDS) -> None:
    """Call `on_gone()` once the process that started this one has exited (its children
    are then re-parented). Runs until cancelled."""
    parent = os.getppid()
    while os.getppid() == parent:  # noqa: ASYNC110 - nothing to wait on but the clock
        await asyncio.sleep(poll)
    on_gone()
