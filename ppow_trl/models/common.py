"""What every drafter shares: the record of the target it was built for and the check against it, the
draft-vocabulary maps, and the drafting interface each drafter class implements.

Conventions (docs/eagle3.md): drafter row p pairs the target feature at position p with token x_{p+1} and
predicts x_{p+2}. A window drafted at *anchor row* r continues the prefix x_0..x_{r+1}: its K tokens stand
for positions r+2 .. r+K+1.

A drafter class implements four methods and nothing outside the class dispatches on its type:
`window_logits` (K-token windows at many anchors at once, training-time-test attention), `commit_rows` and
`chain_logits` (chain drafting for decoding: commit verified rows to a cache, then draft one window), and
`tree_logits` (one layer of a dynamic draft tree).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from ppow_trl.data.draft_vocab import draft_to_target, target_to_draft

logger = logging.getLogger(__name__)

KVPair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DraftWindows(ModelOutput):
    """Windows drafted at anchors; shapes (B, A, G, K[, V_d]).

    tokens: drafted (or scored, when forced) token ids in the *target* vocabulary.
    draft_ids: the same tokens as draft-vocabulary ids (-1 where a forced token is outside it).
    logprobs: log q of each token under the drafter at the drafting temperature (temperature 1 for
        greedy drafting); -inf for forced tokens outside the draft vocabulary.
    logits: raw draft-vocabulary logits per position, when requested.
    """

    tokens: torch.Tensor | None = None
    draft_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class ChainState:
    """What chain drafting keeps between calls: the drafter's cache of committed rows (None for drafters
    without one) with a (B, S) validity mask, and the output and position of each sequence's last row."""

    cache: KVPair | None = None
    cache_valid: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None  # (B, H) output of the last committed row
    last_position: torch.Tensor | None = None  # (B,)


