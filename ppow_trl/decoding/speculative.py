"""Our batched speculative decoding loop: chain drafting, one target forward per round, lossless.

Convention (docs/eagle3.md): drafter row p pairs the target's feature at position p with token x_{p+1}; after a
verification forward over [x_n, d_1..d_K] that accepts a tokens and adds b, rows n..n+a (features
F_n..F_{n+a}, tokens d_1..d_a, b) are committed to the drafter's cache.

`speculative_generate` runs any batch size (left padding, rows that finish at different times) and verifies
with `ppow_trl.decoding.kernels.verify_windows` (the Triton kernel on CUDA). The transformers integration
(the candidate generator for assisted decoding, the `custom_generate` callables, `generate`) is in
`ppow_trl.decoding.hf`.

`SpeculativeOutput.tau` is tau as docs/metrics.md defines it (`ppow_trl.metrics.TAU_DEFINITION`).

Options of `speculative_generate` beyond the chain:
* `costs`: at batch size 1, with a table (given, or measured for "auto"), each verification forward runs at
  `costs.verify_shape(K+1)` tokens: padded with filler tokens (outputs and KV dropped) where the table says a
  longer forward is cheaper.
* `packed`: with prepacked linear layers a (K+1)-token verification costs ~1.1 one-token forwards instead of
  ~1.7 on CPU, and drafting about 40% less.
* `draft_tree_width=w > 1` (greedy): a dynamic draft tree (`ppow_trl.decoding.tree`, EAGLE-2's construction):
  layer by layer, the w most likely children of the w most probable nodes, up to K layers, then the best nodes
  by path probability, verified in one target forward under a tree attention mask. How many: with "auto", the
  count that maximises expected tokens per unit of cost (`TreeSizer`, which also stops growing layers that do
  not pay); with a fixed K at batch size 1 and a cost table, as many as the forward holds for at most 3% more
  than its cheapest shape (`CostTable.tree_room`); else K + w - 1. The accepted path's KV moves into place.
* `prompt_lookup_tokens=m > 0` (greedy): each round also verifies up to m tokens of prompt lookup (the
  continuation of the latest earlier occurrence of the row's last n-gram in its prompt and output,
  `ppow_trl.decoding.lookup`) as one more branch of the round's tree; the round keeps whichever path the target
  accepts for longer. In rounds where "auto" drafts nothing, the lookup is verified alone.

Rows finish at EOS or after max_new_tokens and stop counting; the KV entries of rejected draft tokens stay in
the (shared, batched) target cache only when another row accepted more, and are masked out (at batch size 1
the cache is simply cropped). With B > 1 such masked entries still count towards a sliding attention window,
so sliding-window targets are exact at batch size 1 only.
"""

from __future__ import annotations

import functools
import hashlib
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from ppow_trl import _compat
from ppow_trl.decoding.cost import CostMonitor, CostTable, cost_clock, measure_costs
from ppow_trl.decoding.draft_length import DraftLengthPolicy, top_probability
from ppow_trl.decoding.drafting import ChainDrafter
from ppow_trl.decoding.kernels import verify_windows
from ppow_trl.decoding.lookup import lookup_continuation
from ppow_trl.decoding.tree import DraftTree, TreeSizer, accept_greedy, ancestors, grow_tree, tree_attention
from ppow_trl.models.common import positions_from_mask, sample_token_ids, scatter_draft_probs, unwrap_drafter
from ppow_trl.packed import packed_linears, use_packed_linears
from ppow_trl.target import cache_root, capture_features, vocab_size_of

__all__ = ["SpeculativeOutput", "speculative_generate"]


# ------------------------------------------------------------------------------------------------ output
@dataclass
class SpeculativeOutput:
    """Sequences and acceptance statistics of one speculative `generate` call.

    sequences: (B, T0 + N) prompt (as given, left padding kept) + generated tokens; rows that stopped early
        are filled with the pad token, as in transformers.
    accepted: (R, B) int64 accepted draft tokens k per verification round and row; -1 where the row had
        already finished (it takes no part in that round).
    window_sizes: (R,) int64 drafted tokens verified in each round (K, or fewer when transformers' assisted
        decoding capped the last windows at max_length; a draft tree's nodes; lookup tokens do not count; 0 = a
        plain one-token step).
    num_verify_forwards: R, target forwards after the prefill (batched: one forward serves all rows).
    new_tokens: (B,) generated tokens per row (EOS included, padding excluded).
    timings: seconds per phase when profiling was requested (see `speculative_generate`).
    costs: the cost table "auto" priced the last round with (after any correction from timed rounds, see
        `ppow_trl.decoding.cost.CostMonitor`); None for a fixed K.
    lookup_rounds: (round, row) pairs whose accepted tokens came from the prompt-lookup branch.
    """

    sequences: torch.Tensor
    accepted: torch.Tensor
    window_sizes: torch.Tensor
    num_verify_forwards: int
    new_tokens: torch.Tensor
    timings: dict[str, float] | None = None
    costs: CostTable | None = None
    lookup_rounds: int = 0

    @property
    def rounds_per_row(self) -> torch.Tensor:
        """(B,) verification rounds each row took part in."""
        return (self.accepted >= 0).sum(0)

    def accepted_lengths(self) -> torch.Tensor:
        """k of every (round, row) that verified at least one draft token, flattened."""
        mask = (self.accepted >= 0) & (self.window_sizes[:, None] > 0)
        return self.accepted[mask]

    @property
    def tau(self) -> float:
        """Generated tokens / verification forwards, summed over rows (NaN when nothing was verified)."""
        rounds = int(self.rounds_per_row.sum())
        return float(self.new_tokens.sum()) / rounds if rounds else float("nan")


