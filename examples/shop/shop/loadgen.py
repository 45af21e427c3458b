"""The load generator (asyncio + httpx): an open-loop request rate with Zipf-popular
products and categories, a mix of detail reads, listings, prices, stock, quotes and
writes, and per request its latency (from when it was due, so a slow server cannot hide
its queue), its outcome and whether it was a stale read.

A stale read: a product (detail or listing row) or stock record whose version is older
than a write the generator saw acknowledged more than `STALE_BOUND` seconds before it sent
the read; or a product answered more than that long after its deletion was acknowledged.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

from shop.db import NOUNS, sku_of

STALE_BOUND = 1.0  # seconds after a write's acknowledgement
MISSING_BASE = 50_000_000  # ids never created: reads of products that do not exist
MISSING_IDS = 500  # how many of them the load asks for
LISTING_PAGES = 5  # the deepest page the load reads
OVERRUN = 10.0  # seconds a phase may run past its length before the rest is dropped


class Zipf:
    """Ranks 1..n with P(rank) ~ 1 / rank^s, mapped to items by a fixed shuffle."""

    def __init__(self, items: list[int], s: float, rng: random.Random) -> None:
        self.items = items[:]
        rng.shuffle(self.items)
        weights = [1.0 / (r**s) for r in range(1, len(items) + 1)]
        self.cumulative = list(itertools.accumulate(weights))
        self.rng = rng

    def __call__(self) -> int:
        x = self.rng.random() * self.cumulative[-1]
        return self.items[bisect.bisect_left(self.cumulative, x)]

    def hottest(self, n: int) -> list[int]:
        return self.items[:n]


@dataclass
class Versions:
    """Writes the generator saw acknowledged: per record, (when, version) in order."""

    acked: dict[tuple[str, Any], list[tuple[float, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def wrote(self, record: tuple[str, Any], version: float) -> None:
        self.acked[record].append((time.monotonic(), version))

    def stale(self, record: tuple[str, Any], version: float, sent: float) -> bool:
        writes = self.acked.get(record)
        if not writes:
            return False
        due = sent - STALE_BOUND
        newest = max((v for t, v in writes if t <= due), default=None)
        return newest is not None and version < newest


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    elapsed: float = 0.0
    errors: int = 0
    stale: int = 0
    error_kinds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_kind: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def percentile(self, p: float, latencies: list[float] | None = None) -> float:
        latencies = self.latencies if latencies is None else latencies
        if not latencies:
            return float("nan")
        ordered = sorted(latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def p95_by_kind(self) -> dict[str, float]:
        """Each kind of request's p95, in ms."""
        return {k: round(1000 * self.percentile(95, v), 1) for k, v in sorted(self.by_kind.items())}


