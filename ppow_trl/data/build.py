"""One call from a `DataConfig` to train/eval datasets, a draft vocabulary and a sanity report."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..target import vocab_size_of
from .cache import fill_shards, relative_path, write_text_atomic
from .card import check_dataset_target
from .config import DATASET_CARD, DataConfig
from .corpus import build_corpus, open_corpus
from .draft_vocab import DraftVocab, build_draft_vocab, count_assistant_tokens
from .features import TargetFeatureProvider, collate_sequences
from .filters import ContaminationIndex, FilterSettings, filter_prompts
from .regeneration import Regeneration, regenerate, target_identity
from .self_generated import self_generated_prompts
from .sources import (
    EVALUATION_SOURCES,
    SELF_GENERATED,
    PromptExample,
    load_prompts,
    split_prompts,
    write_split,
)

logger = logging.getLogger(__name__)


@dataclass
class RegeneratedData:
    """Train/eval sequences (columns input_ids, loss_mask, prompt_id, num_turns, index, split; corpus rows
    in train have prompt_id 'corpus/<n>' and num_turns 0), the draft vocabulary built from the train split,
    the sanity report, and where all of it is stored."""

    train: Dataset
    eval: Dataset
    draft_vocab: DraftVocab
    report: dict[str, Any]
    directory: Path
    regeneration: Regeneration


@torch.no_grad()
def sanity_check(
    target: PreTrainedModel, dataset: Dataset, batch_size: int = 8, progress: bool = True
) -> dict[str, Any]:
    """Teacher-forced target pass: how often argmax at position t-1 equals the assistant token at t.

    Only the hidden states at supervised positions go through the LM head (no (B, T, V) logits).
    Greedy regenerated data should match at >= 99% of positions (ties and kernel noise aside).
    """
    device = next(target.parameters()).device
    lm_head = target.get_output_embeddings()
    matches = checked = 0
    for start in tqdm(range(0, len(dataset), batch_size), desc="sanity check", disable=not progress):
        batch = collate_sequences(_rows(dataset, start, batch_size), 0)
        hidden = target.base_model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).last_hidden_state
        positions = batch["loss_mask"][:, 1:].bool().to(device)
        predicted = lm_head(hidden[:, :-1][positions]).argmax(-1)
        matches += int((predicted == batch["input_ids"][:, 1:].to(device)[positions]).sum())
        checked += int(positions.sum())
    return {
        "argmax_match_fraction": matches / checked if checked else None,
        "checked_positions": checked,
    }


def _rows(dataset: Dataset, start: int, size: int) -> list[dict[str, Any]]:
    return [dataset[i] for i in range(start, min(start + size, len(dataset)))]


def collect_prompts(
    config: DataConfig, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, progress: bool = True
) -> tuple[list[PromptExample], dict[str, Any] | None]:
    """The prompt source's examples, filtered (except evaluation sets), and the filter report (or None)."""
    if config.dataset_name == SELF_GENERATED:
        return self_generated_prompts(target, tokenizer, config, progress)
    examples = load_prompts(
        config.dataset_name, config.dataset_config, config.dataset_split, config.max_prompts, config.max_turns
    )
    wanted = config.filter_prompts if config.filter_prompts is not None else config.dataset_name == "sharegpt"
    if not wanted or config.dataset_name in EVALUATION_SOURCES:
        return examples, None
    index = ContaminationIndex.cached(config.decontamination_ngram) if config.decontaminate else None
    rows = [{"text": " ".join(e.turns), "example": e} for e in examples]
    kept, report = filter_prompts(rows, FilterSettings.from_config(config), index)
    if not kept:
        raise ValueError(
            f"Prompt source {config.dataset_name!r}: the filters left no usable prompt (drops by reason: "
            f"{report['dropped']}); set filter_prompts=False to use it unfiltered."
        )
    return [row["example"] for row in kept], report


def with_answers_per_prompt(examples: list[PromptExample], count: int) -> list[PromptExample]:
    """Each example `count` times (ids '<id>#<j>') so the target writes `count` sampled answers."""
    if count == 1:
        return examples
    return [PromptExample(f"{e.id}#{j}", e.turns, e.source) for e in examples for j in range(count)]


def split_by_side(dataset: Dataset, eval_ids: set[str]) -> tuple[Dataset, Dataset, Dataset]:
    """The regenerated rows with a `split` column, and the train and eval selections."""
    sides = ["eval" if pid in eval_ids else "train" for pid in dataset["prompt_id"]]
    dataset = dataset.add_column("split", sides)
    train = dataset.select([i for i, side in enumerate(sides) if side == "train"])
    return dataset, train, dataset.select([i for i, side in enumerate(sides) if side == "eval"])


