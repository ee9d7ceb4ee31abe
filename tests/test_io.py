"""The drafter I/O layer: every layout (and a Hub id) through the one door `load_drafter`, the same errors
from every recipe for a missing drafter, a damaged config.json and a drafter built for another target, the
one Hub-id rule, the layout registry's "auto" choice, and what the cards call a drafter."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoModel

import ppow_trl
from ppow_trl.decoding import generate
from ppow_trl.hub_id import is_hub_id
from ppow_trl.io import (
    DrafterFormatError,
    DrafterNotFoundError,
    export_drafter,
    load_drafter,
    resolve_layout,
)
from ppow_trl.models import DrafterTargetMismatchError
from tests.conftest import build_tiny_target
from tests.test_export import draft, make_drafter

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-eagle3"


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module while loading
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", ["ppow", "eagle3", "speculators", "medusa"])
def test_every_layout_loads_through_the_one_door(fmt, tiny_target, tmp_path):
    drafter = make_drafter("medusa" if fmt == "medusa" else "eagle3", tiny_target).eval()
    out = export_drafter(drafter, tmp_path / fmt, fmt)
    loaded = ppow_trl.load_drafter(out, tiny_target)
    assert type(loaded) is type(drafter)
    assert torch.allclose(draft(loaded, tiny_target)[1], draft(drafter, tiny_target)[1], atol=1e-5)


def test_a_hub_id_loads_through_the_one_door(tiny_target, tmp_path, monkeypatch):
    drafter = make_drafter("eagle3", tiny_target).eval()
    snapshot = export_drafter(drafter, tmp_path / "snapshot", "speculators")
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):  # network stub: the Hub's copy is the local export
        asked.append(repo_id)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_drafter("me/tiny-eagle3", tiny_target)
    assert asked == ["me/tiny-eagle3"]
    assert torch.allclose(draft(loaded, tiny_target)[1], draft(drafter, tiny_target)[1], atol=1e-5)
    assert "Started from the published drafter `me/tiny-eagle3`" in ppow_trl.io.drafter_model_card(loaded)


def test_one_hub_id_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and is_hub_id("gpt2")
    for name in ("a/b/c", "./org/name", "/abs/path", "~/x", "has space", ""):
        assert not is_hub_id(name), name
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")  # something exists there: a local path


def test_auto_picks_the_serving_layout_of_the_drafter(tiny_target, tmp_path):
    eagle3, medusa = make_drafter("eagle3", tiny_target), make_drafter("medusa", tiny_target)
    assert resolve_layout("auto", eagle3).name == "eagle3" and resolve_layout("auto", medusa).name == "medusa"
    out = export_drafter(medusa, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MedusaModel"]


def test_automodel_on_a_serving_layout_points_to_load_drafter(tiny_target, tmp_path):
    out = export_drafter(make_drafter("eagle3", tiny_target), tmp_path / "e", "eagle3")
    not_a_drafter = AutoModel.from_pretrained(out)  # model_type llama: transformers builds a LlamaModel
    with pytest.raises(TypeError, match=r"not a ppow_trl drafter.*ppow_trl\.load_drafter"):
        generate(tiny_target, not_a_drafter, torch.tensor([[5, 6, 7]]), num_draft_tokens=2, max_new_tokens=2)


# ------------------------------------------------------------------------------------------ recipes
def bad_drafters(tmp_path: Path, tiny_target) -> dict[str, tuple[Path, type, str]]:
    """A missing path, a truncated config.json, a drafter for another target: (path, error, message)."""
    damaged = tmp_path / "damaged"
    make_drafter("eagle3", tiny_target).save_pretrained(damaged)
    text = (damaged / "config.json").read_text()
    (damaged / "config.json").write_text(text[: len(text) // 2])
    other = build_tiny_target(vocab_size=tiny_target.config.vocab_size + 16, num_layers=6)
    foreign = export_drafter(make_drafter("eagle3", other), tmp_path / "foreign", "ppow")
    return {
        "missing": (tmp_path / "no-such-drafter", DrafterNotFoundError, "no drafter at .*no-such-drafter"),
        "damaged": (damaged, DrafterFormatError, re.escape(f"{damaged / 'config.json'} is not valid JSON")),
        "foreign": (foreign, DrafterTargetMismatchError, "vocab_size: drafter=336 target=320"),
    }


def run_recipe(name: str, drafter: Path, target_dir: str, out: Path) -> None:
    module = recipe(name)
    train = ["--dataset_name", "mt_bench", "--use_cpu", "true", "--report_to", "none", "--output_dir", str(out)]  # fmt: skip
    if name == "eagle_ppow":
        module.main(["--drafter_name_or_path", str(drafter), "--target_name_or_path", target_dir, *train])
    elif name == "sft_drafter":
        module.main(*module.parse_args(["--drafter_name_or_path", str(drafter), "--target_name_or_path", target_dir, *train]))  # fmt: skip
    elif name == "evaluate_drafter":
        module.main(["--drafter", str(drafter), "--target", target_dir, "--output_dir", str(out)])
    else:
        module.main(
            ["--drafter", str(drafter), "--target_name_or_path", target_dir, "--output_dir", str(out)]
        )


@pytest.mark.parametrize("name", ["eagle_ppow", "sft_drafter", "evaluate_drafter", "export_drafter"])
def test_every_recipe_reports_a_bad_drafter_the_same_way(name, tiny_target, tiny_target_dir, tmp_path):
    for case, (path, error, message) in bad_drafters(tmp_path, tiny_target).items():
        with pytest.raises(error, match=message):
            run_recipe(name, path, tiny_target_dir, tmp_path / f"out-{case}")
        assert not (tmp_path / f"out-{case}" / "split.json").exists()  # refused before any data work


def test_export_recipe_defaults_to_the_target_the_shipped_drafter_records(tmp_path):
    out = recipe("export_drafter").main(
        ["--drafter", str(SHIPPED), "--format", "speculators", "--output_dir", str(tmp_path / "spec")]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Eagle3Speculator"]
    assert config["speculators_config"]["verifier"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "README.md").read_text()
    assert "\n# smollm2-135m-instruct-eagle3\n" in card  # the drafter's name, not the output folder's
    assert f"Started from the drafter `{SHIPPED}` (eagle3 format)" in card  # a local path is not "published"
