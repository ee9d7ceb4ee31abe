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
    dataset_acceptance,
    teacher_forced_acceptance,
    teacher_forced_expected_acceptance,
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