def later_turn_tokens(loss_masks: list[list[int]]) -> int:
    """Supervised tokens after each conversation's first answer (answers to second and later turns)."""
    total = 0
    for mask in loss_masks:
        row = np.asarray(mask, dtype=np.int8)
        starts = np.flatnonzero(np.diff(row, prepend=0) == 1)  # where each answer begins
        total += int(row[starts[1] :].sum()) if len(starts) > 1 else 0
    return total


def load_or_build_draft_vocab(path: Path, train: Dataset, size: int, vocab_size: int) -> DraftVocab:
    if path.is_file():
        return DraftVocab.load(path)
    counts = count_assistant_tokens(train["input_ids"], train["loss_mask"], vocab_size)
    draft_vocab = build_draft_vocab(counts, size, vocab_size)
    draft_vocab.save(path)
    return draft_vocab


def eval_coverage(eval_: Dataset, draft_vocab: DraftVocab, vocab_size: int) -> float | None:
    """Share of the eval split's supervised tokens inside the draft vocabulary."""
    counts = count_assistant_tokens(eval_["input_ids"], eval_["loss_mask"], vocab_size)
    total = int(counts.sum())
    return float(counts[draft_vocab.t2d].sum()) / total if total else None


def cached_sanity_check(
    config: DataConfig, target: PreTrainedModel, regen: Regeneration, progress: bool
) -> dict[str, Any]:
    """The sanity check over a seeded sample of `sanity_check_sequences` sequences, cached per sample."""
    if not config.sanity_check:
        return {"argmax_match_fraction": None, "checked_positions": 0}
    count = min(config.sanity_check_sequences, len(regen.dataset))
    path = regen.directory / f"sanity-{count}.json"

    def check(_: int) -> None:
        sample = random.Random(0).sample(range(len(regen.dataset)), count)
        sanity = sanity_check(
            target, regen.dataset.select(sorted(sample)), config.feature_batch_size, progress
        )
        write_text_atomic(path, json.dumps({**sanity, "sampled_sequences": count}))

    fill_shards([path], [] if path.is_file() else [0], check)  # one worker checks, the others wait for it
    return json.loads(path.read_text())


def _split_settings(config: DataConfig, regen: Regeneration, corpus) -> dict[str, Any]:
    """What `split.json` records about how the split was made."""
    return {
        "source": config.dataset_name,
        "dataset_config": config.dataset_config,
        "dataset_split": config.dataset_split,
        "max_turns": config.max_turns,
        "eval_fraction": config.eval_fraction,
        "split_seed": config.split_seed,
        "max_prompts": config.max_prompts,
        "num_answers_per_prompt": config.num_answers_per_prompt,
        "data_fingerprint": regen.fingerprint,
        "corpus_fingerprint": None if corpus is None else corpus.fingerprint,
    }


def _log_report(report: dict[str, Any]) -> None:
    logger.info(
        "Data: %d regenerated sequences, %d tokens, %d assistant tokens; %d train sequences (%d positions, "
        "corpus %s) / %d eval; argmax==next on %s of %d sampled assistant positions; draft vocab %d covers "
        "%.4f; dropped %d prompts (+%d turns), truncated %d",
        report["num_sequences"],
        report["tokens"],
        report["assistant_tokens"],
        report["num_train"],
        report["train_positions"],
        report["corpus"],
        report["num_eval"],
        report["argmax_match_fraction"],
        report["checked_positions"],
        report["draft_vocab_size"],
        report["draft_vocab_coverage"],
        report["dropped_prompts"],
        report["dropped_turns"],
        report["truncated_prompts"],
    )


