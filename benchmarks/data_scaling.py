"""Held-out tau of a warm-started EAGLE-3 drafter vs training positions: regenerated, corpus and mixed data.

    HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 .venv/bin/python benchmarks/data_scaling.py \
        --positions 4096 16384 65536 --recipes regenerated corpus mixed --json outputs/data_scaling.json \
        --plot benchmarks/data_scaling.png

Target: the embedded SmolLM2-135M-Instruct (fp32, CPU). Regenerated pool: MT-Bench first turns, greedy,
`--max-new-tokens`, split by `--eval-fraction`; its eval split (target-greedy sequences) is the held-out set
of every point. Recipes at a budget of N training positions (supervised tokens):

- regenerated: the first regenerated train sequences, up to N positions (above the pool's size R: the
  whole pool, once; more would need regeneration, ~61 tok/s on an idle CPU);
- corpus: N tokens of the `--corpus` source (default pydoc_topics, ~113k tokens) in `--seq-len` chunks
  (`build_corpus`; what `corpus_mix='corpus_only'` trains on);
- mixed: every regenerated train sequence plus N - R corpus tokens (`build_training_data` with
  `corpus_mix='append'`; only for N > R).

Every point trains a fresh drafter (`build_drafter`, LM head from the target's rows of a draft vocabulary
counted on that point's train split) with `DrafterSFTTrainer` for `--epochs` epochs, then measures
teacher-forced greedy chain tau at K=`--window` on the eval split (`dataset_acceptance`) and, with
`--decode-prompts`, real speculative decoding tau on a few eval prompts (`ppow_trl.decoding.speculative.generate`).
Rows go to `--json` as they finish (a rerun skips finished points), then a markdown table and a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset
from transformers import PreTrainedModel

from ppow_trl.data import DataConfig, TargetFeatureProvider, build_corpus, build_training_data, open_corpus
from ppow_trl.data.draft_vocab import build_draft_vocab
from ppow_trl.decoding import generate
from ppow_trl.decoding.cost import measure_gamma
from ppow_trl.metrics import acceptance_metrics
from ppow_trl.models.build import build_drafter
from ppow_trl.target import load_target
from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer
from ppow_trl.training.acceptance import dataset_acceptance

RECIPES = ("regenerated", "corpus", "mixed")
IDLE_REGEN_TOKENS_PER_S = 61.0  # batched greedy regeneration, measured on an idle machine


def positions(dataset: Dataset) -> int:
    return sum(sum(mask) for mask in dataset["loss_mask"])


def prefix_up_to(dataset: Dataset, budget: int) -> Dataset:
    """The first sequences of `dataset` whose supervised positions sum to at most `budget`."""
    total, rows = 0, 0
    for mask in dataset["loss_mask"]:
        if total + sum(mask) > budget:
            break
        total, rows = total + sum(mask), rows + 1
    return dataset.select(range(rows))


def recipe_train(recipe: str, budget: int, pool, base: DataConfig, target, tokenizer) -> Dataset | None:
    """The train split of `recipe` at `budget` positions (None when the recipe has no such point)."""
    regenerated = positions(pool.train)
    if recipe == "regenerated":  # budgets above the pool give the whole pool
        return prefix_up_to(pool.train, budget)
    if recipe == "corpus":
        source = open_corpus(base.corpus_name)
        return build_corpus(source, tokenizer, replace(base, corpus_max_tokens=budget)).dataset
    if budget <= regenerated:
        return None
    config = replace(base, corpus_max_tokens=budget - regenerated, corpus_mix="append")
    return build_training_data(config, target, tokenizer).train


def training_steps(sequences: int, cli) -> int:
    """Optimizer steps of `--epochs` passes over `sequences` at `--batch-size`."""
    return math.ceil(cli.epochs * sequences / cli.batch_size)


def train_point(train: Dataset, target, tokenizer, cli, output_dir: str):
    vocab = build_draft_vocab(
        draft_vocab_size=cli.draft_vocab_size,
        vocab_size=target.config.vocab_size,
        sequences=train["input_ids"],
        loss_masks=train["loss_mask"],
    )
    torch.manual_seed(cli.seed)
    drafter = build_drafter("eagle3", target, vocab)
    args = DrafterSFTConfig(
        output_dir=output_dir,
        max_steps=training_steps(len(train), cli),
        per_device_train_batch_size=cli.batch_size,
        learning_rate=cli.learning_rate,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        window_size=cli.ttt_steps,
        eval_window_size=cli.window,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cli.seed,
    )
    trainer = DrafterSFTTrainer(drafter, target, args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    return drafter.eval(), vocab


def decoding_tau(target, drafter, eval_: Dataset, cli) -> float:
    """Real greedy speculative decoding (batch 1): generated tokens / verification forwards, pooled."""
    tokens = forwards = 0
    for row in eval_.select(range(min(cli.decode_prompts, len(eval_)))):
        prompt = row["input_ids"][: row["loss_mask"].index(1)]
        out = generate(
            target, drafter, torch.tensor([prompt]), num_draft_tokens=cli.window, max_new_tokens=64
        )
        tokens += int(out.new_tokens.sum())
        forwards += int(out.rounds_per_row.sum())
    return tokens / forwards


def eval_coverage(vocab, eval_: Dataset) -> float:
    """Fraction of the eval split's supervised tokens inside the draft vocabulary."""
    tokens = [t for ids, mask in zip(eval_["input_ids"], eval_["loss_mask"]) for t, m in zip(ids, mask) if m]
    return float(vocab.t2d[torch.tensor(tokens)].float().mean())


