"""Regeneration throughput of the target: batched `generate` (the data pipeline's path) vs one prompt at a time.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/regeneration.py --source mt_bench --num-prompts 16 \
        --batch-size 8 --max-new-tokens 64

Same prompts (first user turn, chat-templated), greedy, same max_new_tokens. Batched runs prompts sorted
by length in left-padded batches exactly as `ppow_trl.data.regenerate` does. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

from ppow_trl.data import DataConfig, batched_generate, load_prompts
from ppow_trl.data.regeneration import make_generation_config
from ppow_trl.target import eos_token_ids, load_target, pad_token_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--source", default="mt_bench")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    target, tokenizer = load_target(args.target, dtype=args.dtype)
    examples = load_prompts(args.source, max_prompts=args.num_prompts, max_turns=1)
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": e.turns[0]}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for e in examples
    ]
    eos = eos_token_ids(target, tokenizer)
    pad = pad_token_id(tokenizer)
    generation = make_generation_config(
        DataConfig(dataset_name=args.source, max_new_tokens=args.max_new_tokens), eos, pad
    )
    warm_up = make_generation_config(DataConfig(dataset_name=args.source, max_new_tokens=4), eos, pad)
    batched_generate(target, prompts[:2], warm_up, pad, eos)

    start = time.perf_counter()
    single = [batched_generate(target, [p], generation, pad, eos)[0] for p in prompts]
    single_s = time.perf_counter() - start

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batched: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for first in range(0, len(order), args.batch_size):
        chunk = order[first : first + args.batch_size]
        for i, out in zip(chunk, batched_generate(target, [prompts[i] for i in chunk], generation, pad, eos)):
            batched[i] = out
    batched_s = time.perf_counter() - start

    single_tokens, batched_tokens = sum(map(len, single)), sum(map(len, batched))
    same = sum(a == b for a, b in zip(single, batched))
    single_rate, batched_rate = single_tokens / single_s, batched_tokens / batched_s
    print(
        f"target={args.target} dtype={args.dtype} source={args.source} prompts={len(prompts)} "
        f"max_new_tokens={args.max_new_tokens} greedy torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()}\n"
    )
    print("| mode | batch | new tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| one prompt at a time | 1 | {single_tokens} | {single_s:.1f} | {single_rate:.1f} |")
    print(
        f"| batched (left-padded) | {args.batch_size} | {batched_tokens} | {batched_s:.1f} | {batched_rate:.1f} |"
    )
    print(
        f"\nspeedup batched / one-at-a-time: {batched_rate / single_rate:.2f}x; identical greedy outputs: {same}/{len(prompts)}"
    )


if __name__ == "__main__":
    main()
