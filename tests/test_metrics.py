"""Acceptance metrics: tau, per-position acceptance (with capped windows and unreached positions), the
accepted-length histogram, the paired tau difference."""

from __future__ import annotations

import math

import pytest
import torch

from ppow_trl.metrics import (
    acceptance_length,
    accepted_length_histogram,
    paired_tau_difference,
    per_position_acceptance,
    simulated_tau,
)

# ------------------------------------------------------------------------------------- tau and alpha


def test_metrics_on_hand_made_accept_lengths():
    accepted = torch.tensor([0, 1, 3, 3, 2])
    assert acceptance_length(accepted) == pytest.approx(2.8)  # mean(k + 1) = 14 / 5
    alpha = per_position_acceptance(accepted, 3)
    assert alpha.shape == (3,) and alpha.is_floating_point()
    assert alpha.tolist() == pytest.approx([4 / 5, 3 / 4, 2 / 3])
    assert simulated_tau(alpha) == pytest.approx(1 + 0.8 + 0.6 + 0.4)  # telescopes to the empirical tau


def test_metrics_edge_cases():
    alpha = per_position_acceptance(torch.tensor([0, 0]), 4)
    assert alpha.tolist() == [0.0, 0.0, 0.0, 0.0]  # no division by zero beyond position 1
    assert simulated_tau(alpha) == 1.0
    assert acceptance_length(torch.tensor([0, 0])) == 1.0
    full = torch.tensor([5, 5, 5])
    assert per_position_acceptance(full, 5).tolist() == [1.0] * 5
    assert simulated_tau(per_position_acceptance(full, 5)) == 6.0 == acceptance_length(full)
    assert per_position_acceptance(torch.tensor([2, 1]), 4).tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        acceptance_length(torch.tensor([], dtype=torch.long))
    assert acceptance_length(torch.tensor([0.5, 1.25])) == pytest.approx(1.875)  # expected k (sampling)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        per_position_acceptance(torch.tensor([4]), 3)


def test_simulated_tau_equals_empirical_tau():
    accepted = torch.randint(0, 11, (500,), generator=torch.Generator().manual_seed(1))
    assert simulated_tau(per_position_acceptance(accepted, 10)) == pytest.approx(acceptance_length(accepted))


def test_per_position_acceptance_with_window_sizes_and_histogram():
    accepted = torch.tensor([0, 1, 3, 2, 3, 0, 1])
    full = torch.full_like(accepted, 3)
    with_sizes = per_position_acceptance(accepted, 3, window_sizes=full, unreached=math.nan)
    assert with_sizes.tolist() == pytest.approx(per_position_acceptance(accepted, 3).tolist())
    # A round capped at window 1 counts at position 1 only.
    alpha = per_position_acceptance(
        torch.tensor([1, 2]), 3, window_sizes=torch.tensor([1, 3]), unreached=math.nan
    )
    assert alpha[:2].tolist() == pytest.approx([1.0, 1.0]) and alpha[2] == 0.0
    assert accepted_length_histogram(accepted, 3) == [2, 2, 1, 2]


def test_paired_tau_difference_clusters_the_error_by_sequence():
    k_new = torch.tensor([1, 0, 1, 0])
    k_old = torch.tensor([0, 0, 0, 1])
    # Diffs [1, 0, 1, -1], mean 0.25. Sequence 0 holds three windows (residual sum 1.25), sequence 1 one
    # (residual -1.25): SE = sqrt(2/1 * (1.25^2 + 1.25^2)) / 4.
    delta, se = paired_tau_difference(k_new, k_old, torch.tensor([0, 0, 0, 1]))
    assert delta == 0.25 and abs(se - (2 * 2 * 1.25**2) ** 0.5 / 4) < 1e-12
    # Improvements spread evenly over sequences have no spread between them.
    assert (
        paired_tau_difference(torch.tensor([1, 0, 1, 0]), torch.zeros(4), torch.tensor([0, 0, 1, 1]))[1] == 0
    )
    with pytest.raises(ValueError, match="same windows"):
        paired_tau_difference(k_new, k_old[:3], torch.tensor([0, 0, 1]))