def run_point(
    recipe: str, budget: int, train: Dataset, data_s: float, pool, target, tokenizer, cli
) -> tuple[dict, PreTrainedModel]:
    """Train a drafter on `train`, evaluate it on the pool's eval split; returns the result row and it."""
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as output_dir:
        start = time.perf_counter()
        drafter, vocab = train_point(train, target, tokenizer, cli, output_dir)
        train_s = time.perf_counter() - start
    provider = TargetFeatureProvider.online(target, drafter.config.aux_layer_ids, with_logits=False)
    start = time.perf_counter()
    accepted, _ = dataset_acceptance(drafter, provider, pool.eval, cli.window, tokenizer.pad_token_id, 8)
    metrics = acceptance_metrics(accepted, cli.window)
    eval_s = time.perf_counter() - start
    regenerated = sum(sum(m) for m, turns in zip(train["loss_mask"], train["num_turns"]) if turns > 0)
    row = {
        "recipe": recipe,
        "budget": budget,
        "positions": positions(train),
        "regenerated_positions": regenerated,
        "sequences": len(train),
        "epochs": cli.epochs,
        "steps": training_steps(len(train), cli),
        "tau": metrics["tau"],
        "alpha": [metrics[f"alpha_{j + 1}"] for j in range(cli.window)],
        "eval_vocab_coverage": eval_coverage(vocab, pool.eval),
        "data_s": data_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "cpu_s": time.process_time() - cpu,
        "regen_idle_s": regenerated / IDLE_REGEN_TOKENS_PER_S,
        "decode_tau": decoding_tau(target, drafter, pool.eval, cli) if cli.decode_prompts else None,
    }
    return row, drafter


