"""The evaluation report: one result per prompt set and temperature (`summarise`), and its files:
results.json (strict JSON), results.md (a markdown table) and two PNG plots.

Metric definitions: docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ppow_trl.decoding.hf import decoding_round
from ppow_trl.evaluation.config import EvaluationConfig
from ppow_trl.metrics import (
    ALPHA_DEFINITION,
    TAU_DEFINITION,
    acceptance_length,
    accepted_length_histogram,
    format_number,
    per_position_acceptance,
)

logger = logging.getLogger(__name__)

PLOT_FILES = ("acceptance_per_position.png", "accepted_length_histogram.png")

DEFINITIONS = {
    "tau": TAU_DEFINITION.removeprefix("tau = "),
    "alpha_j": ALPHA_DEFINITION.removeprefix("alpha_j = "),
    "speedup": "speculative tokens/s / plain generate tokens/s, same process, same linear-layer kernels (packed "
    "oneDNN on CPU fp32), batch size 1, after warm-up",
    "greedy_matches": "generations whose greedy speculative output equals plain greedy token for token",
    "accepted_length_histogram": "counts of k = 0..K over the rounds that drafted at least one token (with auto, "
    "windows of every size)",
    "baseline tau": "the same count for the baselines: plain generate is 1 + 1/(forwards - 1), not 1, because "
    "its prefill forward also yields the first token and the prefill is not counted as a verification",
    "mean_accepted_length": "mean k over rounds that verified at least one draft token",
    "tau_windows": "mean (k + 1) over those rounds (tau per verification window, docs/metrics.md)",
    "teacher_forced_tree_tau": "1 + mean accepted depths of a window forced along the target's own greedy answer, "
    "a depth accepted while the answer's token is among the drafter's top-w there (teacher_forced_tree_width, "
    "K = teacher_forced_tree_window)",
}


# ---------------------------------------------------------------------------------------------- summaries
def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def _mean_or_nan(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else float("nan")


def _total(records: list[dict], method: str, key: str) -> float:
    return sum(r[method][key] for r in records)


def _tokens(records: list[dict], method: str) -> int:
    return sum(len(r[method]["tokens"]) for r in records)


def _matches(records: list[dict], method: str) -> int:
    return sum(r[method]["tokens"] == r["plain"]["tokens"] for r in records)


def _lookup_records(records: list[dict]) -> dict[str, list[dict]]:
    """Per K, the records with that prompt-lookup generation as "lookup" (older records hold one, unkeyed)."""
    keyed = [r["lookup"] if "tokens" not in r["lookup"] else {"?": r["lookup"]} for r in records]
    return {k: [{**r, "lookup": g[k]} for r, g in zip(records, keyed)] for k in keyed[0]}


def _acceptance(records: list[dict], k: int) -> dict[str, Any]:
    """Acceptance of the speculative rounds: tau per window, mean k, alpha_j and the histogram of k."""
    accepted = torch.tensor([a for r in records for a in r["spec"]["accepted"]], dtype=torch.long)
    windows = torch.tensor([w for r in records for w in r["spec"]["window_sizes"]], dtype=torch.long)
    drafted = accepted[windows > 0]
    return {
        "tau_windows": _mean_or_nan(drafted + 1),
        "mean_accepted_length": _mean_or_nan(drafted),
        "alpha": per_position_acceptance(accepted, k, window_sizes=windows, unreached=float("nan")).tolist(),
        "accepted_length_histogram": accepted_length_histogram(accepted[windows > 0], k),
        "num_rounds": int(accepted.numel()),
    }


def _greedy_check(records: list[dict], greedy: bool) -> dict[str, Any]:
    """The lossless check: at temperature 0 speculative output must equal plain greedy output."""
    if not greedy:
        return {"greedy_matches": None, "greedy_total": None, "mismatched_ids": None}
    return {
        "greedy_matches": _matches(records, "spec"),
        "greedy_total": len(records),
        "mismatched_ids": [
            f"{r['id']}#{r['turn']}" for r in records if r["spec"]["tokens"] != r["plain"]["tokens"]
        ],
    }


def _generation_rows(records: list[dict]) -> list[dict[str, Any]]:
    return [
        {
            "id": r["id"],
            "turn": r["turn"],
            "prompt_tokens": r["prompt_tokens"],
            "plain_tokens": len(r["plain"]["tokens"]),
            "speculative_tokens": len(r["spec"]["tokens"]),
            "verify_forwards": r["spec"]["verify_forwards"],
            "outputs_match": r["spec"]["tokens"] == r["plain"]["tokens"],
        }
        for r in records
    ]


def _baseline_row(records: list[dict], method: str, plain_tps: float) -> dict[str, Any]:
    tokens = _tokens(records, method)
    tps = _ratio(tokens, _total(records, method, "seconds"))
    forwards = sum(r[method]["forwards"] - 1 for r in records)  # the prefill forward is not a verification
    return {
        "tokens_per_s": tps,
        "tau": tokens / forwards if forwards else float("nan"),
        "speedup": _ratio(tps, plain_tps),
        "generated_tokens": tokens,
    }


def _baselines(records: list[dict], baselines: list[str], plain_tps: float, greedy: bool) -> dict[str, Any]:
    """Rows for plain `generate` on its own and transformers' prompt-lookup decoding at its best K on the set
    (`speedup_by_num_tokens` holds every K)."""
    rows = {}
    if "plain" in baselines:
        rows["plain"] = {**_baseline_row(records, "plain", plain_tps), "speedup": 1.0}
    if "prompt_lookup" in baselines and records:
        by_k = {k: _baseline_row(group, "lookup", plain_tps) for k, group in _lookup_records(records).items()}
        best = max(by_k, key=lambda k: by_k[k]["speedup"])
        rows["prompt_lookup"] = {
            **by_k[best],
            "num_tokens": int(best) if best.isdigit() else None,
            "speedup_by_num_tokens": {k: row["speedup"] for k, row in by_k.items()},
            "greedy_matches": _matches(_lookup_records(records)[best], "lookup") if greedy else None,
        }
    return rows


def summarise(
    config: EvaluationConfig,
    drafter_name: str,
    name: str,
    temperature: float,
    examples: list,
    records: list[dict],
    teacher_forced: torch.Tensor | None = None,
    teacher_forced_tree: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One result of the report: a prompt set at one temperature, from the per-turn `records` of the runner
    (each with the "plain", "spec" and optional "lookup" generations of one prompt turn) and the teacher-forced
    k of every chain and tree window over the target's own answers (greedy only)."""
    windows = [w for r in records for w in r["spec"]["window_sizes"]]
    # The longest window verified sizes the per-position columns (auto draft length varies per round).
    k = config.num_draft_tokens if config.num_draft_tokens != "auto" else max(windows, default=1)
    greedy = temperature == 0
    tree = teacher_forced_tree is not None
    spec_tokens, plain_tokens = _tokens(records, "spec"), _tokens(records, "plain")
    spec_seconds, plain_seconds = _total(records, "spec", "seconds"), _total(records, "plain", "seconds")
    forwards = _total(records, "spec", "verify_forwards")
    plain_tps, spec_tps = _ratio(plain_tokens, plain_seconds), _ratio(spec_tokens, spec_seconds)
    baselines = _baselines(records, config.baselines, plain_tps, greedy)
    lookup = baselines.get("prompt_lookup")
    over_lookup = _ratio(_ratio(spec_tps, plain_tps), lookup["speedup"]) if lookup else None
    return {
        "prompt_set": name,
        "temperature": temperature,
        "method": f"{drafter_name} ({config.method})",
        "drafting": _drafting(config, temperature),
        "window_size": k,
        "num_draft_tokens": config.num_draft_tokens,
        "mean_window": sum(windows) / len(windows) if windows else float("nan"),
        "num_prompts": len(examples),
        "num_generations": len(records),
        "generated_tokens": spec_tokens,
        "verify_forwards": forwards,
        "tau": spec_tokens / forwards if forwards else float("nan"),
        "teacher_forced_tau": acceptance_length(teacher_forced) if teacher_forced is not None else None,
        "teacher_forced_window": config.teacher_forced_window if teacher_forced is not None else None,
        "teacher_forced_windows": int(teacher_forced.numel()) if teacher_forced is not None else 0,
        "teacher_forced_tree_tau": acceptance_length(teacher_forced_tree) if tree else None,
        "teacher_forced_tree_width": config.teacher_forced_tree_width if tree else None,
        "teacher_forced_tree_window": config.teacher_forced_tree_window if tree else None,
        **_acceptance(records, k),
        "plain_tokens": plain_tokens,
        "plain_seconds": plain_seconds,
        "speculative_seconds": spec_seconds,
        "drafter_seconds": _total(records, "spec", "drafter_seconds"),
        "plain_tokens_per_s": plain_tps,
        "speculative_tokens_per_s": spec_tps,
        "speedup": _ratio(spec_tps, plain_tps),
        **_greedy_check(records, greedy),
        "baselines": baselines,
        # against the free method a user has anyway: the drafter is worth serving on this set where this is > 1
        "speedup_over_prompt_lookup": over_lookup,
        "generations": _generation_rows(records),
        "settings": {
            "max_new_tokens": config.max_new_tokens,
            "num_draft_tokens": config.num_draft_tokens,
            "temperature": temperature,
            "method": config.method,
            "batch_size": 1,
            "dtype": config.dtype,
            "drafting": _drafting(config, temperature),
        },
    }


