"""Teacher-forced greedy acceptance: how long a drafted window would survive verification, without
running the target again.

On sequences the target generated greedily, the target's argmax at every position is the next token
of the sequence (the data pipeline checks this), so a window drafted at anchor row r is accepted for
exactly as long as it matches x_{r+2}, x_{r+3}, ... This is what the warm-start evaluation, PPOW's
greedy reward and the data-scaling benchmark all measure.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from ppow_trl.decoding.drafting import draft_windows, window_targets


def accepted_prefix_length(
    draft_tokens: torch.Tensor, reference_tokens: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """k = length of the common prefix of draft and reference windows (..., K); invalid positions
    (past the end of the sequence) count as rejections."""
    match = draft_tokens == reference_tokens
    if valid is not None:
        match &= valid
    return match.long().cumprod(-1).sum(-1)


def evaluation_anchors(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: anchor rows whose first drafted token (position r+2) is an assistant token."""
    anchors = torch.zeros_like(loss_mask, dtype=torch.bool)
    anchors[:, :-2] = loss_mask[:, 2:].bool()
    return anchors


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
    anchor_flags = evaluation_anchors(loss_mask) & attention_mask.bool()
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
    from ppow_trl.data import collate_sequences

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
        per_row = (evaluation_anchors(lmask) & attn.bool()).sum(1).cpu()
        rows_of.append(torch.arange(start, start + len(rows)).repeat_interleave(per_row))
    drafter.train(was_training)
    k = torch.cat(accepted)
    if k.numel() == 0:
        raise ValueError("no assistant positions to evaluate acceptance on (empty eval dataset?)")
    return k, torch.cat(rows_of)


def acceptance_metrics(accepted: torch.Tensor, window_size: int) -> dict[str, float]:
    """Summary of per-window k (e.g. from `dataset_acceptance`): `tau` (mean k+1, counting the target's
    extra token), `mean_accepted`, `windows` and `alpha_1..alpha_K` (per-position acceptance)."""
    from ppow_trl.decoding.verify import acceptance_length, per_position_acceptance

    alpha = per_position_acceptance(accepted, window_size)
    metrics = {
        "tau": acceptance_length(accepted),
        "mean_accepted": float(accepted.float().mean()),
        "windows": accepted.numel(),
    }
    metrics.update({f"alpha_{j + 1}": float(a) for j, a in enumerate(alpha)})
    return metrics


def paired_tau_difference(
    k_new: torch.Tensor, k_old: torch.Tensor, rows: torch.Tensor
) -> tuple[float, float]:
    """tau(new) - tau(old) over the same windows, and its standard error clustered by sequence.

    Both drafters are scored on identical windows, so the difference is far less noisy than either tau;
    windows of one sequence are correlated, so the error treats sequences, not windows, as the samples
    (the standard error of a ratio estimator over clusters).
    """
    if not k_new.shape == k_old.shape == rows.shape:
        raise ValueError("paired comparison needs k of both drafters on the same windows")
    diff = (k_new - k_old).double()
    delta = float(diff.mean())
    _, cluster = torch.unique(rows, return_inverse=True)
    n = int(cluster.max()) + 1
    residual = torch.zeros(n, dtype=torch.float64).index_add_(0, cluster, diff - delta)
    se = math.sqrt(n / max(n - 1, 1) * float(residual.square().sum())) / diff.numel()
    return delta, se
