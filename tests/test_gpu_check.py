"""benchmarks/gpu_check.sh and gpu_check.py, on the CPU: the script parses, the tiny run goes through every part
(the verification kernel under Triton's interpreter, an SFT and a PPOW step through the trainers) and writes
its summary, and without a GPU the real run says which GPU is missing and measures nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SHELL = REPO / "benchmarks" / "gpu_check.sh"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real check would run")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)  # the script chooses it itself, before triton is imported
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_sh_parses():
    proc = subprocess.run(["bash", "-n", str(SHELL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@no_gpu
def test_gpu_check_tiny_runs_every_part_on_cpu(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no CUDA GPU" in proc.stdout
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["environment"]["device"] == "cpu" and summary["shapes"].startswith("tiny")
    kernel = summary["kernel"]
    if importlib.util.find_spec("triton") is None:
        assert kernel["status"] == "skipped" and "triton" in kernel["reason"]
    else:
        assert kernel["status"] == "ran" and kernel["device"] == "cpu (Triton interpreter)"
        assert any("greedy" in line and "identical" in line for line in kernel["check"])
        assert any(line.startswith("check sampling") for line in kernel["check"])
    steps = summary["steps"]
    assert steps["target_dtype"] == "float32" and steps["peak_GiB_after_load"] is None
    for name in ("sft", "ppow"):
        assert steps[name]["step_s"] > 0 and steps[name]["peak_GiB"] is None
    assert steps["sft"]["tokens_per_s"] > 0 and steps["ppow"]["windows_per_s_rollout"] > 0
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| SFT (TTT, 7 steps) |" in report and "| PPOW (rollout + loss) |" in report


@no_gpu
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_sh_without_gpu_names_the_missing_gpu(tmp_path):
    """The real (8B-shaped) run on a machine without a GPU: every part skips with a message, vLLM too."""
    env = {**_env(tmp_path), "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SHELL)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["kernel"]["status"] == "skipped" and "no CUDA GPU" in summary["kernel"]["reason"]
    assert summary["steps"]["status"] == "skipped" and "no CUDA GPU" in summary["steps"]["reason"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "Llama-3.1-8B shapes" in log
    if importlib.util.find_spec("vllm") is None:
        assert "vLLM step skipped: vllm is not installed" in log
