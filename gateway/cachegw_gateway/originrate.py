"""The warm-up rate of each origin: one token bucket per origin address in Redis, shared
by every gateway of the deployment, so that a rebuild never sends an origin more than
``origin.warm_keys_per_second`` keys, however many gateways warm at once.

The bucket is ratelimit.py's GCRA script on a key of its own, ``<p>:originrate:<address>``
(not a cache key's slot: no cache key can name it, Delete never removes it). A key costs
one token; a bucket holds ``origin.warm_batch_keys`` tokens (one Load's worth), refilled
at the configured rate. Redis's own clock decides (``TIME`` in the script), so gateways
whose clocks disagree still share one rate.
"""

from __future__ import annotations

import math

from cachegw_gateway.config import OriginConfig
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.ratelimit import GCRA_SOURCE
from cachegw_gateway.scripts import Script


class OriginRate:
    def __init__(self, store: RedisStore, config: OriginConfig) -> None:
        self._store = store
        self._script = Script(store.client, GCRA_SOURCE)
        # GCRA's emission interval is period / rate: one key every 1/rate seconds.
        self._interval_us = 1_000_000 / config.warm_keys_per_second
        self.burst = config.warm_batch_keys

    def key(self, address: str) -> str:
        return f"{self._store.prefix}:originrate:{address}"

    async def take(self, address: str, keys: int) -> int:
        """Take `keys` tokens (at most the burst) from `address`'s bucket: 0 when taken,
        else the milliseconds until they can be (nothing is taken then). Raises
        L2Unavailable when Redis fails."""
        assert 0 < keys <= self.burst
        rkey = self.key(address)
        store = self._store
        with store.calls([rkey], write=True):
            reply = await self._script(
                keys=[rkey], args=[f"{self._interval_us:.3f}", 1, self.burst, keys]
            )
        allowed, _, retry_after_us, _ = reply
        if int(allowed):
            return 0
        text = retry_after_us.decode() if isinstance(retry_after_us, bytes) else retry_after_us
        return max(1, math.ceil(float(text) / 1000))
