"""`DataConfig`: every setting of the data pipeline (prompt source, split, regeneration, caching)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..target import cache_root

PROMPT_TRUNCATIONS = ("drop", "left", "error")
FEATURE_MODES = ("online", "offline")


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
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (only with do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (only with do_sample)."})
    seed: int = field(
        default=0, metadata={"help": "Seed for sampled regeneration (per shard, so resumable)."}
    )
    shard_size: int = field(default=64, metadata={"help": "Conversations per cache shard."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where regenerated data is cached (default: <PPOW_TRL_CACHE>/data)."}
    )
    draft_vocab_size: int | None = field(
        default=8192,
        metadata={"help": "Draft vocabulary size; 0 or None keeps the target's full vocabulary."},
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
