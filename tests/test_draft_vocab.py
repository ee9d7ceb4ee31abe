"""Draft vocabulary: top-N selection over assistant tokens, d2t/t2d maps, save/load."""

from __future__ import annotations

import pytest
import torch

from ppow_trl.data.draft_vocab import (
    DraftVocab,
    build_draft_vocab,
    count_assistant_tokens,
    draft_to_target,
    target_to_draft,
)


def test_top_n_sorted_offsets_and_coverage():
    counts = torch.zeros(20, dtype=torch.int64)
    counts[[15, 3, 7, 11]] = torch.tensor([10, 8, 5, 1])
    vocab = build_draft_vocab(counts, draft_vocab_size=3)
    assert vocab.d2t.dtype == torch.int64 and vocab.t2d.dtype == torch.bool
    assert vocab.target_ids.tolist() == [3, 7, 15]  # top-3 ids, ascending
    assert vocab.d2t.tolist() == [3, 6, 13]  # target = draft + d2t
    assert vocab.t2d.nonzero().flatten().tolist() == [3, 7, 15]
    assert vocab.coverage == pytest.approx(23 / 24)


def test_counts_only_loss_mask_positions_and_pads_with_smallest_unseen():
    sequences = [[5, 6, 7, 8], [9, 9, 5]]
    loss_masks = [[0, 0, 1, 1], [1, 1, 0]]  # counted: 7, 8, 9, 9
    counts = count_assistant_tokens(sequences, loss_masks, vocab_size=12)
    assert counts[[5, 6]].tolist() == [0, 0] and counts[9] == 2
    vocab = build_draft_vocab(sequences=sequences, loss_masks=loss_masks, vocab_size=12, draft_vocab_size=5)
    # 3 distinct ids seen; the two smallest unseen ids (0, 1) fill the rest
    assert vocab.target_ids.tolist() == [0, 1, 7, 8, 9]
    assert vocab.coverage == 1.0
    assert build_draft_vocab({9: 2, 7: 1}, 2, vocab_size=12).target_ids.tolist() == [7, 9]


def test_maps_round_trip_and_out_of_vocab():
    counts = torch.arange(50, dtype=torch.int64) % 7
    vocab = build_draft_vocab(counts, draft_vocab_size=16)
    draft_ids = torch.arange(16).reshape(4, 4)
    target_ids = draft_to_target(draft_ids, vocab.d2t)
    assert vocab.t2d[target_ids].all()
    assert torch.equal(target_to_draft(target_ids, vocab.t2d), draft_ids)
    outside = (~vocab.t2d).nonzero().flatten()
    assert (target_to_draft(outside, vocab.t2d) == -1).all()
    assert target_to_draft(torch.tensor([-100, 50, 10_000]), vocab.t2d).tolist() == [-1, -1, -1]


def test_full_vocab_when_size_is_zero_or_none():
    counts = torch.tensor([0, 3, 1, 0])
    for size in (0, None, 4):
        vocab = build_draft_vocab(counts, draft_vocab_size=size)
        assert vocab.t2d.all() and (vocab.d2t == 0).all() and vocab.coverage == 1.0


def test_save_load(tmp_path):
    vocab = build_draft_vocab(torch.tensor([4, 0, 2, 9, 1]), draft_vocab_size=3)
    vocab.save(tmp_path / "vocab.safetensors")
    loaded = DraftVocab.load(tmp_path / "vocab.safetensors")
    assert torch.equal(loaded.d2t, vocab.d2t) and torch.equal(loaded.t2d, vocab.t2d)
    assert loaded.coverage == pytest.approx(vocab.coverage)


def test_bad_inputs():
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_draft_vocab(torch.ones(4, dtype=torch.int64), draft_vocab_size=5)
    with pytest.raises(ValueError, match="lengths differ"):
        count_assistant_tokens([[1, 2]], [[1]], vocab_size=4)
    with pytest.raises(ValueError, match="outside"):
        count_assistant_tokens([[1, 7]], [[1, 1]], vocab_size=4)
    with pytest.raises(ValueError, match="token_counts"):
        build_draft_vocab(draft_vocab_size=2)
