"""Private transformers/TRL APIs are reached through ppow_trl._compat, behind version checks that name the
supported range."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ppow_trl import _compat


def test_supported_ranges_equal_the_pyproject_pins():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    pins = dict(re.findall(r'^\s*"(([a-z-]+)>=[^"]*)"', text, re.M))
    pins = {name: spec for spec, name in pins.items()}
    for package in _compat.SUPPORTED:
        assert pins[package] == _compat.supported_range(package)


def test_installed_versions_are_supported():
    for package in _compat.SUPPORTED:
        assert _compat.check_version(package)


@pytest.mark.parametrize("installed", ["5.25.0", "5.25.0rc1", "5.19.0", "4.57.1", "6.0.0"])
def test_an_unsupported_version_names_the_range(monkeypatch, installed):
    monkeypatch.setattr(_compat.importlib.metadata, "version", lambda package: installed)
    _compat.check_version.cache_clear()
    try:
        with pytest.raises(_compat.UnsupportedVersionError, match=r"transformers>=5\.24,<5\.25"):
            _compat.check_version("transformers")
    finally:
        _compat.check_version.cache_clear()


def test_a_missing_private_attribute_names_the_range():
    class Model:
        pass

    with pytest.raises(_compat.UnsupportedVersionError, match="Model._assisted_decoding"):
        _compat.assisted_decoding(Model(), lambda *a, **k: None, None)
    with pytest.raises(_compat.UnsupportedVersionError, match="_eos_token_tensor"):
        _compat.generation_special_tokens(object())


def test_grpo_subclasses_must_override_the_rollout_and_loss_hooks():
    from trl import GRPOTrainer

    from ppow_trl.training import PPOWTrainer

    _compat.check_grpo_hooks(PPOWTrainer)
    _compat.check_grpo_hooks(type("Recording", (PPOWTrainer,), {}))
    with pytest.raises(TypeError, match="_generate_and_score_completions"):
        _compat.check_grpo_hooks(type("Plain", (GRPOTrainer,), {}))


def test_the_trainer_internals_the_drafter_trainers_extend_are_checked(monkeypatch):
    from transformers import Trainer

    _compat.check_trainer_hooks()
    monkeypatch.delattr(Trainer, "_save")
    with pytest.raises(_compat.UnsupportedVersionError, match=r"Trainer\._save"):
        _compat.check_trainer_hooks()
