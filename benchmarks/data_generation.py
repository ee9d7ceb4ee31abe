"""Data generation at scale: prompt writing and answer throughput against batch size, and the prompt filters.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_generation.py throughput --num-prompts 64
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_generation.py filters \
        --dataset-dir data/smollm2-135m-self-generated

`throughput`: the target writes --num-prompts user turns (Magpie, the pipeline's `write_prompts` path) at
each prompt batch size (or, with --prompts-from, the prompts a dataset directory holds are used), then answers
the chat-templated prompts greedily with each engine: left-padded batches of prompts sorted by length
(`batched_generate`) on transformers' `DynamicCache` and on the growing cache regeneration uses, finished rows
refilled (`refill_generate`), optionally transformers' continuous batching (`generate_batch`). Engines run
interleaved for --repeats rounds; rates are answer tokens per CPU-second of this process (time slices other
processes take do not count). Answers are compared token for token with one-prompt-at-a-time greedy decoding
on the first --check prompts. Prints prompts/min, tokens per CPU-second per round, the speedup over
`DynamicCache` at batch 8, and the machine's load average before and after.

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
import statistics
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

    if args.prompts_from:  # prompts a dataset directory's run has written (the workload regeneration answers)
        shards = sorted(Path(args.prompts_from).glob("prompts/*/shard-*.jsonl"))
        rows = [json.loads(line) for shard in shards for line in shard.read_text().splitlines()]
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
    reference = [
        batched_generate(target, [p], generation, pad, eos, growing_cache=False)[0]
        for p in prompts[: args.check]
    ]

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    def static(batch: int, growing: bool) -> list[list[int]]:
        outputs: list[list[int]] = [[] for _ in prompts]
        for s in range(0, len(order), batch):
            chunk = order[s : s + batch]
            answers = batched_generate(
                target, [prompts[i] for i in chunk], generation, pad, eos, growing_cache=growing
            )
            for i, answer in zip(chunk, answers):
                outputs[i] = answer
        return outputs

    def continuous() -> list[list[int]]:
        result = target.generate_batch(prompts, generation_config=generation, progress_bar=False)
        outputs = [
            list(result[key].generated_tokens) for key in sorted(result, key=lambda k: int(k.split("_")[-1]))
        ]
        return [out[: next((j + 1 for j, t in enumerate(out) if t in eos), len(out))] for out in outputs]

    arms = [
        ("generate (left-padded, transformers' DynamicCache)", b, functools.partial(static, b, False))
        for b in args.stock_cache_batch_sizes
    ]
    arms += [
        ("generate (left-padded, growing cache)", b, functools.partial(static, b, True))
        for b in args.answer_batch_sizes
    ]
    arms += [
        (
            "refill (finished rows refilled, growing cache)",
            b,
            functools.partial(refill_generate, target, prompts, args.max_new_tokens, eos, pad, b),
        )
        for b in args.refill_batch_sizes
    ]
    arms += (
        [("transformers continuous batching (generate_batch)", "-", continuous)] if args.continuous else []
    )
    # Arms interleaved, `--repeats` rounds; rates per CPU-second of this process (time slices given to other
    # processes on a shared machine do not count; with one torch thread that is the compute time).
    rates: dict[int, list[float]] = {i: [] for i in range(len(arms))}
    outputs_of: dict[int, list[list[int]]] = {}
    for _ in range(args.repeats):
        for i, (_, _, run) in enumerate(arms):
            start = time.process_time()
            outputs_of[i] = run()
            rates[i].append(sum(map(len, outputs_of[i])) / (time.process_time() - start))
    print(
        f"\n{len(prompts)} answers, greedy, max_new_tokens={args.max_new_tokens}, {args.repeats} interleaved rounds\n"
    )
    print(
        "| answer engine | batch | new tokens | tokens per CPU-second (each round) | vs stock batch 8 | identical to one-at-a-time |"
    )
    print("|---|---|---|---|---|---|")
    base = statistics.median(rates[0]) if arms and arms[0][1] == 8 else None
    for i, (engine, batch, _) in enumerate(arms):
        outputs = outputs_of[i]
        same = sum(outputs[k] == reference[k] for k in range(len(reference)))
        rate = statistics.median(rates[i])
        ratio = f"{rate / base:.2f}x" if base else "-"
        each = " / ".join(f"{r:.1f}" for r in rates[i])
        print(
            f"| {engine} | {batch} | {sum(map(len, outputs))} | {each} | {ratio} | {same}/{len(reference)} |"
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
    t.add_argument(
        "--stock-cache-batch-sizes", type=int, nargs="*", default=[8],
        help="left-padded batches on transformers' DynamicCache (batch 8 is the reference rate)",
    )  # fmt: skip
    t.add_argument("--answer-batch-sizes", type=int, nargs="*", default=[8, 32, 64])
    t.add_argument("--refill-batch-sizes", type=int, nargs="*", default=[32, 64])
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--continuous", action="store_true", help="also time transformers' generate_batch")
    t.add_argument("--prompts-from", help="answer the prompts this dataset directory holds (no writing)")
    t.add_argument("--repeats", type=int, default=2, help="interleaved rounds of every answer engine")
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
