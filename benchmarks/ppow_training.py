"""Does PPOW raise held-out acceptance above its warm start, and above continued supervised training?

    python benchmarks/ppow_training.py --warm-start drafters/smollm2-135m-eagle3 \
        --ppow-config recipes/configs/smollm2-135m/ppow_eagle3.yaml \
        --arms benchmarks/configs/compare_objectives.yaml --seeds 1 2 3 --steps 30 --plot outputs/objectives.png
    python benchmarks/ppow_training.py --warm-start outputs/smollm2-135m/sft-eagle3 --steps 60 \
        --run "ppow lr1e-4: --learning_rate 1e-4" --run "cst lr1e-4: --learning_rate 1e-4"

Every arm (`--run "<kind> <name>: <overrides>"`, or the `arms:` list of an `--arms` YAML with `name`, `kind`
and `overrides`) trains the warm-start drafter for `--steps` optimizer steps with a recipe, once per seed of
`--seeds`: `ppow` = recipes/eagle_ppow.py with `--ppow-config`, `cst` = continued supervised training with
recipes/sft_drafter.py and `--sft-config` (the paper's control: same checkpoint, same number of steps). The
overrides are recipe command-line arguments (the YAML may also set `ppow_config` / `sft_config` per arm).
Held-out teacher-forced tau (greedy, chain drafting, the configs' K) is read from each run's Trainer log every
`--eval-every` steps. At the end of a run its drafter is scored on the held-out windows; the warm start is
scored once on the same windows. The summary per arm: mean and spread of the final tau over seeds, the paired
difference to the warm start, and to the `--control` arm of the same seed (clustered by sequence; the
standard error of the mean over seeds combines the per-seed errors), and the training time (seconds in
`Trainer.train`, its evaluations included). Results go into `--json` as runs finish (a rerun skips runs
already there); `--plot` draws tau against steps and against training time per arm (mean over seeds; the time
at step s is taken as s/steps of the run's training time).
With `--transfer-prompts N` the final drafters and the warm start are also scored on sets none of them trained
on: the target's answers to N MT-Bench and N HumanEval prompts, greedy (k at T=0) and sampled at T=1 (the
expected k of lossless speculative sampling, `teacher_forced_expected_acceptance`), one table per set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import eagle_ppow as ppow_recipe  # noqa: E402
import sft_drafter  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from ppow_trl.data import DataConfig, collate_sequences, load_prompts, regenerate  # noqa: E402
from ppow_trl.decoding.speculative import feature_layers  # noqa: E402
from ppow_trl.export import load_drafter  # noqa: E402
from ppow_trl.metrics import acceptance_length, paired_tau_difference  # noqa: E402
from ppow_trl.models.common import unwrap_drafter  # noqa: E402
from ppow_trl.target import capture_features, load_target, pad_token_id  # noqa: E402
from ppow_trl.training.acceptance import (  # noqa: E402
    anchor_flags,
    dataset_acceptances,
    teacher_forced_expected_acceptance,
    teacher_forced_ranks,
    tree_accepted_length,
)


class TrainingBudget(TrainerCallback):
    """Stops training after `seconds` of training (evaluations not counted) and evaluates every `eval_every`
    seconds of it, so arms with different step costs get equal wall time; records the training seconds at
    every step (`seconds_at_step`) for curves against wall time."""

    def __init__(self, seconds: float, eval_every: float | None):
        self.seconds, self.eval_every = seconds, eval_every
        self.seconds_at_step: dict[str, float] = {}

    def _training_seconds(self) -> float:
        return time.perf_counter() - self.start - self.evaluating

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.evaluating, self.eval_started = time.perf_counter(), 0.0, None
        self.next_eval = self.eval_every or math.inf

    def on_step_end(self, args, state, control, **kwargs):
        spent = self._training_seconds()
        self.seconds_at_step[str(state.global_step)] = round(spent, 2)
        if spent >= self.seconds:
            control.should_training_stop = True
        elif spent >= self.next_eval:
            control.should_evaluate = True
            self.next_eval += self.eval_every
        if control.should_evaluate:
            self.eval_started = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_started is not None:
            self.evaluating += time.perf_counter() - self.eval_started
            self.eval_started = None


def held_out_k(drafter, trainer, shapes: list[tuple[int, int]]):
    """k (N, S) of every held-out window for `drafter` at each (width, K), with the trainer's eval data and target,
    and the row of each window."""
    pad = pad_token_id(trainer.processing_class)
    return dataset_acceptances(drafter, trainer.feature_provider, trainer.eval_dataset, shapes, pad, 4)


def parse_arms(cli: argparse.Namespace) -> list[dict]:
    """Arms from `--arms` (YAML) and `--run` specs: dicts with name, kind, overrides (and optional configs)."""
    arms = []
    if cli.arms:
        for arm in yaml.safe_load(Path(cli.arms).read_text())["arms"]:
            unknown = set(arm) - {"name", "kind", "overrides", "ppow_config", "sft_config"}
            if unknown or not {"name", "kind"} <= set(arm):
                raise ValueError(
                    f"an arm needs name and kind (and may set overrides, ppow_config, sft_config): {arm}"
                )
            arms.append({**arm, "overrides": shlex.split(arm.get("overrides") or "")})
    for spec in cli.run or []:
        head, _, tail = spec.partition(":")
        arms.append({"name": "_".join(head.split()), "kind": head.split()[0], "overrides": shlex.split(tail)})
    for arm in arms:
        if arm["kind"] not in ("ppow", "cst"):
            raise ValueError(f"arm kind must be 'ppow' or 'cst', got {arm['kind']!r} ({arm['name']})")
    if not arms:
        raise ValueError("no arms: pass --arms <yaml> and/or --run specs")
    return arms


def run_one(arm: dict, seed: int, cli: argparse.Namespace, output_dir: Path, warm_k: dict) -> dict:
    budget = TrainingBudget(cli.train_seconds, cli.eval_every_seconds) if cli.train_seconds else None
    common = [
        "--drafter_name_or_path", cli.warm_start, "--max_steps", str(cli.steps), "--eval_steps",
        str(cli.eval_every if budget is None else 10**9), "--save_strategy", "no", "--output_dir",
        str(output_dir), "--seed", str(seed),
    ]  # fmt: skip
    callbacks = [budget] if budget else None
    start = time.perf_counter()
    if arm["kind"] == "ppow":
        config = arm.get("ppow_config", cli.ppow_config)
        trainer = ppow_recipe.main(["--config", config, *common, *arm["overrides"]], callbacks)
    else:
        config = arm.get("sft_config", cli.sft_config)
        parsed = sft_drafter.parse_args(["--config", config, *common, *arm["overrides"]])
        trainer = sft_drafter.main(*parsed, callbacks=callbacks)
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    curve = {str(e["step"]): e["eval_tau"] for e in history if "eval_tau" in e and e["step"] > 0}
    window = trainer.args.eval_window_size or trainer.args.window_size
    shapes = [(1, window), (cli.tree_width, cli.tree_window)]
    key = f"{window}:{trainer.eval_dataset._fingerprint}"  # arms may differ in their eval data
    if key not in warm_k:  # the warm start's windows, scored once per eval set
        k_old, rows = held_out_k(load_drafter(cli.warm_start, trainer.target), trainer, shapes)
        warm_k[key] = {"k": k_old[:, 0].tolist(), "k_tree": k_old[:, 1].tolist(), "rows": rows.tolist()}
    k_new, _ = held_out_k(unwrap_drafter(trainer.model), trainer, shapes)
    curve["0"] = acceptance_length(torch.tensor(warm_k[key]["k"]))
    return {
        "arm": arm["name"], "kind": arm["kind"], "seed": seed, "overrides": arm["overrides"], "config": config,
        "curve": curve, "eval_set": key, "k": k_new[:, 0].tolist(), "k_tree": k_new[:, 1].tolist(),
        "wall_s": round(wall, 1),
        "steps": trainer.state.global_step, "output_dir": str(output_dir),
        "train_s": next((e["train_runtime"] for e in history if "train_runtime" in e), None),
        "train_log": [e for e in history if "loss" in e],
        "seconds_at_step": budget.seconds_at_step if budget else None,
    }  # fmt: skip


def _paired(k_new: list[float], k_old: list[float], rows: list[int]) -> tuple[float, float]:
    return paired_tau_difference(torch.tensor(k_new), torch.tensor(k_old), torch.tensor(rows))


def _train_s(run: dict) -> float:
    """Seconds in `Trainer.train` (its evaluations included); records without it: the whole run, which also
    loads (and for a new seed writes) the data."""
    return run.get("train_s") or run["wall_s"]


def _pooled(pairs: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Mean over seeds of paired differences; SE = sqrt(sum of per-seed SE^2) / seeds."""
    if not pairs:
        return None
    return sum(d for d, _ in pairs) / len(pairs), math.sqrt(sum(se**2 for _, se in pairs)) / len(pairs)