# ------------------------------------------------------------------------------------------------ checks
def check_num_draft_tokens(num_draft_tokens: Any) -> int | str:
    if num_draft_tokens == "auto":
        return num_draft_tokens
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens (K) must be an integer >= 1 or 'auto', got {num_draft_tokens!r}")
    return num_draft_tokens


def draft_length_policy(
    target: PreTrainedModel,
    model: PreTrainedModel,
    num_draft_tokens: int | str,
    confidence_threshold: float | None = None,
    max_draft_tokens: int = 8,
    costs: CostTable | None = None,
    packed: bool = False,
    padded: bool = False,
    correct_costs: bool | None = None,
) -> DraftLengthPolicy | None:
    """The per-round draft-length policy of `num_draft_tokens` ("auto", or K with a confidence threshold),
    or None for a fixed K. "auto" prices windows with `costs` (default: `measure_costs`, cached), at their
    padded cost when the decoding loop pads verification forwards (`padded`, `CostTable.verify_shape`); its
    policy is kept per drafter (in memory, and on disk for the next process), so each call starts from the
    calibration earlier calls learned.
    `correct_costs` (default: for measured tables, those with `measured_at`) attaches a `CostMonitor`: the
    loops time their rounds and the policy is repriced when the observed costs disagree with the table."""
    num_draft_tokens = check_num_draft_tokens(num_draft_tokens)
    limit = getattr(model, "max_draft_tokens", None)
    if num_draft_tokens != "auto":
        if confidence_threshold is None:
            return None
        window = num_draft_tokens
        return DraftLengthPolicy("threshold", window, threshold=float(confidence_threshold))
    if confidence_threshold is not None:
        raise ValueError(
            "num_draft_tokens='auto' chooses its own windows; a confidence threshold needs an integer K"
        )
    check_num_draft_tokens(max_draft_tokens)
    window = min(max_draft_tokens, limit) if limit else max_draft_tokens
    if costs is None:
        costs = measure_costs(target, model, max_tokens=max(16, window + 1), packed=packed)
    # One policy per drafter and cost table, kept across calls: a 64-token answer is ~25 rounds, too few to
    # learn the drafter's calibration from scratch every time.
    learned = _LEARNED_POLICIES.setdefault(model, {})
    key = _policy_key(window, costs, padded)
    if key not in learned:
        table = costs.padded_verify() if padded else costs.verify
        policy = DraftLengthPolicy(
            "auto", window, costs=table, draft_cost=costs.draft_step, commit_cost=costs.commit
        )
        if correct_costs or (correct_costs is None and costs.measured_at > 0):

            def reprice(corrected: CostTable) -> None:
                table = corrected.padded_verify() if padded else corrected.verify
                policy.reprice(table, corrected.draft_step, corrected.commit)
                # the next call, handed the corrected table (it replaces the cached one), finds this policy
                learned[_policy_key(window, corrected, padded)] = policy

            policy.monitor = CostMonitor(costs, on_correct=reprice)
        policy.remember(_calibration_path(model, key))
        learned[key] = policy
    return learned[key].new_call()


