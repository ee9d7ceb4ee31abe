import torch

from ppow_trl.decoding.drafting import window_targets
from ppow_trl.target import capture_features
from ppow_trl.training.acceptance import accepted_prefix_length, dataset_acceptance, teacher_forced_acceptance
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
