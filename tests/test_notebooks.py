"""The Colab notebooks: stored without outputs; a Colab badge naming the repository of the install cell's
REPO_URL; a GPU-size setting with a `cpu` preset on the shipped drafter; a Hub login cell before any model is
loaded. Each is executed end to end through nbclient from notebooks/ (inside the checkout, so the install cell
installs nothing) on the tiny budget (PPOW_NOTEBOOK_BUDGET=tiny), and must show non-zero acceptance."""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SHIPPED_DRAFTER = "drafters/smollm2-135m-eagle3"
REPO_URL = re.compile(r'^REPO_URL = "https://github\.com/([\w.-]+/[\w.-]+)"', re.MULTILINE)


def repo_of(nb) -> str:
    match = REPO_URL.search(nb.cells[2].source)
    assert match, "the install cell sets REPO_URL"
    return match.group(1)


def test_there_are_three_notebooks_installing_from_one_repository():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_ppow_explained.ipynb",
        "03_finetune_published_drafter.ipynb",
    ]
    assert len({repo_of(nbformat.read(p, as_version=4)) for p in NOTEBOOKS}) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_with_badge_settings_install_and_login(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs must be stripped in git"
    badge = nb.cells[0].source
    assert "colab.research.google.com/assets/colab-badge.svg" in badge
    settings = nb.cells[1].source
    assert settings.lstrip().startswith("# Settings") and "GPU = " in settings
    assert 'os.environ.get("PPOW_NOTEBOOK_BUDGET", "full")' in settings
    assert '"cpu": dict(' in settings and f'drafter="{SHIPPED_DRAFTER}"' in settings

    # REPO_URL is the install cell's first statement, the only place a repository URL is written, and the
    # badge opens this notebook from that repository.
    install = nb.cells[2].source
    statements = [line for line in install.splitlines() if line.strip() and not line.startswith("#")]
    assert statements[0].startswith("REPO_URL = ")
    assert sum(cell.source.count("github.com/") for cell in nb.cells) == 1
    assert f"colab.research.google.com/github/{repo_of(nb)}/blob/main/notebooks/{path.name}" in badge
    assert "pyproject.toml" in install and '"clone"' in install and '"pip"' in install

    sources = [cell.source for cell in nb.cells]
    login = next(i for i, s in enumerate(sources) if "login(" in s)
    assert login < next(i for i, s in enumerate(sources) if "load_target(" in s)
    assert "licence" in sources[login] and "HF_HUB_OFFLINE" in sources[login]
    assert any("load_drafter(" in s for s in sources)


def numbers(pattern: str, text: str) -> list[float]:
    match = re.search(pattern, text)
    assert match, f"no {pattern!r} in the notebook's output"
    return [float(group) for group in match.groups()]


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_tiny_budget_with_nonzero_acceptance(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("PPOW_NOTEBOOK_BUDGET", "tiny")
    monkeypatch.setenv("PPOW_NOTEBOOK_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    files_before = sorted(NOTEBOOK_DIR.rglob("*"))
    start = time.perf_counter()
    # Run where Jupyter runs it: in notebooks/ of this checkout.
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    ).execute()
    elapsed = time.perf_counter() - start
    assert sorted(NOTEBOOK_DIR.rglob("*")) == files_before, "outputs belong under PPOW_NOTEBOOK_OUTPUT"
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "budget=tiny preset=cpu" in text
    assert "inside a checkout of ppow-trl" in text and "nothing to install" in text
    assert "Hub login: not needed" in text
    if path.name.startswith("01"):
        taus = numbers(r"held-out tau: warm start ([\d.]+) -> PPOW ([\d.]+)", text)
        alphas = numbers(r"held-out alpha_1: warm start ([\d.]+) -> PPOW ([\d.]+)", text)
        (decoded_tau,) = numbers(r"tau ([\d.]+); identical to plain greedy: True", text)
        assert min(taus) > 1.05 and min(alphas) > 0 and decoded_tau > 1.05
        assert "model.safetensors" in text
        shown = f"held-out tau {taus}, alpha_1 {alphas}; generate tau {decoded_tau}"
    elif path.name.startswith("02"):
        (sampled_alpha,) = numbers(r"sampled windows each: alpha_1 = ([\d.]+)", text)
        greedy_alpha, greedy_tau = numbers(
            r"greedily \(as served\): alpha_1 = ([\d.]+), tau = 1 \+ mean k = ([\d.]+)", text
        )
        (signal,) = numbers(r"(\d+) of \d+ anchors have windows that differ in reward", text)
        (near,) = numbers(r"(\d+) of \d+ first-token misses are near misses", text)
        assert sampled_alpha > 0 and greedy_alpha > 0 and greedy_tau > 1.05 and signal > 0 and near > 0
        assert "ADAW anchors:" in text
        shown = f"sampled alpha_1 {sampled_alpha}, greedy alpha_1 {greedy_alpha} tau {greedy_tau}"
    else:
        taus = numbers(r"held-out tau: published ([\d.]+) -> PPOW ([\d.]+)", text)
        alphas = numbers(r"held-out alpha_1: published ([\d.]+) -> PPOW ([\d.]+)", text)
        assert min(taus) > 1.05 and min(alphas) > 0
        assert "model.safetensors" in text
        shown = f"held-out tau {taus}, alpha_1 {alphas}"
    print(f"{path.name}: {elapsed:.0f} s; {shown}")
