"""Does PPOW raise held-out acceptance above its warm start, and above continued supervised training?

    python benchmarks/ppow_training.py --warm-start drafters/smollm2-135m-eagle3 \
        --ppow-config recipes/configs/smollm2-135m/ppow_eagle3.yaml \
        --arms benchmarks/configs/compare_objectives.yaml --seeds 1 2 3 --steps 30 --plot outputs/objectives.png
    python benchmarks/ppow_training.py --warm-start outputs/smollm2-135m/sft-eagle3 --steps 60 \
        --run "ppow lr1e-4: --learning_rate 1e-4" --run "cst lr1e-4: --learning_rate 1e-4"

Every arm (`--run "<kind> <name>: <overrides>"`, or the `arms:` list of an `--arms` YAML with `name`, `kind`
and `overrides`) trains the warm-start drafter with a recipe, once per seed of `--seeds`: `ppow` =
recipes/eagle_ppow.py with `--ppow-config`, `cst` = continued supervised training with recipes/sft_drafter.py
and `--sft-config` (the paper's control: same checkpoint). The overrides are recipe command-line arguments
(the YAML may also set `ppow_config` / `sft_config` per arm). A run trains `--steps` optimizer steps, or
`--train-seconds` of CPU time (equal compute for arms whose steps cost differently), and saves its drafter
every `--eval-every` steps / `--eval-every-seconds` for the curves; the recipes' own evaluations are off.

After all runs, every drafter is scored on the same windows with one target forward per batch (`score`): the
warm start, each run's final drafter and its snapshots on the runs' held-out split (teacher-forced, greedy:
chain k at `--window` and tree k at `--tree-width`/`--tree-window`), and with `--transfer-prompts N` the final
drafters on sets none of them trained on: the target's answers to N MT-Bench and N HumanEval prompts, greedy
(k at T=0) and sampled at T=1 (the expected k of lossless speculative sampling), where the warm start is also
scored at the `--temperatures` (a served drafter temperature is the control for T=1 gains that are only
calibration; the table pairs every arm with the temperature that scores best on the other set). Per arm and
set: mean and spread of the final tau over seeds, the paired difference to the warm start and to the
`--control` arm of the same seed (clustered by sequence; the standard error of the mean over seeds combines
the per-seed errors), and the training CPU seconds. Runs and scores go into `--json` as they finish (a rerun
trains and scores only what is missing; `--train-only` leaves the scoring to a later call, e.g. after runs
split over two processes were merged); `--plot` draws held-out tau against training CPU seconds per run.
"""

from __future__ import annotations

import argparse
import hashlib
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
from datasets import load_from_disk  # noqa: E402
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
    teacher_forced_expected_acceptance,
    teacher_forced_ranks,
    tree_accepted_length,
)


class TrainingBudget(TrainerCallback):
    """Equal compute per arm, and the points of its curve.

    Stops training once the process has spent `seconds` of CPU time in training (None: the run's max_steps)
    and saves the drafter every `snapshot_every` CPU seconds (with a budget) or optimizer steps (without) under
    `directory`/step-<n>; the snapshots are scored with the final drafters after all runs. CPU time rather than
    wall time keeps the budget fair whatever else runs on the machine; with OMP_NUM_THREADS=1 it equals the wall
    time of an idle core (with more threads it counts every thread, spin-waits included). Saving is not
    counted. `seconds_at_step` records the training seconds at every step, for curves against compute."""

    def __init__(self, seconds: float | None, snapshot_every: float | None, directory: Path):
        self.seconds, self.snapshot_every = seconds, snapshot_every
        self.directory = directory
        self.seconds_at_step: dict[str, float] = {}
        self.snapshots: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.saving = time.process_time(), 0.0
        self.next_snapshot = self.snapshot_every or math.inf
        self.diverged_at: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        """A loss that is no longer finite stops the run (recorded as diverged; the other runs carry on)."""
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.diverged_at = state.global_step
            control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        spent = time.process_time() - self.start - self.saving
        self.seconds_at_step[str(state.global_step)] = round(spent, 2)
        if self.seconds is not None and spent >= self.seconds:
            control.should_training_stop = True
        elif (state.global_step if self.seconds is None else spent) >= self.next_snapshot:
            self.next_snapshot += self.snapshot_every
            saving = time.process_time()
            path = self.directory / f"step-{state.global_step}"
            unwrap_drafter(model).save_pretrained(path)
            self.snapshots[str(state.global_step)] = str(path)
            self.saving += time.process_time() - saving


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


