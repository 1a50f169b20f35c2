# One task runner: make serve | test | lint | bench
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 4000

export LITELLM_LOCAL_MODEL_COST_MAP := True
export CREDITS_DATA_DIR ?= $(CURDIR)/.credits-data

.PHONY: install serve stop-db test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,dev]'
	touch $@

install: $(VENV)/.installed

serve: install  ## run the proxy with the plugin on 127.0.0.1:$(PORT), demo models, embedded database
	$(BIN)/litellm-credits serve --config litellm_config.yaml --port $(PORT)

stop-db: install  ## stop the embedded PostgreSQL that `make serve` started (it outlives the proxy)
	$(BIN)/litellm-credits stop-db

test: install  ## the whole suite against PostgreSQL (CREDITS_DATABASE_URL or embedded)
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install  ## ledger throughput, reads on a 1M-row ledger and 10M usage events, cache and rate limits
	$(BIN)/python bench/run.py
	$(BIN)/python bench/reads.py
	$(BIN)/python bench/cache.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
