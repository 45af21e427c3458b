# cachegw — two commands on a fresh machine:
#   make run    set everything up and start the gateway (an embedded redis-server unless
#               ARGS="--redis-url ..." names one)
#   make test   set everything up and run lint, type checks and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
NATIVE_SRC := $(wildcard native/cachegw_native/*.pyx native/cachegw_native/*.pxd) setup.py
ARGS ?=
# `make test` leaves out the long chaos runs (marker `slow`); CI runs them after it
# (`make test-slow`, .ci/run), and `make test PYTEST_ARGS=` runs everything.
PYTEST_ARGS ?= -m "not slow" --durations=25

.PHONY: run demo test test-slow setup redis postgres promtool h2load lint typecheck pytest bench chaos soak fuzz protos clean

# --embedded-redis: with no Redis URL (ARGS, $CACHEGW_REDIS_URL, a config file), a private
# redis-server; cachegw serve refuses to start without a URL unless asked for one.
run: setup
	$(VENV)/bin/cachegw serve --embedded-redis $(ARGS)

test: setup promtool lint typecheck pytest

# The shop example (examples/shop): the same load against no cache, redis-py cache-aside
# and cachegw, and the table. ARGS="--products 20000 --rate 100" and so on; --help lists them.
demo: setup
	cd examples/shop && ../../$(PY) -m shop demo $(ARGS)

setup: $(VENV)/.deps redis postgres $(VENV)/.native

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Dependencies: reinstalled when a requirements or project file changes.
$(VENV)/.deps: $(VENV)/bin/python requirements-dev.txt pyproject.toml clients/python/pyproject.toml \
		examples/shop/requirements.txt
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements-dev.txt
	$(PIP) install -e 'clients/python[top,tracing,postgres,serializers]'
	$(PIP) install -r examples/shop/requirements.txt
	touch $@

# The Cython build: an editable install compiles native/ in place.
$(VENV)/.native: $(VENV)/.deps $(NATIVE_SRC)
	$(PIP) install --no-build-isolation -e .
	touch $@

# A redis-server binary for the managed default and the tests. The same binary runs
# Sentinel (`redis-server <conf> --sentinel`: tests/topology.py); no redis-sentinel needed.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "redis-server not found: installing Debian's redis-server"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "redis-server not found. Install it (Debian/Ubuntu: sudo apt-get install redis-server;" \
	         "macOS: brew install redis) or put it on PATH, then run make again." >&2; exit 1; \
	  fi; }

# PostgreSQL binaries (initdb, postgres) for the origin tests and benchmarks, which run a
# throwaway cluster on a free loopback port (tests/pg.py); Debian keeps them in
# /usr/lib/postgresql/<version>/bin, off PATH, which is where the tests look too (on a
# host with systemd Debian also enables its own service, as it does redis-server's).
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "PostgreSQL not found: installing Debian's postgresql"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends postgresql >/dev/null; \
	  else \
	    echo "PostgreSQL (initdb, postgres) not found. Install it (Debian/Ubuntu: sudo apt-get" \
	         "install postgresql; macOS: brew install postgresql) or put its bin folder on PATH," \
	         "then run make again." >&2; exit 1; \
	  fi; }

# promtool checks docs/ops/prometheus-alerts.yml in the tests; Debian ships it in the
# prometheus package (only promtool is used; on a host with systemd Debian also enables
# its service, as it does redis-server's). Without root or apt-get the test says it
# skipped and why; nothing else needs it.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "promtool not found: installing Debian's prometheus package for it"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus >/dev/null \
	      || echo "could not install prometheus (promtool); the rules check will skip" >&2; \
	  else \
	    echo "promtool not found (Debian/Ubuntu: apt-get install prometheus); the alert" \
	         "rules check will skip" >&2; \
	  fi; }

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow

# h2load (Debian's nghttp2-client) drives gRPC calls from C for bench_gateway.py's
# server-ceiling cases and bench_workers.py; without it they say what to install and
# exit 2. Only `make bench` needs it, never `make test`.
h2load:
	@command -v h2load >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "h2load not found: installing Debian's nghttp2-client package for it"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends nghttp2-client >/dev/null \
	      || echo "could not install nghttp2-client (h2load)" >&2; \
	  else \
	    echo "h2load not found (Debian/Ubuntu: apt-get install nghttp2-client);" \
	         "bench_gateway.py will stop and say so" >&2; \
	  fi; }

# Every script runs (each exits 1 when one of its aims is missed); bench fails at the
# end if any did.
bench: setup h2load
	@failed=""; for b in benchmarks/bench_*.py; do echo "== $$b"; \
	  $(PY) $$b || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "aims missed or errors in:$$failed" >&2; exit 1; fi

# The chaos routines (node eviction, mass invalidation of 1M keys by prefix, tag and
# class, partitions) against a real topology while serving; a table, and exit 1 when a
# check failed. ARGS="--quick" for the CI size, "--only partition", "--topology ...".
chaos: setup
	$(PY) benchmarks/chaos.py $(ARGS)

soak: setup
	$(PY) benchmarks/soak.py $(ARGS)

# A longer fuzz run than make test's (tests/fuzz): FUZZ_EXAMPLES examples per RPC and
# kind against a served gateway, and per parser property; FUZZ_RANDOM=1 draws new
# examples each run (hypothesis prints the seed of a failure) instead of the fixed ones.
FUZZ_EXAMPLES ?= 500
fuzz: setup
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/fuzz tests/cluster/test_cluster_odd_keys.py \
	  -o timeout=3600 -q $(ARGS)

protos: $(VENV)/.deps
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) build native/cachegw_native/*.c native/cachegw_native/*.so native/cachegw_native/*.html
