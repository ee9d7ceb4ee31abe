"""Greedy answers with finished rows refilled: a batch in which every row stays busy.

A static left-padded batch runs until its longest answer, so most rows idle at its end. Here the batch keeps
`batch_size` slots: a slot whose answer has ended is refilled in place as soon as a few slots are free (one
batched prefill for the new prompts, their keys/values written right-aligned into the free slots; each key
carries its RoPE position, so where a row sits in the padded cache does not matter). Columns that are
padding in every slot are dropped as a view, so the cache stays as long as the longest live row. Copying
the whole cache (what appending or removing rows would cost at every ended answer) happens only when a new
prompt is longer than the cache or the queue has run dry. The tokens are those of one-prompt-at-a-time greedy
decoding, up to floating-point ties.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from .. import _compat
from ..packed import packed_linears, use_packed_linears

FREE = -1  # owner of a slot with no prompt


class _Slots:
    """The batch: cache, attention mask, the tokens each slot has generated (`tokens[s, :count[s]]`) and the
    prompt each slot answers (`owners`, FREE when none)."""

    def __init__(
        self, cache: DynamicCache, mask: torch.Tensor, first: torch.Tensor, owners: list[int], max_new: int
    ):
        self.cache, self.mask, self.owners = cache, mask, owners
        self.tokens = F.pad(first[:, None], (0, max_new - 1))
        self.count = torch.ones_like(first)

    @property
    def last(self) -> torch.Tensor:
        return self.tokens[
            torch.arange(len(self.owners)), (self.count - 1).clamp(max=self.tokens.shape[1] - 1)
        ]

    def free(self, slots: list[int]) -> None:
        """Let ended slots idle until refilled: each attends only to its newest column (never to nothing, which
        would put NaN into its cache row), so it holds back no column from being dropped."""
        for slot in slots:
            self.owners[slot] = FREE
        self.mask[slots, :-1] = 0

    def fill(
        self,
        slots: list[int],
        cache: DynamicCache,
        mask: torch.Tensor,
        first: torch.Tensor,
        owners: list[int],
    ):
        """Write newly prefilled prompts into free `slots`, right-aligned."""
        width = max(self.mask.shape[1], mask.shape[1])
        rows = torch.tensor(slots)
        tensors = []
        for old, new in zip(_compat.cache_tensors(self.cache), _compat.cache_tensors(cache)):
            old = _left_pad(old, width, 2)
            old[rows.to(old.device)] = _left_pad(new, width, 2)
            tensors.append(old)
        _compat.set_cache_tensors(self.cache, tensors)
        self.mask = _left_pad(self.mask, width, 1)
        self.mask[rows] = _left_pad(mask, width, 1)
        self.tokens[rows] = F.pad(first[:, None], (0, self.tokens.shape[1] - 1))
        self.count[rows] = 1
        for slot, owner in zip(slots, owners):
            self.owners[slot] = owner

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (once the queue is empty, so that ended slots stop costing compute)."""
        index = torch.tensor(rows)
        _compat.set_cache_tensors(
            self.cache, [t[index.to(t.device)] for t in _compat.cache_tensors(self.cache)]
        )
        self.mask, self.tokens, self.count = self.mask[index], self.tokens[index], self.count[index]
        self.owners = [self.owners[i] for i in rows]

    def trim(self) -> None:
        """Drop the columns that are padding in every slot (a view: no copy)."""
        start = int(self.mask.any(0).int().argmax())
        if start:
            _compat.set_cache_tensors(
                self.cache, [t[:, :, start:] for t in _compat.cache_tensors(self.cache)]
            )
            self.mask = self.mask[:, start:]

    def push(self, tokens: torch.Tensor) -> None:
        self.tokens[torch.arange(len(self.owners)), self.count.clamp(max=self.tokens.shape[1] - 1)] = tokens
        self.count += 1


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    return F.pad(tensor, [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0])


@torch.no_grad()
def refill_generate(
    target: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: list[int],
    pad_token_id: int,
    batch_size: int,
    on_answer: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy answers (each ending with its end-of-turn token when it has one) to `prompts`, at most
    `batch_size` at a time; `on_answer(tokens)` is called as each answer ends."""
    device = next(target.parameters()).device
    eos = torch.tensor(eos_ids)
    queue = deque(range(len(prompts)))
    answers: list[list[int] | None] = [None] * len(prompts)
    # refill once this many slots are free: one batched prefill for several prompts, little idle compute
    refill_at = max(1, batch_size // 8)
    with packed_linears(target, use_packed_linears(target)):
        first = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
        slots = _Slots(
            *_prefill(target, [prompts[i] for i in first], pad_token_id, device), first, max_new_tokens
        )
        while True:
            live = torch.tensor([owner != FREE for owner in slots.owners])
            ended = live & (torch.isin(slots.last, eos) | (slots.count >= max_new_tokens))
            ended_slots = ended.nonzero().flatten().tolist()
            for slot in ended_slots:
                answers[slots.owners[slot]] = slots.tokens[slot, : slots.count[slot]].tolist()
                if on_answer is not None:
                    on_answer(int(slots.count[slot]))
            slots.free(ended_slots)
            free = [s for s, owner in enumerate(slots.owners) if owner == FREE]
            if queue and len(free) >= min(refill_at, len(queue)):
                owners = [queue.popleft() for _ in range(min(len(free), len(queue)))]
                new = _prefill(target, [prompts[i] for i in owners], pad_token_id, device)
                slots.fill(free[: len(owners)], *new, owners)
                continue  # a first token may already end its answer
            if not queue and len(free) == len(slots.owners):
                break
            elif not queue and 2 * len(free) >= len(slots.owners):
                slots.keep([s for s, owner in enumerate(slots.owners) if owner != FREE])
            slots.trim()
            _step(target, slots, device)
    return answers  # type: ignore[return-value]


def _prefill(
    target: PreTrainedModel, prompts: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """The new rows' cache, attention mask and first greedy token (one left-padded forward)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    cache = _compat.growing_cache(target.config)
    logits = target(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits
    return cache, mask, logits[:, -1].argmax(-1).cpu()


def _step(target: PreTrainedModel, slots: _Slots, device: torch.device) -> None:
    """One greedy token for every slot."""
    positions = slots.mask.sum(-1, keepdim=True)  # real tokens so far = the new token's position
    slots.mask = F.pad(slots.mask, (0, 1), value=1)
    logits = target(
        input_ids=slots.last[:, None].to(device),
        attention_mask=slots.mask.to(device),
        position_ids=positions.to(device),
        cache=slots.cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits
    slots.push(logits[:, -1].argmax(-1).cpu())
