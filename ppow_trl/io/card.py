"""Model cards for drafters, rendered from `templates/drafter_card.md` (as TRL renders its cards).

`drafter_model_card` fills the template from what a run knows: the drafter and its target, how it was
trained (warm start, PPOW settings, data fingerprint), held-out and decoding evaluation, and how to serve it
(transformers through `ppow_trl.generate`, vLLM, SGLang). The metadata names the target as `base_model` and
sets no `pipeline_tag`: a drafter cannot generate text on its own, and `text-generation` makes the Hub offer
a serving snippet that would launch the drafter as if it were a model.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import ModelCardData
from transformers import PreTrainedModel

from ppow_trl.hub_id import is_hub_id
from ppow_trl.io.convert import serving_layer_ids, target_hub_id
from ppow_trl.io.layouts import LAYOUTS, check_format
from ppow_trl.io.source import UNKNOWN_TARGETS
from ppow_trl.metrics import ALPHA_DEFINITION, TAU_DEFINITION, format_number
from ppow_trl.models.common import unwrap_drafter

LIBRARY_NAME = "ppow-trl"
TEMPLATE = Path(__file__).parent / "templates" / "drafter_card.md"
CARD_RECORD = "drafter_card.json"
# What a serving engine measured with this drafter (benchmarks/serve_check.py writes it next to the weights), and
# the markers around its table in README.md, so a later check replaces the table instead of adding one.
SERVING_RECORD = "serving_check.json"
SERVING_MARKERS = ("<!-- serving-engine measurement -->", "<!-- end of serving-engine measurement -->")
PPOW_PAPER = {
    "title": "Performance-Driven Policy Optimization for Speculative Decoding with Adaptive Windowing",
    "id": "2605.14978",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{ppow2026,
            title        = {{Performance-Driven Policy Optimization for Speculative Decoding with Adaptive Windowing}},
            year         = 2026,
            eprint       = {arXiv:2605.14978},
        }"""),
}


def _held_out(eval_results: dict[str, Any] | None) -> dict[str, Any] | None:
    """The held-out table (tau, alpha_1..K) of the trainers' `eval_*` metrics."""
    if not eval_results:
        return None
    alphas = sorted(
        (int(k.rsplit("_", 1)[1]), v)
        for k, v in eval_results.items()
        if k.rsplit("_", 1)[0].endswith("alpha")
    )
    prefix = next((k[: -len("tau")] for k in eval_results if k.endswith("tau")), "eval_")
    return {
        "k": len(alphas),
        "columns": ["tau", *(f"alpha_{j}" for j, _ in alphas)],
        "cells": [format_number(eval_results.get(prefix + "tau")), *(format_number(v) for _, v in alphas)],
    }


def _decoding_rows(report: dict[str, Any] | None) -> list[list[str]]:
    """The rows of an evaluation report (`recipes/evaluate_drafter.py`'s results.json)."""
    rows = []
    for r in (report or {}).get("results") or []:
        match = "-" if r.get("greedy_matches") is None else f"{r['greedy_matches']}/{r.get('greedy_total')}"
        rows.append(
            [
                str(r.get("prompt_set")),
                str(r.get("temperature")),
                str(r.get("window_size")),
                format_number(r.get("tau")),
                " / ".join(format_number(a, 2) for a in r.get("alpha") or []),
                f"{format_number(r.get('speedup'), 2)}x",
                match,
                str(r.get("hardware", "-")),
            ]
        )
    return rows


def _imported(config: Any) -> dict[str, Any] | None:
    """Where an imported drafter came from; only a Hub id is called published."""
    imported = getattr(config, "imported_from", None)
    if not imported:
        return None
    return {**imported, "published": is_hub_id(imported.get("path", ""))}


def drafter_name(drafter: PreTrainedModel, ppow_trained: bool = False) -> str:
    """A drafter's name from its target and kind, e.g. ``smollm2-135m-instruct-eagle3-ppow``."""
    base_model = target_hub_id(drafter.config.target_name_or_path)
    suffix = f"{drafter.kind}-ppow" if ppow_trained else drafter.kind
    return f"{(base_model or 'target').split('/')[-1].lower()}-{suffix}"


