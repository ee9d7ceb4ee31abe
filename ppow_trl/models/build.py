"""A fresh drafter for a target: sized from it, draft vocabulary installed, initialised from its weights."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ppow_trl.data.draft_vocab import DraftVocab
from ppow_trl.models import DRAFTER_CLASSES


def build_drafter(
    kind: str,
    target: PreTrainedModel,
    draft_vocab: DraftVocab | None = None,
    init_lm_head: bool = True,
    init_layer: bool = False,
    **options,
) -> PreTrainedModel:
    """Build a new `kind` drafter ("eagle3" or "medusa") for `target`.

    Args:
        draft_vocab: the reduced output vocabulary (`d2t`/`t2d`); None keeps the target's full vocabulary.
        init_lm_head: start the draft LM head(s) (and EAGLE-3's final norm) from the target's rows of the
            draft vocabulary; the frozen token embedding is always copied.
        init_layer: EAGLE-3 only: start the decoder layer from the target's last layer and `fc` from the
            deepest captured feature (`Eagle3Drafter.init_layer_from_target`).
        options: config fields passed to `<Config>.from_target`, e.g. `aux_layer_ids` (EAGLE-3),
            `num_heads` (Medusa), or size overrides. Other weights follow the drafter's own init (seed
            with `torch.manual_seed` for reproducibility).
    """
    if kind not in DRAFTER_CLASSES:
        raise ValueError(f"unknown drafter kind {kind!r}; choose one of {sorted(DRAFTER_CLASSES)}")
    cls = DRAFTER_CLASSES[kind]
    size = None if draft_vocab is None else draft_vocab.draft_vocab_size
    drafter = cls(cls.config_class.from_target(target, draft_vocab_size=size, **options))
    if draft_vocab is not None:
        drafter.set_draft_vocab(draft_vocab.d2t.to(torch.long), draft_vocab.t2d.to(torch.bool))
    drafter.init_from_target(target, init_lm_head=init_lm_head)
    if init_layer:
        if not hasattr(drafter, "init_layer_from_target"):
            raise ValueError(f"init_layer is defined for EAGLE-3 drafters only, not {kind!r}")
        drafter.init_layer_from_target(target)
    return drafter
