# Every workflow is a target; `make help` lists them. Targets that need Python set up .venv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# ENV=gpu: `make setup` builds the GPU image's stack in a venv (default .venv-gpu) for GPU nodes without a
# container; put it on a filesystem the nodes share (VENV=/shared/...) and pass the same VENV to later targets.
ENV ?= cpu
VENV ?= $(if $(filter gpu,$(ENV)),.venv-gpu,.venv)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opd-setup-done
GPU_MARKER := $(VENV)/.opd-gpu-env
# Tiny assets (tokenizer, teacher, student, data) are cached per builder version in ~/.cache/opd/tiny;
# set OPD_TINY_DIR to keep them elsewhere.
PYTEST_ARGS ?=

.PHONY: help setup test test-fast test-e2e lint format tiny tiny-agent tiny-data data demo demo-agent bench-loss bench-step bench-tip plot-tokens repro-tip plot-paced repro-paced convert \
	slurm-up slurm-down sweep-opd sweep-grpo sweep-agent submit pipeline reproduce-s2d status report cancel \
	container-build container-build-cpu container-test-cpu container-lock container-push container-pull \
	container-sif container-verify clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-19s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints/cpu.txt
	@if [ -f $(GPU_MARKER) ]; then echo "$(VENV) holds the GPU stack (make setup ENV=gpu): left as it is"; else \
	  test -x $(PY) || python3 -m venv $(VENV); \
	  echo "$(PY) -m pip install -c constraints/cpu.txt -e '.[train,launch,dev]'"; \
	  $(PY) -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e '.[train,launch,dev]'; fi
	@touch $(STAMP)

ifeq ($(ENV),gpu)
# GPU_PYTHON: the CPython the GPU lock is for (3.12); DRY_RUN=1: resolve against the lock, install nothing.
setup: ## ENV=cpu (default): .venv from constraints/cpu.txt, idempotent; ENV=gpu: the GPU image's lock in VENV (.venv-gpu) [DRY_RUN=1]
	PYTHONPATH=src python3 -m opd.image gpu-env --venv $(VENV) --variant $(or $(ROLLOUT),sglang) \
	  $(if $(GPU_PYTHON),--python-bin $(GPU_PYTHON)) $(if $(DRY_RUN),--dry-run)
	$(if $(DRY_RUN),,touch $(GPU_MARKER) $(STAMP))
else
setup: $(STAMP)
endif

# Workers per tier (pytest-xdist): each worker takes whole files (--dist loadfile), so runs shared by a
# file's tests happen once; the e2e files keep conftest's longest-first order (--no-loadscope-reorder).
FAST_WORKERS ?= 2
E2E_WORKERS ?= 2

test: setup ## the whole suite: the fast tier, then (only if it passed) the e2e tier
	$(MAKE) --no-print-directory test-fast
	$(MAKE) --no-print-directory test-e2e

