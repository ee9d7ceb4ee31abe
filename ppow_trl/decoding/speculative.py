"""Our batched speculative decoding loop: chain drafting, one target forward per round, lossless.

Convention (docs/eagle3.md): drafter row p pairs the target's feature at position p with token x_{p+1}; after a
verification forward over [x_n, d_1..d_K] that accepts a tokens and adds b, rows n..n+a (features
F_n..F_{n+a}, tokens d_1..d_a, b) are committed to the drafter's cache.

`speculative_generate` runs any batch size (left padding, rows that finish at different times) and verifies
with `ppow_trl.decoding.kernels.verify_windows` (the Triton kernel on CUDA). The transformers integration
(the candidate generator for assisted decoding, the `custom_generate` callables, `generate`) is in
`ppow_trl.decoding.hf`.

tau = generated tokens / target verification forwards (the prefill forward and the token it produces are
not a verification; the token is counted as generated; docs/metrics.md).
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from ppow_trl import _compat
from ppow_trl.decoding.cost import CostMonitor, CostTable, cost_clock, measure_costs
from ppow_trl.decoding.draft_length import DraftLengthPolicy, top_probability
from ppow_trl.decoding.drafting import ChainDrafter
from ppow_trl.decoding.kernels import verify_windows
from ppow_trl.decoding.lookup import lookup_continuation
from ppow_trl.models.common import positions_from_mask, sample_token_ids, scatter_draft_probs, unwrap_drafter
from ppow_trl.packed import packed_linears, use_packed_linears
from ppow_trl.target import capture_features, vocab_size_of

__all__ = ["SpeculativeOutput", "speculative_generate"]


# ------------------------------------------------------------------------------------------------ output
# ------------------------------------------------------------------------------------------------ output
@dataclass
class SpeculativeOutput:
    """Sequences and acceptance statistics of one speculative `generate` call.

    sequences: (B, T0 + N) prompt (as given, left padding kept) + generated tokens; rows that stopped early
        are filled with the pad token, as in transformers.
    accepted: (R, B) int64 accepted draft tokens k per verification round and row; -1 where the row had
        already finished (it takes no part in that round).
    window_sizes: (R,) int64 draft tokens verified in each round (K, or fewer when transformers' assisted
        decoding capped the last windows at max_length; 0 = a plain one-token step).
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
    policy is kept per drafter (in memory), so each call starts from the calibration earlier calls learned.
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
        learned[key] = policy
    return learned[key].new_call()


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
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, bool mask) on `device`, after checking shapes, left padding and the context length."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (B, T0) with T0 >= 1, got {tuple(input_ids.shape)}")
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
    """Batched speculative decoding (chain drafting, K tokens per round) with a drafter; lossless.

    Args:
        target: the frozen target (any transformers causal LM whose base model returns hidden states).
        drafter: an `Eagle3Drafter` / `MedusaDrafter` built for `target`.
        input_ids: (B, T0) prompts, left-padded; attention_mask (B, T0) 1 for real tokens (None = no padding).
        max_new_tokens: tokens to generate per row at most (EOS included).
        num_draft_tokens: K, draft tokens per verification window, or "auto": each round drafts while the
            drafter's confidence justifies it and verifies the window that maximises expected tokens per unit
            of cost (`ppow_trl.decoding.draft_length`), 0 (a plain step) to `max_draft_tokens`.
        temperature: 0 = greedy (output equals greedy decoding token for token, up to floating-point
            differences between a (K+1)-token and a 1-token forward); > 0 = speculative sampling from
            softmax(logits / temperature), lossless (drafter samples at the same temperature).
        eos_token_id: id(s) that end a row (kept in the output); None = only max_new_tokens stops.
        pad_token_id: filler after a row has finished (default: first eos id, else 0).
        generator: torch.Generator for every random draw (first token, drafts, acceptance, residuals).
        logits_warper: optional context-free transform of target logits (..., V) -> (..., V) replacing the
            division by temperature (e.g. transformers' temperature + top-k warpers); sampling only.
        verify_backend: `verify_windows` backend ("auto": Triton on CUDA, else the torch reference).
        profile: record seconds spent in prefill, drafting, target forwards, verification, drafter commits
            and bookkeeping in `SpeculativeOutput.timings` (True: wall clock; or a clock function such as
            `time.process_time`).
        draft_confidence_threshold: with an integer K, stop drafting a round at the first draft token whose
            drafter probability is below this (transformers' `assistant_confidence_threshold`).
        max_draft_tokens: the longest window "auto" may verify.
        costs: the cost table "auto" prices windows with (default: `measure_costs(target, drafter)`, cached).
            At batch size 1, with a table (given, or measured for "auto"), each verification forward runs at
            `costs.verify_shape(K+1)` tokens: padded with filler tokens (outputs and KV dropped) where the
            table says a longer forward is cheaper.
        packed: run the target's and the drafter's linear layers through oneDNN with prepacked weights (CPU fp32;
            True, False or "auto" = where supported and the target's packed copy is small, `ppow_trl.packed`): a
            (K+1)-token verification then costs ~1.1 one-token forwards instead of ~1.7 on CPU, and drafting
            about 40% less.
        draft_tree_width: greedy only: 1 = a chain; w > 1 = a draft tree, the chain plus at least w - 1 one-token
            side branches: the runner-ups (at any step j of the chain) with the highest path probability under
            the drafter, each seeing x_n, d_1..d_{j-1} and itself; at batch size 1 with a cost table, as many
            more as the forward holds for at most 3% more than its cheapest shape (`CostTable.tree_room`). All
            are verified in one target forward under a tree attention mask; when d_j is the chain's first
            rejected token and the target's token there is a side branch's, that branch is kept (its KV takes
            slot j) and the target's token after it is the bonus token.
        correct_costs: with "auto", time the rounds and reprice windows when the observed costs disagree with
            the table (`ppow_trl.decoding.cost.CostMonitor`); default: for measured tables only.
        prompt_lookup_tokens: greedy only: each round also verifies up to this many tokens of prompt lookup (the
            continuation of the latest earlier occurrence of the row's last n-gram in its prompt and output,
            `ppow_trl.decoding.lookup`) as one more branch of the draft tree; the round keeps whichever path the
            target accepts for longer. In rounds where "auto" skips drafting, the lookup is verified alone, at
            no drafter cost. 0 = off.
        prompt_lookup_ngram: the longest n-gram prompt lookup matches (it falls back to shorter ones).

    Rows finish at EOS or after max_new_tokens and stop counting; the KV entries of rejected draft tokens
    stay in the (shared, batched) target cache only when another row accepted more, and are masked out
    (at batch size 1 the cache is simply cropped). With B > 1 such masked entries still count towards a
    sliding attention window, so sliding-window targets are exact at batch size 1 only.
    """
    model = check_drafter_for_target(target, drafter)
    _check_integer("draft_tree_width", draft_tree_width, 1)
    _check_integer("prompt_lookup_tokens", prompt_lookup_tokens, 0)
    _check_integer("prompt_lookup_ngram", prompt_lookup_ngram, 1)
    if (draft_tree_width > 1 or prompt_lookup_tokens) and temperature > 0:
        raise ValueError(
            "draft trees (draft_tree_width > 1) and prompt-lookup branches (prompt_lookup_tokens > 0) are verified "
            "greedily; speculative sampling over several branches is not implemented: with temperature > 0 use "
            "chains (draft_tree_width=1, prompt_lookup_tokens=0)"
        )
    use_packed = use_packed_linears(target, packed)
    device = next(target.parameters()).device
    input_ids, mask = _check_prompts(target, input_ids, attention_mask, max_new_tokens, temperature, device)
    if costs is None and check_num_draft_tokens(num_draft_tokens) == "auto":
        costs = measure_costs(target, model, max_tokens=max(16, max_draft_tokens + 1), packed=use_packed)
    padded = costs is not None and input_ids.shape[0] == 1  # the table is measured at batch size 1
    policy = draft_length_policy(
        target,
        model,
        num_draft_tokens,
        draft_confidence_threshold,
        max_draft_tokens,
        costs,
        use_packed,
        padded,
        correct_costs,
    )
    window = policy.max_window if policy is not None else num_draft_tokens
    with packed_linears(target, use_packed), packed_linears(model, use_packed):
        output = _speculative_loop(
            target, model, input_ids, mask, max_new_tokens, window, policy, temperature,
            eos_token_id, pad_token_id, generator, logits_warper, verify_backend, profile, device,
            costs if padded else None, draft_tree_width - 1, prompt_lookup_tokens,
            prompt_lookup_ngram,
        )  # fmt: skip
    output.costs = policy_costs(policy, costs) if policy is not None and policy.mode == "auto" else None
    return output


