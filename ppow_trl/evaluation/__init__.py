"""Evaluation of a trained drafter: `config` (EvaluationConfig), `runner` (load, generate, time: `evaluate`)
and `report` (the per-set summary, results.json, results.md and the plots)."""

from .config import BASELINES, DECODINGS, EvaluationConfig
from .report import PLOT_FILES, markdown_table, summarise, write_plots, write_report
from .runner import evaluate, hardware_info, load_prompt_set, versions

__all__ = [
    "BASELINES",
    "DECODINGS",
    "PLOT_FILES",
    "EvaluationConfig",
    "evaluate",
    "hardware_info",
    "load_prompt_set",
    "markdown_table",
    "summarise",
    "versions",
    "write_plots",
    "write_report",
]
