"""gamma, the cost of one drafter step relative to one target verification, measured on this hardware."""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache, PreTrainedModel

from ppow_trl.decoding.drafting import ChainDrafter
from ppow_trl.target import capture_features


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def measure_gamma(
    target: PreTrainedModel,
    drafter: PreTrainedModel,
    window_size: int,
    context_length: int = 128,
    repeats: int = 5,
) -> float:
    """gamma = (time of one drafter step) / (time of one target forward verifying K+1 tokens after a
    `context_length`-token prefix), both with KV caches, batch size 1, medians of `repeats` runs."""
    device = next(target.parameters()).device
    ids = torch.randint(0, target.config.vocab_size, (1, context_length + window_size + 1), device=device)
    prefix, window = ids[:, :context_length], ids[:, context_length:]
    cache = DynamicCache(config=target.config)
    features = capture_features(target, prefix, with_logits=False, cache=cache, use_cache=True)

    def verify() -> None:
        target(input_ids=window, cache=cache, use_cache=True)
        cache.crop(-window.shape[1])

    chain = ChainDrafter(drafter)
    chain.commit(
        getattr(features, chain.model.feature_name)[:, :-1],
        prefix[:, 1:],
        torch.arange(context_length - 1, device=device)[None],
    )
    draft_step = _median_seconds(lambda: chain.draft(window_size), repeats) / window_size
    return draft_step / _median_seconds(verify, repeats)
