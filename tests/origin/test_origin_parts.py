"""The pieces under read- and write-through, each on its own: the configuration's
checks, the tombstone envelope, and the Python base class for origins over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest

from cachegw.origin import Found, Origin, OriginUnavailable, Refused, StoreAnswer, Stored, Write
from cachegw.v1 import origin_pb2 as opb
from cachegw.v1 import origin_pb2_grpc
from cachegw_gateway import envelope
from cachegw_gateway.config import ConfigError, config_warnings, load_config


def load(tmp_path: Path, body: str) -> object:
    path = tmp_path / "c.toml"
    path.write_text(f'[[classes]]\nname = "c"\npatterns = ["c:*"]\n{body}\n')
    return load_config(path, env={})


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('read_policy = "read-through"', "classes[0].origin is required with read_policy"),
        ('write_policy = "through"', "classes[0].origin is required with"),
        ('read_policy = "readthrough"\norigin = "h:1"', "must be 'cache-aside'"),
        ('write_policy = "ahead"\norigin = "h:1"', "must be 'around'"),
        ('origin = "127.0.0.1:0"\nread_policy = "read-through"', "origin must name an origin's"),
        ('origin = "nohost"\nread_policy = "read-through"', "must be host:port"),
        (
            'origin = "h:1"\nwrite_policy = "through"',
            "'through' needs read_policy = 'read-through'",
        ),
        ("negative_ttl_seconds = 5", "negative_ttl_seconds needs read_policy"),
        (
            'origin = "h:1"\nread_policy = "read-through"\nnegative_ttl_seconds = -1',
            "negative_ttl_seconds must be in [0",
        ),
    ],
)
def test_origin_settings_are_checked_with_a_clear_message(
    tmp_path: Path, body: str, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, body)
    assert says in str(err.value) and "c.toml" in str(err.value)


def test_origin_table_and_warnings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        """
[origin]
timeout_seconds = 5
max_in_flight = 4
[origin.breaker]
failures = 2

[[classes]]
name = "rt"
patterns = ["rt:*"]
origin = "127.0.0.1:7000"
read_policy = "read-through"

[[classes]]
name = "idle"
patterns = ["idle:*"]
origin = "127.0.0.1:7001"
"""
    )
    config = load_config(path, env={})
    assert (config.origin.timeout_seconds, config.origin.max_in_flight) == (5.0, 4)
    assert config.origin.breaker.failures == 2
    warnings = "\n".join(config_warnings(config))
    assert "origin.timeout_seconds (5) is not below lease_timeout_seconds (3)" in warnings
    assert "origin '127.0.0.1:7001' is not used" in warnings
    with pytest.raises(ConfigError, match=r"origin\.max_in_flight must be > 0"):
        load_config(path, env={}, overrides={"origin.max_in_flight": "0"})


def test_a_tombstone_is_format_3_and_every_other_entry_stays_format_2() -> None:
    plain = envelope.encode(b"v", version=3, created_ms=5, generation=1, tags=["t"])
    assert plain[1] == envelope.FORMAT_VERSION == 2
    assert envelope.decode(plain).flags == 0
    tomb = envelope.encode(b"", version=9, created_ms=5, generation=1, flags=envelope.NOT_FOUND)
    assert tomb[1] == envelope.FLAGGED_FORMAT == 3
    env = envelope.decode(tomb)
    assert env.not_found and (env.version, env.generation, env.value) == (9, 1, b"")
    # The Set script writes marker, format and version in front of the tail.
    tail = envelope.encode_tail(b"", created_ms=5, generation=1, flags=envelope.NOT_FOUND)
    assert tomb[envelope.PREFIX_SIZE :] == tail
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode(tomb[: envelope.HEADER_SIZE])  # no flags byte


class Books(Origin):
    """A dict as the data; keys starting with 'bad' make it misbehave."""

    def __init__(self) -> None:
        super().__init__()
        self.data = {"book:1": b"dune"}

    async def load(self, keys: Sequence[str]) -> Mapping[str, Found | None]:
        if "down" in keys:
            raise OriginUnavailable("the shelf is locked")
        if "bad:type" in keys:
            return {"bad:type": b"raw bytes"}  # type: ignore[dict-item]
        if "bad:version" in keys:
            return {"bad:version": Found(b"x", version=-1)}
        return {
            k: Found(self.data[k], version=4, ttl=2.5, tags=["t"]) for k in keys if k in self.data
        }

    async def store(self, entries: Sequence[Write]) -> Sequence[StoreAnswer]:
        return [Refused("read-only shelf") if e.key == "ro" else Stored(5) for e in entries]


@pytest.fixture
async def books() -> AsyncIterator[origin_pb2_grpc.OriginAsyncStub]:
    origin = Books()
    port = await origin.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield origin_pb2_grpc.OriginStub(channel)
    finally:
        await channel.close(None)
        await origin.stop(0)


async def test_the_base_class_answers_per_key_in_order(
    books: origin_pb2_grpc.OriginAsyncStub,
) -> None:
    got = await books.Load(opb.LoadRequest(keys=["nope", "book:1"]))
    assert [(r.key, r.status) for r in got.results] == [
        ("nope", opb.LOAD_STATUS_NOT_FOUND),
        ("book:1", opb.LOAD_STATUS_FOUND),
    ]
    found = got.results[1]
    assert (found.value, found.version, found.ttl_ms, list(found.tags)) == (b"dune", 4, 2500, ["t"])
    stored = await books.Store(
        opb.StoreRequest(entries=[opb.StoreEntry(key="a", value=b"1"), opb.StoreEntry(key="ro")])
    )
    assert [(r.outcome, r.version, r.message) for r in stored.results] == [
        (opb.STORE_OUTCOME_STORED, 5, ""),
        (opb.STORE_OUTCOME_REFUSED, 0, "read-only shelf"),
    ]


@pytest.mark.parametrize(
    ("call", "code", "says"),
    [
        ("down", grpc.StatusCode.UNAVAILABLE, "the shelf is locked"),
        ("bad:type", grpc.StatusCode.INTERNAL, "must be a Found"),
        ("bad:version", grpc.StatusCode.INTERNAL, "version must be an int in [0, 2^53)"),
        ("remove", grpc.StatusCode.UNIMPLEMENTED, "does not implement Remove"),
    ],
)
async def test_the_base_class_turns_failures_into_statuses(
    books: origin_pb2_grpc.OriginAsyncStub, call: str, code: grpc.StatusCode, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if call == "remove":
            await books.Remove(opb.RemoveRequest(keys=["x"]))
        else:
            await books.Load(opb.LoadRequest(keys=[call]))
    assert err.value.code() == code
    assert says in (err.value.details() or "")
