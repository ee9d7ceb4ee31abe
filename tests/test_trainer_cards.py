"""The trainers' side of leaving the project: every saved drafter gets the drafter model card (not TRL's
text-generation card), PPOWTrainer names PPOW and its paper, PPOWConfig refuses the GRPO fields PPOW ignores,
the recipes accept a published drafter and check a Hub push before any training work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ppow_trl.export import HubAccessError, export_drafter
from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer
from ppow_trl.training.ppow import PPOWConfig, PPOWTrainer
from tests.ppow_fixtures import tiny_greedy_dataset, tiny_ppow_config
from tests.test_drafting import make_drafter

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def dataset(tiny_target):
    return tiny_greedy_dataset(tiny_target, num_sequences=8)


def assert_drafter_card(text: str, method: str) -> None:
    assert "## How it was trained" in text and method in text
    assert "speculative-decoding" in text and "pipeline_tag" not in text
    assert "text-generation" not in text and "DeepSeekMath" not in text and "GRPO" not in text


def test_ppow_trainer_names_ppow_and_writes_drafter_cards(tiny_target, tiny_tokenizer, dataset, tmp_path):
    assert PPOWTrainer._name == "PPOW" and PPOWTrainer._paper["id"] == "2605.14978"
    assert "2605.14978" in PPOWTrainer._paper["citation"] and "ppow" in PPOWTrainer._tag_names
    drafter = make_drafter("eagle3", tiny_target)
    drafter.config.warm_started = True
    args = tiny_ppow_config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = PPOWTrainer(drafter, tiny_target, args, dataset, tiny_tokenizer)
    trainer.train()
    trainer.save_model()
    for card in (tmp_path / "checkpoint-1" / "README.md", tmp_path / "README.md"):
        text = card.read_text()
        assert_drafter_card(text, "PPOW")
        assert "| window_size | `4` |" in text and "| num_generations | `4` |" in text
        assert "| gamma (used) | `0.12` |" in text


def test_sft_trainer_writes_a_drafter_card(tiny_target, tiny_tokenizer, dataset, tmp_path):
    args = DrafterSFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, window_size=2, save_strategy="no",
        report_to="none", use_cpu=True,
    )  # fmt: skip
    trainer = DrafterSFTTrainer(make_drafter("eagle3", tiny_target), tiny_target, args, train_dataset=dataset)
    trainer.train()
    trainer.save_model()
    text = (tmp_path / "README.md").read_text()
    assert_drafter_card(text, "Supervised warm start")
    assert "| wall time (this run) | `" in text and "| command | `python " in text

    # TRL's card attributes drive the card: a subclass that renames its method and cites its own paper
    class Renamed(DrafterSFTTrainer):
        _name = "distillation with a new loss"
        _paper = {"title": "A new loss", "id": "0000.00000", "citation": "@article{newloss2026}"}

    trainer.__class__ = Renamed
    trainer.create_model_card()
    text = (tmp_path / "README.md").read_text()
    assert "Training: distillation with a new loss." in text and "@article{newloss2026}" in text
    assert "@article{ppow2026" not in text


def test_ppow_config_refuses_grpo_fields_ppow_ignores(tmp_path):
    with pytest.raises(ValueError) as err:
        PPOWConfig(output_dir=str(tmp_path), use_cpu=True, use_vllm=True, top_p=0.9, loss_type="grpo",
                   max_completion_length=64, vllm_gpu_memory_utilization=0.5)  # fmt: skip
    message = str(err.value)
    for name in ("use_vllm", "top_p", "loss_type", "max_completion_length", "vllm_gpu_memory_utilization"):
        assert name in message
    assert "no vLLM" in message and "not GRPO's loss variants" in message  # each says why
    PPOWConfig(output_dir=str(tmp_path), use_cpu=True, top_p=1.0, use_vllm=False)  # defaults are fine


def load_recipe(name):
    sys.path.insert(0, str(RECIPES))
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        sys.path.remove(str(RECIPES))


@pytest.mark.parametrize("recipe", ["eagle_ppow", "sft_drafter"])
def test_recipes_check_a_hub_push_before_any_training_work(recipe, tmp_path):
    module = load_recipe(recipe)
    argv = ["--target_name_or_path", str(tmp_path / "no-such-target"), "--output_dir", str(tmp_path / "out"),
            "--drafter_name_or_path", str(tmp_path / "no-such-drafter"), "--push_to_hub", "true",
            "--hub_model_id", "me/x", "--dataset_name", "mt_bench", "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE is set"):
        module.main(argv) if recipe == "eagle_ppow" else module.main(*module.parse_args(argv))


def test_ppow_recipe_starts_from_a_published_eagle3_checkpoint(tiny_target, tiny_target_dir, tmp_path):
    """drafter_name_or_path may be a serving-layout checkpoint (here written in the original EAGLE-3 layout):
    the recipe imports it with the target's embedding."""
    from ppow_trl.io import load_drafter
    from ppow_trl.target import load_target

    trained = make_drafter("eagle3", tiny_target)
    trained.config.warm_started = True
    published = export_drafter(trained, tmp_path / "published", "eagle3")
    target, _ = load_target(tiny_target_dir)
    drafter = load_drafter(str(published), target)
    assert type(drafter).__name__ == "Eagle3Drafter" and drafter.config.warm_started