def drafter_model_card(
    drafter: PreTrainedModel,
    format: str = "ppow",
    repo_id: str | None = None,
    num_speculative_tokens: int | None = None,
    training: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    layer_id_convention: str = "vllm",
    model_name: str | None = None,
    paper: dict[str, str] | None = None,
    serving: dict[str, Any] | None = None,
) -> str:
    """The README.md (YAML metadata + markdown) of a drafter.

    Args:
        drafter: the drafter (a LoRA-wrapped drafter is described by its base; exports merge the adapters).
        format: the layout of the folder the card describes (`ppow_trl.io.FORMATS`).
        repo_id: the Hub id (or local folder) used in the usage snippets (default: a placeholder).
        num_speculative_tokens: K in the usage snippets (default: the drafter's, see
            `default_num_speculative_tokens`).
        training: how it was trained: `method` ("PPOW", "supervised warm start", ...), `data` (a dict with
            `data_fingerprint` and counts) and any settings to list (K, G, gamma, steps, learning rate, ...).
        eval_results: held-out metrics (`eval_tau`, `eval_alpha_1..K`, as the trainers write them).
        report: the results.json of `recipes/evaluate_drafter.py` (tau, alpha_j, speedup with hardware).
        model_name: the card's title (default: the Hub repository's name, else `drafter_name`).
        paper: the paper of the training method, as TRL's trainers hold it in `_paper` (`title`, `id`,
            `citation`); its citation closes the card (default: the PPOW paper, this library's).
        serving: what a serving engine measured with this drafter (`serving_section`), as
            `benchmarks/serve_check.py` records it in `serving_check.json`.
    """
    check_format(format)
    model = unwrap_drafter(drafter)  # the card reads the config only: no need to merge adapters
    config = model.config
    settings = dict(training or {})
    method, data = settings.pop("method", None), settings.pop("data", None) or {}
    if not method and getattr(config, "warm_started", False):
        method = "supervised warm start"
    ppow_trained = method == "PPOW"
    name = drafter_name(model, ppow_trained)
    base_model = target_hub_id(config.target_name_or_path)
    tags = ["speculative-decoding", model.kind, *(["ppow"] if ppow_trained else []), "drafter"]
    if format == "speculators":
        tags.append("speculators")
    metadata = ModelCardData(base_model=base_model, library_name=LIBRARY_NAME, tags=tags)
    ids = None
    if model.kind == "eagle3" and format in ("eagle3", "speculators"):
        ids = serving_layer_ids(config.aux_layer_ids, layer_id_convention if format == "eagle3" else "vllm")
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return environment.from_string(TEMPLATE.read_text()).render(
        card_data=metadata.to_yaml().strip(),
        name=model_name or (repo_id.rstrip("/").split("/")[-1] if repo_id and is_hub_id(repo_id) else name),
        target_id=base_model
        or (config.target_name_or_path if config.target_name_or_path not in UNKNOWN_TARGETS else "<target>"),
        base_model=base_model,
        kind=model.kind,
        aux_layer_ids=list(getattr(config, "aux_layer_ids", None) or []),
        draft_vocab_size=config.draft_vocab_size,
        num_heads=getattr(config, "num_heads", None),
        num_layers=getattr(config, "num_layers", None),
        files=LAYOUTS[format].description,
        paper_id=PPOW_PAPER["id"],
        serving_layer_ids=ids,
        imported=_imported(config),
        method=method,
        settings=settings,
        data={k: v if k == "data_fingerprint" else format_number(v) for k, v in data.items()},
        tau_definition=TAU_DEFINITION,
        alpha_definition=ALPHA_DEFINITION,
        held_out=_held_out(eval_results),
        decoding=_decoding_rows(report),
        serving=serving_section(serving) if serving else None,
        repo_id=repo_id or f"<your-username>/{name}",
        format=format,
        k=int(num_speculative_tokens or model.default_num_speculative_tokens),
        layer_id_convention=layer_id_convention,
        citation=(paper or PPOW_PAPER)["citation"],
    )


