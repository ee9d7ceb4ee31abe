"""Target regeneration: chat-templated multi-turn prompts -> batched `generate` -> cached token shards.

Every conversation becomes one token sequence: the chat-templated user turns (loss mask 0) and the
target's own answers (loss mask 1, including the end-of-turn token it generated). The target answers
turn 1, its answer goes into the conversation, then it answers turn 2, and so on.

Results are written in shards of `shard_size` conversations under
`<cache_dir>/regen/<fingerprint>/`; the fingerprint covers the target (name, config, a checksum of a
few weight tensors), the tokenizer and chat template, the prompts, the generation settings and the
length policy. An interrupted run regenerates only the missing shards; a finished one loads in seconds.
Shards are named by their content, so a prompt list that grows (more prompts appended) reuses the shards it
shares with a cached, smaller one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .. import _compat
from ..packed import packed_linears, use_packed_linears
from ..target import eos_token_ids, pad_token_id, target_name
from .cache import (
    check_manifest,
    content_shard_path,
    fill_shards,
    fingerprint_of,
    read_token_shard,
    reuse_shard,
    sha,
    write_token_shard,
)
from .config import DataConfig
from .filters import FilterSettings, malformed_reason
from .refill import refill_generate
from .sources import SELF_GENERATED, PromptExample

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
_PROBE_USER, _PROBE_ANSWER = "PPOW-PROBE-USER", "PPOW-PROBE-ANSWER"
_VOLATILE_CONFIG_KEYS = (
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "ppow_target_name",
    "_commit_hash",
)


@dataclass
class Regeneration:
    """All regenerated conversations (input order, dropped prompts left out) and where they live."""

    dataset: Dataset
    directory: Path
    fingerprint: str
    stats: dict[str, Any]


# ----------------------------------------------------------------------------------------- fingerprint
def target_identity(target: PreTrainedModel) -> dict[str, str]:
    """Name, config hash and a checksum of a few weight tensors (first, middle, last) of the target."""
    config = {k: v for k, v in target.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    params = list(target.named_parameters())
    digest = hashlib.sha256()
    for name, param in [params[0], params[len(params) // 2], params[-1]] if params else []:
        flat = param.detach().reshape(-1)
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        if flat.device.type != "meta":
            sample = torch.cat([flat[:4096], flat[-4096:]]).float().cpu()
            digest.update(sample.numpy().tobytes())
    return {
        "name": target_name(target),
        "config_sha": sha(config),
        "weights_sha": digest.hexdigest(),
        "dtype": str(next(target.parameters()).dtype) if params else "none",
    }


def context_limit(target: PreTrainedModel, config: DataConfig) -> int:
    """Longest allowed prompt: min(max_prompt_length, max_position_embeddings - max_new_tokens)."""
    limits = [config.max_prompt_length] if config.max_prompt_length else []
    context = getattr(target.config, "max_position_embeddings", None)
    if context:
        room = context - config.max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the target's "
                f"context of {context} tokens"
            )
        limits.append(room)
    return min(limits) if limits else math.inf


def regeneration_inputs(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[PromptExample],
    config: DataConfig,
) -> dict[str, Any]:
    """Everything that determines the regenerated data (hashed into the cache fingerprint)."""
    sampling = config.do_sample
    limit = context_limit(target, config)
    inputs = {
        "version": CACHE_VERSION,
        "target": target_identity(target),
        "tokenizer": {
            "vocab_sha": sha(sorted(tokenizer.get_vocab().items())),
            "chat_template_sha": sha(tokenizer.chat_template or ""),
            "eos_token_ids": eos_token_ids(target, tokenizer),
            "pad_token_id": pad_token_id(tokenizer),
        },
        "prompts": {"count": len(examples), "sha": sha([[e.id, e.turns, e.source] for e in examples])},
        "generation": {
            "max_new_tokens": config.max_new_tokens,
            "do_sample": sampling,
            "temperature": config.regen_temperature if sampling else None,
            "top_p": config.regen_top_p if sampling else None,
            "seed": config.seed if sampling else None,
        },
        "lengths": {
            "prompt_limit": None if limit == math.inf else int(limit),
            "prompt_truncation": config.prompt_truncation,
        },
        "shard_size": config.shard_size,
    }
    if writes_follow_ups(config):  # the target writes later user turns itself
        inputs["follow_ups"] = {
            "max_turns": config.max_turns,
            "temperature": config.prompt_temperature,
            "top_p": config.prompt_top_p,
            "max_new_tokens": config.prompt_max_new_tokens,
            "stop_fraction": config.prompt_stop_fraction,
            "filters": asdict(FilterSettings.from_config(config)),
            "seed": config.seed,
        }
        if config.follow_up_fraction < 1.0:  # absent at 1.0: caches written before the field stay valid
            inputs["follow_ups"]["fraction"] = config.follow_up_fraction
    return inputs


# ------------------------------------------------------------------------------------------ templating
def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool
) -> str:
    if not tokenizer.chat_template:
        raise ValueError("the target's tokenizer has no chat template; set tokenizer.chat_template first")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def turn_closing_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the chat template puts after an assistant message (e.g. '<|im_end|>\\n')."""
    messages = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    text = render(tokenizer, messages, generation_prompt=False)
    if _PROBE_ANSWER not in text:
        raise ValueError("the chat template does not render assistant messages; use max_turns=1")
    return text.rsplit(_PROBE_ANSWER, 1)[1]


