"""Verification of drafted windows against the target: the torch reference.

Conventions (docs/metrics.md): a window has K drafted tokens; the target scores K + 1 positions (row j
scores draft position j, row K is the bonus position). ``k`` is the accepted prefix length (0..K) and the
target always adds one token of its own, so tau = mean(k + 1) (`ppow_trl.metrics`).

The sampling path is written so that its arithmetic is fully specified, which lets the Triton kernel in
``ppow_trl.decoding.kernels`` reproduce it:

* ``z = logits.float() * (1 / temperature)`` (fp32 multiply by the fp32-rounded reciprocal),
  ``m = max(z)``, ``e = exp(z - m)``, ``Z = sum(e)``, ``p = e / Z`` (all fp32);
* accept draft token ``x_j`` iff ``u_j < p_j(x_j) / q_j(x_j)``;
* the extra token is drawn from ``dist = max(0, p_k - q_k)`` at the first rejection ``k`` (``q_K = 0`` for
  the bonus, so ``dist = p_K``), falling back to ``p_k`` when ``dist`` is all zeros, by inverse CDF:
  ``c = cumsum(dist)`` accumulated in fp64, ``t = u * c[-1]``, token = smallest ``i`` with ``c[i] > t``
  (always a token with ``dist > 0``; if rounding leaves no such index, the last token with ``dist > 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VerifyResult", "draw_uniforms", "verify_greedy", "verify_sampling"]


@dataclass
class VerifyResult:
    """Outcome of verifying B windows.

    accepted: (B,) int64, the accepted prefix length k in 0..K.
    next_token: (B,) int64, the target's extra token: the correction at position k if k < K, else the
        bonus token from position K.
    """

    accepted: torch.Tensor
    next_token: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# input validation


def _check_logits_and_tokens(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(target_logits, torch.Tensor) or not isinstance(draft_tokens, torch.Tensor):
        raise TypeError("target_logits and draft_tokens must be torch.Tensors")
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must have shape (B, K+1, V), got {tuple(target_logits.shape)}")
    if not target_logits.is_floating_point():
        raise ValueError(f"target_logits must be a floating tensor, got {target_logits.dtype}")
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must have shape (B, K), got {tuple(draft_tokens.shape)}")
    if draft_tokens.is_floating_point() or draft_tokens.is_complex() or draft_tokens.dtype == torch.bool:
        raise ValueError(f"draft_tokens must be an integer tensor, got {draft_tokens.dtype}")
    batch, k_plus_1, vocab = target_logits.shape
    window = draft_tokens.shape[1]
    if window < 1:
        raise ValueError(f"window size K must be >= 1, got draft_tokens of shape {tuple(draft_tokens.shape)}")
    if draft_tokens.shape[0] != batch or k_plus_1 != window + 1:
        raise ValueError(
            f"shape mismatch: target_logits {tuple(target_logits.shape)} must be (B, K+1, V) for "
            f"draft_tokens {tuple(draft_tokens.shape)} = (B, K)"
        )
    if vocab < 1:
        raise ValueError(f"vocabulary size must be >= 1, got target_logits {tuple(target_logits.shape)}")
    if draft_tokens.device != target_logits.device:
        raise ValueError(
            f"draft_tokens is on {draft_tokens.device} but target_logits is on {target_logits.device}"
        )
    # A value check needs a device sync on accelerators; do it where it is free.
    if draft_tokens.device.type == "cpu" and draft_tokens.numel() > 0:
        lo, hi = int(draft_tokens.min()), int(draft_tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"draft_tokens must lie in [0, {vocab}), got values in [{lo}, {hi}]")
    return batch, window, vocab


def _check_sampling_inputs(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    temperature: float,
    uniforms: torch.Tensor | None,
    residual_uniforms: torch.Tensor | None,
) -> tuple[int, int, int]:
    batch, window, vocab = _check_logits_and_tokens(target_logits, draft_tokens)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for speculative sampling, got {temperature}")
    if draft_probs is None:
        raise ValueError("draft_probs (B, K, V) is required for speculative sampling")
    if draft_probs.shape != (batch, window, vocab):
        raise ValueError(
            f"draft_probs must have shape (B, K, V) = {(batch, window, vocab)}, got {tuple(draft_probs.shape)}"
        )
    if not draft_probs.is_floating_point():
        raise ValueError(f"draft_probs must be a floating tensor, got {draft_probs.dtype}")
    if draft_probs.device != target_logits.device:
        raise ValueError(
            f"draft_probs is on {draft_probs.device} but target_logits is on {target_logits.device}"
        )
    for name, value, shape in (
        ("uniforms", uniforms, (batch, window)),
        ("residual_uniforms", residual_uniforms, (batch,)),
    ):
        if value is None:
            continue
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.device != target_logits.device:
            raise ValueError(f"{name} is on {value.device} but target_logits is on {target_logits.device}")
    return batch, window, vocab


def draw_uniforms(
    batch: int,
    window: int,
    device: torch.device | str,
    uniforms: torch.Tensor | None = None,
    residual_uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return fp32 (B, K) accept uniforms and (B,) residual uniforms, drawing the missing ones.

    Draw order is fixed (accept uniforms first), so every backend gets the same draws from a generator.
    """
    if uniforms is None:
        uniforms = torch.rand((batch, window), generator=generator, device=device)
    if residual_uniforms is None:
        residual_uniforms = torch.rand((batch,), generator=generator, device=device)
    return uniforms.to(torch.float32), residual_uniforms.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# verification


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> VerifyResult:
    """Greedy verification: accept draft token j iff it equals argmax of target row j (first max on ties).

    target_logits: (B, K+1, V), any float dtype (logits assumed free of NaN). draft_tokens: (B, K) int.
    """
    _check_logits_and_tokens(target_logits, draft_tokens)
    window = draft_tokens.shape[1]
    argmax = target_logits.argmax(dim=-1)  # (B, K+1)
    match = argmax[:, :window] == draft_tokens.long()
    accepted = match.long().cumprod(dim=-1).sum(dim=-1)
    next_token = argmax.gather(1, accepted.unsqueeze(1)).squeeze(1)
    return VerifyResult(accepted=accepted, next_token=next_token)


