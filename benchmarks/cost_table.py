"""Cost tables that stay true, on the embedded target with the shipped drafter, in one process:

1. a poisoned table (the drafter step priced at 60% of a 1-token verification, as a table measured on a
   loaded machine once was) given to `num_draft_tokens="auto"`: speedup against plain `generate` with online
   correction (`CostMonitor`, the default), without it, and with the clean table, on the same prompts;
2. the table measured while another job runs (a 2-thread torch matmul loop) against the table measured
   without it: how far its entries move, and whether `measure_costs` refused to cache it.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cost_table.py --prompts-per-set 4

One torch thread; rates are tokens per CPU-second of this thread (`time.thread_time`, the clock the cost
table is measured and decoding's rounds are timed with at one thread), so other jobs on the machine do not
enter them. Greedy, the loop (`speculative_generate`, chain drafting, padded verification), plain `generate`
through the same packed kernels, one warm-up generation of plain `generate` first; each prompt runs plain,
clean, poisoned + correction and poisoned without correction in turn; every auto policy starts fresh. The
tables are measured into a temporary cache (the user's is not touched). Prints markdown.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ppow_trl.data import load_prompts
from ppow_trl.decoding import cost as cost_module
from ppow_trl.decoding import speculative_generate
from ppow_trl.decoding.cost import MachineLoad, measure_costs
from ppow_trl.decoding.speculative import draft_length_policy
from ppow_trl.export import load_drafter
from ppow_trl.packed import packed_linears
from ppow_trl.target import load_target

LOAD_SCRIPT = "import torch\ntorch.set_num_threads(2)\nx = torch.randn(768, 768)\nwhile True:\n    x = torch.tanh(x @ x)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default="drafters/smollm2-135m-eagle3")
    parser.add_argument("--prompt-sets", nargs="+", default=["mt_bench", "humaneval"])
    parser.add_argument("--prompts-per-set", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--poison", type=float, default=0.6, help="drafter step priced at this share of c(1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["PPOW_TRL_CACHE"] = tempfile.mkdtemp(prefix="cost_table_bench_")
    print(f"machine before: load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, 1 torch thread")

    target, tokenizer = load_target("embedded")
    drafter = load_drafter(args.drafter, target).requires_grad_(False)
    prompts = [
        torch.tensor([tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": e.turns[0]}],
                                                              tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]])
        for s in args.prompt_sets for e in load_prompts(s, max_prompts=args.prompts_per_set, max_turns=1)
    ]  # fmt: skip
    eos = tokenizer.eos_token_id
    new = args.max_new_tokens

    # ---------------------------------------------------------------- 1. poisoned vs clean table
    idle = MachineLoad()
    clean = measure_costs(target, drafter, max_tokens=16)
    print(f"\nclean table: {clean.describe()}\ncached: {_cached(clean)}")
    poisoned = replace(clean, key="", draft_step=args.poison * clean.verify[0], source="given")
    arms = {"clean table": (clean, None), "poisoned + correction": (poisoned, None),
            "poisoned, no correction": (poisoned, False)}  # fmt: skip
    seconds = {name: 0.0 for name in ["plain", *arms]}
    windows: dict[str, list[int]] = {name: [] for name in arms}
    tokens: dict[str, int] = {name: 0 for name in ["plain", *arms]}
    monitors = {}
    policy_drafters = {name: load_drafter(args.drafter, target).requires_grad_(False) for name in arms}

    def plain(ids):
        with packed_linears(target, True):
            return target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                   do_sample=False, eos_token_id=eos, pad_token_id=eos)  # fmt: skip

    plain(prompts[0])  # warm-up
    for ids in prompts:
        start = time.thread_time()
        reference = plain(ids)
        seconds["plain"] += time.thread_time() - start
        tokens["plain"] += reference.shape[1] - ids.shape[1]
        for name, (table, correct) in arms.items():
            start = time.thread_time()
            out = speculative_generate(target, policy_drafters[name], ids, max_new_tokens=new, num_draft_tokens="auto",
                                       eos_token_id=eos, pad_token_id=eos, costs=table, correct_costs=correct)  # fmt: skip
            seconds[name] += time.thread_time() - start
            tokens[name] += int(out.new_tokens[0])
            assert torch.equal(out.sequences, reference), f"{name}: output differs from plain greedy"
            windows[name] += out.window_sizes.tolist()
            if correct is not False:
                policy = draft_length_policy(target, policy_drafters[name], "auto", costs=table, padded=True)
                monitors[name] = policy.monitor
    idle_load = idle.result()
    plain_rate = tokens["plain"] / seconds["plain"]
    print(f"\n{len(prompts)} prompts ({', '.join(args.prompt_sets)}), {new} new tokens, greedy, loop, chain; "
          f"load while timing: {idle_load}\n")  # fmt: skip
    print("| table | tok/CPU-s | speedup | mean window | rounds | corrected at round | greedy identical |")
    print("|---|---|---|---|---|---|---|")
    print(f"| plain generate | {plain_rate:.1f} | 1.00x | - | - | - | - |")
    speedups = {}
    for name in arms:
        rate = tokens[name] / seconds[name]
        speedups[name] = rate / plain_rate
        w = windows[name]
        monitor = monitors.get(name)
        corrected = ", ".join(map(str, monitor.corrected_at)) if monitor and monitor.corrected_at else "-"
        print(f"| {name} | {rate:.1f} | {speedups[name]:.2f}x | {sum(w) / len(w):.2f} | {len(w)} | {corrected} | "
              f"{len(prompts)}/{len(prompts)} |")  # fmt: skip
    gap = speedups["poisoned + correction"] / speedups["clean table"] - 1
    print(f"\npoisoned + correction vs clean: {100 * gap:+.1f}% (goal: within 5%)")
    if monitors.get("poisoned + correction"):
        print(f"table after correction: {monitors['poisoned + correction'].table.describe()}")
    if monitors.get("clean table"):
        print(f"clean table after decoding: disagreement {monitors['clean table'].disagreement:.2f}, "
              f"corrections {monitors['clean table'].corrected_at or 'none'}")  # fmt: skip

    # ---------------------------------------------------------------- 2. measured under load
    hog = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT])
    try:
        time.sleep(3.0)
        cost_module._MEMORY.clear()
        loaded = measure_costs(target, drafter, max_tokens=16, remeasure=True)
    finally:
        hog.kill()
        hog.wait()
    cost_module._MEMORY.clear()
    again = measure_costs(target, drafter, max_tokens=16, remeasure=True)
    print(f"\nwith a 2-thread torch matmul loop running: {loaded.describe()}\ncached: {_cached(loaded)}")
    print(f"without it, measured again: {again.describe()}\ncached: {_cached(again)}\n")
    print("| entry | without the job | with it | change |")
    print("|---|---|---|---|")
    worst = 0.0
    for label, base, other in [
        *((f"c({n}) ms", again.verify[n - 1] * 1e3, loaded.verify[n - 1] * 1e3) for n in (1, 2, 4, 6, 9, 16)),
        ("drafter step ms", again.draft_step * 1e3, loaded.draft_step * 1e3),
        ("commit ms", again.commit * 1e3, loaded.commit * 1e3),
        ("drafter step / c(1)", again.draft_step / again.verify[0], loaded.draft_step / loaded.verify[0]),
        ("c(6) / c(1)", again.c(6) / again.verify[0], loaded.c(6) / loaded.verify[0]),
    ]:
        change = other / base - 1
        worst = max(worst, abs(change))
        print(f"| {label} | {base:.3f} | {other:.3f} | {100 * change:+.1f}% |")
    verdict = "refused to cache" if not _cached(loaded) else "cached"
    print(
        f"\nlargest change {100 * worst:.1f}% (goal: within 15%, or refused to cache): the loaded table was {verdict}"
    )
    print(f"machine after: load average {os.getloadavg()[0]:.2f}")


def _cached(table) -> bool:
    return (cost_module.cache_root() / "costs" / f"{table.key}.json").is_file() and not table.problems


if __name__ == "__main__":
    main()