DEFAULT_SYSTEM = "<template default>"  # render with no system message: the template adds its own, if any
_PROBE_SYSTEM = "PPOW-PROBE-SYSTEM"


def pre_query_prefix(tokenizer: PreTrainedTokenizerBase, system: str | None) -> str:
    """The chat-template text up to where the user's text starts, for a system prompt (or none)."""
    if system == DEFAULT_SYSTEM:
        return render(tokenizer, [{"role": "user", "content": _PROBE_USER}], False).split(_PROBE_USER)[0]
    messages = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
    head, rest = render(tokenizer, messages, False).split(_PROBE_USER)[0].split(_PROBE_SYSTEM)
    if system is not None:
        return head + system + rest
    closing = turn_closing_text(tokenizer)  # the system block ends like any turn
    user_header = rest[len(closing) :] if rest.startswith(closing) else rest
    bos = tokenizer.bos_token or ""
    # A BOS that opens the whole template (Llama 3's <|begin_of_text|>) stays; ChatML's turn opener does not.
    keeps_bos = bos and head.startswith(bos) and not user_header.startswith(bos)
    return (bos if keeps_bos else "") + user_header


@dataclass
class _Conversation:
    example: PromptExample
    turns: list[str] = field(default_factory=list)  # the example's, plus follow-ups the target wrote
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    rendered: str = ""  # template text of `messages` after the last completed turn
    pending: str = ""  # closing text of the last answer, still to be tokenized
    turns_done: int = 0
    active: bool = True


@dataclass
class _FollowUps:
    """How the target writes the next user turn after its own answer (self-generated multi-turn data)."""

    generation: GenerationConfig
    user_header: str
    max_turns: int
    stop_fraction: float
    filters: FilterSettings
    fraction: float = 1.0
    seed: int = 0

    def continues(self, conv: _Conversation) -> bool:
        """Whether the target writes another user turn after this answer (a seeded share of prompt ids)."""
        if conv.turns_done >= self.max_turns:
            return False
        digest = hashlib.sha256(f"{self.seed}:{conv.example.id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fraction


@dataclass
class _Settings:
    generation: GenerationConfig
    eos_ids: list[int]
    pad_id: int
    limit: float
    policy: str
    closing: str | None
    follow_ups: _FollowUps | None = None
    refill_rows: bool = False


def writes_follow_ups(config: DataConfig) -> bool:
    return config.dataset_name == SELF_GENERATED and (config.max_turns or 1) > 1


def _follow_ups(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int], pad_id: int
) -> _FollowUps:
    return _FollowUps(
        prompt_generation_config(config, eos_ids, pad_id), pre_query_prefix(tokenizer, None), config.max_turns, config.prompt_stop_fraction,
        FilterSettings.from_config(config), config.follow_up_fraction, config.seed,
    )  # fmt: skip


