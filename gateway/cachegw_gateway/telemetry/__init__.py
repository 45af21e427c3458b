"""What an operator sees of a gateway: spans, metrics, the Stats RPC and log lines.

The request path only bumps plain integers (stats.py, the L1's and the coalescer's own
counters) and records one latency sample per call; everything here reads them when asked
(a scrape, a Stats call). Tracing is installed only when configured: with it off, no
span code runs at all. Modules: `names` (attribute and metric names), `latency` (per-RPC
histograms), `snapshot` (one consistent read of every figure; the Stats answer),
`metrics` (Prometheus /metrics), `tracing` (spans, `annotate`), `logs` (text or JSON
lines with trace ids), `redis_watch` (Redis health probe), `service` (wires them into
one gateway).
"""