class Workload:
    """What one virtual request does, drawn from the mix."""

    # Per 1000 requests: 4 % writes (stock changes most, the catalog rarely), and
    # reads of products that do not exist.
    MIX = (
        ("detail", 500),
        ("listing", 220),
        ("price", 90),
        ("stock", 90),
        ("missing", 30),
        ("quote", 30),
        ("stock_write", 30),
        ("product_write", 6),
        ("create_delete", 4),
    )

    def __init__(self, products: int, categories: int, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.products = Zipf(list(range(1, products + 1)), 1.1, self.rng)
        self.categories = Zipf(list(range(1, categories + 1)), 0.8, self.rng)
        self.categories_n = categories
        self.kinds = [k for k, _ in self.MIX]
        self.weights = list(itertools.accumulate(w for _, w in self.MIX))
        self.baskets = [
            [
                (sku_of(self.products()), self.rng.randint(1, 3))
                for _ in range(self.rng.randint(1, 4))
            ]
            for _ in range(300)
        ]
        self.basket = Zipf(list(range(len(self.baskets))), 1.0, self.rng)
        self.created: list[int] = []
        self.versions = Versions()

    def kind(self) -> str:
        x = self.rng.random() * self.weights[-1]
        return self.kinds[bisect.bisect_left(self.weights, x)]

    def known_reads(self, popular: int) -> list[tuple[str, str, dict[str, Any] | None]]:
        """Every read of the mix a cache that has run for a while holds, once: the
        `popular` most popular products (detail, price, stock), every listing page asked
        for without a text search, every quote basket and every product that does not
        exist. As (method, path, params or JSON body)."""
        reads: list[tuple[str, str, dict[str, Any] | None]] = []
        for pid in self.products.hottest(popular):
            sku = sku_of(pid)
            reads += [("GET", f"/products/{pid}", None), ("GET", f"/price/{sku}", None)]
            reads.append(("GET", f"/inventory/{sku}", None))
        for category in [None, *range(1, self.categories_n + 1)]:
            for sort in ("id", "price", "-price", "name"):
                for page in range(1, LISTING_PAGES + 1):
                    params: dict[str, Any] = {"sort": sort, "page": page}
                    if category is not None:
                        params["category"] = category
                    reads.append(("GET", "/products", params))
        for basket in self.baskets:
            reads.append(("POST", "/quote", {"items": [{"sku": s, "qty": q} for s, q in basket]}))
        reads += [("GET", f"/products/{MISSING_BASE + i}", None) for i in range(1, MISSING_IDS + 1)]
        return reads

    def listing_params(self) -> dict[str, Any]:
        r = self.rng.random()
        params: dict[str, Any] = {
            "sort": self.rng.choices(["id", "price", "-price", "name"], [4, 3, 2, 1])[0],
            "page": 1 if r < 0.6 else 2 if r < 0.85 else self.rng.randint(3, LISTING_PAGES),
        }
        if self.rng.random() < 0.9:
            params["category"] = self.categories()
        if self.rng.random() < 0.05:
            params["q"] = self.rng.choice(NOUNS)
        return params

    async def one(self, http: httpx.AsyncClient, phase: Phase, kind: str) -> None:
        """Send one request of the mix (of `kind`); count a wrong answer as an error."""
        sent = time.monotonic()
        if kind == "detail":
            pid = self.products()
            r = await http.get(f"/products/{pid}")
            self._expect(r, 200, phase)
            if r.status_code == 200:
                self._check(("prod", pid), r.json()["version"], sent, phase)
        elif kind == "listing":
            r = await http.get("/products", params=self.listing_params())
            self._expect(r, 200, phase)
            if r.status_code == 200:
                for item in r.json()["items"]:
                    self._check(("prod", item["id"]), item["version"], sent, phase)
        elif kind == "price":
            self._expect(await http.get(f"/price/{sku_of(self.products())}"), 200, phase)
        elif kind == "stock":
            sku = sku_of(self.products())
            r = await http.get(f"/inventory/{sku}")
            self._expect(r, 200, phase)
            if r.status_code == 200:
                self._check(("stock", sku), r.json()["version"], sent, phase)
        elif kind == "missing":
            r = await http.get(f"/products/{MISSING_BASE + self.rng.randint(1, MISSING_IDS)}")
            self._expect(r, 404, phase)
        elif kind == "quote":
            items = self.baskets[self.basket()]
            r = await http.post("/quote", json={"items": [{"sku": s, "qty": q} for s, q in items]})
            self._expect(r, 200, phase)
        elif kind == "stock_write":
            sku = sku_of(self.products())
            r = await http.put(f"/inventory/{sku}", json={"quantity": self.rng.randint(0, 500)})
            if self._expect(r, 200, phase):
                self.versions.wrote(("stock", sku), r.json()["version"])
        elif kind == "product_write":
            pid = self.products()
            body: dict[str, Any] = {"description": f"revised at {time.time():.3f}"}
            if self.rng.random() < 0.3:
                body["price_cents"] = self.rng.randint(199, 99999)
            r = await http.put(f"/products/{pid}", json=body)
            if self._expect(r, 200, phase):
                self.versions.wrote(("prod", pid), r.json()["version"])
        elif len(self.created) < 20:
            body = {
                "name": f"new {self.rng.choice(NOUNS)}",
                "category_id": self.categories(),
                "price_cents": self.rng.randint(199, 99999),
                "quantity": 5,
            }
            r = await http.post("/products", json=body)
            if self._expect(r, 201, phase):
                self.created.append(r.json()["id"])
        else:
            pid = self.created.pop(0)
            r = await http.delete(f"/products/{pid}")
            if self._expect(r, 204, phase):
                self.versions.wrote(("prod", pid), float("inf"))

    def _expect(self, r: httpx.Response, status: int, phase: Phase) -> bool:
        if r.status_code == status:
            return True
        phase.errors += 1
        phase.error_kinds[f"{r.request.method} {r.status_code}"] += 1
        return False

    def _check(self, record: tuple[str, Any], version: float, sent: float, phase: Phase) -> None:
        if self.versions.stale(record, version, sent):
            phase.stale += 1


async def drive(
    http: httpx.AsyncClient,
    work: Workload,
    phase: Phase,
    *,
    rate: float,
    seconds: float,
    max_in_flight: int = 256,
) -> None:
    """`rate` requests a second for `seconds`, open loop: a request's latency counts from
    when it was due, also when it had to wait for a free slot."""
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    total = int(rate * seconds)

    async def request(due: float) -> None:
        kind = work.kind()
        try:
            await work.one(http, phase, kind)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            phase.errors += 1
            phase.error_kinds[type(exc).__name__] += 1
        finally:
            phase.latencies.append(time.monotonic() - due)
            phase.by_kind[kind].append(phase.latencies[-1])
            phase.requests += 1
            slots.release()

    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() > start + seconds + OVERRUN:
            # The server fell this far behind: what is left is not sent, and counted as
            # errors (those users got no answer), so that a phase ends in bounded time.
            phase.errors += total - i
            phase.error_kinds["not sent: the server fell behind"] += total - i
            break
        await slots.acquire()
        task = asyncio.create_task(request(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    phase.elapsed += time.monotonic() - start
