"""Acceptance metrics, in one place: tau, per-position acceptance, their summary, the paired tau difference.

Definitions: docs/metrics.md, whose wording of tau is the one every other docstring refers to. A
verification round (one window of up to K draft tokens) accepts k tokens, 0 <= k <= K, and the target always
adds one more, so:

* tau = tokens produced per target verification forward = mean(k + 1) over windows (`acceptance_length`);
  in real decoding, generated tokens / verification forwards (`SpeculativeOutput.tau`);
* alpha_j = P(draft token j accepted | tokens 1..j-1 accepted) = #(k >= j) / #(k >= j-1)
  (`per_position_acceptance`); rounds that verified fewer than j tokens (a window capped at max_length)
  do not count at position j;
* 1 + sum_k prod_{i<=k} alpha_i equals mean(k + 1) over the same windows (`simulated_tau`).

Positions no round reached have no alpha. `per_position_acceptance` reports them as 0 (they contribute
nothing to `simulated_tau`); a report that wants to show "no data" asks for NaN with `unreached=nan`.
"""

from __future__ import annotations

import math

import torch

# The one wording of tau and alpha_j that model cards and evaluation reports print (docs/metrics.md says it at
# length).
TAU_DEFINITION = (
    "tau = generated tokens / target verification forwards (prefill excluded): the mean number of tokens one "
    "target forward yields, counting the token the target always adds (so tau = 1 + mean accepted draft tokens)"
)
ALPHA_DEFINITION = "alpha_j = P(draft token j accepted | draft tokens 1..j-1 accepted)"

__all__ = [
    "ALPHA_DEFINITION",
    "TAU_DEFINITION",
    "acceptance_length",
    "acceptance_metrics",
    "accepted_length_histogram",
    "paired_tau_difference",
    "per_position_acceptance",
    "simulated_tau",
]


def _check_accepted(accepted: torch.Tensor, allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(accepted, torch.Tensor):
        accepted = torch.as_tensor(accepted, dtype=torch.long)
    if accepted.numel() == 0 and not allow_empty:
        raise ValueError("accepted is empty: need at least one verified window")
    if accepted.is_floating_point() or accepted.dtype == torch.bool:
        raise ValueError(f"accepted must be an integer tensor, got {accepted.dtype}")
    return accepted.reshape(-1).long()


def acceptance_length(accepted: torch.Tensor) -> float:
    """tau (docs/metrics.md) over windows: mean(k + 1). k may also be an expected accepted length (float),
    e.g. from `teacher_forced_expected_acceptance`."""
    accepted = torch.as_tensor(accepted).reshape(-1)
    if accepted.numel() == 0:
        raise ValueError("accepted is empty: need at least one verified window")
    return float((accepted.double() + 1).mean())


def per_position_acceptance(
    accepted: torch.Tensor,
    num_draft_tokens: int,
    window_sizes: torch.Tensor | None = None,
    unreached: float = 0.0,
) -> torch.Tensor:
    """alpha_j for j = 1..K as a (K,) float64 tensor: #(k >= j) / #(k >= j-1) over the rounds.

    Args:
        accepted: k per round, integers in [0, K].
        num_draft_tokens: K.
        window_sizes: draft tokens each round verified (default: K for every round); a round with w < j
            does not count at position j.
        unreached: the value where no round reached position j (0, or NaN for a report).
    """
    accepted = _check_accepted(accepted, allow_empty=True)
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens (K) must be >= 1, got {num_draft_tokens}")
    if accepted.numel() and (int(accepted.min()) < 0 or int(accepted.max()) > num_draft_tokens):
        raise ValueError(
            f"accepted values must lie in [0, {num_draft_tokens}], got "
            f"[{int(accepted.min())}, {int(accepted.max())}]"
        )
    positions = torch.arange(1, num_draft_tokens + 1, device=accepted.device)
    counted = torch.ones(accepted.numel(), num_draft_tokens, dtype=torch.bool, device=accepted.device)
    if window_sizes is not None:
        window_sizes = torch.as_tensor(window_sizes, device=accepted.device).reshape(-1).long()
        if window_sizes.shape != accepted.shape:
            raise ValueError(
                f"window_sizes {tuple(window_sizes.shape)} do not match accepted {tuple(accepted.shape)}"
            )
        counted = window_sizes[:, None] >= positions
    reached = counted & (accepted[:, None] >= positions - 1)  # rounds that got to try position j
    passed = reached & (accepted[:, None] >= positions)
    den, num = reached.sum(0).double(), passed.sum(0).double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, unreached))


def simulated_tau(alpha: torch.Tensor) -> float:
    """tau implied by per-position acceptance: 1 + sum_k prod_{i<=k} alpha_i."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
    if alpha.numel() == 0:
        raise ValueError("alpha is empty")
    return float(1.0 + torch.cumprod(alpha, dim=0).sum())


def accepted_length_histogram(accepted: torch.Tensor, num_draft_tokens: int) -> list[int]:
    """Counts of k = 0..K over rounds."""
    accepted = torch.as_tensor(accepted).reshape(-1).long()
    return torch.bincount(accepted.clamp(0, num_draft_tokens), minlength=num_draft_tokens + 1).tolist()


def acceptance_metrics(accepted: torch.Tensor, window_size: int) -> dict[str, float]:
    """Summary of per-window k (e.g. from `dataset_acceptance`): `tau` (`acceptance_length`),
    `mean_accepted`, `windows` and `alpha_1..alpha_K` (per-position acceptance)."""
    alpha = per_position_acceptance(accepted, window_size)
    metrics = {
        "tau": acceptance_length(accepted),
        "mean_accepted": float(accepted.float().mean()),
        "windows": accepted.numel(),
    }
    metrics.update({f"alpha_{j + 1}": float(a) for j, a in enumerate(alpha)})
    return metrics


def paired_tau_difference(
    k_new: torch.Tensor, k_old: torch.Tensor, rows: torch.Tensor
) -> tuple[float, float]:
    """tau(new) - tau(old) over the same windows, and its standard error clustered by sequence.

    Both drafters are scored on identical windows, so the difference is far less noisy than either tau;
    windows of one sequence are correlated, so the error treats sequences, not windows, as the samples
    (the standard error of a ratio estimator over clusters).
    """
    if not k_new.shape == k_old.shape == rows.shape:
        raise ValueError("paired comparison needs k of both drafters on the same windows")
    diff = (k_new - k_old).double()
    delta = float(diff.mean())
    _, cluster = torch.unique(rows, return_inverse=True)
    n = int(cluster.max()) + 1
    residual = torch.zeros(n, dtype=torch.float64).index_add_(0, cluster, diff - delta)
    se = math.sqrt(n / max(n - 1, 1) * float(residual.square().sum())) / diff.numel()
    return delta, se


def format_number(value, digits: int = 3) -> str:
    """A metric for a table or card: '-' for a missing value or NaN (nothing was measured there)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)
