"""The Colab notebooks: stored without outputs, with a Colab badge and a GPU-size setting at the top, and each
executed end to end through nbclient on the embedded target with the tiny budget (PPOW_NOTEBOOK_BUDGET=tiny)."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_ppow_explained.ipynb",
        "03_finetune_published_drafter.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_with_badge_and_settings(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs must be stripped in git"
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
    assert f"notebooks/{path.name}" in nb.cells[0].source
    settings = nb.cells[1].source
    assert settings.lstrip().startswith("# Settings") and "GPU = " in settings
    assert 'os.environ.get("PPOW_NOTEBOOK_BUDGET", "full")' in settings


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_end_to_end_on_the_tiny_budget(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("PPOW_NOTEBOOK_BUDGET", "tiny")
    monkeypatch.setenv("PPOW_NOTEBOOK_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    elapsed = time.perf_counter() - start
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "budget=tiny" in text
    if path.name.startswith("01"):
        assert "identical to plain greedy: True" in text and "model.safetensors" in text
    elif path.name.startswith("02"):
        assert "ADAW anchors:" in text and "proximity reward" in text
    else:
        assert "held-out tau: published" in text and "model.safetensors" in text
    print(f"{path.name}: {elapsed:.0f} s")
