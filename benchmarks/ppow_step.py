"""Cost of one PPOW step versus one warm-start (SFT) step over the same sequences, embedded target.

    python benchmarks/ppow_step.py [--sequences 2] [--seq-len 256] [--window-size 5] [--num-generations 4]
        [--anchors 8] [--baseline group] [--proximity-span window]

Both steps see the same `--sequences` sequences. The SFT step: target features + labels, the 7-step
TTT loss forward/backward, optimizer. The PPOW step: one rollout over the GRPO batch (each sequence
repeated G times: target features once per distinct sequence, ADAW scores, G windows at each anchor,
packed target scoring of the windows for the proximity reward, rewards, group advantages), then the
clipped-surrogate + KL loss forward/backward and the optimizer. Also reports windows verified per second.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sft_step import embedded_setup  # noqa: E402

from ppow_trl.data import collate_sequences  # noqa: E402
from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer, PPOWConfig, PPOWTrainer  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--window-size", type=int, default=5)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--anchors", type=int, default=8)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--baseline", default="group", help="PPOWConfig.baseline (greedy: one more member)")
    parser.add_argument("--proximity-span", default="window", help="PPOWConfig.proximity_span")
    cli = parser.parse_args()

    target, tokenizer, rows, drafter = embedded_setup(cli.sequences, cli.seq_len, cli.draft_vocab_size)
    out = "/tmp/ppow_step_bench"
    sft = DrafterSFTTrainer(
        drafter, target, DrafterSFTConfig(output_dir=out, disable_tqdm=True), train_dataset=rows,
        processing_class=tokenizer,
    )  # fmt: skip
    ppow = PPOWTrainer(
        drafter, target,
        PPOWConfig(
            output_dir=out, window_size=cli.window_size, num_generations=cli.num_generations,
            per_device_train_batch_size=cli.sequences * cli.num_generations, anchors_per_sequence=cli.anchors,
            gamma="0.12", adaw_warmup_steps=0, use_cpu=True, disable_tqdm=True, baseline=cli.baseline,
            proximity_span=cli.proximity_span,
        ),
        Dataset.from_list(rows), tokenizer,
    )  # fmt: skip
    batch = collate_sequences(rows, tokenizer.pad_token_id)
    group = [row for row in rows for _ in range(cli.num_generations)]
    sft_opt, ppow_opt = sft.create_optimizer(), ppow.create_optimizer()
    sft.model.train()
    ppow.model.train()

    def sft_step() -> None:
        sft.compute_loss(sft.model, batch).backward()
        sft_opt.step()
        sft_opt.zero_grad()

    rollout_times, loss_times = [], []

    def ppow_step() -> None:
        start = time.perf_counter()
        inputs = ppow._generate_and_score_completions(group)
        rollout_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ppow._compute_loss(ppow.model, inputs).backward()
        ppow_opt.step()
        ppow_opt.zero_grad()
        loss_times.append(time.perf_counter() - start)

    sft_step(), ppow_step()  # warm-up
    rollout_times.clear(), loss_times.clear()
    sft_times = [timed(sft_step) for _ in range(cli.steps)]
    ppow_times = [timed(ppow_step) for _ in range(cli.steps)]
    windows = cli.sequences * cli.anchors * cli.num_generations
    sft_s, ppow_s = statistics.median(sft_times), statistics.median(ppow_times)
    print(
        f"sequences={cli.sequences} x {cli.seq_len} tokens, K={cli.window_size}, G={cli.num_generations}, "
        f"anchors/sequence={cli.anchors}, draft vocab={cli.draft_vocab_size}, threads={torch.get_num_threads()}"
    )
    print("| step | median s | ratio to SFT |\n|---|---|---|")
    print(f"| SFT warm start (TTT, 7 steps) | {sft_s:.3f} | 1.00 |")
    print(f"| PPOW (rollout + loss) | {ppow_s:.3f} | {ppow_s / sft_s:.2f} |")
    print(f"| - PPOW rollout | {statistics.median(rollout_times):.3f} | |")
    print(f"| - PPOW loss fwd+bwd+opt | {statistics.median(loss_times):.3f} | |")
    print(f"windows verified per second (rollout): {windows / statistics.median(rollout_times):.1f}")
    print(
        f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )


if __name__ == "__main__":
    main()
