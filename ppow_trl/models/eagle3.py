"""EAGLE-3 drafter: one decoder layer over [normed token embedding ++ normed fused target feature].

Row p of the drafter pairs the target's fused feature F_p with token x_{p+1} at RoPE position p and
predicts x_{p+2}. Module names follow the checkpoint layout vLLM and SGLang load (`fc`, `midlayer.*`,
`norm`, `lm_head`, `d2t`, `t2d`), so export is a rename of nothing.

Attention is written out (not SDPA) because drafting needs one pattern plain causal attention cannot
express: a row at draft step j sees the committed *context* keys (masked by the caller) plus the
keys of its *own* earlier draft steps (the "diagonal" of training-time test, docs/eagle3.md).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from ppow_trl.models.common import (
    ChainState,
    DrafterMixin,
    KVPair,
    causal_context_mask,
    positions_from_mask,
    shift_left,
    target_record,
)


class Eagle3DrafterConfig(PretrainedConfig):
    """Configuration of an EAGLE-3 drafter; also records the target it was built for.

    Args:
        hidden_size / intermediate_size / num_attention_heads / num_key_value_heads / head_dim:
            sizes of the single decoder layer (the target's by default, see `from_target`).
        vocab_size: the target's vocabulary size (token ids in and out are target ids).
        draft_vocab_size: size of the reduced output vocabulary (`d2t`/`t2d` map it to target ids);
            None means the full target vocabulary.
        target_hidden_size / target_num_hidden_layers / target_name_or_path: the target's record.
        aux_layer_ids: HF `output_hidden_states` indices whose states are fused by `fc`.
        rope_parameters / max_position_embeddings / rms_norm_eps: copied from the target.
    """

    model_type = "ppow_eagle3"

    def __init__(
        self,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-5,
        rope_parameters: dict | None = None,
        max_position_embeddings: int = 8192,
        vocab_size: int = 49152,
        draft_vocab_size: int | None = None,
        target_hidden_size: int | None = None,
        target_num_hidden_layers: int | None = None,
        aux_layer_ids: list[int] | None = None,
        target_name_or_path: str | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.max_position_embeddings = max_position_embeddings
        self.vocab_size = vocab_size
        self.draft_vocab_size = draft_vocab_size or vocab_size
        self.target_hidden_size = target_hidden_size or hidden_size
        self.target_num_hidden_layers = target_num_hidden_layers
        self.aux_layer_ids = list(aux_layer_ids or [])
        self.target_name_or_path = target_name_or_path
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @classmethod
    def from_target(
        cls,
        target: PreTrainedModel,
        draft_vocab_size: int | None = None,
        aux_layer_ids: list[int] | None = None,
        **overrides,
    ) -> Eagle3DrafterConfig:
        """A config sized like the target's decoder layers (the EAGLE-3 default)."""
        from ppow_trl.target import default_aux_layer_ids, target_name

        tc = target.config
        ids = aux_layer_ids or default_aux_layer_ids(tc.num_hidden_layers)
        fields = dict(
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_attention_heads=tc.num_attention_heads,
            num_key_value_heads=getattr(tc, "num_key_value_heads", tc.num_attention_heads),
            head_dim=getattr(tc, "head_dim", None),
            hidden_act=getattr(tc, "hidden_act", "silu"),
            rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-5),
            rope_parameters=dict(getattr(tc, "rope_parameters", None) or {}) or None,
            max_position_embeddings=tc.max_position_embeddings,
            draft_vocab_size=draft_vocab_size,
            **target_record(tc, target_name(target), ids),
        )
        fields.update(overrides)
        return cls(**fields)

    def as_llama_config(self) -> LlamaConfig:
        """The equivalent one-layer LlamaConfig (for the rotary embedding, MLP and serving export)."""
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=self.rope_parameters,
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size,
            num_hidden_layers=1,
        )


