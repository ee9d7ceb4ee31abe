"""Evaluation of a trained drafter: `config` (EvaluationConfig), `runner` (load, generate, time: `evaluate`)
and `report` (the per-set summary, results.json, results.md and the plots)."""

from ppow_trl.decoding.cost import hardware_info  # where timings record their machine

from .config import BASELINES, EvaluationConfig
from .report import PLOT_FILES, markdown_table, summarise, write_plots, write_report
from .runner import evaluate, load_prompt_set, versions

__all__ = [
    "BASELINES",
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
