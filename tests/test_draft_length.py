"""Draft length per round: the pure window functions, the policy a decoding loop runs, and packed linears."""

from __future__ import annotations

import pytest
import torch

from ppow_trl.decoding.draft_length import (
    DraftLengthPolicy,
    _solve_calibration,
    best_window,
    expected_tokens,
    round_costs,
    threshold_window,
    top_probability,
    verify_cost,
)
from ppow_trl.packed import packed_linears, packing_supported, use_packed_linears

COSTS = [1.0, 1.05, 1.1, 1.12, 1.15, 1.2, 1.3, 1.4, 1.5]  # c(n) for n = 1..9, plain step = 1


def test_expected_tokens_and_costs():
    p = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(
        expected_tokens(p), torch.tensor([[1.0, 1.5, 1.75, 1.875], [1.0, 2.0, 2.0, 2.0]])
    )
    assert verify_cost(COSTS, 3) == 1.1
    assert verify_cost(COSTS, 11) == pytest.approx(1.5 + 2 * 0.1)  # extrapolated with the last slope
    with pytest.raises(ValueError):
        verify_cost(COSTS, 0)
    torch.testing.assert_close(
        round_costs(COSTS, 0.1, 2), torch.tensor([1.0, 1.15, 1.3], dtype=torch.float64)
    )
    torch.testing.assert_close(
        round_costs(COSTS, 0.0, 1, rows=2), torch.tensor([1.05, 1.12], dtype=torch.float64)
    )


