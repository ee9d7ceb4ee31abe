"""The recipes' YAML configs: every one parses with its recipe's parser (`RecipeParser`, which reads `include:`);
a config that includes a base parses exactly as the base with the config's own keys given on the command line,
and states no key the base already sets to the same value; the Llama-3.1-8B-Instruct and Qwen3-8B configs carry
the paper settings. A bitsandbytes 4-bit / 8-bit target (through `load_target(..., quantization=...)`) trains one
warm-start step and one PPOW step.

`python -m tests.test_target_configs` prints every config's parsed field values as JSON: run it before and after
reshaping the configs, and the two outputs must be equal."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml

from ppow_trl.data import DataConfig
from ppow_trl.evaluation import EvaluationConfig
from ppow_trl.target import load_target
from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer
from ppow_trl.training.parser import RecipeParser, read_config
from ppow_trl.training.ppow import PPOWConfig, PPOWTrainer
from ppow_trl.training.script_args import DataArguments, DrafterModelArguments
from tests.ppow_fixtures import tiny_greedy_dataset, tiny_ppow_config
from tests.test_drafting import make_drafter

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
ALL_YAMLS = sorted(CONFIGS.rglob("*.yaml"))
# A file or folder whose name starts with "_" is a base: included by configs, never run on its own.
RUN_YAMLS = [p for p in ALL_YAMLS if not any(part.startswith("_") for part in p.relative_to(CONFIGS).parts)]
VARIANTS = [p for p in ALL_YAMLS if "include" in yaml.safe_load(p.read_text())]
RUN_VARIANTS = [p for p in VARIANTS if p in RUN_YAMLS]
TARGET_YAMLS = [p for p in RUN_YAMLS if p.parent.name in ("llama-3.1-8b-instruct", "qwen3-8b")]
EMBEDDED_YAMLS = [p for p in RUN_YAMLS if p.parent.name == "smollm2-135m"]


def config_id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def recipe_parser(path: Path) -> RecipeParser:
    """The parser of the recipe that runs `path` (a run config's name starts with its stage)."""
    stage = path.stem
    if stage.startswith("ppow"):
        return RecipeParser(
            (DrafterModelArguments, DataArguments, PPOWConfig), hidden=PPOWConfig.is_ignored_grpo_field
        )
    if stage.startswith(("sft", "cst")):
        return RecipeParser((DrafterModelArguments, DataArguments, DrafterSFTConfig))
    if stage.startswith("evaluate"):
        return RecipeParser(EvaluationConfig)
    if stage.startswith("regenerate"):
        sys.path.insert(0, str(ROOT / "recipes"))
        try:
            regenerate = importlib.import_module("regenerate")
        finally:
            sys.path.pop(0)
        return RecipeParser((regenerate.RegenerateArguments, DataConfig))
    raise ValueError(f"no recipe runs {path}")


@cache
def parsed_values(
    path: Path, flags: tuple[str, ...] = (), recipe: Path | None = None
) -> dict[str, dict[str, str]]:
    """Every field of every dataclass the recipe of `recipe` (default: `path`) parses from `--config path
    *flags`, as repr strings."""
    outputs = recipe_parser(recipe or path).parse_args_and_config(["--config", str(path), *flags])
    return {
        type(o).__name__: {f.name: repr(getattr(o, f.name)) for f in dataclasses.fields(o)} for o in outputs
    }


def own_keys(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    config.pop("include", None)
    return config


def included(path: Path) -> list[Path]:
    includes = yaml.safe_load(path.read_text())["include"]
    return [path.parent / base for base in ([includes] if isinstance(includes, str) else includes)]


def as_flags(config: dict) -> list[str]:
    """`config` as command-line flags."""
    flags = []
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return flags


@pytest.mark.parametrize("path", RUN_VARIANTS, ids=config_id)
def test_a_config_that_includes_bases_is_its_bases_with_its_own_keys_on_the_command_line(path, tmp_path):
    bases = {}
    for base in included(path):  # later bases win
        bases.update(read_config(base))
    merged = tmp_path / "bases.yaml"
    merged.write_text(yaml.safe_dump(bases))
    expected = parsed_values(merged, tuple(as_flags(own_keys(path))), recipe=path)
    assert parsed_values(path) == expected


@pytest.mark.parametrize("path", VARIANTS, ids=config_id)
def test_a_config_states_only_its_differences_from_what_it_includes(path):
    inherited = {}
    for base in included(path):
        inherited.update(read_config(base))
    repeated = {k: v for k, v in own_keys(path).items() if k in inherited and inherited[k] == v}
    assert not repeated, f"{config_id(path)} repeats its base's {repeated}"


@pytest.mark.parametrize("path", TARGET_YAMLS, ids=config_id)
def test_target_yamls_parse_with_the_paper_settings(path):
    model_args, data_args, args = recipe_parser(path).parse_args_and_config(["--config", str(path)])
    assert model_args.target_name_or_path in ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B")
    assert data_args.draft_vocab_size == 32000
    if isinstance(args, PPOWConfig):
        assert args.window_size == 10 and args.num_generations == 8 and args.gamma in ("0.12", "auto")
        assert model_args.target_quantization == ("4bit" if "4bit" in path.name else None)
        assert model_args.drafter_name_or_path
    if "4bit" in path.name:  # `--target_quantization 4bit` on the full config's command line does the same
        assert set(own_keys(path)) == {"target_quantization", "output_dir"}


@pytest.mark.parametrize("path", EMBEDDED_YAMLS, ids=lambda p: p.name)
def test_embedded_target_yamls_parse_with_their_recipes(path):
    outputs = recipe_parser(path).parse_args_and_config(["--config", str(path)])
    if path.name.startswith("evaluate"):
        (config,) = outputs
        assert config.num_draft_tokens == "auto" and "plain" in config.baselines
        return
    if path.name.startswith("regenerate"):
        target_args, data_args = outputs
        assert target_args.target_name_or_path == "embedded" and data_args.dataset_name == "self_generated"
        return
    model_args, data_args, args = outputs
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
    assert logged and logged[0]["tau"] == pytest.approx(1.0 + logged[0]["accepted_length/mean"])
    assert 1.0 <= logged[0]["tau"] <= 1.0 + ppow.args.window_size


if __name__ == "__main__":
    json.dump({config_id(p): parsed_values(p) for p in RUN_YAMLS}, sys.stdout, indent=1, sort_keys=True)