def _drafting(config: EvaluationConfig, temperature: float) -> str:
    """What a round verified: the config's tree and lookup settings as `generate` resolves them."""
    shape = decoding_round(config.round_options(), temperature > 0, config.method)
    width, lookup = shape["draft_tree_width"], shape["prompt_lookup_tokens"]
    shape = "chain" if width == 1 else f"dynamic tree of width {width}"
    return shape + (f" + prompt-lookup branch of up to {lookup} tokens" if lookup else "")


def hardware_line(hardware: dict[str, Any]) -> str:
    if hardware.get("gpu"):
        return f"{hardware['gpu']}"
    return f"{hardware['cpu']} ({hardware['cpu_cores']} cores, {hardware['torch_threads']} torch threads)"


# ------------------------------------------------------------------------------------------------- files
def _fmt(value: Any, digits: int = 2) -> str:
    return format_number(value, digits)


def markdown_table(report: dict[str, Any]) -> str:
    """The results as a markdown table (one row per prompt set, temperature and method)."""
    results, settings = report["results"], report["settings"]
    k = max((r["window_size"] for r in results), default=0)
    alpha_cols = " | ".join(f"a{j}" for j in range(1, k + 1))
    requested = report["settings"]["num_draft_tokens"]
    window = f"K={requested}" if requested != "auto" else f"K=auto (per round, longest verified {k})"
    lines = [
        f"Drafter `{report['drafter']}` on target `{report['target']}`: {results[0]['drafting'] if results else 'chain'} "
        f"drafting, {window}, batch size 1, "
        f"{report['settings']['dtype']}, max_new_tokens={report['settings']['max_new_tokens']}; "
        f"hardware: {hardware_line(report['hardware'])}.",
        "",
        f"{TAU_DEFINITION}; "
        "speedup = tokens/s vs plain `generate` in the same process; a_j is - where no window reached position j; "
        "teacher-forced tau = 1 + mean accepted draft tokens of a fixed-K greedy window at every position of the "
        "target's own greedy answers; teacher-forced tree tau = the same with the drafter's top-w tokens at "
        "every depth.",
        "",
        *_timing_lines(report),
        f"| prompt set | T | method | gens | tokens | tau | mean window | mean k | {alpha_cols} | tok/s | speedup "
        f"| greedy match | teacher-forced tau (K={settings.get('teacher_forced_window', '-')}) "
        f"| teacher-forced tree tau (w={settings.get('teacher_forced_tree_width', '-')}, "
        f"K={settings.get('teacher_forced_tree_window', '-')}) |",
        "|" + "---|" * (13 + k),
    ]
    for r in results:
        alphas = " | ".join(_fmt(a) for a in r["alpha"] + [float("nan")] * (k - len(r["alpha"])))
        match = f"{r['greedy_matches']}/{r['greedy_total']}" if r["greedy_total"] is not None else "-"
        lines.append(
            f"| {r['prompt_set']} | {r['temperature']:g} | {r['method']} | {r['num_generations']} | "
            f"{r['generated_tokens']} | {_fmt(r['tau'])} | {_fmt(r['mean_window'])} | "
            f"{_fmt(r['mean_accepted_length'])} | {alphas} | "
            f"{_fmt(r['speculative_tokens_per_s'], 1)} | {_fmt(r['speedup'])}x | {match} | "
            f"{_fmt(r.get('teacher_forced_tau'), 3)} | {_fmt(r.get('teacher_forced_tree_tau'), 3)} |"
        )
        blank = " | ".join("-" for _ in range(k))
        for name, b in r["baselines"].items():
            if b.get("num_tokens"):
                name = f"{name}, best K={b['num_tokens']} of {','.join(b['speedup_by_num_tokens'])}"
            bmatch = "-"
            if b.get("greedy_matches") is not None:
                bmatch = f"{b['greedy_matches']}/{r['greedy_total']}"
            lines.append(
                f"| {r['prompt_set']} | {r['temperature']:g} | {name} | {r['num_generations']} | "
                f"{b['generated_tokens']} | {_fmt(b['tau'])} | - | - | {blank} | {_fmt(b['tokens_per_s'], 1)} | "
                f"{_fmt(b['speedup'])}x | {bmatch} | - | - |"
            )
    versus = [r for r in results if r.get("speedup_over_prompt_lookup") is not None]
    if versus:
        lines += ["", "Against prompt lookup at its best K (free, no drafter), same process:", ""]
        for r in versus:
            ratio = r["speedup_over_prompt_lookup"]
            winner = "the drafter wins" if ratio > 1 else "prompt lookup wins"
            lines.append(
                f"- {r['prompt_set']} T={r['temperature']:g}: {_fmt(r['speedup'])}x vs "
                f"{_fmt(r['baselines']['prompt_lookup']['speedup'])}x (K={r['baselines']['prompt_lookup']['num_tokens']})"
                f" = {_fmt(ratio)}x, {winner}"
            )
    return "\n".join(lines) + "\n"


