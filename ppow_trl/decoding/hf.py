"""Speculative decoding inside transformers' `generate`: a candidate generator for assisted decoding, two
`custom_generate` callables, and the `generate` entry point.

* `DrafterCandidateGenerator`: a transformers `CandidateGenerator` that drafts from the target's hidden
  states (`requires_model_outputs`); transformers' assisted decoding verifies (greedy: argmax match;
  `do_sample=True`: lossless speculative sampling from the candidate logits we return). Batch size 1.
* `assisted_decoding_with_drafter` / `speculative_decoding`: `custom_generate` callables, usable as
  ``target.generate(input_ids, custom_generate=speculative_decoding, drafter=drafter, num_draft_tokens=4)``;
  the second runs our batched loop (`ppow_trl.decoding.speculative.speculative_generate`).
* `generate(target, drafter, input_ids, ...)`: either path through the public `custom_generate` argument;
  returns the sequences and the acceptance statistics.
* `attach_drafter(target, drafter, K)` / `detach_drafter(target)`: make plain ``target.generate(...)`` calls
  speculative (they add the `custom_generate` argument to each call).

The private transformers APIs the assisted path needs are reached through `ppow_trl._compat`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ppow_trl import _compat
from ppow_trl.decoding.cost import cost_clock
from ppow_trl.decoding.draft_length import DraftLengthPolicy
from ppow_trl.decoding.drafting import ChainDrafter
from ppow_trl.decoding.speculative import (
    SpeculativeOutput,
    check_drafter_for_target,
    check_num_draft_tokens,
    draft_length_policy,
    draft_probs_mapper,
    draft_with_policy,
    feature_layers,
    policy_costs,
    record_round,
    speculative_generate,
)
from ppow_trl.models.common import unwrap_drafter
from ppow_trl.packed import packed_linears, use_packed_linears
from ppow_trl.target import vocab_size_of

__all__ = [
    "DrafterCandidateGenerator",
    "assisted_decoding_with_drafter",
    "attach_drafter",
    "detach_drafter",
    "generate",
    "speculative_decoding",
]

METHODS = ("auto", "assisted", "loop")
# `generate`'s greedy round when the caller names none: the fastest measured on this project's CPU benchmarks
# (benchmarks/RESULTS_speculative_decoding.md): a dynamic draft tree of width 4 with up to 4 tokens of prompt
# lookup as one more branch. Sampling keeps chains (trees are verified greedily).
GREEDY_ROUND = {"draft_tree_width": 4, "prompt_lookup_tokens": 4}
CHAIN_ROUND = {"draft_tree_width": 1, "prompt_lookup_tokens": 0}
# Warpers that transform each row of logits independently of the context: they can be applied to a whole
# verification window at once, which is what the batched loop does.
_CONTEXT_FREE_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
_ATTACHMENT = "_ppow_drafter_attachment"


# ------------------------------------------------------------------------------ transformers' assisted path
class DrafterCandidateGenerator(CandidateGenerator):
    """Candidates for transformers' assisted decoding, drafted by an EAGLE-3 or Medusa drafter.

    transformers runs the target over the prompt first (this generator returns no candidates then), and
    hands every later call the outputs of the previous target forward with the hidden states selected in
    `model_kwargs_overrides`; the features of the positions it accepted are committed to a `ChainDrafter`,
    which then drafts K tokens. With `do_sample=True` the returned candidate logits are the log of the
    distribution each token was drawn from (zero outside the draft vocabulary), so transformers' speculative
    sampling is lossless. Statistics land in `accepted`, `window_sizes`, `num_verify_forwards`, and the time
    spent inside the drafter in `drafter_seconds`.
    """

    requires_model_outputs = True
    clock = staticmethod(time.perf_counter)  # what `drafter_seconds` is measured with

    def __init__(
        self,
        drafter: PreTrainedModel,
        num_draft_tokens: int,
        generation_config: GenerationConfig,
        vocab_size: int,
        policy: DraftLengthPolicy | None = None,
    ):
        self.model = unwrap_drafter(drafter)
        self.num_draft_tokens = check_num_draft_tokens(num_draft_tokens)
        if self.num_draft_tokens == "auto" and policy is None:
            raise ValueError("num_draft_tokens='auto' needs a DraftLengthPolicy (see draft_length_policy)")
        self.policy = policy  # None: K tokens every round
        self.do_sample = bool(generation_config.do_sample)
        temperature = generation_config.temperature if generation_config.temperature is not None else 1.0
        self.temperature = float(temperature) if self.do_sample else 0.0
        self.max_length = generation_config.max_length
        self.to_full_vocab = draft_probs_mapper(self.model, vocab_size)
        self.chain = ChainDrafter(self.model, temperature=self.temperature)
        if self.model.feature_name == "aux_hidden_states":
            layers = feature_layers(self.model)
            if layers is None:
                raise ValueError("the EAGLE-3 drafter's config has no aux_layer_ids")
            self.layers = layers
        else:  # the final-normed state (transformers ties hidden_states[-1] to last_hidden_state)
            self.layers = [-1]
        self.model_kwargs_overrides = {"output_hidden_states": list(self.layers)}
        self.prefilled = False
        self.last_window = 0
        self.accepted: list[int] = []
        self.window_sizes: list[int] = []
        self.num_verify_forwards = 0
        self.drafter_seconds = 0.0
        # Rounds timed for the policy's CostMonitor: drafting here, the target forward from the end of
        # `get_candidates` to `update_candidate_strategy` (transformers' verification is in between).
        monitored = policy is not None and policy.monitor is not None
        self.round_clock = cost_clock(self.model.device) if monitored else None
        self.prompt_committed = False
        self.round_timing: tuple[float | None, float] | None = None  # (drafting seconds, forward start)
        self.commit_excess = 0.0  # commit seconds spent on rows of earlier rounds that skipped drafting

    def _features(self, hidden_states: tuple, n: int) -> torch.Tensor:
        return torch.cat([hidden_states[i][:, :n] for i in self.layers], dim=-1)

    @torch.no_grad()
    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict[str, Any] | None = None,
        model_outputs: Any = None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        if is_first_iteration or model_outputs is None:
            self.last_window = 0
            return input_ids, None  # the target's prefill comes first; we draft from its hidden states
        start = self.clock()
        length = input_ids.shape[1]
        n = int(n_last_matches) + 1 if self.prefilled else length - 1
        self.prefilled = True
        hidden_states = getattr(model_outputs, "hidden_states", None)
        if hidden_states is None:
            raise ValueError("the target's outputs carry no hidden_states; the drafter cannot draft")
        features = self._features(hidden_states, n).to(self.model.device)
        tokens = input_ids[:, -n:].to(self.model.device)
        model_kwargs = model_kwargs or {}
        position_ids = model_kwargs.get("position_ids")
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[1] == length:
            positions = position_ids[:, length - n - 1 : length - 1]
        else:
            positions = torch.arange(length - n - 1, length - 1, device=input_ids.device)[None]
        attention_mask = model_kwargs.get("attention_mask")
        valid = None
        if attention_mask is not None and attention_mask.shape[1] == length:
            valid = attention_mask[:, length - n - 1 : length - 1].bool().to(self.model.device)
            features = features.masked_fill(~valid[..., None], 0.0)
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        self.chain.enqueue(features, tokens, positions.to(self.model.device), valid)

        cap = self.max_length - length - 1
        window = min(self.num_draft_tokens, cap) if self.policy is None else cap
        self.last_window = 0
        round_start = self._now()
        if window <= 0:
            self.drafter_seconds += self.clock() - start
            self._start_forward(None)
            return input_ids, None
        if self.policy is None:
            self._commit_queued()
            draft_tokens, draft_probs = self.chain.draft(window)
        else:
            active = torch.ones(1, dtype=torch.bool, device=self.model.device)
            draft_tokens, draft_probs = draft_with_policy(
                self.chain, self.policy, active, 1, self._commit_queued, max_window=window
            )
            if draft_tokens.shape[1] == 0:
                self.drafter_seconds += self.clock() - start
                self._start_forward(round_start)
                return input_ids, None
        self.last_window = draft_tokens.shape[1]
        candidates = torch.cat([input_ids, draft_tokens.to(input_ids.device)], dim=1)
        logits = None
        if self.do_sample:
            logits = self.to_full_vocab(draft_probs).log()
        self.drafter_seconds += self.clock() - start
        self._start_forward(round_start)
        return candidates, logits

    def _now(self) -> float:
        if self.round_clock is None:
            return 0.0
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return self.round_clock()

    def _start_forward(self, round_start: float | None) -> None:
        """Drafting ends, the target forward starts. Not reported as drafting: a round that did not ask the
        policy (`round_start` None) and the round that committed the prompt's rows."""
        if self.round_clock is None:
            return
        now = self._now()
        prompt_round = not self.prompt_committed and not self.chain.queued
        self.prompt_committed = self.prompt_committed or not self.chain.queued
        drafting = None if prompt_round or round_start is None else now - round_start - self.commit_excess
        self.round_timing, self.commit_excess = (drafting, now), 0.0

    def _commit_queued(self) -> None:
        self.commit_excess += self.chain.commit_queued(self._now if self.round_clock is not None else None)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        if not self.prefilled:  # the prefill forward is not a verification
            return
        if self.policy is not None:
            self.policy.end_round(self.last_window, torch.tensor([int(num_matches)]))
        if self.round_timing is not None:
            draft_seconds, forward_start = self.round_timing
            record_round(self.policy, draft_seconds, self.last_window + 1, self._now() - forward_start)
            self.round_timing = None
        self.num_verify_forwards += 1
        self.accepted.append(int(num_matches))
        self.window_sizes.append(self.last_window)