def summarise(results: dict, scored: dict, control: str | None) -> list[dict]:
    """Per arm on one evaluation set: seeds, final tau mean and spread, the paired difference to the warm start
    and to the control arm of the same seed (pooled over seeds), mean training time. `scored` maps a run's name to
    (k of its windows, the warm start's k on them, the sequence of each window); runs of one seed share them."""
    by_arm: dict[str, list[str]] = {}
    for name in scored:
        by_arm.setdefault(results[name]["arm"], []).append(name)
    controls = {results[n]["seed"]: n for n in by_arm.get(control, [])}
    rows = []
    for arm, names in by_arm.items():
        runs = [results[n] for n in names]
        finals = [acceptance_length(torch.tensor(scored[n][0])) for n in names]
        mean = sum(finals) / len(finals)
        spread = (
            math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) if len(finals) > 1 else 0.0
        )
        vs_control = [
            _paired(scored[n][0], scored[controls[r["seed"]]][0], scored[n][2])
            for n, r in zip(names, runs)
            if r["seed"] in controls
            and len(scored[controls[r["seed"]]][0]) == len(scored[n][0])
            and arm != control
        ]
        rows.append({
            "arm": arm, "kind": runs[0]["kind"], "seeds": sorted(r["seed"] for r in runs), "tau": mean,
            "spread": spread, "vs_warm_start": _pooled([_paired(*scored[n]) for n in names]),
            "vs_control": _pooled(vs_control), "train_s": sum(_train_s(r) for r in runs) / len(runs),
            "steps": runs[0].get("steps"), "overrides": " ".join(runs[0]["overrides"]),
        })  # fmt: skip
    return rows


