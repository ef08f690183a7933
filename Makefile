# The two commands that matter: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m orchestrator watch plans/demo.yaml --duration 20

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check orchestrator tests bench
	$(VENV)/bin/mypy orchestrator

# Regenerates orchestrator/_proto/ from protos/ (a test fails if it is stale).
proto: $(STAMP)
	$(PY) -m orchestrator._proto.generate

bench: $(STAMP)
	$(PY) bench/encrypt_throughput.py --size 1G
	$(PY) bench/replace_mek.py
	$(PY) bench/decrypt_throughput.py
	$(PY) bench/attest_rate.py
	$(PY) bench/fleet.py
	$(PY) bench/rekey.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
