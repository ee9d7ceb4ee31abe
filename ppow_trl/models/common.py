"""What every drafter shares: the record of the target it was built for, and the check against it."""

from __future__ import annotations

import logging

import torch
from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)


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
    """The drafter inside a peft or accelerate/DDP wrapper (LoRA layers stay in place)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / DeepSpeed
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


class DrafterMixin:
    """Vocabulary maps and target initialisation shared by the EAGLE-3 and Medusa drafters.

    A drafter has buffers `d2t` (V_d,) int64 offsets (target_id = draft_id + d2t[draft_id]) and
    `t2d` (V,) bool, and `output_heads()` returning its draft-vocabulary LM heads.
    """

    def set_draft_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install the draft-vocabulary maps, checking they fit this drafter's sizes."""
        vd, v = self.config.draft_vocab_size, self.config.vocab_size
        if tuple(d2t.shape) != (vd,) or tuple(t2d.shape) != (v,) or int(t2d.sum()) != vd:
            raise ValueError(
                f"draft vocab maps do not fit this drafter: d2t {tuple(d2t.shape)} (need ({vd},)), "
                f"t2d {tuple(t2d.shape)} (need ({v},) with exactly {vd} True entries, has {int(t2d.sum())})"
            )
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.t2d.copy_(t2d)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to target token ids."""
        return draft_ids + self.d2t[draft_ids]

    def target_to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Map target token ids to draft ids; -1 for tokens outside the draft vocabulary."""
        lookup = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=self.d2t.device)
        lookup[torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t] = torch.arange(
            self.config.draft_vocab_size, device=self.d2t.device
        )
        return lookup[target_ids]

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        anchors: torch.Tensor,
        window_size: int,
        **kwargs,
    ):
        """Draft (or score) windows at anchors: `ppow_trl.decoding.drafting.draft_windows` with this drafter.

        Being the forward lets DDP/FSDP/DeepSpeed/peft wrappers see the call, so training through
        `draft_windows(wrapped_model, ...)` synchronises gradients and applies adapters.
        """
        from ppow_trl.decoding.drafting import draft_windows

        return draft_windows(self, features, input_ids, anchors, window_size, **kwargs)

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


def lora_for_drafter(peft_config, drafter: PreTrainedModel):
    """The peft config with the drafter class's `LORA_TARGET_MODULES` when it names no target modules."""
    if peft_config is None or peft_config.target_modules:
        return peft_config
    import dataclasses

    return dataclasses.replace(peft_config, target_modules=type(drafter).LORA_TARGET_MODULES)
