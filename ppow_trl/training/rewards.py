"""PPOW window rewards as TRL reward functions, with a registry so YAML can name them.

A reward function has TRL's form `f(prompts, completions, completion_ids, **kwargs) -> list[float]`
with one entry per drafted window. `PPOWTrainer` passes, per window:
    prompts: window ids "<dataset index>:<anchor row>";
    completions / completion_ids: the drafted window as text / target token ids;
    accepted_lengths: k, tokens accepted before the first rejection (0..K);
    window_size: K; gamma: drafter step cost relative to one verification;
    proximity_delta: Delta = sum_j [log P(y_j | x, y_<j) - log P(yhat_j | x, yhat_<j)] (target's greedy
        window y vs drafted window yhat, both scored by the target); inf where y is unknown (the window's
        anchor is not on the target's greedy path, e.g. corpus text); None when not computed. With
        `proximity_span="first_token"` the sum has the first token only (Delta_1, always finite);
    proximity_eta / proximity_eps: the proximity reward's parameters.
Users add their own with `register_reward("name")` or by passing callables to the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RewardFunc = Callable[..., list[float]]
REWARD_REGISTRY: dict[str, RewardFunc] = {}


def register_reward(name: str) -> Callable[[RewardFunc], RewardFunc]:
    def decorator(func: RewardFunc) -> RewardFunc:
        REWARD_REGISTRY[name] = func
        return func

    return decorator


def get_reward_funcs(names: list[str]) -> list[RewardFunc]:
    unknown = [n for n in names if n not in REWARD_REGISTRY]
    if unknown:
        raise ValueError(f"unknown reward function(s) {unknown}; registered: {sorted(REWARD_REGISTRY)}")
    return [REWARD_REGISTRY[n] for n in names]


def speedup_value(k: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_speed(k) = k / (k * gamma + 1): tokens gained per unit of (drafting + verification) cost."""
    k = k.float()
    return k / (k * gamma + 1.0)


def proximity_value(k: torch.Tensor, delta: torch.Tensor, eta: float, eps: float) -> torch.Tensor:
    """R_prox = eta * 1[Delta < eps], only for windows rejected at the first token (k = 0)."""
    return eta * ((k == 0) & (delta < eps)).float()


@register_reward("cost_aware_speedup")
def cost_aware_speedup_reward(
    prompts, completions, completion_ids, accepted_lengths, gamma, **kwargs
) -> list[float]:
    """PPOW's cost-aware speedup reward k / (k * gamma + 1)."""
    return speedup_value(torch.as_tensor(accepted_lengths), gamma).tolist()


@register_reward("proximity")
def proximity_reward(
    prompts,
    completions,
    completion_ids,
    accepted_lengths,
    proximity_delta,
    proximity_eta,
    proximity_eps,
    **kwargs,
) -> list[float]:
    """PPOW's distribution-based proximity reward for near misses (k = 0 and Delta < eps)."""
    if proximity_delta is None:
        raise ValueError(
            "proximity reward needs the target's log-probs along drafted windows (proximity_delta)"
        )
    k = torch.as_tensor(accepted_lengths)
    return proximity_value(k, torch.as_tensor(proximity_delta), proximity_eta, proximity_eps).tolist()