def _timing_lines(report: dict[str, Any]) -> list[str]:
    """The machine's load while timing and the cost table "auto" priced windows with (older reports have
    neither)."""
    lines = []
    load = report.get("machine_load")
    if load:
        lines.append(
            f"Machine load while timing: load average up to {load['max_load_average']:.2f}, other processes used "
            f"up to {load['max_others_busy_cores']:.2f} cores"
            + (" (**loaded**: speedups are unreliable)." if load["loaded"] else " (not loaded).")
        )
    table = report.get("cost_table")
    if table:
        age = (
            ""
            if table.get("age_s") is None
            else f", measured {table['measured_at']} ({table['age_s'] / 3600:.1f} h before the end)"
        )
        measured_load = (table.get("load") or {}).get("load_average")
        lines.append(
            f"Cost table ({table['source']}{age}"
            + (f", load average {measured_load:.2f} then" if measured_load is not None else "")
            + f"): drafter step = {100 * table['draft_verify_ratio']:.1f}% of a 1-token verification, "
            f"c(6)/c(1) = {table['c6_over_c1']:.2f}"
            + (f"; problems: {'; '.join(table['problems'])}" if table.get("problems") else "")
            + "."
        )
    return [*lines, ""] if lines else []


def write_plots(report: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """Per-position acceptance per prompt set, and the histogram of accepted lengths (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    results = report["results"]
    k = max((r["window_size"] for r in results), default=1)
    paths = [output_dir / name for name in PLOT_FILES]

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(
            range(1, len(r["alpha"]) + 1),
            r["alpha"],
            marker="o",
            label=f"{r['prompt_set']} T={r['temperature']:g}",
        )
    ax.set_xlabel("draft position j")
    ax.set_ylabel("alpha_j = P(accept j | 1..j-1 accepted)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, k + 1))
    ax.set_title(f"Per-position acceptance (windows up to K={k})")
    ax.grid(alpha=0.3)
    if results:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(results), 1)
    histograms = [r["accepted_length_histogram"] for r in results]
    rounds = sum(sum(h) for h in histograms)
    longest = max((i for h in histograms for i, count in enumerate(h) if count), default=0)
    for i, r in enumerate(results):
        counts = torch.tensor(r["accepted_length_histogram"], dtype=torch.float64)
        freq = (counts / counts.sum()).tolist() if counts.sum() > 0 else counts.tolist()
        ax.bar(
            [x + i * width for x in range(len(freq))], freq, width=width,
            label=f"{r['prompt_set']} T={r['temperature']:g}",
        )  # fmt: skip
    ax.set_xlabel("accepted draft tokens k per round")
    ax.set_ylabel("fraction of the rounds that drafted")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(k + 1)], [str(x) for x in range(k + 1)])
    ax.set_xlim(-0.5, longest + 1)
    ax.set_title(f"Accepted lengths over {rounds} drafted rounds (longest accepted: {longest})")
    if results:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def _strict_json(value: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def write_report(report: dict[str, Any], output_dir: str | Path, plots: bool = True) -> None:
    """Write results.json, results.md and (optionally) the plots into output_dir."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(_strict_json(report), indent=1, default=str))
    (output_dir / "results.md").write_text(markdown_table(report))
    if plots:
        write_plots(report, output_dir)
    logger.info("Evaluation written to %s", output_dir)