def _calibration_path(model: PreTrainedModel, policy_key: tuple) -> Path:
    """Where "auto" keeps a drafter's calibration for a cost table: named by a sample of the drafter's weights
    (another checkpoint of the same architecture is another drafter) and the policy's key."""
    digest = hashlib.sha256(repr(policy_key).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
        digest.update(name.encode() + str(tuple(tensor.shape)).encode() + sample.numpy().tobytes())
    return cache_root() / "calibration" / f"{digest.hexdigest()[:20]}.json"


def _policy_key(window: int, costs: CostTable, padded: bool) -> tuple:
    return (window, padded, costs.key, tuple(costs.verify), costs.draft_step, costs.commit)


def record_round(
    policy: DraftLengthPolicy | None, draft_seconds: float | None, verify_tokens: int, verify_seconds: float
) -> None:
    """Report a timed round to the policy's `CostMonitor` (if any); `draft_seconds` None = drafting not
    representative (it committed the prompt's rows)."""
    if policy is None or policy.monitor is None:
        return
    steps = policy.drafted_steps if draft_seconds is not None else 0
    policy.monitor.record(steps, draft_seconds or 0.0, verify_tokens, verify_seconds)


def policy_costs(policy: DraftLengthPolicy | None, costs: CostTable | None) -> CostTable | None:
    """The table the policy prices with now (the monitor's after a correction)."""
    return policy.monitor.table if policy is not None and policy.monitor is not None else costs


_LEARNED_POLICIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_drafter_for_target(target: PreTrainedModel, drafter: PreTrainedModel) -> PreTrainedModel:
    """The unwrapped drafter, after checking it was built for this target (raises on a mismatch)."""
    if drafter is None:
        raise ValueError("a drafter is required (pass drafter=... or use attach_drafter)")
    model = unwrap_drafter(drafter)
    if not hasattr(model, "check_target"):
        raise TypeError(f"{type(model).__name__} is not a ppow_trl drafter (Eagle3Drafter or MedusaDrafter)")
    model.check_target(target)
    return model


def _check_integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_context(target: PreTrainedModel, prompt_lengths: torch.Tensor, max_new_tokens: int) -> None:
    context = getattr(target.config, "max_position_embeddings", None)
    longest = int(prompt_lengths.max())
    if context and longest + max_new_tokens > context:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the target's context of "
            f"{context} tokens (max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )


def feature_layers(model: PreTrainedModel) -> list[int] | None:
    """The target layers an EAGLE-3 drafter reads (None for a drafter of the last hidden state)."""
    ids = list(getattr(model.config, "aux_layer_ids", None) or [])
    return ids or None


def draft_probs_mapper(model: PreTrainedModel, vocab_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps (B, K, V_d) draft-vocabulary probabilities to (B, K, V) over the target vocabulary."""
    d2t = getattr(model, "d2t", None)
    if model.config.draft_vocab_size == vocab_size and (d2t is None or not bool(d2t.any())):
        return lambda probs: probs
    return functools.partial(scatter_draft_probs, d2t=d2t, vocab_size=vocab_size, validate=False)


def _check_prompts(
    target: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: Any,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, bool mask) on the target's device, after checking shapes, left padding and the context
    length."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (B, T0) with T0 >= 1, got {tuple(input_ids.shape)}")
    device = next(target.parameters()).device
    input_ids = input_ids.to(device)
    mask = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(device).bool()
    )
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every prompt needs at least one token (a row of attention_mask is all zeros)")
    if not bool(mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (the last column of attention_mask must be all ones)")
    _check_context(target, lengths, max_new_tokens)
    return input_ids, mask


def _check_branches(
    model: PreTrainedModel,
    draft_tree_width: Any,
    prompt_lookup_tokens: Any,
    prompt_lookup_ngram: Any,
    temperature: float,
    draft_confidence_threshold: float | None,
) -> None:
    """Draft trees and prompt-lookup branches: integer options, greedy decoding only, a tree no wider than the
    draft vocabulary and sized by its own path probabilities (no confidence threshold)."""
    _check_integer("draft_tree_width", draft_tree_width, 1)
    _check_integer("prompt_lookup_tokens", prompt_lookup_tokens, 0)
    _check_integer("prompt_lookup_ngram", prompt_lookup_ngram, 1)
    if (draft_tree_width > 1 or prompt_lookup_tokens) and temperature > 0:
        raise ValueError(
            "draft trees (draft_tree_width > 1) and prompt-lookup branches (prompt_lookup_tokens > 0) are verified "
            "greedily; speculative sampling over several branches is not implemented: with temperature > 0 use "
            "chains (draft_tree_width=1, prompt_lookup_tokens=0)"
        )
    if draft_tree_width > 1 and draft_confidence_threshold is not None:
        raise ValueError(
            "draft_confidence_threshold stops a chain; a draft tree (draft_tree_width > 1) is sized by its own "
            "path probabilities: drop the threshold or use draft_tree_width=1"
        )
    if draft_tree_width > model.config.draft_vocab_size:
        raise ValueError(
            f"draft_tree_width={draft_tree_width} asks for more children per node than the drafter's "
            f"{model.config.draft_vocab_size}-token draft vocabulary holds"
        )


# ------------------------------------------------------------------------------------------------ loop
def draft_with_policy(
    chain: ChainDrafter,
    policy: DraftLengthPolicy,
    active: torch.Tensor,
    batch: int,
    commit_queued: Callable[[], None],
    max_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft one round step by step, as long as `policy` includes the steps: (tokens (B, k), probs (B, k, V_d)),
    k = 0 for a plain step. Whether a step joins the window depends on the drafter's distribution at that
    step only (never on the token drawn from it), which keeps speculative sampling lossless."""
    tokens: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    if policy.start_round(batch):
        commit_queued()
        limit = policy.max_window if max_window is None else min(max_window, policy.max_window)
        for step, (token, prob, logits) in enumerate(chain.draft_steps(limit), start=1):
            include, more = policy.include(top_probability(logits).masked_fill(~active, 0.0), step)
            if include:
                tokens.append(token)
                probs.append(prob)
            if not (include and more) or step >= limit:
                break
    if not tokens:
        empty = torch.zeros(batch, 0, dtype=torch.long, device=active.device)
        return empty, torch.zeros(batch, 0, 1, device=active.device)
    return torch.stack(tokens, 1), torch.stack(probs, 1)


def _now(clock: Callable[[], float] | None, device: torch.device) -> float:
    """`clock()` after the device's queued work (0 without a clock)."""
    if clock is None:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock()


class _Timer:
    def __init__(self, profile: bool | Callable[[], float], device: torch.device):
        self.enabled = bool(profile)
        self.clock = profile if callable(profile) else time.perf_counter
        self.sync = self.enabled and device.type == "cuda"
        self.times: dict[str, float] = {}
        self.last = self.clock()

    def lap(self, name: str) -> None:
        if not self.enabled:
            return
        if self.sync:
            torch.cuda.synchronize()
        now = self.clock()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now


@dataclass
class _Rows:
    """Per-row decoding state of the batched loop (all (B,) tensors on the target's device)."""

    generated: torch.Tensor  # (B, max_new_tokens) tokens so far, padded
    num_generated: torch.Tensor
    finished: torch.Tensor
    pending: torch.Tensor  # the last emitted token, not yet run through the target
    cur_pos: torch.Tensor  # its position


def _round_tokens(
    draft_tokens: torch.Tensor,
    accepted: torch.Tensor,
    bonus: torch.Tensor,
    rows: _Rows,
    max_new_tokens: int,
    eos: torch.Tensor | None,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one round emits per row: d_1..d_a then b, cut at EOS and at max_new_tokens.

    Returns (emitted (B, K+1), kept (B, K+1) = the accepted prefix [x_n, d_1..d_a] slots, count (B,) tokens
    to write, 0 for rows already finished, hit_eos (B,))."""
    window = draft_tokens.shape[1]
    emitted = torch.cat([draft_tokens, torch.zeros_like(bonus)[:, None]], dim=1)
    emitted.scatter_(1, accepted[:, None], bonus[:, None])
    kept = steps[None] <= accepted[:, None]
    count = torch.minimum(accepted + 1, max_new_tokens - rows.num_generated)
    hit_eos = torch.zeros_like(rows.finished)
    if eos is not None:
        is_eos = torch.isin(emitted, eos) & kept
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), window + 1)
        count = torch.minimum(count, first_eos + 1)
        hit_eos = first_eos < count
    return emitted, kept, torch.where(~rows.finished, count, 0), hit_eos


def _write_tokens(rows: _Rows, emitted: torch.Tensor, count: torch.Tensor, steps: torch.Tensor) -> None:
    batch, width = emitted.shape
    max_new_tokens = rows.generated.shape[1]
    write = steps[None] < count[:, None]
    index = torch.arange(batch, device=emitted.device)[:, None].expand(-1, width)
    columns = (rows.num_generated[:, None] + steps).clamp(max=max_new_tokens - 1)
    rows.generated[index[write], columns[write]] = emitted[write]
    rows.num_generated += count


@torch.no_grad()
def speculative_generate(
    target: PreTrainedModel,
    drafter: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    num_draft_tokens: int | str = 5,
    temperature: float = 0.0,
    eos_token_id: int | list[int] | torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    logits_warper: Callable[[torch.Tensor], torch.Tensor] | None = None,
    verify_backend: str = "auto",
    profile: bool | Callable[[], float] = False,
    draft_confidence_threshold: float | None = None,
    max_draft_tokens: int = 8,
    costs: CostTable | None = None,
    packed: bool | str = "auto",
    draft_tree_width: int = 1,
    correct_costs: bool | None = None,
    prompt_lookup_tokens: int = 0,
    prompt_lookup_ngram: int = 3,
) -> SpeculativeOutput:
    """Batched speculative decoding with a drafter, K draft tokens per round; lossless (module docstring).

    Args:
        target: the frozen target (any transformers causal LM whose base model returns hidden states).
        drafter: an `Eagle3Drafter` / `MedusaDrafter` built for `target`.
        input_ids: (B, T0) prompts, left-padded; attention_mask (B, T0) 1 for real tokens (None = no padding).
        max_new_tokens: tokens to generate per row at most (EOS included).
        num_draft_tokens: K, draft tokens per verification window, or "auto": each round drafts while the
            drafter's confidence justifies it and verifies the window that maximises expected tokens per unit
            of cost (`ppow_trl.decoding.draft_length`), 0 (a plain step) to `max_draft_tokens`.
        temperature: 0 = greedy (plain greedy's tokens, up to floating-point differences between a (K+1)-token
            and a 1-token forward); > 0 = lossless speculative sampling (the drafter at the same temperature).
        eos_token_id: id(s) that end a row (kept in the output); None = only max_new_tokens stops.
        pad_token_id: filler after a row has finished (default: first eos id, else 0).
        generator: torch.Generator for every random draw (first token, drafts, acceptance, residuals).
        logits_warper: optional context-free transform of target logits (..., V) -> (..., V) replacing the
            division by temperature (e.g. transformers' temperature + top-k warpers); sampling only.
        verify_backend: `verify_windows` backend ("auto": Triton on CUDA, else the torch reference).
        profile: record seconds per phase (prefill, drafting, drafter commits, target forwards, verification,
            bookkeeping) in `SpeculativeOutput.timings` (True: wall clock; or a clock: `time.process_time`).
        draft_confidence_threshold: with an integer K, stop drafting a round at the first draft token whose
            drafter probability is below this (transformers' `assistant_confidence_threshold`).
        max_draft_tokens: the longest window "auto" may verify.
        costs: the cost table "auto" prices windows with (default: `measure_costs(target, drafter)`, cached).
        packed: run the target's and the drafter's linear layers on prepacked oneDNN weights (CPU fp32; True,
            False or "auto" = where supported and the target's packed copy is small; `ppow_trl.packed`).
        draft_tree_width: greedy only: 1 = a chain; w > 1 = a dynamic draft tree expanding the w best nodes of
            each layer into their w best children, K layers deep ("auto": as deep and as large as pays).
        correct_costs: with "auto", time the rounds and reprice windows when the observed costs disagree with
            the table (`ppow_trl.decoding.cost.CostMonitor`); default: for measured tables only.
        prompt_lookup_tokens: greedy only: verify up to this many tokens of prompt lookup per round; 0 = off.
        prompt_lookup_ngram: the longest n-gram prompt lookup matches (it falls back to shorter ones).
    """
    model = check_drafter_for_target(target, drafter)
    _check_branches(
        model, draft_tree_width, prompt_lookup_tokens, prompt_lookup_ngram, temperature, draft_confidence_threshold
    )  # fmt: skip
    use_packed = use_packed_linears(target, packed)
    input_ids, mask = _check_prompts(target, input_ids, attention_mask, max_new_tokens, temperature)
    auto = check_num_draft_tokens(num_draft_tokens) == "auto"
    if costs is None and auto:
        costs = measure_costs(target, model, max_tokens=max(16, max_draft_tokens + 1), packed=use_packed)
    padded_costs = costs if input_ids.shape[0] == 1 else None  # the table is measured at batch size 1
    policy = None if draft_tree_width > 1 else draft_length_policy(
        target, model, num_draft_tokens, draft_confidence_threshold, max_draft_tokens, costs, use_packed,
        padded_costs is not None, correct_costs,
    )  # fmt: skip
    depth = min(max_draft_tokens, model.max_draft_tokens or max_draft_tokens) if auto else num_draft_tokens
    sizer = tree_sizer(model, costs, padded_costs is not None) if policy is None and auto else None
    sampler = _Sampler(temperature, generator, logits_warper, verify_backend)
    shape = _RoundShape(draft_tree_width, depth, prompt_lookup_tokens, prompt_lookup_ngram, padded_costs, sizer)  # fmt: skip
    with packed_linears(target, use_packed), packed_linears(model, use_packed):
        loop = _SpeculativeLoop(target, model, policy, num_draft_tokens, sampler, shape, profile)
        output = loop.run(input_ids, mask, max_new_tokens, eos_token_id, pad_token_id)
    output.costs = policy_costs(policy, costs) if auto else None
    return output


def tree_sizer(model: PreTrainedModel, costs: CostTable, padded: bool) -> TreeSizer:
    """The "auto" sizing of draft trees for a drafter and cost table, kept across calls (what it learned about
    the drafter's calibration and the achieved rate carries over, as for chains)."""
    learned = _LEARNED_POLICIES.setdefault(model, {})
    key = ("tree", *_policy_key(0, costs, padded))
    if key not in learned:
        learned[key] = TreeSizer(costs.padded_verify() if padded else list(costs.verify), costs.draft_step)
        learned[key].remember(_calibration_path(model, key))
    return learned[key]


def _crop_to(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _pad_right(values: torch.Tensor, count: int, step: int = 0) -> torch.Tensor:
    """(B, n) -> (B, n + count): the last column repeated (`step` added per column: positions)."""
    if not count:
        return values
    last = values[:, -1:]
    extra = last + step * torch.arange(1, count + 1, device=values.device) if step else last.expand(-1, count)
    return torch.cat([values, extra.to(values.dtype)], dim=1)


@dataclass
class _Sampler:
    """How the loop draws tokens: greedily (temperature 0) or by speculative sampling."""

    temperature: float
    generator: torch.Generator | None
    logits_warper: Callable[[torch.Tensor], torch.Tensor] | None
    verify_backend: str

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.sampling:
            return logits
        if self.logits_warper is not None:
            return self.logits_warper(logits)
        return logits * (1.0 / self.temperature)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:  # logits are already warped
        return sample_token_ids(logits, 1.0 if self.sampling else 0.0, self.generator)

    def verify(
        self, logits: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(accepted (B,), bonus (B,)) of a window: warped `logits` (B, K + 1, V), `draft_probs` (B, K, V)
        over the target's vocabulary (None when greedy)."""
        temperature = 1.0 if self.sampling else 0.0  # logits are already warped
        result = verify_windows(
            logits,
            draft_tokens,
            draft_probs,
            temperature,
            generator=self.generator,
            backend=self.verify_backend,
        )
        return result.accepted, result.next_token


@dataclass
class _RoundShape:
    """What each verification forward holds: a chain (`tree_width` 1) or a dynamic draft tree of that width and
    at most `depth` layers, sized by `sizer` ("auto") or by the cost table; up to `lookup_tokens` tokens of prompt
    lookup (`lookup_continuation` with n-grams up to `lookup_ngram`). `costs` (None: no padding) pads the forward
    to its cheaper shape (`CostTable.verify_shape`)."""

    tree_width: int
    depth: int
    lookup_tokens: int
    lookup_ngram: int
    costs: CostTable | None
    sizer: TreeSizer | None

    def tree_shape(self, pool: DraftTree, lookup_valid: torch.Tensor) -> tuple[int, int]:
        """(tree nodes, lookup tokens) a round verifies: the sizer's choice ("auto"), or every lookup token
        found and as many nodes as the forward holds."""
        if self.sizer is not None:
            return self.sizer.size(pool, lookup_valid, lookup_valid.shape[0])
        lookup = lookup_valid.shape[1]
        deepest = int(pool.depths.max())
        if self.costs is None:
            return deepest + self.tree_width - 1, lookup
        return max(self.costs.tree_room(deepest + 1 + lookup) - 1 - lookup, deepest), lookup

    def filler(self, tokens: int) -> int:
        """Filler tokens that bring a forward of `tokens` to the table's cheaper shape."""
        return (self.costs.verify_shape(tokens) if self.costs is not None else tokens) - tokens


@dataclass
class _Round:
    """One round's draft and the forward that verifies it. A chain round's forward is [x_n, d_1..d_K]; a tree
    round's (a draft tree, or a chain with a lookup branch) is x_n then the tree's nodes then the lookup tokens,
    with `parents`/`depths` per row (`ppow_trl.decoding.tree`); then `filler` tokens whose outputs and KV are
    dropped."""

    active: torch.Tensor  # (B,) rows still running
    draft_tokens: torch.Tensor  # (B, K) the chain (K = 0 in a tree round without a chain)
    draft_probs: torch.Tensor  # (B, K, V_d)
    ids: torch.Tensor  # (B, n) the forward's tokens, filler excluded
    positions: torch.Tensor  # (B, n)
    mask: torch.Tensor | None  # the forward's attention mask, filler included (None: no padding anywhere)
    filler: int
    past: int  # the target cache's length before the forward
    parents: torch.Tensor | None = None  # (B, n) tree rounds: each row's parent row, -1 for x_n
    depths: torch.Tensor | None = None  # (B, n)
    valid: torch.Tensor | None = None  # (B, n) rows that may be accepted (lookup tokens past a match are not)
    seen: torch.Tensor | None = None  # (B, n, n) each row's ancestors (`ancestors`)
    nodes: DraftTree | None = None  # the drafted nodes verified (dynamic trees)
    lookup_start: int = 0  # the first lookup row

    @property
    def window(self) -> int:
        return self.draft_tokens.shape[1]

    @property
    def tree(self) -> bool:
        return self.parents is not None


class _SpeculativeLoop:
    """The loop of `speculative_generate` (arguments checked there) over one batch of prompts: the target's
    cache, the rows' committed tokens (`_Rows`), the drafter's chain and the round policy (`policy` None = K =
    `num_draft_tokens` always). Each round drafts, verifies the draft in one target forward, writes the
    accepted tokens and commits their KV and drafter rows."""

    def __init__(
        self,
        target: PreTrainedModel,
        model: PreTrainedModel,
        policy: DraftLengthPolicy | None,
        num_draft_tokens: int | str,
        sampler: _Sampler,
        shape: _RoundShape,
        profile: bool | Callable[[], float],
    ):
        self.target, self.model, self.policy = target, model, policy
        self.num_draft_tokens = num_draft_tokens  # K of every round when there is no policy
        self.sampler, self.shape, self.profile = sampler, shape, profile
        self.device = next(target.parameters()).device
        self.to_full_vocab = draft_probs_mapper(model, vocab_size_of(target))
        self.lm_head = target.get_output_embeddings()
        self.layers = feature_layers(model)
        # Rounds timed for the policy's CostMonitor, on the clock the cost table was measured with.
        self.clock = cost_clock(self.device) if policy is not None and policy.monitor is not None else None
        self.prompt_queued = True  # the first drafting commits the prompt's rows: not a representative round
        # seconds this round's commit spent on rows of earlier rounds that skipped drafting
        self.commit_excess = 0.0
        self.accepted_log: list[torch.Tensor] = []
        self.window_log: list[int] = []
        self.lookup_rounds = 0

    def run(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | list[int] | torch.Tensor | None,
        pad_token_id: int | None,
    ) -> SpeculativeOutput:
        """Decode `input_ids` (B, T0), left-padded under the bool `mask`, until each row ends: at an id of
        `eos_token_id` or after `max_new_tokens`; then `pad_token_id` (default: the first EOS id, else 0)."""
        self.max_new_tokens = max_new_tokens
        self.eos = (
            None
            if eos_token_id is None
            else torch.as_tensor(eos_token_id, dtype=torch.long, device=self.device).reshape(-1)
        )
        if pad_token_id is None:
            pad_token_id = int(self.eos[0]) if self.eos is not None and self.eos.numel() else 0
        self.timer = _Timer(self.profile, self.device)
        self.prefill(input_ids, mask, pad_token_id)
        running = not bool(self.rows.finished.all())
        while running:
            active = ~self.rows.finished
            round_ = self.verification(active, *self.draft(active))
            logits, features = self.target_forward(round_)
            accepted, bonus, tokens, features = self.accept(round_, logits, features)
            emitted, kept = self.write(round_, tokens, accepted, bonus)
            running = not bool(self.rows.finished.all())
            if running:  # the last round leaves the cache and the drafter as they are
                self.commit(round_, features, emitted, kept, accepted, bonus)
            self.timer.lap("bookkeeping")
        # what the policy and the tree sizer learned about the drafter, for the next process
        for learner in (self.policy, self.shape.sizer):
            if learner is not None:
                learner.save()
        return self.output(input_ids)

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int) -> None:
        """The target's features for every prompt position and its first token; starts the cache, the
        drafter's chain (the prompt's rows queued) and the rows' state."""
        self.chain = ChainDrafter(
            self.model, temperature=self.sampler.temperature, generator=self.sampler.generator
        )
        self.cache = DynamicCache(config=self.target.config)
        if hasattr(self.cache, "activate_past_recording"):
            self.cache.activate_past_recording()
        positions = positions_from_mask(mask)
        self.has_holes = not bool(mask.all())
        out = capture_features(
            self.target, input_ids, mask.long() if self.has_holes else None, self.layers, with_logits=False,
            position_ids=positions, cache=self.cache, use_cache=True,
        )  # fmt: skip
        first = self.sampler.pick(self.sampler.warp(self.lm_head(out.last_hidden_state[:, -1]).float()))
        features = getattr(out, self.model.feature_name).masked_fill(~mask[..., None], 0.0)
        self.timer.lap("prefill")
        # Rows verified but not yet committed to the drafter: committed in one call before the next draft
        # (rounds that skip drafting add theirs to the queue).
        self.chain.enqueue(features, torch.cat([input_ids[:, 1:], first[:, None]], dim=1), positions, mask)

        # prompt + generated tokens in one buffer, so prompt lookup searches both without copying
        batch, self.prompt_length = input_ids.shape
        self.context = torch.cat(
            [input_ids, torch.full_like(input_ids[:, :1], pad_token_id).expand(-1, self.max_new_tokens)], 1
        )
        self.context_start = self.prompt_length - mask.sum(1)
        self.rows = _Rows(
            generated=self.context[:, self.prompt_length :],
            num_generated=torch.ones(batch, dtype=torch.long, device=self.device),
            finished=torch.zeros(batch, dtype=torch.bool, device=self.device),
            pending=first,
            cur_pos=mask.sum(1),
        )
        self.rows.generated[:, 0] = first
        self.rows.finished = self.rows.num_generated >= self.max_new_tokens
        if self.eos is not None:
            self.rows.finished |= torch.isin(first, self.eos)
        self.attn = mask.clone()  # the target cache's attention mask
        self.timer.lap("bookkeeping")

    def draft(self, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's chain, after committing the drafter's queued rows: (tokens (B, K), probs (B, K, V_d)),
        K = 0 for a plain step. Times the drafting for the policy's cost monitor."""
        round_start = _now(self.clock, self.device)
        if self.shape.tree_width > 1:
            self.commit_queued()
            sizer = self.shape.sizer
            self.pool = grow_tree(self.model, self.chain.state, self.shape.tree_width, self.shape.depth,
                                  sizer.keep_growing if sizer is not None else None)  # fmt: skip
            self.timer.lap("drafter_draft")
            empty = torch.zeros(active.shape[0], 0, dtype=torch.long, device=self.device)
            return empty, torch.zeros(active.shape[0], 0, 1, device=self.device)
        if self.policy is None:
            self.commit_queued()
            draft_tokens, draft_probs = self.chain.draft(self.num_draft_tokens)
        else:
            draft_tokens, draft_probs = draft_with_policy(
                self.chain, self.policy, active, active.shape[0], self.commit_queued
            )
        drafted_at = _now(self.clock, self.device)
        draft_seconds = (
            None
            if self.prompt_queued and not self.chain.queued
            else drafted_at - round_start - self.commit_excess
        )
        self.round_timing = (draft_seconds, drafted_at)
        self.prompt_queued, self.commit_excess = self.prompt_queued and bool(self.chain.queued), 0.0
        self.timer.lap("drafter_draft")
        return draft_tokens, draft_probs

    def commit_queued(self) -> None:
        if self.chain.queued:
            clock = functools.partial(_now, self.clock, self.device) if self.clock else None
            self.commit_excess += self.chain.commit_queued(clock)
            self.timer.lap("drafter_commit")

    def verification(
        self, active: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor
    ) -> _Round:
        """The round's verification forward: the chain, or the tree (drafted nodes and lookup branch), filler,
        attention mask."""
        batch, window = draft_tokens.shape
        cur_pos = self.rows.cur_pos[:, None]
        found, lookup_valid = self.lookup(active)
        lookup = lookup_valid.shape[1]
        nodes = None
        if self.shape.tree_width > 1:
            count, lookup = self.shape.tree_shape(self.pool, lookup_valid)
            lookup_valid = lookup_valid[:, :lookup]
            found = None if found is None else found[:, :lookup]
            nodes = self.pool.best(count)
        elif lookup and window:  # the chain as a tree, for the lookup branch beside it
            steps = torch.arange(window, device=self.device).expand(batch, -1)
            nodes = DraftTree(
                draft_tokens, steps - 1, steps + 1, torch.zeros(batch, window, device=self.device)
            )
        past = self.cache.get_seq_length()
        if nodes is None and not lookup:
            ids = torch.cat([self.rows.pending[:, None], draft_tokens], dim=1)
            positions = cur_pos + torch.arange(window + 1, device=self.device)
            mask = None
            if self.has_holes:
                ones = torch.ones(batch, window + 1, dtype=torch.long, device=self.device)
                mask = torch.cat([self.attn.long(), ones], dim=1)
            filler = self.shape.filler(ids.shape[1])
            if filler and mask is not None:
                mask = _pad_right(mask, filler)
            self.timer.lap("bookkeeping")
            return _Round(active, draft_tokens, draft_probs, ids, positions, mask, filler, past)
        size = 0 if nodes is None else nodes.size
        ids, parents, depths, valid = [self.rows.pending[:, None]], [torch.full_like(cur_pos, -1)], [], []
        depths.append(torch.zeros_like(cur_pos))
        valid.append(torch.ones_like(cur_pos, dtype=torch.bool))
        if size:
            ids.append(nodes.tokens)
            parents.append(nodes.parents + 1)
            depths.append(nodes.depths)
            valid.append(torch.ones_like(nodes.tokens, dtype=torch.bool))
        if lookup:
            steps = torch.arange(lookup, device=self.device)
            ids.append(found)
            parents.append(torch.where(steps == 0, 0, size + steps).expand(batch, -1))
            depths.append((steps + 1).expand(batch, -1))
            valid.append(lookup_valid)
        ids, parents, depths, valid = (torch.cat(parts, 1) for parts in (ids, parents, depths, valid))
        seen = ancestors(parents, int(depths.max()))
        filler = self.shape.filler(ids.shape[1])
        mask = tree_attention(self.attn, seen, filler, self.lm_head.weight.dtype)
        round_ = _Round(active, draft_tokens, draft_probs, ids, cur_pos + depths, mask, filler, past,
                        parents, depths, valid, seen, nodes if window == 0 else None, 1 + size)  # fmt: skip
        self.timer.lap("bookkeeping")
        return round_

    def lookup(self, active: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The prompt-lookup branch, (tokens (B, m), valid (B, m)); m = 0 without prompt lookup."""
        if not self.shape.lookup_tokens:
            return None, torch.zeros(active.shape[0], 0, dtype=torch.bool, device=self.device)
        # the context's continuation of the last n-gram, from the position after x_n
        end = self.prompt_length + self.rows.num_generated
        found, valid = lookup_continuation(
            self.context, self.context_start, end, self.shape.lookup_tokens, self.shape.lookup_ngram
        )
        valid &= active[:, None]
        longest = int(valid.sum(1).max())
        return found[:, :longest], valid[:, :longest]

    def target_forward(self, round_: _Round) -> tuple[torch.Tensor, torch.Tensor]:
        """(warped logits (B, n, V) of the forward's n tokens, features (B, n + filler, F)); the cache holds
        the n tokens' KV. Reports the round's costs to the policy's monitor."""
        filler = round_.filler
        out = capture_features(
            self.target, _pad_right(round_.ids, filler), round_.mask, self.layers, with_logits=False,
            position_ids=_pad_right(round_.positions, filler, step=1), cache=self.cache, use_cache=True,
        )  # fmt: skip
        if filler:  # the filler's outputs and KV go; causal attention kept them out of the window's
            self.cache.crop(-filler)
        batch, tokens_in = round_.ids.shape
        logits = self.sampler.warp(self.lm_head(out.last_hidden_state[:, :tokens_in]).float())
        features = getattr(out, self.model.feature_name)
        if self.clock is not None:
            draft_seconds, drafted_at = self.round_timing
            verify_seconds = _now(self.clock, self.device) - drafted_at
            record_round(self.policy, draft_seconds, batch * (tokens_in + filler), verify_seconds)
        self.timer.lap("target_forward")
        return logits, features

    def accept(
        self, round_: _Round, logits: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Verify the round: (accepted (B,), bonus (B,), tokens (B, W) of the path kept, features of its slots
        first); the cache keeps the path's W + 1 slots after the past (a tree's: moved into place)."""
        window, active, draft_tokens = round_.window, round_.active, round_.draft_tokens
        accepted = torch.zeros(active.shape[0], dtype=torch.long, device=self.device)
        if window:
            probs = self.to_full_vocab(round_.draft_probs) if self.sampler.sampling else None
            accepted, bonus = self.sampler.verify(logits[:, : window + 1], draft_tokens, probs)
        elif not round_.tree:  # a plain step (a tree's acceptance below gives its own bonus)
            bonus = self.sampler.pick(logits[:, 0])
        if self.policy is not None:  # the chain's own acceptance calibrates the policy
            self.policy.end_round(window, accepted[active])
        if round_.tree:
            accepted, bonus, path, holds = accept_greedy(
                logits.argmax(-1), round_.ids, round_.parents, round_.depths, round_.valid, round_.seen
            )
            draft_tokens = round_.ids.gather(1, path[:, 1:])
            self.learn_tree(round_, holds)
            if not bool((path == torch.arange(path.shape[1], device=self.device)).all()):
                _compat.gather_cache_slots(self.cache, round_.past, path)
                features = features.gather(1, path[..., None].expand(-1, -1, features.shape[-1]))
            if path.shape[1] > 1:
                from_lookup = (accepted > 0) & (path[:, 1] >= round_.lookup_start) & active
                self.lookup_rounds += int(from_lookup.sum())
            _crop_to(self.cache, round_.past + path.shape[1])
        drafted = window if round_.nodes is None else round_.nodes.size  # drafted tokens verified
        self.window_log.append(drafted)
        self.timer.lap("verify")
        return accepted, bonus, draft_tokens, features

    def learn_tree(self, round_: _Round, holds: torch.Tensor) -> None:
        """Tell the tree sizer how deep the drafted nodes held (the lookup branch aside) and what the round
        cost."""
        sizer = self.shape.sizer
        if sizer is None or round_.nodes is None:
            return
        active, start = round_.active, round_.lookup_start
        batch, tokens = round_.ids.shape
        layers = int(self.pool.depths.max())
        cost = sizer.c(batch * (tokens + round_.filler)) + layers * sizer.draft_cost
        lookup_valid = round_.valid[active, start:]
        nodes = round_.nodes
        verified = DraftTree(
            *(part[active] for part in (nodes.tokens, nodes.parents, nodes.depths, nodes.scores))
        )
        sizer.end_round(
            verified, holds[active, 1:start], lookup_valid, holds[active, start:] & lookup_valid, cost
        )

    def write(
        self, round_: _Round, tokens: torch.Tensor, accepted: torch.Tensor, bonus: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the round's tokens into the rows and finish the rows that ended: (emitted, kept) of
        `_round_tokens`."""
        steps = torch.arange(tokens.shape[1] + 1, device=self.device)
        emitted, kept, count, hit_eos = _round_tokens(
            tokens, accepted, bonus, self.rows, self.max_new_tokens, self.eos, steps
        )
        _write_tokens(self.rows, emitted, count, steps)
        self.accepted_log.append(torch.where(round_.active, accepted, -1))
        self.rows.finished = self.rows.finished | hit_eos | (self.rows.num_generated >= self.max_new_tokens)
        return emitted, kept

    def commit(
        self,
        round_: _Round,
        features: torch.Tensor,
        emitted: torch.Tensor,
        kept: torch.Tensor,
        accepted: torch.Tensor,
        bonus: torch.Tensor,
    ) -> None:
        """Keep the KV (and drafter rows) of the accepted prefix [x_n, d_1..d_a] of rows still running."""
        rows = self.rows
        slot_valid = kept & ~rows.finished[:, None]
        used = int(slot_valid.sum(1).max())
        _crop_to(self.cache, round_.past + used)
        self.attn = torch.cat([self.attn, slot_valid[:, :used]], dim=1)
        self.has_holes = self.has_holes or not bool(slot_valid[:, :used].all())
        self.chain.enqueue(
            features[:, :used].masked_fill(~slot_valid[:, :used, None], 0.0),
            emitted[:, :used],
            rows.cur_pos[:, None] + torch.arange(used, device=self.device),
            slot_valid[:, :used],
        )
        rows.cur_pos = torch.where(rows.finished, rows.cur_pos, rows.cur_pos + accepted + 1)
        rows.pending = torch.where(rows.finished, rows.pending, bonus)

    def output(self, input_ids: torch.Tensor) -> SpeculativeOutput:
        rows = self.rows
        longest = int(rows.num_generated.max())
        accepted = (
            torch.stack(self.accepted_log).cpu()
            if self.accepted_log
            else torch.zeros(0, input_ids.shape[0], dtype=torch.long)
        )
        return SpeculativeOutput(
            sequences=torch.cat([input_ids, rows.generated[:, :longest]], dim=1),
            accepted=accepted,
            window_sizes=torch.tensor(self.window_log, dtype=torch.long),
            num_verify_forwards=len(self.accepted_log),
            new_tokens=rows.num_generated.cpu(),
            timings=self.timer.times if self.profile else None,
            lookup_rounds=self.lookup_rounds,
        )