def run_one(arm: dict, seed: int, cli: argparse.Namespace, output_dir: Path) -> dict:
    """Train one arm for one seed (the recipes' own evaluations off) and record where its drafters and held-out
    split lie; they are scored after all runs (`score`)."""
    budget = TrainingBudget(
        cli.train_seconds, cli.eval_every_seconds if cli.train_seconds else cli.eval_every,
        directory=output_dir / "snapshots",
    )  # fmt: skip
    common = [
        "--drafter_name_or_path", cli.warm_start, "--max_steps", str(cli.steps), "--eval_strategy", "no",
        "--save_strategy", "no", "--output_dir", str(output_dir), "--seed", str(seed),
    ]  # fmt: skip
    start = time.perf_counter()
    if arm["kind"] == "ppow":
        config = arm.get("ppow_config", cli.ppow_config)
        trainer = ppow_recipe.main(["--config", config, *common, *arm["overrides"]], [budget], evaluate=False)
    else:
        config = arm.get("sft_config", cli.sft_config)
        parsed = sft_drafter.parse_args(["--config", config, *common, *arm["overrides"]])
        trainer = sft_drafter.main(*parsed, callbacks=[budget], evaluate=False)
    wall = time.perf_counter() - start
    # Named by content: runs on the same split share it (datasets' own fingerprint also hashes the code that built
    # the split, so a run from another checkout would get a split of its own).
    content = json.dumps([trainer.eval_dataset["input_ids"], trainer.eval_dataset["loss_mask"]])
    held_out = Path(cli.out) / "held_out" / hashlib.sha256(content.encode()).hexdigest()[:16]
    if not held_out.exists():
        trainer.eval_dataset.save_to_disk(str(held_out))
    history = trainer.state.log_history
    return {
        "arm": arm["name"], "kind": arm["kind"], "seed": seed, "overrides": arm["overrides"], "config": config,
        "wall_s": round(wall, 1), "steps": trainer.state.global_step, "output_dir": str(output_dir),
        "held_out": str(held_out), "snapshots": budget.snapshots, "seconds_at_step": budget.seconds_at_step,
        "train_s": budget.seconds_at_step.get(str(trainer.state.global_step)), "diverged_at": budget.diverged_at,
        "train_log": [e for e in history if "loss" in e],
    }  # fmt: skip


def _paired(k_new: list[float], k_old: list[float], rows: list[int]) -> tuple[float, float]:
    return paired_tau_difference(torch.tensor(k_new), torch.tensor(k_old), torch.tensor(rows))


def _train_s(run: dict) -> float:
    """Training CPU seconds (`TrainingBudget`); a run stopped before its first step: its whole wall time."""
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


def eval_sets(cli: argparse.Namespace, results: dict, target, tokenizer) -> dict[str, tuple]:
    """name -> (dataset, sampled, drafters): each held-out split the runs trained beside (scored for its runs,
    their snapshots and the warm start) and, with --transfer-prompts, the transfer sets (every final drafter).
    Drafters map a name to (saved path, drafter temperature); on sampled sets the warm start is also scored at
    every --temperatures, the control for gains at T=1 that a served temperature would give as well."""
    warm = {"warm_start": (cli.warm_start, 1.0)}
    splits: dict[str, dict] = {}
    for name, run in results.items():
        drafters = splits.setdefault(run["held_out"], dict(warm))
        drafters[name] = (run["output_dir"], 1.0)
        drafters.update({f"{name}@step-{step}": (p, 1.0) for step, p in run["snapshots"].items()})
    sets = {}
    for split, drafters in sorted(splits.items()):
        label = "held-out" if len(splits) == 1 else f"held-out {Path(split).name[:8]}"
        sets[label] = (load_from_disk(split), False, drafters)
    if cli.transfer_prompts:
        finals = {**warm, **{name: (run["output_dir"], 1.0) for name, run in results.items()}}
        controls = {f"warm_start@T{t:g}": (cli.warm_start, t) for t in cli.temperatures}
        for name, dataset in transfer_data(target, tokenizer, cli.transfer_prompts).items():
            sampled = name.endswith("T1")
            sets[name] = (dataset, sampled, {**finals, **controls} if sampled else finals)
    return sets