def build_training_data(
    config: DataConfig, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, progress: bool = True
) -> RegeneratedData:
    """Prompts (filtered) -> split -> regenerated sequences (cached) [+ corpus] -> draft vocabulary + report.

    `config.dataset_name` may be a dataset directory written by `recipes/regenerate.py`: its stored data
    settings are used (`DataConfig.for_dataset_dir`), so nothing is regenerated. With `config.corpus_name`
    the train split also (or, with corpus_mix='corpus_only', only) holds corpus sequences; the eval split is
    regenerated sequences only. The draft vocabulary counts the train split's supervised tokens (the report's
    `eval_draft_vocab_coverage` shows how well it covers held-out answers). Writes `split.json`,
    `report.json` and `draft_vocab-<N>.safetensors` in a folder per split setting inside the regenerated
    data's cache folder.
    """
    if (Path(config.dataset_name).expanduser() / DATASET_CARD).is_file():
        check_dataset_target(Path(config.dataset_name).expanduser(), target)
    config = config.for_dataset_dir()
    corpus_source = (
        open_corpus(config.corpus_name, config.corpus_config, config.corpus_split)
        if config.corpus_name
        else None
    )
    examples, prompt_report = collect_prompts(config, target, tokenizer, progress)
    train_examples, eval_examples = split_prompts(examples, config.eval_fraction, config.split_seed)
    if config.corpus_mix == "corpus_only":  # the target answers only the eval prompts
        train_examples = []
    answered = with_answers_per_prompt(train_examples, config.num_answers_per_prompt) + eval_examples
    regen = regenerate(target, tokenizer, answered, config, progress=progress)
    dataset, train, eval_ = split_by_side(regen.dataset, {e.id for e in eval_examples})
    build_dir = regen.directory / f"split-{config.eval_fraction}-seed{config.split_seed}"
    corpus = None
    if corpus_source is not None:
        corpus = build_corpus(corpus_source, tokenizer, config, len(regen.dataset), progress)
        train = concatenate_datasets([train, corpus.dataset.cast(train.features)])
        build_dir = build_dir.with_name(f"{build_dir.name}-corpus-{corpus.fingerprint}")
    if len(train) == 0:
        raise ValueError("no training sequences left (every train prompt was dropped by the length policy)")

    build_dir.mkdir(parents=True, exist_ok=True)
    write_split(
        build_dir / "split.json",
        train_examples,
        eval_examples,
        _split_settings(config, regen, corpus),
        dropped_ids=regen.stats["dropped_ids"],
    )
    vocab_size = vocab_size_of(target)
    size = config.draft_vocab_size or vocab_size
    draft_vocab = load_or_build_draft_vocab(
        build_dir / f"draft_vocab-{size}.safetensors", train, size, vocab_size
    )
    sanity = cached_sanity_check(config, target, regen, progress)
    report = {
        "data_fingerprint": regen.fingerprint,
        # relative to the cache root, so a dataset directory's card holds no machine's paths
        "data_dir": relative_path(regen.directory, config.cache_path),
        "split_file": relative_path(build_dir / "split.json", config.cache_path),
        "source": config.dataset_name,
        "num_prompts": len(examples),
        "prompt_filters": prompt_report,
        "task_mix": dict(sorted(Counter(e.source for e in examples).items())),
        "num_sequences": len(dataset),
        "num_train": len(train),
        "num_eval": len(eval_),
        "tokens": sum(len(ids) for ids in dataset["input_ids"]),
        "assistant_tokens": regen.stats["generated_tokens"],
        "later_turn_answer_tokens": later_turn_tokens(dataset["loss_mask"]),
        "train_positions": sum(sum(m) for m in train["loss_mask"]),
        "corpus": None if corpus is None else {**corpus.stats, "dir": str(corpus.directory)},
        **_regeneration_counts(regen.stats),
        "argmax_match_fraction": sanity["argmax_match_fraction"],
        "checked_positions": sanity["checked_positions"],
        "draft_vocab_size": draft_vocab.draft_vocab_size,
        "draft_vocab_coverage": draft_vocab.coverage,
        "eval_draft_vocab_coverage": eval_coverage(eval_, draft_vocab, vocab_size),
        "target": target_identity(target),
        "config": config.to_card(),  # no cache location: reading a shipped dataset leaves its files unchanged
    }
    write_text_atomic(build_dir / "report.json", json.dumps(report, indent=1))
    _log_report(report)
    return RegeneratedData(train, eval_, draft_vocab, report, build_dir, regen)


def _regeneration_counts(stats: dict) -> dict[str, Any]:
    """The length policy's drops and the wall time per answered first and later turn (writing the user turn
    included; shards written before these timings were kept add nothing)."""
    seconds = {
        turn: round(stats.get(f"{turn}_seconds", 0) / stats[f"{turn}_answers"], 3)
        if stats.get(f"{turn}_answers")
        else None
        for turn in ("first_turn", "later_turn")
    }
    counts = {name: stats[name] for name in ("dropped_prompts", "dropped_turns", "truncated_prompts")}
    return {**counts, "seconds_per_answer": seconds}


def make_feature_provider(
    config: DataConfig,
    data: RegeneratedData,
    target: PreTrainedModel | None,
    aux_layer_ids: list[int] | None = None,
    with_logits: bool = True,
    logit_rows: torch.Tensor | None = None,
    progress: bool = True,
) -> TargetFeatureProvider:
    """The feature provider `config.feature_mode` asks for (offline: computes the cache if needed)."""
    if config.feature_mode == "online":
        if target is None:
            raise ValueError("online features need the target")
        return TargetFeatureProvider.online(target, aux_layer_ids, with_logits, logit_rows)
    return TargetFeatureProvider.offline(
        data.regeneration.dataset,
        data.regeneration.directory,
        target,
        aux_layer_ids,
        batch_size=config.feature_batch_size,
        shard_size=config.shard_size,
        with_logits=with_logits,
        logit_rows=logit_rows,
        progress=progress,
    )
