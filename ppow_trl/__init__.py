"""ppow-trl: train speculative-decoding drafters (EAGLE-3, Medusa) with PPOW on TRL.

The package reads as the pipeline, each stage importing only the ones before it:
`target` -> `data` -> `models` -> `io` (drafters in and out: `load_drafter`, export, cards, Hub) ->
`decoding` -> `training` -> `evaluation` (with `metrics` shared).
Importing `ppow_trl` registers the drafters with `AutoConfig`/`AutoModel`; the main names below are
loaded on first use, so `import ppow_trl` does not pull in TRL.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from . import models as _models  # noqa: F401  (registers the drafters with the Auto classes)

try:
    __version__ = version("ppow-trl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

if TYPE_CHECKING:
    from .data import DataConfig, build_training_data
    from .decoding import generate, speculative_generate
    from .evaluation import EvaluationConfig, evaluate
    from .io import load_drafter
    from .models import Eagle3Drafter, Eagle3DrafterConfig, MedusaDrafter, MedusaDrafterConfig
    from .models.build import build_drafter
    from .target import load_target
    from .training import DrafterSFTConfig, DrafterSFTTrainer, PPOWConfig, PPOWTrainer

_LAZY = {
    "load_target": ".target",
    "DataConfig": ".data",
    "build_training_data": ".data",
    "Eagle3Drafter": ".models",
    "Eagle3DrafterConfig": ".models",
    "MedusaDrafter": ".models",
    "MedusaDrafterConfig": ".models",
    "build_drafter": ".models.build",
    "load_drafter": ".io",
    "generate": ".decoding",
    "speculative_generate": ".decoding",
    "DrafterSFTConfig": ".training",
    "DrafterSFTTrainer": ".training",
    "PPOWConfig": ".training",
    "PPOWTrainer": ".training",
    "EvaluationConfig": ".evaluation",
    "evaluate": ".evaluation",
}

__all__ = [
    "DataConfig",
    "DrafterSFTConfig",
    "DrafterSFTTrainer",
    "Eagle3Drafter",
    "Eagle3DrafterConfig",
    "EvaluationConfig",
    "MedusaDrafter",
    "MedusaDrafterConfig",
    "PPOWConfig",
    "PPOWTrainer",
    "__version__",
    "build_drafter",
    "build_training_data",
    "evaluate",
    "generate",
    "load_drafter",
    "load_target",
    "speculative_generate",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
