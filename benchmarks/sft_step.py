"""Speed of one EAGLE-3 warm-start step on the embedded target: tokens/s and where the time goes.

    python benchmarks/sft_step.py [--batch-size 4] [--seq-len 256] [--ttt-steps 7] [--draft-vocab-size 8192]

A step is split into: the frozen target forward (features), the target labels (LM head in vocabulary chunks:
draft-vocabulary logits, full logsumexp and argmax), the drafter's TTT unroll + loss forward and backward,
and the optimizer step. Sequences are chat-templated MT-Bench questions packed to `seq-len` tokens with
every position supervised (the most loss work per token). Wall time and process CPU time are both printed:
on a shared machine the CPU-time shares are the steadier measure of where the work goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch

from ppow_trl.data import collate_sequences, load_prompts
from ppow_trl.data.draft_vocab import build_draft_vocab
from ppow_trl.models.build import build_drafter
from ppow_trl.target import load_target
from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer
from ppow_trl.training.losses import target_labels


def packed_sequences(tokenizer, count: int, length: int) -> list[dict]:
    """`count` sequences of `length` tokens cut from chat-templated MT-Bench questions."""
    ids: list[int] = []
    for example in load_prompts("mt_bench"):
        messages = [{"role": "user", "content": turn} for turn in example.turns]
        ids += tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        if len(ids) >= count * length:
            break
    return [
        {"input_ids": ids[i * length : (i + 1) * length], "loss_mask": [1] * length, "index": i}
        for i in range(count)
    ]


def embedded_setup(count: int, length: int, draft_vocab_size: int):
    """The embedded target, `count` packed sequences and a fresh seeded EAGLE-3 drafter whose draft
    vocabulary is built from them (shared by the step benchmarks)."""
    target, tokenizer = load_target("embedded")
    rows = packed_sequences(tokenizer, count, length)
    vocab = build_draft_vocab(
        draft_vocab_size=draft_vocab_size,
        vocab_size=target.config.vocab_size,
        sequences=[r["input_ids"] for r in rows],
        loss_masks=[r["loss_mask"] for r in rows],
    )
    torch.manual_seed(0)
    return target, tokenizer, rows, build_drafter("eagle3", target, vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ttt-steps", type=int, default=7)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    cli = parser.parse_args()

    target, tokenizer, rows, drafter = embedded_setup(cli.batch_size, cli.seq_len, cli.draft_vocab_size)
    args = DrafterSFTConfig(output_dir="/tmp/sft_step_bench", window_size=cli.ttt_steps, disable_tqdm=True)
    trainer = DrafterSFTTrainer(drafter, target, args, train_dataset=rows, processing_class=tokenizer)
    model = trainer.model.train()
    optimizer = trainer.create_optimizer()
    batch = collate_sequences(rows, tokenizer.pad_token_id)
    lm_head = target.get_output_embeddings()

    phases = ("target forward", "target labels", "drafter fwd+bwd", "optimizer")
    wall: dict[str, list[float]] = {name: [] for name in phases}
    cpu: dict[str, list[float]] = {name: [] for name in phases}
    for step in range(cli.warmup + cli.steps):
        marks = [(time.perf_counter(), time.process_time())]
        features = trainer.feature_provider(batch)
        marks.append((time.perf_counter(), time.process_time()))
        labels = target_labels(
            features.last_hidden_state, lm_head, drafter.target_ids_of_draft_vocab(), args.label_chunk_size
        )
        marks.append((time.perf_counter(), time.process_time()))
        loss, _ = trainer._ttt_loss(model, batch, features.aux_hidden_states, labels)
        loss.backward()
        marks.append((time.perf_counter(), time.process_time()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), time.process_time()))
        if step >= cli.warmup:
            for name, (w0, c0), (w1, c1) in zip(phases, marks, marks[1:]):
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)

    wall_med = {name: statistics.median(values) for name, values in wall.items()}
    cpu_med = {name: statistics.median(values) for name, values in cpu.items()}
    total, total_cpu = sum(wall_med.values()), sum(cpu_med.values())
    tokens = cli.batch_size * cli.seq_len
    print(
        f"embedded target (SmolLM2-135M, fp32), EAGLE-3 drafter, K={cli.ttt_steps}, "
        f"draft vocab {drafter.config.draft_vocab_size}, batch {cli.batch_size} x {cli.seq_len} tokens, "
        f"torch threads {torch.get_num_threads()}, median of {cli.steps} steps after {cli.warmup} warm-up"
    )
    print(f"  {'phase':<16} {'wall ms':>8} {'share':>6}  {'cpu ms':>8} {'share':>6}")
    for name in phases:
        print(
            f"  {name:<16} {wall_med[name] * 1000:8.0f} {100 * wall_med[name] / total:5.1f}%  "
            f"{cpu_med[name] * 1000:8.0f} {100 * cpu_med[name] / total_cpu:5.1f}%"
        )
    print(f"  {'step':<16} {total * 1000:8.0f}         {total_cpu * 1000:8.0f}")
    print(f"  tokens/s (wall): {tokens / total:.0f}")


if __name__ == "__main__":
    main()
