"""Speculative decoding with a drafter: lossless greedy (both paths), ragged batches, sampling, bad input.

Random drafters are almost never accepted, so most tests use an *oracle* drafter: a real drafter whose
draft logits are replaced, where they match the teacher-forced logits of the reference continuation, by a
one-hot on the true next token (deliberately not at every position). It drafts through the normal
`ChainDrafter` machinery, so windows are accepted partly, fully or not at all.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ppow_trl.decoding import (
    DrafterCandidateGenerator,
    SpeculativeOutput,
    attach_drafter,
    detach_drafter,
    draft_windows,
    generate,
    speculative_decoding,
    speculative_generate,
    window_targets,
)
from ppow_trl.decoding.cost import CostTable
from ppow_trl.decoding.hf import CHAIN_ROUND, GREEDY_ROUND, decoding_round
from ppow_trl.decoding.speculative import draft_length_policy
from ppow_trl.models import (
    DrafterTargetMismatchError,
    Eagle3Drafter,
    Eagle3DrafterConfig,
    MedusaDrafter,
    MedusaDrafterConfig,
)
from ppow_trl.target import capture_features
from tests.test_drafting import make_drafter

VOCAB = 320


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_varied_target(seed: int = 0, num_layers: int = 4) -> LlamaForCausalLM:
    """A tiny random Llama whose greedy continuations vary (untied head; the tied tiny target of conftest
    repeats its last token forever, which would make equality tests blind to many bugs)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    return build_varied_target()


def prompts(lengths=(4, 7, 12), seed=5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, n), generator=g) for n in lengths]


def plain_greedy(target, ids, max_new_tokens, eos=None) -> torch.Tensor:
    return target.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos, pad_token_id=0,
    )  # fmt: skip


