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


def test_the_growing_cache_gives_dynamic_cache_tokens_with_left_padding(tiny_target):
    import torch

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=70, do_sample=False, pad_token_id=0, eos_token_id=None)
    stock = tiny_target.generate(ids, **kwargs)
    cache = _compat.growing_cache(tiny_target.config)
    grown = tiny_target.generate(ids, cache=cache, **kwargs)
    assert torch.equal(stock, grown)
    layer = cache.layers[0]
    # 70 appends wrote into a few buffers (doubled when full), and the keys are a view of the current one
    assert layer.keys.shape[2] == 12 + 70 - 1
    assert layer._buffers[0].shape[2] >= layer.keys.shape[2]
    assert layer.keys.data_ptr() == layer._buffers[0].data_ptr()


def test_the_growing_cache_keeps_crops_and_trims_as_views_and_copies_foreign_tensors():
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=8)
    cache = _compat.growing_cache(config)
    chunks = [torch.randn(2, 1, n, 4) for n in (5, 3, 1)]
    keys, _ = cache.update(chunks[0], chunks[0] + 1, 0)
    keys, _ = cache.update(chunks[1], chunks[1] + 1, 0)
    assert torch.equal(keys, torch.cat(chunks[:2], 2))
    cache.crop(-2)  # drop the last two: the next token overwrites their slots
    keys, values = cache.update(chunks[2], chunks[2] + 1, 0)
    expected = torch.cat([chunks[0], chunks[1][:, :, :1], chunks[2]], 2)
    assert torch.equal(keys, expected) and torch.equal(values, expected + 1)
    buffer = cache.layers[0]._buffers[0]
    layer = cache.layers[0]
    layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]  # a trim: still a view
    keys, _ = cache.update(chunks[2], chunks[2] + 1, 0)
    assert cache.layers[0]._buffers[0] is buffer
    assert torch.equal(keys, torch.cat([expected[:, :, 2:], chunks[2]], 2))
    layer.keys, layer.values = keys[[1, 0]], layer.values[[1, 0]]  # a new tensor: copied into a new buffer
    keys, _ = cache.update(chunks[2][[1, 0]], chunks[2][[1, 0]] + 1, 0)
    assert cache.layers[0]._buffers[0] is not buffer
    assert torch.equal(keys, torch.cat([expected[:, :, 2:], chunks[2], chunks[2]], 2)[[1, 0]])
