"""The `cachegw` command, run through `main(argv)` against the gateway double."""

from __future__ import annotations

import io
import sys
import types
from collections.abc import Sequence

import grpc
import pytest

from cachegw import cli
from tests.client.conftest import Gateway


def test_set_get_del(fake_gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", fake_gateway.target]
    assert cli.main([*target, "set", "greeting", "hello", "--ttl", "60", "--tag", "t"]) == 0
    assert capsys.readouterr().out == "stored version=1 ttl=60s class=default\n"
    stored = fake_gateway.servicer.store["greeting"]
    assert (stored.value, stored.ttl_ms, stored.tags) == (b"hello", 60_000, ["t"])

    assert cli.main(["get", "greeting", *target]) == 0  # options after the subcommand too
    assert capsys.readouterr() == ("hello", "")

    assert cli.main(["del", "greeting", "other", *target]) == 0
    assert capsys.readouterr().out == "1\n"


def test_get_miss(fake_gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", fake_gateway.target, "get", "nothing"]) == 1
    assert capsys.readouterr() == ("", "miss\n")


def test_get_verbose(fake_gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    fake_gateway.servicer.store.clear()
    assert cli.main(["--target", fake_gateway.target, "set", "k", "v", "--ttl", "1.5"]) == 0
    capsys.readouterr()
    assert cli.main(["--target", fake_gateway.target, "get", "--verbose", "k"]) == 0
    out, err = capsys.readouterr()
    assert out == "v"
    assert err == "status=HIT tier=L1 ttl=1.5s version=1 class=default\n"


def test_newline_only_on_a_tty(
    fake_gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["--target", fake_gateway.target, "set", "k", "v"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli.main(["--target", fake_gateway.target, "get", "k"]) == 0
    assert capsys.readouterr().out == "v\n"


def test_binary_value_from_stdin(
    fake_gateway: Gateway,
    capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = b"\x00\xff\xfe binary\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    assert cli.main(["--target", fake_gateway.target, "set", "bin", "-"]) == 0
    assert fake_gateway.servicer.store["bin"].value == raw
    capsysbinary.readouterr()
    assert cli.main(["--target", fake_gateway.target, "get", "bin"]) == 0
    assert capsysbinary.readouterr().out == raw


def test_target_from_the_environment(
    fake_gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.TARGET_ENV, fake_gateway.target)
    assert cli.main(["del", "k"]) == 0
    assert capsys.readouterr().out == "0\n"


def test_server_error_is_one_line(
    fake_gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    details = "key must be at most 512 bytes (got 600)"
    fake_gateway.servicer.failure = (grpc.StatusCode.INVALID_ARGUMENT, details)
    assert cli.main(["--target", fake_gateway.target, "get", "k" * 600]) == 1
    assert capsys.readouterr() == ("", f"cachegw: InvalidArgument: {details}\n")

    fake_gateway.servicer.failure = (grpc.StatusCode.INTERNAL, "boom")
    assert cli.main(["--target", fake_gateway.target, "del", "k"]) == 1
    assert capsys.readouterr().err == "cachegw: CacheError: INTERNAL: boom\n"


def test_local_check_error(fake_gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", fake_gateway.target, "set", "k", "v", "--ttl", "-1"]) == 1
    assert capsys.readouterr().err.startswith("cachegw: InvalidArgument: ttl must be a positive")
    assert fake_gateway.servicer.requests == []


def test_timeout(fake_gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    fake_gateway.servicer.delay = 5.0
    assert cli.main(["--target", fake_gateway.target, "--timeout", "0.2", "get", "k"]) == 1
    assert capsys.readouterr().err.startswith("cachegw: DeadlineExceeded: ")


def test_unreachable_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", "127.0.0.1:1", "get", "k"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("cachegw: Unavailable: ")
    assert "Traceback" not in err


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: cachegw" in capsys.readouterr().err
    assert cli.main(["get"]) == 2
    assert cli.main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out


def test_serve_passes_its_flags_to_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Sequence[str] | None] = []

    def gateway_main(argv: Sequence[str] | None = None) -> int:
        seen.append(argv)
        return 7

    module = types.ModuleType("cachegw_gateway.main")
    module.main = gateway_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cachegw_gateway.main", module)
    assert cli.main(["serve", "--listen", "127.0.0.1:0", "--help"]) == 7
    assert cli.main(["--target", "ignored:1", "serve", "--grace", "1"]) == 7
    assert cli.main(["--timeout=3", "serve"]) == 7
    assert seen == [["--listen", "127.0.0.1:0", "--help"], ["--grace", "1"], []]


def test_serve_without_the_gateway_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "cachegw_gateway", None)
    monkeypatch.delitem(sys.modules, "cachegw_gateway.main", raising=False)
    assert cli.main(["serve", "--listen", "127.0.0.1:0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("cachegw: ")
    assert "pip install cachegw-gateway" in err


def test_serve_with_a_dependency_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def import_module(name: str, package: str | None = None) -> types.ModuleType:
        raise ModuleNotFoundError("No module named 'redis'", name="redis")

    monkeypatch.setattr("importlib.import_module", import_module)
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == (
        "cachegw: cannot start the gateway: No module named 'redis'\n"
    )
