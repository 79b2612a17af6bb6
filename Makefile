# Two commands on a fresh machine:  make up   |   make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: up test install services browser lint typecheck unit bench bench-reliability clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull several GB of CUDA packages.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(VENV)/bin/imagebus up $(ARGS)

services:
	bash scripts/ensure-services.sh

# Debian's Chromium for the web page test (Playwright cannot download its own browsers here).
browser:
	bash scripts/ensure-browser.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

unit: install services browser
	$(VENV)/bin/pytest --durations=20 $(PYTEST_ARGS)

test: lint typecheck unit

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/overhead.py
	$(PY) bench/diffusers_batching.py
	$(PY) bench/remote_throughput.py
	$(PY) bench/rate_limit.py
	$(PY) bench/vs_litserve.py --profile .imagebus/bench-profile-vs-litserve
	$(PY) bench/control_plane.py --profile .imagebus/bench-profile
	$(PY) bench/cold_start.py
	$(PY) bench/sse_idle.py
	$(PY) bench/reads.py
	$(PY) bench/submit_history.py

# The long reliability runs behind docs/reliability.md (several minutes each).
bench-reliability: install services
	$(PY) bench/chaos.py --bus nats
	$(PY) bench/chaos.py --bus amqp
	$(PY) bench/fuzz.py

clean:
	rm -rf $(VENV) .imagebus .pytest_cache .mypy_cache .ruff_cache
