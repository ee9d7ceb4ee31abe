"""Model cards for drafters and pushing drafters to the Hugging Face Hub.

`drafter_model_card` renders a README.md from what a run knows: the drafter and its target, how it was
trained (warm start, PPOW settings, data fingerprint), held-out and decoding evaluation, and how to serve it
(transformers through `ppow_trl.generate`, vLLM, SGLang). The metadata names the target as `base_model` and
sets no `pipeline_tag`: a drafter cannot generate text on its own, and `text-generation` makes the Hub offer
a serving snippet that would launch the drafter as if it were a model.

`push_to_hub` exports the drafter (a serving format by default), writes the card next to it and uploads the
folder. `check_hub_access` runs before any training work in the recipes so that a missing token or an
offline machine fails in seconds with a message saying how to fix it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from ppow_trl.export.formats import (
    RECORD_KEY,
    check_format,
    export_drafter,
    serving_layer_ids,
    target_hub_id,
)
from ppow_trl.models import unwrap_drafter

logger = logging.getLogger(__name__)

LIBRARY_NAME = "ppow-trl"
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
TAU_DEFINITION = (
    "tau = generated tokens / target verification forwards (prefill excluded): the mean number of tokens one "
    "target forward yields, counting the token the target always adds (so tau = 1 + mean accepted draft tokens)"
)
ALPHA_DEFINITION = "alpha_j = P(draft token j accepted | draft tokens 1..j-1 accepted)"


class HubAccessError(RuntimeError):
    """Pushing to the Hub cannot work from here (offline, no token, no write access)."""


# ------------------------------------------------------------------------------------------ access check
def check_hub_access(repo_id: str | None, token: str | None = None) -> str:
    """Fail fast, before any training work, when a push to `repo_id` cannot succeed; return the token.

    Checks in order: a repo id is given, the Hub is not switched off (`HF_HUB_OFFLINE`), a token exists
    (argument, `HF_TOKEN`, or `hf auth login`), and the endpoint answers `whoami` with it.
    """
    from huggingface_hub import constants, get_token, whoami

    if not repo_id:
        raise HubAccessError("push_to_hub needs a repository id: pass --hub_model_id <user or org>/<name>")
    if constants.HF_HUB_OFFLINE:
        raise HubAccessError(
            f"cannot push {repo_id!r}: HF_HUB_OFFLINE is set, so the Hub is not contacted. Unset HF_HUB_OFFLINE on a "
            "machine with network access, or drop --push_to_hub and push the exported folder later with "
            "`python recipes/export_drafter.py --drafter <dir> --push_to_hub --hub_model_id ...`."
        )
    token = token or get_token()
    if not token:
        raise HubAccessError(
            f"cannot push {repo_id!r}: no Hugging Face token. Run `hf auth login`, or set HF_TOKEN to a token with "
            "write access (https://huggingface.co/settings/tokens), or pass --hub_token."
        )
    try:
        whoami(token=token)
    except Exception as err:  # network down, DNS, proxy, invalid token
        raise HubAccessError(
            f"cannot push {repo_id!r}: the Hub at {constants.ENDPOINT} did not accept the token ({type(err).__name__}: "
            f"{err}). Check the network connection (HF_ENDPOINT for a mirror) and that the token is valid, or drop "
            "--push_to_hub and push the exported folder later."
        ) from err
    return token


# ------------------------------------------------------------------------------------------ model card
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


def _training_section(drafter, training: dict[str, Any] | None) -> list[str]:
    config = drafter.config
    training = dict(training or {})
    method = training.pop("method", None)
    lines = ["## How it was trained", ""]
    imported = getattr(config, "imported_from", None)
    if imported:
        lines.append(
            f"Started from the published drafter `{imported.get('path')}` ({imported.get('format')} format)."
        )
    if method == "PPOW":
        lines.append(
            "Supervised warm start (EAGLE-3 training-time test), then PPOW: the drafter proposes G windows of K "
            "tokens at anchors chosen by ADAW, the frozen target verifies them, and each window is rewarded by the "
            "speedup it buys (cost-aware R = k / (k * gamma + 1), plus a proximity reward for near misses); "
            "group-relative advantages, a PPO-clipped surrogate and a KL penalty to the target update the drafter."
        )
    elif method == "supervised warm start" or (not method and getattr(config, "warm_started", False)):
        lines.append(
            "Supervised warm start (EAGLE-3 training-time test against the target's distribution)."
            if hasattr(drafter, "midlayer")
            else "Supervised warm start of the Medusa heads against the target's distribution."
        )
    elif method:
        lines.append(f"Training: {method}.")
    else:
        lines.append("No training settings were recorded with this drafter.")
    data = training.pop("data", None) or {}
    if training:
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | `{value}` |" for key, value in training.items()]
    if data:
        lines += ["", "Data:", ""]
        fingerprint = data.get("data_fingerprint")
        if fingerprint:
            lines.append(
                f"- data fingerprint: `{fingerprint}` (identifies the regenerated training data and its settings)"
            )
        for key, value in data.items():
            if key != "data_fingerprint":
                lines.append(f"- {key}: {_fmt(value)}")
    return lines + [""]


def _evaluation_section(eval_results: dict[str, Any] | None, report: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", "", f"- {TAU_DEFINITION}.", f"- {ALPHA_DEFINITION}."]
    lines.append(
        "- speedup = tokens/s of speculative decoding / tokens/s of plain `generate`, same process, same prompts, "
        "batch size 1, after a warm-up."
    )
    lines.append("")
    if eval_results:
        alphas = sorted(
            (int(k.rsplit("_", 1)[1]), v)
            for k, v in eval_results.items()
            if k.rsplit("_", 1)[0].endswith("alpha")
        )
        prefix = next((k[: -len("tau")] for k in eval_results if k.endswith("tau")), "eval_")
        k = len(alphas)
        lines += [
            f"Held-out teacher-forced greedy acceptance (chain drafting, K = {k}, temperature 0, on target-generated "
            "evaluation sequences):",
            "",
            "| tau | " + " | ".join(f"alpha_{j}" for j, _ in alphas) + " |",
            "|---|" + "---|" * len(alphas),
            f"| {_fmt(eval_results.get(prefix + 'tau'))} | " + " | ".join(_fmt(v) for _, v in alphas) + " |",
            "",
        ]
    if report and report.get("results"):
        lines += [
            "Speculative decoding (`recipes/evaluate_drafter.py`, chain drafting, batch size 1):",
            "",
            "| prompt set | T | K | tau | alpha_1..K | speedup | greedy output identical | hardware |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["results"]:
            alpha = " / ".join(_fmt(a, 2) for a in r.get("alpha") or [])
            match = (
                "-" if r.get("greedy_matches") is None else f"{r['greedy_matches']}/{r.get('greedy_total')}"
            )
            lines.append(
                f"| {r.get('prompt_set')} | {r.get('temperature')} | {r.get('window_size')} | {_fmt(r.get('tau'))} | "
                f"{alpha} | {_fmt(r.get('speedup'), 2)}x | {match} | {r.get('hardware', '-')} |"
            )
        lines.append("")
    if not eval_results and not (report and report.get("results")):
        lines += ["No evaluation results were attached when this card was written.", ""]
    return lines


def _usage_section(
    drafter, format: str, repo_id: str, target_id: str, k: int, layer_id_convention: str
) -> list[str]:
    is_eagle3 = hasattr(drafter, "midlayer")
    load = f'drafter = load_drafter("{repo_id}", target)  # reads the {format} layout; the embedding comes from the target'
    lines = [
        "## Usage",
        "",
        "### transformers (ppow-trl)",
        "",
        "```python",
        "from ppow_trl import generate, load_target",
        "from ppow_trl.export import load_drafter",
        "",
        f'target, tokenizer = load_target("{target_id}")',
        load,
        'messages = [{"role": "user", "content": "Hi!"}]',
        'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        'return_dict=True)["input_ids"]',
        f"out = generate(target, drafter, ids, num_draft_tokens={k}, max_new_tokens=128)  # out.sequences, out.tau",
        "```",
        "",
    ]
    if format == "ppow":
        lines += [
            "This folder is in ppow-trl's own layout. For vLLM or SGLang, export it first:",
            "",
            "```bash",
            f"python recipes/export_drafter.py --drafter {repo_id} --format {'eagle3' if is_eagle3 else 'medusa'} "
            "--output_dir exported",
            "```",
            "",
        ]
        return lines
    method = "eagle3" if is_eagle3 else "medusa"
    lines += [
        "### vLLM",
        "",
        "```bash",
        f"vllm serve {target_id} \\",
        f'    --speculative-config \'{{"method": "{method}", "model": "{repo_id}", '
        f'"num_speculative_tokens": {k}}}\'',
        "```",
        "",
    ]
    if format == "speculators":
        lines += [
            "The speculators layout also names its verifier, so `vllm serve "
            + repo_id
            + "` alone starts the target "
            "with this drafter. SGLang does not read this layout: export with `--format eagle3` for SGLang.",
            "",
        ]
    if format in ("eagle3",):
        topk = 1
        lines += [
            "### SGLang",
            "",
            "```bash",
            f"python -m sglang.launch_server --model-path {target_id} \\",
            f"    --speculative-algorithm EAGLE3 --speculative-draft-model-path {repo_id} \\",
            f"    --speculative-num-steps {k} --speculative-eagle-topk {topk} --speculative-num-draft-tokens {k + 1}",
            "```",
            "",
            "Feature layers: this checkpoint numbers `eagle_aux_hidden_state_layer_ids` in the "
            + (
                "vLLM convention (id i = the hidden state entering decoder layer i). SGLang reads the field as layer "
                "outputs and adds one, so for SGLang export with `--layer_id_convention sglang`."
                if layer_id_convention == "vllm"
                else "SGLang convention (id i = the output of decoder layer i). vLLM reads the field as layer inputs, "
                "so for vLLM export with `--layer_id_convention vllm`."
            ),
            "",
        ]
    return lines


def drafter_model_card(
    drafter,
    format: str = "ppow",
    repo_id: str | None = None,
    num_speculative_tokens: int | None = None,
    training: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    layer_id_convention: str = "vllm",
    model_name: str | None = None,
) -> str:
    """The README.md (YAML metadata + markdown) of a drafter.

    Args:
        drafter: the drafter (a LoRA-wrapped drafter is described by its base; exports merge the adapters).
        format: the layout of the folder the card describes (`ppow_trl.export.FORMATS`).
        repo_id: the Hub id (or local folder) used in the usage snippets (default: a placeholder).
        num_speculative_tokens: K in the usage snippets (default 5, Medusa: its heads).
        training: how it was trained: `method` ("PPOW", "supervised warm start", ...), `data` (a dict with
            `data_fingerprint` and counts) and any settings to list (K, G, gamma, steps, learning rate, ...).
        eval_results: held-out metrics (`eval_tau`, `eval_alpha_1..K`, as the trainers write them).
        report: the results.json of `recipes/evaluate_drafter.py` (tau, alpha_j, speedup with hardware).
    """
    check_format(format)
    model = unwrap_drafter(drafter)  # the card reads the config only: no need to merge adapters
    config = model.config
    is_eagle3 = hasattr(model, "midlayer")
    kind = "eagle3" if is_eagle3 else "medusa"
    k = int(num_speculative_tokens or (5 if is_eagle3 else config.num_heads))
    base_model = target_hub_id(config.target_name_or_path)
    name_or_path = config.target_name_or_path
    target_id = base_model or (name_or_path if name_or_path not in (None, "", "unknown") else "<target>")
    ppow_trained = (training or {}).get("method") == "PPOW"
    suffix = f"{kind}-ppow" if ppow_trained else kind
    repo_id = repo_id or f"<your-username>/{(base_model or 'target').split('/')[-1].lower()}-{suffix}"
    name = model_name or repo_id.rstrip("/").split("/")[-1]
    tags = ["speculative-decoding", kind, *(["ppow"] if ppow_trained else []), "drafter"]
    if format == "speculators":
        tags.append("speculators")
    metadata = ModelCardData(base_model=base_model, library_name=LIBRARY_NAME, tags=tags)
    arch = (
        "an EAGLE-3 draft head: one decoder layer over the target's token embedding and three fused target hidden "
        f"states (HF `output_hidden_states` indices {list(config.aux_layer_ids)}), with a {config.draft_vocab_size}-token "
        "draft vocabulary mapped to target ids by `d2t`"
        if is_eagle3
        else f"{config.num_heads} Medusa heads ({config.num_layers} residual block(s) each) on the target's last hidden "
        f"state, with a {config.draft_vocab_size}-token draft vocabulary"
    )
    record_fields = {
        "ppow": "ppow-trl's own layout (`AutoModel.from_pretrained` after `import ppow_trl`)",
        "eagle3": "the original EAGLE-3 layout (`LlamaForCausalLMEagle3`) that vLLM and SGLang load",
        "speculators": "vLLM's speculators layout (`Eagle3Speculator`)",
        "medusa": "vLLM's Medusa layout (`MedusaModel`)",
    }
    lines = [
        "---",
        metadata.to_yaml().strip(),
        "---",
        "",
        f"# {name}",
        "",
        "## What it is",
        "",
        f"A speculative-decoding **drafter** for [{target_id}]"
        + (f"(https://huggingface.co/{base_model})" if base_model else "")
        + f": {arch}. It proposes windows of draft tokens that the target verifies in one forward pass; with "
        "greedy or lossless speculative-sampling verification the output distribution is the target's. It is "
        "not a language model on its own and needs its target at inference.",
        "",
        f"Files: {record_fields[format]}; weights in safetensors. Trained with ppow-trl (PPOW on top of TRL, "
        f"[arXiv {PPOW_PAPER['id']}](https://huggingface.co/papers/{PPOW_PAPER['id']})).",
        "",
    ]
    if is_eagle3 and format in ("eagle3", "speculators"):
        ids = serving_layer_ids(config.aux_layer_ids, layer_id_convention if format == "eagle3" else "vllm")
        lines += [
            f"`eagle_aux_hidden_state_layer_ids` = {ids} ({'vLLM' if ids == list(config.aux_layer_ids) else 'SGLang'} "
            f"convention; HF `output_hidden_states` indices {list(config.aux_layer_ids)}).",
            "",
        ]
    lines += _training_section(model, training)
    lines += _evaluation_section(eval_results, report)
    lines += _usage_section(model, format, repo_id, target_id, k, layer_id_convention)
    lines += [
        "## Citation",
        "",
        "```bibtex",
        PPOW_PAPER["citation"],
        "```",
        "",
    ]
    return "\n".join(lines)


CARD_RECORD = "drafter_card.json"


def write_drafter_card(drafter, directory: str | Path, **card_kwargs) -> Path:
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
    in `eval/`) and the data split record (`split.json`, its fingerprint)."""
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


