"""Evaluate a drafter on prompt sets: tau, per-position acceptance, speedup over plain `generate`, lossless check.

Definitions (docs/metrics.md; tau and alpha_j as `ppow_trl.metrics` words them); speedup = tokens/s
of speculative decoding / tokens/s of plain `generate`, same process, same prompts, batch size 1, after a
warm-up; lossless = greedy speculative output equals plain greedy output token for token (check it in fp32).
Drafting is `generate`'s: for greedy rows by default a dynamic draft tree with a prompt-lookup branch, for sampling a chain; `draft_tree_width` and `prompt_lookup_tokens` override it.

Every generation runs twice, alternating per prompt: plain `target.generate` and speculative decoding (and the
optional prompt-lookup baseline). Multi-turn prompts (MT-Bench) are answered turn by turn; a later turn's
prompt contains the target's own plain answer to the earlier turns. The report is written by
`ppow_trl.evaluation.report`: `results.json`, `results.md`, `acceptance_per_position.png`,
`accepted_length_histogram.png` under `output_dir`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppow_trl.data.features import TargetFeatureProvider
from ppow_trl.data.sources import load_prompts
from ppow_trl.decoding import generate
from ppow_trl.decoding.cost import MachineLoad, hardware_info, measure_costs
from ppow_trl.decoding.speculative import feature_layers
from ppow_trl.evaluation.config import EvaluationConfig
from ppow_trl.evaluation.report import DEFINITIONS, hardware_line, summarise, write_report
from ppow_trl.io import load_drafter, locate_drafter, recorded_target
from ppow_trl.io.source import UNKNOWN_TARGETS
from ppow_trl.packed import packed_linears, use_packed_linears
from ppow_trl.target import EMBEDDED_ALIAS, eos_token_ids, load_target
from ppow_trl.training.acceptance import dataset_acceptances

SPLIT_PREFIX = "split:"
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- environment
# --------------------------------------------------------------------------------------------- environment
def versions() -> dict[str, str | None]:
    out = {}
    for name in ("torch", "transformers", "trl", "ppow-trl"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_prompt_set(spec: str, max_prompts: int | None, max_turns: int | None) -> tuple[str, list]:
    """(display name, examples) for a prompt-set spec; `split:<split.json>` selects a training run's eval ids."""
    if spec.startswith(SPLIT_PREFIX):
        path = Path(spec[len(SPLIT_PREFIX) :]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"split file not found: {path}")
        split = json.loads(path.read_text())
        settings = split.get("settings", {})
        source = settings.get("source") or settings.get("dataset_name")
        if not source or "eval_ids" not in split:
            raise ValueError(
                f"{path} is not a split.json written by the data pipeline (needs settings.source, eval_ids)"
            )
        examples = load_prompts(
            source,
            settings.get("dataset_config"),
            settings.get("dataset_split", "train"),
            settings.get("max_prompts"),
            max_turns,
        )
        eval_ids = set(split["eval_ids"])
        examples = [e for e in examples if e.id in eval_ids]
        if not examples:
            raise ValueError(
                f"none of the {len(eval_ids)} eval ids of {path} were found in source {source!r}"
            )
        examples = examples[:max_prompts] if max_prompts else examples
        return f"split:{Path(str(source)).name}", examples
    examples = load_prompts(spec, max_prompts=max_prompts, max_turns=max_turns)
    name = Path(spec).stem if Path(spec).suffix else spec
    return name, examples


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(messages[-1]["content"])["input_ids"]


