"""Reduced draft vocabulary (EAGLE-3 `d2t` / `t2d` maps), built from assistant-token frequencies.

The drafter predicts over `V_d` draft ids; draft id `i` stands for target id `i + d2t[i]`, and
`t2d[v]` says whether target id `v` is in the draft vocabulary. The selected target ids are sorted
ascending, so boolean indexing a target-vocab tensor with `t2d` yields draft-id order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class DraftVocab:
    """Maps between a draft vocabulary of `V_d` ids and the target vocabulary of `V` ids.

    d2t: (V_d,) int64 offsets, target_id = draft_id + d2t[draft_id].
    t2d: (V,) bool, True for target ids that are in the draft vocabulary.
    coverage: fraction of counted assistant tokens whose id is in the draft vocabulary.
    """

    d2t: torch.Tensor
    t2d: torch.Tensor
    coverage: float

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    @property
    def vocab_size(self) -> int:
        return int(self.t2d.numel())

    @property
    def target_ids(self) -> torch.Tensor:
        """(V_d,) the target id of every draft id, ascending."""
        return torch.arange(self.draft_vocab_size, dtype=torch.int64) + self.d2t

    def save(self, path: str | Path) -> None:
        """Write both maps (and the coverage) to a safetensors file."""
        save_file(
            {"d2t": self.d2t.contiguous(), "t2d": self.t2d.contiguous()},
            str(path),
            metadata={"coverage": repr(float(self.coverage))},
        )

    @classmethod
    def load(cls, path: str | Path) -> DraftVocab:
        """Read maps written by `save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        return cls(d2t=tensors["d2t"], t2d=tensors["t2d"], coverage=float(metadata.get("coverage", "nan")))


def count_assistant_tokens(
    sequences: Iterable[Iterable[int]], loss_masks: Iterable[Iterable[int]], vocab_size: int
) -> torch.Tensor:
    """(V,) int64 counts of token ids at positions where the loss mask is 1."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids, mask in zip(sequences, loss_masks, strict=True):
        ids_t = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.int64)
        mask_t = torch.as_tensor(list(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
        if ids_t.shape != mask_t.shape:
            raise ValueError(f"sequence and loss mask lengths differ: {ids_t.shape} vs {mask_t.shape}")
        selected = ids_t[mask_t]
        if selected.numel() and (selected.min() < 0 or selected.max() >= vocab_size):
            raise ValueError(f"token id outside [0, {vocab_size}) in an assistant position")
        counts += torch.bincount(selected, minlength=vocab_size)
    return counts


def _counts_tensor(token_counts: torch.Tensor | Mapping[int, int], vocab_size: int | None) -> torch.Tensor:
    if isinstance(token_counts, torch.Tensor):
        counts = token_counts.to(torch.int64).flatten()
        if vocab_size is not None and counts.numel() != vocab_size:
            raise ValueError(f"token_counts has {counts.numel()} entries, vocab_size is {vocab_size}")
        return counts
    if vocab_size is None:
        raise ValueError("vocab_size is required when token_counts is a mapping")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for token_id, count in token_counts.items():
        if not 0 <= int(token_id) < vocab_size:
            raise ValueError(f"token id {token_id} outside [0, {vocab_size})")
        counts[int(token_id)] += int(count)
    return counts


def build_draft_vocab(
    token_counts: torch.Tensor | Mapping[int, int] | None = None,
    draft_vocab_size: int | None = 8192,
    vocab_size: int | None = None,
    *,
    sequences: Iterable[Iterable[int]] | None = None,
    loss_masks: Iterable[Iterable[int]] | None = None,
) -> DraftVocab:
    """Select the `draft_vocab_size` most frequent assistant-token ids (EAGLE-3 recipe).

    Pass either `token_counts` ((V,) tensor or {id: count}) or `sequences` + `loss_masks` (only
    positions with loss mask 1 are counted). Ties break towards the smaller id, so when fewer than
    `draft_vocab_size` distinct ids were seen the smallest unseen ids fill the rest. The result is
    sorted ascending. `draft_vocab_size` 0 or None (or equal to the vocab size) keeps the full vocab.
    """
    if token_counts is None:
        if sequences is None or loss_masks is None or vocab_size is None:
            raise ValueError("pass token_counts, or sequences + loss_masks + vocab_size")
        counts = count_assistant_tokens(sequences, loss_masks, vocab_size)
    else:
        counts = _counts_tensor(token_counts, vocab_size)
    total_vocab = counts.numel()
    size = draft_vocab_size or total_vocab
    if not 0 < size <= total_vocab:
        raise ValueError(f"draft_vocab_size must be in [1, {total_vocab}] (or 0/None for all), got {size}")
    order = torch.sort(counts, descending=True, stable=True).indices
    used = torch.sort(order[:size]).values
    t2d = torch.zeros(total_vocab, dtype=torch.bool)
    t2d[used] = True
    d2t = used - torch.arange(size, dtype=torch.int64)
    total = int(counts.sum())
    coverage = float(counts[used].sum()) / total if total else 0.0
    return DraftVocab(d2t=d2t, t2d=t2d, coverage=coverage)


def draft_to_target(ids: torch.Tensor, d2t: torch.Tensor) -> torch.Tensor:
    """Map draft ids (any shape) to target ids."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    return ids + d2t.to(ids.device)[ids]


def target_to_draft(ids: torch.Tensor, t2d: torch.Tensor) -> torch.Tensor:
    """Map target ids (any shape) to draft ids; -1 for ids outside the draft vocabulary (or out of range)."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    t2d = t2d.to(ids.device)
    draft_index = torch.cumsum(t2d.long(), dim=0) - 1
    valid = (ids >= 0) & (ids < t2d.numel())
    safe = ids.clamp(0, t2d.numel() - 1)
    return torch.where(valid & t2d[safe], draft_index[safe], torch.full_like(ids, -1))
