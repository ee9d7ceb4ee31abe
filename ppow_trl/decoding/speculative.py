"""Speculative decoding with a trained drafter: inside transformers' `generate`, and a batched loop of our own.

Two decoding paths share one convention (EAGLE3_NOTES.md §2): drafter row p pairs the target's feature at
position p with token x_{p+1}; after a verification forward over [x_n, d_1..d_K] that accepts a tokens and
adds b, rows n..n+a (features F_n..F_{n+a}, tokens d_1..d_a, b) are committed to the drafter's cache.

* `DrafterCandidateGenerator`: a transformers `CandidateGenerator` that drafts from the target's hidden
  states (`requires_model_outputs`); transformers' assisted decoding verifies (greedy: argmax match;
  `do_sample=True`: lossless speculative sampling from the candidate logits we return). Batch size 1.
* `speculative_generate`: our own batched loop (left padding, rows that finish at different times),
  verifying with `ppow_trl.decoding.kernels.verify_windows` (the Triton kernel on CUDA).

Entry points: `generate(target, drafter, input_ids, ...)` (returns sequences + acceptance statistics),
`attach_drafter(target, drafter, K)` / `detach_drafter(target)` (make `target.generate(...)` speculative),
and the two `custom_generate` callables `assisted_decoding_with_drafter` and `speculative_decoding`, usable
as ``target.generate(input_ids, custom_generate=speculative_decoding, drafter=drafter, num_draft_tokens=4)``.

tau = generated tokens / target verification forwards (the prefill forward and the token it produces are
not a verification; the token is counted as generated, as in DESIGN.md's reference numbers).
"""

from __future__ import annotations

import functools
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ppow_trl.decoding.drafting import ChainDrafter, positions_from_mask
from ppow_trl.decoding.kernels import verify_windows
from ppow_trl.decoding.verify import scatter_draft_probs
from ppow_trl.models.common import unwrap_drafter
from ppow_trl.target import capture_features

logger = logging.getLogger(__name__)

__all__ = [
    "DrafterCandidateGenerator",
    "SpeculativeOutput",
    "assisted_decoding_with_drafter",
    "attach_drafter",
    "detach_drafter",
    "generate",
    "speculative_decoding",
    "speculative_generate",
]

METHODS = ("auto", "assisted", "loop")
# Warpers that transform each row of logits independently of the context: they can be applied to a whole
# verification window at once, which is what the batched loop does.
_CONTEXT_FREE_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
_ATTACHMENT = "_ppow_drafter_attachment"


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
    """

    sequences: torch.Tensor
    accepted: torch.Tensor
    window_sizes: torch.Tensor
    num_verify_forwards: int
    new_tokens: torch.Tensor
    timings: dict[str, float] | None = None

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
def _check_window(num_draft_tokens: Any) -> int:
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens (K) must be an integer >= 1, got {num_draft_tokens!r}")
    return num_draft_tokens


def _check_pair(target: PreTrainedModel, drafter: PreTrainedModel) -> PreTrainedModel:
    """The unwrapped drafter, after checking it was built for this target (raises on a mismatch)."""
    if drafter is None:
        raise ValueError("a drafter is required (pass drafter=... or use attach_drafter)")
    model = unwrap_drafter(drafter)
    if not hasattr(model, "check_target"):
        raise TypeError(f"{type(model).__name__} is not a ppow_trl drafter (Eagle3Drafter or MedusaDrafter)")
    model.check_target(target)
    return model


def _check_context(target: PreTrainedModel, prompt_lengths: torch.Tensor, max_new_tokens: int) -> None:
    context = getattr(target.config, "max_position_embeddings", None)
    longest = int(prompt_lengths.max())
    if context and longest + max_new_tokens > context:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the target's context of "
            f"{context} tokens (max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )


def _feature_layers(model: PreTrainedModel) -> list[int] | None:
    ids = list(getattr(model.config, "aux_layer_ids", None) or [])
    return ids or None


def _vocab_size(target: PreTrainedModel) -> int:
    head = target.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(target.config.vocab_size)


def _draft_probs_mapper(model: PreTrainedModel, vocab_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps (B, K, V_d) draft-vocabulary probabilities to (B, K, V) over the target vocabulary."""
    d2t = getattr(model, "d2t", None)
    if model.config.draft_vocab_size == vocab_size and (d2t is None or not bool(d2t.any())):
        return lambda probs: probs
    return functools.partial(scatter_draft_probs, d2t=d2t, vocab_size=vocab_size, validate=False)


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
    ):
        self.model = unwrap_drafter(drafter)
        self.num_draft_tokens = _check_window(num_draft_tokens)
        self.do_sample = bool(generation_config.do_sample)
        temperature = generation_config.temperature if generation_config.temperature is not None else 1.0
        self.temperature = float(temperature) if self.do_sample else 0.0
        self.max_length = generation_config.max_length
        self.to_full_vocab = _draft_probs_mapper(self.model, vocab_size)
        self.chain = ChainDrafter(self.model, temperature=self.temperature)
        if self.model.feature_name == "aux_hidden_states":
            layers = _feature_layers(self.model)
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
        self.chain.commit(features, tokens, positions.to(self.model.device), valid)

        window = min(self.num_draft_tokens, self.max_length - length - 1)
        self.last_window = max(window, 0)
        if window <= 0:
            self.drafter_seconds += self.clock() - start
            return input_ids, None
        draft_tokens, draft_probs = self.chain.draft(window)
        candidates = torch.cat([input_ids, draft_tokens.to(input_ids.device)], dim=1)
        logits = None
        if self.do_sample:
            logits = self.to_full_vocab(draft_probs).log()
        self.drafter_seconds += self.clock() - start
        return candidates, logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        if not self.prefilled:  # the prefill forward is not a verification
            return
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


