"""Adaptive Divergence-Aware Windowing (ADAW): score anchors, then sample where the drafter is weak.

Per target position t (teacher-forced): v_t = C(P_t) * KL(P_t || Q_t) with C(P_t) = 1 - H(P_t) / log|V|,
i.e. large where the target is confident and the drafter disagrees. A window at anchor row r covers
target positions r+1 .. r+K (they predict the drafted tokens x_{r+2} .. x_{r+K+1}); its score is the
mean of v over them. Q_t is the drafter's one-step (step-0) distribution at row t-1.

Winnable anchors: a window can only be accepted at its first token if the drafter can propose the target's
choice there, so anchors whose first target token is outside the draft vocabulary (or, optionally, outside the
drafter's top-w) can be excluded (`winnable_anchors`, `restrict_anchors`).
"""

from __future__ import annotations

import math

import torch

from ppow_trl.data.draft_vocab import target_to_draft


def position_scores(
    target_logits: torch.Tensor, draft_logprobs: torch.Tensor, draft_vocab_ids: torch.Tensor
) -> torch.Tensor:
    """v per drafter row r (target position r+1): (B, T).

    target_logits: (B, T, V) full-vocabulary target logits (position t predicts x_{t+1}).
    draft_logprobs: (B, T, V_d) the drafter's step-0 log-probabilities (row r predicts x_{r+2}).
    draft_vocab_ids: (V_d,) target id of every draft id. The confidence term uses the full target
    distribution; the KL is taken over the draft vocabulary with P renormalised there (the part of P
    the drafter can express).
    """
    logits = target_logits[:, 1:].float()
    full = torch.log_softmax(logits, -1)
    entropy = -(full.exp() * full).sum(-1)
    confidence = 1.0 - entropy / math.log(logits.shape[-1])
    p_log = torch.log_softmax(logits[..., draft_vocab_ids], -1)
    kl = (p_log.exp() * (p_log - draft_logprobs[:, :-1].float())).sum(-1)
    scores = confidence * kl
    return torch.cat([scores, torch.zeros_like(scores[:, :1])], dim=1)


def window_scores(scores: torch.Tensor, window_size: int) -> torch.Tensor:
    """Mean of per-row scores over rows r .. r+K-1 for every anchor r (zero-padded at the end): (B, T)."""
    padded = torch.nn.functional.pad(scores, (0, window_size - 1))
    return padded.unfold(1, window_size, 1).mean(-1)


def assistant_anchors(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: anchor rows r whose first drafted token (position r+2) is an assistant token."""
    anchors = torch.zeros_like(loss_mask, dtype=torch.bool)
    anchors[:, :-2] = loss_mask[:, 2:].bool()
    return anchors


def valid_anchors(loss_mask: torch.Tensor, attention_mask: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, T) bool: anchor rows whose first drafted token is an assistant token and whose whole window
    (positions r+2 .. r+K+1) lies inside the sequence."""
    b, t = loss_mask.shape
    lengths = attention_mask.long().sum(1, keepdim=True)
    rows = torch.arange(t, device=loss_mask.device).expand(b, t)
    return assistant_anchors(loss_mask) & (rows + window_size + 1 < lengths)


def anchor_first_tokens(target_logits: torch.Tensor) -> torch.Tensor:
    """(B, T) the target's argmax for the first token of the window at every anchor row r (its output at
    position r+1, which predicts x_{r+2}; the last row gets 0). On greedy data this is x_{r+2}."""
    first = target_logits[:, 1:].argmax(-1)
    return torch.cat([first, torch.zeros_like(first[:, :1])], dim=1)


def winnable_anchors(
    first_tokens: torch.Tensor,
    t2d: torch.Tensor,
    step0_logits: torch.Tensor | None = None,
    top_w: int = 0,
) -> torch.Tensor:
    """(B, T) bool: anchor rows whose first target token (`anchor_first_tokens`) is in the draft vocabulary
    (`t2d` (V,) bool) and, with `top_w` > 0, among the top-w of the drafter's step-0 logits (B, T, V_d) at that
    row."""
    winnable = t2d[first_tokens]
    if top_w > 0:
        draft_ids = target_to_draft(first_tokens, t2d)  # -1 outside the draft vocabulary: never in the top-w
        top = step0_logits.topk(min(top_w, step0_logits.shape[-1]), dim=-1).indices
        winnable &= (top == draft_ids[..., None]).any(-1)
    return winnable


def restrict_anchors(valid: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`valid & keep` per sequence, except sequences where that leaves no anchor keep `valid`: a sequence
    is never dropped from a batch by the filter, only narrowed."""
    kept = valid & keep
    return torch.where(kept.any(1, keepdim=True), kept, valid)


def sample_anchors(
    valid: torch.Tensor,
    num_anchors: int,
    generators: list[torch.Generator],
    scores: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `num_anchors` anchor rows per sequence: uniformly over valid rows (scores None) or with
    probability softmax(score / temperature) over them (ADAW). One generator per sequence, so the G
    copies of a sequence in a GRPO group (possibly on other processes) pick the same anchors.

    Returns (anchors (B, A) int64, has_anchor (B,) bool); rows without any valid anchor get anchor 0
    and has_anchor False. Fewer valid rows than A are sampled with replacement.
    """
    if scores is None:
        logits = torch.zeros(valid.shape, device=valid.device)
    else:
        logits = scores.float() / max(temperature, 1e-6)
    logits = logits.masked_fill(~valid, float("-inf"))
    has_anchor = valid.any(1)
    probs = torch.softmax(logits.masked_fill(~has_anchor[:, None], 0.0), -1).cpu()
    counts = valid.sum(1).tolist()
    # One small draw per sequence (not per window): each needs its own seeded generator.
    anchors = [
        torch.multinomial(p, num_anchors, replacement=n < num_anchors, generator=g)
        for p, n, g in zip(probs, counts, generators)
    ]
    return torch.stack(anchors).to(valid.device), has_anchor
