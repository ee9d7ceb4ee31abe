"""Which acceptance does the PPOW policy gradient raise: sampled or greedy? A fixed-batch diagnostic.

    python benchmarks/ppow_temperature.py --drafter outputs/sft_a --temperatures 1.0 0.5

One rollout on `--sequences` training sequences (G=4 windows at 8 anchors each, the demo's PPOW config,
rewards only: no target KL, uniform anchors), then `--steps` Adam steps of the PPOW loss on that same
batch. Before and after, mean accepted length k at those anchors is measured twice: for windows sampled
at the rollout temperature (mean of `--samples` draws) and for greedy windows (what temperature-0
serving sees).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from transformers import AutoModel

from ppow_trl.data import build_training_data, make_feature_provider
from ppow_trl.decoding.drafting import draft_windows, window_targets
from ppow_trl.target import load_target
from ppow_trl.training import PPOWConfig, PPOWTrainer
from ppow_trl.training.acceptance import accepted_prefix_length
from ppow_trl.training.parser import RecipeParser
from ppow_trl.training.script_args import DataArguments, DrafterModelArguments


def mean_k(trainer: PPOWTrainer, batch: dict, temperature: float, samples: int) -> float:
    """Mean accepted length at the batch's anchors (one row per distinct sequence)."""
    g = trainer.args.num_generations
    args = (batch["features"][::g], batch["input_ids"][::g], batch["anchors"][::g], trainer.args.window_size)
    reference = window_targets(batch["input_ids"][::g], batch["anchors"][::g], trainer.args.window_size)[0]
    with torch.no_grad():
        ks = [
            accepted_prefix_length(
                draft_windows(trainer.model, *args, temperature=temperature, attention_mask=batch["attention_mask"][::g])
                .tokens[:, :, 0], reference,
            ).float().mean()
            for _ in range(samples if temperature > 0 else 1)
        ]  # fmt: skip
    return torch.stack(ks).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--config", default="recipes/configs/smollm2-135m/ppow_eagle3_from_scratch.yaml")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=20)
    cli = parser.parse_args()

    target, tokenizer = load_target("embedded")
    for temperature in cli.temperatures:
        _, data_config, args = RecipeParser((DrafterModelArguments, DataArguments, PPOWConfig)).parse_args_and_config(
            ["--config", cli.config, "--output_dir", "/tmp/ppow_temperature", "--eval_strategy", "no",
             "--gamma", "0.02", "--target_kl_coef", "0", "--use_adaw", "false",
             "--reward_funcs", "cost_aware_speedup", "--temperature", str(temperature)]
        )  # fmt: skip
        data = build_training_data(data_config, target, tokenizer)
        drafter = AutoModel.from_pretrained(cli.drafter)
        provider = make_feature_provider(
            data_config, data, target, aux_layer_ids=drafter.config.aux_layer_ids, with_logits=True
        )
        trainer = PPOWTrainer(drafter, target, args, data.train, tokenizer, feature_provider=provider)
        trainer.model.train()
        torch.manual_seed(0)
        rows = [data.train[i] for i in range(cli.sequences) for _ in range(args.num_generations)]
        batch = trainer._generate_and_score_completions(rows)
        before = mean_k(trainer, batch, temperature, cli.samples), mean_k(trainer, batch, 0.0, 1)
        optimizer = torch.optim.Adam(
            [p for p in trainer.model.parameters() if p.requires_grad], cli.learning_rate
        )
        for _ in range(cli.steps):
            trainer._compute_loss(trainer.model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        after = mean_k(trainer, batch, temperature, cli.samples), mean_k(trainer, batch, 0.0, 1)
        print(
            f"T={temperature}: sampled mean k {before[0]:.3f} -> {after[0]:.3f}, "
            f"greedy mean k {before[1]:.3f} -> {after[1]:.3f} ({cli.steps} steps on one batch)"
        )


if __name__ == "__main__":
    main()
