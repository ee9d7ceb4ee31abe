"""Drafter objectives against the frozen target's next-token distribution on the draft vocabulary.

Shapes: `draft_logits` (..., V_d) are the drafter's logits at some rows; `target_logits` (..., V_d) are the
target's logits at the same rows, restricted to the draft vocabulary's target ids (draft-id order). The
target distribution p is the softmax over that subset, i.e. renormalised over the draft vocabulary
(docs/eagle3.md); q is the drafter's softmax. Every loss is computed in fp32 and returns one value
per row; the caller masks and reduces (`eagle3_position_mask`, `step_weights`).

The window objective (`expected_accepted_length`, `window_loss`) scores a whole forced window instead: from
the drafter's log-probability of the target's greedy token at every depth it gives the expected number of
draft tokens the target accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Per-row objectives (`drafter_loss`) and "window", the window objective (`window_loss`).
ROW_LOSSES = ("soft_ce", "forward_kl", "acceptance")
LOSSES = (*ROW_LOSSES, "window")


def soft_cross_entropy(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log q_v per row (EAGLE-3's objective)."""
    p = torch.softmax(target_logits.float(), dim=-1)
    return -(p * torch.log_softmax(draft_logits.float(), dim=-1)).sum(-1)


def forward_kl(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row: the soft cross-entropy minus the target's entropy (same gradient, floor 0)."""
    log_p = torch.log_softmax(target_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - torch.log_softmax(draft_logits.float(), dim=-1))).sum(-1)


def acceptance_rate(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, target_logsumexp: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_v min(p_v, q_v) per row: the probability that speculative sampling accepts a token drawn from q.

    With `target_logsumexp` (..., the target's full-vocabulary logsumexp) p is the target's true
    probability, so mass outside the draft vocabulary counts as never accepted; without it p is
    renormalised over the draft vocabulary.
    """
    target_logits = target_logits.float()
    if target_logsumexp is None:
        target_logsumexp = torch.logsumexp(target_logits, dim=-1)
    p = torch.exp(target_logits - target_logsumexp[..., None].float())
    return torch.minimum(p, torch.softmax(draft_logits.float(), dim=-1)).sum(-1)


def drafter_loss(
    name: str,
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    target_logsumexp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss `name` in ROW_LOSSES; "acceptance" is 1 - `acceptance_rate` (maximises sum min(p, q))."""
    if name == "soft_ce":
        return soft_cross_entropy(draft_logits, target_logits)
    if name == "forward_kl":
        return forward_kl(draft_logits, target_logits)
    if name == "acceptance":
        return 1.0 - acceptance_rate(draft_logits, target_logits, target_logsumexp)
    raise ValueError(f"unknown loss {name!r} per row; choose one of {ROW_LOSSES}")


def expected_accepted_length(target_logprobs: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """E[R] = sum_j prod_{i<=j} q(x*_i) per window (...): the expected accepted length when the target is
    greedy and the drafter samples from q, the drafter's distribution at each depth along the target's path.

    target_logprobs: (..., K) log q(x*_j) of the target's greedy token at depth j.
    scored: (..., K) bool; the window ends at its first unscored depth (it leaves the supervised tokens, or
        the drafter cannot propose x*_j), so later depths add nothing.
    """
    inside = scored.long().cumprod(-1).bool()
    # A cumulative sum of log q: no product of many small probabilities underflows to a zero gradient early.
    reach = torch.cumsum(target_logprobs.float().masked_fill(~inside, 0.0), -1).exp()
    return torch.where(inside, reach, 0.0).sum(-1)


def window_loss(target_logprobs: torch.Tensor, scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, E[R]) per window (...): loss = (L - E[R]) / K, the expected rejected draft tokens of the L depths
    the window can reach (`expected_accepted_length`) as a fraction of K; 0 for a drafter sure of every
    target token, and its gradient is that of -E[R] / K."""
    expected = expected_accepted_length(target_logprobs, scored)
    return (scored.long().cumprod(-1).sum(-1) - expected) / scored.shape[-1], expected


def eagle3_position_mask(
    loss_mask: torch.Tensor, target_argmax: torch.Tensor, t2d: torch.Tensor
) -> torch.Tensor:
    """Rows that get a loss: supervised (`loss_mask`) and whose full-vocabulary target argmax is in the draft
    vocabulary (`t2d` (V,) bool). Rows whose argmax the drafter can never propose are dropped entirely."""
    return loss_mask.bool() & t2d[target_argmax]


def step_weights(num_steps: int, decay: float, device: torch.device | str | None = None) -> torch.Tensor:
    """(K,) weights decay**j of the training-time-test steps j = 0..K-1 (EAGLE-3: 0.8)."""
    return decay ** torch.arange(num_steps, dtype=torch.float32, device=device)


@dataclass
class TargetLabels:
    """The target side of the objective at every position of a batch (fp32).

    logits: (..., V_d) target logits at the draft vocabulary's target ids, in draft-id order.
    logsumexp: (...) logsumexp over the full target vocabulary.
    argmax: (...) full-vocabulary argmax (a target id).
    """

    logits: torch.Tensor
    logsumexp: torch.Tensor
    argmax: torch.Tensor


@torch.no_grad()
def target_labels(
    hidden: torch.Tensor, lm_head: torch.nn.Module, draft_target_ids: torch.Tensor, chunk_size: int = 8192
) -> TargetLabels:
    """Apply the target's LM head to its last hidden states (..., H) in vocabulary chunks of `chunk_size`.

    Each chunk's logits are reduced to a running logsumexp and argmax (first index on ties, like
    `argmax`) and the draft-vocabulary columns are kept, so (..., V) logits are never materialised.
    `draft_target_ids` (V_d,) must be ascending (true for every `DraftVocab`). Results are on the LM head's
    device. Only a plain linear head is applied: models with extra logit scaling or soft-capping need their
    own labels.
    """
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    hidden = hidden.to(weight.device, weight.dtype)
    ids = draft_target_ids.to(weight.device)
    shape = hidden.shape[:-1]
    draft = torch.empty(*shape, ids.numel(), dtype=torch.float32, device=hidden.device)
    lse = torch.full(shape, float("-inf"), dtype=torch.float32, device=hidden.device)
    best = torch.full(shape, float("-inf"), dtype=torch.float32, device=hidden.device)
    argmax = torch.zeros(shape, dtype=torch.long, device=hidden.device)
    starts = torch.arange(0, weight.shape[0] + chunk_size, chunk_size, device=ids.device)
    bounds = torch.searchsorted(ids, starts).tolist()
    for i, start in enumerate(range(0, weight.shape[0], chunk_size)):
        end = min(start + chunk_size, weight.shape[0])
        logits = F.linear(hidden, weight[start:end], None if bias is None else bias[start:end]).float()
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        chunk_best, chunk_arg = logits.max(dim=-1)
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        argmax = torch.where(better, chunk_arg + start, argmax)
        lo, hi = bounds[i], bounds[i + 1]
        draft[..., lo:hi] = logits[..., ids[lo:hi] - start]
    return TargetLabels(draft, lse, argmax)
