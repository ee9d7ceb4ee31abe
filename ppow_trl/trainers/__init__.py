"""Trainers: the supervised drafter warm start and PPOW."""

from ppow_trl.trainers.ppow import PPOWConfig, PPOWTrainer
from ppow_trl.trainers.sft import DrafterSFTConfig, DrafterSFTTrainer

__all__ = ["DrafterSFTConfig", "DrafterSFTTrainer", "PPOWConfig", "PPOWTrainer"]
