"""Prompts written by the target itself (Magpie, arXiv 2406.08464).

An instruction-tuned model given only its chat template up to where the user's text starts writes a
plausible user turn. Task-type system prompts and opening words ("topic seeds") steer the mix towards the
domains users evaluate on (code, math, writing, reasoning, ...). The plan of requests is a pure function
of the seed; the written turns are cached in shards keyed by a fingerprint of the target, template and
settings, so an interrupted run writes only the missing shards. `filters.filter_prompts` then drops
malformed turns, duplicates and anything overlapping the evaluation sets.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..target import eos_token_ids, pad_token_id
from .cache import (
    check_manifest,
    content_shard_path,
    fill_shards,
    fingerprint_of,
    relative_path,
    sha,
    write_text_atomic,
)
from .config import DataConfig
from .filters import ContaminationIndex, FilterSettings, filter_prompts
from .regeneration import (
    DEFAULT_SYSTEM,
    pre_query_prefix,
    prompt_generation_config,
    target_identity,
    write_user_turns,
)
from .sources import PromptExample

logger = logging.getLogger(__name__)

PROMPT_CACHE_VERSION = 2


@dataclass(frozen=True)
class TaskType:
    """How to steer one kind of user request: a system prompt (None = no system block at all,
    DEFAULT_SYSTEM = the template's default) and openings a steered turn may start with."""

    system: str | None
    openings: tuple[str, ...] = ()


TASK_TYPES: dict[str, TaskType] = {
    "default": TaskType(DEFAULT_SYSTEM),
    "no_system": TaskType(None),
    "code": TaskType(
        "You are a programming assistant. Users ask you to write, complete, explain, review or debug code, "
        "mostly Python.",
        (
            "Write a Python function that",
            "Complete the following Python function:\n```python\ndef ",
            "How do I",
            "Can you explain what this code does?",
            "Fix the bug in this code:",
            "Implement a class",
        ),
    ),
    "math": TaskType(
        "You are a math tutor. Users ask you to solve arithmetic, algebra, geometry and probability problems "
        "and word problems step by step.",
        (
            "A store sells",
            "Solve for x:",
            "What is the probability that",
            "If a train",
            "Calculate",
            "Find the",
        ),
    ),
    "writing": TaskType(
        "You are a writing assistant. Users ask you to write stories, poems, emails, essays, blog posts and "
        "to edit or rewrite their text.",
        (
            "Write a short story about",
            "Write an email to",
            "Compose a poem about",
            "Draft a blog post about",
            "Rewrite",
        ),
    ),
    "question_answering": TaskType(
        "You are a knowledgeable assistant. Users ask factual questions about science, history, geography, "
        "technology and everyday life.",
        ("What is", "Explain how", "Why do", "Who was", "What are the main differences between"),
    ),
    "reasoning": TaskType(
        "You are a careful reasoner. Users give you logic puzzles, riddles and problems that need several "
        "steps of reasoning.",
        (
            "If all",
            "Which of the following",
            "Imagine you are",
            "A man has",
            "What comes next in the sequence",
        ),
    ),
    "chat": TaskType(
        "You are a friendly conversational assistant. Users chat about their day, ask for advice, opinions "
        "and recommendations, or ask you to role-play.",
        ("I feel", "What do you think about", "Can you recommend", "Pretend you are", "I need advice on"),
    ),
    "extraction": TaskType(
        "You are a data assistant. Users give you a text and ask you to extract, summarise, classify or "
        "reformat information from it.",
        ("Summarize the following text:", "Extract the", "Classify the following", "Convert this"),
    ),
}


@dataclass(frozen=True)
class PromptRequest:
    index: int
    task: str
    opening: str | None


def parse_task_mix(entries: list[str]) -> dict[str, float]:
    """'code:2' / 'math' entries -> normalised weights over TASK_TYPES."""
    weights: dict[str, float] = {}
    for entry in entries:
        name, _, weight = entry.partition(":")
        if name not in TASK_TYPES:
            raise ValueError(f"Unknown prompt task type {name!r}; known: {', '.join(TASK_TYPES)}")
        weights[name] = float(weight) if weight else 1.0
        if weights[name] < 0:
            raise ValueError(f"task weight must be >= 0, got {entry!r}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("prompt_task_mix needs at least one task type with a positive weight")
    return {name: weight / total for name, weight in weights.items()}


def plan_requests(config: DataConfig) -> list[PromptRequest]:
    """Which task type and opening each of the `self_generated_prompts` requests uses (seeded)."""
    weights = parse_task_mix(config.prompt_task_mix)
    names, probabilities = list(weights), list(weights.values())
    requests = []
    for index in range(config.self_generated_prompts):
        rng = random.Random(f"{config.seed}:{index}")
        task = rng.choices(names, probabilities)[0]
        openings = TASK_TYPES[task].openings
        seeded = openings and rng.random() < config.prompt_seed_fraction
        requests.append(PromptRequest(index, task, rng.choice(openings) if seeded else None))
    return requests


def prompt_inputs(
    target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> dict[str, Any]:
    """Everything that determines how prompts are written (hashed into the cache fingerprint). Not their
    count: request i and shard i do not depend on it, so raising `self_generated_prompts` writes only the
    new shards, and prompt ids (which name the cache folder) stay the same."""
    return {
        "version": PROMPT_CACHE_VERSION,
        "target": target_identity(target),
        "chat_template_sha": sha(tokenizer.chat_template or ""),
        "vocab_sha": sha(sorted(tokenizer.get_vocab().items())),
        "tasks": {name: [t.system, list(t.openings)] for name, t in TASK_TYPES.items()},
        "mix": config.prompt_task_mix,
        "seed_fraction": config.prompt_seed_fraction,
        "temperature": config.prompt_temperature,
        "top_p": config.prompt_top_p,
        "max_new_tokens": config.prompt_max_new_tokens,
        "batch_size": config.prompt_batch_size,
        "stop_fraction": config.prompt_stop_fraction,
        "shard_size": config.prompt_shard_size,
        "seed": config.seed,
    }


def write_prompts(
    target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DataConfig, progress: bool = True
) -> tuple[list[dict[str, Any]], Path]:
    """Have the target write `self_generated_prompts` user turns (cached, resumable); unfiltered."""
    inputs = prompt_inputs(target, tokenizer, config)
    fingerprint = fingerprint_of(inputs)
    directory = config.cache_path / "prompts" / fingerprint
    check_manifest(directory, fingerprint, inputs)
    requests = plan_requests(config)
    chunks = [
        requests[i : i + config.prompt_shard_size] for i in range(0, len(requests), config.prompt_shard_size)
    ]
    paths = [
        content_shard_path(directory, i, [[r.index, r.task, r.opening] for r in chunk], "jsonl")
        for i, chunk in enumerate(chunks)
    ]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    if missing:
        eos_ids, pad_id = eos_token_ids(target, tokenizer), pad_token_id(tokenizer)
        generation = prompt_generation_config(config, eos_ids, pad_id)
        prefixes = {name: pre_query_prefix(tokenizer, task.system) for name, task in TASK_TYPES.items()}
        total = sum(len(chunks[i]) for i in missing)
        with tqdm(total=total, desc="writing prompts", unit="prompt", disable=not progress) as bar:

            def write(i: int) -> None:
                rows = _write_shard(
                    target, tokenizer, chunks[i], prefixes, generation, eos_ids, config, i, bar
                )
                write_text_atomic(paths[i], "".join(json.dumps(row) + "\n" for row in rows))

            # shared with other workers started on the same folder
            fill_shards(paths, missing, write, lambda i: bar.update(len(chunks[i])))
    rows = [json.loads(line) for path in paths for line in path.read_text(encoding="utf-8").splitlines()]
    return rows, directory


def _write_shard(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[PromptRequest],
    prefixes: dict[str, str],
    generation: GenerationConfig,
    eos_ids: list[int],
    config: DataConfig,
    shard: int,
    bar: tqdm,
) -> list[dict[str, Any]]:
    texts = [prefixes[r.task] + (r.opening or "") for r in requests]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    device = next(target.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed * 1_000_003 + shard)
        turns = write_user_turns(
            target, tokenizer, ids, generation, eos_ids, config.prompt_batch_size, config.prompt_stop_fraction,
            bar.update,
        )  # fmt: skip
    rows = []
    for request, (body, ended) in zip(requests, turns):
        rows.append(
            {
                "index": request.index,
                "task": request.task,
                "opening": request.opening,
                "text": ((request.opening or "") + body).strip(),
                "ended": ended,
            }
        )
    return rows


def self_generated_prompts(
    target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DataConfig, progress: bool = True
) -> tuple[list[PromptExample], dict[str, Any]]:
    """Written, then filtered prompts as examples (id 'self/<fingerprint>/<index>'), and the filter report.

    Raises when the filters keep fewer than `min_kept_fraction` of the written prompts: training on the
    handful left would hide a broken template or settings.
    """
    rows, directory = write_prompts(target, tokenizer, config, progress)
    index = ContaminationIndex.cached(config.decontamination_ngram) if config.decontaminate else None
    kept, report = filter_prompts(rows, FilterSettings.from_config(config), index)
    # relative to the cache root: a dataset directory's reports hold no machine's paths
    report["directory"] = relative_path(directory, config.cache_path)
    report["kept_indices"] = [row["index"] for row in kept]
    write_text_atomic(directory / "filter_report.json", json.dumps(report, indent=1))
    if len(kept) < config.min_kept_fraction * len(rows) or not kept:
        raise ValueError(
            f"The prompt filters kept {len(kept)} of {len(rows)} self-generated prompts (less than "
            f"min_kept_fraction={config.min_kept_fraction}); drops by reason: {report['dropped']}. Check the "
            "target's chat template and the prompt_* settings (e.g. prompt_max_new_tokens, prompt_temperature)."
        )
    examples = [
        PromptExample(
            f"self/{directory.name[:8]}/{row['index']}", [row["text"]], f"self_generated:{row['task']}"
        )
        for row in kept
    ]
    return examples, report