def label(row: dict) -> str:
    return row["recipe"] if row["epochs"] == 1 else f"{row['recipe']} x{row['epochs']:g} epochs"


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | positions (regenerated) | seqs | steps | tau K=5 (teacher-forced) | alpha_1 | decode tau | "
        "eval vocab coverage | data s | train s | eval s | process CPU s | regeneration at 61 tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (RECIPES.index(r["recipe"]), r["epochs"], r["positions"])):
        decode = f"{r['decode_tau']:.2f}" if r["decode_tau"] is not None else "-"
        lines.append(
            f"| {label(r)} | {r['positions']} ({r['regenerated_positions']}) | {r['sequences']} | {r['steps']} | "
            f"{r['tau']:.3f} | {r['alpha'][0]:.3f} | {decode} | {r['eval_vocab_coverage']:.3f} | "
            f"{r['data_s']:.0f} | {r['train_s']:.0f} | {r['eval_s']:.0f} | {r['cpu_s']:.0f} | "
            f"{r['regen_idle_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Left: tau vs unique training positions at one epoch. Right: every point vs optimizer steps,
    labelled with its unique positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for color, recipe in zip(("C0", "C3", "C2"), RECIPES):
        mine = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r["positions"])
        one_epoch = [(r["positions"], r["tau"]) for r in mine if r["epochs"] == 1]
        if one_epoch:
            left.plot(*zip(*one_epoch), marker="o", color=color, label=recipe)
        if mine:
            right.scatter([r["steps"] for r in mine], [r["tau"] for r in mine], color=color, label=recipe)
        for r in mine:
            right.annotate(f"{r['positions'] / 1024:.1f}k", (r["steps"], r["tau"]), fontsize=7,
                           xytext=(3, 3), textcoords="offset points")  # fmt: skip
    left.set_xscale("log", base=2)
    left.set_xlabel("unique training positions, one epoch")
    left.set_ylabel("held-out teacher-forced tau, K=5")
    right.set_xlabel("optimizer steps (labels: unique positions)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--corpus", default="pydoc_topics")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-fraction", type=float, default=0.3)
    parser.add_argument("--draft-vocab-size", type=int, default=2048)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--ttt-steps", type=int, default=7)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--decode-prompts", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="outputs/data_scaling.json")
    parser.add_argument("--plot", default="benchmarks/data_scaling.png")
    parser.add_argument("--gamma", action="store_true", help="measure gamma of the last trained drafter")
    cli = parser.parse_args()

    target, tokenizer = load_target("embedded")
    base = DataConfig(
        dataset_name="mt_bench",
        max_turns=1,
        max_new_tokens=cli.max_new_tokens,
        eval_fraction=cli.eval_fraction,
        regen_batch_size=16,
        draft_vocab_size=cli.draft_vocab_size,
        corpus_name=cli.corpus,
        corpus_seq_len=cli.seq_len,
    )
    start = time.perf_counter()
    pool = build_training_data(replace(base, corpus_name=None), target, tokenizer)
    print(f"regenerated pool: {pool.report['train_positions']} train / {positions(pool.eval)} eval positions, "
          f"argmax==next {pool.report['argmax_match_fraction']}, {time.perf_counter() - start:.0f} s")  # fmt: skip

    path = Path(cli.json)
    rows = json.loads(path.read_text()) if path.is_file() else []
    drafter = None
    for budget in cli.positions:
        for recipe in cli.recipes:
            done = [r for r in rows if r["recipe"] == recipe and r["epochs"] == cli.epochs]
            if any(r["budget"] == budget for r in done):
                continue
            start = time.perf_counter()
            train = recipe_train(recipe, budget, pool, base, target, tokenizer)
            if train is None or any(r["positions"] == positions(train) for r in done):
                print(f"skip {recipe} at {budget}: no new point (regenerated pool: {positions(pool.train)})")
                continue
            row, drafter = run_point(
                recipe, budget, train, time.perf_counter() - start, pool, target, tokenizer, cli
            )
            rows.append(row)
            print(json.dumps(row))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=1))

    setting = (
        f"embedded SmolLM2-135M fp32, CPU {platform.machine()} threads={torch.get_num_threads()}, "
        f"batch {cli.batch_size}, TTT {cli.ttt_steps}, draft vocab {cli.draft_vocab_size}"
    )
    print(
        f"\n{setting}; eval: {len(pool.eval)} regenerated MT-Bench answers, {positions(pool.eval)} positions\n"
    )
    print(table(rows))
    if rows:
        plot(rows, cli.plot, setting)
    if cli.gamma and drafter is not None:
        print(
            f"\ngamma (drafter step / {cli.window + 1}-token verify): {measure_gamma(target, drafter, cli.window):.4f}"
        )


if __name__ == "__main__":
    main()