def test_best_window_useless_perfect_and_in_between():
    k = 6
    assert best_window(torch.zeros(k), COSTS, 0.05).item() == 0  # a useless drafter: a plain step
    assert best_window(torch.ones(k), COSTS, 0.05).item() == k  # a perfect one: the longest window
    # verification dearer per token than plain steps: even a perfect drafter does not pay
    steep = [1.0 + 1.2 * n for n in range(9)]
    assert best_window(torch.ones(k), steep, 0.05).item() == 0
    # cheap first tokens, then dear ones: a short window
    kinked = [1.0, 1.05, 1.1, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert best_window(torch.ones(k), kinked, 0.05).item() == 2
    # confidence falling off: a middle window, per row
    p = torch.tensor([[0.9, 0.9, 0.05, 0.9, 0.9, 0.9], [0.0] * 6])
    assert best_window(p, COSTS, 0.05).tolist() == [2, 0]


def test_threshold_window():
    p = torch.tensor([[0.9, 0.5, 0.3, 0.9], [0.1, 0.9, 0.9, 0.9], [0.5, 0.5, 0.5, 0.5]])
    assert threshold_window(p, 0.4).tolist() == [2, 0, 4]
    assert top_probability(torch.tensor([[0.0, 0.0], [10.0, -10.0]])).tolist() == pytest.approx([0.5, 1.0])


def _run_rounds(policy: DraftLengthPolicy, confidence: float, accept: float, rounds: int) -> list[int]:
    """Simulate a drafter whose steps all have this confidence and are accepted with this probability."""
    g = torch.Generator().manual_seed(0)
    windows = []
    for _ in range(rounds):
        window = 0
        if policy.start_round(1):
            for step in range(1, policy.max_window + 1):
                include, more = policy.include(torch.tensor([confidence]), step)
                window = step if include else window
                if not (include and more):
                    break
        accepted = 0
        while accepted < window and float(torch.rand(1, generator=g)) < accept:
            accepted += 1
        policy.end_round(window, torch.tensor([accepted]))
        windows.append(window)
    return windows


def test_policy_skips_a_useless_drafter_and_uses_a_perfect_one_fully():
    useless = _run_rounds(DraftLengthPolicy("auto", 6, COSTS, 0.05, 0.05, probe_every=16), 0.6, 0.0, 200)
    assert sum(w > 0 for w in useless[50:]) <= 150 / 16 + 1  # only the probes draft
    perfect = _run_rounds(DraftLengthPolicy("auto", 6, COSTS, 0.05, 0.05), 1.0, 1.0, 50)
    assert all(w == 6 for w in perfect)
    # an over-confident drafter is believed less once its windows are rejected
    policy = DraftLengthPolicy("auto", 6, COSTS, 0.05, 0.05)
    overconfident = _run_rounds(policy, 0.95, 0.3, 100)
    assert policy.calibration < 0.6 and sum(overconfident[-50:]) < 4 * 50
    # an under-confident drafter (says 0.15, accepted 0.6 per step) is believed more: a = 4 per step
    policy = DraftLengthPolicy("auto", 6, COSTS, 0.05, 0.05)
    underconfident = _run_rounds(policy, 0.15, 0.6, 200)
    assert 3.0 < policy.calibration <= 5.0 and sum(underconfident[-100:]) >= 2 * 100, policy.calibration
    # the factor solves sum_j a^j reach_j = observed (not the ratio of the sums once windows are longer)
    assert _solve_calibration([1.0, 0.1], 3 * 1.0 + 9 * 0.1) == pytest.approx(3.0)
    assert _solve_calibration([1.0, 0.5], 100.0) == 5.0 and _solve_calibration([1.0], 0.0) == 0.02
    # fixed threshold: the window is the leading steps at or above it
    assert _run_rounds(DraftLengthPolicy("threshold", 5, threshold=0.5), 0.7, 0.5, 3) == [5, 5, 5]
    assert _run_rounds(DraftLengthPolicy("threshold", 5, threshold=0.5), 0.3, 0.5, 3) == [0, 0, 0]


def test_policy_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        DraftLengthPolicy("sometimes")
    with pytest.raises(ValueError, match="maximum window"):
        DraftLengthPolicy("auto", 0)
    with pytest.raises(ValueError, match="threshold"):
        DraftLengthPolicy("threshold", 4, threshold=1.5)
    with pytest.raises(ValueError, match="positive"):
        DraftLengthPolicy("auto", 4, costs=[1.0, 0.0])


@pytest.mark.skipif(
    not packing_supported(torch.nn.Linear(2, 2)), reason="no oneDNN packed linear in this build"
)
def test_packed_linears_match_the_default_path_and_restore_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 320, bias=False)
    )
    model.eval().requires_grad_(False)
    x = torch.randn(2, 7, 64)
    reference = model(x)
    with packed_linears(model):
        assert "forward" in model[0].__dict__
        for rows in (1, 3, 7):
            torch.testing.assert_close(model(x[:, :rows]), reference[:, :rows], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            model[2].weight.mul_(2.0)  # a changed weight is repacked
        torch.testing.assert_close(model(x)[..., :5], 2 * reference[..., :5], rtol=1e-5, atol=1e-5)
    assert "forward" not in model[0].__dict__ and "forward" not in model[2].__dict__
    assert use_packed_linears(model, "auto") and not use_packed_linears(model, False)
    assert not use_packed_linears(model.double(), True)  # fp32 only
    with pytest.raises(ValueError):
        use_packed_linears(model, "yes")


def test_reprice_keeps_what_was_learned_and_probes_again():
    policy = DraftLengthPolicy("auto", 6, COSTS, draft_cost=0.6, commit_cost=0.05)
    skipped = _run_rounds(policy, 0.5, 0.5, 60)  # a step at 60% of a plain step: drafting rarely pays
    calibration = policy.calibration
    assert policy._skip_limit > 1 and sum(w > 0 for w in skipped[-30:]) < 10
    policy.reprice([2 * c for c in COSTS], draft_cost=0.1, commit_cost=0.1)  # any unit: normalised by c(1)
    assert policy.costs == pytest.approx(COSTS) and policy.draft_cost == pytest.approx(0.05)
    assert policy.calibration == calibration and policy._skip_limit == 1
    assert all(w > 0 for w in _run_rounds(policy, 0.5, 0.5, 30)[5:])


def test_auto_keeps_a_drafters_calibration_across_processes():
    """What "auto" learned about a drafter is on disk: a new process (no policy in memory) starts from it, and
    a drafter with other weights starts from the prior."""
    from ppow_trl.decoding import speculative
    from ppow_trl.decoding.cost import CostTable
    from tests.test_drafting import make_drafter
    from tests.test_speculative import build_varied_target, prompts

    target = build_varied_target(seed=3)
    drafter = make_drafter("eagle3", target)
    costs = CostTable([1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5, 1.6], draft_step=0.05, commit=0.02)
    speculative.speculative_generate(
        target, drafter, prompts((12,))[0], max_new_tokens=24, num_draft_tokens="auto", costs=costs
    )
    # the policy that call used (batch 1: padded forwards)
    learned = speculative.draft_length_policy(target, drafter, "auto", costs=costs, padded=True)
    assert learned.calibration != 1.0 and learned.store.is_file()
    speculative._LEARNED_POLICIES.clear()  # a new process
    again = speculative.draft_length_policy(target, drafter, "auto", costs=costs, padded=True)
    assert again is not learned and again.calibration == learned.calibration and again.rate == learned.rate
    other = make_drafter("eagle3", target, seed=1)
    fresh = speculative.draft_length_policy(target, other, "auto", costs=costs, padded=True)
    assert fresh.calibration == 1.0 and fresh.store != learned.store
    learned.store.write_text("{not json")  # a damaged file is ignored, not fatal
    speculative._LEARNED_POLICIES.clear()
    assert (
        speculative.draft_length_policy(target, drafter, "auto", costs=costs, padded=True).calibration == 1.0
    )