# ------------------------------------------------------------------------------------------ push
def push_to_hub(
    drafter,
    repo_id: str,
    format: str = "eagle3",
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    folder: str | Path | None = None,
    target=None,
    num_speculative_tokens: int | None = None,
    layer_id_convention: str = "vllm",
    card_kwargs: dict | None = None,
) -> str:
    """Export `drafter` in `format` (LoRA merged), write its model card and upload the folder to `repo_id`.

    The folder is `folder` when given (kept), else a temporary directory. Access is checked first
    (`check_hub_access`). Returns the URL of the commit.
    """
    from huggingface_hub import HfApi

    check_format(format)
    token = check_hub_access(repo_id, token)
    kwargs = {"repo_id": repo_id, **(card_kwargs or {})}
    with tempfile.TemporaryDirectory(prefix="ppow-push-") as tmp:
        out = Path(folder) if folder is not None else Path(tmp)
        export_drafter(
            drafter,
            out,
            format,
            target=target,
            num_speculative_tokens=num_speculative_tokens,
            layer_id_convention=layer_id_convention,
            card_kwargs=kwargs,
        )
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out),
            commit_message=commit_message or f"Upload {format} drafter (ppow-trl)",
            revision=revision,
            token=token,
        )
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("Pushed the %s drafter to %s", format, url)
    return url


__all__ = [
    "PPOW_PAPER",
    "RECORD_KEY",
    "HubAccessError",
    "check_hub_access",
    "drafter_model_card",
    "push_to_hub",
    "run_card_inputs",
    "write_drafter_card",
]
