"""Drafter models: save/load through the Auto classes, target checks, LoRA, the draft-vocabulary scatter."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from ppow_trl.data.draft_vocab import build_draft_vocab
from ppow_trl.models import (
    DrafterTargetMismatchError,
    Eagle3Drafter,
    Eagle3DrafterConfig,
    MedusaDrafter,
    MedusaDrafterConfig,
)
from ppow_trl.models.build import build_drafter
from ppow_trl.models.common import causal_context_mask, positions_from_mask, scatter_draft_probs, shift_left
from ppow_trl.target import capture_features
from tests.conftest import build_tiny_target


def build(kind, target, **kwargs):
    if kind == "eagle3":
        return Eagle3Drafter(Eagle3DrafterConfig.from_target(target, draft_vocab_size=100, **kwargs))
    return MedusaDrafter(MedusaDrafterConfig.from_target(target, num_heads=3, draft_vocab_size=100, **kwargs))


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_save_and_load_through_auto_classes(kind, tiny_target, tmp_path):
    drafter = build(kind, tiny_target)
    drafter.init_from_target(tiny_target)
    drafter.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.target_num_hidden_layers == tiny_target.config.num_hidden_layers
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is type(drafter)
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert {"d2t", "t2d"} <= keys


def test_eagle3_weight_names_follow_the_serving_layout(tiny_target):
    names = set(build("eagle3", tiny_target).state_dict())
    expected = {
        "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "embed_tokens.weight",
        "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.o_proj.weight", "midlayer.mlp.down_proj.weight",
        "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight",
    }  # fmt: skip
    assert expected <= names
    drafter = build("eagle3", tiny_target)
    h = tiny_target.config.hidden_size
    assert drafter.midlayer.self_attn.q_proj.weight.shape[1] == 2 * h
    assert drafter.fc.weight.shape == (h, 3 * h)


def test_fresh_medusa_head_passes_the_hidden_state_through(tiny_target):
    drafter = build("medusa", tiny_target)
    hidden = torch.randn(2, 5, tiny_target.config.hidden_size)
    assert all(torch.equal(block(hidden), hidden) for block in drafter.blocks)


def test_init_from_target_copies_embedding_and_head_rows(tiny_target):
    drafter = build("eagle3", tiny_target)
    drafter.init_from_target(tiny_target)
    assert torch.equal(drafter.embed_tokens.weight, tiny_target.get_input_embeddings().weight)
    assert not drafter.embed_tokens.weight.requires_grad
    rows = drafter.target_ids_of_draft_vocab()
    assert torch.equal(drafter.lm_head.weight, tiny_target.lm_head.weight[rows])


def test_layer_initialised_from_the_target_reproduces_its_last_layer(tiny_target):
    """With the feature entering the target's last layer as the deepest aux feature, a drafter whose layer,
    fc, norm and head start from the target computes exactly the target's next-token logits."""
    last = tiny_target.config.num_hidden_layers - 1
    vocab = build_draft_vocab(torch.arange(tiny_target.config.vocab_size).flip(0), 100)
    drafter = build_drafter("eagle3", tiny_target, vocab, init_layer=True, aux_layer_ids=[1, 2, last])
    random = build_drafter("eagle3", tiny_target, vocab, aux_layer_ids=[1, 2, last])
    ids = torch.randint(3, tiny_target.config.vocab_size, (2, 9))
    features = capture_features(tiny_target, ids, aux_layer_ids=[1, 2, last])
    valid = torch.ones_like(ids, dtype=torch.bool)

    def logits_of(d):
        feats = d.project_features(features.aux_hidden_states)
        out, _, _ = d.step(
            shift_left(ids), feats, positions_from_mask(valid), None, causal_context_mask(valid)
        )
        return d.draft_logits(out)

    expected = features.logits[..., drafter.target_ids_of_draft_vocab()]
    torch.testing.assert_close(logits_of(drafter), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits_of(random), expected, atol=1e-2)
    with pytest.raises(ValueError, match="EAGLE-3"):
        build_drafter("medusa", tiny_target, vocab, init_layer=True, num_heads=2)


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_drafter_for_another_target_is_refused_naming_the_field(kind, tiny_target):
    other = build_tiny_target(vocab_size=tiny_target.config.vocab_size, num_layers=6)
    drafter = build(kind, other)
    with pytest.raises(DrafterTargetMismatchError, match="target_num_hidden_layers: drafter=6 target=4"):
        drafter.check_target(tiny_target)
    with pytest.raises(DrafterTargetMismatchError, match="target_num_hidden_layers"):
        drafter.init_from_target(tiny_target)


def test_draft_vocab_maps_are_validated_and_round_trip(tiny_target):
    drafter = build("eagle3", tiny_target)
    with pytest.raises(ValueError, match="exactly 100 True"):
        drafter.set_draft_vocab(
            torch.zeros(100, dtype=torch.long), torch.ones(tiny_target.config.vocab_size, dtype=torch.bool)
        )
    used = torch.arange(100) * 3
    t2d = torch.zeros(tiny_target.config.vocab_size, dtype=torch.bool)
    t2d[used] = True
    drafter.set_draft_vocab(used - torch.arange(100), t2d)
    assert torch.equal(drafter.draft_to_target(torch.arange(100)), used)
    assert torch.equal(drafter.target_to_draft(used), torch.arange(100))
    assert int(drafter.target_to_draft(torch.tensor([1]))) == -1


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_lora_wraps_and_trains_only_adapters(kind, tiny_target):
    drafter = build(kind, tiny_target)
    peft_model = get_peft_model(
        drafter, LoraConfig(r=4, lora_alpha=8, target_modules=type(drafter).LORA_TARGET_MODULES)
    )
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(3, 300, (1, 8))
    feats = getattr(capture_features(tiny_target, ids), drafter.feature_name)
    from ppow_trl.decoding.drafting import draft_windows

    windows = draft_windows(
        peft_model, feats, ids, torch.tensor([[0, 2]]), 3, tokens=torch.randint(0, 99, (1, 2, 1, 3))
    )
    loss = -windows.logprobs[torch.isfinite(windows.logprobs)].sum()
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_scatter_draft_probs_round_trip_with_offsets():
    target_ids = torch.tensor([2, 5, 7, 9])
    d2t = target_ids - torch.arange(4)  # offsets: target_id = draft_id + d2t[draft_id]
    probs = torch.softmax(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), -1)
    full = scatter_draft_probs(probs, d2t, 10)
    assert full.shape == (2, 3, 10)
    assert torch.equal(full[..., target_ids], probs)
    others = torch.ones(10, dtype=torch.bool)
    others[target_ids] = False
    assert torch.all(full[..., others] == 0)
    assert torch.allclose(full.sum(-1), torch.ones(2, 3))
    assert scatter_draft_probs(probs, None, 4) is probs


def test_scatter_draft_probs_errors():
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="d2t must have shape"):
        scatter_draft_probs(probs, torch.zeros(3, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="outside"):
        scatter_draft_probs(probs, torch.tensor([0, 0, 0, 7]), 10)
    with pytest.raises(ValueError, match="same target id"):
        scatter_draft_probs(probs, torch.tensor([1, 0, 0, 0]), 10)
    with pytest.raises(ValueError, match="identity"):
        scatter_draft_probs(probs, None, 10)
