"""Dynamic draft trees (EAGLE-2's construction) for greedy speculative decoding.

A round grows a tree from the last committed row: the drafter's `width` most likely first tokens, then, layer by
layer, the children (again the `width` most likely) of the layer's `width` nodes with the highest path
probability under the drafter. Every node drafted joins a pool; the round verifies the pool's best `n` nodes by
path probability (a parent always ranks above its children, so they form a tree) in one target forward under a
tree attention mask, after the current token x_n. Prompt-lookup tokens join as one more branch from x_n.

Greedy acceptance walks the tree: a node holds if its token is the target's greedy token after its parent and
its parent holds; the deepest node that holds (the first in forward order on a tie) is the accepted path, and
the target's token after it is the bonus. Output is plain greedy's.

Forward layout: row 0 is x_n (the root), rows 1.. the nodes in an order where parents come first; `parents` holds
each row's parent row (-1 for the root) and `depths` its depth (0 for the root).

`TreeSizer` chooses a round's depth and size from the drafter's calibrated confidence and the cost table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ppow_trl.decoding.draft_length import LearnedState, verify_cost
from ppow_trl.models.common import ChainState

__all__ = ["DraftTree", "TreeSizer", "accept_greedy", "ancestors", "grow_tree", "tree_attention"]


@dataclass
class DraftTree:
    """A pool of drafted nodes, parents before children: tokens (B, N) target ids, parents (B, N) the parent's
    index in the pool (-1: the root), depths (B, N) from 1, scores (B, N) the log path probability."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def best(self, count: int) -> DraftTree:
        """The `count` nodes with the highest path probability (ties: pool order, so a parent stays ahead of a
        child with the same score), kept in pool order and re-indexed."""
        count = min(count, self.size)
        order = torch.sort(self.scores, dim=1, descending=True, stable=True).indices[:, :count]
        chosen = order.sort(dim=1).values
        parents = self.parents.gather(1, chosen)
        # each parent is among the chosen (it outranks its child): its new index is its rank in `chosen`
        remapped = torch.searchsorted(chosen, parents.clamp(min=0))
        return DraftTree(
            self.tokens.gather(1, chosen),
            torch.where(parents < 0, parents, remapped),
            self.depths.gather(1, chosen),
            self.scores.gather(1, chosen),
        )


@torch.no_grad()
def grow_tree(
    model: PreTrainedModel,
    state: ChainState,
    width: int,
    max_depth: int,
    keep_growing: Callable[[int, torch.Tensor], bool] | None = None,
) -> DraftTree:
    """Grow a pool of w + (d - 1) w^2 nodes over d <= `max_depth` layers, one drafter pass per layer after the
    first (`DrafterMixin.tree_logits`). `keep_growing(depth, scores)` (scores (B, w) of the nodes the next layer
    would expand) may stop early."""
    root, _ = model.tree_logits(state, None, None, None, 0)
    top = root[:, 0].float().log_softmax(-1).topk(width, dim=-1)
    batch = top.values.shape[0]
    device = top.values.device
    tokens = [model.draft_to_target(top.indices)]
    scores = [top.values]
    parents = [torch.full((batch, width), -1, dtype=torch.long, device=device)]
    depths = [1]
    layer_start, layer_tokens, layer_scores = 0, tokens[0], scores[0]
    nodes, node_parents = None, None  # the drafter's state of the last expanded layer
    for depth in range(1, max_depth):
        chosen = layer_scores.topk(width, dim=1).indices  # (B, w) within the layer
        chosen_scores = layer_scores.gather(1, chosen)
        if keep_growing is not None and not keep_growing(depth, chosen_scores):
            break
        expand_parents = None if node_parents is None else node_parents.gather(1, chosen)
        logits, nodes = model.tree_logits(state, nodes, expand_parents, layer_tokens.gather(1, chosen), depth)
        if logits is None:
            break
        top = logits.float().log_softmax(-1).topk(width, dim=-1)  # (B, w, w)
        layer_scores = (chosen_scores[..., None] + top.values).flatten(1)
        layer_tokens = model.draft_to_target(top.indices).flatten(1)
        node_parents = torch.arange(width, device=device).repeat_interleave(width).expand(batch, -1)
        parents.append((layer_start + chosen).repeat_interleave(width, dim=1))
        layer_start = sum(t.shape[1] for t in tokens)
        tokens.append(layer_tokens)
        scores.append(layer_scores)
        depths.append(depth + 1)
    depth_columns = [torch.full_like(t, d) for t, d in zip(tokens, depths)]
    return DraftTree(
        torch.cat(tokens, 1), torch.cat(parents, 1), torch.cat(depth_columns, 1), torch.cat(scores, 1)
    )


