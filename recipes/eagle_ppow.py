"""PPOW fine-tuning of a warm-started drafter (EAGLE-3 or Medusa) against its frozen target.

    python recipes/eagle_ppow.py --config recipes/configs/smollm2-135m/ppow_eagle3.yaml
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/eagle_ppow.py --config <yaml>
    OMP_NUM_THREADS=1 accelerate launch --config_file recipes/accelerate_configs/cpu_ddp.yaml \
        recipes/eagle_ppow.py --config <yaml>

Every field of `DrafterModelArguments`, `ppow_trl.data.DataConfig` and `ppow_trl.training.PPOWConfig`
can be set in the YAML file or on the command line; unknown keys are an error. `drafter_name_or_path`
is the warm-started drafter (recipes/sft_drafter.py) or a published one in the EAGLE-3 / speculators layout
(directory or Hub id); the data settings should match the warm start's so the cached regenerated data is
reused. `--push_to_hub --hub_model_id <id>` checks the Hub before training and uploads the drafter exported
for vLLM / SGLang with its model card when training ends. Interrupted runs resume with `--resume_from_checkpoint true`
(latest checkpoint in output_dir) or a checkpoint path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import TrainerCallback

from ppow_trl.data import build_training_data, make_feature_provider
from ppow_trl.io import load_drafter, locate_drafter
from ppow_trl.target import load_target
from ppow_trl.training import PPOWConfig, PPOWTrainer
from ppow_trl.training.card import hub_preflight, push_trained_drafter
from ppow_trl.training.parser import RecipeParser
from ppow_trl.training.script_args import (
    DataArguments,
    DrafterModelArguments,
    eval_split,
    evaluate_and_save,
    lora_config,
    train_save_evaluate,
)


def main(
    argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None, evaluate: bool = True
) -> PPOWTrainer:
    """Parse, train, save and evaluate; `callbacks` go to the trainer (e.g. a compute budget in benchmarks);
    `evaluate=False` skips the held-out evaluations (a benchmark that scores the saved drafters itself)."""
    parser = RecipeParser(
        (DrafterModelArguments, DataArguments, PPOWConfig), hidden=PPOWConfig.is_ignored_grpo_field
    )
    model_args, data_config, args = parser.parse_args_and_config(argv)
    data_config.seed = args.seed
    if not model_args.drafter_name_or_path:
        raise ValueError(
            "PPOW starts from a warm-started drafter: pass --drafter_name_or_path (recipes/sft_drafter.py)"
        )
    hub_token = hub_preflight(args)  # --push_to_hub: token and network checked before any training work
    source = locate_drafter(model_args.drafter_name_or_path)  # a missing or damaged drafter fails now
    target, tokenizer = load_target(
        model_args.target_name_or_path, model_args.target_dtype, model_args.target_quantization
    )
    drafter = load_drafter(source, target)  # ours or a published layout, checked against the target
    with args.main_process_first(desc="training data"):  # written once; the other processes read it
        data = build_training_data(data_config, target, tokenizer)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    # Results name the split they were measured on.
    shutil.copy(data.directory / "split.json", Path(args.output_dir) / "split.json")
    aux = drafter.config.aux_layer_ids or None
    trainer = PPOWTrainer(
        drafter,
        target,
        args,
        train_dataset=data.train,
        eval_dataset=eval_split(args, data),
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
        feature_provider=make_feature_provider(
            data_config, data, target, aux_layer_ids=aux, with_logits=True
        ),
        callbacks=callbacks,
    )
    print(f"gamma (drafter step / target verification) = {trainer.gamma:.4f}")
    if evaluate:
        evaluate_and_save(trainer, "warm_start")
    train_save_evaluate(trainer, args.resume_from_checkpoint, evaluate)
    if hub_token is not None:
        print(f"pushed the exported drafter: {push_trained_drafter(trainer, hub_token)}")
    return trainer


if __name__ == "__main__":
    main()