@dataclass
class _Attachment:
    drafter: PreTrainedModel
    num_draft_tokens: int
    method: str = "auto"
    original_generate: Callable | None = None
    last_output: SpeculativeOutput | None = None


def _attached(model: PreTrainedModel, drafter: PreTrainedModel | None, num_draft_tokens: int | None):
    """The attachment of `attach_drafter` (or None), and the drafter and K of this call (the call's own
    arguments first, then the attachment's)."""
    attachment = getattr(model, _ATTACHMENT, None)
    drafter = drafter if drafter is not None else getattr(attachment, "drafter", None)
    if num_draft_tokens is None:
        num_draft_tokens = getattr(attachment, "num_draft_tokens", None)
    return attachment, drafter, num_draft_tokens


def _check_assisted_round(input_ids: torch.Tensor, draft_tree_width: int, prompt_lookup_tokens: int) -> None:
    """Reject what transformers' assisted decoding cannot run: draft trees, lookup branches, batches over 1."""
    if draft_tree_width != 1 or prompt_lookup_tokens:
        raise ValueError(
            "transformers' assisted decoding verifies chains only; draft trees (draft_tree_width > 1) and "
            "prompt-lookup branches (prompt_lookup_tokens > 0) run in the loop: method='loop' or "
            "speculative_generate"
        )
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"transformers' assisted decoding supports batch size 1 only (got {input_ids.shape[0]}); use "
            "custom_generate=speculative_decoding or ppow_trl.decoding.speculative_generate for batches"
        )