def ancestors(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(B, n, n) bool: row i's ancestors in the forward, itself included (`parents` (B, n), -1 at the root)."""
    batch, n = parents.shape
    seen = torch.eye(n, dtype=torch.bool, device=parents.device).repeat(batch, 1, 1)
    current = parents
    for _ in range(max_depth):  # one hop up per depth; the tree is shallow
        has = current >= 0
        seen |= torch.nn.functional.one_hot(current.clamp(min=0), n).bool() & has[..., None]
        current = torch.where(has, parents.gather(1, current.clamp(min=0)), current)
    return seen


def tree_attention(past: torch.Tensor, seen: torch.Tensor, filler: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, n + filler, L + n + filler) additive mask of the verification forward: every row sees the past as
    `past` (B, L) says and its ancestors in the tree (`ancestors`); filler rows see all that precedes them."""
    batch, n, _ = seen.shape
    total = n + filler
    device = seen.device
    new = torch.ones(total, total, dtype=torch.bool, device=device).tril().repeat(batch, 1, 1)
    new[:, :n, :n] = seen
    allowed = torch.cat([past[:, None, :].expand(-1, total, -1), new], dim=-1)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def accept_greedy(
    greedy: torch.Tensor,
    ids: torch.Tensor,
    parents: torch.Tensor,
    depths: torch.Tensor,
    valid: torch.Tensor,
    seen: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accepted path of a verified tree: greedy (B, n) the target's token after each forward row, ids (B, n)
    the rows' tokens, valid (B, n) rows that may be accepted, `seen` from `ancestors`.

    Returns (accepted (B,) its depth, bonus (B,) the target's token after it, path (B, D + 1) the forward row at
    each depth 0..D of the path, D = the deepest row; entries past the accepted depth are 0; holds (B, n) the rows
    whose whole path holds)."""
    batch, n = ids.shape
    device = ids.device
    holds = ids == greedy.gather(1, parents.clamp(min=0))
    holds = (holds & valid) | (parents < 0)
    path_holds = ~(seen & ~holds[:, None, :]).any(-1)
    rank = torch.where(path_holds, depths * (n + 1) - torch.arange(n, device=device), -1)
    best = rank.argmax(1)
    accepted = depths.gather(1, best[:, None])[:, 0]
    bonus = greedy.gather(1, best[:, None])[:, 0]
    deepest = int(depths.max())
    on_path = seen[torch.arange(batch, device=device), best]  # (B, n) the best row's ancestors
    slot = torch.where(on_path, depths, deepest + 1)
    path = torch.zeros(batch, deepest + 2, dtype=torch.long, device=device)
    path.scatter_(1, slot, torch.arange(n, device=device).expand(batch, -1))
    return accepted, bonus, path[:, : deepest + 1], path_holds


@dataclass
class TreeSizer(LearnedState):
    """How deep and how large a round's tree is, and how much of the lookup branch it verifies ("auto"). Tokens
    are priced at r, the tokens per unit of cost achieved so far (Dinkelbach's rule for the best rate, as for
    chains in `ppow_trl.decoding.draft_length`).

    costs: c(n) normalised so c(1) = 1 (a plain step), already padded to the forward shapes the loop runs;
    draft_cost: one drafter layer in the same unit. A node's worth is its path probability under the drafter
    times a calibration learned per rank (the node ranked i-th by path probability: accepted i-th nodes / their
    summed path probability, decayed), since a drafter's tail of unlikely branches is over-confident in a way
    one factor cannot fix; a lookup token's worth is the rate at which the lookup branch was accepted that deep.
    Both start optimistic (factor 1, rate 1/2), so what was never verified gets tried.

    A layer is drafted while the best node it would expand is worth more than a drafter layer plus one more
    verified token; the round verifies the tree nodes and lookup tokens that maximise worth - r c(1 + count).
    What it learned persists per drafter (`LearnedState.remember`)."""

    LEARNED = ("rate", "_hits", "_mass", "_lookup_hits", "_lookup_tries")
    SHAPE = ("max_nodes", "max_lookup")

    costs: list[float]
    draft_cost: float = 0.0
    max_nodes: int = 32
    max_lookup: int = 8
    decay: float = 0.95
    rate: float = 1.0
    _hits: list = field(default_factory=list, init=False)  # per rank: decayed accepted nodes (+ prior 1)
    _mass: list = field(default_factory=list, init=False)  # per rank: decayed path probability (+ prior 1)
    _lookup_hits: list = field(default_factory=list, init=False)  # per depth: decayed accepted lookup tokens
    _lookup_tries: list = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        table = torch.cummax(torch.as_tensor(self.costs, dtype=torch.float64), 0).values
        self.costs = (table / table[0]).tolist()
        self.draft_cost = self.draft_cost / float(table[0])
        self._hits, self._mass = [1.0] * self.max_nodes, [1.0] * self.max_nodes
        self._lookup_hits, self._lookup_tries = [1.0] * self.max_lookup, [2.0] * self.max_lookup

    def c(self, tokens: int) -> float:
        return verify_cost(self.costs, tokens)

    def calibration(self, rank: int) -> float:
        rank = min(rank, self.max_nodes - 1)
        return self._hits[rank] / self._mass[rank]

    def keep_growing(self, depth: int, scores: torch.Tensor) -> bool:
        best = float(scores.max(1).values.exp().min())  # the row that needs it least decides
        nodes, width = scores.shape[1] * depth, scores.shape[1]
        worth = best * self.calibration(nodes)
        per_token = (self.c(1 + nodes + width) - self.c(1 + nodes)) / width  # a verified token, around here
        return worth > self.rate * (self.draft_cost + per_token)

    def size(self, tree: DraftTree, lookup: torch.Tensor, rows: int = 1) -> tuple[int, int]:
        """(tree nodes, lookup tokens) to verify; `lookup` (B, m) marks each row's valid lookup tokens."""
        probs = torch.sort(tree.scores, dim=1, descending=True).values.exp().mean(0)[: self.max_nodes]
        node_worth = [p * self.calibration(i) for i, p in enumerate(probs.tolist())]
        found = lookup.float().mean(0).tolist()[: self.max_lookup]
        lookup_worth = [f * self._lookup_hits[j] / self._lookup_tries[j] for j, f in enumerate(found)]
        # both lists fall with their index: take the best of either head while it pays
        nodes = tokens = 0
        gain, best, best_shape = 0.0, -self.rate * self.c(rows), (0, 0)
        while nodes < len(node_worth) or tokens < len(lookup_worth):
            take_node = tokens >= len(lookup_worth) or (
                nodes < len(node_worth) and node_worth[nodes] >= lookup_worth[tokens]
            )
            if take_node:
                gain, nodes = gain + node_worth[nodes], nodes + 1
            else:
                gain, tokens = gain + lookup_worth[tokens], tokens + 1
            value = gain - self.rate * self.c(rows * (1 + nodes + tokens))
            if value > best:
                best, best_shape = value, (nodes, tokens)
        return best_shape

    def end_round(
        self,
        tree: DraftTree,
        held: torch.Tensor,
        lookup_valid: torch.Tensor,
        lookup_held: torch.Tensor,
        cost: float,
    ) -> None:
        """Learn from a verified round, rows that took part only: the tree nodes verified (`tree`) and which of
        them lie on the accepted path (`held` (B, N)); the lookup tokens verified (`lookup_valid` (B, m)) and
        which were accepted (`lookup_held`); the round's cost in the table's unit."""
        if tree.size:
            order = torch.sort(tree.scores, dim=1, descending=True, stable=True)
            hits = held.gather(1, order.indices).double().sum(0).tolist()
            mass = order.values.exp().double().sum(0).tolist()
            for i in range(min(tree.size, self.max_nodes)):
                self._hits[i] = self.decay * self._hits[i] + hits[i]
                self._mass[i] = self.decay * self._mass[i] + mass[i]
        tries, found = lookup_valid.double().sum(0).tolist(), lookup_held.double().sum(0).tolist()
        for j in range(min(len(tries), self.max_lookup)):
            self._lookup_tries[j] = self.decay * self._lookup_tries[j] + tries[j]
            self._lookup_hits[j] = self.decay * self._lookup_hits[j] + found[j]
        accepted = torch.maximum(held.sum(1), lookup_held.sum(1))
        rate = (float(accepted.sum()) + accepted.numel()) / max(cost, 1e-9)
        self.rate = max(1.0, self.decay * self.rate + (1 - self.decay) * rate)