class _Lookup:
    """Replace logit vectors that match a key (L2 distance < rtol * |key|) by the key's value."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rtol: float = 1e-3):
        self.keys, self.values = keys, values
        self.tol = rtol * keys.norm(dim=-1).clamp(min=1.0)
        self.hits = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        best = torch.cdist(flat.float(), self.keys).min(dim=1)
        hit = best.values < self.tol[best.indices]
        self.hits += int(hit.sum())
        out = flat.clone()
        out[hit] = self.values[best.indices[hit]].to(out.dtype)
        return out.view_as(logits)


class OracleEagle3(Eagle3Drafter):
    def draft_logits(self, hidden):
        return self.lookup(super().draft_logits(hidden))


class OracleMedusa(MedusaDrafter):
    def head_logits(self, hidden, num_heads=None):
        return self.lookup(super().head_logits(hidden, num_heads))


def drafter_with_vocab(kind, target, token_ids, size=120, seed=0):
    """A random drafter whose draft vocabulary holds `token_ids` (plus filler ids up to `size`)."""
    torch.manual_seed(seed)
    vocab = target.config.vocab_size
    others = torch.arange(vocab)[~torch.isin(torch.arange(vocab), token_ids)]
    chosen = torch.unique(torch.cat([torch.unique(token_ids), others])[:size])  # sorted
    size = chosen.numel()
    if kind == "eagle3":
        drafter = Eagle3Drafter(Eagle3DrafterConfig.from_target(target, draft_vocab_size=size))
    else:
        drafter = MedusaDrafter(MedusaDrafterConfig.from_target(target, num_heads=4, draft_vocab_size=size))
        for block in drafter.blocks:  # heads that differ from each other
            torch.nn.init.normal_(block.layers[0].weight, std=0.2)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    drafter.set_draft_vocab(chosen - torch.arange(size), t2d)
    drafter.init_from_target(target)
    return drafter.eval()


def make_oracle(
    kind, target, sequences, window, skip=lambda r, j: (7 * r + 3 * j) % 11 == 5, runner_up: bool = False
):
    """A drafter that drafts the true continuation of `sequences` (list of (1, T) tensors) except at
    (row r, step j) with skip(r, j) or where the true token is outside its draft vocabulary. With `runner_up`,
    a skipped step ranks the true token second (behind the next draft-vocabulary id) instead of drafting
    at random."""
    drafter = drafter_with_vocab(kind, target, torch.cat([s.flatten() for s in sequences]))
    keys, values = [], []
    for ids in sequences:
        feats = getattr(capture_features(target, ids), drafter.feature_name)
        anchors = torch.arange(ids.shape[1])[None]
        truth, in_range = window_targets(ids, anchors, window)
        with torch.no_grad():
            windows = draft_windows(
                drafter, feats, ids, anchors, window, tokens=truth[:, :, None], return_logits=True
            )
        logits = windows.logits[0, :, 0].float()  # (T, K, V_d)
        draft_ids = drafter.target_to_draft(truth[0])
        rows, steps = torch.meshgrid(torch.arange(ids.shape[1]), torch.arange(window), indexing="ij")
        use = in_range[0] & (draft_ids >= 0) & ~skip(rows, steps)
        oracle = torch.full_like(logits, -10.0).scatter(-1, draft_ids.clamp(min=0)[..., None], 10.0)
        fallback = logits
        if runner_up:
            wrong = (draft_ids.clamp(min=0) + 1) % logits.shape[-1]
            fallback = oracle.scatter(-1, draft_ids.clamp(min=0)[..., None], 9.0).scatter(
                -1, wrong[..., None], 10.0
            )
            fallback = torch.where((draft_ids >= 0)[..., None], fallback, logits)
        keys.append(logits.reshape(-1, logits.shape[-1]))
        values.append(torch.where(use[..., None], oracle, fallback).reshape(-1, logits.shape[-1]))
    drafter.__class__ = OracleEagle3 if kind == "eagle3" else OracleMedusa
    drafter.lookup = _Lookup(torch.cat(keys), torch.cat(values))
    return drafter


# ------------------------------------------------------------------------------------------ lossless greedy
@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_greedy_output_equals_plain_greedy_both_paths(kind, target):
    new = 16
    refs = [plain_greedy(target, ids, new) for ids in prompts()]
    drafter = make_oracle(kind, target, refs, window=4)
    accepted = {"assisted": [], "loop": []}
    for window in (1, 2, 4):
        for ids, ref in zip(prompts(), refs):
            assisted = generate(
                target, drafter, ids, num_draft_tokens=window, method="assisted", max_new_tokens=new
            )
            loop = speculative_generate(target, drafter, ids, max_new_tokens=new, num_draft_tokens=window)
            assert torch.equal(assisted.sequences, ref), (window, assisted.accepted.flatten().tolist())
            assert torch.equal(loop.sequences, ref), (window, loop.accepted.flatten().tolist())
            for out in (assisted, loop):
                assert int(out.new_tokens[0]) == new
                assert out.num_verify_forwards == out.accepted.shape[0] == out.window_sizes.shape[0]
                # every token after the prefill's comes from a verification round: sum(k + 1) = new - 1
                assert int((out.accepted[:, 0] + 1).sum()) >= new - 1
            assert int((loop.accepted + 1).sum()) - (new - 1) < window + 1  # only the last round is cut
            accepted["assisted"].append(assisted.accepted.flatten())
            accepted["loop"].append(loop.accepted.flatten())
    assert drafter.lookup.hits > 0
    for path in (
        "assisted",
        "loop",
    ):  # both paths feed the drafter right: rejections, partial and full windows
        counts = torch.bincount(torch.cat(accepted[path]), minlength=5)
        assert counts[0] > 0 and counts[1:4].sum() > 0 and counts[4] > 0, (path, counts.tolist())


def test_random_drafter_greedy_equality(target):
    drafter = make_drafter("eagle3", target)
    for ids in prompts((5, 9)):
        ref = plain_greedy(target, ids, 12)
        assert torch.equal(
            generate(target, drafter, ids, num_draft_tokens=3, max_new_tokens=12).sequences, ref
        )
        out = speculative_generate(target, drafter, ids, max_new_tokens=12, num_draft_tokens=3)
        assert torch.equal(out.sequences, ref)
        assert out.num_verify_forwards == 11 and abs(out.tau - 12 / 11) < 1e-9


# Verification nearly free per extra token, drafting cheap: "auto" drafts whenever the drafter is believed.
CHEAP = CostTable([1.0, 1.02, 1.04, 1.06, 1.08, 1.1, 1.12, 1.14, 1.16], draft_step=0.01, commit=0.01)
# Costs of the order measured on CPU with packed linears (c(n) in plain steps).
MEASURED = CostTable([1.0, 1.15, 1.17, 1.17, 1.2, 1.25, 1.4, 1.45, 1.5], draft_step=0.06, commit=0.05)


def _decode(method, target, drafter, ids, new, **kwargs):
    if method == "loop":
        return speculative_generate(target, drafter, ids, max_new_tokens=new, **kwargs)
    return generate(target, drafter, ids, method="assisted", max_new_tokens=new, **kwargs)


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_auto_draft_length_is_lossless_and_uses_a_perfect_drafter_fully(kind, target):
    new = 16
    refs = [plain_greedy(target, ids, new) for ids in prompts()]
    never = lambda r, j: torch.zeros_like(r, dtype=torch.bool)  # noqa: E731
    perfect = make_oracle(kind, target, refs, window=4, skip=never)
    partial = make_oracle(kind, target, refs, window=4)
    for ids, ref in zip(prompts(), refs):
        for method in ("loop", "assisted"):
            auto = {"num_draft_tokens": "auto", "max_draft_tokens": 4, "costs": CHEAP}
            out = _decode(method, target, perfect, ids, new, **auto)
            assert torch.equal(out.sequences, ref), (method, out.window_sizes.tolist())
            # the longest window every round but the last ones (cut at max_new_tokens by the assisted path)
            assert bool((out.window_sizes[:-2] == 4).all()), (method, out.window_sizes.tolist())
            assert out.num_verify_forwards == out.window_sizes.shape[0] == out.accepted.shape[0]
            out = _decode(method, target, partial, ids, new, **auto)
            assert torch.equal(out.sequences, ref), (method, out.window_sizes.tolist())
            threshold = {"num_draft_tokens": 4, "draft_confidence_threshold": 0.5}
            out = _decode(method, target, partial, ids, new, **threshold)
            assert torch.equal(out.sequences, ref), (method, out.window_sizes.tolist())


def test_auto_draft_length_skips_a_useless_drafter(target):
    drafter = make_drafter("eagle3", target)
    new = 40
    for ids in prompts((5, 9)):
        ref = plain_greedy(target, ids, new)
        for method in ("loop", "assisted"):
            out = _decode(method, target, drafter, ids, new, num_draft_tokens="auto", costs=MEASURED)
            assert torch.equal(out.sequences, ref)
            later = out.window_sizes[out.window_sizes.shape[0] // 3 :]  # once the drafter has shown itself
            assert float((later == 0).float().mean()) > 0.8, (method, out.window_sizes.tolist())
    # batched loop with left padding: same outputs as one prompt at a time
    singles = prompts((4, 9))
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, ids in enumerate(singles):
        batch[row, 9 - ids.shape[1] :], mask[row, 9 - ids.shape[1] :] = ids[0], 1
    out = speculative_generate(
        target, drafter, batch, mask, max_new_tokens=12, num_draft_tokens="auto", costs=CHEAP
    )
    for row, ids in enumerate(singles):
        assert torch.equal(out.sequences[row, 9:], plain_greedy(target, ids, 12)[0, ids.shape[1] :])
    with pytest.raises(ValueError, match="integer K"):
        speculative_generate(
            target, drafter, singles[0], num_draft_tokens="auto", draft_confidence_threshold=0.3
        )


def test_windows_are_verified_at_the_cheaper_padded_shape(target, monkeypatch):
    """With a cost table where 2 tokens cost more than 3, a K=1 window is verified in a 3-token forward (a
    filler token after it, dropped with its KV): greedy output unchanged; at batch size 2 nothing is padded."""
    new = 12
    refs = [plain_greedy(target, ids, new) for ids in prompts()]
    drafter = make_oracle("eagle3", target, refs, window=2)
    lengths = []
    forward = type(target.model).forward

    def spy(self, input_ids=None, *args, **kwargs):
        lengths.append(input_ids.shape)
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(target.model), "forward", spy)
    slow_two = CostTable([1.0, 1.3, 1.05, 1.4], draft_step=0.01, commit=0.01)
    for ids, ref in zip(prompts(), refs):
        lengths.clear()
        out = speculative_generate(
            target, drafter, ids, max_new_tokens=new, num_draft_tokens=1, costs=slow_two
        )
        assert torch.equal(out.sequences, ref)
        assert [tuple(s) for s in lengths[1:]] == [(1, 3)] * out.num_verify_forwards  # after the prefill
    lengths.clear()
    speculative_generate(target, drafter, torch.cat(prompts((5, 5))), max_new_tokens=4, num_draft_tokens=1,
                         costs=slow_two)  # fmt: skip
    assert {tuple(s) for s in lengths[1:]} == {(2, 2)}


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_draft_tree_is_lossless_and_rescues_a_rejected_first_token(kind, target):
    """Width 2: where the drafter ranks the target's token second at step 1, the branch is accepted (its KV
    moved into place, the bonus taken from its row); greedy output stays plain greedy's, tau rises over the
    chain, also batched with left padding, fixed K and auto."""
    new = 16
    refs = [plain_greedy(target, ids, new) for ids in prompts()]
    first_wrong = lambda r, j: (j == 0) & (r % 3 == 1)  # noqa: E731  (step 1 ranks the truth second)
    drafter = make_oracle(kind, target, refs, window=3, skip=first_wrong, runner_up=True)
    chain_tau, tree_tau = [], []
    for ids, ref in zip(prompts(), refs):
        chain = speculative_generate(target, drafter, ids, max_new_tokens=new, num_draft_tokens=3)
        tree = speculative_generate(
            target, drafter, ids, max_new_tokens=new, num_draft_tokens=3, draft_tree_width=2
        )
        wide = generate(target, drafter, ids, num_draft_tokens="auto", max_draft_tokens=3, costs=CHEAP,
                        max_new_tokens=new, draft_tree_width=4)  # fmt: skip
        # a tree whose forward is padded (3 tokens run as 4: the filler row sees the branch, no real row sees it)
        padded = speculative_generate(target, drafter, ids, max_new_tokens=new, num_draft_tokens=1,
                                      draft_tree_width=2, costs=CostTable([1.0, 1.3, 1.3, 1.0, 1.4]))  # fmt: skip
        for out in (chain, tree, wide, padded):
            assert torch.equal(out.sequences, ref), out.accepted.flatten().tolist()
        chain_tau.append(chain.tau)
        tree_tau.append(tree.tau)
    assert sum(tree_tau) > sum(chain_tau) + 0.3, (chain_tau, tree_tau)
    singles = prompts((4, 9))
    batch, mask = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    for row, ids in enumerate(singles):
        batch[row, 9 - ids.shape[1] :], mask[row, 9 - ids.shape[1] :] = ids[0], 1
    out = speculative_generate(target, drafter, batch, mask, max_new_tokens=12, num_draft_tokens=3,
                               draft_tree_width=3)  # fmt: skip
    for row, ids in enumerate(singles):
        assert torch.equal(out.sequences[row, 9:], plain_greedy(target, ids, 12)[0, ids.shape[1] :])
    with pytest.raises(ValueError, match="greedily"):
        speculative_generate(target, drafter, singles[0], temperature=1.0, draft_tree_width=2)
    with pytest.raises(ValueError, match="chains only"):
        generate(target, drafter, singles[0], method="assisted", draft_tree_width=2)
    with pytest.raises(ValueError, match="integer >= 1"):
        speculative_generate(target, drafter, singles[0], draft_tree_width=0)
    with pytest.raises(ValueError, match="drop the threshold"):
        speculative_generate(target, drafter, singles[0], draft_tree_width=2, draft_confidence_threshold=0.5)
    with pytest.raises(ValueError, match="draft vocabulary"):
        speculative_generate(
            target, drafter, singles[0], draft_tree_width=drafter.config.draft_vocab_size + 1
        )


@pytest.mark.parametrize("step", [1, 2])
def test_dynamic_tree_follows_runner_ups_at_any_depth_and_fills_free_room(step, target, monkeypatch):
    """Where the drafter ranks the truth second at step j + 1, the chain stops after j tokens while the dynamic
    tree (which expands the two best nodes of every layer) keeps the whole K-token path; with a flat cost table
    the forward holds as many nodes as `tree_room` allows. Output stays plain greedy's."""
    new = 16
    refs = [plain_greedy(target, ids, new) for ids in prompts()]
    wrong_at = lambda r, j: j == step  # noqa: E731  (every window ranks the truth second at this step)
    drafter = make_oracle("eagle3", target, refs, window=3, skip=wrong_at, runner_up=True)
    lengths = []
    forward = type(target.model).forward

    def spy(self, input_ids=None, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return forward(self, input_ids, *args, **kwargs)

    flat = CostTable([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5])
    for ids, ref in zip(prompts(), refs):
        chain = speculative_generate(target, drafter, ids, max_new_tokens=new, num_draft_tokens=3)
        tree = speculative_generate(
            target, drafter, ids, max_new_tokens=new, num_draft_tokens=3, draft_tree_width=2
        )
        monkeypatch.setattr(type(target.model), "forward", spy)
        lengths.clear()
        roomy = speculative_generate(target, drafter, ids, max_new_tokens=new, num_draft_tokens=3,
                                     draft_tree_width=2, costs=flat)  # fmt: skip
        monkeypatch.setattr(type(target.model), "forward", forward)
        for out in (chain, tree, roomy):
            assert torch.equal(out.sequences, ref), out.accepted.flatten().tolist()
        assert set(lengths[1:]) == {flat.tree_room(4 + 1)} == {9}
        # the chain stops at the wrong step, the tree finds the truth among the runner-ups and goes on
        assert set(chain.accepted[:-1].flatten().tolist()) == {step}
        assert (
            set(tree.accepted[:-1].flatten().tolist()) == set(roomy.accepted[:-1].flatten().tolist()) == {3}
        )


def test_generate_resolves_its_round_from_what_the_caller_names():
    """Greedy calls naming no tree option get the default tree + lookup; naming one keeps the other at its chain
    value; sampling and the assisted path get chains."""
    assert decoding_round({}, sampling=False) == GREEDY_ROUND
    assert decoding_round({"max_new_tokens": 8}, sampling=False) == GREEDY_ROUND
    assert decoding_round({"draft_tree_width": 3}, sampling=False) == {**CHAIN_ROUND, "draft_tree_width": 3}
    assert decoding_round({"prompt_lookup_tokens": 0}, sampling=False) == CHAIN_ROUND
    assert decoding_round({}, sampling=True) == CHAIN_ROUND
    assert decoding_round({}, sampling=False, method="assisted") == CHAIN_ROUND
    # a confidence threshold stops chains: the default keeps its lookup branch beside a chain
    assert decoding_round({"draft_confidence_threshold": 0.4}, sampling=False) == {
        **GREEDY_ROUND,
        "draft_tree_width": 1,
    }


def test_tree_room_takes_the_flat_part_of_the_cost_table():
    table = CostTable([1.0, 1.3, 1.02, 1.03, 1.2, 1.03, 2.0])
    assert table.verify_shape(2) == 3
    assert table.tree_room(2) == 6  # c(6) is within 3% of c(3), c(5) is not (the largest cheap count wins)
    assert table.tree_room(7) == 7
    assert table.tree_room(9) == 9  # past the table: no padding, no room


def test_auto_policy_is_kept_per_drafter_across_calls(target):
    """What "auto" learns about a drafter (here: that it is useless) carries over to the next generation, so
    a short answer does not pay for relearning it; another drafter starts fresh."""
    drafter = make_drafter("eagle3", target)
    ids = prompts((5,))[0]
    ref = plain_greedy(target, ids, 24)
    runs = [
        speculative_generate(target, drafter, ids, max_new_tokens=24, num_draft_tokens="auto", costs=MEASURED)
        for _ in range(2)
    ]
    assert all(torch.equal(run.sequences, ref) for run in runs)
    drafted = [int((run.window_sizes > 0).sum()) for run in runs]
    assert drafted[1] < drafted[0], drafted
    policy = draft_length_policy(target, drafter, "auto", costs=MEASURED)
    assert policy is draft_length_policy(target, drafter, "auto", costs=MEASURED)
    fresh = draft_length_policy(target, make_drafter("eagle3", target), "auto", costs=MEASURED)
    assert fresh is not policy and fresh.calibration == 1.0


def _pick_eos(refs: list[list[int]]) -> int:
    """A token that ends the rows at different times (some row never or later)."""
    for token in refs[0][2:]:
        first = [row.index(token) if token in row else None for row in refs]
        if len({f for f in first}) > 1:
            return token
    raise AssertionError("no token ends the rows at different times")


def test_batched_loop_equals_per_prompt_with_left_padding_and_eos(target):
    new = 18
    singles = prompts((4, 7, 12, 9))
    refs = [plain_greedy(target, ids, new)[0, ids.shape[1] :].tolist() for ids in singles]
    eos = _pick_eos(refs)
    drafter = make_oracle("eagle3", target, [plain_greedy(target, ids, new) for ids in singles], window=3)
    width = max(ids.shape[1] for ids in singles)
    batch = torch.zeros(len(singles), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, ids in enumerate(singles):
        batch[row, width - ids.shape[1] :] = ids[0]
        mask[row, width - ids.shape[1] :] = 1
    out = speculative_generate(
        target, drafter, batch, mask, max_new_tokens=new, num_draft_tokens=3, eos_token_id=eos, pad_token_id=0
    )
    lengths = []
    for row, ids in enumerate(singles):
        expected = plain_greedy(target, ids, new, eos=eos)[0, ids.shape[1] :]
        solo = speculative_generate(
            target, drafter, ids, max_new_tokens=new, num_draft_tokens=3, eos_token_id=eos
        )
        got = out.sequences[row, width:]
        n = int(out.new_tokens[row])
        lengths.append(n)
        assert n == expected.shape[0] == int(solo.new_tokens[0])
        assert torch.equal(got[:n], expected) and torch.equal(solo.sequences[0, ids.shape[1] :], expected)
        assert bool((got[n:] == 0).all())  # padding after the row finished
        assert torch.equal(out.sequences[row, :width], batch[row])
        rounds = out.accepted[:, row]
        active = rounds >= 0
        assert bool(active[: int(active.sum())].all())  # a finished row stops counting
        if n < new:
            assert int(expected[-1]) == eos
    assert len(set(lengths)) > 1  # rows finished at different times
    assert out.num_verify_forwards == out.accepted.shape[0]

    via_generate = target.generate(
        batch, attention_mask=mask, custom_generate=speculative_decoding, drafter=drafter, num_draft_tokens=3,
        max_new_tokens=new, eos_token_id=eos, pad_token_id=0,
    )  # fmt: skip
    assert torch.equal(via_generate, out.sequences)


def test_attach_and_detach_drafter(target):
    drafter = make_drafter("medusa", target)
    ids = prompts((6,))[0]
    ref = plain_greedy(target, ids, 10)
    attach_drafter(target, drafter, num_draft_tokens=2)
    try:
        assert torch.equal(target.generate(ids, max_new_tokens=10, do_sample=False), ref)
        stats = target._ppow_drafter_attachment.last_output
        assert isinstance(stats, SpeculativeOutput) and stats.num_verify_forwards == 9
        two = torch.cat([ids, ids])
        assert torch.equal(target.generate(two, max_new_tokens=10, do_sample=False), ref.repeat(2, 1))
        # other assisted methods still work while attached
        assert torch.equal(target.generate(ids, max_new_tokens=10, prompt_lookup_num_tokens=2), ref)
    finally:
        detach_drafter(target)
    assert "generate" not in target.__dict__ and not hasattr(target, "_ppow_drafter_attachment")
    assert torch.equal(target.generate(ids, max_new_tokens=10, do_sample=False), ref)


# --------------------------------------------------------------------------------------------- sampling
def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def _buckets(dist: torch.Tensor, top: int = 15) -> torch.Tensor:
    """Bucket id per token: the `top` likeliest tokens of `dist` get their own bucket, the rest share one."""
    buckets = torch.full(dist.shape, top, dtype=torch.long)
    buckets[dist.topk(top).indices] = torch.arange(top)
    return buckets


def _histogram(samples: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    return torch.bincount(buckets[samples], minlength=int(buckets.max()) + 1).float() / samples.numel()


def _merge(dist: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    return torch.zeros(int(buckets.max()) + 1).index_add_(0, buckets, dist.float())


@pytest.mark.parametrize("draft_length", ["fixed", "auto", "threshold"])
def test_speculative_sampling_keeps_the_target_distribution(draft_length, target):
    """Empirical distribution of the first two generated tokens over many batched fixed-seed runs vs the
    exact target distribution (t2 is the first token a verification emits). The drafter proposes the
    target's own next-token distribution perturbed and restricted to its draft vocabulary, so drafts are
    often accepted and often rejected, and blindly emitting drafts would fail the check."""
    temperature, samples = 2.0, 8000
    prompt = prompts((6,))[0]
    drafter = make_drafter("eagle3", target)
    vocab = torch.arange(VOCAB)
    with torch.no_grad():
        p1 = torch.softmax(target(prompt).logits[0, -1].float() / temperature, -1)
        extended = torch.cat([prompt.repeat(VOCAB, 1), vocab[:, None]], dim=1)  # prompt + every t1
        p2_given = torch.softmax(target(extended).logits[:, -1].float() / temperature, -1)  # (V, V)
        feats = capture_features(target, extended).aux_hidden_states
        anchors = torch.full((VOCAB, 1), prompt.shape[1] - 1)
        keys = (
            draft_windows(drafter, feats, extended, anchors, 1, return_logits=True).logits[:, 0, 0, 0].float()
        )
    draft_target_ids = drafter.draft_to_target(torch.arange(drafter.config.draft_vocab_size))
    g = torch.Generator().manual_seed(0)
    noise = 0.7 * torch.randn(VOCAB, draft_target_ids.numel(), generator=g)
    values = temperature * (
        p2_given[:, draft_target_ids].log() + noise
    )  # q(.|t1) at the drafter's temperature
    drafter.__class__ = OracleEagle3
    drafter.lookup = _Lookup(keys, values)
    q2_given = torch.zeros(VOCAB, VOCAB)
    q2_given[:, draft_target_ids] = torch.softmax(values / temperature, -1)

    lengths = {
        "fixed": {"num_draft_tokens": 2},
        "auto": {"num_draft_tokens": "auto", "max_draft_tokens": 2, "costs": CHEAP},
        "threshold": {"num_draft_tokens": 2, "draft_confidence_threshold": 0.05},
    }
    out = speculative_generate(
        target, drafter, prompt.repeat(samples, 1), max_new_tokens=2, temperature=temperature,
        generator=torch.Generator().manual_seed(1), **lengths[draft_length],
    )  # fmt: skip
    assert int(out.window_sizes[0]) >= 1
    t1, t2 = out.sequences[:, -2], out.sequences[:, -1]
    first_round = out.accepted[0]
    assert 0.2 < float((first_round >= 1).float().mean()) < 0.9  # both branches are exercised

    exact = {"t1": p1, "t2": p1 @ p2_given}
    tokens = {"t1": t1, "t2": t2}
    for name in ("t1", "t2"):
        # Compare on buckets (the 15 likeliest tokens, and the rest) so the sampling noise stays small.
        buckets = _buckets(exact[name])
        direct = [  # noise level of as many direct draws from the exact distribution
            _tv(_histogram(torch.multinomial(exact[name], samples, True, generator=g), buckets),
                _merge(exact[name], buckets))
            for _ in range(5)
        ]  # fmt: skip
        bound = 2.0 * max(direct) + 0.005
        observed = _tv(_histogram(tokens[name], buckets), _merge(exact[name], buckets))
        assert observed < bound, (name, observed, bound)
    # the check has power: emitting drafts blindly, or verifying at twice the temperature, would fail it
    assert _tv(_merge(p1 @ q2_given, buckets), _merge(exact["t2"], buckets)) > 3 * bound
    hotter = torch.softmax(target(extended).logits[:, -1].float() / (2 * temperature), -1)
    assert _tv(_merge(p1 @ hotter, buckets), _merge(exact["t2"], buckets)) > 1.5 * bound


def test_assisted_sampling_returns_draft_distribution_as_candidate_logits(target):
    drafter = make_drafter("eagle3", target)
    seen = []
    original = DrafterCandidateGenerator.get_candidates

    def spy(self, input_ids, **kwargs):
        candidates, logits = original(self, input_ids, **kwargs)
        seen.append((candidates[:, input_ids.shape[1] :], logits))
        return candidates, logits

    DrafterCandidateGenerator.get_candidates = spy
    try:
        torch.manual_seed(0)
        out = generate(
            target, drafter, prompts((6,))[0], num_draft_tokens=3, method="assisted", max_new_tokens=8,
            do_sample=True, temperature=1.5, top_k=0,
        )  # fmt: skip
    finally:
        DrafterCandidateGenerator.get_candidates = original
    assert out.sequences.shape[1] == 6 + 8 and out.num_verify_forwards >= 1
    drafted = [(tokens, logits) for tokens, logits in seen if logits is not None]
    assert drafted
    for tokens, logits in drafted:
        q = logits.softmax(-1)
        torch.testing.assert_close(q.sum(-1), torch.ones(q.shape[:2]))
        assert bool((q[..., ~drafter.t2d] == 0).all())  # nothing outside the draft vocabulary
        assert bool((q.gather(-1, tokens[..., None]) > 0).all())


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs(target):
    drafter = make_drafter("eagle3", target)
    ids = prompts((5,))[0]
    for window in (0, -1):
        with pytest.raises(ValueError, match="num_draft_tokens"):
            speculative_generate(target, drafter, ids, max_new_tokens=4, num_draft_tokens=window)
        with pytest.raises(ValueError, match="num_draft_tokens"):
            generate(target, drafter, ids, num_draft_tokens=window, max_new_tokens=4)
        with pytest.raises(ValueError, match="num_draft_tokens"):
            attach_drafter(target, drafter, num_draft_tokens=window)
    assert "generate" not in target.__dict__

    torch.manual_seed(1)
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    ).eval()  # fmt: skip
    with pytest.raises(DrafterTargetMismatchError, match="vocab_size"):
        speculative_generate(other, drafter, ids, max_new_tokens=4)
    with pytest.raises(DrafterTargetMismatchError):
        generate(other, drafter, ids, max_new_tokens=4)
    with pytest.raises(DrafterTargetMismatchError):
        attach_drafter(other, drafter)

    long_prompt = torch.randint(3, VOCAB, (1, 510))
    with pytest.raises(ValueError, match="context of 512"):
        speculative_generate(target, drafter, long_prompt, max_new_tokens=8)
    with pytest.raises(ValueError, match="context of 512"):
        generate(target, drafter, long_prompt, max_new_tokens=8, method="loop")
    right_padded = torch.ones(2, 5, dtype=torch.long)
    right_padded[1, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        speculative_generate(target, drafter, ids.repeat(2, 1), right_padded, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, drafter, ids, max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="batch size 1"):
        generate(target, drafter, ids.repeat(2, 1), method="assisted", max_new_tokens=4)
    with pytest.raises(ValueError, match="method"):
        generate(target, drafter, ids, method="tree", max_new_tokens=4)


# ------------------------------------------------------------------------------------------- integration
@pytest.mark.integration
def test_lossless_on_embedded_target():
    from ppow_trl.target import load_target

    model, tokenizer = load_target("embedded")
    texts = [
        "What is the capital of France?",
        "Write a Python function that reverses a list.",
        "Name three colors.",
    ]
    new = 24
    inputs = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        for t in texts
    ]  # fmt: skip
    refs = [plain_greedy(model, ids, new, eos=tokenizer.eos_token_id) for ids in inputs]
    drafter = make_oracle("eagle3", model, refs, window=4)
    for ids, ref in zip(inputs, refs):
        assisted = generate(
            model, drafter, ids, num_draft_tokens=4, max_new_tokens=new, eos_token_id=tokenizer.eos_token_id
        )
        loop = speculative_generate(
            model, drafter, ids, max_new_tokens=new, num_draft_tokens=4, eos_token_id=tokenizer.eos_token_id
        )
        assert torch.equal(assisted.sequences, ref)
        assert torch.equal(loop.sequences, ref)
        assert loop.tau > 1.5
