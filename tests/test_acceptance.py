import pytest
import torch

from ppow_trl.data import collate_sequences
from ppow_trl.decoding.drafting import draft_windows, window_targets
from ppow_trl.models.common import scatter_draft_probs
from ppow_trl.target import capture_features
from ppow_trl.training.acceptance import (
    accepted_prefix_length,
    anchor_flags,
    batch_acceptance,
    batch_acceptances,
    dataset_acceptance,
    teacher_forced_acceptance,
    teacher_forced_expected_acceptance,
    teacher_forced_ranks,
    tree_accepted_length,
    tree_tau_metrics,
)
from ppow_trl.training.windowing import assistant_anchors
from tests.test_drafting import make_drafter


def test_accepted_prefix_length_stops_at_first_mismatch_and_at_the_sequence_end():
    draft = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [7, 2, 3, 4], [1, 2, 3, 4]])
    ref = torch.tensor([[1, 2, 3, 4]] * 4)
    valid = torch.tensor([[True] * 4, [True] * 4, [True] * 4, [True, True, False, False]])
    assert accepted_prefix_length(draft, ref, valid).tolist() == [4, 1, 0, 2]


def test_teacher_forced_acceptance_counts_matches_with_the_sequence(tiny_target):
    drafter = make_drafter("eagle3", tiny_target)
    prompt = torch.randint(3, 300, (1, 6))
    seq = tiny_target.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False
    )
    loss_mask = torch.zeros_like(seq)
    loss_mask[:, 6:] = 1
    feats = capture_features(tiny_target, seq).aux_hidden_states
    k = teacher_forced_acceptance(drafter, feats, seq, torch.ones_like(seq), loss_mask, 3)
    assert k.shape == (10,) and int(k.min()) >= 0 and int(k.max()) <= 3
    # An oracle that drafts the sequence itself is accepted in full wherever 3 tokens remain.
    anchors = torch.arange(seq.shape[1])[None]
    ref, in_range = window_targets(seq, anchors, 3)
    oracle = accepted_prefix_length(ref, ref, in_range)[assistant_anchors(loss_mask)]
    assert oracle.tolist() == [3] * 8 + [2, 1]


def test_dataset_acceptance_names_the_sequence_of_every_window(tiny_target):
    drafter = make_drafter("eagle3", tiny_target)
    rows = []
    for length in (7, 4):  # one window per assistant token: 7 and 4
        ids = torch.randint(3, 300, (length + 3,))
        rows.append({"input_ids": ids.tolist(), "loss_mask": [0, 0, 0] + [1] * length})

    def provider(batch):
        return capture_features(tiny_target, batch["input_ids"], batch["attention_mask"])

    k, sequence = dataset_acceptance(drafter, provider, rows, 3, pad_token_id=0, batch_size=2)
    assert sequence.tolist() == [0] * 7 + [1] * 4 and k.shape == (11,)
    alone, _ = dataset_acceptance(drafter, provider, rows, 3, pad_token_id=0, batch_size=1)
    assert torch.equal(alone, k)  # padding in a batch changes no window's k

    # The per-batch map the SFT evaluation gathers: k at every scored anchor, -1 elsewhere.
    batch = collate_sequences(rows, 0)
    features = provider(batch).aux_hidden_states
    scored = anchor_flags(batch["attention_mask"], batch["loss_mask"])
    k_map = batch_acceptance(drafter, features, batch, 3)
    assert torch.equal(k_map >= 0, scored) and torch.equal(k_map[scored], k)


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_expected_acceptance_at_temperature_one(tiny_target, kind):
    drafter = make_drafter(kind, tiny_target)
    torch.manual_seed(0)
    seq = tiny_target.generate(
        torch.randint(3, 300, (1, 5)), attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=9,
        do_sample=True, temperature=1.0,
    )  # fmt: skip
    attn, loss_mask = torch.ones_like(seq), torch.zeros_like(seq)
    loss_mask[:, 5:] = 1
    captured = capture_features(tiny_target, seq)
    feats, logits = getattr(captured, drafter.feature_name), captured.logits
    expected = {
        k: teacher_forced_expected_acceptance(drafter, feats, logits, seq, attn, loss_mask, k) for k in (1, 3)
    }
    assert expected[3].shape == (9,) and bool((expected[3] >= 0).all()) and bool((expected[3] <= 3).all())
    # Step 1 alone: sum_v min(p, q) with q scattered to the full vocabulary (outside it q = 0), p at row r+1.
    anchors = torch.arange(seq.shape[1])[None]
    q = torch.softmax(
        draft_windows(drafter, feats, seq, anchors, 1, return_logits=True).logits[0, :, 0, 0], -1
    )
    q_full = scatter_draft_probs(q, drafter.d2t, tiny_target.config.vocab_size)
    p = torch.softmax(logits[0].float(), -1)
    rows = (anchors[0] + 1).clamp(max=seq.shape[1] - 1)
    beta = torch.minimum(p[rows], q_full).sum(-1) * (anchors[0] + 2 < seq.shape[1])
    flags = assistant_anchors(loss_mask)[0]
    torch.testing.assert_close(expected[1], beta[flags], atol=1e-5, rtol=1e-4)
    # Longer windows add non-negative terms; the last window has one token left, so K=3 adds nothing there.
    assert bool((expected[3][:-1] > expected[1][:-1]).all())
    assert float(expected[3][-1]) == pytest.approx(float(expected[1][-1]))


