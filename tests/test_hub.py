"""Model cards and Hub push. The upload test replaces only the network calls of huggingface_hub (`whoami`,
`create_repo`, `upload_folder`) with stubs that record what would be sent; the exported folder and the card
text are the real ones."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import constants

from ppow_trl.io import (
    HubAccessError,
    check_hub_access,
    drafter_model_card,
    export_drafter,
    load_drafter,
    push_to_hub,
    record_serving_check,
    run_card_inputs,
)
from ppow_trl.metrics import TAU_DEFINITION
from recipes.export_drafter import main as export_main
from tests.test_export import make_drafter


def assert_same_drafter(loaded, drafter) -> None:
    """A drafter that went through a layout and back: same class, same weights."""
    assert type(loaded) is type(drafter)
    expected, got = drafter.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def metadata(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


EVAL = {"eval_tau": 1.234, "eval_alpha_1": 0.2, "eval_alpha_2": 0.1, "eval_alpha_3": 0.05, "eval_windows": 10}
REPORT = {
    "results": [
        {"prompt_set": "mt_bench", "temperature": 0.0, "window_size": 5, "tau": 1.19, "alpha": [0.15, 0.1, 0.0, 0.0, 0.0],
         "speedup": 0.7, "greedy_matches": 4, "greedy_total": 4, "hardware": "x86_64 (2 cores, 2 torch threads)"}
    ]
}  # fmt: skip


def test_card_metadata_sections_and_serving_lines(tiny_target):
    drafter = make_drafter("eagle3", tiny_target)
    drafter.config.target_name_or_path = "embedded"
    card = drafter_model_card(
        drafter, format="eagle3", repo_id="me/tiny-eagle3", num_speculative_tokens=10,
        training={"method": "PPOW", "window_size (K)": 10, "num_generations (G)": 8, "gamma": 0.12,
                  "data": {"data_fingerprint": "abc123", "source": "mt_bench"}},
        eval_results=EVAL, report=REPORT,
    )  # fmt: skip
    meta = metadata(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "ppow-trl"
    assert {"speculative-decoding", "eagle3", "ppow"} <= set(meta["tags"])
    assert "pipeline_tag" not in meta and "text-generation" not in card
    for section in ("## What it is", "## How it was trained", "## Evaluation", "## Usage"):
        assert section in card
    assert TAU_DEFINITION in card and "alpha_j = P(draft token j accepted" in card
    assert "`abc123`" in card and "| gamma | `0.12` |" in card
    assert "| 1.234 | 0.200 | 0.100 | 0.050 |" in card
    assert "| mt_bench | 0.0 | 5 | 1.190 |" in card and "0.70x" in card and "4/4" in card
    assert (
        """--speculative-config '{"method": "eagle3", "model": "me/tiny-eagle3", "num_speculative_tokens": 10}'"""
        in card
    )
    assert "--speculative-algorithm EAGLE3 --speculative-draft-model-path me/tiny-eagle3" in card
    assert "out = generate(target, drafter, ids, max_new_tokens=128)" in card  # generate's default round
    # a supervised warm start is not named or tagged PPOW; without a repo id the snippets hold a placeholder
    warm = drafter_model_card(drafter, format="eagle3", training={"method": "supervised warm start"})
    assert "# smollm2-135m-instruct-eagle3\n" in warm and "ppow" not in metadata(warm)["tags"]
    assert 'load_drafter("<your-username>/smollm2-135m-instruct-eagle3", target)' in warm
    assert "2605.14978" in card


def test_medusa_and_speculators_cards(tiny_target):
    medusa = drafter_model_card(make_drafter("medusa", tiny_target), format="medusa", repo_id="me/m")
    assert "medusa" in metadata(medusa)["tags"] and '"method": "medusa"' in medusa and "SGLang" not in medusa
    spec = drafter_model_card(make_drafter("eagle3", tiny_target), format="speculators", repo_id="me/s")
    assert "speculators" in metadata(spec)["tags"] and "SGLang does not read this layout" in spec
    assert "No evaluation results were attached" in spec


def test_a_serving_check_puts_its_table_in_the_card_once(tiny_target, tmp_path):
    drafter = make_drafter("eagle3", tiny_target)
    folder = export_drafter(drafter, tmp_path / "exported", format="eagle3")
    record = {
        "engine": "vLLM 9.9 (CPU build)", "setup": "greedy, 2 prompts.", "call": 'LLM(model=<target>, ...)',
        "rows": [{"k": 1, "mean_acceptance_length": 1.288, "acceptance_per_position": [0.288], "identical": 2,
                  "prompts": 2}],
    }  # fmt: skip
    readme = record_serving_check(folder, record)
    card = readme.read_text()
    assert (
        "Measured by serving it with vLLM 9.9 (CPU build)" in card and "| 1 | 1.288 | 0.288 | 2/2 |" in card
    )
    assert card.index("Measured by serving it") < card.index("## Usage")  # among the results, before usage
    # a later check replaces the table instead of adding a second one
    record["rows"][0].update(mean_acceptance_length=1.5, acceptance_per_position=[0.5])
    card = record_serving_check(folder, record).read_text()
    assert card.count("Measured by serving it") == 1 and "| 1 | 1.500 | 0.500 | 2/2 |" in card
    assert "1.288" not in card
    # a card written later from the folder's records (an export of it) carries the table too
    again = drafter_model_card(drafter, format="speculators", **run_card_inputs(folder))
    assert "| 1 | 1.500 | 0.500 | 2/2 |" in again and "No evaluation results were attached" not in again


def test_push_uploads_the_exported_folder_and_card(tiny_target, tmp_path, monkeypatch):
    calls = {}

    def fake_whoami(token=None, **_):  # network stub
        calls["whoami"] = token
        return {"name": "me"}

    def fake_create_repo(self, repo_id, **kwargs):  # network stub
        calls["create_repo"] = (repo_id, kwargs.get("private"))

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):  # network stub: keep what would be sent
        shutil.copytree(folder_path, tmp_path / "uploaded")
        calls["upload"] = repo_id
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "whoami", fake_whoami)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    drafter = make_drafter("eagle3", tiny_target)
    url = push_to_hub(drafter, "me/tiny-eagle3", "eagle3", token="hf_test", private=True,
                      card_kwargs={"eval_results": EVAL})  # fmt: skip
    assert url == "https://huggingface.co/me/tiny-eagle3/commit/1"
    assert calls == {"whoami": "hf_test", "create_repo": ("me/tiny-eagle3", True), "upload": "me/tiny-eagle3"}
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((uploaded / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    card = (uploaded / "README.md").read_text()
    assert '"model": "me/tiny-eagle3"' in card and "| 1.234 |" in card
    assert_same_drafter(load_drafter(uploaded, tiny_target), drafter)


def test_push_without_token_or_network_fails_with_a_fix(monkeypatch):
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE is set"):  # the test session is offline
        check_hub_access("me/x", token="hf_test")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubAccessError, match="no Hugging Face token. Run `hf auth login`"):
        check_hub_access("me/x")
    with pytest.raises(HubAccessError, match="needs a repository id"):
        check_hub_access(None, token="hf_test")

    def unreachable(token=None, **_):  # what whoami raises without network
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "whoami", unreachable)
    with pytest.raises(HubAccessError, match="did not accept the token .*Check the network connection"):
        check_hub_access("me/x", token="hf_test")


@pytest.mark.parametrize("fmt", ["eagle3", "speculators", "medusa", "ppow"])
def test_export_recipe_writes_every_layout(fmt, tiny_target, tiny_target_dir, tmp_path):
    kind = "medusa" if fmt == "medusa" else "eagle3"
    drafter = make_drafter(kind, tiny_target)
    drafter.config.target_name_or_path = tiny_target_dir
    drafter.save_pretrained(tmp_path / "trained")
    (tmp_path / "trained" / "eval_results.json").write_text(json.dumps(EVAL))
    out = export_main(
        ["--drafter", str(tmp_path / "trained"), "--format", fmt, "--output_dir", str(tmp_path / "out")]
    )
    card = (out / "README.md").read_text()
    assert "| 1.234 |" in card
    assert f'load_drafter("{tmp_path / "out"}", target)' in card  # no Hub id: the snippets name the folder
    loaded = load_drafter(out, tiny_target)
    assert type(loaded) is type(drafter)
    # a serving layout converts back (the target comes from the command line)
    if fmt != "ppow":
        again = export_main(
            ["--drafter", str(out), "--format", "ppow", "--output_dir", str(tmp_path / "back"),
             "--target_name_or_path", tiny_target_dir]
        )  # fmt: skip
        assert_same_drafter(load_drafter(again, tiny_target), drafter)


def test_export_recipe_push_fails_before_loading_anything(tmp_path):
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE"):
        export_main(["--drafter", str(tmp_path / "does-not-exist"), "--output_dir", str(tmp_path / "o"),
                     "--push_to_hub", "--hub_model_id", "me/x"])  # fmt: skip
    with pytest.raises(ValueError, match="ppow, eagle3, speculators, medusa"):
        export_main(["--drafter", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--format", "onnx"])


@pytest.mark.parametrize("fmt", ["eagle3", "speculators"])
def test_evaluation_reads_an_exported_drafter_like_the_original(fmt, tiny_target, tiny_target_dir, tmp_path):
    """recipes/evaluate_drafter.py takes a serving-layout drafter too: the target it records is loaded first
    and completes it (embedding); decoding with it is the same as with the drafter it was exported from."""
    from ppow_trl.evaluation import EvaluationConfig, evaluate

    drafter = make_drafter("eagle3", tiny_target)
    drafter.config.target_name_or_path = tiny_target_dir
    drafter.save_pretrained(tmp_path / "ours")
    export_main(["--drafter", str(tmp_path / "ours"), "--format", fmt, "--output_dir", str(tmp_path / fmt)])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Write a short poem about the sea."}) + "\n")
    results = {}
    for name in ("ours", fmt):
        config = EvaluationConfig(
            drafter=str(tmp_path / name), prompt_sets=[str(prompts)], max_new_tokens=8, num_draft_tokens=3,
            method="loop", baselines=[], output_dir=str(tmp_path / f"eval-{name}"), progress=False,
            warmup_tokens=0, plots=False,
        )  # fmt: skip
        (results[name],) = evaluate(config)["results"]
    assert results[fmt]["greedy_matches"] == results[fmt]["greedy_total"] == 1
    assert results[fmt]["tau"] == results["ours"]["tau"]
    assert results[fmt]["generations"] == results["ours"]["generations"]
