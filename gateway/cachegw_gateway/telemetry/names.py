"""Names shared by spans, metrics, docs and dashboards: change one, change them all.

Span attributes set by the gateway are `cachegw.*`; `tracing.annotate(tier="l1")` sets
``cachegw.tier``. The keys below are the ones the cache code may pass to `annotate`.
"""

from __future__ import annotations

ATTRIBUTE_PREFIX = "cachegw."

# -- span attributes (annotate keys, without the prefix) ---------------------------------
KEY_CLASS = "key_class"  # the key's class (policy), on every call with one key
KEYS = "keys"  # number of keys of a GetMany / Delete
TIER = "tier"  # who answered a Get: "l1", "l2" or "miss"
L1_HITS = "l1_hits"  # GetMany: keys answered from L1
COALESCED = "coalesced"  # the Get joined another caller's in-flight Redis read
# Stampede protection (set by the lease code): how the lease went and how long it waited.
LEASE = "lease"  # "granted" | "waited" | "timed_out" | "taken_over" | "refused"
LEASE_WAIT_MS = "lease_wait_ms"  # float, time spent waiting for another holder's fill
REFRESH = "refresh"  # this caller was picked to refresh the key early

TIERS = ("l1", "l2", "miss")
LEASE_OUTCOMES = ("granted", "waited", "timed_out", "taken_over", "refused")

# OpenTelemetry semantic conventions for RPC spans.
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"

# -- metrics -----------------------------------------------------------------------------
METRIC_PREFIX = "cachegw_"
