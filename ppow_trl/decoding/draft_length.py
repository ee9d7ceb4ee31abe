"""How many tokens to draft in a speculative round: a fixed confidence threshold, or the window that buys the
most expected tokens per unit of cost ("auto").

The pure functions price windows with a cost table: `costs[n-1]` = c(n), the cost of a cached target forward
over n tokens (in any unit, e.g. plain decoding steps), and `draft_cost` = the cost of one drafter step
(`ppow_trl.decoding.cost.measure_costs` measures both). With per-step acceptance probabilities p_1..p_K
(the drafter's confidence), a window of k draft tokens yields E_k = 1 + sum_{j<=k} p_1 * ... * p_j tokens in
expectation (the target always adds one) and costs c(k+1) plus the k draft steps.

`DraftLengthPolicy` applies them one draft step at a time inside a decoding loop. Its decisions depend only
on the drafter's distributions q_1..q_j, never on the token drawn at the step being decided, so speculative
sampling stays lossless: whether d_j joins the window is decided from q_j (computed from the already-included
d_1..d_{j-1}) before d_j counts. A window of 0 (a plain step) is allowed; when the drafter has been useless
for a while the policy skips drafting entirely and only probes it, after 1, 2, 4, ... up to `probe_every`
skipped rounds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DraftLengthPolicy",
    "best_window",
    "expected_tokens",
    "round_costs",
    "threshold_window",
    "verify_cost",
]


def expected_tokens(accept_probs: torch.Tensor) -> torch.Tensor:
    """(..., K) per-step acceptance probabilities -> (..., K+1) expected tokens of windows k = 0..K:
    E_k = 1 + sum_{j<=k} prod_{i<=j} p_i (a chain stops at its first rejection; the target adds one)."""
    reach = torch.cumprod(accept_probs.clamp(0.0, 1.0), dim=-1)
    ones = torch.ones_like(accept_probs[..., :1])
    return torch.cat([ones, 1.0 + reach.cumsum(-1)], dim=-1)


def verify_cost(costs: torch.Tensor | Sequence[float], num_tokens: int) -> float:
    """c(num_tokens) from the table `costs[n-1]` = c(n), extrapolated linearly past its end."""
    if num_tokens < 1:
        raise ValueError(f"a forward verifies at least one token, got {num_tokens}")
    # plain floats: the policy prices several windows per draft step, and a tensor per call cost more than
    # the pricing itself
    table = costs.double().reshape(-1).tolist() if isinstance(costs, torch.Tensor) else costs
    if num_tokens <= len(table):
        return float(table[num_tokens - 1])
    slope = float(table[-1] - table[-2]) if len(table) > 1 else float(table[-1])
    return float(table[-1]) + slope * (num_tokens - len(table))


def round_costs(
    costs: torch.Tensor | Sequence[float], draft_cost: float, max_window: int, rows: int = 1
) -> torch.Tensor:
    """(max_window+1,) cost of a round with a window of k = 0..max_window draft tokens: the target forward
    over `rows` * (k+1) tokens plus k drafter steps (a drafter step serves all rows at once)."""
    return torch.tensor(
        [verify_cost(costs, rows * (k + 1)) + k * draft_cost for k in range(max_window + 1)],
        dtype=torch.float64,
    )


def best_window(
    accept_probs: torch.Tensor, costs: torch.Tensor | Sequence[float], draft_cost: float
) -> torch.Tensor:
    """The window k in 0..K maximising expected tokens per unit of cost, per row of (..., K) probabilities.
    Ties go to the shorter window."""
    window = accept_probs.shape[-1]
    ratio = expected_tokens(accept_probs.double()) / round_costs(costs, draft_cost, window).to(
        accept_probs.device
    )
    best = ratio.max(dim=-1, keepdim=True).values
    return (ratio >= best * (1 - 1e-9)).long().argmax(-1)


def threshold_window(accept_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Draft while the drafter's confidence is >= threshold: k = the number of leading steps that pass."""
    passing = (accept_probs >= threshold).long()
    return torch.cumprod(passing, dim=-1).sum(-1)


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) drafter logits -> (...,) the drafter's confidence: its largest softmax probability (T = 1)."""
    return torch.softmax(logits.float(), dim=-1).amax(-1)


def _solve_calibration(
    reach: Sequence[float], observed: float, low: float = 0.02, high: float = 5.0
) -> float:
    """The a in [low, high] with sum_j a^j * reach[j-1] = observed: the per-step factor that, applied to every
    step's confidence, predicts the accepted draft tokens seen (a chain's step j counts a^j, so the ratio of
    the sums is not it once windows are longer than one). Bisection; the sum grows with a."""

    def predicted(a: float) -> float:
        return sum(r * a ** (j + 1) for j, r in enumerate(reach))

    if predicted(low) >= observed:
        return low
    if predicted(high) <= observed:
        return high
    for _ in range(40):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if predicted(mid) < observed else (low, mid)
    return 0.5 * (low + high)


