"""The load generator's measures: what counts as a stale read, and the Zipf draw."""

from __future__ import annotations

import random
from collections import Counter

from shop.loadgen import STALE_BOUND, Versions, Zipf


def test_a_read_is_stale_only_past_the_bound_after_a_newer_write() -> None:
    versions = Versions()
    versions.acked[("prod", 1)] = [(100.0, 5), (200.0, 9)]
    assert not versions.stale(("prod", 2), 1, 1000.0)  # never written
    assert not versions.stale(("prod", 1), 5, 100.0 + STALE_BOUND / 2)  # within the bound
    assert versions.stale(("prod", 1), 4, 100.0 + STALE_BOUND * 2)
    assert not versions.stale(("prod", 1), 5, 200.0 + STALE_BOUND / 2)  # 9 is too recent
    assert versions.stale(("prod", 1), 5, 200.0 + STALE_BOUND * 2)
    assert not versions.stale(("prod", 1), 9, 1000.0)
    versions.acked[("prod", 1)].append((300.0, float("inf")))  # deleted
    assert versions.stale(("prod", 1), 9, 300.0 + STALE_BOUND * 2)


def test_zipf_favours_its_hottest_items() -> None:
    zipf = Zipf(list(range(1, 1001)), 1.1, random.Random(3))
    drawn = Counter(zipf() for _ in range(20_000))
    hottest = zipf.hottest(10)
    assert drawn.most_common(1)[0][0] == hottest[0]
    assert sum(drawn[i] for i in hottest) > 0.35 * 20_000
