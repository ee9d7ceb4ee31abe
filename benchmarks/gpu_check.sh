#!/usr/bin/env bash
# The GPU check: one script for a lent single-GPU machine (no network there); under 8 minutes on one H100.
#
# On a machine with network, first:   bash benchmarks/gpu_check.sh --download-wheels
#   downloads into .whl/ (ignored through .git/info/exclude) the Python 3.12 x86-64 wheels of what the GPU
#   image lacks or has at another version than this project needs (transformers, trl, datasets, dill,
#   multiprocess; the versions installed in .venv). The .venv itself (CPU torch, ~3 GB) does not travel.
#
# On the GPU machine (.whl carried beside the repository):   bash benchmarks/gpu_check.sh [gpu_check.py options]
#   1. installs .whl/*.whl, when present, into /tmp/ppow-site (offline, no dependencies) on PYTHONPATH;
#   2. benchmarks/gpu_check.py: the Triton verification kernel against torch, an SFT step and a PPOW step on a
#      randomly initialised Llama-3.1-8B-shaped target in bf16 with an EAGLE-3 drafter, peak GPU memory;
#   3. vLLM on the GPU with the shipped drafter (benchmarks/serve_check.py --quick in this Python), only when
#      `python -c "import vllm"` works; otherwise a message says it was skipped.
# Summaries (gpu_check.json, gpu_check.md, verify_kernel.json, serving/) and the log go to $OUT (set by the
# device runner), else outputs/gpu_check. PYTHON picks the interpreter (default: .venv/bin/python when it sees
# a GPU or python3 has no torch, else python3). Without a GPU every part says which GPU is missing and measures nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1
WHEELS=.whl
WHEEL_PACKAGES="transformers trl datasets dill multiprocess"

if [ "${1:-}" = "--download-wheels" ]; then
    grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    for name in $WHEEL_PACKAGES; do
        ver=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))") || exit 1
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$name==$ver" || exit 1
    done
    ls -la "$WHEELS"
    exit 0
fi

OUT_DIR="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"

if [ -z "${PYTHON:-}" ]; then
    PYTHON=.venv/bin/python
    if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
        && python3 -c "import torch" 2>/dev/null; then
        PYTHON=python3  # the GPU image's Python, which holds a CUDA build of torch
    fi
fi

{
    echo "== gpu_check.sh: $(date -u +%FT%TZ), python: $PYTHON"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: no NVIDIA GPU visible on this machine"
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/ppow-site "$WHEELS"/*.whl && export PYTHONPATH="/tmp/ppow-site${PYTHONPATH:+:$PYTHONPATH}"
    fi

    echo "== 1-2. verification kernel, SFT and PPOW steps (benchmarks/gpu_check.py)"
    timeout 330 "$PYTHON" benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
    echo "gpu_check.py exit code: $?"

    echo "== 3. vLLM with the shipped drafter"
    if "$PYTHON" -c "import vllm" 2>/dev/null; then
        timeout 120 "$PYTHON" benchmarks/serve_check.py --engine-python "$PYTHON" --quick \
            --results "$OUT_DIR/RESULTS_serving.md" --json "$OUT_DIR/serve_check.json"
        echo "serve_check.py exit code: $?"
    else
        echo "vLLM step skipped: vllm is not installed for $PYTHON (python -c 'import vllm' fails)"
    fi
} 2>&1 | tee "$LOG"
