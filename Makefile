# `make demo` and `make test` each work on a fresh clone as the only command.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
TORCH  ?= torch==2.13.0
DEMO_ARGS ?=

.PHONY: install demo lint test test-fast soak model redis clean lock

# constraints.txt pins every package the test environment resolves (torch aside: TORCH above), so a fresh
# clone and CI test the same versions; `make lock` refreshes it (docs/development.md).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first (a local CPU build on our machines) so the project's `torch` range pulls nothing more
	$(PY) -m pip install -q $(TORCH) || $(PY) -m pip install -q "torch>=2.4,<3"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# resolve the dev environment afresh in a scratch venv and write what it installed to constraints.txt
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install -q $(TORCH)
	build/lock-venv/bin/python -m pip install -q -e ".[dev]"
	{ echo "# pip constraints for the test environment: \`make lock\` writes this file (torch: the Makefile's TORCH)"; \
	  build/lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt
	rm -rf build/lock-venv

install: $(VENV)/.installed

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server missing: installing Debian's package"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null; fi; }

model: install
	$(PY) -m hexgen.cli.fetch_model

# prints the dashboard's URL; `make demo DEMO_ARGS=--keep` keeps it up until Ctrl-C
demo: install redis model
	$(PY) -m hexgen.cli demo $(DEMO_ARGS)

# The quality gate: ruff (lint + format check) and mypy over the packages; settings in pyproject.toml.
lint: install
	$(PY) -m ruff check hexgen workers
	$(PY) -m ruff format --check hexgen workers
	$(PY) -m mypy

test: install redis lint
	$(PY) -m pytest -q

# the full soak (10,000 requests from 200 clients, a pipeline killed midway); `make test` runs a short one
soak: install redis
	$(PY) -m pytest -q -s tests/test_soak.py -k full --soak

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