def _batches(dataset, pad: int, size: int = 4):
    for start in range(0, len(dataset), size):
        yield (
            start,
            collate_sequences([dataset[i] for i in range(start, min(start + size, len(dataset)))], pad),
        )


def _window_rows(start: int, batch: dict, stride: int) -> list[int]:
    """The dataset row of every window of a batch, in the order the acceptance functions return them."""
    flags = anchor_flags(batch["attention_mask"], batch["loss_mask"])[:, ::stride]
    return (start + flags.nonzero()[:, 0]).tolist()


def _score_greedy(cli, target, dataset, pad, todo: dict, desc: str) -> tuple[list[int], dict, dict]:
    """Chain k at --window and tree k at (--tree-width, --tree-window) from one forced forward per window; the
    target's features are computed once and kept for every drafter."""
    cached, layers, chain, tree = None, None, {}, {}
    depth = max(cli.window, cli.tree_window)
    for name, (path, _) in tqdm(todo.items(), desc=desc):
        drafter = load_drafter(path, target).eval()
        if cached is None:
            layers = feature_layers(drafter)
            cached = [
                (
                    start,
                    batch,
                    capture_features(target, batch["input_ids"], batch["attention_mask"], layers, False),
                )
                for start, batch in _batches(dataset, pad)
            ]
        elif feature_layers(drafter) != layers:
            raise ValueError(f"{name} reads other target layers than the drafters scored with it")
        chain[name], tree[name] = [], []
        for _, batch, captured in cached:
            ranks = teacher_forced_ranks(
                drafter, getattr(captured, drafter.feature_name), batch["input_ids"],
                batch["attention_mask"], batch["loss_mask"], depth, cli.anchor_stride,
            )  # fmt: skip
            chain[name] += tree_accepted_length(ranks[:, : cli.window], 1).tolist()
            tree[name] += tree_accepted_length(ranks[:, : cli.tree_window], cli.tree_width).tolist()
    rows = [r for start, batch, _ in cached or [] for r in _window_rows(start, batch, cli.anchor_stride)]
    return rows, chain, tree


def _score_sampled(cli, target, dataset, pad, todo: dict, desc: str) -> tuple[list[int], dict]:
    """Expected k at --window under lossless speculative sampling at T=1; the target's logits are too large
    to keep, so every drafter is scored on a batch while its logits are at hand."""
    drafters = {name: (load_drafter(path, target).eval(), t) for name, (path, t) in todo.items()}
    layers = feature_layers(next(iter(drafters.values()))[0])
    scores, rows = {name: [] for name in todo}, []
    for start, batch in tqdm(list(_batches(dataset, pad)), desc=desc):
        ids, attn, lmask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        captured = capture_features(target, ids, attn, layers, True)
        for name, (drafter, temperature) in drafters.items():
            features = getattr(captured, drafter.feature_name)
            scores[name] += teacher_forced_expected_acceptance(
                drafter,
                features,
                captured.logits,
                ids,
                attn,
                lmask,
                cli.window,
                temperature,
                cli.anchor_stride,
            ).tolist()
        rows += _window_rows(start, batch, cli.anchor_stride)
    return rows, scores


