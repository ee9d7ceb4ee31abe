"""Greedy answers with finished rows refilled (`refill_generate`): the tokens of one-prompt-at-a-time greedy
decoding, for prompts of many lengths whose answers end at many different steps."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ppow_trl.data.refill import refill_generate
from ppow_trl.data.regeneration import strip_generation


def _one_at_a_time(target, prompts, eos, max_new_tokens):
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=0)  # fmt: skip
        answers.append(strip_generation(out[0, len(prompt) :].tolist(), eos))
    return answers


@pytest.fixture(scope="module")
def case(tiny_target):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 30, (16,), generator=g).tolist()
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]
    # End-of-turn ids the tiny model really emits, so answers end at many different steps and rows refill.
    free = _one_at_a_time(tiny_target, prompts, [2], 16)
    eos = [token for token, _ in Counter(t for a in free for t in a[2:]).most_common(6)][3:5]
    return prompts, eos, _one_at_a_time(tiny_target, prompts, eos, 16)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_refilled_answers_equal_one_at_a_time_greedy(tiny_target, case, batch_size):
    prompts, eos, expected = case
    assert len({len(a) for a in expected}) > 3  # the refill path is exercised, not one static batch
    counted = []
    answers = refill_generate(tiny_target, prompts, 16, eos, 0, batch_size, on_answer=counted.append)
    assert answers == expected
    assert sorted(counted) == sorted(len(a) for a in expected)