def planted_batch(drafter, target, window: int = 10):
    """Two right-padded sequences that end in the drafter's own greedy window (so chain and tree windows are
    accepted for a while) after two random answer tokens; in the second, the last 3 tokens are not
    marked as the target's (as if the answer had ended and the next turn happened to match)."""
    rows = []
    for seed, (prompt, tail) in enumerate(((6, 0), (4, 3))):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 300, (1, prompt + 2), generator=g)
        feats = capture_features(target, ids).aux_hidden_states
        anchor = torch.tensor([[prompt]])
        greedy = draft_windows(drafter, feats, ids, anchor, window).tokens[0, 0, 0]
        ids = torch.cat([ids[0], greedy])
        mask = [0] * prompt + [1] * (len(ids) - prompt - tail) + [0] * tail
        rows.append({"input_ids": ids.tolist(), "loss_mask": mask})
    batch = collate_sequences(rows, 0)
    features = capture_features(target, batch["input_ids"], batch["attention_mask"]).aux_hidden_states
    return batch, features


def test_tree_acceptance_at_width_one_is_the_greedy_chain(tiny_target):
    drafter = make_drafter("eagle3", tiny_target)
    batch, features = planted_batch(drafter, tiny_target)
    ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    b, t = ids.shape
    # The chain as decoding drafts it: the drafter's greedy tokens fed back, compared with the sequence; a
    # token that is padding or not the target's (the second answer's end) is a rejection.
    anchors = torch.arange(t).expand(b, t)
    reference, valid = window_targets(ids, anchors, 10)
    valid &= window_targets(attn, anchors, 10)[0].bool() & window_targets(loss_mask, anchors, 10)[0].bool()
    greedy = draft_windows(drafter, features, ids, anchors, 10, attention_mask=attn).tokens[:, :, 0]
    scored = anchor_flags(attn, loss_mask)
    chain = accepted_prefix_length(greedy, reference, valid)[scored]
    assert int(chain.max()) == 10 and int(chain.min()) == 0  # planted windows are accepted in full
    for k in (1, 5, 10):
        tree = teacher_forced_acceptance(drafter, features, ids, attn, loss_mask, k, width=1)
        assert torch.equal(tree, chain.clamp(max=k)), k
    # Counting the text after an answer too (the first answer ends the sequence: no difference there).
    in_sequence = window_targets(ids, anchors, 10)[1] & window_targets(attn, anchors, 10)[0].bool()
    anywhere = accepted_prefix_length(greedy, reference, in_sequence)[scored]
    first = int(scored[0].sum())
    assert torch.equal(anywhere[:first], chain[:first]) and not torch.equal(anywhere, chain)

    # Width w: the sequence's token is among the top-w draft logits at every depth accepted.
    ranks = teacher_forced_ranks(drafter, features, ids, attn, loss_mask, 10)
    logits = draft_windows(
        drafter, features, ids, anchors, 10, attention_mask=attn, tokens=reference[:, :, None],
        return_logits=True,
    ).logits[:, :, 0][scored]  # fmt: skip
    top4 = drafter.draft_to_target(logits.topk(4, dim=-1).indices)
    in_top4 = (top4 == reference[scored][..., None]).any(-1) & valid[scored]
    assert torch.equal(ranks < 4, in_top4)
    widths = [tree_accepted_length(ranks, w) for w in (1, 2, 4, 120)]
    assert all(bool((wide >= narrow).all()) for narrow, wide in zip(widths, widths[1:]))
    assert bool((widths[2] > widths[0]).any())
    # Every draft-vocabulary token is in the widest tree: it stops only where the window leaves the answer or
    # meets a token the drafter cannot propose.
    proposable = valid & drafter.t2d[reference]
    assert torch.equal(widths[-1], accepted_prefix_length(reference, reference, proposable)[scored])


