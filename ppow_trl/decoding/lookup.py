"""Prompt lookup inside speculative decoding: the continuation of the latest earlier occurrence of a row's last
n-gram (as transformers' prompt lookup finds it, but the most recent match rather than the first) becomes one
more branch of the round's draft tree, verified in the same target forward as the drafter's tokens.

Free to propose (no drafter step) and nearly free to verify where a forward over a few more tokens costs about
what one token does (`ppow_trl.decoding.cost`); it wins on repetitive text (code, quoted numbers, names) where
the drafter is unsure.
"""

from __future__ import annotations

import torch

__all__ = ["lookup_continuation"]


def lookup_continuation(
    context: torch.Tensor, start: torch.Tensor, end: torch.Tensor, num_tokens: int, max_ngram: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the `num_tokens` tokens that followed the most recent earlier occurrence of the row's last n-gram,
    for the longest n <= `max_ngram` that occurs; vectorised over rows and positions.

    Args:
        context: (B, T) token ids; row b's real tokens are context[b, start[b]:end[b]] (left padding before
            `start`, anything after `end`).
        start, end: (B,) int64 bounds of each row's tokens (end exclusive).
        num_tokens: m, the longest continuation returned.
        max_ngram: the longest n-gram matched (down to 1).

    Returns:
        (tokens (B, m) ids, 0 where invalid; valid (B, m) bool). A continuation stops at the row's end, and a row
        without any match has no valid token.
    """
    if num_tokens < 1 or max_ngram < 1:
        raise ValueError(f"num_tokens and max_ngram must be >= 1, got {num_tokens} and {max_ngram}")
    batch, length = context.shape
    device = context.device
    found = torch.full(
        (batch,), -1, dtype=torch.long, device=device
    )  # index of the continuation's first token
    for n in range(min(max_ngram, length - 1), 0, -1):  # at most max_ngram passes, each vectorised
        last = end[:, None] - n + torch.arange(n, device=device)
        key = context.gather(1, last.clamp(min=0))
        windows = context.unfold(1, n, 1)  # (B, T - n + 1, n): windows[b, s] = context[b, s:s + n]
        begin = torch.arange(windows.shape[1], device=device)
        # a match lies inside the row's tokens and ends before the row's last token, so something follows it
        inside = (begin[None] >= start[:, None]) & (begin[None] + n < end[:, None])
        match = (windows == key[:, None]).all(-1) & inside & (end - n >= start)[:, None]
        latest = torch.where(match, begin[None], -1).max(1).values
        found = torch.where((found < 0) & (latest >= 0), latest + n, found)
    index = found[:, None] + torch.arange(num_tokens, device=device)
    valid = (found[:, None] >= 0) & (index < end[:, None])
    tokens = context.gather(1, index.clamp(0, length - 1))
    return tokens.masked_fill(~valid, 0), valid
