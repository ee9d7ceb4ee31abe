"""c(n)/c(1): the cost of a cached target forward over n tokens relative to one token, with the model body and
the LM head timed separately, for the default fp32 matmul path and the alternatives tried.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/verify_cost.py --threads 2 --clock wall
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/verify_cost.py --threads 1 --clock cpu

Target: the embedded SmolLM2-135M (fp32), batch 1, a `--context`-token cached prefix; each forward over n
tokens is followed by a crop of the cache back to the prefix. All modes and all n are interleaved (shuffled
per repeat) in one process, so load changes hit them alike; the tables give the minimum over `--repeats`
(the least-disturbed run, the usual estimate on a shared machine) and the median ratio.

Modes (each patches every `nn.Linear` of the target for the duration of its measurements):
- `default`: `F.linear` (MKL sgemm on this build);
- `pad16`: the rows of every matmul padded to 16 (16 rows were measured fastest per row before);
- `mkl_packed`: MKL's packed sgemm with the weight packed once (`torch.ops.mkl._mkl_linear`);
- `onednn_packed`: oneDNN's inner product with the weight packed once: `ppow_trl.packed`, what the
  decoding loops use.
`--clock cpu` uses the thread's CPU time (meaningful with `--threads 1`: descheduled time is not counted,
which makes it the stable measure when other jobs load the machine); `wall` is perf_counter.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ppow_trl.evaluation import hardware_info, versions
from ppow_trl.packed import packed_linears
from ppow_trl.target import load_target

MODES = ("default", "pad16", "mkl_packed", "onednn_packed")


def _pad_forward(module: torch.nn.Linear, rows_to: int = 16):
    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if 1 < rows < rows_to:
            flat = F.pad(flat, (0, 0, 0, rows_to - rows))
        out = F.linear(flat, module.weight, module.bias)[:rows]
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


def _mkl_forward(module: torch.nn.Linear):
    packed = torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), 16)

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkl._mkl_linear(flat, packed, module.weight, module.bias, flat.shape[0])
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


class _Patched:
    """Context manager that sets `forward` on every nn.Linear of the model from a factory."""

    def __init__(self, model, factory):
        self.modules = [m for m in model.modules() if type(m) is torch.nn.Linear]
        self.forwards = [factory(m) for m in self.modules]

    def __enter__(self):
        for module, forward in zip(self.modules, self.forwards):
            module.forward = forward

    def __exit__(self, *exc):
        for module in self.modules:
            module.__dict__.pop("forward", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--context", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    load_before = os.getloadavg()

    target, _ = load_target("embedded", dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(100, target.config.vocab_size - 100, (1, args.context + args.max_tokens))
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target.model(input_ids=ids[:, : args.context], cache=cache, use_cache=True)
    head = target.get_output_embeddings()
    contexts = {
        "default": lambda: _Patched(target, lambda m: type(m).forward.__get__(m)),
        "pad16": lambda: _Patched(target, _pad_forward),
        "mkl_packed": lambda: _Patched(target, _mkl_forward),
        "onednn_packed": lambda: packed_linears(target),
    }

    @torch.no_grad()
    def forward(n: int) -> tuple[float, float, torch.Tensor]:
        t0 = clock()
        out = target.model(input_ids=ids[:, args.context : args.context + n], cache=cache, use_cache=True)
        t1 = clock()
        logits = head(out.last_hidden_state)
        t2 = clock()
        cache.crop(-n)
        return t1 - t0, t2 - t1, logits

    sizes = list(range(1, args.max_tokens + 1))
    body = {(m, n): [] for m in args.modes for n in sizes}
    lm_head = {(m, n): [] for m in args.modes for n in sizes}
    reference = {n: forward(n)[2] for n in sizes}  # the default path's logits
    worst = dict.fromkeys(args.modes, (0.0, True))
    for mode in args.modes:  # warm-up (packing happens here)
        with contexts[mode]():
            forward(1), forward(4)
    for repeat in range(args.repeats):
        for mode in random.Random(repeat).sample(args.modes, len(args.modes)):
            with contexts[mode]():
                for n in random.Random(1000 + repeat).sample(sizes, len(sizes)):
                    b, h, logits = forward(n)
                    body[(mode, n)].append(b)
                    lm_head[(mode, n)].append(h)
                    if repeat == 0:
                        diff = float((logits - reference[n]).abs().max())
                        same = bool((logits.argmax(-1) == reference[n].argmax(-1)).all())
                        worst[mode] = (max(worst[mode][0], diff), worst[mode][1] and same)
    load_after = os.getloadavg()

    hw = hardware_info()
    print(
        f"target=embedded fp32 batch=1 context={args.context} threads={torch.get_num_threads()} clock={args.clock} "
        f"repeats={args.repeats} torch={versions()['torch']} cpu={hw['cpu']} cores={hw['cpu_cores']}"
    )
    print(
        f"load average before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}"
    )
    for mode in args.modes:
        b1, h1 = min(body[(mode, 1)]), min(lm_head[(mode, 1)])
        med1 = statistics.median(body[(mode, 1)]) + statistics.median(lm_head[(mode, 1)])
        print(
            f"\n{mode}: c(1) = {1000 * (b1 + h1):.1f} ms (body {1000 * b1:.1f}, LM head {1000 * h1:.1f}); "
            f"vs the default path's logits: max |diff| {worst[mode][0]:.2e}, argmax identical: {worst[mode][1]}"
        )
        print("\n| n | c(n)/c(1) (min) | c(n)/c(1) (median) | body ms | body / body(1) | LM head ms |")
        print("|---|---|---|---|---|---|")
        for n in sizes:
            b, h = min(body[(mode, n)]), min(lm_head[(mode, n)])
            med = statistics.median(body[(mode, n)]) + statistics.median(lm_head[(mode, n)])
            print(
                f"| {n} | {(b + h) / (b1 + h1):.2f} | {med / med1:.2f} | {1000 * b:.1f} | {b / b1:.2f} | "
                f"{1000 * h:.1f} |"
            )
    base = min(body[("default", 1)]) + min(lm_head[("default", 1)]) if "default" in args.modes else None
    if base:
        print("\nc(n) of each mode relative to the default path's c(1) (min):\n")
        print("| n | " + " | ".join(args.modes) + " |")
        print("|---|" + "---|" * len(args.modes))
        for n in sizes:
            cells = [f"{(min(body[(m, n)]) + min(lm_head[(m, n)])) / base:.2f}" for m in args.modes]
            print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
