"""Data generation at scale: prompt writing and answer throughput against batch size, and the prompt filters.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_generation.py throughput --num-prompts 64
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_generation.py filters \
        --dataset-dir data/smollm2-135m-self-generated

`throughput`: the target writes --num-prompts user turns (Magpie, the pipeline's `write_prompts` path) at
each prompt batch size, then answers the same chat-templated prompts greedily at each answer batch size
(`batched_generate`, left-padded, prompts sorted by length), with finished rows refilled at each refill
batch size (`refill_generate`, what regeneration uses for greedy answers) and once with transformers'
continuous batching (`generate_batch`); answers are compared token for token with one-prompt-at-a-time greedy
decoding on the first --check prompts. Prints prompts/min and answer tokens/s per setting, the speedup over
the demo's batch 8, and the machine's load average before and after.

`filters`: the filters (default settings) over the prompts a dataset directory's run has written so far
(distinct share, drops per reason, task mix, length histogram), and an independent decontamination
re-check of the kept prompts: word n-gram tuples in plain Python sets (not the pipeline's hashed index)
against MT-Bench and HumanEval.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

from ppow_trl.data import DataConfig, batched_generate, load_prompts
from ppow_trl.data.filters import ContaminationIndex, FilterSettings, filter_prompts
from ppow_trl.data.refill import refill_generate
from ppow_trl.data.regeneration import make_generation_config, render
from ppow_trl.data.self_generated import write_prompts
from ppow_trl.target import eos_token_ids, load_target, pad_token_id

print = functools.partial(print, flush=True)  # noqa: A001 -- rows appear as they are measured


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def throughput(args: argparse.Namespace) -> None:
    target, tokenizer = load_target(args.target, dtype=args.dtype)
    print(
        f"target={args.target} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpu={platform.machine()} load before: {_load()}\n"
    )
    print("| prompt batch | prompts | ended | seconds | prompts/min |\n|---|---|---|---|---|")
    rows = []
    for batch in args.prompt_batch_sizes:
        config = DataConfig(
            dataset_name="self_generated",
            self_generated_prompts=args.num_prompts,
            prompt_batch_size=batch,
            prompt_shard_size=args.num_prompts,
            cache_dir=str(Path(args.scratch) / f"prompts-b{batch}"),
            seed=args.seed,
        )
        start = time.perf_counter()
        rows, _ = write_prompts(target, tokenizer, config, progress=False)
        seconds = time.perf_counter() - start
        ended = sum(r["ended"] for r in rows)
        print(f"| {batch} | {len(rows)} | {ended} | {seconds:.1f} | {60 * len(rows) / seconds:.1f} |")

    texts = [r["text"] for r in rows if r["ended"]] or [e.turns[0] for e in load_prompts("mt_bench")]
    prompts = [
        tokenizer(render(tokenizer, [{"role": "user", "content": t}], True), add_special_tokens=False)[
            "input_ids"
        ]
        for t in texts[: args.num_answers]
    ]
    eos, pad = eos_token_ids(target, tokenizer), pad_token_id(tokenizer)
    generation = make_generation_config(
        DataConfig(dataset_name="self_generated", max_new_tokens=args.max_new_tokens), eos, pad
    )
    warm_up = copy.deepcopy(generation)
    warm_up.max_new_tokens = 4
    batched_generate(target, prompts[:2], warm_up, pad, eos)
    reference = [batched_generate(target, [p], generation, pad, eos)[0] for p in prompts[: args.check]]

    print(f"\n{len(prompts)} answers, greedy, max_new_tokens={args.max_new_tokens}\n")
    print(
        "| answer engine | batch | new tokens | seconds | tokens/s | vs batch 8 | identical to one-at-a-time |"
    )
    print("|---|---|---|---|---|---|---|")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    base = None
    for batch in args.answer_batch_sizes:
        outputs: list[list[int]] = [[] for _ in prompts]
        start = time.perf_counter()
        for s in range(0, len(order), batch):
            chunk = order[s : s + batch]
            for i, out in zip(
                chunk, batched_generate(target, [prompts[i] for i in chunk], generation, pad, eos)
            ):
                outputs[i] = out
        seconds = time.perf_counter() - start
        tokens = sum(map(len, outputs))
        rate = tokens / seconds
        base = rate if batch == 8 else base
        same = sum(outputs[i] == reference[i] for i in range(len(reference)))
        ratio = f"{rate / base:.2f}x" if base else "-"
        print(
            f"| generate (left-padded) | {batch} | {tokens} | {seconds:.1f} | {rate:.1f} | {ratio} | {same}/{len(reference)} |"
        )
    for batch in args.refill_batch_sizes:
        start = time.perf_counter()
        outputs = refill_generate(target, prompts, args.max_new_tokens, eos, pad, batch)
        seconds = time.perf_counter() - start
        tokens = sum(map(len, outputs))
        same = sum(outputs[i] == reference[i] for i in range(len(reference)))
        ratio = f"{tokens / seconds / base:.2f}x" if base else "-"
        print(
            f"| refill (finished rows refilled) | {batch} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {ratio} | {same}/{len(reference)} |"
        )
    if args.continuous:
        start = time.perf_counter()
        result = target.generate_batch(prompts, generation_config=generation, progress_bar=False)
        seconds = time.perf_counter() - start
        outputs = [
            list(result[key].generated_tokens) for key in sorted(result, key=lambda k: int(k.split("_")[-1]))
        ]
        outputs = [out[: next((j + 1 for j, t in enumerate(out) if t in eos), len(out))] for out in outputs]
        tokens = sum(map(len, outputs))
        same = sum(outputs[i] == reference[i] for i in range(len(reference)))
        ratio = f"{tokens / seconds / base:.2f}x" if base else "-"
        print(
            f"| continuous batching (generate_batch) | - | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {ratio} | {same}/{len(reference)} |"
        )
    print(f"\nload after: {_load()}")


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def filters(args: argparse.Namespace) -> None:
    directory = Path(args.dataset_dir).expanduser()
    shards = sorted(directory.glob("prompts/*/shard-*.jsonl"))
    if not shards:
        raise SystemExit(f"no written prompts under {directory}/prompts: run recipes/regenerate.py first")
    written = [json.loads(line) for p in shards for line in p.read_text().splitlines()]
    settings = FilterSettings.from_config(DataConfig(dataset_name="self_generated"))
    kept_rows, report = filter_prompts(
        written, settings, ContaminationIndex.cached(settings.decontamination_ngram)
    )
    print(f"{len(shards)} prompt shards in {shards[0].parent}, default filter settings; load {_load()}")
    print(json.dumps(report, indent=1))
    kept = [row["text"] for row in kept_rows]
    reference: set[tuple[str, ...]] = set()
    for name in ("mt_bench", "humaneval"):
        for example in load_prompts(name):
            for turn in example.turns:
                reference |= _ngrams(turn, args.ngram)
    hits = [
        t
        for t in kept
        if (grams := _ngrams(t, args.ngram)) and len(grams & reference) / len(grams) >= args.threshold
    ]
    print(
        f"\nindependent re-check: {len(kept)} kept prompts, {len(hits)} with >= {args.threshold:.0%} of their "
        f"word {args.ngram}-grams in MT-Bench/HumanEval"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--target", default="embedded")
    t.add_argument("--dtype", default="float32")
    t.add_argument("--num-prompts", type=int, default=64)
    t.add_argument("--num-answers", type=int, default=64)
    t.add_argument("--check", type=int, default=8)
    t.add_argument(
        "--prompt-batch-sizes",
        type=int,
        nargs="*",
        default=[16, 64],
        help="none: answer MT-Bench first turns instead of prompts the target writes",
    )
    t.add_argument("--answer-batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    t.add_argument("--refill-batch-sizes", type=int, nargs="*", default=[32, 64])
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--continuous", action="store_true", help="also time transformers' generate_batch")
    t.add_argument("--scratch", default="/tmp/ppow_data_generation")
    t.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("filters")
    f.add_argument("--dataset-dir", required=True)
    f.add_argument("--ngram", type=int, default=8)
    f.add_argument("--threshold", type=float, default=0.2)
    args = parser.parse_args()
    throughput(args) if args.command == "throughput" else filters(args)


if __name__ == "__main__":
    main()
