"""The one door for drafters: `load_drafter` reads every layout (a folder or a Hub id), `export_drafter`
writes one, with its model card."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from ppow_trl.io.card import drafter_model_card
from ppow_trl.io.layouts import AUTO, detect_layout, resolve_layout
from ppow_trl.io.source import DrafterSource, locate_drafter
from ppow_trl.models.common import unwrap_drafter

logger = logging.getLogger(__name__)


def load_drafter(
    path_or_hub_id: str | Path | DrafterSource,
    target: PreTrainedModel | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a drafter from this package's layout or any serving layout (see `ppow_trl.io.layouts`).

    `path_or_hub_id` is a folder, a Hub id or an already located `DrafterSource`. A serving checkpoint has no
    embedding, so `target` is required for it: the frozen token embedding is copied from the target (a
    checkpoint without `embed_tokens` loads), the feature layers default to EAGLE-3's [2, L//2, L-3] when
    the config names none. With a `target`, a drafter built for another target fails naming the fields that
    differ. Missing, unexpected or mis-shaped weights fail naming the keys; a missing folder or a damaged
    `config.json` fails naming the path. Imported serving checkpoints count as warm-started (published
    drafters are trained ones; our own exports record whether they were), so PPOW starts from them without
    its cold-start warning.
    """
    source = locate_drafter(path_or_hub_id, revision, token)
    if source.base is not None:  # LoRA adapters: applied to their base drafter and merged
        from peft import PeftModel

        drafter = PeftModel.from_pretrained(
            load_drafter(source.base, target), source.directory
        ).merge_and_unload()
    else:
        drafter = detect_layout(source.config).load(source, target)
    if dtype is not None:
        drafter.to(dtype)
    return drafter.eval()


def needs_target(source: DrafterSource) -> bool:
    """Whether loading a located drafter needs the target model (serving layouts have no embedding)."""
    if source.base is not None:
        return needs_target(source.base)
    return detect_layout(source.config).serving


def recorded_target(source: DrafterSource, option: str) -> str | None:
    """The target a located drafter records (None: none). A serving layout cannot load without its target,
    so one that records none raises, naming the `option` that supplies it."""
    if source.target_name is None and needs_target(source):
        raise ValueError(f"{source.name} is a serving-layout drafter that records no target: pass {option}")
    return source.target_name


def merged_drafter(model: nn.Module) -> PreTrainedModel:
    """The drafter inside DDP/accelerate wrappers with any LoRA adapters merged into a copy (the given model
    is left untouched): serving engines apply LoRA to targets only, so a drafter is exported merged."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = copy.deepcopy(model).merge_and_unload()
    return unwrap_drafter(model)


def export_drafter(
    drafter: nn.Module,
    out_dir: str | Path,
    format: str = AUTO,
    *,
    target: PreTrainedModel | None = None,
    num_speculative_tokens: int | None = None,
    layer_id_convention: str = "vllm",
    model_card: bool | str = True,
    card_kwargs: dict | None = None,
) -> Path:
    """Write `drafter` to `out_dir` in `format` and return the directory.

    Args:
        drafter: an `Eagle3Drafter` / `MedusaDrafter`, possibly LoRA-wrapped (merged into a copy first) or
            wrapped by DDP/accelerate.
        format: a layout name (`ppow_trl.io.FORMATS`): ``eagle3`` and ``speculators`` for EAGLE-3 drafters,
            ``medusa`` for Medusa drafters, ``ppow`` (this package's layout) for either; ``auto`` (default)
            is the serving layout of the drafter's kind (``eagle3`` / ``medusa``).
        target: the target (optional): its architectures go into the speculators verifier record.
        num_speculative_tokens: K written into the speculators config and the model card (default: the
            layout's default for this drafter, see `DrafterLayout.default_num_speculative_tokens`).
        layer_id_convention: ``vllm`` (default) or ``sglang``, how `eagle_aux_hidden_state_layer_ids` is
            numbered in the ``eagle3`` format (see `ppow_trl.io.convert.serving_layer_ids`).
        model_card: write a README.md model card (`ppow_trl.io.drafter_model_card`); a string is written
            as the card as is.
        card_kwargs: extra arguments of `drafter_model_card` (training details, evaluation results, repo id).
    """
    model = merged_drafter(drafter)
    layout = resolve_layout(format, model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = int(num_speculative_tokens or layout.default_num_speculative_tokens(model))
    layout.save(model, out, target=target, num_speculative_tokens=k, layer_id_convention=layer_id_convention)
    if model_card:
        if isinstance(model_card, str):
            text = model_card
        else:
            kwargs = {"num_speculative_tokens": k, **(card_kwargs or {})}
            kwargs.setdefault("layer_id_convention", layer_id_convention)
            text = drafter_model_card(model, format=layout.name, **kwargs)
        (out / "README.md").write_text(text)
    logger.info("Exported the drafter in the %r format to %s", layout.name, out)
    return out
