"""Teacher-forced greedy acceptance: how long a drafted window would survive verification, without
running the target again.

On sequences the target generated greedily, the target's argmax at every position is the next token
of the sequence (the data pipeline checks this), so a window drafted at anchor row r is accepted for
exactly as long as it matches x_{r+2}, x_{r+3}, ... Held-out tau (docs/metrics.md) is computed here once:
`batch_acceptance` scores a collated batch, the SFT trainer's evaluation step calls it, `dataset_acceptance`
(PPOW's `evaluate`, the evaluation runner, the benchmarks) loops it over a dataset, and
`ppow_trl.metrics.acceptance_metrics` summarises the k it returns.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ppow_trl.data import collate_sequences
from ppow_trl.decoding.drafting import draft_windows, window_targets
from ppow_trl.models.common import unwrap_drafter
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


def anchor_flags(attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: where a window is drafted and scored, the assistant anchors on real tokens."""
    return assistant_anchors(loss_mask) & attention_mask.bool()


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
    b, t = input_ids.shape
    anchors = torch.arange(t, device=input_ids.device).expand(b, t)
    windows = draft_windows(drafter, features, input_ids, anchors, window_size, attention_mask=attention_mask)
    reference, in_range = window_targets(input_ids, anchors, window_size)
    in_range &= window_targets(attention_mask, anchors, window_size)[0].bool()
    k = accepted_prefix_length(windows.tokens[:, :, 0], reference, in_range)
    return k[anchor_flags(attention_mask, loss_mask)]


def batch_acceptance(
    drafter: PreTrainedModel, features: torch.Tensor, batch: dict[str, torch.Tensor], window_size: int
) -> torch.Tensor:
    """k of the greedy window at every anchor of a collated batch as a (B, T) map, -1 where no window is
    scored: the map keeps each window's sequence, and can be padded with -1 to gather across processes."""
    input_ids, attention_mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    accepted = torch.full_like(input_ids, -1)
    accepted[anchor_flags(attention_mask, loss_mask)] = teacher_forced_acceptance(
        drafter, features, input_ids, attention_mask, loss_mask, window_size
    )
    return accepted


@torch.no_grad()
def teacher_forced_expected_acceptance(
    drafter: PreTrainedModel,
    features: torch.Tensor,
    target_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    window_size: int,
) -> torch.Tensor:
    """Expected k (N,) of a window under lossless speculative sampling at temperature 1, at every
    assistant anchor of a batch of sequences the target *sampled* at temperature 1.

    The window follows the sequence's own tokens (teacher forcing); step j is accepted with probability
    beta_j = sum_v min(p_j(v), q_j(v)) (p: the target at that position over its full vocabulary, so mass
    outside the draft vocabulary is never accepted; q: the drafter at temperature 1), and E[k] =
    sum_j prod_{i<=j} beta_i. A proxy: real decoding continues from the accepted token, not the sequence's.
    `target_logits` (B, T, V) are the target's full-vocabulary logits over the batch.
    """
    from ppow_trl.training.losses import acceptance_rate

    scored = anchor_flags(attention_mask, loss_mask)
    b, t = input_ids.shape
    anchors = torch.arange(t, device=input_ids.device).expand(b, t)
    reference, in_range = window_targets(input_ids, anchors, window_size)
    in_range &= window_targets(attention_mask, anchors, window_size)[0].bool()
    model = unwrap_drafter(drafter)
    draft = draft_windows(
        drafter, features, input_ids, anchors, window_size, attention_mask=attention_mask,
        tokens=reference[:, :, None, :], temperature=1.0, return_logits=True,
    )  # fmt: skip
    draft_logits = draft.logits[:, :, 0][scored]  # (N, K, V_d)
    # The target's distribution of x_{r+2+j} is its output at row r+1+j.
    rows = (anchors[..., None] + 1 + torch.arange(window_size, device=anchors.device)).clamp(max=t - 1)
    lse = torch.logsumexp(target_logits.float(), dim=-1)  # (B, T)
    restricted = target_logits[..., model.target_ids_of_draft_vocab().to(target_logits.device)]  # (B,T,V_d)
    batch_rows = torch.arange(b, device=rows.device)[:, None, None].expand_as(rows)
    p_logits = restricted[batch_rows[scored], rows[scored]]  # (N, K, V_d)
    beta = acceptance_rate(draft_logits, p_logits, lse[batch_rows[scored], rows[scored]])
    beta = beta * in_range[scored]
    return beta.cumprod(-1).sum(-1)


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
        k = batch_acceptance(drafter, features, batch, window_size).cpu()
        scored = k >= 0
        accepted.append(k[scored])
        rows_of.append(start + scored.nonzero()[:, 0])
    drafter.train(was_training)
    k = torch.cat(accepted)
    if k.numel() == 0:
        raise ValueError("no assistant positions to evaluate acceptance on (empty eval dataset?)")
    return k, torch.cat(rows_of)
