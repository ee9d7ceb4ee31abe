"""Supervised warm start of a drafter (EAGLE-3 or Medusa) for a frozen target.

    python recipes/sft_drafter.py --config recipes/configs/smollm2-135m/sft_eagle3.yaml
    accelerate launch recipes/sft_drafter.py --config <yaml> --max_steps 500

Every field of `DrafterModelArguments` (below), `ppow_trl.data.DataConfig` and
`ppow_trl.training.DrafterSFTConfig` can be set in the YAML file or on the command line (the command line
wins); unknown keys are an error. One `seed` serves training and (sampled) regeneration.
Pass `--drafter_name_or_path <saved drafter>` to continue training a drafter (continued SFT).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import TrainerCallback, set_seed

from ppow_trl.data import DataConfig, build_training_data, make_feature_provider
from ppow_trl.io import load_drafter, locate_drafter
from ppow_trl.models.build import build_drafter
from ppow_trl.target import load_target
from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer
from ppow_trl.training.card import hub_preflight, push_trained_drafter
from ppow_trl.training.parser import RecipeParser
from ppow_trl.training.script_args import (
    DataArguments,
    DrafterModelArguments,
    eval_split,
    lora_config,
    train_save_evaluate,
)


def parse_args(argv: list[str] | None = None) -> tuple[DrafterModelArguments, DataConfig, DrafterSFTConfig]:
    """Parse the command line and an optional YAML `--config` file."""
    parser = RecipeParser((DrafterModelArguments, DataArguments, DrafterSFTConfig))
    model_args, data_config, args = parser.parse_args_and_config(argv)
    data_config.seed = args.seed
    return model_args, data_config, args


def main(
    model_args: DrafterModelArguments,
    data_config: DataConfig,
    args: DrafterSFTConfig,
    callbacks: list[TrainerCallback] | None = None,
    evaluate: bool = True,
) -> DrafterSFTTrainer:
    """Train, save and evaluate; `callbacks` go to the trainer (e.g. a compute budget in benchmarks);
    `evaluate=False` skips the held-out evaluation (a benchmark that scores the saved drafter itself)."""
    hub_token = hub_preflight(args)  # --push_to_hub: token and network checked before any training work
    # A start drafter (continued SFT) that is missing, damaged or for another target fails before any data work.
    source = locate_drafter(model_args.drafter_name_or_path) if model_args.drafter_name_or_path else None
    target, tokenizer = load_target(
        model_args.target_name_or_path, model_args.target_dtype, model_args.target_quantization
    )
    start = load_drafter(source, target) if source else None  # ours or a published layout
    with args.main_process_first(desc="training data"):  # written once; the other processes read it
        data = build_training_data(data_config, target, tokenizer)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    # The split (and its data fingerprint) next to the drafter, for results and the model card.
    shutil.copy(data.directory / "split.json", Path(args.output_dir) / "split.json")
    set_seed(args.seed)
    if start is not None:
        drafter = start
    elif args.drafter_type == "eagle3":
        drafter = build_drafter(
            "eagle3",
            target,
            data.draft_vocab,
            init_layer=model_args.init_layer_from_target,
            aux_layer_ids=model_args.aux_layer_ids,
        )
    else:
        drafter = build_drafter("medusa", target, data.draft_vocab, num_heads=args.medusa_num_heads)
    aux = drafter.config.aux_layer_ids or None  # the layers an EAGLE-3 drafter reads; Medusa reads none
    provider = make_feature_provider(data_config, data, target, aux_layer_ids=aux, with_logits=False)
    peft_config = lora_config(model_args)
    trainer = DrafterSFTTrainer(
        drafter,
        target,
        args,
        train_dataset=data.train,
        eval_dataset=eval_split(args, data),
        feature_provider=provider,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    train_save_evaluate(trainer, args.resume_from_checkpoint, evaluate)
    if hub_token is not None:
        print(f"pushed the exported drafter: {push_trained_drafter(trainer, hub_token)}")
    return trainer


if __name__ == "__main__":
    main(*parse_args())
