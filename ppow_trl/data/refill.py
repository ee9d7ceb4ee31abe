"""Greedy answers with finished rows refilled: a batch in which every row stays busy.

A static left-padded batch runs until its longest answer, so most rows idle at its end. Here a row whose
answer has ended leaves the batch at once and the next prompts join it: their prefill runs on its own and
their keys/values are appended to the batch's cache, left-padded to a common length (each key carries its
RoPE position, so where a row sits in the padded cache does not matter); columns that are padding in every
row are dropped. The tokens are those of one-prompt-at-a-time greedy decoding, up to floating-point ties.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from .. import _compat
from ..packed import packed_linears, use_packed_linears


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)


class _Batch:
    """The rows being answered: their cache, attention mask, the tokens each has generated (`tokens[r, :count[r]]`)
    and which prompt each row answers."""

    def __init__(self, max_new_tokens: int) -> None:
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.tokens = torch.zeros(0, max_new_tokens, dtype=torch.long)
        self.count = torch.zeros(0, dtype=torch.long)
        self.owners: list[int] = []

    @property
    def last(self) -> torch.Tensor:
        return self.tokens[torch.arange(len(self.owners)), self.count - 1]

    def __len__(self) -> int:
        return len(self.owners)

    def append(self, cache: DynamicCache, mask: torch.Tensor, first: torch.Tensor, owners: list[int]) -> None:
        if self.cache is None or not self.owners:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            joined = [
                torch.cat([_left_pad(old, width, 2), _left_pad(new, width, 2)])
                for old, new in zip(_compat.cache_tensors(self.cache), _compat.cache_tensors(cache))
            ]
            _compat.set_cache_tensors(self.cache, joined)
            self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.tokens = torch.cat([self.tokens, F.pad(first[:, None], (0, self.tokens.shape[1] - 1))])
        self.count = torch.cat([self.count, torch.ones_like(first)])
        self.owners += owners

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices), then drop the columns that are padding in every kept row."""
        start = int(self.mask[rows].any(0).int().argmax()) if len(rows) else 0
        tensors = [t[rows.to(t.device), :, start:] for t in _compat.cache_tensors(self.cache)]
        _compat.set_cache_tensors(self.cache, tensors)
        self.mask, self.tokens, self.count = self.mask[rows, start:], self.tokens[rows], self.count[rows]
        self.owners = [self.owners[i] for i in rows.tolist()]

    def push(self, tokens: torch.Tensor) -> None:
        self.tokens[torch.arange(len(self.owners)), self.count] = tokens
        self.count += 1


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
    queue, batch = deque(range(len(prompts))), _Batch(max_new_tokens)
    answers: list[list[int] | None] = [None] * len(prompts)
    with packed_linears(target, use_packed_linears(target)):
        while queue or len(batch):
            if queue and len(batch) < batch_size:
                owners = [queue.popleft() for _ in range(min(batch_size - len(batch), len(queue)))]
                batch.append(*_prefill(target, [prompts[i] for i in owners], pad_token_id, device), owners)
            else:
                _step(target, batch, device)
            ended = torch.isin(batch.last, eos) | (batch.count >= max_new_tokens)
            for row in ended.nonzero().flatten().tolist():
                answers[batch.owners[row]] = batch.tokens[row, : batch.count[row]].tolist()
                if on_answer is not None:
                    on_answer(int(batch.count[row]))
            if bool(ended.any()):
                batch.keep((~ended).nonzero().flatten())
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
    cache = DynamicCache()
    logits = target(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits
    return cache, mask, logits[:, -1].argmax(-1).cpu()


def _step(target: PreTrainedModel, batch: _Batch, device: torch.device) -> None:
    """One greedy token for every row of the batch."""
    positions = batch.mask.sum(-1, keepdim=True)  # real tokens so far = the new token's position
    batch.mask = F.pad(batch.mask, (0, 1), value=1)
    logits = target(
        input_ids=batch.last[:, None].to(device),
        attention_mask=batch.mask.to(device),
        position_ids=positions.to(device),
        cache=batch.cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits
    batch.push(logits[:, -1].argmax(-1).cpu())