def serving_section(record: dict[str, Any]) -> str:
    """The card's table of acceptance measured by a serving engine: per K, the engine's mean acceptance length
    (1 + accepted / drafts), its per-position rates and greedy identity with the engine run without the drafter;
    then the exact call the check made. `record`: `engine`, `setup` (a sentence), `call`, and `rows` of `k`,
    `mean_acceptance_length`, `acceptance_per_position`, `identical`, `prompts`."""
    lines = [
        SERVING_MARKERS[0],
        f"Measured by serving it with {record['engine']}: {record['setup']}",
        "",
        "| K | mean acceptance length | acceptance per position | greedy output identical to the engine without "
        "speculation |",
        "|---|---|---|---|",
    ]
    for row in record["rows"]:
        rates = ", ".join(f"{x:.3f}" for x in row["acceptance_per_position"])
        lines.append(
            f"| {row['k']} | {row['mean_acceptance_length']:.3f} | {rates} | {row['identical']}/{row['prompts']} |"
        )
    lines += ["", "The call the check made:", "", "```python", record["call"], "```", SERVING_MARKERS[1]]
    return "\n".join(lines)


def record_serving_check(folder: str | Path, record: dict[str, Any]) -> Path:
    """Store a serving engine's measurement in a drafter folder (`serving_check.json`) and show it in the
    folder's README.md: replacing the table of an earlier check, else before `## Usage` (else at the end).
    Later cards written from the folder (`run_card_inputs`, an export) carry it too. Returns README.md."""
    folder = Path(folder)
    (folder / SERVING_RECORD).write_text(json.dumps(record, indent=1))
    readme = folder / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    section = serving_section(record)
    start, end = (text.find(marker) for marker in SERVING_MARKERS)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(SERVING_MARKERS[1]) :]
    elif "\n## Usage" in text:
        head, tail = text.split("\n## Usage", 1)
        text = f"{head}\n{section}\n\n## Usage{tail}"
    else:
        text = f"{text.rstrip()}\n\n{section}\n"
    readme.write_text(text)
    return readme


def write_drafter_card(drafter: PreTrainedModel, directory: str | Path, **card_kwargs: Any) -> Path:
    """Write README.md into a saved drafter's directory, plus the card's inputs (`drafter_card.json`) so that
    an export of this folder later writes the same training record. The trainers call this on every save."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "README.md"
    path.write_text(drafter_model_card(drafter, **card_kwargs))
    record = {k: card_kwargs[k] for k in ("training", "eval_results") if card_kwargs.get(k)}
    (directory / CARD_RECORD).write_text(json.dumps(record, indent=1, default=str))
    return path


def run_card_inputs(output_dir: str | Path) -> dict[str, Any]:
    """What a training output folder knows for a card, as `drafter_model_card` arguments: the trainer's record
    (`drafter_card.json`), held-out results (`eval_results.json`), the evaluation report (`results.json` here or
    in `eval/`), a serving engine's measurement (`serving_check.json`) and the data split record (`split.json`,
    its fingerprint)."""
    out = Path(output_dir)
    found: dict[str, Any] = {}
    if (out / CARD_RECORD).is_file():
        found.update(json.loads((out / CARD_RECORD).read_text()))
    if (out / "eval_results.json").is_file():
        found["eval_results"] = json.loads((out / "eval_results.json").read_text())
    for candidate in (out / "results.json", out / "eval" / "results.json"):
        if candidate.is_file():
            found["report"] = json.loads(candidate.read_text())
            break
    if (out / SERVING_RECORD).is_file():
        found["serving"] = json.loads((out / SERVING_RECORD).read_text())
    if (out / "split.json").is_file():
        split = json.loads((out / "split.json").read_text())
        meta = split.get("settings", split)
        data = {k: meta.get(k) for k in ("data_fingerprint", "source", "corpus_fingerprint") if meta.get(k)}
        data.update({k: split[k] for k in ("num_train", "num_eval") if k in split})
        if data:
            training = dict(found.get("training") or {})
            training["data"] = {**data, **(training.get("data") or {})}
            found["training"] = training
    return found
