"""Property tests on what turns request bytes into checked requests, without a server:
the lenient deserializers answer a message or a BadMessage for any bytes, and the
checks answer or raise InvalidRequest (ValueError for the id and token parsers), for
any value a message can hold, agreeing with a plain model of each rule."""

from __future__ import annotations

from typing import Any, cast

import pytest
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import events
from cachegw_gateway.config import MAX_RATE, MIN_EMISSION_INTERVAL_US, GatewayConfig
from cachegw_gateway.leases import TOKEN_SIZE, LeaseToken
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.ratelimit import GCRA, resolve
from cachegw_gateway.servicer import CacheServicer
from cachegw_gateway.validation import (
    BadMessage,
    InvalidRequest,
    check_key,
    check_keys,
    check_tags,
    check_ttl_ms,
    lenient_parser,
)
from tests.conftest import make_config
from tests.fuzz.harness import METHODS
from tests.fuzz.strategies import INT64, UINT64, edgy_text, messages, varint, wire_inputs

REQUESTS = sorted({m.input_type.full_name: m.input_type for m in METHODS.values()}.items())
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cls(name: str) -> type[Message]:
    return GetMessageClass(dict(REQUESTS)[name])


@pytest.mark.parametrize("name", [n for n, _ in REQUESTS])
@PROPS
@given(data=st.data())
def test_lenient_parser_answers_a_message_or_bad_message(name: str, data: st.DataObject) -> None:
    cls = _cls(name)
    raw = data.draw(wire_inputs(cls), label="raw")
    parsed = cast(Any, lenient_parser(cls))(raw)
    assert isinstance(parsed, cls | BadMessage)
    if isinstance(parsed, BadMessage):
        assert name in parsed.reason


@pytest.mark.parametrize("name", [n for n, _ in REQUESTS])
def test_deeply_nested_or_huge_inputs_are_bad_messages(name: str) -> None:
    cls = _cls(name)
    parse = cast(Any, lenient_parser(cls))
    group_99 = varint((99 << 3) | 3)  # start of a group: unknown field 99
    nested = group_99 * 10_000
    huge_length = varint((1 << 3) | 2) + varint(2**62) + b"x"
    too_long_varint = varint(1 << 3) + b"\xff" * 11
    for raw in (nested, huge_length, too_long_varint, b"\x00", b"\x07"):
        assert isinstance(parse(raw), BadMessage), raw


def _model_key_ok(key: str, limit: int) -> bool:
    return 0 < len(key.encode()) <= limit


@PROPS
@given(key=edgy_text(64), limit=st.sampled_from([1, 4, 16, 64, 512]))
def test_check_key_agrees_with_its_rule(key: str, limit: int) -> None:
    try:
        check_key(key, limit, "keys[3]")
    except InvalidRequest as exc:
        assert not _model_key_ok(key, limit)
        assert str(exc).startswith("keys[3] ")
    else:
        assert _model_key_ok(key, limit)


@PROPS
@given(keys=st.lists(edgy_text(16), max_size=20), limit=st.sampled_from([4, 16]))
def test_batch_checks_agree_with_their_rules(keys: list[str], limit: int) -> None:
    good = len(keys) <= 10 and all(_model_key_ok(k, limit) for k in keys)
    try:
        check_keys(keys, limit, 10)
    except InvalidRequest:
        assert not good
    else:
        assert good
    good_tags = len(keys) <= 32 and all(_model_key_ok(k, limit) for k in keys)
    try:
        check_tags(keys, limit)
    except InvalidRequest:
        assert not good_tags
    else:
        assert good_tags


@PROPS
@given(ttl=st.integers(*INT64), limit=st.sampled_from([1, 86_400_000]))
def test_check_ttl_ms_agrees_with_its_rule(ttl: int, limit: int) -> None:
    try:
        check_ttl_ms(ttl, limit, "entries[2].ttl_ms")
    except InvalidRequest as exc:
        assert not 0 < ttl <= limit
        assert "entries[2].ttl_ms" in str(exc)
    else:
        assert 0 < ttl <= limit


@PROPS
@given(text=st.one_of(edgy_text(), st.from_regex(r"[0-9]{1,22}-[0-9]{1,22}", fullmatch=True)))
def test_event_ids_parse_into_redis_stream_ids_or_value_error(text: str) -> None:
    try:
        ms, seq = events.parse_id(text)
    except ValueError:
        return
    assert 0 <= ms <= UINT64[1] and 0 <= seq <= UINT64[1]
    assert events.format_id((ms, seq)) == f"{int(text.split('-')[0])}-{int(text.split('-')[1])}"


@PROPS
@given(raw=st.one_of(st.binary(max_size=64), st.binary(min_size=TOKEN_SIZE, max_size=TOKEN_SIZE)))
def test_lease_tokens_parse_or_value_error(raw: bytes) -> None:
    try:
        token = LeaseToken.parse(raw)
    except ValueError:
        assert len(raw) != TOKEN_SIZE
    else:
        assert len(raw) == TOKEN_SIZE and token.generation >= 0 and token.granted_ms >= 0


LIMITED = """
[[classes]]
name = "limited"
patterns = ["rl:*"]
rate_limit = { rate = 5, period_seconds = 1 }
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> GatewayConfig:
    folder = tmp_path_factory.mktemp("parsers")
    return make_config(folder, "redis://127.0.0.1:1", LIMITED, server__max_key_bytes=64)


@pytest.fixture(scope="module")
def policy(config: GatewayConfig) -> PolicyTable:
    return PolicyTable.from_config(config)


@PROPS
@given(
    msg=messages(pb.AllowRequest, overrides={"key": st.sampled_from(["k", "rl:1"])}),
)
def test_allow_limits_resolve_to_what_the_scripts_can_run(
    policy: PolicyTable, msg: Message
) -> None:
    request = cast(pb.AllowRequest, msg)
    kc = policy.classify(request.key)
    given_limit = request.limit if request.HasField("limit") else None
    try:
        limit, cost = resolve(given_limit, kc, request.cost)
    except InvalidRequest:
        return
    assert 1 <= limit.rate <= MAX_RATE and 1 <= limit.period_ms <= 86_400_000
    assert 1 <= cost <= (limit.burst if limit.algorithm == GCRA else limit.rate)
    if limit.algorithm == GCRA:
        assert limit.period_ms * 1000 / limit.rate >= MIN_EMISSION_INTERVAL_US
        assert 1 <= limit.burst <= MAX_RATE


@PROPS
@given(msg=messages(pb.SetRequest, max_key_bytes=64), where=st.sampled_from(["", "entries[1]."]))
def test_set_requests_check_or_name_the_field(
    config: GatewayConfig, policy: PolicyTable, msg: Message, where: str
) -> None:
    # Only the checks run: no Cache or hub is needed before them.
    servicer = CacheServicer(cast(Any, None), policy, config.server, cast(Any, None))
    request = cast(pb.SetRequest, msg)
    try:
        item = servicer._set_item(request, where)
    except InvalidRequest as exc:
        assert str(exc).startswith(where), exc
        return
    assert _model_key_ok(item.key, 64) and item.key == request.key
    assert item.ttl_ms is None or 0 < item.ttl_ms <= config.server.max_ttl_seconds * 1000
