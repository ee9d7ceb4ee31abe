"""Dynamic draft trees: pool selection, ancestry, greedy acceptance, growth through the drafter, sizing."""

import torch

from ppow_trl.decoding.drafting import ChainDrafter
from ppow_trl.decoding.tree import DraftTree, TreeSizer, accept_greedy, ancestors, grow_tree, tree_attention
from ppow_trl.target import capture_features
from tests.test_drafting import make_drafter
from tests.test_speculative import build_varied_target

# x_n (row 0) -> a (1) -> c (3); x_n -> b (2) -> d (4) -> e (5)
PARENTS = torch.tensor([[-1, 0, 0, 1, 2, 4]])
DEPTHS = torch.tensor([[0, 1, 1, 2, 2, 3]])


def test_ancestors_and_attention_mask_follow_the_parents():
    seen = ancestors(PARENTS, 3)
    assert seen[0, 5].nonzero().flatten().tolist() == [0, 2, 4, 5]
    assert seen[0, 3].nonzero().flatten().tolist() == [0, 1, 3]
    mask = tree_attention(torch.tensor([[False, True]]), seen, filler=1, dtype=torch.float32)
    allowed = mask[0, 0] == 0
    assert allowed.shape == (7, 2 + 7)
    assert allowed[:, 0].logical_not().all() and allowed[:, 1].all()  # the past as given
    assert allowed[5, 2:].nonzero().flatten().tolist() == [0, 2, 4, 5]
    assert allowed[6, 2:].all()  # the filler row sees everything before it


def test_greedy_acceptance_takes_the_deepest_path_that_holds():
    ids = torch.tensor([[7, 10, 11, 12, 13, 14]])
    seen = ancestors(PARENTS, 3)
    valid = torch.ones_like(ids, dtype=torch.bool)
    # the target's token after each row: after x_n comes 11 (b), after b 13 (d), after d 99 (not e)
    greedy = torch.tensor([[11, 0, 13, 0, 99, 5]])
    accepted, bonus, path, holds = accept_greedy(greedy, ids, PARENTS, DEPTHS, valid, seen)
    assert accepted.tolist() == [2] and bonus.tolist() == [99]
    assert path[0, :3].tolist() == [0, 2, 4]
    assert holds[0].tolist() == [True, False, True, False, True, False]
    # the same tree with d marked invalid (a lookup token past its match) stops at b
    valid[0, 4] = False
    accepted, bonus, path, _ = accept_greedy(greedy, ids, PARENTS, DEPTHS, valid, seen)
    assert accepted.tolist() == [1] and bonus.tolist() == [13] and path[0, :2].tolist() == [0, 2]


def test_best_nodes_form_a_tree_in_pool_order():
    pool = DraftTree(
        tokens=torch.tensor([[1, 2, 3, 4, 5]]),
        parents=torch.tensor([[-1, -1, 0, 1, 3]]),
        depths=torch.tensor([[1, 1, 2, 2, 3]]),
        scores=torch.tensor([[-0.1, -2.0, -3.0, -2.1, -2.2]]),
    )
    best = pool.best(3)
    assert best.tokens.tolist() == [[1, 2, 4]]
    assert best.parents.tolist() == [[-1, -1, 1]]  # node 4's parent (pool 1) is now at index 1
    assert pool.best(99).size == 5


def test_grown_tree_holds_the_greedy_chain_and_scores_paths():
    """The tree's best path at every depth is the chain the drafter drafts greedily, and scores are log path
    probabilities (a child never outranks its parent)."""
    target = build_varied_target(seed=5)
    for kind in ("eagle3", "medusa"):
        drafter = make_drafter(kind, target)
        ids = torch.randint(3, target.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
        feats = getattr(capture_features(target, ids, None, getattr(drafter.config, "aux_layer_ids", None) or None,
                                         with_logits=False), drafter.feature_name)  # fmt: skip
        chain = ChainDrafter(drafter)
        chain.commit(feats, torch.cat([ids[:, 1:], ids[:, :1]], 1), torch.arange(9).expand(2, -1))
        greedy, _ = chain.draft(3)
        tree = grow_tree(drafter, chain.state, width=3, max_depth=3)
        assert tree.size == 3 + 2 * 9
        for depth in (1, 2, 3):
            at = tree.depths == depth
            best = torch.where(at, tree.scores, -float("inf")).argmax(1)
            assert torch.equal(tree.tokens.gather(1, best[:, None])[:, 0], greedy[:, depth - 1]), (
                kind,
                depth,
            )
        parent_scores = tree.scores.gather(1, tree.parents.clamp(min=0))
        assert bool(((tree.scores <= parent_scores + 1e-6) | (tree.parents < 0)).all())


def test_tree_sizer_learns_which_ranks_pay():
    """Nodes ranked below the first are never accepted: the sizer stops verifying them; a lookup branch that
    always holds three deep is verified three deep."""
    sizer = TreeSizer([1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5], draft_cost=0.05)
    pool = DraftTree(
        torch.arange(8)[None], torch.tensor([[-1, -1, -1, -1, 0, 0, 1, 1]]),
        torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2]]), torch.tensor([[-0.3, -1.0, -1.2, -1.5, -0.9, -1.6, -2.0, -2.2]]),
    )  # fmt: skip
    lookup = torch.ones(1, 4, dtype=torch.bool)
    first_nodes, first_lookup = sizer.size(pool, lookup)
    assert first_nodes >= 3  # optimistic at first
    for _ in range(60):
        held = torch.zeros(1, 8, dtype=torch.bool)
        held[0, 0] = True
        sizer.end_round(pool, held, lookup, torch.tensor([[True, True, True, False]]), cost=1.3)
    nodes, tokens = sizer.size(pool, lookup)
    assert nodes < first_nodes and nodes >= 1
    assert tokens == 3


def test_tree_sizer_keeps_what_it_learned_on_disk(tmp_path):
    """A new process starts from the last one's calibration; a file for another shape is ignored."""
    pool = DraftTree(torch.arange(3)[None], torch.tensor([[-1, -1, 0]]), torch.tensor([[1, 1, 2]]),
                     torch.tensor([[-0.2, -1.0, -0.9]]))  # fmt: skip
    first = TreeSizer([1.0, 1.1, 1.2, 1.3])
    first.remember(tmp_path / "sizer.json")
    for _ in range(5):
        first.end_round(pool, torch.tensor([[True, False, True]]), torch.zeros(1, 0, dtype=torch.bool),
                        torch.zeros(1, 0, dtype=torch.bool), cost=1.2)  # fmt: skip
    first.save()
    second = TreeSizer([1.0, 1.1, 1.2, 1.3])
    assert second.calibration(0) == 1.0
    second.remember(tmp_path / "sizer.json")
    assert second.calibration(0) == first.calibration(0) != 1.0 and second.rate == first.rate
    other = TreeSizer([1.0, 1.1, 1.2, 1.3], max_nodes=8)
    other.remember(tmp_path / "sizer.json")
    assert other.calibration(0) == 1.0