test-fast: setup ## unit, composition and refusal tests: no Ray, verl run or SLURM job (~2 min warm)
	$(PY) -m pytest -m "not e2e" -n $(FAST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-e2e: setup ## CPU runs through verl and Ray, verl's agent loops, SLURM jobs on a local cluster
	$(PY) -m pytest -m e2e -n $(E2E_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: setup ## ruff (check, format), hadolint (containers/Dockerfile), shellcheck (jobs/, containers/ scripts)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/hadolint containers/Dockerfile
	$(VENV)/bin/shellcheck -x jobs/*.sh jobs/lib/*.sh containers/*.sh

format: setup ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

tiny: setup ## build (or reuse) the tiny tokenizer, teacher, student and data; prints accuracies
	$(PY) -m opd.tiny build

tiny-agent: setup ## build (or reuse) the tiny agent task: databases, rows, a tool-calling teacher, a lagging student
	$(PY) -m opd.tiny build --task agent

tiny-data: setup ## tiny problems in the math layout, processed, under DATA_DIR (default outputs/tiny_data): tiny_* experiments
	$(PY) -m opd.tiny data $(or $(DATA_DIR),outputs/tiny_data)

data: setup ## raw math data under DATA_DIR (default ./data) -> data/grpo_processed + data/eval_processed/{boxed,dapo,none}
	$(PY) -m opd.data.prepare_grpo_data $(if $(DATA_DIR),--data-dir $(DATA_DIR))
	$(PY) -m opd.data.process_eval_data --instruction-variant all $(if $(DATA_DIR),--data-dir $(DATA_DIR))

demo: setup ## the embedded default: tiny assets + a short experiment through verl on CPU, before/after table
	$(PY) -m opd.demo

demo-agent: setup ## agent OPD on the tiny agent task (real tool calls through verl's tool loop), before/after table
	$(PY) -m opd.demo --task agent

bench-loss: setup ## OPD loss vs the seed's pattern at V=151,936: time, peak memory, error (a benchmark, not a test)
	$(PY) -m opd.bench.loss --out outputs/bench/loss.json

bench-step: setup ## one OPD step, packed + fused head vs the padded step, at V=151,936: time, peak memory, logit rows, signal bytes
	$(PY) -m opd.bench.step --out outputs/bench/step.json $(BENCH_ARGS)

bench-tip: setup ## token selection in the real step at V=151,936: rules x kept fractions, time and peak per phase and part
	$(PY) -m opd.bench.tip --out outputs/bench/tip.json $(BENCH_ARGS)

plot-tokens: setup ## token-importance diagnostics of a run: quadrant scatter and shares (PNG): make plot-tokens RUN=dir
	@test -n "$(RUN)" || { echo "usage: make plot-tokens RUN=<run directory>" >&2; exit 2; }
	$(PY) -m opd.tip plot $(RUN)

repro-tip: setup ## TIP's rules on the tiny task through verl on CPU: 5 selections x 3 seeds, table + curves (~40 min)
	$(PY) -m opd.tip repro $(REPRO_ARGS)

plot-paced: setup ## PACED diagnostics of a run: prompts by pass rate, kept prompts, divergence by stage (PNG): make plot-paced RUN=dir
	@test -n "$(RUN)" || { echo "usage: make plot-paced RUN=<run directory>" >&2; exit 2; }
	$(PY) -m opd.paced plot $(RUN)

repro-paced: setup ## PACED on the tiny task through verl on CPU: unweighted / PACED x KL schedule x 3 seeds, table + curves (~60 min)
	$(PY) -m opd.paced repro $(REPRO_ARGS)

convert: setup ## verl FSDP checkpoint -> Hugging Face model: make convert CHECKPOINT=.../global_step_N[/actor] [TARGET=dir]
	@test -n "$(CHECKPOINT)" || { echo "usage: make convert CHECKPOINT=path/to/global_step_N [TARGET=dir]" >&2; exit 2; }
	$(PY) -m opd.checkpoint convert $(CHECKPOINT) $(if $(TARGET),--target $(TARGET))

# --- Containers (containers/README.md) -------------------------------------------------------------------
container-build: ## GPU image from containers/Dockerfile (docker, else buildah): [IMAGE=] [TAG=] [ROLLOUT=sglang|vllm]
	bash containers/build.sh gpu

container-build-cpu: ## the same Dockerfile on a local Debian base with constraints/cpu.txt (buildah, offline)
	bash containers/build.sh cpu

container-test-cpu: container-build-cpu ## inside the CPU image: import opd, verl; the unit tests
	bash containers/build.sh cpu-test

container-lock: setup ## re-resolve the GPU image's lock(s) for its Python (needs PyPI): [ROLLOUT=sglang|vllm]
	$(if $(ROLLOUT),$(PY) -m opd.image lock --variant $(ROLLOUT),$(PY) -m opd.image lock --variant sglang && $(PY) -m opd.image lock --variant vllm)

container-push: ## push IMAGE:TAG and record its digest in containers/published.env
	bash containers/image.sh push

container-pull: ## apptainer pull of the published image by digest to SIF_DIR, with its sha256; prints OPD_IMAGE
	bash containers/image.sh pull

container-sif: ## apptainer build of containers/opd.def from IMAGE@DIGEST (sites that build their SIF)
	bash containers/image.sh sif

container-verify: ## on a GPU node, inside the image: pins, pip check, CUDA, verl import, one OPD loss step
	bash containers/image.sh verify

# --- SLURM (configs/ is the login side; README "Running on SLURM") ---------------------------------------
# EXP: configs/experiment/<EXP>.yaml; SWEEP: configs/sweep/<SWEEP>.yaml; ARGS: more Hydra overrides,
# e.g. ARGS='cluster=example_site resources=gpu_2x8 verl.data.seed=1,2'.
slurm-up: setup ## start a real single-host SLURM cluster (slurmctld, 2 slurmd, munge, slurmdbd + MariaDB); idempotent
	$(PY) -m opd.launch.local_slurm up

slurm-down: setup ## stop the daemons slurm-up started (by pid)
	$(PY) -m opd.launch.local_slurm down

sweep-opd: setup ## OPD sweep, one SLURM job per point; returns with the job ids: [EXP=opd] [SWEEP=opd_loss_x_beta] [ARGS=...]
	$(PY) -m opd.launch.sweep experiment=$(or $(EXP),opd) sweep=$(or $(SWEEP),opd_loss_x_beta) $(if $(AFTER),'after=[$(AFTER)]') $(ARGS)

sweep-grpo: setup ## GRPO sweep, one SLURM job per point: [EXP=grpo] [SWEEP=learning_rates] [ARGS=...]
	$(PY) -m opd.launch.sweep experiment=$(or $(EXP),grpo) sweep=$(or $(SWEEP),learning_rates) $(if $(AFTER),'after=[$(AFTER)]') $(ARGS)

sweep-agent: setup ## agent OPD sweep (DeepPlanning travel tools; DATABASE_DIR): [EXP=opd_agent] [SWEEP=agent_turns] [ARGS=...]
	$(PY) -m opd.launch.sweep experiment=$(or $(EXP),opd_agent) sweep=$(or $(SWEEP),agent_turns) $(if $(AFTER),'after=[$(AFTER)]') $(ARGS)

submit: setup ## one run with plain sbatch (RUN_DIR/rerun.sbatch): make submit EXP=opd [ARGS=...] [AFTER=dir,...: start after those runs succeed]
	@test -n "$(EXP)" || { echo "usage: make submit EXP=<configs/experiment name> [ARGS='overrides']" >&2; exit 2; }
	$(PY) -m opd.launch.submit experiment=$(EXP) $(if $(AFTER),'after=[$(AFTER)]') $(ARGS)

# PIPELINE: configs/pipeline/<PIPELINE>.yaml; ARGS: size=tiny, key=value (every stage), STAGE:key=value;
# LOCAL=1: the stages run here one after another, no SLURM; RESUME=dir: rerun the first unfinished stage, then the rest.
pipeline: setup ## a chain of stages, one job each after the stages it reads: make pipeline PIPELINE=s2d [ARGS=...] [LOCAL=1] | RESUME=dir
	@test -n "$(PIPELINE)$(RESUME)" || { echo "usage: make pipeline PIPELINE=<configs/pipeline name> [ARGS=...] [LOCAL=1], or RESUME=<pipeline dir>" >&2; exit 2; }
	$(if $(RESUME),$(PY) -m opd.launch.pipeline resume $(RESUME),$(PY) -m opd.launch.pipeline submit $(PIPELINE) $(ARGS)) $(if $(LOCAL),--local)

reproduce-s2d: setup ## sparse-to-dense on the tiny task: s2d, its two ablations and direct GRPO, then the report (~32 min here; SLURM=1: as chains on SLURM)
	$(PY) -m opd.launch.pipeline reproduce $(if $(SLURM),--slurm) $(ARGS)

status: setup ## job states of a sweep or run from sacct: make status SWEEP=<dir printed by sweep-*/submit>
	@test -n "$(SWEEP)" || { echo "usage: make status SWEEP=<sweep or run directory>" >&2; exit 2; }
	$(PY) -m opd.launch.status $(SWEEP)

report: setup ## results side by side (Markdown, CSV, plots in DIR/report/): make report SWEEP=<sweep, run or folder of runs> [ARGS=--metric KEY]
	@test -n "$(SWEEP)" || { echo "usage: make report SWEEP=<sweep, run or folder of runs>" >&2; exit 2; }
	$(PY) -m opd.report $(SWEEP) $(ARGS)

cancel: setup ## cancel a sweep's (or run's) unfinished jobs, pending array tasks included: make cancel SWEEP=<dir>
	@test -n "$(SWEEP)" || { echo "usage: make cancel SWEEP=<sweep or run directory>" >&2; exit 2; }
	$(PY) -m opd.launch.cancel $(SWEEP)

clean: ## remove caches and local outputs (keeps .venv and the tiny-asset cache)
	rm -rf .pytest_cache .ruff_cache outputs runs
