"""PPOW reward formulas, the proximity condition and ADAW scores on hand-made inputs."""

import math

import pytest
import torch

from ppow_trl.training.rewards import (
    REWARD_REGISTRY,
    cost_aware_speedup_reward,
    get_reward_funcs,
    proximity_reward,
)
from ppow_trl.training.windowing import (
    anchor_first_tokens,
    assistant_anchors,
    position_scores,
    restrict_anchors,
    sample_anchors,
    valid_anchors,
    window_scores,
    winnable_anchors,
)


def test_cost_aware_speedup_reward_values_for_k_0_to_10_at_gamma_0_12():
    k = list(range(11))
    got = cost_aware_speedup_reward(None, None, None, accepted_lengths=k, gamma=0.12)
    expected = [
        0.0,
        0.892857,
        1.612903,
        2.205882,
        2.702703,
        3.125,
        3.488372,
        3.804348,
        4.081633,
        4.326923,
        4.545455,
    ]
    assert got == pytest.approx(expected, abs=1e-6)
    assert all(b > a for a, b in zip(got, got[1:]))  # monotone
    assert all(b - a < a - z for z, a, b in zip(got, got[1:], got[2:]))  # concave


def test_proximity_reward_only_for_rejected_near_misses():
    k = [0, 0, 0, 3]
    delta = [0.5, 1.99, 2.5, 0.1]
    got = proximity_reward(None, None, None, k, delta, proximity_eta=0.3, proximity_eps=2.0)
    assert got == pytest.approx([0.3, 0.3, 0.0, 0.0])
    assert (
        0.3 < cost_aware_speedup_reward(None, None, None, [1], 0.12)[0]
    )  # one accepted token beats a near miss
    with pytest.raises(ValueError, match="proximity_delta"):
        proximity_reward(None, None, None, k, None, proximity_eta=0.3, proximity_eps=2.0)


def test_reward_registry_names_and_unknown_name():
    assert {"cost_aware_speedup", "proximity"} <= set(REWARD_REGISTRY)
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward_funcs(["speed"])


def test_adaw_scores_confident_target_with_disagreeing_drafter_highest():
    v = 4
    vocab = torch.arange(v)
    confident = torch.tensor([10.0, 0.0, 0.0, 0.0])
    flat = torch.zeros(v)
    # Rows (target position r+1): confident+disagree, confident+agree, uniform target+disagree.
    target = torch.stack([flat, confident, confident, flat])[None]  # position 0 is never scored
    agree = torch.log_softmax(confident, -1)
    disagree = torch.log_softmax(torch.tensor([0.0, 10.0, 0.0, 0.0]), -1)
    drafter = torch.stack([disagree, agree, disagree, agree])[None]
    s = position_scores(target, drafter, vocab)[0]
    p = torch.softmax(confident, -1)
    h = -(p * p.log()).sum()
    kl = (p * (p.log() - disagree)).sum()
    assert s[0] == pytest.approx(float((1 - h / math.log(v)) * kl), rel=1e-5)
    assert s[1] == pytest.approx(0.0, abs=1e-5)
    assert s[2] == pytest.approx(0.0, abs=1e-5)  # uniform target: confidence 0
    assert s[0] > 1.0
    w = window_scores(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 2)
    assert w.tolist() == [[1.5, 2.5, 3.5, 2.0]]


def test_anchor_sampling_respects_validity_and_is_reproducible():
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]])
    attn = torch.ones_like(loss_mask)
    valid = valid_anchors(loss_mask, attn, 3)
    assert valid[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]  # r+2 assistant and r+4 < 10
    assert not valid[1].any()
    scores = torch.zeros(2, 10)
    scores[0, 4] = 50.0
    gens = lambda: [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]  # noqa: E731
    a1, has = sample_anchors(valid, 3, gens(), scores, temperature=1.0)
    a2, _ = sample_anchors(valid, 3, gens(), scores, temperature=1.0)
    assert torch.equal(a1, a2) and has.tolist() == [True, False]
    assert 4 in a1[0].tolist() and all(valid[0, r] for r in a1[0].tolist())


def test_assistant_anchors_point_two_rows_before_assistant_tokens():
    mask = torch.tensor([[0, 0, 0, 1, 1, 0]])
    assert assistant_anchors(mask).nonzero()[:, 1].tolist() == [1, 2]


def test_winnable_anchors_need_the_target_token_in_the_draft_vocab_and_top_w():
    # Target argmax per position 0..3 (vocabulary 6); anchor row r's first token is the argmax at r+1.
    target = torch.nn.functional.one_hot(torch.tensor([[0, 4, 1, 3]]), 6).float()
    first = anchor_first_tokens(target)
    assert first.tolist() == [[4, 1, 3, 0]]
    t2d = torch.tensor([True, True, False, True, True, False])  # draft ids: 0->0, 1->1, 3->2, 4->3
    assert winnable_anchors(first, t2d).tolist() == [[True, True, True, True]]
    t2d[3] = False
    t2d[2] = True  # draft ids: 0->0, 1->1, 2->2, 4->3
    assert winnable_anchors(first, t2d).tolist() == [[True, True, False, True]]
    # Step-0 drafter logits over the 4 draft ids: target token 4 (draft 3) ranks 1st, 1 (draft 1) ranks 3rd.
    step0 = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [3.0, 1.0, 2.0, 0.0], [0.0] * 4, [3.0, 2.0, 1.0, 0.0]]])
    assert winnable_anchors(first, t2d, step0, top_w=2).tolist() == [[True, False, False, True]]
    assert winnable_anchors(first, t2d, step0, top_w=3).tolist() == [[True, True, False, True]]


def test_restricting_anchors_keeps_sequences_with_no_winnable_anchor():
    valid = torch.tensor([[True, True, False], [True, True, True]])
    keep = torch.tensor([[False, True, True], [False, False, False]])
    assert restrict_anchors(valid, keep).tolist() == [[False, True, False], [True, True, True]]
