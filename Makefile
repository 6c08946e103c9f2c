# Every workflow is a target; `make help` lists them. Targets that need Python set up .venv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opd-setup-done
# Tiny assets (tokenizer, teacher, student, data) are cached per builder version in ~/.cache/opd/tiny;
# set OPD_TINY_DIR to keep them elsewhere.
PYTEST_ARGS ?=

.PHONY: help setup test test-fast lint format tiny data demo bench-loss convert clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e '.[train,launch,dev]'
	@touch $(STAMP)

setup: $(STAMP) ## create/refresh .venv from constraints/cpu.txt (idempotent; reruns only when pins change)

test: setup ## run the whole test suite (builds or reuses the tiny assets; CPU end-to-end runs through verl)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup ## unit tests only (no Ray/verl end-to-end runs)
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

lint: setup ## ruff check and format check
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: setup ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

tiny: setup ## build (or reuse) the tiny tokenizer, teacher, student and data; prints accuracies
	$(PY) -m opd.tiny build

data: setup ## raw math data under DATA_DIR (default ./data) -> data/grpo_processed + data/eval_processed/{boxed,dapo,none}
	$(PY) -m opd.data.prepare_grpo_data $(if $(DATA_DIR),--data-dir $(DATA_DIR))
	$(PY) -m opd.data.process_eval_data --instruction-variant all $(if $(DATA_DIR),--data-dir $(DATA_DIR))

demo: setup ## the embedded default: tiny assets + a short experiment through verl on CPU, before/after table
	$(PY) -m opd.demo

bench-loss: setup ## OPD loss vs the seed's pattern at V=151,936: time, peak memory, error (a benchmark, not a test)
	$(PY) -m opd.bench.loss --out outputs/bench/loss.json

convert: setup ## verl FSDP checkpoint -> Hugging Face model: make convert CHECKPOINT=.../global_step_N[/actor] [TARGET=dir]
	@test -n "$(CHECKPOINT)" || { echo "usage: make convert CHECKPOINT=path/to/global_step_N [TARGET=dir]" >&2; exit 2; }
	$(PY) -m opd.checkpoint convert $(CHECKPOINT) $(if $(TARGET),--target $(TARGET))

clean: ## remove caches and local outputs (keeps .venv and the tiny-asset cache)
	rm -rf .pytest_cache .ruff_cache outputs runs
