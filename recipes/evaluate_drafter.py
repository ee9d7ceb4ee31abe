"""Evaluate a trained drafter: tau, per-position acceptance, speedup over plain `generate`, lossless check.

    python recipes/evaluate_drafter.py --drafter outputs/eagle3-smollm2 --prompt_sets mt_bench humaneval \
        --max_prompts 8 --max_new_tokens 64 --num_draft_tokens 5 --temperatures 0 1 \
        --baselines plain prompt_lookup --output_dir outputs/eval
    python recipes/evaluate_drafter.py --config my_eval.yaml

Every field of `ppow_trl.evaluation.EvaluationConfig` is a flag (or a YAML key with --config); the target
defaults to the one recorded in the drafter's config. Use `--prompt_sets split:<run>/split.json` to evaluate
on the held-out prompts of a training run. Greedy results include the teacher-forced chain tau
(`--teacher_forced_window`) and tree tau (`--teacher_forced_tree_width`, `--teacher_forced_tree_window`) over
the target's own answers (docs/metrics.md). Writes results.json, results.md and PNG plots to --output_dir;
both record the machine's load while timing (with a warning when other processes needed the cores torch
uses) and the cost table `auto` priced windows with. `--remeasure_costs` measures that table again first.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ppow_trl.evaluation import EvaluationConfig, evaluate
from ppow_trl.training.parser import RecipeParser


def main(argv: list[str] | None = None) -> dict:
    parser = RecipeParser(EvaluationConfig)
    (config,) = parser.parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = evaluate(config)
    print((Path(config.output_dir) / "results.md").read_text())
    load = report["machine_load"]
    if load["loaded"]:
        logging.getLogger("evaluate_drafter").warning(
            "Other processes used up to %.2f cores of %d (load average up to %.2f) while this evaluation was "
            "timed with %d torch threads: its tokens/s and speedups are unreliable (recorded in results.json).",
            load["max_others_busy_cores"], report["hardware"]["cpu_cores"], load["max_load_average"],
            report["hardware"]["torch_threads"],
        )  # fmt: skip
    return report


if __name__ == "__main__":
    main()
