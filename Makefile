# The two commands that matter: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint proto bench clean replicas-demo

# An editable install leaves the package uncompiled, and with PYTHONDONTWRITEBYTECODE
# set nothing is cached: every command would compile its modules first (40 ms of
# each `modelip` run). `bench` compiles again what changed since.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m compileall -q orchestrator
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m orchestrator demo --duration 20

# The tests use a real PKCS#11 token: SoftHSM2 from the distribution (installed
# here when missing; needs root or sudo).
SOFTHSM := /usr/lib/softhsm/libsofthsm2.so

$(SOFTHSM):
	@command -v apt-get >/dev/null || { echo "install SoftHSM2 (package softhsm2)"; exit 1; }
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2

# ... and a real PostgreSQL server (replicas): the distribution's, installed when
# missing; the tests start a throwaway cluster of their own (no service is used).
PG_SERVER = $(firstword $(wildcard /usr/lib/postgresql/*/bin/postgres))

.PHONY: postgresql-server
postgresql-server:
	@test -n "$(PG_SERVER)" || { \
	  command -v apt-get >/dev/null || { echo "install the PostgreSQL server (package postgresql)"; exit 1; }; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	  $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

test: $(STAMP) $(SOFTHSM) postgresql-server
	$(PY) -m pytest

# Two replicas sharing one fleet through a local PostgreSQL (docs/replicas.md).
replicas-demo: $(STAMP) postgresql-server
	scripts/replicas-demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check orchestrator tests bench examples
	$(VENV)/bin/mypy orchestrator

# Regenerates orchestrator/_proto/ from protos/ (a test fails if it is stale).
proto: $(STAMP)
	$(PY) -m orchestrator._proto.generate

bench: $(STAMP)
	$(PY) -m compileall -q orchestrator
	$(PY) bench/encrypt_throughput.py --sizes 64M,256M,1G,2G
	$(PY) bench/replace_mek.py
	$(PY) bench/decrypt_throughput.py
	$(PY) bench/attest_rate.py
	$(PY) bench/fleet.py
	$(PY) bench/rekey.py
	$(PY) bench/replicas.py
	$(PY) bench/dashboard.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
