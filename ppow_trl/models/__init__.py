"""Drafter models, registered with the transformers Auto classes (no `trust_remote_code` needed
once `ppow_trl` is imported)."""

from transformers import AutoConfig, AutoModel

from ppow_trl.models.common import DrafterTargetMismatchError, check_drafter_matches_target, unwrap_drafter
from ppow_trl.models.eagle3 import Eagle3Drafter, Eagle3DrafterConfig
from ppow_trl.models.medusa import MedusaDrafter, MedusaDrafterConfig

for _config, _model in ((Eagle3DrafterConfig, Eagle3Drafter), (MedusaDrafterConfig, MedusaDrafter)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

DRAFTER_CLASSES = {"eagle3": Eagle3Drafter, "medusa": MedusaDrafter}

__all__ = [
    "DRAFTER_CLASSES",
    "DrafterTargetMismatchError",
    "Eagle3Drafter",
    "Eagle3DrafterConfig",
    "MedusaDrafter",
    "MedusaDrafterConfig",
    "check_drafter_matches_target",
    "unwrap_drafter",
]