def _next_prompt(conv: _Conversation, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], str]:
    """Token ids to append for the next user turn, and the template text after appending it."""
    messages = [*conv.messages, {"role": "user", "content": conv.turns[conv.turns_done]}]
    text = render(tokenizer, messages, generation_prompt=True)
    if not text.startswith(conv.rendered):
        raise ValueError(
            "the chat template rewrites earlier turns, so multi-turn regeneration cannot extend the "
            f"conversation token by token (prompt {conv.example.id!r}); set max_turns=1"
        )
    delta = conv.pending + text[len(conv.rendered) :]
    return tokenizer(delta, add_special_tokens=False)["input_ids"], text


def _admit_turn(conv: _Conversation, tokenizer: PreTrainedTokenizerBase, s: _Settings, stats: dict) -> bool:
    """Append the next user turn under the length policy; False when the conversation stops here."""
    new_ids, text = _next_prompt(conv, tokenizer)
    ids, mask = conv.ids + new_ids, conv.mask + [0] * len(new_ids)
    if len(ids) > s.limit:
        where = f"prompt {conv.example.id!r} turn {conv.turns_done + 1}"
        if s.policy == "error":
            raise ValueError(
                f"{where} has {len(ids)} tokens, more than the limit of {int(s.limit)} (min of "
                "max_prompt_length and the target's context minus max_new_tokens); set "
                "prompt_truncation='drop' or 'left', or raise max_prompt_length"
            )
        if s.policy == "drop":
            stats["dropped_prompts" if conv.turns_done == 0 else "dropped_turns"] += 1
            if conv.turns_done == 0:
                stats["dropped_ids"].append(conv.example.id)
            conv.active = False
            return False
        ids, mask = ids[-int(s.limit) :], mask[-int(s.limit) :]
        stats["truncated_prompts"] += 1
    conv.ids, conv.mask, conv.rendered, conv.pending = ids, mask, text, ""
    conv.messages.append({"role": "user", "content": conv.turns[conv.turns_done]})
    return True