def test_batch_acceptances_score_every_shape_from_one_forward(tiny_target):
    drafter = make_drafter("eagle3", tiny_target)
    batch, features = planted_batch(drafter, tiny_target)
    both = batch_acceptances(drafter, features, batch, [(1, 5), (4, 10)])
    assert both.shape == (*batch["input_ids"].shape, 2)
    assert torch.equal(both[..., 0], batch_acceptance(drafter, features, batch, 5))
    assert torch.equal(both[..., 1], batch_acceptance(drafter, features, batch, 10, width=4))
    scored = both[..., 0] >= 0
    assert bool((both[..., 1][scored] >= both[..., 0][scored]).all())
    assert tree_tau_metrics(both[..., 1][scored], 4, 10) == {
        "tree_tau_w4_k10": pytest.approx(1 + float(both[..., 1][scored].double().mean()))
    }


def test_tree_accepted_length_stops_at_the_first_depth_outside_the_width():
    ranks = torch.tensor([[0, 3, 0], [1, 0, 2], [5, 0, 0]])
    assert tree_accepted_length(ranks, 1).tolist() == [1, 0, 0]
    assert tree_accepted_length(ranks, 3).tolist() == [1, 3, 0]
    assert tree_accepted_length(ranks, 6).tolist() == [3, 3, 3]


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_anchor_stride_scores_every_sth_window_exactly(tiny_target, kind):
    drafter = make_drafter(kind, tiny_target)
    batch, _ = planted_batch(make_drafter("eagle3", tiny_target), tiny_target)
    ids, attn, lmask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    captured = capture_features(tiny_target, ids, attn)
    features = getattr(captured, drafter.feature_name)
    kept = (anchor_flags(attn, lmask).nonzero()[:, 1] % 3) == 0  # windows at rows 0, 3, 6, ...
    ranks = teacher_forced_ranks(drafter, features, ids, attn, lmask, 4)
    assert torch.equal(
        teacher_forced_ranks(drafter, features, ids, attn, lmask, 4, anchor_stride=3), ranks[kept]
    )
    expected = teacher_forced_expected_acceptance(drafter, features, captured.logits, ids, attn, lmask, 3)
    strided = teacher_forced_expected_acceptance(
        drafter, features, captured.logits, ids, attn, lmask, 3, anchor_stride=3
    )
    torch.testing.assert_close(strided, expected[kept])
    assert 0 < int(kept.sum()) < len(kept)
    with pytest.raises(ValueError, match="anchor_stride"):
        teacher_forced_ranks(drafter, features, ids, attn, lmask, 4, anchor_stride=0)


def test_expected_acceptance_at_a_drafter_temperature_is_the_sharpened_drafter(tiny_target):
    drafter = make_drafter("eagle3", tiny_target)
    batch, _ = planted_batch(drafter, tiny_target)
    ids, attn, lmask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    captured = capture_features(tiny_target, ids, attn)
    features, logits = captured.aux_hidden_states, captured.logits

    def score(drafter_temperature):
        return teacher_forced_expected_acceptance(
            drafter, features, logits, ids, attn, lmask, 3, drafter_temperature
        )

    with torch.no_grad():  # the same drafter with its output logits doubled is the drafter at temperature 0.5
        sharp = make_drafter("eagle3", tiny_target)
        sharp.lm_head.weight.mul_(2.0)
    doubled = teacher_forced_expected_acceptance(sharp, features, logits, ids, attn, lmask, 3)
    torch.testing.assert_close(score(0.5), doubled)
    assert not torch.allclose(score(0.5), score(1.0))
