"""Medusa drafter: K residual heads on the target's last (final-normed) hidden state.

Head j at target position r predicts x_{r+2+j} (the target's own head predicts x_{r+1}); all K
tokens of a window come from one hidden state. Weight names follow vLLM's Medusa layout
(`blocks.{h}.layers.{l}`, `lm_heads.{h}`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from ppow_trl.models.common import ChainState, DrafterMixin, sample_token_ids, target_record


class MedusaDrafterConfig(PretrainedConfig):
    """Configuration of a Medusa drafter; also records the target it was built for.

    Args:
        hidden_size: the target's hidden size (heads read its last hidden state).
        num_heads: K, the number of heads = the longest window this drafter drafts.
        num_layers: residual blocks per head.
        vocab_size / draft_vocab_size: target vocabulary and the heads' (reduced) output vocabulary.
        share_target_lm_head: True = every head uses one frozen copy of the target's LM head rows
            ("the target's LM head"); False = each head trains its own LM head.
        target_hidden_size / target_num_hidden_layers / aux_layer_ids / target_name_or_path: the
            target's record (aux_layer_ids is unused by Medusa but kept for a uniform check).
    """

    model_type = "ppow_medusa"

    def __init__(
        self,
        hidden_size: int = 576,
        num_heads: int = 4,
        num_layers: int = 1,
        vocab_size: int = 49152,
        draft_vocab_size: int | None = None,
        share_target_lm_head: bool = False,
        target_hidden_size: int | None = None,
        target_num_hidden_layers: int | None = None,
        aux_layer_ids: list[int] | None = None,
        target_name_or_path: str | None = None,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.vocab_size = vocab_size
        self.draft_vocab_size = draft_vocab_size or vocab_size
        self.share_target_lm_head = share_target_lm_head
        self.target_hidden_size = target_hidden_size or hidden_size
        self.target_num_hidden_layers = target_num_hidden_layers
        self.aux_layer_ids = list(aux_layer_ids or [])
        self.target_name_or_path = target_name_or_path
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @classmethod
    def from_target(
        cls, target: PreTrainedModel, num_heads: int = 4, draft_vocab_size: int | None = None, **overrides
    ) -> MedusaDrafterConfig:
        from ppow_trl.target import target_name

        tc = target.config
        fields = dict(
            hidden_size=tc.hidden_size,
            num_heads=num_heads,
            draft_vocab_size=draft_vocab_size,
            **target_record(tc, target_name(target), []),
        )
        fields.update(overrides)
        return cls(**fields)


class MedusaBlock(nn.Module):
    """x + SiLU(W x + b), repeated; W starts at zero so a fresh head is the identity."""

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + nn.functional.silu(layer(x))
        return x


class MedusaDrafter(DrafterMixin, PreTrainedModel):
    """Medusa heads. Reads `TargetFeatures.last_hidden_state`.

    LoRA (peft) target modules: `MedusaDrafter.LORA_TARGET_MODULES`, a regex over the residual
    blocks' linear layers (`blocks.{h}.layers.{l}`); LM heads are left out.
    """

    config_class = MedusaDrafterConfig
    kind = "medusa"
    base_model_prefix = "medusa"
    feature_name = "last_hidden_state"
    LORA_TARGET_MODULES = r".*blocks\.\d+\.layers\.\d+"

    def __init__(self, config: MedusaDrafterConfig):
        super().__init__(config)
        h, vd = config.hidden_size, config.draft_vocab_size
        self.blocks = nn.ModuleList(MedusaBlock(h, config.num_layers) for _ in range(config.num_heads))
        num_lm_heads = 1 if config.share_target_lm_head else config.num_heads
        self.lm_heads = nn.ModuleList(nn.Linear(h, vd, bias=False) for _ in range(num_lm_heads))
        if config.share_target_lm_head:
            self.lm_heads.requires_grad_(False)
        self.register_buffer("d2t", torch.zeros(vd, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(config.vocab_size) < vd)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Linear):
            return
        if any(module is head for head in self.lm_heads):
            init.normal_(module.weight, std=0.02)
        else:  # a residual-block layer: zero, so a fresh head passes the hidden state through
            init.zeros_(module.weight)
            init.zeros_(module.bias)

    def output_heads(self) -> list[nn.Linear]:
        return list(self.lm_heads)

    def head_logits(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """(..., H) last hidden states -> (..., K, V_d) draft-vocabulary logits of the first K heads."""
        k = num_heads or self.config.num_heads
        if k > self.config.num_heads:
            raise ValueError(
                f"window of {k} tokens asked of a Medusa drafter with {self.config.num_heads} heads"
            )
        hidden = hidden.to(self.lm_heads[0].weight.dtype)
        heads = [self.lm_heads[0 if self.config.share_target_lm_head else j] for j in range(k)]
        return torch.stack([head(block(hidden)) for head, block in zip(heads, self.blocks)], dim=-2)

    @property
    def max_draft_tokens(self) -> int:
        return self.config.num_heads

    # --- drafting (the interface of DrafterMixin): every head reads the anchor row's hidden state --
    def window_logits(
        self, features, input_ids, valid, anchors, window_size, num_windows, temperature, tokens, generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = features.gather(1, anchors[..., None].expand(-1, -1, features.shape[-1]))  # (B, A, H)
        logits = self.head_logits(hidden, window_size)  # (B, A, K, V_d)
        logits = logits[:, :, None].expand(-1, -1, num_windows, -1, -1)
        return logits, self.forced_or_sampled(logits, tokens, temperature, generator)

    def commit_rows(self, state: ChainState, features, next_tokens, position_ids, valid) -> torch.Tensor:
        return features  # no cache: the heads read the last committed row's target hidden state only

    def chain_logits(
        self, state: ChainState, num_draft_tokens: int, temperature: float, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head_logits(state.last_hidden, num_draft_tokens)  # (B, K, V_d)
        return logits, sample_token_ids(logits, temperature, generator)

    def tree_logits(self, state, nodes, parents, tokens, depth):
        # Head j predicts position j + 1 from the last committed row alone: every node of a layer gets the
        # same children.
        if depth >= self.config.num_heads:
            return None, None
        logits = self.head_logits(state.last_hidden, depth + 1)[:, depth]
        return logits[:, None].expand(-1, 1 if tokens is None else tokens.shape[1], -1), None
