"""Draft windows with a drafter: batched at many anchors (training) and chain drafting (decoding).

Conventions (EAGLE3_NOTES.md §0): drafter row p pairs the target feature at position p with token
x_{p+1} and predicts x_{p+2}. A window drafted at *anchor row* r continues the prefix x_0..x_{r+1}:
its K tokens stand for positions r+2 .. r+K+1. In decoding, with tokens x_0..x_n known and target
features for positions 0..n-1, the anchor is the last committed row r = n-1.

`draft_windows` drafts G windows at each of A anchors of every sequence in K drafter passes: pass 0
runs over all rows once (the committed context), passes 1..K-1 run only over the A*G window rows,
each attending to the context up to its anchor plus its own earlier draft steps (training-time-test
attention). `ChainDrafter` does the same one row at a time with a KV cache of committed rows; the
two agree (tests/test_drafting.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ppow_trl.models.common import unwrap_drafter
from ppow_trl.models.eagle3 import Eagle3Drafter
from ppow_trl.models.medusa import MedusaDrafter


@dataclass
class DraftWindows(ModelOutput):
    """Windows drafted at anchors; shapes (B, A, G, K[, V_d]).

    tokens: drafted (or scored, when forced) token ids in the *target* vocabulary.
    draft_ids: the same tokens as draft-vocabulary ids (-1 where a forced token is outside it).
    logprobs: log q of each token under the drafter at the drafting temperature (temperature 1 for
        greedy drafting); -inf for forced tokens outside the draft vocabulary.
    logits: raw draft-vocabulary logits per position, when requested.
    """

    tokens: torch.Tensor | None = None
    draft_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def shift_left(input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Row tokens: row p carries x_{p+1}; the last row gets `pad_id`."""
    return torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], pad_id)], dim=1)


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """RoPE positions that skip (left or right) padding: 0 at each sequence's first real token."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def causal_context_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: row t sees rows s <= t that are real tokens (and always itself)."""
    t = valid.shape[1]
    idx = torch.arange(t, device=valid.device)
    causal = idx[None, :] <= idx[:, None]
    return (causal[None] & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=valid.device)


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


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Draft ids from logits (..., V_d): argmax at temperature 0, else a sample at `temperature`."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log q(id) at the drafting temperature (1 for greedy), without materialising a log-softmax."""
    scaled = logits.float()
    if temperature > 0 and temperature != 1.0:
        scaled = scaled / temperature
    return scaled.gather(-1, ids.clamp(min=0)[..., None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def draft_windows(
    drafter: PreTrainedModel,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    window_size: int,
    num_windows: int = 1,
    temperature: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    return_logits: bool = False,
    generator: torch.Generator | None = None,
) -> DraftWindows:
    """Draft `num_windows` (G) windows of `window_size` (K) tokens at every anchor row, batched.

    Args:
        drafter: an `Eagle3Drafter` or `MedusaDrafter` (peft/DDP wrappers are unwrapped).
        features: the target feature the drafter reads (`getattr(target_features, drafter.feature_name)`),
            (B, T, F) aligned with `input_ids`.
        input_ids: (B, T) token ids; attention_mask: (B, T) 1 for real tokens (left or right padding).
        anchors: (B, A) anchor rows r (the window continues x_0..x_{r+1}).
        tokens: (B, A, G, K) target ids to score instead of sampling (teacher forcing / recomputing
            log-probs of windows drafted earlier). Gradients flow when grad is enabled.
    """
    if window_size < 1:
        raise ValueError(f"window_size (K) must be >= 1, got {window_size}")
    if num_windows < 1:
        raise ValueError(f"num_windows (G) must be >= 1, got {num_windows}")
    model = unwrap_drafter(drafter)
    if model is not drafter:
        # DDP / FSDP / DeepSpeed / peft wrappers must see the call (gradient sync, adapters): go through
        # their forward, which lands in the drafter's forward and back here with the bare model.
        return drafter(
            features=features,
            input_ids=input_ids,
            anchors=anchors,
            window_size=window_size,
            num_windows=num_windows,
            temperature=temperature,
            attention_mask=attention_mask,
            tokens=tokens,
            return_logits=return_logits,
            generator=generator,
        )
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if isinstance(model, MedusaDrafter):
        step_logits = _medusa_logits(model, features, anchors, window_size, num_windows)
        draft_ids = _forced_or_sampled(model, step_logits, tokens, temperature, generator)
        logits = step_logits
    elif isinstance(model, Eagle3Drafter):
        logits, draft_ids = _eagle3_windows(
            model,
            features,
            input_ids,
            valid,
            anchors,
            window_size,
            num_windows,
            temperature,
            tokens,
            generator,
        )
    else:
        raise TypeError(f"unsupported drafter type {type(model).__name__}")
    logprobs = _token_logprobs(logits, draft_ids, temperature).masked_fill(draft_ids < 0, float("-inf"))
    out_tokens = tokens if tokens is not None else model.draft_to_target(draft_ids)
    return DraftWindows(out_tokens, draft_ids, logprobs, logits if return_logits else None)


def _forced_or_sampled(model, logits, tokens, temperature, generator) -> torch.Tensor:
    if tokens is not None:
        return model.target_to_draft(tokens)
    with torch.no_grad():
        return _pick(logits, temperature, generator)


def _medusa_logits(model: MedusaDrafter, features, anchors, window_size, num_windows) -> torch.Tensor:
    hidden = features.gather(1, anchors[..., None].expand(-1, -1, features.shape[-1]))  # (B, A, H)
    logits = model.head_logits(hidden, window_size)  # (B, A, K, V_d)
    return logits[:, :, None].expand(-1, -1, num_windows, -1, -1)


def _eagle3_windows(
    model: Eagle3Drafter, features, input_ids, valid, anchors, k_len, g, temperature, tokens, generator
):
    b, a = anchors.shape
    positions = positions_from_mask(valid)
    # Pass 0 over every row: the committed context every window attends to.
    out0, k0, v0 = model.step(
        shift_left(input_ids), model.project_features(features), positions, None, causal_context_mask(valid)
    )
    rows = anchors.repeat_interleave(g, dim=1)  # (B, N = A*G)
    hidden = out0.gather(1, rows[..., None].expand(-1, -1, out0.shape[-1]))
    row_pos = positions.gather(1, rows)
    context_mask = (torch.arange(input_ids.shape[1], device=rows.device) <= rows[..., None]) & valid[
        :, None, :
    ]
    forced = None if tokens is None else tokens.reshape(b, a * g, k_len)
    logits, ids = _eagle3_unroll(
        model, hidden, row_pos, (k0, v0), context_mask, k_len, temperature, forced, generator
    )
    shape = (b, a, g, k_len)
    return logits.view(*shape, -1), ids.view(shape)


def _eagle3_unroll(model, hidden, row_pos, context, context_mask, k_len, temperature, forced, generator):
    """K draft steps for N rows whose step-0 output is `hidden` (B, N, H): step j feeds back the previous
    pre-norm output and token at position row_pos + j, seeing `context` through `context_mask` (B, N, S)
    and its own earlier steps. Returns (logits (B, N, K, V_d), draft ids (B, N, K))."""
    all_logits, all_ids, diagonal, prev = [], [], None, None
    for j in range(k_len):
        if j > 0:
            hidden, k, v = model.step(
                prev, hidden, row_pos + j, context, context_mask, diagonal, append_to_context=False
            )
            k, v = k.unsqueeze(3), v.unsqueeze(3)
            diagonal = (
                (k, v)
                if diagonal is None
                else (torch.cat([diagonal[0], k], 3), torch.cat([diagonal[1], v], 3))
            )
        logits = model.draft_logits(hidden)
        ids = _forced_or_sampled(
            model, logits, None if forced is None else forced[..., j], temperature, generator
        )
        prev = forced[..., j] if forced is not None else model.draft_to_target(ids)
        all_logits.append(logits)
        all_ids.append(ids)
    return torch.stack(all_logits, 2), torch.stack(all_ids, 2)


class ChainDrafter:
    """Chain drafting for decoding: one window of K tokens per sequence from the last committed row.

    Call `commit` with the target features of newly verified positions (and the token that follows
    each), then `draft(K)`. Draft steps never enter the cache: only rows computed from true target
    features are committed. Works for a batch with ragged lengths through the `valid` flags.
    """

    def __init__(
        self, drafter: PreTrainedModel, temperature: float = 0.0, generator: torch.Generator | None = None
    ):
        self.model = unwrap_drafter(drafter)
        if not isinstance(self.model, Eagle3Drafter | MedusaDrafter):
            raise TypeError(f"unsupported drafter type {type(self.model).__name__}")
        self.temperature = temperature
        self.generator = generator
        self.reset()

    def reset(self) -> None:
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cache_valid: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None  # (B, H) output of the last committed row
        self.last_position: torch.Tensor | None = None  # (B,)

    @property
    def num_committed(self) -> int:
        return 0 if self.cache_valid is None else self.cache_valid.shape[1]

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
        if isinstance(self.model, MedusaDrafter):
            out = features
        else:
            cache_valid = valid if self.cache_valid is None else torch.cat([self.cache_valid, valid], dim=1)
            new_mask = causal_context_mask(valid)
            if self.cache_valid is not None:
                old = self.cache_valid[:, None, :].expand(-1, valid.shape[1], -1)
                new_mask = torch.cat([old, new_mask], dim=2)
            out, k, v = self.model.step(
                next_tokens, self.model.project_features(features), position_ids, self.cache, new_mask
            )
            self.cache = (
                (k, v)
                if self.cache is None
                else (torch.cat([self.cache[0], k], 2), torch.cat([self.cache[1], v], 2))
            )
            self.cache_valid = cache_valid
        # Last real row of the new block per sequence (sequences without one keep their old state).
        n = valid.shape[1]
        last = n - 1 - valid.flip(1).long().argmax(1)
        has_new = valid.any(1)
        batch = torch.arange(valid.shape[0], device=valid.device)
        new_hidden, new_pos = out[batch, last], position_ids[batch, last]
        if self.last_hidden is None:
            self.last_hidden, self.last_position = new_hidden, new_pos
        else:
            self.last_hidden = torch.where(has_new[:, None], new_hidden, self.last_hidden)
            self.last_position = torch.where(has_new, new_pos, self.last_position)

    @torch.no_grad()
    def draft(self, window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (tokens (B, K) target ids, draft_probs (B, K, V_d)): the distribution each token was
        drawn from at the drafting temperature (one-hot at temperature 0)."""
        if window_size < 1:
            raise ValueError(f"window_size (K) must be >= 1, got {window_size}")
        if self.last_hidden is None:
            raise RuntimeError("commit() target features before drafting")
        if isinstance(self.model, MedusaDrafter):
            logits = self.model.head_logits(self.last_hidden, window_size)  # (B, K, V_d)
            ids = _pick(logits, self.temperature, self.generator)
        else:
            logits, ids = _eagle3_unroll(
                self.model,
                self.last_hidden[:, None],
                self.last_position[:, None],
                self.cache,
                self.cache_valid[:, None, :],
                window_size,
                self.temperature,
                None,
                self.generator,
            )
            logits, ids = logits[:, 0], ids[:, 0]
        return self.model.draft_to_target(ids), self._probs(logits, ids)

    def _probs(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return torch.nn.functional.one_hot(ids, logits.shape[-1]).to(torch.float32)
        return torch.softmax(logits.float() / self.temperature, dim=-1)
