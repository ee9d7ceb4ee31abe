"""`DataConfig`: every setting of the data pipeline (prompt source, split, regeneration, corpus, caching)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..target import cache_root

PROMPT_TRUNCATIONS = ("drop", "left", "error")
FEATURE_MODES = ("online", "offline")
CORPUS_MIXES = ("append", "corpus_only")


@dataclass
class DataConfig:
    """Settings of the data pipeline, usable from YAML (TRL-style `help` metadata on every field)."""

    dataset_name: str = field(
        default="mt_bench",
        metadata={
            "help": "Prompt source: a built-in name (mt_bench, humaneval, gsm8k), a Hub dataset id "
            "('org/name'), or a local .json/.jsonl/.parquet file with a messages/conversations/prompt column."
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
        default=None, metadata={"help": "Use at most this many user turns per conversation (None = all)."}
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
    max_new_tokens: int = field(
        default=256, metadata={"help": "Tokens the target generates per turn at most."}
    )
    regen_batch_size: int = field(default=8, metadata={"help": "Prompts per batched `generate` call."})
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
    shard_size: int = field(default=64, metadata={"help": "Conversations per cache shard."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where regenerated data is cached (default: <PPOW_TRL_CACHE>/data)."}
    )
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

    def __post_init__(self) -> None:
        if self.prompt_truncation not in PROMPT_TRUNCATIONS:
            raise ValueError(
                f"prompt_truncation must be one of {PROMPT_TRUNCATIONS}, got {self.prompt_truncation!r}"
            )
        if self.feature_mode not in FEATURE_MODES:
            raise ValueError(f"feature_mode must be one of {FEATURE_MODES}, got {self.feature_mode!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("max_new_tokens", "regen_batch_size", "shard_size", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompts", "max_turns", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
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
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size must be >= 0 or None, got {self.draft_vocab_size}")

    @property
    def cache_path(self) -> Path:
        """The data cache directory (resolved default)."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else cache_root() / "data"

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
