"""Evaluation of a trained drafter: tau, per-position acceptance, speedup over plain `generate`, the
lossless check, and the report (results.json, results.md, plots)."""

from .runner import (
    BASELINES,
    DECODINGS,
    PLOT_FILES,
    EvaluationConfig,
    accepted_length_histogram,
    evaluate,
    hardware_info,
    load_drafter,
    load_prompt_set,
    markdown_table,
    per_position_acceptance,
    versions,
    write_plots,
    write_report,
)

__all__ = [
    "BASELINES",
    "DECODINGS",
    "PLOT_FILES",
    "EvaluationConfig",
    "accepted_length_histogram",
    "evaluate",
    "hardware_info",
    "load_drafter",
    "load_prompt_set",
    "markdown_table",
    "per_position_acceptance",
    "versions",
    "write_plots",
    "write_report",
]