@torch.no_grad()
def score(cli: argparse.Namespace, results: dict, stored: dict) -> dict:
    """k at every window of every evaluation set (`eval_sets`) for every drafter not yet scored: greedy sets give
    a chain entry and a tree entry (`<set> tree w=.. K=..`), sampled sets the expected k. stored[entry] =
    {"rows": dataset row per window, "k": {drafter: k per window}}; the windows are the same for every drafter."""
    target, tokenizer = load_target("embedded" if cli.target is None else cli.target)
    pad = pad_token_id(tokenizer)
    for set_name, (dataset, sampled, drafters) in eval_sets(cli, results, target, tokenizer).items():
        entry = stored.setdefault(set_name, {"k": {}})
        tree_name = f"{set_name} tree w={cli.tree_width} K={cli.tree_window}"
        todo = {n: d for n, d in drafters.items() if n not in entry["k"]}
        if not todo:
            continue
        desc = f"scoring {len(todo)} drafters on {set_name}"
        if sampled:
            entry["rows"], scores = _score_sampled(cli, target, dataset, pad, todo, desc)
            entry["k"].update(scores)
        else:
            rows, chain, tree = _score_greedy(cli, target, dataset, pad, todo, desc)
            for name, values in ((set_name, chain), (tree_name, tree)):
                stored.setdefault(name, {"k": {}})["rows"] = rows
                stored[name]["k"].update(values)
    return stored


def fitted_temperature(stored: dict, set_name: str) -> str | None:
    """The warm start's `warm_start@T<t>` entry that scores best on the other sampled set (on this one when it is
    the only one): a served temperature chosen without looking at the set it is compared on."""
    others = [n for n in stored if n.endswith("T1") and n != set_name] or [set_name]
    fit = stored[others[0]]["k"]
    candidates = [n for n in fit if n.startswith("warm_start@T")]
    return max(candidates, key=lambda n: sum(fit[n])) if candidates else None


def curves(results: dict, entry: dict) -> dict:
    """Per run, [(training CPU seconds, optimizer step, tau)] from the warm start through its snapshots to its
    final drafter, on one scored set."""
    out = {}
    for name, run in results.items():
        if name not in entry["k"]:
            continue
        points = [(0.0, 0, entry["k"]["warm_start"])]
        points += [
            (run["seconds_at_step"][s], int(s), entry["k"][f"{name}@step-{s}"]) for s in run["snapshots"]
        ]
        points.append((run["train_s"] or 0.0, run["steps"], entry["k"][name]))
        out[name] = [(sec, step, acceptance_length(torch.tensor(k))) for sec, step, k in points]
    return out