def _make_candidate_generator_factory(drafter: PreTrainedModel, num_draft_tokens: int, sink: list):
    def _get_candidate_generator(self, generation_config, *args, **kwargs) -> CandidateGenerator:
        generator = DrafterCandidateGenerator(drafter, num_draft_tokens, generation_config, _vocab_size(self))
        sink.append(generator)
        return generator

    return _get_candidate_generator


def assisted_decoding_with_drafter(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: Any,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    drafter: PreTrainedModel | None = None,
    num_draft_tokens: int | None = None,
    **model_kwargs,
) -> torch.LongTensor | SpeculativeOutput:
    """`custom_generate` callable: transformers' assisted decoding with a `DrafterCandidateGenerator`.

    Use as ``target.generate(ids, custom_generate=assisted_decoding_with_drafter, drafter=d,
    num_draft_tokens=K, max_new_tokens=N)``. Batch size 1 (a transformers limit). Returns the sequences, or a
    `SpeculativeOutput` with statistics when ``return_dict_in_generate=True``.
    """
    attachment = getattr(model, _ATTACHMENT, None)
    drafter = drafter if drafter is not None else getattr(attachment, "drafter", None)
    if num_draft_tokens is None:
        num_draft_tokens = getattr(attachment, "num_draft_tokens", None)
    drafter_model = _check_pair(model, drafter)
    num_draft_tokens = _check_window(num_draft_tokens)
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"transformers' assisted decoding supports batch size 1 only (got {input_ids.shape[0]}); use "
            "custom_generate=speculative_decoding or ppow_trl.decoding.speculative.speculative_generate for batches"
        )
    generators: list[DrafterCandidateGenerator] = []
    had_override = "_get_candidate_generator" in model.__dict__
    previous = model.__dict__.get("_get_candidate_generator")
    model._get_candidate_generator = types.MethodType(
        _make_candidate_generator_factory(drafter_model, num_draft_tokens, generators), model
    )
    want_dict = bool(generation_config.return_dict_in_generate)
    try:
        result = model._assisted_decoding(
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )
    finally:
        if had_override:
            model._get_candidate_generator = previous
        else:
            del model._get_candidate_generator
    sequences = result if isinstance(result, torch.Tensor) else result.sequences
    generator = generators[-1]
    output = SpeculativeOutput(
        sequences=sequences,
        accepted=torch.tensor(generator.accepted, dtype=torch.long).view(-1, 1),
        window_sizes=torch.tensor(generator.window_sizes, dtype=torch.long),
        num_verify_forwards=generator.num_verify_forwards,
        new_tokens=torch.tensor([sequences.shape[1] - input_ids.shape[1]]),
        timings={"drafter": generator.drafter_seconds},
    )
    if attachment is not None:
        attachment.last_output = output
    return output if want_dict else sequences


# ------------------------------------------------------------------------------------- our batched loop
def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Token per row from (B, V) (already warped) logits: argmax at temperature 0, else a sample."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


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


