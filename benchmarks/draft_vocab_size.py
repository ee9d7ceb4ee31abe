"""How large a draft vocabulary pays: held-out coverage against the drafter's measured per-step cost.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/draft_vocab_size.py \
        --dataset-dir data/smollm2-135m-self-generated

For each size N the vocabulary is the N most frequent answer tokens of the dataset's train split (the
EAGLE-3 recipe, `build_draft_vocab`); coverage is the share of held-out answer tokens (the eval split: the
target's greedy tokens, so the tokens a greedy drafter must propose) inside it, an upper bound on every
alpha_j. The cost is one chain-drafting step of an EAGLE-3 drafter of that size in units of a plain target
step (`measure_costs`, uncached, this machine), and gamma(K=3) the same step against a 4-token verification.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ppow_trl.data import DataConfig, build_training_data
from ppow_trl.data.draft_vocab import build_draft_vocab, count_assistant_tokens
from ppow_trl.decoding.cost import measure_costs
from ppow_trl.models.build import build_drafter
from ppow_trl.target import load_target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-costs", action="store_true", help="coverage only (no timing: for a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target, tokenizer = load_target("embedded")
    config = DataConfig(dataset_name=args.dataset_dir, sanity_check=False)  # counting needs no target check
    data = build_training_data(config, target, tokenizer, progress=False)
    vocab_size = target.config.vocab_size
    train = count_assistant_tokens(data.train["input_ids"], data.train["loss_mask"], vocab_size)
    held_out = count_assistant_tokens(data.eval["input_ids"], data.eval["loss_mask"], vocab_size)
    print(
        f"train answer tokens {int(train.sum())} ({int((train > 0).sum())} distinct), held-out answer tokens "
        f"{int(held_out.sum())}; threads={torch.get_num_threads()} load={os.getloadavg()[0]:.2f}\n"
    )
    print("| draft vocabulary | train coverage | held-out coverage | drafter step / c(1) | gamma(K=3) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        vocab = build_draft_vocab(train, size)
        inside = vocab.t2d.to(torch.bool)
        coverage = float(held_out[inside].sum() / held_out.sum())
        step, gamma = "-", "-"
        if not args.no_costs:
            drafter = build_drafter("eagle3", target, vocab)
            costs = measure_costs(target, drafter, max_tokens=4, use_cache=False)
            step, gamma = f"{costs.draft_step / costs.verify[0]:.3f}", f"{costs.gamma(3):.3f}"
        print(f"| {size} | {vocab.coverage:.4f} | {coverage:.4f} | {step} | {gamma} |")


if __name__ == "__main__":
    main()
