"""redis.url parsing: the Sentinel form, its mistakes, and credentials kept out of messages."""

from __future__ import annotations

import pytest

from cachegw_gateway.redis_url import RedisTarget, RedisUrlError, parse, redact, without_credentials


@pytest.mark.parametrize(
    ("url", "tls"),
    [
        ("redis://127.0.0.1:6379/0", False),
        ("rediss://u:p@cache:6380/1", True),
        ("unix:///run/redis.sock", False),
    ],
)
def test_standalone_urls_are_passed_through(url: str, tls: bool) -> None:
    target = parse(url)
    assert (target.kind, target.url, target.tls) == ("standalone", url, tls)


def test_a_full_sentinel_url() -> None:
    t = parse("redis+sentinel://app:s%3Acret@10.0.0.1:26379,[::1]:26380,s3/orders.v1?db=5")
    assert t == RedisTarget(
        "sentinel",
        t.url,
        hosts=(("10.0.0.1", 26379), ("::1", 26380), ("s3", 26379)),
        service="orders.v1",
        db=5,
        username="app",
        password="s:cret",
    )
    assert "s:cret" not in repr(t) and "cret" not in t.redacted


def test_a_cluster_url_names_its_seeds() -> None:
    t = parse("redis+cluster://app:s%40cret@10.0.0.1:7000,[::1]:7001")
    assert t.kind == "cluster"
    assert t.hosts == (("10.0.0.1", 7000), ("::1", 7001))
    assert (t.username, t.password) == ("app", "s@cret")
    with pytest.raises(RedisUrlError, match="not a valid Cluster URL") as info:
        parse("redis+cluster://app:s%40cret@10.0.0.1:7000/0")
    assert "cret" not in str(info.value)


def test_a_password_without_a_user_and_the_defaults() -> None:
    t = parse("redis+sentinel://:pw@127.0.0.1:5000/svc")
    assert (t.username, t.password, t.db, t.tls) == (None, "pw", 0, False)
    assert t.hosts == (("127.0.0.1", 5000),)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://127.0.0.1:26379", "no SERVICE"),
        ("redis+sentinel://127.0.0.1:26379/", "no SERVICE"),
        ("redis+sentinel:///svc", "empty entry"),
        ("redis+sentinel://a:1,,b:2/svc", "empty entry"),
        ("redis+sentinel://a:0/svc", "1..65535"),
        ("redis+sentinel://a:70000/svc", "1..65535"),
        ("redis+sentinel://a:x/svc", "1..65535"),
        ("redis+sentinel://::1:26379/svc", "IPv6 goes in brackets"),
        ("redis+sentinel://[::1/svc", "bad IPv6"),
        ("redis+sentinel://a:1,a:1/svc", "listed twice"),
        ("redis+sentinel://a:1/svc/extra", "SERVICE"),
        ("redis+sentinel://a:1/s v", "SERVICE"),
        ("redis+sentinel://a:1/svc?db=-1", "non-negative integer"),
        ("redis+sentinel://a:1/svc?db=x", "non-negative integer"),
        ("redis+sentinel://a:1/svc?db=1&db=2", "db given twice"),
        ("redis+sentinel://a:1/svc?timeout=3", "unknown parameter 'timeout'"),
        ("redis+sentinel://a:1/svc#x", "fragment"),
        ("redis+sentinel://@a:1/svc", "empty user:password"),
        ("sentinel://a:1/svc", "must start with"),
        ("redis+memcache://a:1", "must start with"),
    ],
)
def test_bad_sentinel_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(RedisUrlError) as info:
        parse(url)
    assert why in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://user:hunter2@a:1/svc?db=x",
        "redis+sentinel://user:hunter2@a:0/svc",
        "redis+sentinel://user:hun/ter2@a:1/svc?db=x",
        "redis+sentinel://user:hun@ter2@a:1/",
        "http://user:hunter2@a:1/",
    ],
)
def test_messages_never_carry_the_password(url: str) -> None:
    with pytest.raises(RedisUrlError) as info:
        parse(url)
    assert "hunter2" not in str(info.value) and "ter2" not in str(info.value)
    assert "user:***@" in str(info.value)


def test_redact() -> None:
    assert redact("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert redact("redis://u@h:1/0") == "redis://u@h:1/0"  # a user alone is no secret
    assert redact("redis+sentinel://:p@a:1,b:2/s?db=1") == "redis+sentinel://:***@a:1,b:2/s?db=1"


def test_redact_hides_a_password_in_the_query() -> None:
    assert redact("rediss://h:1/0?password=p%40ss&db=2") == "rediss://h:1/0?password=***&db=2"
    assert redact("redis://u:pw@h:1/0?ssl_password=k") == "redis://u:***@h:1/0?ssl_password=***"
    assert redact("redis://h:1/0?db=2") == "redis://h:1/0?db=2"


def test_credentials_come_out_of_a_standalone_url() -> None:
    assert without_credentials("rediss://gw:s%2Fcret@h:6380/1?db=1") == (
        "rediss://h:6380/1?db=1",
        "gw",
        "s/cret",
    )
    assert without_credentials("redis://h:1/0?username=gw&password=pw&db=3") == (
        "redis://h:1/0?db=3",
        "gw",
        "pw",
    )
    assert without_credentials("redis://h:1/0") == ("redis://h:1/0", None, None)
    t = parse("rediss://gw:pw@h:6380/0")
    assert (t.username, t.password, t.tls) == ("gw", "pw", True)
    assert "pw" not in repr(t)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("rediss+sentinel://:pw@127.0.0.1:26380/svc", "sentinel"),
        ("rediss+cluster://127.0.0.1:7000,127.0.0.1:7001", "cluster"),
    ],
)
def test_tls_sentinel_and_cluster_urls(url: str, kind: str) -> None:
    t = parse(url)
    assert (t.kind, t.tls) == (kind, True)
    assert not parse(url.replace("rediss+", "redis+")).tls