def _tree_attention(
    attn: torch.Tensor, window: int, depths: torch.Tensor, lookup: int, filler: int, dtype: torch.dtype
) -> torch.Tensor:
    """(B, 1, n, L + n) additive attention mask of a draft tree's forward, n = window + 1 + S + lookup + filler:
    the past as `attn` (B, L + window + 1) says, the chain [x_n, d_1..d_K] causal, each of the S side branches
    (an alternative d_j, `depths` (B, S) = j) sees x_n, d_1..d_{j-1} and itself, the lookup branch sees x_n and
    itself causally, filler rows see what precedes them."""
    chain = window + 1
    batch, sides = depths.shape
    n = chain + sides + lookup + filler
    device = attn.device
    past = attn[:, : attn.shape[1] - chain]
    new = torch.ones(n, n, dtype=torch.bool, device=device).tril().repeat(batch, 1, 1)
    columns = torch.arange(n, device=device)
    rows = torch.arange(chain, chain + sides, device=device)
    new[:, rows] = (columns[None, None] < depths[..., None]) | (columns[None, None] == rows[None, :, None])
    first = chain + sides
    new[:, first : first + lookup] = False
    new[:, first : first + lookup, 0] = True
    new[:, first : first + lookup, first : first + lookup] = torch.ones(
        lookup, lookup, dtype=torch.bool, device=device
    ).tril()
    allowed = torch.cat([past[:, None, None, :].expand(-1, 1, n, -1), new[:, None]], dim=-1)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _side_branches(chain: ChainDrafter, window: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` side branches of the round's tree with the highest path probability under the drafter (a
    runner-up at any step of the chain): (tokens (B, count) target ids, depths (B, count) the step j each
    replaces)."""
    tokens, log_probs = chain.runner_ups(window, count)
    per_step = tokens.shape[-1]
    best = log_probs.flatten(1).topk(count, dim=1).indices
    return tokens.flatten(1).gather(1, best), best // per_step + 1


def _take_branches(
    logits: torch.Tensor,
    forward_ids: torch.Tensor,
    window: int,
    depths: torch.Tensor,
    lookup_valid: torch.Tensor,
    accepted: torch.Tensor,
    bonus: torch.Tensor,
    draft_tokens: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy: the longest accepted path through the round's tree. A side branch at step j (`depths`) counts when
    the chain's token d_j was the first rejected and the target's token there is that branch's (accepted = j);
    the lookup branch when it matches the target's greedy tokens for longer than that path.

    Returns (accepted, bonus, tokens (B, W) of the path, path (B, W + 1) the forward row of each slot of the path
    [x_n, t_1..t_W]), W = max(window, lookup length)."""
    batch, lookup = lookup_valid.shape
    width = max(window, lookup)
    device = logits.device
    greedy = logits.argmax(-1)  # (B, n) the target's token after each row of the forward
    every = torch.arange(batch, device=device)
    tokens = _pad_right(draft_tokens, width - window) if window else draft_tokens.new_zeros(batch, width)
    path = torch.arange(width + 1, device=device).expand(batch, -1)
    # a side branch at the chain's first rejected step j = a + 1 holding the target's token
    if depths.shape[1]:
        sides = forward_ids[:, window + 1 : window + 1 + depths.shape[1]]
        wanted = greedy.gather(1, accepted[:, None])
        hit = (sides == wanted) & (depths == accepted[:, None] + 1) & active[:, None]
        took = hit.any(1)
        row = window + 1 + hit.long().argmax(1)
        slots = torch.arange(width + 1, device=device)
        path = torch.where(took[:, None] & (slots == accepted[:, None] + 1), row[:, None], path)
        tokens = torch.where(took[:, None] & (slots[1:] == accepted[:, None] + 1), wanted, tokens)
        bonus = torch.where(took, greedy[every, row], bonus)
        accepted = torch.where(took, accepted + 1, accepted)
    if lookup:
        first = window + 1 + depths.shape[1]
        proposed = forward_ids[:, first : first + lookup]
        expected = torch.cat([greedy[:, :1], greedy[:, first : first + lookup - 1]], dim=1)
        run = ((proposed == expected) & lookup_valid).long().cumprod(1).sum(1)
        took = (run > accepted) & active
        slots = torch.arange(1, width + 1, device=device)
        use = took[:, None] & (slots[None] <= run[:, None])
        path = torch.cat([path[:, :1], torch.where(use, first + slots - 1, path[:, 1:])], dim=1)
        tokens = torch.where(use, _pad_right(proposed, width - lookup), tokens)
        bonus = torch.where(took, greedy[every, (first + run - 1).clamp(min=0)], bonus)
        accepted = torch.where(took, run, accepted)
    return accepted, bonus, tokens, path


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


def _speculative_loop(
    target, model, input_ids, mask, max_new_tokens, window, policy, temperature, eos_token_id, pad_token_id,
    generator, logits_warper, verify_backend, profile, device, costs, tree_branches, lookup_tokens,
    lookup_ngram,
) -> SpeculativeOutput:  # fmt: skip
    """The loop of `speculative_generate` (arguments checked there); `policy` None = K = `window` always;
    `costs` (None: no padding) shapes each forward (`CostTable.verify_shape`, `CostTable.tree_room`); at least
    `tree_branches` side branches of each window are verified beside it (greedy), and so are up to
    `lookup_tokens` tokens of prompt lookup (`lookup_continuation` with n-grams up to `lookup_ngram`)."""
    batch = input_ids.shape[0]
    eos = (
        None
        if eos_token_id is None
        else torch.as_tensor(eos_token_id, dtype=torch.long, device=device).reshape(-1)
    )
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None and eos.numel() else 0
    to_full_vocab = draft_probs_mapper(model, vocab_size_of(target))
    lm_head = target.get_output_embeddings()
    layers = feature_layers(model)
    sampling = temperature > 0

    def warp(logits: torch.Tensor) -> torch.Tensor:
        if not sampling:
            return logits
        if logits_warper is not None:
            return logits_warper(logits)
        return logits * (1.0 / temperature)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # logits are already warped
        return sample_token_ids(logits, 1.0 if sampling else 0.0, generator)

    timer = _Timer(profile, device)
    chain = ChainDrafter(model, temperature=temperature, generator=generator)
    cache = DynamicCache(config=target.config)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()

    # Prefill: the target's features for every prompt position and its first token.
    positions = positions_from_mask(mask)
    has_holes = not bool(mask.all())
    out = capture_features(
        target, input_ids, mask.long() if has_holes else None, layers, with_logits=False,
        position_ids=positions, cache=cache, use_cache=True,
    )  # fmt: skip
    first = pick(warp(lm_head(out.last_hidden_state[:, -1]).float()))
    features = getattr(out, model.feature_name).masked_fill(~mask[..., None], 0.0)
    timer.lap("prefill")
    # Rows verified but not yet committed to the drafter: committed in one call before the next draft (rounds
    # that skip drafting add theirs to the queue).
    chain.enqueue(features, torch.cat([input_ids[:, 1:], first[:, None]], dim=1), positions, mask)

    # prompt + generated tokens in one buffer, so prompt lookup searches both without copying
    context = torch.cat(
        [input_ids, torch.full_like(input_ids[:, :1], pad_token_id).expand(-1, max_new_tokens)], 1
    )
    context_start = input_ids.shape[1] - mask.sum(1)
    rows = _Rows(
        generated=context[:, input_ids.shape[1] :],
        num_generated=torch.ones(batch, dtype=torch.long, device=device),
        finished=torch.zeros(batch, dtype=torch.bool, device=device),
        pending=first,
        cur_pos=mask.sum(1),
    )
    rows.generated[:, 0] = first
    rows.finished = rows.num_generated >= max_new_tokens
    if eos is not None:
        rows.finished |= torch.isin(first, eos)
    attn = mask.clone()
    accepted_log: list[torch.Tensor] = []
    window_log: list[int] = []
    lookup_rounds = 0
    # Rounds timed for the policy's CostMonitor, on the clock the cost table was measured with.
    clock = cost_clock(device) if policy is not None and policy.monitor is not None else None
    prompt_queued = True  # the first drafting commits the prompt's rows: not a representative round
    timer.lap("bookkeeping")

    commit_excess = 0.0  # seconds this round's commit spent on rows of earlier rounds that skipped drafting

    def commit_queued() -> None:
        nonlocal commit_excess
        if chain.queued:
            commit_excess += chain.commit_queued(functools.partial(_now, clock, device) if clock else None)
            timer.lap("drafter_commit")

    while not bool(rows.finished.all()):
        active = ~rows.finished
        round_start = _now(clock, device)
        if policy is None:
            commit_queued()
            draft_tokens, draft_probs = chain.draft(window)
        else:
            draft_tokens, draft_probs = draft_with_policy(chain, policy, active, batch, commit_queued)
        drafted_at = _now(clock, device)
        draft_seconds = (
            None if prompt_queued and not chain.queued else drafted_at - round_start - commit_excess
        )
        prompt_queued, commit_excess = prompt_queued and bool(chain.queued), 0.0
        timer.lap("drafter_draft")
        window = draft_tokens.shape[1]
        window_ids = torch.cat([rows.pending[:, None], draft_tokens], dim=1)
        window_pos = rows.cur_pos[:, None] + torch.arange(window + 1, device=device)
        past_attn = attn
        attn = torch.cat([attn, torch.ones(batch, window + 1, dtype=torch.bool, device=device)], dim=1)
        forward_ids, forward_pos, forward_mask = window_ids, window_pos, attn.long() if has_holes else None
        lookup_valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        if lookup_tokens:  # the context's continuation of the last n-gram, from the position after x_n
            found, lookup_valid = lookup_continuation(
                context, context_start, input_ids.shape[1] + rows.num_generated, lookup_tokens, lookup_ngram
            )
            lookup_valid &= active[:, None]
            longest = int(lookup_valid.sum(1).max())
            found, lookup_valid = found[:, :longest], lookup_valid[:, :longest]
        lookup = lookup_valid.shape[1]
        depths = torch.zeros(batch, 0, dtype=torch.long, device=device)
        # side branches: w - 1, or as many as fit the forward at no real extra cost
        if tree_branches and window:
            need = window + 1 + lookup
            room = costs.tree_room(need + tree_branches) - need if costs is not None else tree_branches
            side_ids, depths = _side_branches(chain, window, room)
            forward_ids = torch.cat([forward_ids, side_ids], dim=1)
            forward_pos = torch.cat([forward_pos, rows.cur_pos[:, None] + depths], dim=1)
        if lookup:
            forward_ids = torch.cat([forward_ids, found], dim=1)
            forward_pos = torch.cat(
                [forward_pos, rows.cur_pos[:, None] + 1 + torch.arange(lookup, device=device)], 1
            )
        tree = bool(depths.shape[1] or lookup)
        tokens_in = forward_ids.shape[1]
        filler = (costs.verify_shape(tokens_in) if costs is not None else tokens_in) - tokens_in
        if tree:
            forward_mask = _tree_attention(attn, window, depths, lookup, filler, lm_head.weight.dtype)
        elif filler and forward_mask is not None:
            forward_mask = _pad_right(forward_mask, filler)
        past = cache.get_seq_length()
        timer.lap("bookkeeping")
        out = capture_features(
            target, _pad_right(forward_ids, filler), forward_mask, layers, with_logits=False,
            position_ids=_pad_right(forward_pos, filler, step=1), cache=cache, use_cache=True,
        )  # fmt: skip
        if filler:  # the filler's outputs and KV go; causal attention kept them out of the window's
            cache.crop(-filler)
        logits = warp(lm_head(out.last_hidden_state[:, :tokens_in]).float())
        features = getattr(out, model.feature_name)
        if clock is not None:
            record_round(
                policy, draft_seconds, batch * (tokens_in + filler), _now(clock, device) - drafted_at
            )
        timer.lap("target_forward")
        if window == 0:  # a plain step
            accepted, bonus = torch.zeros(batch, dtype=torch.long, device=device), pick(logits[:, 0])
        else:
            probs = to_full_vocab(draft_probs) if sampling else None
            result = verify_windows(
                logits[:, : window + 1],
                draft_tokens,
                probs,
                1.0 if sampling else 0.0,
                generator=generator,
                backend=verify_backend,
            )
            accepted, bonus = result.accepted, result.next_token
        if policy is not None:  # the chain's own acceptance calibrates the policy
            policy.end_round(window, accepted[active])
        window_log.append(window)
        if tree:
            accepted, bonus, draft_tokens, path = _take_branches(
                logits, forward_ids, window, depths, lookup_valid, accepted, bonus, draft_tokens, active
            )
            if not bool((path == torch.arange(path.shape[1], device=device)).all()):
                _compat.gather_cache_slots(cache, past, path)
                features = features.gather(1, path[..., None].expand(-1, -1, features.shape[-1]))
            lookup_rounds += int(((accepted > 0) & (path[:, 1] > window + depths.shape[1])).sum())
            window = draft_tokens.shape[1]
            _crop_to(cache, past + window + 1)
        steps = torch.arange(window + 1, device=device)
        timer.lap("verify")

        emitted, kept, count, hit_eos = _round_tokens(
            draft_tokens, accepted, bonus, rows, max_new_tokens, eos, steps
        )
        _write_tokens(rows, emitted, count, steps)
        accepted_log.append(torch.where(active, accepted, -1))
        rows.finished = rows.finished | hit_eos | (rows.num_generated >= max_new_tokens)
        if bool(rows.finished.all()):
            timer.lap("bookkeeping")
            break

        # Keep the KV (and drafter rows) of the accepted prefix [x_n, d_1..d_a] of rows still running.
        slot_valid = kept & ~rows.finished[:, None]
        used = int(slot_valid.sum(1).max())
        _crop_to(cache, past + used)
        attn = torch.cat([past_attn, slot_valid[:, :used]], dim=1)
        has_holes = has_holes or not bool(slot_valid[:, :used].all())
        cur_features = features[:, :used]
        chain.enqueue(
            cur_features.masked_fill(~slot_valid[:, :used, None], 0.0),
            emitted[:, :used],
            rows.cur_pos[:, None] + steps[:used],
            slot_valid[:, :used],
        )
        rows.cur_pos = torch.where(rows.finished, rows.cur_pos, rows.cur_pos + accepted + 1)
        rows.pending = torch.where(rows.finished, rows.pending, bonus)
        timer.lap("bookkeeping")

    longest = int(rows.num_generated.max())
    accepted_all = (
        torch.stack(accepted_log).cpu() if accepted_log else torch.zeros(0, batch, dtype=torch.long)
    )
    return SpeculativeOutput(
        sequences=torch.cat([input_ids, rows.generated[:, :longest]], dim=1),
        accepted=accepted_all,
        window_sizes=torch.tensor(window_log, dtype=torch.long),
        num_verify_forwards=len(accepted_log),
        new_tokens=rows.num_generated.cpu(),
        timings=timer.times if profile else None,
        lookup_rounds=lookup_rounds,
    )