def plot(results: dict, stored: dict, path: Path) -> None:
    """Held-out tau (chain and tree) against training CPU seconds, one line per run, colour per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in stored if n.startswith("held-out")]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    arms = sorted({r["arm"] for r in results.values()})
    for axis, set_name in zip(axes[0], names):
        for name, points in curves(results, stored[set_name]).items():
            arm = results[name]["arm"]
            first = name == next(n for n in results if results[n]["arm"] == arm)
            axis.plot(
                [p[0] for p in points], [p[2] for p in points], marker="o", color=f"C{arms.index(arm)}",
                label=arm if first else None,
            )  # fmt: skip
        axis.set_xlabel("training CPU seconds")
        axis.set_ylabel("tau (teacher-forced, greedy)")
        axis.set_title(set_name, fontsize=9)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _fmt(pair: tuple[float, float] | None) -> str:
    return "-" if pair is None else f"{pair[0]:+.3f} +- {pair[1]:.3f}"


def report(results: dict, stored: dict, control: str | None) -> dict:
    """One table per scored set (printed as markdown): per arm, tau, the paired differences to the warm start and
    to the control arm, and on sampled sets to the warm start at its fitted temperature."""
    summaries = {}
    for set_name, entry in sorted(stored.items()):
        k = entry["k"]
        scored = {n: (k[n], k["warm_start"], entry["rows"]) for n in results if n in k}
        reference = fitted_temperature(stored, set_name) if set_name.endswith("T1") else None
        rows = summarise(results, scored, control)
        header = (
            "| arm | kind | seeds | steps | tau (mean +- spread) | vs warm start | vs control | train s |"
        )
        if reference is not None:
            for row in rows:
                names = [n for n in scored if results[n]["arm"] == row["arm"]]
                row["vs_fitted_temperature"] = _pooled(
                    [_paired(k[n], k[reference], entry["rows"]) for n in names]
                )
            header += f" vs {reference} |"
            print(f"\n{set_name}: warm start {acceptance_length(torch.tensor(k['warm_start'])):.3f}, at "
                  f"{reference.split('@')[1]} (fitted on the other set) "
                  f"{acceptance_length(torch.tensor(k[reference])):.3f}")  # fmt: skip
        else:
            print(f"\n{set_name}: warm start {acceptance_length(torch.tensor(k['warm_start'])):.3f}")
        print(header + "\n|" + "---|" * (header.count("|") - 1))
        for row in rows:
            line = (
                f"| {row['arm']} | {row['kind']} | {len(row['seeds'])} | {row['steps']} | {row['tau']:.3f} +- "
                f"{row['spread']:.3f} | {_fmt(row['vs_warm_start'])} | {_fmt(row['vs_control'])} | "
                f"{row['train_s']:.0f} |"
            )
            print(line + (f" {_fmt(row['vs_fitted_temperature'])} |" if reference else ""))
        summaries[set_name] = rows
    return summaries


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
    parser.add_argument(
        "--steps", type=int, default=60, help="optimizer steps per run (a cap with --train-seconds)"
    )
    parser.add_argument("--eval-every", type=int, default=20, help="a curve point every N steps")
    parser.add_argument(
        "--train-seconds", type=float, default=None,
        help="equal compute: each run trains this many CPU seconds of its process (TrainingBudget)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-every-seconds", type=float, default=None, help="with --train-seconds: a curve point every N"
    )
    parser.add_argument("--json", default="outputs/ppow_training.json")
    parser.add_argument("--out", default="outputs/ppow_training")
    parser.add_argument("--plot", default=None, help="PNG of held-out tau against training CPU seconds")
    parser.add_argument("--train-only", action="store_true", help="train the missing runs, score nothing")
    parser.add_argument(
        "--transfer-prompts", type=int, default=0,
        help="also score the final drafters on the target's answers to this many MT-Bench and HumanEval "
        "prompts each, at T=0 (k) and T=1 (expected k); 0: off",
    )  # fmt: skip
    parser.add_argument("--window", "--transfer-window", type=int, default=5, help="K of the chain scores")
    parser.add_argument("--tree-width", type=int, default=4, help="w of the tree tau (greedy sets)")
    parser.add_argument("--tree-window", type=int, default=10, help="K of the tree tau")
    parser.add_argument(
        "--temperatures", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.1, 1.25],
        help="drafter temperatures of the warm start on sampled sets (the calibration control)",
    )  # fmt: skip
    parser.add_argument(
        "--anchor-stride", type=int, default=1,
        help="score every s-th window only (teacher_forced_ranks): scoring many drafters costs ~1/s",
    )  # fmt: skip
    parser.add_argument("--target", default=None, help="target of the transfer scores (default: embedded)")
    cli = parser.parse_args(argv)
    arms = parse_arms(cli)
    control = cli.control or next((a["name"] for a in arms if a["kind"] == "cst"), None)

    path = Path(cli.json)
    stored = json.loads(path.read_text()) if path.exists() else {}
    results, scores = stored.get("runs", {}), stored.get("scores", {})

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": results, "scores": scores}))

    for seed in cli.seeds:
        for arm in arms:
            name = f"{arm['name']}@{seed}"
            if name in results and "failed" not in results[name]:
                continue
            try:
                results[name] = run_one(arm, seed, cli, Path(cli.out) / name)
            except Exception as error:  # reported and retried by the next call; the other runs carry on
                print(f"{name} failed: {error!r}", file=sys.stderr)
                results[name] = {"arm": arm["name"], "seed": seed, "failed": repr(error)}
            save()
    failed = {name: run["failed"] for name, run in results.items() if "failed" in run}
    results = {name: run for name, run in results.items() if name not in failed}
    if cli.train_only:
        return {"runs": results, "failed": failed}
    scores = score(cli, results, scores)
    save()
    print(f"warm start {cli.warm_start}; control arm: {control}")
    for name, error in failed.items():
        print(f"FAILED (not scored; a rerun retries it): {name}: {error}")
    for name, run in results.items():
        if run.get("diverged_at") is not None:
            print(f"DIVERGED (loss not finite; stopped at step {run['diverged_at']}): {name}")
    summaries = report(results, scores, control)
    if cli.plot:
        plot(results, scores, Path(cli.plot))
    return {"summary": summaries, "runs": results, "scores": scores, "failed": failed}


if __name__ == "__main__":
    main()
