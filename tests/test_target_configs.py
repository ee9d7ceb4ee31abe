"""Targets users bring: the Llama-3.1-8B-Instruct and Qwen3-8B YAMLs parse with the recipes' own parsers, and a
bitsandbytes 4-bit / 8-bit target (through `load_target(..., quantization=...)`) trains one warm-start step and
one PPOW step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from trl import TrlParser

from ppow_trl.evaluation import EvaluationConfig
from ppow_trl.target import load_target
from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer
from ppow_trl.training.ppow import PPOWConfig, PPOWTrainer
from ppow_trl.training.script_args import DataArguments, DrafterModelArguments
from tests.ppow_fixtures import tiny_greedy_dataset, tiny_ppow_config
from tests.test_drafting import make_drafter

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
TARGET_YAMLS = sorted(p for d in ("llama-3.1-8b-instruct", "qwen3-8b") for p in (CONFIGS / d).glob("*.yaml"))


@pytest.mark.parametrize("path", TARGET_YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_target_yamls_parse_with_the_paper_settings(path):
    config_class = PPOWConfig if path.name.startswith("ppow") else DrafterSFTConfig
    model_args, data_args, args = TrlParser(
        (DrafterModelArguments, DataArguments, config_class)
    ).parse_args_and_config(["--config", str(path), "--use_cpu", "true", "--bf16", "false"])
    assert model_args.target_name_or_path in ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B")
    assert data_args.draft_vocab_size == 32000
    if config_class is PPOWConfig:
        assert args.window_size == 10 and args.num_generations == 8 and args.gamma in ("0.12", "auto")
        assert model_args.target_quantization == ("4bit" if "4bit" in path.name else None)
        assert model_args.drafter_name_or_path


EMBEDDED_YAMLS = sorted((CONFIGS / "smollm2-135m").glob("[!r]*.yaml"))  # the recipes' configs but regenerate


@pytest.mark.parametrize("path", EMBEDDED_YAMLS, ids=lambda p: p.name)
def test_embedded_target_yamls_parse_with_their_recipes(path):
    if path.name.startswith("evaluate"):
        (config,) = TrlParser(EvaluationConfig).parse_args_and_config(["--config", str(path)])
        assert config.num_draft_tokens == "auto" and "plain" in config.baselines
        return
    config_class = PPOWConfig if path.name.startswith("ppow") else DrafterSFTConfig
    model_args, data_args, args = TrlParser(
        (DrafterModelArguments, DataArguments, config_class)
    ).parse_args_and_config(["--config", str(path)])
    assert model_args.target_name_or_path == "embedded" and args.max_steps > 0
    if path.name == "ppow_eagle3.yaml":  # the demo starts from the shipped warm start, on fresh data
        assert model_args.drafter_name_or_path == "drafters/smollm2-135m-eagle3"
        assert data_args.dataset_name == "self_generated" and args.seed != 0


def bitsandbytes_cpu_skip_reason() -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer(torch.randn(2, 64))
    except Exception as err:  # no CPU backend in this bitsandbytes build
        return f"bitsandbytes cannot run on this CPU: {type(err).__name__}: {err}"
    return None


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_target_trains_one_sft_and_one_ppow_step(
    quantization, tiny_target, tiny_target_dir, tmp_path
):
    reason = bitsandbytes_cpu_skip_reason()
    if reason:
        pytest.skip(reason)
    target, tokenizer = load_target(tiny_target_dir, quantization=quantization)
    assert getattr(target, "hf_quantizer", None) is not None
    dataset = tiny_greedy_dataset(tiny_target, num_sequences=8)  # the fp32 target's greedy answers

    drafter = make_drafter("eagle3", target)
    sft_args = DrafterSFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=4, window_size=3,
        save_strategy="no", report_to="none", use_cpu=True, logging_steps=1,
    )  # fmt: skip
    sft = DrafterSFTTrainer(drafter, target, sft_args, train_dataset=dataset, processing_class=tokenizer)
    before = drafter.fc.weight.detach().clone()
    sft.train()
    assert sft.state.global_step == 1 and not torch.equal(before, drafter.fc.weight)

    ppow = PPOWTrainer(drafter, target, tiny_ppow_config(tmp_path / "ppow", max_steps=1), dataset, tokenizer)
    before = drafter.fc.weight.detach().clone()
    ppow.train()
    assert ppow.state.global_step == 1 and not torch.equal(before, drafter.fc.weight)
    logged = [h for h in ppow.state.log_history if "tau" in h]
    assert logged and logged[0]["tau"] >= 1.0
