"""Batches of regenerated sequences and the target features a drafter trains on (online or offline).

`online`: the frozen target runs on every batch (`capture_features`, no grad).
`offline`: aux hidden states and the last hidden state of every sequence are computed once, stored in
safetensors shards under `<regen dir>/features-aux-<ids>-<dtype>/`, and served by sequence index
without the target in memory. Full logits are not stored (V x T floats per sequence is too big); they
are recomputed from `last_hidden_state` with the target's LM head, optionally restricted to `logit_rows`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..target import TargetFeatures, capture_features, default_aux_layer_ids
from .cache import save_tensors_atomic, shard_path
from .config import FEATURE_MODES

logger = logging.getLogger(__name__)


def collate_sequences(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` / `loss_mask` rows into int64 tensors (+ `attention_mask`, and `index` if present)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.int64)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.int64)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        if len(example["loss_mask"]) != n:
            raise ValueError(f"row {row}: input_ids and loss_mask lengths differ")
        input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.int64)
        loss_mask[row, :n] = torch.as_tensor(example["loss_mask"], dtype=torch.int64)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if all("index" in e for e in examples):
        batch["index"] = torch.tensor([int(e["index"]) for e in examples], dtype=torch.int64)
    return batch


def _lm_head_logits(
    lm_head: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor | None
) -> torch.Tensor:
    hidden = hidden.to(lm_head.weight.device, lm_head.weight.dtype)
    if rows is None:
        return lm_head(hidden).float()
    rows = rows.to(lm_head.weight.device)
    bias = lm_head.bias[rows] if getattr(lm_head, "bias", None) is not None else None
    return F.linear(hidden, lm_head.weight[rows], bias).float()


class TargetFeatureProvider:
    """Gives `TargetFeatures` for a collated batch, from the live target (online) or a disk cache (offline).

    Build it with `TargetFeatureProvider.online(...)` or `TargetFeatureProvider.offline(...)` and call it
    on a batch from `collate_sequences`. Offline batches must carry `index` (the dataset's `index` column).
    With `with_logits`, logits are the target LM head applied to the last hidden state; `logit_rows`
    (target ids, e.g. a draft vocabulary's) restricts them to those columns, in that order.
    """

    def __init__(
        self,
        mode: str,
        aux_layer_ids: list[int],
        target: PreTrainedModel | None = None,
        lm_head: torch.nn.Module | None = None,
        directory: Path | None = None,
        with_logits: bool = True,
        logit_rows: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if mode not in FEATURE_MODES:
            raise ValueError(f"feature mode must be one of {FEATURE_MODES}, got {mode!r}")
        self.mode, self.aux_layer_ids = mode, list(aux_layer_ids)
        self.target, self.lm_head, self.directory = target, lm_head, directory
        self.with_logits, self.logit_rows, self.device = with_logits, logit_rows, device
        if with_logits and lm_head is None:
            raise ValueError("with_logits needs the target's LM head (pass target or lm_head)")
        self._manifest = json.loads((directory / "manifest.json").read_text()) if directory else None
        self._handles: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------- online
    @classmethod
    def online(
        cls,
        target: PreTrainedModel,
        aux_layer_ids: list[int] | None = None,
        with_logits: bool = True,
        logit_rows: torch.Tensor | None = None,
    ) -> TargetFeatureProvider:
        """Run the frozen target on every batch."""
        ids = aux_layer_ids or default_aux_layer_ids(target.config.num_hidden_layers)
        return cls(
            "online",
            ids,
            target=target,
            lm_head=target.get_output_embeddings(),
            with_logits=with_logits,
            logit_rows=logit_rows,
            device=next(target.parameters()).device,
        )

    # ------------------------------------------------------------------------------------- offline
    @classmethod
    def offline(
        cls,
        dataset: Sequence[dict[str, Any]],
        data_dir: str | Path,
        target: PreTrainedModel | None = None,
        aux_layer_ids: list[int] | None = None,
        batch_size: int = 8,
        shard_size: int = 64,
        with_logits: bool = False,
        lm_head: torch.nn.Module | None = None,
        logit_rows: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> TargetFeatureProvider:
        """Cache features of every sequence of `dataset` (the full regenerated set, rows in `index` order)
        under `data_dir` once (missing shards only), then serve them without the target."""
        if aux_layer_ids is None:
            if target is None:
                raise ValueError("offline features without a target need explicit aux_layer_ids")
            aux_layer_ids = default_aux_layer_ids(target.config.num_hidden_layers)
        if lm_head is None and target is not None:
            lm_head = target.get_output_embeddings()
        directory = _compute_offline(
            dataset, Path(data_dir), target, list(aux_layer_ids), batch_size, shard_size, progress
        )
        return cls(
            "offline",
            aux_layer_ids,
            lm_head=lm_head,
            directory=directory,
            with_logits=with_logits,
            logit_rows=logit_rows,
            device=device,
        )

    def _sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard_size, count = self._manifest["shard_size"], self._manifest["num_shards"]
        shard, row = divmod(index, shard_size)
        if not 0 <= shard < count:
            raise IndexError(f"sequence index {index} is outside the offline feature cache {self.directory}")
        if shard not in self._handles:
            self._handles[shard] = safe_open(
                str(shard_path(self.directory, shard, count, prefix="features")), framework="pt"
            )
        handle = self._handles[shard]
        start, end = handle.get_slice("offsets")[row : row + 2].tolist()
        return handle.get_slice("aux")[start:end], handle.get_slice("last")[start:end]

    def _offline_features(self, batch: dict[str, torch.Tensor]) -> TargetFeatures:
        if "index" not in batch:
            raise KeyError("offline features need the batch's `index` (keep the dataset's `index` column)")
        lengths = batch["attention_mask"].sum(-1).tolist()
        width = batch["input_ids"].shape[1]
        aux_rows, last_rows = [], []
        for index, length in zip(batch["index"].tolist(), lengths):
            aux, last = self._sequence(index)
            if aux.shape[0] != length:
                raise ValueError(
                    f"offline features of sequence {index} have {aux.shape[0]} positions, the batch row has "
                    f"{length}: the cache belongs to other data"
                )
            aux_rows.append(F.pad(aux, (0, 0, 0, width - length)))
            last_rows.append(F.pad(last, (0, 0, 0, width - length)))
        return TargetFeatures(torch.stack(aux_rows).to(self.device), torch.stack(last_rows).to(self.device))

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> TargetFeatures:
        """Features for a batch from `collate_sequences` (same layout in both modes)."""
        if self.mode == "online":
            features = capture_features(
                self.target,
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                aux_layer_ids=self.aux_layer_ids,
                with_logits=False,
            )
        else:
            features = self._offline_features(batch)
        if self.with_logits:
            logits = _lm_head_logits(self.lm_head, features.last_hidden_state, self.logit_rows)
            features.logits = logits.to(self.device)
        return features


# ------------------------------------------------------------------------------------- offline cache
def offline_feature_dir(data_dir: Path, aux_layer_ids: list[int], dtype: torch.dtype) -> Path:
    """Where offline features for these aux layers live, next to the regenerated data."""
    return data_dir / f"features-aux-{'-'.join(map(str, aux_layer_ids))}-{str(dtype).replace('torch.', '')}"


def _compute_offline(
    dataset: Sequence[dict[str, Any]],
    data_dir: Path,
    target: PreTrainedModel | None,
    aux_layer_ids: list[int],
    batch_size: int,
    shard_size: int,
    progress: bool,
) -> Path:
    existing = sorted(data_dir.glob(f"features-aux-{'-'.join(map(str, aux_layer_ids))}-*"))
    if target is not None:
        directory = offline_feature_dir(data_dir, aux_layer_ids, next(target.parameters()).dtype)
    elif existing:
        directory = existing[0]
    else:
        raise FileNotFoundError(
            f"no offline features for aux layers {aux_layer_ids} in {data_dir}; pass the target"
        )
    count = (len(dataset) + shard_size - 1) // shard_size
    expected = {
        "num_sequences": len(dataset),
        "shard_size": shard_size,
        "num_shards": count,
        "aux_layer_ids": aux_layer_ids,
        "data_fingerprint": data_dir.name,
    }
    manifest = directory / "manifest.json"
    if manifest.is_file():
        if json.loads(manifest.read_text()) != expected:
            raise RuntimeError(
                f"offline feature cache {directory} was built for other data or settings; delete it"
            )
    else:
        directory.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(expected, indent=1))
    missing = [i for i in range(count) if not shard_path(directory, i, count, prefix="features").is_file()]
    if missing and target is None:
        raise FileNotFoundError(
            f"offline feature cache {directory} is incomplete; pass the target to finish it"
        )
    total = sum(min(shard_size, len(dataset) - i * shard_size) for i in missing)
    with tqdm(total=total, unit="seq", desc="target features", disable=not progress or not missing) as bar:
        for shard in missing:
            rows = [
                dataset[i] for i in range(shard * shard_size, min((shard + 1) * shard_size, len(dataset)))
            ]
            tensors = _feature_shard(target, rows, aux_layer_ids, batch_size, bar)
            path = shard_path(directory, shard, count, prefix="features")
            save_tensors_atomic(path, tensors)
    return directory


def _feature_shard(
    target: PreTrainedModel, rows: list[dict[str, Any]], aux_layer_ids: list[int], batch_size: int, bar: tqdm
) -> dict[str, torch.Tensor]:
    """Aux and last hidden states of `rows`, concatenated over tokens (padding removed), with offsets."""
    device = next(target.parameters()).device
    aux_parts, last_parts, lengths = [], [], []
    for start in range(0, len(rows), batch_size):
        batch = collate_sequences(rows[start : start + batch_size], pad_token_id=0)
        features = capture_features(
            target,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            aux_layer_ids=aux_layer_ids,
            with_logits=False,
        )
        for row, length in enumerate(batch["attention_mask"].sum(-1).tolist()):
            aux_parts.append(features.aux_hidden_states[row, :length].cpu())
            last_parts.append(features.last_hidden_state[row, :length].cpu())
            lengths.append(length)
        bar.update(len(batch["input_ids"]))
    offsets = F.pad(torch.tensor(lengths, dtype=torch.int64).cumsum(0), (1, 0))
    return {
        "aux": torch.cat(aux_parts).contiguous(),
        "last": torch.cat(last_parts).contiguous(),
        "offsets": offsets,
    }
