"""Prompt lookup as a branch of the draft tree: the n-gram search itself, and decoding that stays plain greedy
while the lookup branch supplies accepted tokens a useless drafter cannot."""

from __future__ import annotations

import pytest
import torch

from ppow_trl.decoding import speculative_generate
from ppow_trl.decoding.cost import CostTable
from ppow_trl.decoding.lookup import lookup_continuation
from tests.test_drafting import make_drafter
from tests.test_speculative import build_varied_target, plain_greedy, prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _search(rows: list[list[int]], num_tokens: int, max_ngram: int = 3, width: int = 10):
    """Left-pad `rows` to `width` and run the search; returns (tokens, valid) as lists of each row's valid ids."""
    context = torch.zeros(len(rows), width, dtype=torch.long)
    start = torch.tensor([width - len(r) for r in rows])
    for i, r in enumerate(rows):
        context[i, width - len(r) :] = torch.tensor(r)
    tokens, valid = lookup_continuation(context, start, torch.full_like(start, width), num_tokens, max_ngram)
    return [t[v].tolist() for t, v in zip(tokens, valid)]


def test_lookup_finds_the_latest_longest_match_and_stops_at_the_end():
    assert _search([[5, 6, 7, 8, 5, 6]], 3) == [[7, 8, 5]]  # 2-gram (5, 6) at the start
    assert _search([[1, 2, 9, 1, 2, 7, 1, 2]], 3) == [[7, 1, 2]]  # the latest of two matches
    assert _search([[4, 1, 2, 9, 3, 1, 2, 7, 3, 1, 2]], 2, width=11) == [
        [7, 3]
    ]  # 3-gram beats a later 2-gram
    assert _search([[1, 2, 3, 1, 2]], 5) == [[3, 1, 2]]  # cut at the row's end
    assert _search([[1, 2, 3, 4]], 3) == [[]]  # no earlier occurrence
    # padding (id 0 here) never matches, even where the key contains the pad id
    assert _search([[0, 5], [7, 0, 8, 7, 0]], 2) == [[], [8, 7]]
    with pytest.raises(ValueError, match=">= 1"):
        lookup_continuation(torch.ones(1, 4, dtype=torch.long), torch.zeros(1), torch.ones(1) * 4, 0)


@pytest.fixture(scope="module")
def target():
    return build_varied_target(seed=3)


def test_lookup_branch_is_lossless_and_accepts_what_a_useless_drafter_cannot(target):
    """A random drafter is never accepted; repeated text in the prompt gives the lookup branch matches. Output
    stays plain greedy (batch 1, fixed K and auto, a padded forward, and a left-padded batch), and the lookup
    branch lifts tau."""
    drafter = make_drafter("eagle3", target)
    pattern = prompts((6,), seed=11)[0]
    new = 24
    cheap = CostTable([1.0] * 16, draft_step=0.01, commit=0.01)
    gains = 0.0
    for ids in (pattern.repeat(1, 3), torch.cat([prompts((3,))[0], pattern.repeat(1, 2)], 1)):
        ref = plain_greedy(target, ids, new)
        plain = speculative_generate(target, drafter, ids, max_new_tokens=new, num_draft_tokens=2)
        for options in ({"num_draft_tokens": 2}, {"num_draft_tokens": "auto", "costs": cheap},
                        {"num_draft_tokens": 1, "draft_tree_width": 3, "costs": CostTable([1.0, 1.3, 1.3, 1.0, 1.4] * 3)}):  # fmt: skip
            out = speculative_generate(
                target, drafter, ids, max_new_tokens=new, prompt_lookup_tokens=4, **options
            )
            assert torch.equal(out.sequences, ref), (options, out.accepted.flatten().tolist())
            assert out.lookup_rounds > 0
            if options.get("draft_tree_width", 1) == 1 and options["num_draft_tokens"] != "auto":
                # a fixed K stays K after a longer lookup branch
                assert set(out.window_sizes.tolist()) == {options["num_draft_tokens"]}
        gains += out.tau - plain.tau
    assert gains > 0.5, gains
    rows = [pattern.repeat(1, 2), torch.cat([prompts((2,))[0], pattern], 1)]
    width = max(r.shape[1] for r in rows)
    batch, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, width - r.shape[1] :], mask[i, width - r.shape[1] :] = r[0], 1
    out = speculative_generate(target, drafter, batch, mask, max_new_tokens=16, num_draft_tokens=2,
                               prompt_lookup_tokens=3)  # fmt: skip
    for i, r in enumerate(rows):
        assert torch.equal(out.sequences[i, width:], plain_greedy(target, r, 16)[0, r.shape[1] :])


def test_lookup_options_are_checked(target):
    drafter = make_drafter("eagle3", target)
    ids = prompts((4,))[0]
    with pytest.raises(ValueError, match="temperature > 0 use chains"):
        speculative_generate(target, drafter, ids, temperature=1.0, prompt_lookup_tokens=2)
    with pytest.raises(ValueError, match="prompt_lookup_tokens must be an integer >= 0"):
        speculative_generate(target, drafter, ids, prompt_lookup_tokens=-1)
    with pytest.raises(ValueError, match="prompt_lookup_ngram must be an integer >= 1"):
        speculative_generate(target, drafter, ids, prompt_lookup_tokens=2, prompt_lookup_ngram=0)