@torch.no_grad()
def speculative_generate(
    target: PreTrainedModel,
    drafter: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    num_draft_tokens: int = 5,
    temperature: float = 0.0,
    eos_token_id: int | list[int] | torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    logits_warper: Callable[[torch.Tensor], torch.Tensor] | None = None,
    verify_backend: str = "auto",
    profile: bool | Callable[[], float] = False,
) -> SpeculativeOutput:
    """Batched speculative decoding (chain drafting, K tokens per round) with a drafter; lossless.

    Args:
        target: the frozen target (any transformers causal LM whose base model returns hidden states).
        drafter: an `Eagle3Drafter` / `MedusaDrafter` built for `target`.
        input_ids: (B, T0) prompts, left-padded; attention_mask (B, T0) 1 for real tokens (None = no padding).
        max_new_tokens: tokens to generate per row at most (EOS included).
        num_draft_tokens: K, draft tokens per verification window.
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

    Rows finish at EOS or after max_new_tokens and stop counting; the KV entries of rejected draft tokens
    stay in the (shared, batched) target cache only when another row accepted more, and are masked out
    (at batch size 1 the cache is simply cropped). With B > 1 such masked entries still count towards a
    sliding attention window, so sliding-window targets are exact at batch size 1 only.
    """
    model = _check_pair(target, drafter)
    window = _check_window(num_draft_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (B, T0) with T0 >= 1, got {tuple(input_ids.shape)}")
    device = next(target.parameters()).device
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
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

    if eos_token_id is None:
        eos = None
    else:
        eos = torch.as_tensor(eos_token_id, dtype=torch.long, device=device).reshape(-1)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None and eos.numel() else 0
    to_full_vocab = _draft_probs_mapper(model, _vocab_size(target))
    lm_head = target.get_output_embeddings()
    layers = _feature_layers(model)
    sampling = temperature > 0

    def warp(logits: torch.Tensor) -> torch.Tensor:
        if not sampling:
            return logits
        if logits_warper is not None:
            return logits_warper(logits)
        return logits * (1.0 / temperature)

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
    first = _pick(warp(lm_head(out.last_hidden_state[:, -1]).float()), temperature, generator)
    features = getattr(out, model.feature_name).masked_fill(~mask[..., None], 0.0)
    timer.lap("prefill")
    chain.commit(features, torch.cat([input_ids[:, 1:], first[:, None]], dim=1), positions, mask)
    timer.lap("drafter_commit")

    generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    generated[:, 0] = first
    num_generated = torch.ones(batch, dtype=torch.long, device=device)
    finished = num_generated >= max_new_tokens
    if eos is not None:
        finished |= torch.isin(first, eos)
    pending, cur_pos = first, lengths.clone()
    attn = mask.clone()
    steps = torch.arange(window + 1, device=device)
    rows = torch.arange(batch, device=device)[:, None].expand(-1, window + 1)
    accepted_log: list[torch.Tensor] = []
    timer.lap("bookkeeping")

    while not bool(finished.all()):
        active = ~finished
        draft_tokens, draft_probs = chain.draft(window)
        timer.lap("drafter_draft")
        window_ids = torch.cat([pending[:, None], draft_tokens], dim=1)
        window_pos = cur_pos[:, None] + steps
        attn = torch.cat([attn, torch.ones(batch, window + 1, dtype=torch.bool, device=device)], dim=1)
        timer.lap("bookkeeping")
        out = capture_features(
            target, window_ids, attn.long() if has_holes else None, layers, with_logits=False,
            position_ids=window_pos, cache=cache, use_cache=True,
        )  # fmt: skip
        logits = warp(lm_head(out.last_hidden_state).float())
        timer.lap("target_forward")
        probs = to_full_vocab(draft_probs) if sampling else None
        result = verify_windows(
            logits, draft_tokens, probs, 1.0 if sampling else 0.0, generator=generator, backend=verify_backend
        )
        accepted, bonus = result.accepted, result.next_token
        timer.lap("verify")

        # Tokens this round emits per row: d_1..d_a then b; cut at EOS and at max_new_tokens.
        emitted = torch.cat([draft_tokens, torch.zeros_like(bonus)[:, None]], dim=1)
        emitted.scatter_(1, accepted[:, None], bonus[:, None])
        kept = steps[None] <= accepted[:, None]
        count = torch.minimum(accepted + 1, max_new_tokens - num_generated)
        hit_eos = torch.zeros_like(finished)
        if eos is not None:
            is_eos = torch.isin(emitted, eos) & kept
            first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), window + 1)
            count = torch.minimum(count, first_eos + 1)
            hit_eos = first_eos < count
        count = torch.where(active, count, 0)
        write = steps[None] < count[:, None]
        columns = (num_generated[:, None] + steps).clamp(max=max_new_tokens - 1)
        generated[rows[write], columns[write]] = emitted[write]
        num_generated += count
        accepted_log.append(torch.where(active, accepted, -1))
        finished = finished | hit_eos | (num_generated >= max_new_tokens)
        if bool(finished.all()):
            timer.lap("bookkeeping")
            break

        # Keep the KV (and drafter rows) of the accepted prefix [x_n, d_1..d_a] of rows still running.
        slot_valid = kept & ~finished[:, None]
        used = int(slot_valid.sum(1).max())
        if used < window + 1:
            cache.crop(used - window - 1)
        attn = torch.cat([attn[:, : attn.shape[1] - window - 1], slot_valid[:, :used]], dim=1)
        has_holes = has_holes or not bool(slot_valid[:, :used].all())
        cur_features = getattr(out, model.feature_name)[:, :used]
        timer.lap("bookkeeping")
        chain.commit(
            cur_features.masked_fill(~slot_valid[:, :used, None], 0.0),
            emitted[:, :used],
            window_pos[:, :used],
            slot_valid[:, :used],
        )
        timer.lap("drafter_commit")
        cur_pos = torch.where(finished, cur_pos, cur_pos + accepted + 1)
        pending = torch.where(finished, pending, bonus)
        timer.lap("bookkeeping")

    longest = int(num_generated.max())
    accepted_all = (
        torch.stack(accepted_log).cpu() if accepted_log else torch.zeros(0, batch, dtype=torch.long)
    )
    return SpeculativeOutput(
        sequences=torch.cat([input_ids, generated[:, :longest]], dim=1),
        accepted=accepted_all,
        window_sizes=torch.full((len(accepted_log),), window, dtype=torch.long),
        num_verify_forwards=len(accepted_log),
        new_tokens=num_generated.cpu(),
        timings=timer.times if profile else None,
    )


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
    num_draft_tokens: int | None = None,
    **model_kwargs,
) -> torch.LongTensor | SpeculativeOutput:
    """`custom_generate` callable running `speculative_generate` (any batch size, left padding).

    Use as ``target.generate(ids, attention_mask=mask, custom_generate=speculative_decoding, drafter=d,
    num_draft_tokens=K, max_new_tokens=N)``; `do_sample`/`temperature`/`top_k`/`top_p`/`min_p` are honoured,
    other logits processors and custom stopping criteria are not. Returns the sequences, or a
    `SpeculativeOutput` with statistics when ``return_dict_in_generate=True``.
    """
    attachment = getattr(model, _ATTACHMENT, None)
    drafter = drafter if drafter is not None else getattr(attachment, "drafter", None)
    if num_draft_tokens is None:
        num_draft_tokens = getattr(attachment, "num_draft_tokens", None)
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
    eos = generation_config._eos_token_tensor
    pad = generation_config._pad_token_tensor
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
    num_draft_tokens: int = 5,
    method: str = "auto",
    **generate_kwargs,
) -> SpeculativeOutput:
    """Speculative decoding of `target` with `drafter` through `target.generate`; returns sequences + stats.

    Args:
        target / drafter: the frozen target and a drafter built for it (checked: `drafter.check_target`).
        input_ids / attention_mask: (B, T0) prompts (left padding for B > 1).
        num_draft_tokens: K, draft tokens per verification window.
        method: "assisted" (transformers' assisted decoding with `DrafterCandidateGenerator`, batch 1),
            "loop" (`speculative_generate`, any batch size), "auto" (assisted for B == 1, else loop).
        **generate_kwargs: passed to `generate` (max_new_tokens, do_sample, temperature, eos_token_id, ...).

    Greedy (the default) reproduces plain greedy decoding; `do_sample=True` is lossless speculative sampling.
    """
    _check_pair(target, drafter)
    _check_window(num_draft_tokens)
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
    _check_pair(target, drafter)
    _check_window(num_draft_tokens)
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
