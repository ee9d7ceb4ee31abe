"""Command-line/YAML arguments shared by the recipes (`TrlParser` dataclasses)."""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, field

from transformers import Trainer
from trl import ModelConfig

from ppow_trl.data import DataConfig

logger = logging.getLogger(__name__)

# TRL's own LoRA options (declaration, default and help text), not a copy of them.
_LORA_FIELDS = (
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_rslora",
    "use_dora",
)
_trl_types = typing.get_type_hints(ModelConfig)
LoraArguments = dataclasses.make_dataclass(
    "LoraArguments",
    [
        (f.name, _trl_types[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(ModelConfig)
        if f.name in _LORA_FIELDS
    ],
)
LoraArguments.__doc__ = "LoRA options of the drafter: the fields of TRL's `ModelConfig` of the same names."


@dataclass
class TargetArguments:
    """The frozen target model."""

    target_name_or_path: str = field(
        default="embedded",
        metadata={
            "help": "Target: 'embedded' (SmolLM2-135M-Instruct), a model directory, a .gguf file or a Hub id."
        },
    )
    target_dtype: str = field(
        default="float32", metadata={"help": "Target parameter dtype (float32, bfloat16)."}
    )
    target_quantization: str | None = field(
        default=None, metadata={"help": "Load the target in bitsandbytes '4bit' or '8bit'."}
    )


@dataclass
class DrafterModelArguments(LoraArguments, TargetArguments):
    """The frozen target, and the drafter to train (new or saved) with optional LoRA (TRL's LoRA fields)."""

    drafter_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A drafter to start from: a directory or Hub id in this package's layout or a published one "
            "(eagle3 / speculators / medusa layout, e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B; the embedding comes "
            "from the target) or LoRA adapters on a saved drafter. None builds a new one (warm start only)."
        },
    )
    aux_layer_ids: list[int] | None = field(
        default=None,
        metadata={"help": "EAGLE-3 feature layers (HF hidden_states indices); None = [2, L//2, L-3]."},
    )
    init_layer_from_target: bool = field(
        default=False,
        metadata={
            "help": "New EAGLE-3 drafters: start the decoder layer from the target's last layer and fc from the "
            "deepest feature layer (the LM head and final norm always start from the target's)."
        },
    )


@dataclass
class DataArguments(DataConfig):
    """`DataConfig` on the command line: its `seed` is the training arguments' `seed` (both classes define it)."""

    seed: int = field(default=0, init=False, metadata={"help": "Set from the training arguments' seed."})


def lora_config(model_args: DrafterModelArguments):
    """A peft `LoraConfig` when `use_peft` is set (no `lora_target_modules`: the drafter class's
    LORA_TARGET_MODULES). No task type: a drafter is not a causal LM for peft's wrappers."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )


def resume_arg(value: str | None, output_dir: str) -> str | bool | None:
    """`--resume_from_checkpoint true` means the latest checkpoint in output_dir, or a fresh start when there is
    none yet, so one command both starts and continues a long run."""
    from transformers.trainer_utils import get_last_checkpoint

    if not (isinstance(value, str) and value.lower() in ("true", "last", "latest")):
        return value
    if os.path.isdir(output_dir) and get_last_checkpoint(output_dir):
        return True
    logger.info("no checkpoint in %s yet: starting from the beginning", output_dir)
    return None


def eval_split(args, data):
    """The held-out split for the Trainer, or None with evaluation turned off (and said so) when it is empty:
    a small dataset whose eval_fraction rounds to no prompt still trains."""
    if len(data.eval):
        return data.eval
    if args.eval_strategy != "no":
        logger.warning(
            "The eval split is empty (eval_fraction %s): evaluation is off for this run",
            data.report.get("config", {}).get("eval_fraction"),
        )
        args.eval_strategy = "no"
    return None


def evaluate_and_save(trainer: Trainer, prefix: str = "eval") -> None:
    """Held-out metrics, printed and written to `<output_dir>/<prefix>_results.json` (skipped without eval data)."""
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate(metric_key_prefix=prefix)
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)


def train_save_evaluate(trainer: Trainer, resume_from_checkpoint: str | None, evaluate: bool = True) -> None:
    """Train (resuming when asked, see `resume_arg`), save the drafter to output_dir, then evaluate it on
    held-out data (`evaluate=False`: not, e.g. when a benchmark scores the saved drafters itself)."""
    trainer.train(resume_from_checkpoint=resume_arg(resume_from_checkpoint, trainer.args.output_dir))
    trainer.save_model()
    if evaluate:
        evaluate_and_save(trainer)
    trainer.create_model_card()  # the saved drafter's card, now with the final held-out evaluation