class LearnedState:
    """What a decoding policy learns about its drafter (the attributes in `LEARNED`), kept on disk between
    processes: `remember(path)` reads a file written for the same `SHAPE` attributes (another shape is ignored),
    `save` writes it; a failed write only warns."""

    LEARNED: tuple[str, ...] = ()
    SHAPE: tuple[str, ...] = ()
    store: Path | None = None

    def remember(self, path: Path) -> None:
        """Keep what is learned at `path`, starting from what a file there holds."""
        self.store = path
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if all(state.get(name) == getattr(self, name) for name in self.SHAPE) and all(
            name in state for name in self.LEARNED
        ):
            for name in self.LEARNED:
                setattr(self, name, state[name])

    def save(self) -> None:
        if self.store is None:
            return
        state = {name: getattr(self, name) for name in (*self.SHAPE, *self.LEARNED)}
        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.store)
        except OSError as err:
            logger.warning("could not keep the decoding calibration at %s: %s", self.store, err)
            self.store = None


@dataclass
class DraftLengthPolicy(LearnedState):
    """Per-round draft length for a decoding loop (see the module docstring).

    mode "auto": include draft step j while some window that contains it is expected to add more tokens than
        it costs at the running rate (below); "threshold": include it while its confidence is >= `threshold`.
    max_window: K_max. costs: the c(n) table (normalised so c(1) = 1, a plain step); draft_cost: one drafter
    step; commit_cost: committing verified rows to the drafter (paid once per drafting round); same unit.

    "auto" prices tokens at r, a running estimate of the tokens per unit cost achieved (never below a plain
    step's 1/c(1)): a window of k tokens is worth E_k - r * (c(k+1) + drafting) (Dinkelbach's rule for the best
    rate; costs already paid are left out), later steps' probabilities predicted by the current one. The
    drafter's confidence is calibrated by one factor a per step (p_j = a * confidence_j, capped at 1), solved
    so that the accepted draft tokens of recent rounds equal their prediction (an over-confident drafter is not
    believed for long; an under-confident one, such as a drafter trained on the target's soft distribution
    and verified greedily, is believed more); when even the first step is not
    worth drafting, the round is a plain step and the drafter is probed (one token forced into the window)
    after 1, 2, 4, ... skipped rounds, at most `probe_every`. The calibration starts from a prior of
    `prior_tokens` predicted tokens at face value (fading like the data), so one unlucky round does not silence a
    good drafter.
    """

    mode: str = "auto"
    max_window: int = 8
    costs: Sequence[float] | torch.Tensor = (1.0,)
    draft_cost: float = 0.0
    commit_cost: float = 0.0
    threshold: float = 0.4
    probe_every: int = 16
    prior_tokens: float = 1.0
    decay: float = 0.9
    rate: float = field(default=1.0, init=False)
    calibration: float = field(default=1.0, init=False)
    _reach: list = field(default_factory=list, init=False)  # decayed sum of prod_{i<=j} confidence_i, per j
    _observed: float = field(default=0.0, init=False)
    _first: float = field(default=1.0, init=False)
    _skipped: int = field(default=0, init=False)
    _skip_limit: int = field(default=1, init=False)
    _round: dict = field(default_factory=dict, init=False)
    # The `ppow_trl.decoding.cost.CostMonitor` that reprices this policy from timed rounds (set by the decoding
    # loops for measured tables).
    monitor: Any = field(default=None, init=False, repr=False)
    store: Path | None = field(default=None, init=False, repr=False)  # where `save` keeps what was learned
    # what it learns about its drafter across rounds (kept across calls and, with `remember`, runs)
    LEARNED = ("rate", "calibration", "_reach", "_observed", "_first")
    SHAPE = ("max_window",)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "threshold"):
            raise ValueError(f"draft length mode must be 'auto' or 'threshold', got {self.mode!r}")
        if isinstance(self.max_window, bool) or not isinstance(self.max_window, int) or self.max_window < 1:
            raise ValueError(f"the maximum window must be an integer >= 1, got {self.max_window!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"the confidence threshold must be in [0, 1], got {self.threshold}")
        self.reprice(self.costs, self.draft_cost, self.commit_cost)
        # the prior (one step of `prior_tokens` predicted tokens, all accepted) fades with the data
        self._reach = [float(self.prior_tokens)] + [0.0] * (self.max_window - 1)
        self._observed = float(self.prior_tokens)

    def reprice(
        self, costs: Sequence[float] | torch.Tensor, draft_cost: float, commit_cost: float = 0.0
    ) -> None:
        """Price windows with another cost table (any unit), keeping what was learned about the drafter; the
        achieved rate stays valid because costs are normalised so that a plain step c(1) = 1. Probing starts
        over (the next skipped round probes): skipped rounds were judged at the old prices."""
        table = torch.as_tensor(costs, dtype=torch.float64).reshape(-1)
        if table.numel() == 0 or bool((table <= 0).any()):
            raise ValueError("the cost table c(n) needs positive entries")
        table = torch.cummax(table, 0).values  # a longer forward never costs less (measurement noise aside)
        self.costs = (table / table[0]).tolist()
        self.draft_cost = float(draft_cost) / float(table[0])
        self.commit_cost = float(commit_cost) / float(table[0])
        self._skipped, self._skip_limit = 0, 1

    def save(self) -> None:
        if self.mode == "auto":
            super().save()

    @property
    def drafted_steps(self) -> int:
        """Drafter steps run in the current round (included in the window or not)."""
        return int(self._round.get("steps", 0))

    def new_call(self) -> DraftLengthPolicy:
        """Start a new generation: drop the round in flight, keep what was learned about the drafter (its
        calibration, the achieved rate and the probing back-off)."""
        self._round = {}
        return self

    # ------------------------------------------------------------------------------------ pricing
    def _cost(self, window: int, rows: int) -> float:
        return verify_cost(self.costs, rows * (window + 1))

    def _best_extension(self, expected: float, reach: float, p_next: float, window: int, rows: int) -> float:
        """Best value E_k - r * (c(k+1) + (k - window) draft steps) over windows k > `window`, each later step
        accepted with probability `p_next` (expected / reach summed over rows)."""
        best = -float("inf")
        for k in range(window + 1, self.max_window + 1):
            reach *= p_next
            expected += reach
            best = max(best, expected - self.rate * (self._cost(k, rows) + (k - window) * self.draft_cost))
        return best

    # ------------------------------------------------------------------------------------ the loop's calls
    def start_round(self, rows: int = 1) -> bool:
        """Whether to draft at all this round (False: a plain step)."""
        self._round = {"rows": rows, "expected": float(rows), "reach": None, "raw": [], "probe": False}
        if self.mode == "threshold":
            return True
        p_first = min(self._first * self.calibration, 1.0)
        plain = rows - self.rate * self._cost(0, rows)
        drafting = (
            self._best_extension(float(rows), float(rows), p_first, 0, rows) - self.rate * self.commit_cost
        )
        if drafting > plain:
            self._skipped, self._skip_limit = 0, 1
            return True
        self._skipped += 1
        if self._skipped >= self._skip_limit:  # probe; the next probe waits twice as long
            self._skipped, self._skip_limit = 0, min(2 * self._skip_limit, self.probe_every)
            self._round["probe"] = True
            return True
        return False

    def include(self, confidence: torch.Tensor, step: int) -> tuple[bool, bool]:
        """After draft step `step` (1-based) with per-row confidence (B,) (rows that take no part pass 0):
        (include d_step in the window, draft another step)."""
        conf = confidence.detach().double().reshape(-1).cpu()
        self._round["steps"] = step
        if step == 1:
            self._first = float(conf.mean()) if self.mode == "auto" else self._first
        if self.mode == "threshold":
            keep = bool((conf >= self.threshold).any())
            return keep, keep and step < self.max_window
        state = self._round
        rows = state["rows"]
        p = (conf * self.calibration).clamp(0.0, 1.0)
        reach = p if state["reach"] is None else state["reach"] * p
        expected = state["expected"] + float(reach.sum())
        stop_value = state["expected"] - self.rate * self._cost(step - 1, rows)
        include_value = expected - self.rate * self._cost(step, rows)
        extend_value = self._best_extension(expected, float(reach.sum()), float(p.max()), step, rows)
        forced = state["probe"] and step == 1
        if not forced and max(include_value, extend_value) <= stop_value:
            return False, False
        raw_reach = conf if step == 1 else state["raw_reach"] * conf
        state.update(
            reach=reach, expected=expected, raw_reach=raw_reach, raw=[*state["raw"], float(raw_reach.sum())]
        )
        more = step < self.max_window and extend_value > include_value and not forced
        return True, more

    def end_round(self, window: int, accepted: torch.Tensor, cost: float | None = None) -> None:
        """Record the round: the window verified, the accepted draft tokens of each row that took part, and
        (optional) the round's cost in the table's unit (default: its priced cost)."""
        accepted = accepted.detach().reshape(-1).double().cpu().clamp(min=0)
        rows = self._round.get("rows", max(accepted.numel(), 1))
        if cost is None:
            cost = self._cost(window, rows) + (window * self.draft_cost + self.commit_cost if window else 0.0)
        if window > 0 and self.mode == "auto":
            raw = self._round.get("raw", [])
            self._reach = [
                self.decay * r + (raw[j] if j < len(raw) else 0.0) for j, r in enumerate(self._reach)
            ]
            self._observed = self.decay * self._observed + float(accepted.sum())
            self.calibration = _solve_calibration(self._reach, self._observed)
        rate = (float(accepted.sum()) + accepted.numel()) / max(cost, 1e-9)
        self.rate = max(1.0 / self._cost(0, 1), self.decay * self.rate + (1 - self.decay) * rate)
