"""Speculative decoding vs plain `generate` at batch size 1: prompt lookup, fixed K, auto K, and where a round's
time goes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speculative_decoding.py --drafter random \
        --prompt-sets mt_bench humaneval --prompts-per-set 4 --max-new-tokens 64 --num-draft-tokens 2 3 5 --threads 1

`--drafter` is a saved drafter directory (or Hub id), `random`: an untrained EAGLE-3 drafter for the target
(8192-token draft vocabulary, LM head initialised from the target's rows), which is accepted almost never
and so measures the pure overhead of drafting + verifying, or `oracle`: that random drafter with its draft
logits replaced, wherever the drafted prefix is still correct, by a one-hot on plain greedy's next token (a
lookup keyed on the logits it computes, so it still pays the full drafter compute): the ceiling any drafter
of this size can reach, measuring the decoding machinery at high acceptance. Not a trained drafter. Same
prompts (first user turn, chat-templated), greedy, fp32 by default, one warm-up of every method first; each
prompt runs, in this order: plain `generate` (stock, and with `ppow_trl.packed` unless
`--no-packed`: the speedups are against the packed one, the kernels every other method runs on); transformers'
prompt lookup at every K of `--prompt-lookup-tokens`;
ppow_trl's loop (`speculative_generate`, profiled per phase) at every fixed K of `--num-draft-tokens` and with
`num_draft_tokens="auto"` (up to `--max-draft-tokens`), each also as a draft tree for every `--tree-widths` w
(a dynamic draft tree), and with `--lookup-branch` m tokens of prompt lookup in the tree; and, unless `--no-assisted`, transformers' assisted
decoding with the drafter's candidate generator and auto K. The loop and the assisted path verify through
`ppow_trl.packed` (oneDNN, prepacked weights) unless `--no-packed`, and the loop (fixed and auto K) pads a
window's forward to a cheaper token count of the measured cost table (`CostTable.verify_shape`); prompt lookup
runs on the packed linears too. A last table gives each prompt set's speedups, prompt lookup at its best K. Prints markdown tables; `--output` also writes them as JSON.

Both wall-clock and process CPU time are recorded. On a shared machine, wall-clock rates swing with other
jobs' load; with `--threads 1` the CPU-time rate (tokens per CPU-second of this process) is the stable
measure of the work each method does, and the per-phase breakdown uses the same clock.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

from ppow_trl.data import load_prompts
from ppow_trl.data.draft_vocab import build_draft_vocab
from ppow_trl.decoding import DrafterCandidateGenerator, generate, speculative_generate
from ppow_trl.decoding.cost import measure_costs
from ppow_trl.decoding.drafting import draft_windows, window_targets
from ppow_trl.evaluation import hardware_info, versions
from ppow_trl.export import load_drafter
from ppow_trl.models import Eagle3Drafter
from ppow_trl.models.build import build_drafter
from ppow_trl.packed import packed_linears
from ppow_trl.target import capture_features, load_target

PHASES = ("drafter_draft", "drafter_commit", "target_forward", "verify", "bookkeeping")


def random_drafter(target, prompts: list[list[int]], draft_vocab_size: int, seed: int):
    """Untrained EAGLE-3 drafter; draft vocabulary = ids seen in the prompts, then the lowest ids."""
    vocab = target.get_output_embeddings().weight.shape[0]
    counts = torch.zeros(vocab, dtype=torch.long)
    for ids in prompts:
        counts += torch.bincount(torch.tensor(ids), minlength=vocab)
    counts = counts * vocab + torch.arange(vocab - 1, -1, -1)  # ties: lower ids first
    torch.manual_seed(seed)
    return build_drafter("eagle3", target, build_draft_vocab(counts, draft_vocab_size, vocab)).eval()


class OracleEagle3(Eagle3Drafter):
    """EAGLE-3 drafter whose logits are replaced by a one-hot on the reference token when they match the
    teacher-forced logits of the reference continuation (keys compared after a random 64-d projection).

    With `accuracy` < 1 ("noisy oracle"), a fraction 1 - accuracy of the reference entries name a wrong token
    instead, and every draft step (right, wrong or off the reference) puts probability `accuracy` on its token:
    the drafter's confidence is calibrated on average but says nothing about the step at hand, so a
    draft-length policy cannot tell good steps from bad ones."""

    oracle: dict | None = None
    accuracy: float = 1.0

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().draft_logits(hidden)
        if self.oracle is None:
            return logits
        flat = logits.reshape(-1, logits.shape[-1]).float()
        projected = flat @ self.oracle["projection"]
        best = torch.cdist(projected, self.oracle["keys"]).min(dim=1)
        token = self.oracle["tokens"][best.indices]
        hit = (best.values < self.oracle["tolerance"][best.indices]) & (token >= 0)
        if self.accuracy >= 1.0:
            onehot = torch.full_like(flat, -30.0).scatter(1, token.clamp(min=0)[:, None], 30.0)
            return torch.where(hit[:, None], onehot, flat).to(logits.dtype).view_as(logits)
        chosen = torch.where(hit, token.clamp(min=0), flat.argmax(-1))
        peak = math.log(self.accuracy * (flat.shape[-1] - 1) / (1.0 - self.accuracy))
        peaked = torch.zeros_like(flat).scatter(1, chosen[:, None], peak)
        return peaked.to(logits.dtype).view_as(logits)

    @torch.no_grad()
    def set_reference(self, target, sequence: torch.Tensor, window: int) -> None:
        """Teacher-forced keys for every (anchor row, draft step) of `sequence` (1, T)."""
        self.oracle = None
        feats = capture_features(target, sequence, with_logits=False).aux_hidden_states
        anchors = torch.arange(sequence.shape[1])[None]
        truth, in_range = window_targets(sequence, anchors, window)
        logits = draft_windows(
            self, feats, sequence, anchors, window, tokens=truth[:, :, None], return_logits=True
        )
        flat = logits.logits[0, :, 0].reshape(-1, logits.logits.shape[-1]).float()
        g = torch.Generator().manual_seed(0)
        projection = torch.randn(flat.shape[-1], 64, generator=g) / flat.shape[-1] ** 0.5
        keys = flat @ projection
        draft_ids = self.target_to_draft(truth[0]).masked_fill(~in_range[0], -1).reshape(-1)
        if self.accuracy < 1.0:  # wrong tokens (another draft id) at a seeded fraction of the entries
            wrong = (torch.rand(draft_ids.shape, generator=g) > self.accuracy) & (draft_ids >= 0)
            draft_ids = torch.where(wrong, (draft_ids + 1) % flat.shape[-1], draft_ids)
        self.oracle = {"projection": projection, "keys": keys, "tokens": draft_ids,
                       "tolerance": 1e-3 * keys.norm(dim=-1).clamp(min=1.0)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--drafter", default="random", help="saved drafter dir / Hub id, 'random' or 'oracle'"
    )
    parser.add_argument("--target", default=None, help="the target (default: embedded)")
    parser.add_argument("--prompt-sets", nargs="+", default=["mt_bench", "humaneval"])
    parser.add_argument("--prompts-per-set", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, nargs="*", default=[2, 3, 5], help="fixed K values")
    parser.add_argument("--max-draft-tokens", type=int, default=8, help="longest window of auto K")
    parser.add_argument("--tree-widths", type=int, nargs="*", default=[],
                        help="draft tree widths w > 1 to run beside the chains (every fixed K and auto)")  # fmt: skip
    parser.add_argument(
        "--prompt-lookup-tokens",
        type=int,
        nargs="+",
        default=[2],
        help="K of transformers' prompt lookup (one row each; the per-set table takes the best)",
    )
    parser.add_argument("--lookup-branch", type=int, nargs="*", default=[],
                        help="prompt_lookup_tokens m of the loop: auto K (chain and every --tree-widths w) with "
                        "up to m prompt-lookup tokens as one more branch")  # fmt: skip
    parser.add_argument(
        "--no-assisted", action="store_true", help="skip transformers' assisted path (auto K)"
    )
    parser.add_argument("--no-packed", action="store_true", help="verify with the stock linear layers")
    parser.add_argument("--draft-vocab-size", type=int, default=8192, help="for --drafter random")
    parser.add_argument(
        "--oracle-accuracy", type=float, default=1.0,
        help="for --drafter oracle: the fraction of reference steps it drafts right (< 1: a noisy oracle whose "
        "confidence is this fraction at every step)",
    )  # fmt: skip
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    dtype = getattr(torch, args.dtype)
    target, tokenizer = load_target(args.target or "embedded", dtype=dtype)
    drafter = None
    if args.drafter not in (
        "random",
        "oracle",
    ):  # any layout export.load_drafter reads, checked against the target
        drafter = load_drafter(args.drafter, target, dtype=dtype).requires_grad_(False)
    examples = [
        e for s in args.prompt_sets for e in load_prompts(s, max_prompts=args.prompts_per_set, max_turns=1)
    ]
    prompt_sets = [os.path.splitext(os.path.basename(e.source))[0] for e in examples]
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": e.turns[0]}], tokenize=False,
                                          add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for e in examples
    ]  # fmt: skip
    eos = tokenizer.eos_token_id
    new = args.max_new_tokens
    packed = not args.no_packed
    kwargs = {"max_new_tokens": new, "do_sample": False, "eos_token_id": eos, "pad_token_id": eos}

    def plain(ids, n=new):
        return target.generate(ids, attention_mask=torch.ones_like(ids), **{**kwargs, "max_new_tokens": n})

    def plain_packed(ids, n=new):
        with packed_linears(target, packed):
            return plain(ids, n)

    def prompt_lookup(k):
        def run(ids, n=new):
            with packed_linears(target, packed):  # the same kernels as the drafter's rows
                return target.generate(
                    ids, attention_mask=torch.ones_like(ids), prompt_lookup_num_tokens=k,
                    **{**kwargs, "max_new_tokens": n},
                )  # fmt: skip

        return run

    references = []
    if args.drafter == "oracle":  # plain greedy continuations (untimed); their tokens go into the draft vocab
        references = [plain(torch.tensor([ids]))[0].tolist() for ids in prompts]
    if drafter is None:
        drafter = random_drafter(target, prompts + references, args.draft_vocab_size, args.seed)
        if args.drafter == "oracle":
            drafter.__class__ = OracleEagle3
            drafter.accuracy = args.oracle_accuracy
    drafter.to(dtype)
    costs = measure_costs(target, drafter, max_tokens=max(16, args.max_draft_tokens + 1), packed=packed)

    def loop(k, width=1, lookup=0):
        def run(ids, n=new):
            return speculative_generate(
                target, drafter, ids, max_new_tokens=n, num_draft_tokens=k, eos_token_id=eos,
                profile=time.process_time, max_draft_tokens=args.max_draft_tokens, costs=costs, packed=packed,
                draft_tree_width=width, prompt_lookup_tokens=lookup,
            )  # fmt: skip

        return run

    def assisted(ids, n=new):
        return generate(
            target, drafter, ids, num_draft_tokens="auto", method="assisted", max_draft_tokens=args.max_draft_tokens,
            costs=costs, packed=packed, **{**kwargs, "max_new_tokens": n},
        )  # fmt: skip

    methods = {"plain": plain}
    if packed:
        methods["plain, packed linears"] = plain_packed
    for k in args.prompt_lookup_tokens:
        methods[f"prompt lookup K={k}"] = prompt_lookup(k)
    for k in args.num_draft_tokens:
        methods[f"loop K={k}"] = loop(k)
    methods["loop K=auto"] = loop("auto")
    for width in args.tree_widths:
        for k in args.num_draft_tokens:
            methods[f"loop K={k} tree w={width}"] = loop(k, width)
        methods[f"loop K=auto tree w={width}"] = loop("auto", width)
    for lookup in args.lookup_branch:
        methods[f"loop K=auto lookup={lookup}"] = loop("auto", 1, lookup)
        for width in args.tree_widths:
            methods[f"loop K=auto tree w={width} lookup={lookup}"] = loop("auto", width, lookup)
    if not args.no_assisted:
        methods["assisted K=auto"] = assisted

    DrafterCandidateGenerator.clock = staticmethod(time.process_time)  # its drafter time in CPU seconds
    warm = torch.tensor([prompts[0]])
    for fn in methods.values():
        fn(warm, 8)

    stats = {
        m: {
            "tokens": 0,
            "seconds": 0.0,
            "cpu": 0.0,
            "forwards": 0,
            "matches": 0,
            "accepted": [],
            "windows": [],
        }
        for m in methods
    }
    phases = {m: dict.fromkeys(("prefill", *PHASES), 0.0) for m in methods if m.startswith("loop")}
    per_set = {
        name: {m: {"tokens": 0, "cpu": 0.0, "seconds": 0.0} for m in methods}
        for name in dict.fromkeys(prompt_sets)
    }
    reference_window = max([*args.num_draft_tokens, args.max_draft_tokens])
    for index, ids_list in enumerate(prompts):
        ids = torch.tensor([ids_list])
        if references:
            drafter.set_reference(target, torch.tensor([references[index]]), reference_window)
        outputs = {}
        for name, fn in methods.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn(ids)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            tokens = sequences[0, ids.shape[1] :]
            if hasattr(out, "new_tokens"):
                tokens = tokens[: int(out.new_tokens[0])]
                stats[name]["forwards"] += out.num_verify_forwards
                stats[name]["accepted"] += out.accepted_lengths().tolist()
                stats[name]["windows"] += out.window_sizes.tolist()
            outputs[name] = tokens.tolist()
            stats[name]["tokens"] += len(tokens)
            stats[name]["seconds"] += seconds
            stats[name]["cpu"] += cpu
            for key, value in (("tokens", len(tokens)), ("cpu", cpu), ("seconds", seconds)):
                per_set[prompt_sets[index]][name][key] += value
            if name in phases:
                for phase, value in out.timings.items():
                    phases[name][phase] += value
        for name in methods:
            stats[name]["matches"] += outputs[name] == outputs["plain"]
    load_after = os.getloadavg()

    hw = hardware_info()
    print(
        f"target={args.target or 'embedded'} drafter={args.drafter}"
        f"{f' accuracy={args.oracle_accuracy}' if args.drafter == 'oracle' else ''} chain dtype={args.dtype} batch=1 greedy "
        f"prompts={len(prompts)} ({'+'.join(args.prompt_sets)}) max_new_tokens={new} torch={versions()['torch']} "
        f"threads={torch.get_num_threads()} cpu={hw['cpu']} cores={hw['cpu_cores']} gpu={hw['gpu']} "
        f"packed={packed}"
    )
    print(f"load average before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in load_after)}")  # fmt: skip
    ratios = ", ".join(f"{r:.2f}" for r in costs.ratios()[:9])
    print(
        f"cost table (measure_costs, {'packed' if costs.packed else 'stock'} linears): c(n)/c(1) for n = 1..9: "
        f"{ratios}; drafter step {costs.draft_step / costs.verify[0]:.3f}, commit {costs.commit / costs.verify[0]:.3f}"
        " (in c(1)); a window of n tokens is verified in a forward of "
        + ", ".join(f"{n}->{costs.verify_shape(n)}" for n in range(1, 10) if costs.verify_shape(n) != n)
        + " tokens (padded to a cheaper count; else n)"
    )
    # speedups are against plain `generate` on the kernels every other row uses
    base = "plain, packed linears" if packed else "plain"
    plain_tps = stats[base]["tokens"] / stats[base]["seconds"]
    plain_cps = stats[base]["tokens"] / stats[base]["cpu"]
    print(f"\nspeedups against {base!r}")
    print(
        "\n| method | new tokens | verify forwards | tau | mean window | mean k | wall s | tokens/s | speedup (wall) "
        "| CPU s | tokens/CPU-s | speedup (CPU) | greedy match |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for name, s in stats.items():
        tps, cps = s["tokens"] / s["seconds"], s["tokens"] / s["cpu"]
        forwards = s["forwards"] if s["forwards"] else s["tokens"] - len(prompts)
        exact = bool(s["windows"]) or name.startswith("plain")
        tau = s["tokens"] / forwards if forwards and exact else float("nan")
        mean_k = sum(s["accepted"]) / len(s["accepted"]) if s["accepted"] else float("nan")
        mean_window = sum(s["windows"]) / len(s["windows"]) if s["windows"] else float("nan")
        match = f"{s['matches']}/{len(prompts)}" if name != "plain" else "-"
        rows[name] = {
            "tokens": s["tokens"], "verify_forwards": forwards if exact else None, "tau": tau,
            "mean_window": mean_window, "mean_accepted": mean_k, "seconds": s["seconds"], "tokens_per_s": tps,
            "speedup": tps / plain_tps, "cpu_seconds": s["cpu"], "tokens_per_cpu_s": cps,
            "speedup_cpu": cps / plain_cps, "greedy_match": match,
        }  # fmt: skip
        fmt = lambda x: "-" if x != x else f"{x:.2f}"  # noqa: E731
        print(
            f"| {name} | {s['tokens']} | {forwards if exact else '-'} | {fmt(tau)} | {fmt(mean_window)} | "
            f"{fmt(mean_k)} | {s['seconds']:.1f} | {tps:.1f} | {tps / plain_tps:.2f}x | {s['cpu']:.1f} | {cps:.1f} "
            f"| {cps / plain_cps:.2f}x | {match} |"
        )

    plain_step_ms = 1000 * stats[base]["cpu"] / max(stats[base]["tokens"], 1)
    print(
        f"\nLoop, CPU-ms per verification round by phase (one step of {base!r}, prefill amortised, costs "
        f"{plain_step_ms:.1f} CPU-ms); last column: the round in plain steps.\n"
    )
    print("| method | rounds | " + " | ".join(PHASES) + " | total | in plain steps | prefill per prompt |")
    print("|---|---|" + "---|" * (len(PHASES) + 3))
    for name, values in phases.items():
        rounds = max(stats[name]["forwards"], 1)
        total = 1000 * sum(values[p] for p in PHASES) / rounds
        cells = " | ".join(f"{1000 * values[p] / rounds:.1f}" for p in PHASES)
        print(
            f"| {name} | {stats[name]['forwards']} | {cells} | {total:.1f} | {total / plain_step_ms:.2f} | "
            f"{1000 * values['prefill'] / len(prompts):.1f} |"
        )
    fixed = {n: r for n, r in rows.items() if n.startswith("loop K=") and "auto" not in n and "tree" not in n}
    if fixed:
        best = max(fixed, key=lambda n: fixed[n]["speedup_cpu"])
        auto = rows["loop K=auto"]["speedup_cpu"]
        print(
            f"\nauto K vs the best fixed K ({best}, CPU time): {auto:.2f}x vs {fixed[best]['speedup_cpu']:.2f}x "
            f"= {100 * (auto / fixed[best]['speedup_cpu'] - 1):+.1f}%"
        )
        for name, row in rows.items():
            if "tree" in name:  # the same K's chain, and the best chain
                chain = rows[name.split(" tree")[0]]
                print(
                    f"{name}: tau {row['tau']:.2f} vs chain {chain['tau']:.2f}; {row['speedup_cpu']:.2f}x vs chain "
                    f"{chain['speedup_cpu']:.2f}x, best chain {fixed[best]['speedup_cpu']:.2f}x (CPU time)"
                )
    lookups = [m for m in methods if m.startswith("prompt lookup")]
    compared = [m for m in methods if m.startswith(("loop K=auto", "assisted"))]
    print(f"\nPer prompt set, speedup in CPU time against {base!r} (prompt lookup: its best K on the set)\n")
    print("| set | prompt lookup, best K | " + " | ".join(compared) + " | best method |")
    print("|---|---|" + "---|" * (len(compared) + 1))
    by_set = {}
    for name, values in per_set.items():
        rate = {m: values[m]["tokens"] / values[m]["cpu"] for m in methods}
        speed = {m: rate[m] / rate[base] for m in methods}
        best_lookup = max(lookups, key=speed.get)
        best = max(lookups + compared, key=speed.get)
        by_set[name] = {"speedup_cpu": speed, "best_lookup": best_lookup, "best": best}
        cells = " | ".join(f"{speed[m]:.2f}x" for m in compared)
        print(f"| {name} | {speed[best_lookup]:.2f}x ({best_lookup.split()[-1]}) | {cells} | {best} |")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"args": vars(args), "hardware": hw, "versions": versions(), "methods": rows,
                       "loop_phases_s": phases, "costs": costs.ratios(), "per_set": by_set,
                       "load": {"before": load_before, "after": load_after}}, handle, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
