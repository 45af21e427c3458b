"""A throwaway PostgreSQL cluster, started the way the managed Redis is: for the origin
tests and benchmarks and the shop example (examples/shop) when no DSN is given. initdb into a
temporary folder, `postgres` on a free loopback port (no Unix socket outside that folder,
fsync off), stopped and removed when done.

The binaries come from PATH or Debian's /usr/lib/postgresql/<version>/bin (`make setup`
installs them). PostgreSQL refuses to run as root: as root, the folder is handed to the
`postgres` system user (Debian's package creates it) and both programs run as that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from cachegw_gateway.managed_redis import free_port

USER = "cachegw"  # the cluster's superuser (trust authentication, loopback only)


class PostgresNotFound(RuntimeError):
    pass


def find_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    raise PostgresNotFound(
        f"{name} not found on PATH or in /usr/lib/postgresql/*/bin: run `make setup` "
        "(Debian/Ubuntu: apt-get install postgresql)"
    )


class ManagedPostgres:
    """``with ManagedPostgres() as pg: pg.dsn`` (database ``postgres``, user ``cachegw``)."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        """`settings`: more ``-c name=value`` server settings, e.g.
        ``{"shared_preload_libraries": "pg_stat_statements"}``."""
        self.settings = dict(settings or {})
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._user: pwd.struct_passwd | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    @property
    def _uid(self) -> int | None:
        return None if self._user is None else self._user.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self._user is None else self._user.pw_gid

    @property
    def _groups(self) -> list[int] | None:
        return None if self._user is None else []

    def start(self, timeout: float = 30.0) -> ManagedPostgres:
        initdb, postgres = find_bin("initdb"), find_bin("postgres")
        folder = Path(tempfile.mkdtemp(prefix="cachegw-pg-"))
        self._dir = folder
        if os.getuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresNotFound(
                    "running as root, and PostgreSQL will not: no `postgres` user to run it as "
                    "(Debian's postgresql package creates one)"
                ) from None
            os.chown(folder, self._user.pw_uid, self._user.pw_gid)
            folder.chmod(0o700)
        data = folder / "data"
        log = folder / "postgres.log"
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        subprocess.run(
            [initdb, "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            timeout=timeout,
            user=self._uid,
            group=self._gid,
            extra_groups=self._groups,
        )
        for _ in range(5):
            self.port = free_port()
            with open(log, "ab") as out:
                self._proc = subprocess.Popen(
                    [
                        postgres,
                        "-D",
                        str(data),
                        "-p",
                        str(self.port),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        f"unix_socket_directories={folder}",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=200",
                        *(a for k, v in self.settings.items() for a in ("-c", f"{k}={v}")),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    user=self._uid,
                    group=self._gid,
                    extra_groups=self._groups,
                )
            if self._wait_ready(timeout):
                return self
            self._kill()
        raise RuntimeError(f"postgres did not start: {log.read_text(errors='replace')[-2000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False  # the port was taken, or worse: the caller reads the log
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            # Accepting connections is not yet accepting logins: ask for real.
            if self._select_one():
                return True
            time.sleep(0.05)
        return False

    def _select_one(self) -> bool:
        psql = shutil.which("psql") or find_bin("psql")
        done = subprocess.run(
            [
                psql,
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                USER,
                "-d",
                "postgres",
                "-tAc",
                "SELECT 1",
            ],
            capture_output=True,
            timeout=5,
        )
        return done.returncode == 0

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        self._kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ManagedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
