"""Does PPOW raise held-out acceptance above its warm start, and above continued supervised training?

    python benchmarks/ppow_training.py --warm-start outputs/smollm2-135m/sft-eagle3 --steps 60 \
        --run "ppow lr1e-4: --learning_rate 1e-4" --run "cst lr1e-4: --learning_rate 1e-4"

Every `--run "<kind> <name>: <overrides>"` trains the warm-start drafter for `--steps` optimizer steps
with a recipe: `ppow` = recipes/ppow.py with `--ppow-config`, `cst` = continued supervised
training with recipes/sft_drafter.py and `--sft-config` (the paper's control: same checkpoint, same
number of steps). The overrides are recipe command-line arguments. Held-out teacher-forced tau (greedy,
chain drafting, the configs' K) is read from each run's Trainer log every `--eval-every` steps. At the
end of a run the final drafter and the warm start are scored on the same held-out windows: the paired
difference and its standard error (clustered by sequence) say whether a change is larger than the noise.
Results go into `--json` as runs finish (a rerun skips runs already there) and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import ppow as ppow_recipe  # noqa: E402
import sft_drafter  # noqa: E402

from ppow_trl.export import load_drafter  # noqa: E402
from ppow_trl.metrics import paired_tau_difference  # noqa: E402
from ppow_trl.models.common import unwrap_drafter  # noqa: E402
from ppow_trl.training.acceptance import dataset_acceptance  # noqa: E402


def held_out_k(drafter, trainer, window_size: int):
    """k of every held-out window for `drafter`, scored with the trainer's eval data and target."""
    pad = trainer.processing_class.pad_token_id
    return dataset_acceptance(drafter, trainer.feature_provider, trainer.eval_dataset, window_size, pad, 4)


def run_one(kind: str, overrides: list[str], cli: argparse.Namespace, output_dir: Path, warm_k: dict) -> dict:
    common = [
        "--drafter_name_or_path", cli.warm_start, "--max_steps", str(cli.steps), "--eval_steps",
        str(cli.eval_every), "--save_strategy", "no", "--output_dir", str(output_dir), "--seed", str(cli.seed),
    ]  # fmt: skip
    start = time.perf_counter()
    if kind == "ppow":
        trainer = ppow_recipe.main(["--config", cli.ppow_config, *common, *overrides])
    else:
        trainer = sft_drafter.main(*sft_drafter.parse_args(["--config", cli.sft_config, *common, *overrides]))
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    warm = output_dir / "warm_start_results.json"  # the PPOW recipe evaluates the warm start first
    curve = {"0": json.loads(warm.read_text())["warm_start_tau"] if warm.exists() else None}
    for entry in history:
        if "eval_tau" in entry:
            curve[str(entry["step"])] = entry["eval_tau"]
    train_logs = [e for e in history if "loss" in e]
    window = trainer.args.eval_window_size or trainer.args.window_size
    key = (window, trainer.eval_dataset._fingerprint)  # runs may differ in their eval data (e.g. max_turns)
    if key not in warm_k:  # the warm start's windows, scored once per eval set
        warm_k[key] = held_out_k(load_drafter(cli.warm_start, trainer.target), trainer, window)
    k_old, rows = warm_k[key]
    k_new, _ = held_out_k(unwrap_drafter(trainer.model), trainer, window)
    delta, se = paired_tau_difference(k_new, k_old, rows)
    return {
        "kind": kind,
        "overrides": overrides,
        "curve": curve,
        "paired_delta": delta,
        "paired_se": se,
        "wall_s": round(wall, 1),
        "train_log": train_logs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm-start", required=True, help="saved warm-started drafter")
    parser.add_argument("--ppow-config", default="recipes/configs/smollm2-135m/ppow_eagle3_from_scratch.yaml")
    parser.add_argument("--sft-config", default="recipes/configs/smollm2-135m/sft_eagle3.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", action="append", required=True, help='"<ppow|cst> <name>: <overrides>"')
    parser.add_argument("--json", default="outputs/ppow_training.json")
    parser.add_argument("--out", default="outputs/ppow_training")
    cli = parser.parse_args()

    path = Path(cli.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    warm_k = {}
    for spec in cli.run:
        head, _, tail = spec.partition(":")
        kind, name = head.split()[0], "_".join(head.split())
        if kind not in ("ppow", "cst"):
            raise ValueError(f"run kind must be 'ppow' or 'cst', got {kind!r} in {spec!r}")
        if name in results:
            continue
        results[name] = run_one(kind, shlex.split(tail), cli, Path(cli.out) / name, warm_k)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    warm = next((r["curve"]["0"] for r in results.values() if r["curve"].get("0") is not None), None)
    steps = sorted({int(s) for r in results.values() for s in r["curve"] if s != "0"})
    print(f"warm start {cli.warm_start}: held-out tau {warm}")
    print(
        "| run | kind | overrides | "
        + " | ".join(f"tau @{s}" for s in steps)
        + " | vs warm start (paired, +- SE) | wall s |"
    )
    print("|---|---|---|" + "---|" * len(steps) + "---|---|")
    for name, r in results.items():
        taus = [r["curve"].get(str(s)) for s in steps]
        cells = " | ".join("-" if t is None else f"{t:.3f}" for t in taus)
        final = next((t for t in reversed(taus) if t is not None), None)
        gain = "-" if final is None or warm is None else f"{final - warm:+.3f}"
        if "paired_delta" in r:
            gain = f"{r['paired_delta']:+.3f} +- {r['paired_se']:.3f}"
        print(f"| {name} | {r['kind']} | `{' '.join(r['overrides'])}` | {cells} | {gain} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