# ------------------------------------------------------------------------------------------------- runner
class _ForwardCounter:
    """Counts forwards of the target (a pre-hook), to get verification forwards of transformers' methods."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1

    def remove(self) -> None:
        self.handle.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Evaluator:
    def __init__(self, config: EvaluationConfig, target, tokenizer, drafter):
        self.config = config
        self.target, self.tokenizer, self.drafter = target, tokenizer, drafter
        self.device = next(target.parameters()).device
        self.eos = eos_token_ids(target, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.pad = int(pad)
        self.context = getattr(target.config, "max_position_embeddings", None)
        self.costs = None  # the cost table "auto" priced the last speculative generation with
        heads = drafter.max_draft_tokens
        for name in ("teacher_forced_window", "teacher_forced_tree_window"):
            if heads is not None and getattr(config, name) > heads:
                raise ValueError(
                    f"{name}={getattr(config, name)} exceeds the {type(drafter).__name__}'s {heads} heads"
                )

    def kwargs(self, temperature: float, max_new_tokens: int) -> dict[str, Any]:
        kw = {"max_new_tokens": max_new_tokens, "eos_token_id": self.eos, "pad_token_id": self.pad}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kw.update(do_sample=False)
        return kw

    def _target_generate(
        self, ids: torch.Tensor, temperature: float, max_new_tokens: int, seed: int, **extra: Any
    ) -> dict[str, Any]:
        """`target.generate` timed, with its target forwards counted (the baselines)."""
        torch.manual_seed(seed)
        counter = _ForwardCounter(self.target)
        _sync(self.device)
        start = time.perf_counter()
        try:
            # The same linear-layer kernels speculative decoding runs with (`ppow_trl.packed`, CPU fp32), so the
            # speedup measures speculation, not a faster matmul path.
            with packed_linears(self.target, use_packed_linears(self.target)):
                out = self.target.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    **extra,
                    **self.kwargs(temperature, max_new_tokens),
                )
            _sync(self.device)
        finally:
            counter.remove()
        seconds = time.perf_counter() - start
        return {"tokens": out[0, ids.shape[1] :].tolist(), "seconds": seconds, "forwards": counter.count}

    def plain(self, ids: torch.Tensor, temperature: float, max_new_tokens: int, seed: int) -> dict[str, Any]:
        return self._target_generate(ids, temperature, max_new_tokens, seed)

    def prompt_lookup(
        self, ids: torch.Tensor, temperature: float, max_new_tokens: int, seed: int
    ) -> dict[str, dict[str, Any]]:
        """transformers' prompt lookup at every K of `prompt_lookup_num_tokens`, keyed by K."""
        return {
            str(k): self._target_generate(ids, temperature, max_new_tokens, seed, prompt_lookup_num_tokens=k)
            for k in self.config.prompt_lookup_num_tokens
        }

    def speculative(
        self, ids: torch.Tensor, temperature: float, max_new_tokens: int, seed: int
    ) -> dict[str, Any]:
        torch.manual_seed(seed)
        _sync(self.device)
        start = time.perf_counter()
        out = generate(
            self.target,
            self.drafter,
            ids,
            attention_mask=torch.ones_like(ids),
            num_draft_tokens=self.config.num_draft_tokens,
            method=self.config.method,
            **self.config.round_options(),
            **self.kwargs(temperature, max_new_tokens),
        )
        _sync(self.device)
        seconds = time.perf_counter() - start
        new = out.sequences[0, ids.shape[1] : ids.shape[1] + int(out.new_tokens[0])].tolist()
        timings = out.timings or {}
        self.costs = out.costs or self.costs
        return {
            "tokens": new,
            "seconds": seconds,
            "verify_forwards": out.num_verify_forwards,
            "accepted": out.accepted[:, 0].tolist(),
            "window_sizes": out.window_sizes.tolist(),
            "drafter_seconds": timings.get(
                "drafter", sum(v for k, v in timings.items() if k.startswith("drafter"))
            ),
        }

    def encode(self, messages: list[dict[str, str]], example_id: str, max_new_tokens: int) -> torch.Tensor:
        ids = _prompt_ids(self.tokenizer, messages)
        if self.context and len(ids) + max_new_tokens > self.context:
            raise ValueError(
                f"prompt {example_id!r} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"target's context of {self.context} tokens"
            )
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def decode_answer(self, tokens: list[int]) -> str:
        while tokens and tokens[-1] in self.eos:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def warmup(self, examples: list) -> None:
        n = self.config.warmup_tokens
        if n <= 0 or not examples:
            return
        ids = self.encode([{"role": "user", "content": examples[0].turns[0]}], examples[0].id, n)
        for temperature in sorted(set(self.config.temperatures)):
            self.plain(ids, temperature, n, self.config.seed)
            self.speculative(ids, temperature, n, self.config.seed)
            if "prompt_lookup" in self.config.baselines:
                self.prompt_lookup(ids, temperature, n, self.config.seed)

    def run_set(self, name: str, examples: list, temperature: float) -> dict[str, Any]:
        from tqdm.auto import tqdm

        config = self.config
        records, answered = [], []
        load = MachineLoad()  # what other processes used of the CPU while this set was timed
        bar = tqdm(examples, desc=f"{name} T={temperature:g}", disable=not config.progress, unit="prompt")
        for index, example in enumerate(bar):
            messages: list[dict[str, str]] = []
            for turn_index, turn in enumerate(example.turns):
                messages.append({"role": "user", "content": turn})
                ids = self.encode(messages, example.id, config.max_new_tokens)
                seed = config.seed + 1000 * index + turn_index
                plain = self.plain(ids, temperature, config.max_new_tokens, seed)
                spec = self.speculative(ids, temperature, config.max_new_tokens, seed)
                lookup = None
                if "prompt_lookup" in config.baselines:
                    lookup = self.prompt_lookup(ids, temperature, config.max_new_tokens, seed)
                records.append(
                    {
                        "id": example.id,
                        "turn": turn_index + 1,
                        "prompt_tokens": ids.shape[1],
                        "plain": plain,
                        "spec": spec,
                        "lookup": lookup,
                    }
                )
                messages.append({"role": "assistant", "content": self.decode_answer(plain["tokens"])})
                answered.append((ids[0].tolist(), plain["tokens"]))
        machine_load = load.result()
        chain, tree = self.teacher_forced(answered) if temperature == 0 else (None, None)
        result = summarise(
            self.config, type(self.drafter).__name__, name, temperature, examples, records, chain, tree
        )
        result["machine_load"] = machine_load
        result["cost_table"] = self.costs.summary() if self.costs is not None else None
        if machine_load["loaded"]:
            logger.warning(
                "%s T=%g was timed on a loaded machine (load average %.2f, other processes used %.2f of %d "
                "cores, %d torch threads here): speedups are unreliable",
                name, temperature, machine_load["load_average"], machine_load["others_busy_cores"],
                machine_load["cores"], machine_load["threads"],
            )  # fmt: skip
        return result

    def teacher_forced(
        self, answered: list[tuple[list[int], list[int]]]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """k of the drafter's greedy chain window (K = `teacher_forced_window`) and of its tree (top
        `teacher_forced_tree_width` at each of `teacher_forced_tree_window` depths) at every position of the
        target's own greedy answers, the prompts as context (one target forward per answer); None where off."""
        config = self.config
        rows = [{"input_ids": p + a, "loss_mask": [0] * len(p) + [1] * len(a)} for p, a in answered if a]
        shapes = {"chain": (1, config.teacher_forced_window)}
        shapes["tree"] = (config.teacher_forced_tree_width, config.teacher_forced_tree_window)
        shapes = {name: shape for name, shape in shapes.items() if shape[1]}
        if not shapes or not rows:
            return None, None
        provider = TargetFeatureProvider.online(self.target, feature_layers(self.drafter), with_logits=False)
        k, _ = dataset_acceptances(
            self.drafter, provider, rows, list(shapes.values()), self.pad, batch_size=1, device=self.device
        )
        columns = dict(zip(shapes, k.unbind(-1)))
        return columns.get("chain"), columns.get("tree")


def _load_models(
    config: EvaluationConfig,
    dtype: torch.dtype,
    target: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    drafter: PreTrainedModel | None,
) -> tuple[str, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedModel]:
    """(target name, target, tokenizer, drafter): the drafter through `load_drafter` (any layout), the target
    given, else `config.target`, else the one the drafter records, else the embedded one."""
    source = locate_drafter(config.drafter) if drafter is None else None
    target_name = config.target
    if not target_name:
        recorded = recorded_target(source, "--target") if source else drafter.config.target_name_or_path
        target_name = recorded if recorded not in UNKNOWN_TARGETS else EMBEDDED_ALIAS
    if target is None or tokenizer is None:
        target, tokenizer = load_target(target_name, dtype=dtype, device=config.device)
    if drafter is None:
        drafter = load_drafter(source, target).requires_grad_(False)
    drafter.check_target(target)
    drafter.to(device=next(target.parameters()).device, dtype=next(target.parameters()).dtype)
    return target_name, target, tokenizer, drafter


def evaluate(
    config: EvaluationConfig,
    target: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    drafter: PreTrainedModel | None = None,
) -> dict[str, Any]:
    """Run the evaluation described by `config` and write its report; returns the results.json content.

    `target`/`tokenizer`/`drafter` may be passed already loaded (then `config.target`/`config.drafter` are
    only recorded).
    """
    from transformers import set_seed

    set_seed(config.seed)
    dtype = getattr(torch, config.dtype)
    target_name, target, tokenizer, drafter = _load_models(config, dtype, target, tokenizer, drafter)
    evaluator = _Evaluator(config, target, tokenizer, drafter)

    sets = [load_prompt_set(spec, config.max_prompts, config.max_turns) for spec in config.prompt_sets]
    if config.remeasure_costs and config.num_draft_tokens == "auto":
        # the same table decoding asks for: 16 sizes, the packed path where it applies
        measure_costs(target, drafter, max_tokens=16, packed=use_packed_linears(target), remeasure=True)
    evaluator.warmup(sets[0][1])
    results = [evaluator.run_set(name, examples, t) for t in config.temperatures for name, examples in sets]
    if evaluator.costs is not None:
        logger.info("Windows were priced with the %s", evaluator.costs.describe())

    hardware = hardware_info()
    for result in results:
        result["hardware"] = hardware_line(hardware)
    report = {
        "drafter": config.drafter,
        "target": target_name,
        "settings": asdict(config),
        "hardware": hardware,
        "versions": versions(),
        "definitions": dict(DEFINITIONS),
        "cost_table": evaluator.costs.summary() if evaluator.costs is not None else None,
        "machine_load": {
            "loaded": any(r["machine_load"]["loaded"] for r in results),
            "max_load_average": max(r["machine_load"]["load_average"] for r in results),
            "max_others_busy_cores": max(r["machine_load"]["others_busy_cores"] for r in results),
        },
        "results": results,
    }
    write_report(report, config.output_dir, plots=config.plots)
    return report
