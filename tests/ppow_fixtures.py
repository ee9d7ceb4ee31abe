"""A tiny greedy-regenerated dataset and PPOW config shared by the PPOW tests and the 2-process script."""

from __future__ import annotations

import torch
from datasets import Dataset

from ppow_trl.training.ppow import PPOWConfig

PROMPT_LEN, NEW_TOKENS = 6, 20


def tiny_greedy_dataset(target, num_sequences: int = 16, seed: int = 0) -> Dataset:
    """Sequences the target generated greedily from random prompts; loss mask on the generated part."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, target.config.vocab_size - 20, (num_sequences, PROMPT_LEN), generator=g)
    with torch.no_grad():
        seqs = target.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    mask = [0] * PROMPT_LEN + [1] * NEW_TOKENS
    return Dataset.from_list(
        [{"input_ids": s.tolist(), "loss_mask": mask, "index": i} for i, s in enumerate(seqs)]
    )


def tiny_ppow_config(output_dir, **overrides) -> PPOWConfig:
    fields = dict(
        output_dir=str(output_dir), window_size=4, num_generations=4, per_device_train_batch_size=8,
        anchors_per_sequence=4, max_steps=4, gamma="0.12", adaw_warmup_steps=2, save_strategy="no",
        use_cpu=True, per_device_eval_batch_size=8, learning_rate=1e-3, seed=0,
    )  # fmt: skip
    fields.update(overrides)
    return PPOWConfig(**fields)
