"""Teacher-forced greedy acceptance: how long a drafted window would survive verification, without
running the target again.

On sequences the target generated greedily, the target's argmax at every position is the next token
of the sequence (the data pipeline checks this), so a window drafted at anchor row r is accepted for
exactly as long as it matches x_{r+2}, x_{r+3}, ... This is what the warm-start evaluation, PPOW's
greedy reward and the data-scaling benchmark all measure; `ppow_trl.metrics` summarises the k it returns.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ppow_trl.data import collate_sequences
from ppow_trl.decoding.drafting import draft_windows, window_targets
from ppow_trl.training.windowing import assistant_anchors


def accepted_prefix_length(
    draft_tokens: torch.Tensor, reference_tokens: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """k = length of the common prefix of draft and reference windows (..., K); invalid positions
    (past the end of the sequence) count as rejections."""
    match = draft_tokens == reference_tokens
    if valid is not None:
        match &= valid
    return match.long().cumprod(-1).sum(-1)


@torch.no_grad()
def teacher_forced_acceptance(
    drafter: PreTrainedModel,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    window_size: int,
) -> torch.Tensor:
    """Greedy-draft a window at every assistant anchor of a batch; returns k (N,) per window."""
    anchor_flags = assistant_anchors(loss_mask) & attention_mask.bool()
    b, t = input_ids.shape
    anchors = torch.arange(t, device=input_ids.device).expand(b, t)
    windows = draft_windows(drafter, features, input_ids, anchors, window_size, attention_mask=attention_mask)
    reference, in_range = window_targets(input_ids, anchors, window_size)
    in_range &= window_targets(attention_mask, anchors, window_size)[0].bool()
    k = accepted_prefix_length(windows.tokens[:, :, 0], reference, in_range)
    return k[anchor_flags]


@torch.no_grad()
def dataset_acceptance(
    drafter: PreTrainedModel,
    feature_provider,
    dataset,
    window_size: int,
    pad_token_id: int,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced greedy k of a window at every assistant anchor of a dataset of target-generated
    sequences (chain drafting, temperature 0): returns k (N,) and the dataset row of each window (N,).
    `feature_provider` is a `ppow_trl.data.TargetFeatureProvider` (or any callable batch -> TargetFeatures).
    """
    was_training = drafter.training
    drafter.eval()
    accepted, rows_of = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate_sequences(rows, pad_token_id)
        if device is not None:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        features = getattr(feature_provider(batch), drafter.feature_name)
        ids, attn, lmask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        accepted.append(teacher_forced_acceptance(drafter, features, ids, attn, lmask, window_size).cpu())
        per_row = (assistant_anchors(lmask) & attn.bool()).sum(1).cpu()
        rows_of.append(torch.arange(start, start + len(rows)).repeat_interleave(per_row))
    drafter.train(was_training)
    k = torch.cat(accepted)
    if k.numel() == 0:
        raise ValueError("no assistant positions to evaluate acceptance on (empty eval dataset?)")
    return k, torch.cat(rows_of)
