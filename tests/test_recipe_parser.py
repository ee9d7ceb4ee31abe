"""The recipes' command line (`RecipeParser`): `include:` bases, "did you mean" for unknown keys, hidden
rejected options, CPU defaults and the refusal of a distributed launch that would not be distributed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers.training_args import ParallelMode

from ppow_trl.data import DataConfig
from ppow_trl.training import DrafterSFTConfig, PPOWConfig
from ppow_trl.training.parser import (
    ConfigError,
    RecipeParser,
    check_distributed,
    has_accelerator,
    launch_command,
    read_config,
)
from ppow_trl.training.script_args import DataArguments, DrafterModelArguments, TargetArguments


def test_include_merges_bases_and_the_including_file_wins(tmp_path):
    (tmp_path / "base.yaml").write_text("max_new_tokens: 64\neval_fraction: 0.1\ndataset_name: mt_bench\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "variant.yaml").write_text("include: ../base.yaml\nmax_new_tokens: 128\n")
    target, data = RecipeParser((TargetArguments, DataConfig)).parse_args_and_config(
        ["--config", str(tmp_path / "sub" / "variant.yaml"), "--eval_fraction", "0.3"]
    )
    assert (data.max_new_tokens, data.dataset_name, data.eval_fraction) == (128, "mt_bench", 0.3)
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        read_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        read_config(tmp_path / "missing.yaml")


def test_unknown_keys_name_close_fields(tmp_path):
    parser = RecipeParser((TargetArguments, DataConfig))
    (tmp_path / "bad.yaml").write_text("max_new_tokns: 3\nzzzz: 1\n")
    with pytest.raises(ConfigError, match=r"max_new_tokns \(did you mean max_new_tokens") as error:
        parser.parse_args_and_config(["--config", str(tmp_path / "bad.yaml")])
    assert "zzzz\n" in str(error.value) + "\n" and "fail_with_unknown_args" not in str(error.value)
    with pytest.raises(
        ConfigError, match=r"command-line argument.*\n  eval_fractoin \(did you mean eval_fraction"
    ):
        parser.parse_args_and_config(["--eval_fractoin", "0.2"])


def test_ppow_help_hides_the_grpo_options_it_rejects():
    parser = RecipeParser(
        (DrafterModelArguments, DataArguments, PPOWConfig), hidden=PPOWConfig.is_ignored_grpo_field
    )
    text = parser.format_help()
    assert "--window_size" in text and "--num_generations" in text
    for rejected in ("--use_vllm", "--vllm_mode", "--beta", "--max_completion_length"):
        assert rejected not in text, rejected
    # Hidden, not removed: a value still parses, so PPOWConfig refuses it with its own message.
    with pytest.raises(ValueError, match="beta"):
        parser.parse_args_and_config(["--output_dir", "x", "--dataset_name", "mt_bench", "--beta", "0.5"])


def test_training_data_must_be_named_and_the_error_lists_the_choices(tmp_path):
    # No default: an evaluation set silently becoming the training data would void every held-out number.
    parser = RecipeParser((DrafterModelArguments, DataArguments, DrafterSFTConfig))
    with pytest.raises(
        ValueError, match=r"dataset_name is required .*self_generated.*mt_bench.*regenerate\.py"
    ):
        parser.parse_args_and_config(["--output_dir", str(tmp_path)])
    (tmp_path / "no_data.yaml").write_text("max_new_tokens: 8\n")
    with pytest.raises(ValueError, match="dataset_name is required"):
        parser.parse_args_and_config(
            ["--config", str(tmp_path / "no_data.yaml"), "--output_dir", str(tmp_path)]
        )
    with pytest.raises(ValueError, match="dataset_name is required"):
        DataConfig(max_new_tokens=8)
    _, data, _ = parser.parse_args_and_config(["--output_dir", str(tmp_path), "--dataset_name", "humaneval"])
    assert data.dataset_name == "humaneval"


def test_cpu_machines_default_to_use_cpu_so_launchers_run_ddp():
    _, _, args = RecipeParser((DrafterModelArguments, DataArguments, DrafterSFTConfig)).parse_args_and_config(
        ["--output_dir", "x", "--dataset_name", "mt_bench"]
    )
    assert args.use_cpu is (not has_accelerator())


def test_a_launch_of_several_processes_that_would_train_alone_is_refused(monkeypatch):
    # The check reads WORLD_SIZE and the arguments' parallel mode; arguments built under a fake WORLD_SIZE
    # would try to join a process group, so the parsed arguments are stood in for by their parallel mode.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="cpu_ddp.yaml"):
        check_distributed(SimpleNamespace(parallel_mode=ParallelMode.NOT_PARALLEL))
    check_distributed(SimpleNamespace(parallel_mode=ParallelMode.DISTRIBUTED))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_distributed(SimpleNamespace(parallel_mode=ParallelMode.NOT_PARALLEL))


def test_an_output_dir_that_is_a_file_fails_before_any_work(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    parser = RecipeParser((DrafterModelArguments, DataArguments, DrafterSFTConfig))
    with pytest.raises(ConfigError, match="is a file"):
        parser.parse_args_and_config(
            ["--output_dir", str(tmp_path / "results"), "--dataset_name", "mt_bench"]
        )


def test_cards_record_the_launch_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["recipes/eagle_ppow.py", "--config", "my config.yaml"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_command() == "python recipes/eagle_ppow.py --config 'my config.yaml'"
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_command().startswith("accelerate launch --num_processes 4 recipes/eagle_ppow.py")