def _record_answer(
    conv: _Conversation, generated: list[int], tokenizer: PreTrainedTokenizerBase, s: _Settings
) -> None:
    ended = bool(generated) and generated[-1] in s.eos_ids
    answer_ids = generated[:-1] if ended else generated
    answer = tokenizer.decode(answer_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    conv.ids = conv.ids + generated
    conv.mask = conv.mask + [1] * len(generated)
    conv.messages.append({"role": "assistant", "content": answer})
    conv.turns_done += 1
    more = s.follow_ups is not None and s.follow_ups.continues(conv)
    if conv.turns_done >= len(conv.turns) and not more:
        conv.active = False
        return
    conv.rendered = render(tokenizer, conv.messages, generation_prompt=False)
    closing = s.closing or ""
    eos_text = tokenizer.decode(generated[-1:], skip_special_tokens=False) if ended else ""
    conv.pending = closing[len(eos_text) :] if ended and closing.startswith(eos_text) else closing


# ------------------------------------------------------------------------------------------ generation
def strip_generation(row: list[int], eos_ids: list[int]) -> list[int]:
    """Cut one generated row after its first end-of-turn token (the rest is batch padding)."""
    eos = set(eos_ids)
    for position, token in enumerate(row):
        if token in eos:
            return row[: position + 1]
    return row


@torch.no_grad()
def batched_generate(
    target: PreTrainedModel,
    prompts: list[list[int]],
    generation_config: GenerationConfig,
    pad_token_id: int,
    eos_ids: list[int],
    stop_fraction: float = 1.0,
    growing_cache: bool = True,
) -> list[list[int]]:
    """Generate for prompts of different lengths in one left-padded batch; returns each row's new tokens.

    With `stop_fraction` < 1 the batch stops as soon as that share of its rows has ended (the rest come
    back unfinished): used where unfinished rows are dropped anyway, so one long row does not hold the batch.
    `growing_cache` (same tokens) appends keys/values in place instead of transformers' copy per step.
    """
    device = next(target.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    stopping = [_MostRowsEnded(stop_fraction, eos_ids, width)] if stop_fraction < 1.0 else []
    # oneDNN prepacked linears: 1.27-1.33x the tokens/s of the default CPU matmul at batch 8-32, same tokens
    with packed_linears(target, use_packed_linears(target)):
        output = target.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            stopping_criteria=StoppingCriteriaList(stopping),
            cache=_compat.growing_cache(target.config) if growing_cache else None,
        )
    return [strip_generation(row, eos_ids) for row in output[:, width:].tolist()]


class _MostRowsEnded(StoppingCriteria):
    def __init__(self, fraction: float, eos_ids: list[int], prompt_width: int) -> None:
        self.fraction, self.eos, self.width = fraction, torch.tensor(eos_ids), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        ended = torch.isin(input_ids[:, self.width :], self.eos.to(input_ids.device)).any(-1)
        stop = bool(ended.float().mean() >= self.fraction)
        return torch.full_like(ended, stop)


def prompt_generation_config(config: DataConfig, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """Sampling settings with which the target writes user turns (`prompt_*` fields)."""
    return GenerationConfig(
        max_new_tokens=config.prompt_max_new_tokens,
        do_sample=True,
        temperature=config.prompt_temperature,
        top_p=config.prompt_top_p,
        top_k=None,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )


def make_generation_config(config: DataConfig, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """The explicit generation settings (greedy unless `do_sample`), independent of the model's defaults."""
    sampling = (
        {"temperature": config.regen_temperature, "top_p": config.regen_top_p, "top_k": None}
        if config.do_sample
        else {}
    )
    return GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        **sampling,
    )


def _empty_stats() -> dict[str, Any]:
    counts = ("dropped_prompts", "dropped_turns", "truncated_prompts", "generated_tokens", "follow_up_turns")
    # wall time per phase and answers per turn (first turns / later turns), summed over shards: what a turn costs
    costs = ("first_turn_answers", "first_turn_seconds", "later_turn_answers", "later_turn_seconds")
    return {**dict.fromkeys(counts + costs, 0), "follow_up_rejected": 0, "dropped_ids": []}


def _generate_shard(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[PromptExample],
    s: _Settings,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[list[_Conversation], dict[str, Any]]:
    """Regenerate one shard turn by turn, `batch_size` conversations at a time."""
    stats = _empty_stats()
    conversations = [_Conversation(example, list(example.turns)) for example in examples]
    while True:
        turn_started = time.perf_counter()  # a later turn's cost includes writing its user turn
        if s.follow_ups is not None:
            waiting = [c for c in conversations if c.active and c.turns_done == len(c.turns)]
            _write_follow_ups(target, tokenizer, waiting, s, batch_size, stats)
        active = [c for c in conversations if c.active and _admit_turn(c, tokenizer, s, stats)]
        if not active:
            break
        turn = "first_turn" if active[0].turns_done == 0 else "later_turn"
        if s.generation.do_sample or not s.refill_rows:  # static batches of similar prompt lengths
            active.sort(key=lambda c: len(c.ids))
            outputs = []
            for start in range(0, len(active), batch_size):
                batch = [c.ids for c in active[start : start + batch_size]]
                answers = batched_generate(target, batch, s.generation, s.pad_id, s.eos_ids)
                outputs += answers
                if on_batch is not None:
                    on_batch(len(answers), sum(len(answer) for answer in answers))
        else:  # greedy, refilled: a row whose answer ended takes the next conversation (refill.py)
            outputs = refill_generate(
                target,
                [c.ids for c in active],
                s.generation.max_new_tokens,
                s.eos_ids,
                s.pad_id,
                batch_size,
                on_answer=None if on_batch is None else lambda tokens: on_batch(1, tokens),
            )
        for conv, generated in zip(active, outputs):
            _record_answer(conv, generated, tokenizer, s)
        stats["generated_tokens"] += sum(len(generated) for generated in outputs)
        stats[f"{turn}_answers"] += len(outputs)
        stats[f"{turn}_seconds"] += time.perf_counter() - turn_started
    return [c for c in conversations if c.turns_done > 0], stats


def _write_follow_ups(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[_Conversation],
    s: _Settings,
    batch_size: int,
    stats: dict[str, Any],
) -> None:
    """The target writes each conversation's next user turn after its answer (sampled, batched); a turn the
    filters reject ends its conversation."""
    f = s.follow_ups
    prompts = [
        c.ids + tokenizer(c.pending + f.user_header, add_special_tokens=False)["input_ids"]
        for c in conversations
    ]
    turns = write_user_turns(target, tokenizer, prompts, f.generation, s.eos_ids, batch_size, f.stop_fraction)
    for conv, (text, ended) in zip(conversations, turns):
        if malformed_reason(text.strip(), ended, f.filters) is None:
            conv.turns.append(text.strip())
            stats["follow_up_turns"] += 1
        else:
            conv.active = False
            stats["follow_up_rejected"] += 1


def write_user_turns(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    generation: GenerationConfig,
    eos_ids: list[int],
    batch_size: int,
    stop_fraction: float,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[str, bool]]:
    """Sample a user turn after each prompt (token ids ending in a user header), in batches of similar
    length: each turn's text (end-of-turn token removed) and whether it ended."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    written: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        outputs = batched_generate(
            target, [prompts[i] for i in batch], generation, generation.pad_token_id, eos_ids, stop_fraction
        )
        written.update(zip(batch, outputs))
        if on_batch is not None:
            on_batch(len(batch))
    turns = []
    for i in range(len(prompts)):
        ended = bool(written[i]) and written[i][-1] in eos_ids
        body = written[i][:-1] if ended else written[i]
        turns.append((tokenizer.decode(body, skip_special_tokens=False), ended))
    return turns


@contextlib.contextmanager
def _shard_rng(config: DataConfig, shard: int, target: PreTrainedModel) -> Iterator[None]:
    """Sampling seeded per shard (so a resumed run samples the same), without touching the global RNG."""
    if not (config.do_sample or writes_follow_ups(config)):
        yield
        return
    device = next(target.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed * 1_000_003 + shard)
        yield


# ------------------------------------------------------------------------------------------ entry point
def _settings(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[PromptExample],
    config: DataConfig,
) -> _Settings:
    eos_ids = eos_token_ids(target, tokenizer)
    pad_id = pad_token_id(tokenizer)
    follow_ups = _follow_ups(config, tokenizer, eos_ids, pad_id) if writes_follow_ups(config) else None
    multi_turn = follow_ups is not None or any(len(e.turns) > 1 for e in examples)
    return _Settings(
        generation=make_generation_config(config, eos_ids, pad_id),
        eos_ids=eos_ids,
        pad_id=pad_id,
        limit=context_limit(target, config),
        policy=config.prompt_truncation,
        closing=turn_closing_text(tokenizer) if multi_turn else None,
        follow_ups=follow_ups,
        refill_rows=config.refill_rows,
    )


def regenerate(
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[PromptExample],
    config: DataConfig,
    progress: bool = True,
) -> Regeneration:
    """Regenerate the target's answers to `examples` (cached, resumable) and return them as a Dataset.

    Columns: `input_ids` (full conversation), `loss_mask` (1 on target-generated tokens), `prompt_id`,
    `num_turns` (answered turns) and `index` (row number, the key of offline feature caches).
    """
    if not examples:
        raise ValueError("no prompts to regenerate")
    if len({e.id for e in examples}) != len(examples):
        raise ValueError("prompt ids must be unique")
    inputs = regeneration_inputs(target, tokenizer, examples, config)
    fingerprint = fingerprint_of(inputs)
    directory = config.cache_path / "regen" / fingerprint
    check_manifest(directory, fingerprint, inputs)
    chunks = [examples[i : i + config.shard_size] for i in range(0, len(examples), config.shard_size)]
    settings_only = {key: value for key, value in inputs.items() if key != "prompts"}
    paths = [
        content_shard_path(
            directory, i, [settings_only, [[e.id, e.turns, e.source] for e in chunk]], "parquet"
        )
        for i, chunk in enumerate(chunks)
    ]
    # a dataset grown from a cached one (more prompts appended) reuses its unchanged shards
    missing = [i for i, path in enumerate(paths) if not path.is_file() and not reuse_shard(path)]
    if missing:
        settings = _settings(target, tokenizer, examples, config)
        logger.info(
            "Regenerating %d of %d shards into %s (%s, max_new_tokens=%d)",
            len(missing),
            len(chunks),
            directory,
            "sampling" if config.do_sample else "greedy",
            config.max_new_tokens,
        )
        # expected turns per conversation (the progress bar's total; rejected follow-ups end some early)
        turns_each = (
            1 + ((config.max_turns or 1) - 1) * config.follow_up_fraction if settings.follow_ups else 0
        )
        turns_of = [round(sum(max(len(e.turns), turns_each) for e in chunk)) for chunk in chunks]
        total_turns = sum(turns_of[i] for i in missing)
        with tqdm(total=total_turns, desc="regenerating", unit="turn", disable=not progress) as bar:
            generated = [0]

            def on_batch(turns: int, tokens: int) -> None:
                generated[0] += tokens
                bar.set_postfix(new_tokens=generated[0], refresh=False)
                bar.update(turns)

            def write(i: int) -> None:
                with _shard_rng(config, i, target):
                    conversations, stats = _generate_shard(
                        target, tokenizer, chunks[i], settings, config.regen_batch_size, on_batch
                    )
                columns = {
                    "input_ids": [c.ids for c in conversations],
                    "loss_mask": [c.mask for c in conversations],
                    "prompt_id": [c.example.id for c in conversations],
                    "num_turns": [c.turns_done for c in conversations],
                    "task": [c.example.source for c in conversations],  # for people reading the shards
                }
                write_token_shard(paths[i], columns, stats)

            fill_shards(paths, missing, write, lambda i: bar.update(turns_of[i]))
    else:
        logger.info("Loading regenerated data from the cache %s", directory)
    return _load(directory, paths, fingerprint)


def _load(directory: Path, paths: list[Path], fingerprint: str) -> Regeneration:
    columns: dict[str, list] = {"input_ids": [], "loss_mask": [], "prompt_id": [], "num_turns": []}
    stats = _empty_stats()
    for path in paths:
        shard_columns, shard_stats = read_token_shard(path)
        for name, values in shard_columns.items():
            columns[name].extend(values)
        for name, value in shard_stats.items():
            stats[name] = stats.get(name, 0) + value
    columns["index"] = list(range(len(columns["prompt_id"])))
    stats["num_sequences"] = len(columns["prompt_id"])
    if stats["dropped_prompts"] or stats["truncated_prompts"] or stats["dropped_turns"]:
        logger.info(
            "Length policy: %d prompts dropped, %d later turns dropped, %d prompts left-truncated",
            stats["dropped_prompts"],
            stats["dropped_turns"],
            stats["truncated_prompts"],
        )
    return Regeneration(Dataset.from_dict(columns), directory, fingerprint, stats)
