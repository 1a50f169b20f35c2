# One task runner: make serve | test | lint | bench
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 4000

export LITELLM_LOCAL_MODEL_COST_MAP := True
export CREDITS_DATA_DIR ?= $(CURDIR)/.credits-data

.PHONY: install serve stop-db test lint bench clean

# Each step says what it does: the first install takes about a minute, and pip -q hid it all.
$(VENV)/.installed: pyproject.toml constraints.txt
	@if [ ! -x $(BIN)/python ]; then echo "==> Creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); fi
	@echo "==> Upgrading pip in $(VENV)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@echo "==> Installing litellm-credits and its dependencies, pinned by constraints.txt (about a minute the first time)"
	@$(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt -e '.[test,dev]'
	@touch $@
	@echo "==> Installed in $(VENV)"

install: $(VENV)/.installed

serve: install  ## run the proxy with the plugin on 127.0.0.1:$(PORT), demo models, embedded database
	@echo "==> Starting the database (embedded, under $(CREDITS_DATA_DIR), unless CREDITS_DATABASE_URL is set), migrating, then the proxy"
	@$(BIN)/litellm-credits serve --config litellm_config.yaml --port $(PORT)

stop-db: install  ## stop the embedded PostgreSQL that `make serve` started (it outlives the proxy)
	$(BIN)/litellm-credits stop-db

test: install  ## the whole suite against PostgreSQL (CREDITS_DATABASE_URL or embedded)
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install  ## ledger throughput, reads on a 1M-row ledger and 10M usage events, cache and rate limits, proxy A/B and soak
	$(BIN)/python bench/run.py
	$(BIN)/python bench/reads.py
	$(BIN)/python bench/cache.py
	$(BIN)/python bench/hooks_cpu.py
	$(BIN)/python bench/proxy.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