def _target_probs(target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 softmax(logits / T) with the documented op order (multiply by 1/T, max, exp, sum, divide)."""
    z = target_logits.float() * (1.0 / temperature)
    e = torch.exp(z - z.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def _inverse_cdf(dist: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Smallest i with cumsum(dist)[i] > u * sum(dist) (fp64 accumulation) among tokens with dist > 0."""
    c = torch.cumsum(dist.double(), dim=-1)
    t = u.double() * c[:, -1]
    positive = dist > 0
    hit = (c > t.unsqueeze(1)) & positive
    vocab = dist.shape[-1]
    index = torch.arange(vocab, device=dist.device)
    first_hit = torch.where(hit, index, vocab).amin(dim=-1)
    last_positive = torch.where(positive, index, -1).amax(dim=-1)
    return torch.where(first_hit < vocab, first_hit, last_positive)


def verify_sampling(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    temperature: float = 1.0,
    uniforms: torch.Tensor | None = None,
    residual_uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Lossless speculative sampling (Leviathan et al. / Chen et al.), vectorised over windows.

    target_logits: (B, K+1, V). draft_tokens: (B, K), sampled from draft_probs (B, K, V), the drafter's
    distribution over the full vocabulary. uniforms (B, K) decide acceptance (accept iff u < p/q);
    residual_uniforms (B,) draw the extra token by inverse CDF. Missing draws come from ``torch.rand``
    with ``generator`` (accept uniforms first). The emitted tokens are distributed exactly as the target's.
    """
    batch, window, _ = _check_sampling_inputs(
        target_logits, draft_tokens, draft_probs, temperature, uniforms, residual_uniforms
    )
    uniforms, residual_uniforms = draw_uniforms(
        batch, window, target_logits.device, uniforms, residual_uniforms, generator
    )
    tokens = draft_tokens.long()
    p = _target_probs(target_logits, temperature)  # (B, K+1, V)
    q = draft_probs.float()
    p_x = p[:, :window].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    q_x = q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    accept = uniforms < p_x / q_x
    accepted = accept.long().cumprod(dim=-1).sum(dim=-1)  # (B,)

    rows = torch.arange(batch, device=p.device)
    p_k = p[rows, accepted]  # (B, V)
    has_q = (accepted < window).unsqueeze(1)  # the bonus position has no draft distribution (q = 0)
    q_k = torch.where(has_q, q[rows, accepted.clamp(max=window - 1)], 0.0)
    dist = torch.clamp_min(p_k - q_k, 0.0)
    empty = ~(dist > 0).any(dim=-1, keepdim=True)
    dist = torch.where(empty, p_k, dist)
    next_token = _inverse_cdf(dist, residual_uniforms)
    return VerifyResult(accepted=accepted, next_token=next_token)