def held_out_scores(results: dict, warm_k: dict, column: str = "k") -> dict:
    return {
        n: (r[column], warm_k[r["eval_set"]][column], warm_k[r["eval_set"]]["rows"])
        for n, r in results.items()
        if column in r
    }


def transfer_data(target, tokenizer, prompts: int) -> dict:
    """The target's own answers (128 new tokens, first turns) to `prompts` MT-Bench and HumanEval prompts
    spread evenly over each set (MT-Bench is ordered by category), greedy (scored at T=0) and sampled at T=1
    (scored at T=1); cached like any regenerated data."""
    sets = {}
    for source in ("mt_bench", "humaneval"):
        every = load_prompts(source, max_turns=1)
        examples = [every[i * len(every) // prompts] for i in range(min(prompts, len(every)))]
        for temperature in (0.0, 1.0):
            config = DataConfig(
                dataset_name=source, max_turns=1, max_new_tokens=128, regen_batch_size=16, seed=0,
                do_sample=temperature > 0, regen_temperature=1.0,
            )  # fmt: skip
            sets[f"{source}@T{temperature:g}"] = regenerate(target, tokenizer, examples, config).dataset
    return sets


@torch.no_grad()
def score_transfer(cli: argparse.Namespace, results: dict, stored: dict) -> dict:
    """k (T=0) and expected k (T=1) at every window of the transfer sets, for the warm start and every run's
    final drafter; one target forward per batch serves all drafters. Resumes: only unscored runs are scored."""
    target, tokenizer = load_target("embedded" if cli.target is None else cli.target)
    pad = pad_token_id(tokenizer)
    tree_name = f"tree w={cli.tree_width} K={cli.tree_window}"
    for set_name, dataset in transfer_data(target, tokenizer, cli.transfer_prompts).items():
        sampled = set_name.endswith("T1")
        entry = stored.setdefault(set_name, {"runs": {}})
        tree_entry = None if sampled else stored.setdefault(f"{set_name} {tree_name}", {"runs": {}})
        todo = [n for n in results if n not in entry["runs"]] + (
            [] if "warm_start" in entry else ["warm_start"]
        )
        if not todo:
            continue
        drafters = {
            n: load_drafter(cli.warm_start if n == "warm_start" else results[n]["output_dir"], target).eval()
            for n in todo
        }
        scores = {n: [] for n in todo}
        tree_scores = {n: [] for n in todo}
        rows_of = []
        for start in tqdm(range(0, len(dataset), 4), desc=f"scoring {len(todo)} drafters on {set_name}"):
            rows = [dataset[i] for i in range(start, min(start + 4, len(dataset)))]
            batch = collate_sequences(rows, pad)
            ids, attn, lmask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
            captured = capture_features(
                target, ids, attn, feature_layers(next(iter(drafters.values()))), sampled
            )
            for n, drafter in drafters.items():
                features = getattr(captured, drafter.feature_name)
                if sampled:
                    k = teacher_forced_expected_acceptance(
                        drafter, features, captured.logits, ids, attn, lmask, cli.transfer_window
                    )
                else:  # one forced forward serves the chain at K and the tree at its depth
                    depth = max(cli.transfer_window, cli.tree_window)
                    ranks = teacher_forced_ranks(drafter, features, ids, attn, lmask, depth)
                    k = tree_accepted_length(ranks[:, : cli.transfer_window], 1)
                    tree_scores[n].extend(
                        tree_accepted_length(ranks[:, : cli.tree_window], cli.tree_width).tolist()
                    )
                scores[n].extend(k.tolist())
            rows_of.extend((start + anchor_flags(attn, lmask).nonzero()[:, 0]).tolist())
        for target_entry, values in ((entry, scores), (tree_entry, tree_scores)):
            if target_entry is None:
                continue
            target_entry["rows"] = rows_of
            for n, k in values.items():
                if n == "warm_start":
                    target_entry["warm_start"] = k
                else:
                    target_entry["runs"][n] = k
    return stored


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_wall) = plt.subplots(1, 2, figsize=(11, 4))
    arms = sorted({r["arm"] for r in results.values()})
    for color, arm in enumerate(arms):
        for index, run in enumerate(r for r in results.values() if r["arm"] == arm):  # one line per seed
            steps = sorted(int(s) for s in run["curve"])
            taus = [run["curve"][str(s)] for s in steps]
            clock = run.get("seconds_at_step") or {}
            seconds = [0.0 if s == 0 else clock.get(str(s), _train_s(run) * s / run["steps"]) for s in steps]
            style = {"color": f"C{color}", "marker": "o", "label": arm if index == 0 else None}
            by_step.plot(steps, taus, **style)
            by_wall.plot(seconds, taus, **style)
    by_step.set_xlabel("optimizer steps")
    by_wall.set_xlabel("training wall time, s")
    for axis in (by_step, by_wall):
        axis.set_ylabel("held-out tau (teacher-forced, greedy)")
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _fmt(pair: tuple[float, float] | None) -> str:
    return "-" if pair is None else f"{pair[0]:+.3f} +- {pair[1]:.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm-start", required=True, help="saved warm-started drafter (any layout)")
    parser.add_argument("--ppow-config", default="recipes/configs/smollm2-135m/ppow_eagle3_from_scratch.yaml")
    parser.add_argument("--sft-config", default="recipes/configs/smollm2-135m/sft_eagle3.yaml")
    parser.add_argument("--arms", default=None, help="YAML with an `arms:` list (name, kind, overrides)")
    parser.add_argument("--run", action="append", help='"<ppow|cst> <name>: <overrides>"')
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--control", default=None, help="arm the others are paired against (default: first cst)"
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument(
        "--train-seconds", type=float, default=None,
        help="equal wall time: each run trains this many seconds (evaluations not counted; --steps is then a cap)",
    )  # fmt: skip
    parser.add_argument("--eval-every-seconds", type=float, default=None, help="with --train-seconds")
    parser.add_argument("--json", default="outputs/ppow_training.json")
    parser.add_argument("--out", default="outputs/ppow_training")
    parser.add_argument("--plot", default=None, help="PNG of tau against steps and wall time")
    parser.add_argument(
        "--transfer-prompts", type=int, default=0,
        help="also score the final drafters on the target's answers to this many MT-Bench and HumanEval "
        "prompts each, at T=0 (k) and T=1 (expected k); 0: off",
    )  # fmt: skip
    parser.add_argument("--transfer-window", type=int, default=5, help="K of the transfer scores (chain)")
    parser.add_argument("--tree-width", type=int, default=4, help="w of the transfer tree tau (greedy sets)")
    parser.add_argument("--tree-window", type=int, default=10, help="K of the transfer tree tau")
    parser.add_argument("--target", default=None, help="target of the transfer scores (default: embedded)")
    cli = parser.parse_args(argv)
    arms = parse_arms(cli)
    control = cli.control or next((a["name"] for a in arms if a["kind"] == "cst"), None)

    path = Path(cli.json)
    stored = json.loads(path.read_text()) if path.exists() else {}
    results, warm_k = stored.get("runs", {}), stored.get("warm_start_k", {})
    transfer = stored.get("transfer", {})

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": results, "warm_start_k": warm_k, "transfer": transfer}))

    for seed in cli.seeds:
        for arm in arms:
            name = f"{arm['name']}@{seed}"
            if name in results:
                continue
            results[name] = run_one(arm, seed, cli, Path(cli.out) / name, warm_k)
            save()
    for name, run in results.items():  # records written before runs carried these
        run.setdefault("steps", cli.steps)
        run.setdefault("output_dir", str(Path(cli.out) / name))
    if cli.transfer_prompts:
        transfer = score_transfer(cli, results, transfer)
        save()

    print(f"warm start {cli.warm_start}; control arm: {control}")
    sets = {
        "held-out self-generated (T=0, chain)": held_out_scores(results, warm_k),
        f"held-out self-generated (T=0, tree w={cli.tree_width} K={cli.tree_window})": held_out_scores(
            results, warm_k, "k_tree"
        ),
    }
    for set_name, entry in sorted(transfer.items()):
        shape = "" if "tree" in set_name else f", chain K={cli.transfer_window}"
        sets[f"{set_name} (teacher-forced{shape})"] = {
            n: (k, entry["warm_start"], entry["rows"]) for n, k in entry["runs"].items()
        }
    summaries = {}
    for set_name, scored in sets.items():
        summaries[set_name] = summarise(results, scored, control)
        print(f"\n{set_name}\n| arm | kind | seeds | steps | tau (mean +- spread) | vs warm start (paired) "
              "| vs control (paired) | train s | overrides |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
        for row in summaries[set_name]:
            print(
                f"| {row['arm']} | {row['kind']} | {len(row['seeds'])} | {row['steps']} | {row['tau']:.3f} +- "
                f"{row['spread']:.3f} | {_fmt(row['vs_warm_start'])} | {_fmt(row['vs_control'])} | "
                f"{row['train_s']:.0f} | `{row['overrides']}` |"
            )
    if cli.plot:
        plot(results, Path(cli.plot))
    return {"summary": summaries, "runs": results}


if __name__ == "__main__":
    main()
