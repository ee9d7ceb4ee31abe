"""Draft windows with a drafter: batched at many anchors (training) and chain drafting (decoding).

Conventions (docs/eagle3.md): drafter row p pairs the target feature at position p with token x_{p+1} and
predicts x_{p+2}. A window drafted at *anchor row* r continues the prefix x_0..x_{r+1}: its K tokens stand
for positions r+2 .. r+K+1. In decoding, with tokens x_0..x_n known and target features for positions
0..n-1, the anchor is the last committed row r = n-1.

`draft_windows` drafts G windows at each of A anchors of every sequence in K drafter passes (the drafter's
`window_logits`: pass 0 over all rows once, passes 1..K-1 over the A*G window rows only, training-time-test
attention). `ChainDrafter` does the same one row at a time with the drafter's cache of committed rows
(`commit_rows`, `chain_logits`); the two agree (tests/test_drafting.py). The drafter classes own the
per-architecture work; this module only orchestrates it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from ppow_trl.models.common import ChainState, DrafterMixin, DraftWindows, unwrap_drafter

__all__ = ["ChainDrafter", "DraftWindows", "draft_windows", "window_targets"]


def window_targets(
    input_ids: torch.Tensor, anchors: torch.Tensor, window_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence's own tokens at a window's positions: x_{r+2} .. x_{r+K+1} for anchor row r.

    Returns (tokens (B, A, K), in_range (B, A, K) bool); out-of-range tokens are 0.
    """
    t = input_ids.shape[1]
    pos = anchors[..., None] + 2 + torch.arange(window_size, device=anchors.device)
    in_range = pos < t
    tokens = input_ids.gather(1, pos.clamp(max=t - 1).flatten(1)).view_as(pos)
    return tokens.masked_fill(~in_range, 0), in_range


def _check_drafter(drafter: torch.nn.Module) -> DrafterMixin:
    model = unwrap_drafter(drafter)
    if not isinstance(model, DrafterMixin):
        raise TypeError(f"unsupported drafter type {type(model).__name__}")
    return model


def draft_windows(
    drafter: PreTrainedModel,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    window_size: int,
    **options: Any,
) -> DraftWindows:
    """Draft `num_windows` (G) windows of `window_size` (K) tokens at every anchor row, batched.

    Args:
        drafter: an `Eagle3Drafter` or `MedusaDrafter`, bare or inside a peft/DDP wrapper (the call goes
            through the wrapper's forward, so adapters apply and gradients synchronise).
        features: the target feature the drafter reads (`getattr(target_features, drafter.feature_name)`),
            (B, T, F) aligned with `input_ids`.
        input_ids: (B, T) token ids.
        anchors: (B, A) anchor rows r (the window continues x_0..x_{r+1}).
        options: keyword arguments of the drafter's forward (`DrafterMixin.forward`): `num_windows` (G),
            `temperature`, `attention_mask` ((B, T) 1 for real tokens, left or right padding), `tokens`
            ((B, A, G, K) target ids to score instead of sampling: teacher forcing, or recomputing
            log-probs of windows drafted earlier; gradients flow when grad is enabled), `return_logits`,
            `generator`.
    """
    _check_drafter(drafter)
    return drafter(
        features=features, input_ids=input_ids, anchors=anchors, window_size=window_size, **options
    )