class Eagle3Attention(nn.Module):
    """GQA attention whose q/k/v read the 2H-wide [embedding ++ feature] input."""

    def __init__(self, config: Eagle3DrafterConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        width = 2 * config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        context: KVPair | None,
        context_mask: torch.Tensor,
        diagonal: KVPair | None,
        append_to_context: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend N query rows; returns (output (B,N,H), new keys, new values (B, n_kv, N, d)).

        append_to_context=True (committing rows, TTT step 0): the new keys join the context and
            `context_mask` (B, N, S+N) decides who sees whom (causal + padding).
        append_to_context=False (draft steps >= 1): `context_mask` (B, N, S) selects context keys
            per row, and each row also sees its own chain `diagonal` (B, n_kv, N, J, d) plus itself.
        """
        bsz, n, _ = x.shape
        q = self.q_proj(x).view(bsz, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        group = self.num_heads // self.num_kv_heads
        q = q.view(bsz, self.num_kv_heads, group, n, self.head_dim) * self.scale

        if append_to_context:
            ctx_k = k if context is None else torch.cat([context[0], k], dim=2)
            ctx_v = v if context is None else torch.cat([context[1], v], dim=2)
            diag_k, diag_v = None, None
        else:
            ctx_k, ctx_v = context
            diag_k = k.unsqueeze(3) if diagonal is None else torch.cat([diagonal[0], k.unsqueeze(3)], dim=3)
            diag_v = v.unsqueeze(3) if diagonal is None else torch.cat([diagonal[1], v.unsqueeze(3)], dim=3)

        scores = torch.einsum("bhgnd,bhsd->bhgns", q, ctx_k)
        # A finite floor instead of -inf: a row with every key masked (padding) gets a harmless
        # uniform average instead of NaN.
        scores = scores.masked_fill(~context_mask[:, None, None], torch.finfo(scores.dtype).min)
        if diag_k is not None:
            scores = torch.cat([scores, torch.einsum("bhgnd,bhnjd->bhgnj", q, diag_k)], dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        s = ctx_k.shape[2]
        out = torch.einsum("bhgns,bhsd->bhgnd", probs[..., :s], ctx_v)
        if diag_v is not None:
            out = out + torch.einsum("bhgnj,bhnjd->bhgnd", probs[..., s:], diag_v)
        out = out.reshape(bsz, self.num_heads, n, self.head_dim).transpose(1, 2).reshape(bsz, n, -1)
        return self.o_proj(out), k, v


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, config: Eagle3DrafterConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = LlamaRMSNorm(h, eps=eps)
        self.hidden_norm = LlamaRMSNorm(h, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=eps)
        self.self_attn = Eagle3Attention(config)
        self.mlp = LlamaMLP(config.as_llama_config())

    def forward(self, embeds, features, cos_sin, context, context_mask, diagonal, append_to_context):
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(features)], dim=-1)
        attn, k, v = self.self_attn(x, cos_sin, context, context_mask, diagonal, append_to_context)
        h = features + attn  # the residual is the raw feature, not the embedding
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k, v


class Eagle3Drafter(DrafterMixin, PreTrainedModel):
    """EAGLE-3 draft head. Reads `TargetFeatures.aux_hidden_states`.

    LoRA (peft) target modules: `Eagle3Drafter.LORA_TARGET_MODULES` (the attention and MLP
    projections of the decoder layer and the feature projection `fc`); the LM head and the frozen
    token embedding are left out.
    """

    config_class = Eagle3DrafterConfig
    kind = "eagle3"
    base_model_prefix = "eagle3"
    feature_name = "aux_hidden_states"
    LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc"]

    def __init__(self, config: Eagle3DrafterConfig):
        super().__init__(config)
        num_aux = max(len(config.aux_layer_ids), 1)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # the target's embedding, frozen
        self.fc = nn.Linear(num_aux * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config.as_llama_config())
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(config.vocab_size) < config.draft_vocab_size)
        self.post_init()

    # --- building blocks ----------------------------------------------------------------------------
    def project_features(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """Fuse the target's aux-layer states (B, T, n_aux*H_t) into draft features (B, T, H)."""
        return self.fc(aux_hidden_states.to(self.fc.weight.dtype))

    def step(
        self,
        token_ids: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        context: KVPair | None,
        context_mask: torch.Tensor,
        diagonal: KVPair | None = None,
        append_to_context: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass of the decoder layer over N rows: (pre-norm output (B,N,H), keys, values)."""
        embeds = self.embed_tokens(token_ids)
        cos_sin = self.rotary_emb(features, position_ids)
        return self.midlayer(embeds, features, cos_sin, context, context_mask, diagonal, append_to_context)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary from pre-norm layer outputs."""
        return self.lm_head(self.norm(hidden))

    def output_heads(self) -> list[nn.Linear]:
        return [self.lm_head]

    @torch.no_grad()
    def init_layer_from_target(self, target: PreTrainedModel) -> None:
        """Start the decoder layer from the target's last decoder layer and `fc` as a selection of the
        deepest captured feature, so the untrained drafter already computes "one more target layer on top
        of a deep feature" instead of noise. The embedding half of q/k/v starts at zero (the layer first
        reads the feature, as the target layer does); the residual stays the feature."""
        tc = target.config
        if self.config.target_hidden_size != self.config.hidden_size:
            raise ValueError("init_layer_from_target needs a drafter as wide as its target")
        last = target.base_model.layers[-1]
        h = self.config.hidden_size
        attn = self.midlayer.self_attn
        for mine, theirs in (
            (attn.q_proj, last.self_attn.q_proj),
            (attn.k_proj, last.self_attn.k_proj),
            (attn.v_proj, last.self_attn.v_proj),
        ):
            if mine.weight.shape != (theirs.weight.shape[0], 2 * h):
                raise ValueError(f"drafter attention {tuple(mine.weight.shape)} does not match the target's")
            mine.weight.zero_()
            mine.weight[:, h:].copy_(theirs.weight)
        attn.o_proj.weight.copy_(last.self_attn.o_proj.weight)
        self.midlayer.mlp.load_state_dict(last.mlp.state_dict())
        self.midlayer.hidden_norm.weight.copy_(last.input_layernorm.weight)
        self.midlayer.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight)
        self.fc.weight.zero_()
        self.fc.weight[:, -tc.hidden_size :].copy_(torch.eye(h, dtype=self.fc.weight.dtype))

    # --- drafting (the interface of DrafterMixin) -------------------------------------------------
    def window_logits(
        self, features, input_ids, valid, anchors, window_size, num_windows, temperature, tokens, generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 0 runs over every row once (the committed context); passes 1..K-1 run only over the A*G
        window rows, each seeing the context up to its anchor plus its own earlier draft steps."""
        b, a = anchors.shape
        positions = positions_from_mask(valid)
        out0, k0, v0 = self.step(
            shift_left(input_ids),
            self.project_features(features),
            positions,
            None,
            causal_context_mask(valid),
        )
        rows = anchors.repeat_interleave(num_windows, dim=1)  # (B, N = A*G)
        hidden = out0.gather(1, rows[..., None].expand(-1, -1, out0.shape[-1]))
        row_pos = positions.gather(1, rows)
        context_mask = (torch.arange(input_ids.shape[1], device=rows.device) <= rows[..., None]) & valid[
            :, None, :
        ]
        forced = None if tokens is None else tokens.reshape(b, a * num_windows, window_size)
        logits, ids = self._unroll(
            hidden, row_pos, (k0, v0), context_mask, window_size, temperature, forced, generator
        )
        shape = (b, a, num_windows, window_size)
        return logits.view(*shape, -1), ids.view(shape)

    def _unroll(self, hidden, row_pos, context, context_mask, k_len, temperature, forced, generator):
        """K draft steps for N rows whose step-0 output is `hidden` (B, N, H): step j feeds back the previous
        pre-norm output and token at position row_pos + j, seeing `context` through `context_mask` (B, N, S)
        and its own earlier steps. Returns (logits (B, N, K, V_d), draft ids (B, N, K))."""
        steps = list(
            self._unroll_steps(hidden, row_pos, context, context_mask, k_len, temperature, forced, generator)
        )
        return torch.stack([s[0] for s in steps], 2), torch.stack([s[1] for s in steps], 2)

    def _unroll_steps(self, hidden, row_pos, context, context_mask, k_len, temperature, forced, generator):
        """`_unroll` one step at a time: yields (logits (B, N, V_d), draft ids (B, N)) of step j = 0, 1, ...;
        step j + 1 is computed only when asked for."""
        diagonal, prev = None, None
        for j in range(k_len):
            if j > 0:
                hidden, k, v = self.step(
                    prev, hidden, row_pos + j, context, context_mask, diagonal, append_to_context=False
                )
                k, v = k.unsqueeze(3), v.unsqueeze(3)
                diagonal = (
                    (k, v)
                    if diagonal is None
                    else (torch.cat([diagonal[0], k], 3), torch.cat([diagonal[1], v], 3))
                )
            logits = self.draft_logits(hidden)
            ids = self.forced_or_sampled(
                logits, None if forced is None else forced[..., j], temperature, generator
            )
            prev = forced[..., j] if forced is not None else self.draft_to_target(ids)
            yield logits, ids

    def commit_rows(self, state: ChainState, features, next_tokens, position_ids, valid) -> torch.Tensor:
        cache_valid = valid if state.cache_valid is None else torch.cat([state.cache_valid, valid], dim=1)
        new_mask = causal_context_mask(valid)
        if state.cache_valid is not None:
            old = state.cache_valid[:, None, :].expand(-1, valid.shape[1], -1)
            new_mask = torch.cat([old, new_mask], dim=2)
        out, k, v = self.step(
            next_tokens, self.project_features(features), position_ids, state.cache, new_mask
        )
        state.cache = (
            (k, v)
            if state.cache is None
            else (torch.cat([state.cache[0], k], 2), torch.cat([state.cache[1], v], 2))
        )
        state.cache_valid = cache_valid
        return out

    def chain_logits(
        self, state: ChainState, num_draft_tokens: int, temperature: float, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, ids = self._unroll(
            state.last_hidden[:, None],
            state.last_position[:, None],
            state.cache,
            state.cache_valid[:, None, :],
            num_draft_tokens,
            temperature,
            None,
            generator,
        )
        return logits[:, 0], ids[:, 0]

    def chain_steps(
        self, state: ChainState, max_draft_tokens: int, temperature: float, generator: torch.Generator | None
    ):
        steps = self._unroll_steps(
            state.last_hidden[:, None], state.last_position[:, None], state.cache, state.cache_valid[:, None, :],
            max_draft_tokens, temperature, None, generator,
        )  # fmt: skip
        for logits, ids in steps:
            yield logits[:, 0], ids[:, 0]

    def tree_logits(self, state, nodes, parents, tokens, depth):
        # A node continues its parent's pass: the parent's output and draft-step keys (the row's `diagonal`),
        # plus its own token at position last + depth; the committed rows are the shared context.
        if depth == 0:
            return self.draft_logits(state.last_hidden)[:, None], None
        batch, width = tokens.shape
        if nodes is None:
            hidden, diagonal = state.last_hidden[:, None].expand(-1, width, -1), None
        else:
            hidden, keys, values = nodes
            hidden = hidden.gather(1, parents[..., None].expand(-1, -1, hidden.shape[-1]))
            index = parents[:, None, :, None, None].expand(-1, keys.shape[1], -1, *keys.shape[3:])
            diagonal = (keys.gather(2, index), values.gather(2, index))
        context_mask = state.cache_valid[:, None, :].expand(-1, width, -1)
        positions = (state.last_position + depth)[:, None].expand(-1, width)
        out, k, v = self.step(
            tokens, hidden, positions, state.cache, context_mask, diagonal, append_to_context=False
        )
        k, v = k.unsqueeze(3), v.unsqueeze(3)
        if diagonal is not None:
            k, v = torch.cat([diagonal[0], k], 3), torch.cat([diagonal[1], v], 3)
        return self.draft_logits(out), (out, k, v)