def _assisted_output(
    generator: DrafterCandidateGenerator,
    sequences: torch.LongTensor,
    prompt_length: int,
    policy: DraftLengthPolicy | None,
    costs: Any,
) -> SpeculativeOutput:
    """The sequences of an assisted run with the statistics its candidate generator collected."""
    return SpeculativeOutput(
        sequences=sequences,
        accepted=torch.tensor(generator.accepted, dtype=torch.long).view(-1, 1),
        window_sizes=torch.tensor(generator.window_sizes, dtype=torch.long),
        num_verify_forwards=generator.num_verify_forwards,
        new_tokens=torch.tensor([sequences.shape[1] - prompt_length]),
        timings={"drafter": generator.drafter_seconds},
        costs=policy_costs(policy, costs) if policy is not None and policy.mode == "auto" else None,
    )


def assisted_decoding_with_drafter(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: Any,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    drafter: PreTrainedModel | None = None,
    num_draft_tokens: int | str | None = None,
    draft_confidence_threshold: float | None = None,
    max_draft_tokens: int = 8,
    costs: Any = None,
    packed: bool | str = "auto",
    draft_tree_width: int = 1,
    correct_costs: bool | None = None,
    prompt_lookup_tokens: int = 0,
    prompt_lookup_ngram: int = 3,
    **model_kwargs,
) -> torch.LongTensor | SpeculativeOutput:
    """`custom_generate` callable: transformers' assisted decoding with a `DrafterCandidateGenerator`.

    Use as ``target.generate(ids, custom_generate=assisted_decoding_with_drafter, drafter=d,
    num_draft_tokens=K, max_new_tokens=N)``. Batch size 1 (a transformers limit). Returns the sequences, or a
    `SpeculativeOutput` with statistics when ``return_dict_in_generate=True``. `num_draft_tokens="auto"`,
    `draft_confidence_threshold`, `max_draft_tokens`, `costs`, `packed` and `correct_costs` as in
    `speculative_generate`.
    """
    attachment, drafter, num_draft_tokens = _attached(model, drafter, num_draft_tokens)
    drafter_model = check_drafter_for_target(model, drafter)
    num_draft_tokens = check_num_draft_tokens(num_draft_tokens)
    _check_assisted_round(input_ids, draft_tree_width, prompt_lookup_tokens)
    generators: list[DrafterCandidateGenerator] = []
    want_dict = bool(generation_config.return_dict_in_generate)
    use_packed = use_packed_linears(model, packed)
    policy = draft_length_policy(
        model,
        drafter_model,
        num_draft_tokens,
        draft_confidence_threshold,
        max_draft_tokens,
        costs,
        use_packed,
        correct_costs=correct_costs,
    )

    def candidate_generator(self, generation_config, *args, **kwargs) -> CandidateGenerator:
        generator = DrafterCandidateGenerator(
            drafter_model, num_draft_tokens, generation_config, vocab_size_of(self), policy=policy
        )
        generators.append(generator)
        return generator

    with packed_linears(model, use_packed), packed_linears(drafter_model, use_packed):
        result = _compat.assisted_decoding(
            model,
            candidate_generator,
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )
    sequences = result if isinstance(result, torch.Tensor) else result.sequences
    output = _assisted_output(generators[-1], sequences, input_ids.shape[1], policy, costs)
    if policy is not None:
        policy.save()
    if attachment is not None:
        attachment.last_output = output
    return output if want_dict else sequences


