"""Teacher-forced greedy acceptance: how long a drafted window would survive verification, without
running the target again.

On sequences the target generated greedily, the target's argmax at every position is the next token
of the sequence (the data pipeline checks this), so a window drafted at anchor row r is accepted for
exactly as long as it matches x_{r+2}, x_{r+3}, ... The drafter's training-time-test forward with the
sequence's tokens forced gives its logits at every depth of that path at once: the chain's greedy window is
accepted up to the first depth whose token is not the drafter's argmax, and a tree of width w (the top-w
draft tokens at every depth, the branch along the target's path continuing) up to the first depth whose
token is not among the drafter's top-w. A depth counts only on an assistant (`loss_mask`) token: text the
target did not generate (the next user turn) is never a greedy continuation.

Held-out tau (docs/metrics.md) is computed here once: `batch_acceptances` scores a collated batch at several
(width, K) shapes from one drafter forward (the SFT trainer's evaluation step), `dataset_acceptances` loops
it over a dataset (PPOW's `evaluate`, the evaluation runner, the PPOW benchmark), `batch_acceptance` /
`dataset_acceptance` give one shape (the data-scaling benchmark), and `ppow_trl.metrics.acceptance_metrics` summarises the k they return.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from ppow_trl.data import collate_sequences
from ppow_trl.decoding.drafting import draft_windows, window_targets
from ppow_trl.metrics import acceptance_length
from ppow_trl.models.common import unwrap_drafter
from ppow_trl.training.windowing import assistant_anchors

#: The held-out tree shape logged next to the chain tau by default: width w = 4 at K = 10 draft depths.
DEFAULT_TREE_WIDTH, DEFAULT_TREE_WINDOW = 4, 10


def _prefix_length(accepted: torch.Tensor) -> torch.Tensor:
    """Number of leading True entries along the last dimension."""
    return accepted.long().cumprod(-1).sum(-1)


def accepted_prefix_length(
    draft_tokens: torch.Tensor, reference_tokens: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """k = length of the common prefix of draft and reference windows (..., K); invalid positions
    (past the end of the sequence) count as rejections."""
    match = draft_tokens == reference_tokens
    if valid is not None:
        match &= valid
    return _prefix_length(match)


def tree_accepted_length(ranks: torch.Tensor, width: int) -> torch.Tensor:
    """k of a tree of width `width` from the rank (..., K) of the reference token at every depth
    (`teacher_forced_ranks`): the depths before the first one whose token is not among the top-w."""
    return _prefix_length(ranks < width)


def tree_tau_metrics(accepted: torch.Tensor, width: int, window_size: int) -> dict[str, float]:
    """{`tree_tau_w{w}_k{K}`: 1 + mean k} of per-window tree k (docs/metrics.md), e.g. `tree_tau_w4_k10`."""
    return {f"tree_tau_w{width}_k{window_size}": acceptance_length(accepted)}


def acceptance_shapes(
    drafter: PreTrainedModel, window_size: int, tree_width: int, tree_window_size: int | None
) -> list[tuple[int, int]]:
    """(width, K) of a trainer's held-out acceptances: the chain at `window_size`, then the tree tau at
    (`tree_width`, `tree_window_size`) unless that is 0 (None: `DEFAULT_TREE_WINDOW`, at most a Medusa drafter's
    heads). Raises, naming the field, where a K exceeds a drafter's fixed longest window."""
    heads = getattr(drafter, "max_draft_tokens", None)
    if tree_window_size is None:
        tree_window_size = min(DEFAULT_TREE_WINDOW, heads or DEFAULT_TREE_WINDOW)
    for name, value in (("eval_window_size", window_size), ("eval_tree_window_size", tree_window_size)):
        if heads is not None and value > heads:
            raise ValueError(f"{name}={value} exceeds the {type(drafter).__name__}'s {heads} heads")
    return [(1, window_size)] + ([(tree_width, tree_window_size)] if tree_window_size else [])