class ChainDrafter:
    """Chain drafting for decoding: one window of K tokens per sequence from the last committed row.

    Call `commit` with the target features of newly verified positions (and the token that follows
    each), then `draft(K)`. Draft steps never enter the cache: only rows computed from true target
    features are committed. Works for a batch with ragged lengths through the `valid` flags.
    """

    def __init__(
        self, drafter: PreTrainedModel, temperature: float = 0.0, generator: torch.Generator | None = None
    ):
        self.model = _check_drafter(drafter)
        self.temperature = temperature
        self.generator = generator
        self.reset()

    def reset(self) -> None:
        self.state = ChainState()
        self.queued: list[tuple[torch.Tensor, ...]] = []  # verified blocks not yet committed (`enqueue`)

    @property
    def last_hidden(self) -> torch.Tensor | None:
        """(B, H) output of each sequence's last committed row."""
        return self.state.last_hidden

    @property
    def num_committed(self) -> int:
        return 0 if self.state.cache_valid is None else self.state.cache_valid.shape[1]

    @torch.no_grad()
    def commit(
        self,
        features: torch.Tensor,
        next_tokens: torch.Tensor,
        position_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Append rows: features (B, n, F) of target positions p, next_tokens (B, n) = x_{p+1},
        position_ids (B, n) = p, valid (B, n) bool (False rows are padding and ignored)."""
        valid = torch.ones_like(next_tokens, dtype=torch.bool) if valid is None else valid.bool()
        out = self.model.commit_rows(self.state, features, next_tokens, position_ids, valid)
        # Last real row of the new block per sequence (sequences without one keep their old state).
        n = valid.shape[1]
        last = n - 1 - valid.flip(1).long().argmax(1)
        has_new = valid.any(1)
        batch = torch.arange(valid.shape[0], device=valid.device)
        new_hidden, new_pos = out[batch, last], position_ids[batch, last]
        state = self.state
        if state.last_hidden is None:
            state.last_hidden, state.last_position = new_hidden, new_pos
        else:
            state.last_hidden = torch.where(has_new[:, None], new_hidden, state.last_hidden)
            state.last_position = torch.where(has_new, new_pos, state.last_position)

    def enqueue(self, *block: torch.Tensor) -> None:
        """Queue a block of verified rows (`commit`'s four arguments, `valid` included) for `commit_queued`:
        decoding commits once, right before the next draft, so rounds that skip drafting cost the drafter
        nothing."""
        if len(block) != 4:
            raise TypeError("enqueue takes features, next_tokens, position_ids and valid")
        self.queued.append(block)

    def commit_queued(self, clock: Callable[[], float] | None = None) -> float:
        """Commit every queued block in one call. Returns the seconds on `clock` (0 without one) beyond one
        block's share: the work this drafting round did for the rounds before it that skipped drafting, which
        a per-round cost must not be charged with."""
        if not self.queued:
            return 0.0
        blocks = len(self.queued)
        start = clock() if clock else 0.0
        self.commit(*(torch.cat(parts, dim=1) for parts in zip(*self.queued)))
        self.queued.clear()
        return (clock() - start) * (1 - 1 / blocks) if clock else 0.0

    @torch.no_grad()
    def draft(self, num_draft_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (tokens (B, K) target ids, draft_probs (B, K, V_d)): the distribution each token was
        drawn from at the drafting temperature (one-hot at temperature 0)."""
        if num_draft_tokens < 1:
            raise ValueError(f"window_size (K) must be >= 1, got {num_draft_tokens}")
        if self.state.last_hidden is None:
            raise RuntimeError("commit() target features before drafting")
        logits, ids = self.model.chain_logits(self.state, num_draft_tokens, self.temperature, self.generator)
        return self.model.draft_to_target(ids), self._probs(logits, ids)

    @torch.no_grad()
    def draft_steps(self, max_draft_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`draft` one step at a time, up to `max_draft_tokens`: yields (tokens (B,) target ids, draft_probs
        (B, V_d), logits (B, V_d)) of steps 1, 2, ...; a step is computed only when asked for (for drafters
        with a pass per step), so the caller can stop drafting on low confidence."""
        if max_draft_tokens < 1:
            raise ValueError(f"window_size (K) must be >= 1, got {max_draft_tokens}")
        if self.state.last_hidden is None:
            raise RuntimeError("commit() target features before drafting")
        for logits, ids in self.model.chain_steps(
            self.state, max_draft_tokens, self.temperature, self.generator
        ):
            yield self.model.draft_to_target(ids), self._probs(logits, ids), logits

    def _probs(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return torch.nn.functional.one_hot(ids, logits.shape[-1]).to(torch.float32)
        return torch.softmax(logits.float() / self.temperature, dim=-1)