# ------------------------------------------------------------------------------------- our batched loop
def _context_free_warper(logits_processor: LogitsProcessorList | None) -> Callable | None:
    """transformers' prepared processors as a context-free (..., V) transform, or an error if some need context."""
    processors = list(logits_processor or [])
    unsupported = [type(p).__name__ for p in processors if not isinstance(p, _CONTEXT_FREE_WARPERS)]
    if unsupported:
        raise NotImplementedError(
            f"speculative_decoding supports only temperature/top-k/top-p/min-p logits warpers, got {unsupported}; "
            "use custom_generate=assisted_decoding_with_drafter (batch size 1) for other logits processors"
        )
    if not processors:
        return None

    def apply(logits: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        dummy = torch.zeros(flat.shape[0], 1, dtype=torch.long, device=flat.device)
        for processor in processors:
            flat = processor(dummy, flat)
        return flat.view_as(logits)

    return apply


def speculative_decoding(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: Any,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    drafter: PreTrainedModel | None = None,
    num_draft_tokens: int | str | None = None,
    draft_confidence_threshold: float | None = None,
    max_draft_tokens: int = 8,
    costs: Any = None,
    packed: bool | str = "auto",
    draft_tree_width: int = 1,
    correct_costs: bool | None = None,
    prompt_lookup_tokens: int = 0,
    prompt_lookup_ngram: int = 3,
    **model_kwargs,
) -> torch.LongTensor | SpeculativeOutput:
    """`custom_generate` callable running `speculative_generate` (any batch size, left padding).

    Use as ``target.generate(ids, attention_mask=mask, custom_generate=speculative_decoding, drafter=d,
    num_draft_tokens=K, max_new_tokens=N)``; `do_sample`/`temperature`/`top_k`/`top_p`/`min_p` are honoured,
    other logits processors and custom stopping criteria are not. Returns the sequences, or a
    `SpeculativeOutput` with statistics when ``return_dict_in_generate=True``.
    """
    attachment, drafter, num_draft_tokens = _attached(model, drafter, num_draft_tokens)
    if streamer is not None:
        raise NotImplementedError("speculative_decoding does not stream; use assisted_decoding_with_drafter")
    do_sample = bool(generation_config.do_sample)
    temperature = generation_config.temperature if generation_config.temperature is not None else 1.0
    warper = _context_free_warper(logits_processor) if do_sample else None
    if not do_sample and len(logits_processor or []) > 0:
        raise NotImplementedError(
            f"speculative_decoding applies no logits processors in greedy mode, got "
            f"{[type(p).__name__ for p in logits_processor]}"
        )
    eos, pad = _compat.generation_special_tokens(generation_config)
    output = speculative_generate(
        model,
        drafter,
        input_ids,
        attention_mask=model_kwargs.get("attention_mask"),
        max_new_tokens=generation_config.max_length - input_ids.shape[1],
        num_draft_tokens=num_draft_tokens,
        temperature=float(temperature) if do_sample else 0.0,
        eos_token_id=eos,
        pad_token_id=None if pad is None else int(pad.reshape(-1)[0]),
        logits_warper=warper if do_sample else None,
        draft_confidence_threshold=draft_confidence_threshold,
        max_draft_tokens=max_draft_tokens,
        costs=costs,
        packed=packed,
        draft_tree_width=draft_tree_width,
        correct_costs=correct_costs,
        prompt_lookup_tokens=prompt_lookup_tokens,
        prompt_lookup_ngram=prompt_lookup_ngram,
    )
    if attachment is not None:
        attachment.last_output = output
    return output if generation_config.return_dict_in_generate else output.sequences


# ------------------------------------------------------------------------------------- public entry points
def _resolve_method(method: str, batch: int) -> Callable:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "assisted" or (method == "auto" and batch == 1):
        return assisted_decoding_with_drafter
    return speculative_decoding


def generate(
    target: PreTrainedModel,
    drafter: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_draft_tokens: int | str = "auto",
    method: str = "auto",
    **generate_kwargs,
) -> SpeculativeOutput:
    """Speculative decoding of `target` with `drafter` through `target.generate`; returns sequences + stats.

    Args:
        target / drafter: the frozen target and a drafter built for it (checked: `drafter.check_target`).
        input_ids / attention_mask: (B, T0) prompts (left padding for B > 1).
        num_draft_tokens: K, draft tokens per verification window, or "auto" (the window of each round chosen
            from the drafter's confidence and the measured costs; see `speculative_generate`, which also
            describes `draft_confidence_threshold`, `max_draft_tokens`, `costs` and `packed`, passed here
            through `generate_kwargs`).
        method: "assisted" (transformers' assisted decoding with `DrafterCandidateGenerator`, batch 1),
            "loop" (`speculative_generate`, any batch size), "auto" (the loop for greedy decoding, where it
            verifies trees and lookup branches; for sampling assisted at B == 1, else the loop).
        **generate_kwargs: passed to `generate` (max_new_tokens, do_sample, temperature, eos_token_id, ...) and
            to the decoding (`draft_tree_width`, `prompt_lookup_tokens`, ...). Greedy calls that set neither
            `draft_tree_width` nor `prompt_lookup_tokens` (and do not ask for the assisted path) get
            `GREEDY_ROUND` (with a chain instead of the tree when `draft_confidence_threshold` is set).

    Greedy (the default) reproduces plain greedy decoding; `do_sample=True` is lossless speculative sampling.
    """
    check_drafter_for_target(target, drafter)
    check_num_draft_tokens(num_draft_tokens)
    sampling = generate_kwargs.get("do_sample", target.generation_config.do_sample)
    generate_kwargs.update(decoding_round(generate_kwargs, sampling, method))
    if method == "auto" and any(generate_kwargs[k] != v for k, v in CHAIN_ROUND.items()):
        method = "loop"  # draft trees and lookup branches are verified by the loop only
    decode = _resolve_method(method, input_ids.shape[0])
    generate_kwargs["return_dict_in_generate"] = True
    generate_kwargs.setdefault("pad_token_id", _default_pad(target))
    if attention_mask is not None:
        generate_kwargs["attention_mask"] = attention_mask
    generate_fn = getattr(target, _ATTACHMENT).original_generate if hasattr(target, _ATTACHMENT) else None
    generate_fn = generate_fn or target.generate
    return generate_fn(
        input_ids,
        custom_generate=decode,
        drafter=drafter,
        num_draft_tokens=num_draft_tokens,
        **generate_kwargs,
    )


def decoding_round(options: dict[str, Any], sampling: bool, method: str = "auto") -> dict[str, int]:
    """The tree and lookup options a `generate` call decodes with: those `options` names (an unnamed one at its
    chain value), else `GREEDY_ROUND` for greedy calls off the assisted path (with a chain instead of the tree
    when `draft_confidence_threshold` stops the chain), else a chain."""
    named = {k: options[k] for k in GREEDY_ROUND if k in options}
    if named:
        return {**CHAIN_ROUND, **named}
    if sampling or method == "assisted":
        return dict(CHAIN_ROUND)
    if options.get("draft_confidence_threshold") is not None:
        return {**GREEDY_ROUND, "draft_tree_width": 1}
    return dict(GREEDY_ROUND)


def _default_pad(target: PreTrainedModel) -> int | None:
    config = target.generation_config
    if config.pad_token_id is not None:
        return config.pad_token_id
    eos = config.eos_token_id
    return eos[0] if isinstance(eos, list) and eos else eos


def attach_drafter(
    target: PreTrainedModel, drafter: PreTrainedModel, num_draft_tokens: int = 5, method: str = "auto"
) -> PreTrainedModel:
    """Make `target.generate(...)` decode speculatively with `drafter` (until `detach_drafter`).

    Calls that pass their own `custom_generate`, `assistant_model` or `prompt_lookup_num_tokens` are left
    alone. The statistics of the last call are in ``target._ppow_drafter_attachment.last_output``.
    Returns the target.
    """
    check_drafter_for_target(target, drafter)
    check_num_draft_tokens(num_draft_tokens)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if hasattr(target, _ATTACHMENT):
        detach_drafter(target)
    original = target.generate
    attachment = _Attachment(drafter, num_draft_tokens, method, original_generate=original)

    @functools.wraps(original)
    def generate_with_drafter(*args, **kwargs):
        if any(
            kwargs.get(k) is not None
            for k in ("custom_generate", "assistant_model", "prompt_lookup_num_tokens")
        ):
            return original(*args, **kwargs)
        inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        batch = inputs.shape[0] if isinstance(inputs, torch.Tensor) else 1
        kwargs["custom_generate"] = _resolve_method(attachment.method, batch)
        kwargs.setdefault("drafter", attachment.drafter)
        kwargs.setdefault("num_draft_tokens", attachment.num_draft_tokens)
        return original(*args, **kwargs)

    target.generate = generate_with_drafter
    setattr(target, _ATTACHMENT, attachment)
    return target


def detach_drafter(target: PreTrainedModel) -> PreTrainedModel:
    """Undo `attach_drafter`: `target.generate` is plain again. Returns the target."""
    if "generate" in target.__dict__ and hasattr(target, _ATTACHMENT):
        del target.generate
    if hasattr(target, _ATTACHMENT):
        delattr(target, _ATTACHMENT)
    return target
