"""Training a drafter: the supervised warm start (`sft`), PPOW (`ppow`) with its rewards, anchor
windowing and losses, held-out teacher-forced acceptance, and the recipes' script arguments.

The trainers import TRL, so they are loaded on first use: `from ppow_trl.training import PPOWTrainer`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ppow import PPOWConfig, PPOWTrainer
    from .sft import DrafterSFTConfig, DrafterSFTTrainer

_LAZY = {
    "PPOWConfig": ".ppow",
    "PPOWTrainer": ".ppow",
    "DrafterSFTConfig": ".sft",
    "DrafterSFTTrainer": ".sft",
}

__all__ = ["DrafterSFTConfig", "DrafterSFTTrainer", "PPOWConfig", "PPOWTrainer"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