def anchor_flags(attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: where a window is drafted and scored, the assistant anchors on real tokens."""
    return assistant_anchors(loss_mask) & attention_mask.bool()


def _forced_windows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    window_size: int,
    anchor_stride: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchors (B, A): every `anchor_stride`-th row, scored (B, A): the assistant anchors among them, reference
    (B, A, K): x_{r+2+j}, scorable (B, A, K): the reference is a real assistant token inside the sequence)."""
    if anchor_stride < 1:
        raise ValueError(f"anchor_stride must be >= 1, got {anchor_stride}")
    b, t = input_ids.shape
    anchors = torch.arange(0, t, anchor_stride, device=input_ids.device).expand(b, -1)
    reference, scorable = window_targets(input_ids, anchors, window_size)
    scorable &= window_targets(attention_mask, anchors, window_size)[0].bool()
    scorable &= window_targets(loss_mask, anchors, window_size)[0].bool()
    return anchors, anchor_flags(attention_mask, loss_mask)[:, ::anchor_stride], reference, scorable


@torch.no_grad()
def teacher_forced_ranks(
    drafter: PreTrainedModel,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    window_size: int,
    anchor_stride: int = 1,
) -> torch.Tensor:
    """(N, K) rank of the sequence's token among the drafter's draft-vocabulary logits at every depth of the
    window forced along the sequence, at every assistant anchor of a batch (0: the drafter's argmax; ties
    rank by draft id, the order in which argmax breaks them). A token outside the draft vocabulary or not
    scorable (padding, past the end, not an assistant token) ranks V_d: no tree ever contains it.
    `anchor_stride` s scores every s-th row only: the drafter's passes past the first cost ~1/s (for cheap
    evaluation of many drafters; neighbouring windows overlap, so little is lost)."""
    anchors, scored, reference, scorable = _forced_windows(
        input_ids, attention_mask, loss_mask, window_size, anchor_stride
    )
    draft = draft_windows(
        drafter, features, input_ids, anchors, window_size, attention_mask=attention_mask,
        tokens=reference[:, :, None], return_logits=True,
    )  # fmt: skip
    logits, ids = draft.logits[:, :, 0][scored], draft.draft_ids[:, :, 0][scored]  # (N, K, V_d), (N, K)
    own = logits.gather(-1, ids.clamp(min=0)[..., None])
    earlier = torch.arange(logits.shape[-1], device=ids.device) < ids[..., None]
    ranks = ((logits > own) | ((logits == own) & earlier)).sum(-1)
    return ranks.masked_fill((ids < 0) | ~scorable[scored], logits.shape[-1])


def teacher_forced_acceptance(
    drafter: PreTrainedModel,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    window_size: int,
    width: int = 1,
) -> torch.Tensor:
    """k (N,) of the window at every assistant anchor of a batch: the greedy chain (width 1), or a tree of
    top-`width` draft tokens at every depth."""
    ranks = teacher_forced_ranks(drafter, features, input_ids, attention_mask, loss_mask, window_size)
    return tree_accepted_length(ranks, width)


def batch_acceptances(
    drafter: PreTrainedModel,
    features: torch.Tensor,
    batch: dict[str, torch.Tensor],
    shapes: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """k at every anchor of a collated batch for each (width, K) in `shapes` (width 1: the chain), from one
    forward at the largest K, as a (B, T, S) map, -1 where no window is scored: the map keeps each window's
    sequence, and can be padded with -1 to gather across processes."""
    input_ids, attention_mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    longest = max(k for _, k in shapes)
    ranks = teacher_forced_ranks(drafter, features, input_ids, attention_mask, loss_mask, longest)
    accepted = torch.full((*input_ids.shape, len(shapes)), -1, dtype=torch.long, device=input_ids.device)
    accepted[anchor_flags(attention_mask, loss_mask)] = torch.stack(
        [tree_accepted_length(ranks[:, :k], width) for width, k in shapes], dim=-1
    )
    return accepted


def batch_acceptance(
    drafter: PreTrainedModel,
    features: torch.Tensor,
    batch: dict[str, torch.Tensor],
    window_size: int,
    width: int = 1,
) -> torch.Tensor:
    """`batch_acceptances` at one shape: a (B, T) map of k, -1 where no window is scored."""
    return batch_acceptances(drafter, features, batch, [(width, window_size)])[..., 0]


@torch.no_grad()
def teacher_forced_expected_acceptance(
    drafter: PreTrainedModel,
    features: torch.Tensor,
    target_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    window_size: int,
    drafter_temperature: float = 1.0,
    anchor_stride: int = 1,
) -> torch.Tensor:
    """Expected k (N,) of a window under lossless speculative sampling at temperature 1, at every
    assistant anchor of a batch of sequences the target *sampled* at temperature 1.

    The window follows the sequence's own tokens (teacher forcing); step j is accepted with probability
    beta_j = sum_v min(p_j(v), q_j(v)) (p: the target at that position over its full vocabulary, so mass
    outside the draft vocabulary is never accepted; q: the drafter at `drafter_temperature`, which a server can
    set without retraining), and E[k] = sum_j prod_{i<=j} beta_i; steps past the sequence or off the assistant
    tokens are rejections. A proxy: real decoding continues from the accepted token, not the sequence's.
    `target_logits` (B, T, V) are the target's full-vocabulary logits over the batch; `anchor_stride` as in
    `teacher_forced_ranks`.
    """
    from ppow_trl.training.losses import acceptance_rate

    b, t = input_ids.shape
    anchors, scored, reference, in_range = _forced_windows(
        input_ids, attention_mask, loss_mask, window_size, anchor_stride
    )
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
    beta = acceptance_rate(
        draft_logits / drafter_temperature, p_logits, lse[batch_rows[scored], rows[scored]]
    )
    beta = beta * in_range[scored]
    return beta.cumprod(-1).sum(-1)


@torch.no_grad()
def dataset_acceptances(
    drafter: PreTrainedModel,
    feature_provider,
    dataset,
    shapes: Sequence[tuple[int, int]],
    pad_token_id: int,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced k of a window at every assistant anchor of a dataset of target-generated sequences
    (temperature 0) for each (width, K) in `shapes` (width 1: chain drafting): returns k (N, S) and the
    dataset row of each window (N,). `feature_provider` is a `ppow_trl.data.TargetFeatureProvider` (or any
    callable batch -> TargetFeatures).
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
        k = batch_acceptances(drafter, features, batch, shapes).cpu()
        scored = k[..., 0] >= 0
        accepted.append(k[scored])
        rows_of.append(start + scored.nonzero()[:, 0])
    drafter.train(was_training)
    k = torch.cat(accepted)
    if k.numel() == 0:
        raise ValueError("no assistant positions to evaluate acceptance on (empty eval dataset?)")
    return k, torch.cat(rows_of)


def dataset_acceptance(
    drafter: PreTrainedModel,
    feature_provider,
    dataset,
    window_size: int,
    pad_token_id: int,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    width: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dataset_acceptances` at one shape (default: the greedy chain): k (N,) and the dataset row of each
    window (N,)."""
    k, rows = dataset_acceptances(
        drafter, feature_provider, dataset, [(width, window_size)], pad_token_id, batch_size, device
    )
    return k[:, 0], rows