def shift_left(input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Row tokens: row p carries x_{p+1}; the last row gets `pad_id`."""
    return torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], pad_id)], dim=1)


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """RoPE positions that skip (left or right) padding: 0 at each sequence's first real token."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def causal_context_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: row t sees rows s <= t that are real tokens (and always itself)."""
    t = valid.shape[1]
    idx = torch.arange(t, device=valid.device)
    causal = idx[None, :] <= idx[:, None]
    return (causal[None] & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=valid.device)


def sample_token_ids(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Ids from logits (..., V): argmax at temperature 0, else a sample from softmax(logits / temperature).

    Logits that are already warped (divided by the temperature, top-k, ...) are sampled with temperature 1.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log q(id) at the drafting temperature (1 for greedy), without materialising a log-softmax."""
    scaled = logits.float()
    if temperature > 0 and temperature != 1.0:
        scaled = scaled / temperature
    return scaled.gather(-1, ids.clamp(min=0)[..., None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


class DrafterTargetMismatchError(ValueError):
    """A drafter was attached to a target other than the one it was built for."""


def target_record(target_config: PretrainedConfig, name: str, aux_layer_ids: list[int]) -> dict:
    """The fields of a target that a drafter's weights depend on, stored in the drafter config."""
    return {
        "target_name_or_path": name,
        "vocab_size": target_config.vocab_size,
        "target_hidden_size": target_config.hidden_size,
        "target_num_hidden_layers": target_config.num_hidden_layers,
        "aux_layer_ids": list(aux_layer_ids),
    }


def check_drafter_matches_target(drafter_config: PretrainedConfig, target: PreTrainedModel) -> None:
    """Raise `DrafterTargetMismatchError` naming every structural field where drafter and target differ.

    Vocabulary size, hidden size and layer count must match (the drafter reads the target's
    hidden states and emits target token ids). A different target *name* only logs a warning:
    a local copy of the same model has another path.
    """
    from ppow_trl.target import target_name

    tc = target.config
    expected = {
        "vocab_size": tc.vocab_size,
        "target_hidden_size": tc.hidden_size,
        "target_num_hidden_layers": tc.num_hidden_layers,
    }
    diffs = [
        f"{field}: drafter={getattr(drafter_config, field)} target={value}"
        for field, value in expected.items()
        if getattr(drafter_config, field) != value
    ]
    if any(i > tc.num_hidden_layers for i in drafter_config.aux_layer_ids):
        diffs.append(
            f"aux_layer_ids: drafter={drafter_config.aux_layer_ids} exceed the target's {tc.num_hidden_layers} layers"
        )
    if diffs:
        raise DrafterTargetMismatchError(
            f"This drafter was built for target {drafter_config.target_name_or_path!r} and does not fit the "
            f"given target {target_name(target)!r}: "
            + "; ".join(diffs)
            + ". Train a drafter for this target "
            "or load the target it was trained for."
        )
    name = target_name(target)
    if drafter_config.target_name_or_path not in (name, None, ""):
        logger.warning(
            "Drafter was trained for %r and is attached to %r (same shapes; make sure it is the same model).",
            drafter_config.target_name_or_path,
            name,
        )


def unwrap_drafter(model: torch.nn.Module) -> PreTrainedModel:
    """The drafter inside a peft or accelerate/DDP wrapper (LoRA layers stay in place); a model that is no
    drafter raises, naming the loader that reads every drafter layout."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / DeepSpeed
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        elif isinstance(model, DrafterMixin):
            return model
        else:
            # `AutoModel` reads the eagle3 serving layout (model_type llama) as a random LlamaModel.
            raise TypeError(
                f"{type(model).__name__} is not a ppow_trl drafter (Eagle3Drafter or MedusaDrafter): load drafters "
                "with `ppow_trl.load_drafter(path_or_hub_id, target)`, which reads every layout (ours, eagle3, "
                "speculators, medusa)"
            )


class DrafterMixin:
    """Vocabulary maps, target initialisation and batched window drafting shared by all drafters.

    A drafter has buffers `d2t` (V_d,) int64 offsets (target_id = draft_id + d2t[draft_id]) and
    `t2d` (V,) bool, `output_heads()` returning its draft-vocabulary LM heads, and implements
    `window_logits`, `commit_rows`, `chain_logits` and `tree_logits` (see the module docstring).
    """

    #: The longest window this drafter can draft (None: any length).
    max_draft_tokens: int | None = None
    #: The drafter family ("eagle3" / "medusa"): names its serving layout, tags and card text.
    kind: str = ""
    #: K when nobody chose one: the window a serving engine drafts by default.
    DEFAULT_NUM_SPECULATIVE_TOKENS = 5

    @property
    def default_num_speculative_tokens(self) -> int:
        """K for export and usage snippets: the recorded `num_speculative_tokens`, else every head a drafter
        with a fixed number has, else `DEFAULT_NUM_SPECULATIVE_TOKENS`."""
        recorded = getattr(self.config, "num_speculative_tokens", None)
        return int(recorded or self.max_draft_tokens or self.DEFAULT_NUM_SPECULATIVE_TOKENS)

    def set_draft_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install the draft-vocabulary maps, checking they fit this drafter's sizes and each other (draft ids
        in ascending target-id order, the EAGLE-3 convention `build_draft_vocab` follows)."""
        vd, v = self.config.draft_vocab_size, self.config.vocab_size
        if tuple(d2t.shape) != (vd,) or tuple(t2d.shape) != (v,) or int(t2d.sum()) != vd:
            raise ValueError(
                f"draft vocab maps do not fit this drafter: d2t {tuple(d2t.shape)} (need ({vd},)), "
                f"t2d {tuple(t2d.shape)} (need ({v},) with exactly {vd} True entries, has {int(t2d.sum())})"
            )
        if not torch.equal(draft_to_target(torch.arange(vd), d2t.cpu()), t2d.cpu().nonzero().squeeze(1)):
            raise ValueError("d2t and t2d disagree: d2t must map draft ids, in order, to the ids t2d marks")
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.t2d.copy_(t2d)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to target token ids."""
        return draft_to_target(draft_ids, self.d2t)

    def target_to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Map target token ids to draft ids; -1 for tokens outside the draft vocabulary."""
        return target_to_draft(target_ids, self.t2d)

    def forced_or_sampled(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor | None,
        temperature: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Draft ids: the forced target `tokens` mapped to the draft vocabulary, else drawn from `logits`."""
        if tokens is not None:
            return self.target_to_draft(tokens)
        with torch.no_grad():
            return sample_token_ids(logits, temperature, generator)

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        anchors: torch.Tensor,
        window_size: int,
        num_windows: int = 1,
        temperature: float = 0.0,
        attention_mask: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        return_logits: bool = False,
        generator: torch.Generator | None = None,
    ) -> DraftWindows:
        """Draft (or score) `num_windows` (G) windows of `window_size` (K) tokens at every anchor row.

        Arguments as in `ppow_trl.decoding.draft_windows`, which calls this forward: being the forward lets
        DDP/FSDP/DeepSpeed/peft wrappers see the call, so training through a wrapped drafter synchronises
        gradients and applies adapters.
        """
        if window_size < 1:
            raise ValueError(f"window_size (K) must be >= 1, got {window_size}")
        if num_windows < 1:
            raise ValueError(f"num_windows (G) must be >= 1, got {num_windows}")
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        logits, draft_ids = self.window_logits(
            features, input_ids, valid, anchors, window_size, num_windows, temperature, tokens, generator
        )
        logprobs = token_logprobs(logits, draft_ids, temperature).masked_fill(draft_ids < 0, float("-inf"))
        out_tokens = tokens if tokens is not None else self.draft_to_target(draft_ids)
        return DraftWindows(out_tokens, draft_ids, logprobs, logits if return_logits else None)

    # --- the drafting interface each drafter class implements -------------------------------------
    def window_logits(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        valid: torch.Tensor,
        anchors: torch.Tensor,
        window_size: int,
        num_windows: int,
        temperature: float,
        tokens: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, A, G, K, V_d), draft ids (B, A, G, K)) of G windows at every anchor (B, A); with
        `tokens` (B, A, G, K) the windows are those tokens (teacher forcing) instead of samples."""
        raise NotImplementedError

    def commit_rows(
        self,
        state: ChainState,
        features: torch.Tensor,
        next_tokens: torch.Tensor,
        position_ids: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Append rows (features (B, n, F), next tokens, positions, valid flags) to `state`'s cache and return
        their outputs (B, n, H), from which the last row of each sequence is drafted."""
        raise NotImplementedError

    def chain_logits(
        self, state: ChainState, num_draft_tokens: int, temperature: float, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K, V_d), draft ids (B, K)) of one window after the last committed row of each sequence."""
        raise NotImplementedError

    def chain_steps(
        self, state: ChainState, max_draft_tokens: int, temperature: float, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`chain_logits` one step at a time: yields (logits (B, V_d), draft ids (B,)) of steps 1, 2, ...
        up to `max_draft_tokens`, so a caller can stop drafting early. This default drafts the whole window
        at once; drafters whose later steps cost a pass each override it to compute a step only when asked."""
        logits, ids = self.chain_logits(state, max_draft_tokens, temperature, generator)
        for j in range(ids.shape[1]):
            yield logits[:, j], ids[:, j]

    def tree_logits(
        self,
        state: ChainState,
        nodes: Any,
        parents: torch.Tensor | None,
        tokens: torch.Tensor | None,
        depth: int,
    ) -> tuple[torch.Tensor | None, Any]:
        """One layer of a draft tree (`ppow_trl.decoding.tree`): the drafter's logits (B, N, V_d) for the
        children of N nodes holding target ids `tokens` (B, N) at `depth` (1 = the first draft token), and the
        nodes' state for expanding their own children. `nodes` is the state of the layer above and `parents`
        (B, N) the index of each node's parent in it (None at depth 1). Depth 0 is the root, the last committed
        row: logits (B, 1, V_d), `tokens` None. The logits are None where the drafter cannot draft that deep."""
        raise NotImplementedError(f"{type(self).__name__} does not draft trees")

    def check_target(self, target: PreTrainedModel) -> None:
        check_drafter_matches_target(self.config, target)

    @torch.no_grad()
    def init_from_target(self, target: PreTrainedModel, init_lm_head: bool = True) -> None:
        """Copy the target's token embedding (kept frozen) and, optionally, the target LM-head rows of
        the draft vocabulary (and its final norm) as the starting point of the draft heads."""
        self.check_target(target)
        if hasattr(self, "embed_tokens"):
            self.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
        if not init_lm_head:
            return
        rows = self.target_ids_of_draft_vocab()
        head_weight = target.get_output_embeddings().weight[rows]
        for head in self.output_heads():
            head.weight.copy_(head_weight)
        if hasattr(self, "norm") and hasattr(target.base_model, "norm"):
            self.norm.weight.copy_(target.base_model.norm.weight)

    def target_ids_of_draft_vocab(self) -> torch.Tensor:
        """(V_d,) the target id of every draft id."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t


def scatter_draft_probs(
    draft_vocab_probs: torch.Tensor,
    d2t: torch.Tensor | None,
    vocab_size: int,
    validate: bool = True,
) -> torch.Tensor:
    """Map (..., V_d) probabilities over a reduced draft vocabulary to (..., vocab_size) over the target's.

    d2t (V_d,) int64 holds offsets: target_id = draft_id + d2t[draft_id] (the EAGLE-3 convention); it must
    be injective. Target tokens outside the draft vocabulary get probability 0. d2t None means identity
    (V_d == vocab_size) and returns the input unchanged. ``validate`` checks the map (a host sync on GPUs).
    """
    if draft_vocab_probs.dim() < 1:
        raise ValueError("draft_vocab_probs must have a vocabulary dimension")
    draft_vocab = draft_vocab_probs.shape[-1]
    if d2t is None:
        if draft_vocab != vocab_size:
            raise ValueError(
                f"d2t is None (identity) but draft_vocab_probs has {draft_vocab} entries, not vocab_size={vocab_size}"
            )
        return draft_vocab_probs
    if d2t.dim() != 1 or d2t.shape[0] != draft_vocab:
        raise ValueError(
            f"d2t must have shape (V_d,) = ({draft_vocab},) to match draft_vocab_probs "
            f"{tuple(draft_vocab_probs.shape)}, got {tuple(d2t.shape)}"
        )
    if draft_vocab > vocab_size:
        raise ValueError(f"draft vocabulary ({draft_vocab}) is larger than vocab_size ({vocab_size})")
    target_ids = torch.arange(draft_vocab, device=draft_vocab_probs.device) + d2t.to(
        draft_vocab_probs.device, torch.long
    )
    if validate:
        if int(target_ids.min()) < 0 or int(target_ids.max()) >= vocab_size:
            raise ValueError(
                f"d2t maps draft ids outside [0, {vocab_size}): target ids span "
                f"[{int(target_ids.min())}, {int(target_ids.max())}]"
            )
        if torch.unique(target_ids).numel() != draft_vocab:
            raise ValueError("d2t maps two draft ids to the same target id")
    out = draft_vocab_probs.new_zeros(*draft_vocab_probs.shape[:-1], vocab_size)
    out[..., target_ids] = draft_vocab_probs
    return out


def lora_for_drafter(peft_config, drafter: PreTrainedModel):
    """The peft config with the drafter class's `LORA_TARGET_MODULES` when it names no target modules."""
    if peft_config is None or peft_config.target_modules:
        return peft_config
    import dataclasses

    return dataclasses.replace(peft_config, target_modules=type(drafter).LORA_TARGET_MODULES)
