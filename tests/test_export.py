"""Export to the serving layouts (eagle3, speculators, medusa) and import back: names, config fields,
layer-id convention, d2t offsets, round trips that draft identically, hand-written EAGLE-3 checkpoints,
LoRA merging and the errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from ppow_trl.data.draft_vocab import build_draft_vocab
from ppow_trl.decoding import generate
from ppow_trl.decoding.drafting import draft_windows
from ppow_trl.export import (
    FORMATS,
    DrafterFormatError,
    detect_format,
    export_drafter,
    hf_layer_ids,
    load_drafter,
    serving_layer_ids,
)
from ppow_trl.models import (
    DrafterTargetMismatchError,
    Eagle3Drafter,
    Eagle3DrafterConfig,
    MedusaDrafter,
    MedusaDrafterConfig,
)
from ppow_trl.models.common import lora_for_drafter
from ppow_trl.target import capture_features
from tests.conftest import build_tiny_target

K = 4
VD = 120
EAGLE3_LAYER_KEYS = {
    "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
}  # fmt: skip
EAGLE3_KEYS = EAGLE3_LAYER_KEYS | {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}


def every_other_vocab(vocab_size: int, draft_vocab_size: int = VD) -> tuple[torch.Tensor, torch.Tensor]:
    used = torch.arange(draft_vocab_size) * 2 % vocab_size
    used = torch.sort(torch.unique(used)).values[:draft_vocab_size]
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[used] = True
    return used - torch.arange(draft_vocab_size), t2d


def make_drafter(kind: str, target, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "eagle3":
        drafter = Eagle3Drafter(Eagle3DrafterConfig.from_target(target, draft_vocab_size=VD, **overrides))
    else:
        drafter = MedusaDrafter(
            MedusaDrafterConfig.from_target(target, num_heads=K, draft_vocab_size=VD, **overrides)
        )
        for block in drafter.blocks:  # non-zero residual blocks and biases: every weight matters
            torch.nn.init.normal_(block.layers[0].weight, std=0.2)
            torch.nn.init.normal_(block.layers[0].bias, std=0.2)
    drafter.set_draft_vocab(*every_other_vocab(target.config.vocab_size))
    drafter.init_from_target(target)
    with torch.no_grad():
        for head in drafter.output_heads():
            head.weight.mul_(4.0)
        if kind == "eagle3":  # norms away from 1 so a swapped norm would show
            for norm in (drafter.norm, drafter.midlayer.hidden_norm, drafter.midlayer.input_layernorm):
                norm.weight.uniform_(0.5, 1.5)
    return drafter.eval()


def draft(drafter, target, seed: int = 1):
    """Greedy windows and their fp32 log-probs at every row of two sequences."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, target.config.vocab_size, (2, 12), generator=g)
    feats = capture_features(target, ids, aux_layer_ids=drafter.config.aux_layer_ids or None)
    features = getattr(feats, drafter.feature_name)
    anchors = torch.arange(ids.shape[1]).expand(2, -1)
    with torch.no_grad():
        out = draft_windows(drafter, features, ids, anchors, K, return_logits=True)
    return out.tokens, out.logprobs, out.logits


def fmt_kind(fmt: str) -> str:
    return "medusa" if fmt == "medusa" else "eagle3"


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fmt", FORMATS + ("ppow-medusa",))
def test_round_trip_drafts_identical_tokens_and_logprobs(fmt, tiny_target, tmp_path):
    kind = "medusa" if "medusa" in fmt else "eagle3"
    fmt = fmt.removesuffix("-medusa")
    drafter = make_drafter(kind, tiny_target)
    out = export_drafter(drafter, tmp_path / fmt, fmt, num_speculative_tokens=K)
    config = json.loads((out / "config.json").read_text())
    assert detect_format(config) == fmt
    assert (out / "README.md").is_file()
    loaded = load_drafter(out, tiny_target)
    assert type(loaded) is type(drafter)
    tokens, logprobs, logits = draft(drafter, tiny_target)
    tokens2, logprobs2, logits2 = draft(loaded, tiny_target)
    assert torch.equal(tokens, tokens2)
    assert torch.equal(logprobs, logprobs2)
    assert torch.equal(logits, logits2)
    assert torch.equal(loaded.d2t, drafter.d2t) and torch.equal(loaded.t2d, drafter.t2d)
    assert loaded.config.aux_layer_ids == drafter.config.aux_layer_ids


@pytest.mark.parametrize("fmt", ["eagle3", "speculators", "medusa"])
def test_round_trip_speculative_decoding_is_identical(fmt, tiny_target, tmp_path):
    drafter = make_drafter(fmt_kind(fmt), tiny_target)
    loaded = load_drafter(export_drafter(drafter, tmp_path, fmt), tiny_target)
    prompt = torch.tensor([[5, 9, 17, 33, 8, 41]])
    a = generate(tiny_target, drafter, prompt, num_draft_tokens=K, max_new_tokens=20, method="loop")
    b = generate(tiny_target, loaded, prompt, num_draft_tokens=K, max_new_tokens=20, method="loop")
    assert torch.equal(a.sequences, b.sequences)
    assert a.tau == b.tau


# ------------------------------------------------------------------------------------------ layouts
def test_eagle3_layout_keys_and_config(tiny_target, tmp_path):
    drafter = make_drafter("eagle3", tiny_target)
    out = export_drafter(drafter, tmp_path, "eagle3")
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == EAGLE3_KEYS  # no embed_tokens: engines share the target's
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert tensors["t2d"].shape == (tiny_target.config.vocab_size,)
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["LlamaForCausalLMEagle3"]
    assert c["model_type"] == "llama" and c["num_hidden_layers"] == 1
    assert c["vocab_size"] == tiny_target.config.vocab_size and c["draft_vocab_size"] == VD
    assert c["tie_word_embeddings"] is False
    assert "target_hidden_size" not in c  # equal to hidden_size here: only written where it differs
    ids = drafter.config.aux_layer_ids
    assert c["eagle_aux_hidden_state_layer_ids"] == ids
    assert c["eagle_config"] == {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": ids}
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
    ):
        assert c[field] == getattr(drafter.config, field), field
    assert c["rope_theta"] == tiny_target.config.rope_parameters["rope_theta"]
    assert tensors["fc.weight"].shape == (64, 3 * 64)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * 64


def test_speculators_layout_keys_and_config(tiny_target, tmp_path):
    drafter = make_drafter("eagle3", tiny_target)
    out = export_drafter(drafter, tmp_path, "speculators", num_speculative_tokens=7, target=tiny_target)
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == {k.replace("midlayer.", "layers.0.") for k in EAGLE3_KEYS}
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Eagle3Speculator"] and c["speculators_model_type"] == "eagle3"
    assert c["norm_before_residual"] is False  # written explicitly: vLLM assumes true when absent
    assert c["draft_vocab_size"] == VD and c["target_hidden_size"] == 64
    assert c["eagle_aux_hidden_state_layer_ids"] == drafter.config.aux_layer_ids
    layer = c["transformer_layer_config"]
    assert layer["vocab_size"] == tiny_target.config.vocab_size and layer["num_hidden_layers"] == 1
    spec = c["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 7
    assert spec["verifier"]["architectures"] == ["LlamaForCausalLM"]
    assert "name_or_path" in spec["verifier"]


@pytest.mark.parametrize("shared", [False, True])
def test_medusa_layout_keys_and_config(shared, tiny_target, tmp_path):
    drafter = make_drafter("medusa", tiny_target, share_target_lm_head=shared)
    out = export_drafter(drafter, tmp_path, "medusa")
    tensors = load_file(out / "model.safetensors")
    blocks = {f"blocks.{h}.layers.0.{p}" for h in range(K) for p in ("weight", "bias")}
    heads = {"lm_head.weight"} if shared else {f"lm_heads.{h}.weight" for h in range(K)}
    assert set(tensors) == blocks | heads | {"token_map"}
    assert torch.equal(tensors["token_map"], drafter.target_ids_of_draft_vocab())
    c = json.loads((out / "config.json").read_text())
    assert c["model_type"] == "medusa" and c["architectures"] == ["MedusaModel"]
    assert c["num_heads"] == K and c["num_hidden_layers"] == 1 and c["hidden_size"] == 64
    assert c["vocab_size"] == tiny_target.config.vocab_size and c["truncated_vocab_size"] == VD
    assert c["medusa_fc_bias"] is True and c["original_lm_head"] is shared
    loaded = load_drafter(out, tiny_target)
    assert torch.equal(draft(loaded, tiny_target)[1], draft(drafter, tiny_target)[1])


def test_d2t_from_a_known_vocabulary_round_trips_as_offsets(tiny_target, tmp_path):
    v = tiny_target.config.vocab_size
    counts = torch.zeros(v, dtype=torch.long)
    frequent = torch.tensor([7, 3, 250, 100, 42, 5, 300, 11])
    counts[frequent] = torch.arange(100, 100 - len(frequent), -1)
    vocab = build_draft_vocab(counts, draft_vocab_size=len(frequent), vocab_size=v)
    drafter = Eagle3Drafter(Eagle3DrafterConfig.from_target(tiny_target, draft_vocab_size=len(frequent)))
    drafter.set_draft_vocab(vocab.d2t.long(), vocab.t2d.bool())
    drafter.init_from_target(tiny_target)
    out = export_drafter(drafter, tmp_path, "eagle3")
    tensors = load_file(out / "model.safetensors")
    used = torch.sort(frequent).values
    assert torch.equal(tensors["d2t"], used - torch.arange(len(used)))  # offsets, not absolute ids
    assert torch.equal(torch.arange(len(used)) + tensors["d2t"], used)
    assert torch.equal(tensors["t2d"].nonzero().squeeze(1), used)
    loaded = load_drafter(out, tiny_target)
    assert torch.equal(loaded.draft_to_target(torch.arange(len(used))), used)


# ------------------------------------------------------------------------------------------ layer ids
def test_layer_id_convention_vllm_ids_are_inputs_of_decoder_layers(tiny_target, tmp_path):
    """vLLM's layer id i is the residual stream entering decoder layer i = HF output_hidden_states[i], which is
    what capture_features fuses: the exported ids, captured as layer inputs, give our features exactly. SGLang's
    ids name layer outputs: id i - 1 captured as an output gives the same tensors."""
    target = build_tiny_target(tiny_target.config.vocab_size, num_layers=8)
    drafter = make_drafter("eagle3", target)
    assert drafter.config.aux_layer_ids == [2, 4, 5]  # EAGLE-3's [2, L//2, L-3] for L = 8
    vllm_ids = json.loads((export_drafter(drafter, tmp_path / "v", "eagle3") / "config.json").read_text())[
        "eagle_aux_hidden_state_layer_ids"
    ]
    sglang_ids = json.loads(
        (
            export_drafter(drafter, tmp_path / "s", "eagle3", layer_id_convention="sglang") / "config.json"
        ).read_text()
    )["eagle_aux_hidden_state_layer_ids"]
    assert vllm_ids == [2, 4, 5] and sglang_ids == [1, 3, 4]
    inputs, outputs = {}, {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.__setitem__(i, (a[0] if a else kw["hidden_states"])), with_kwargs=True)
        for i, layer in enumerate(target.model.layers)
    ] + [
        layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, layer in enumerate(target.model.layers)
    ]  # fmt: skip
    ids = torch.randint(3, target.config.vocab_size, (1, 9))
    try:
        ours = capture_features(target, ids, aux_layer_ids=drafter.config.aux_layer_ids).aux_hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(ours, torch.cat([inputs[i] for i in vllm_ids], -1))
    assert torch.equal(ours, torch.cat([outputs[i] for i in sglang_ids], -1))
    assert serving_layer_ids([2, 4, 5], "sglang") == [1, 3, 4] and hf_layer_ids([1, 3, 4], "sglang") == [
        2,
        4,
        5,
    ]
    # Both exports import back to the same HF indices.
    assert load_drafter(tmp_path / "s", target).config.aux_layer_ids == [2, 4, 5]


# ------------------------------------------------------------------------------------------ published layouts
def write_specforge_checkpoint(directory, target, seed=3, bin_file=True, drop=(), add=None):
    """An EAGLE-3 checkpoint laid out by hand as SpecForge / the EAGLE release write it: a flat LlamaConfig
    without any field of this package, `pytorch_model.bin` (or safetensors), no embed_tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    h, v, layers = 64, target.config.vocab_size, target.config.num_hidden_layers
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": h, "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 512,
        "model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
        "pad_token_id": 0, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.51.0",
        "use_cache": True, "vocab_size": v, "draft_vocab_size": VD,
    }  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "fc.weight": (h, 3 * h), "norm.weight": (h,), "lm_head.weight": (VD, h),
        "midlayer.input_layernorm.weight": (h,), "midlayer.hidden_norm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,), "midlayer.self_attn.q_proj.weight": (64, 2 * h),
        "midlayer.self_attn.k_proj.weight": (32, 2 * h), "midlayer.self_attn.v_proj.weight": (32, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, 64), "midlayer.mlp.gate_proj.weight": (128, h),
        "midlayer.mlp.up_proj.weight": (128, h), "midlayer.mlp.down_proj.weight": (h, 128),
    }  # fmt: skip
    tensors = {name: torch.randn(shape, generator=g) * 0.2 for name, shape in shapes.items()}
    for name in ("norm.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight"):
        tensors[name] = 1 + tensors[name]
    tensors["d2t"], tensors["t2d"] = every_other_vocab(v)
    for name in drop:
        tensors.pop(name)
    tensors.update(add or {})
    (directory / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(tensors, directory / "pytorch_model.bin")
    else:
        save_file(tensors, directory / "model.safetensors")
    assert layers == 4
    return tensors


def test_hand_written_specforge_checkpoint_imports_and_drafts(tiny_target, tmp_path):
    tensors = write_specforge_checkpoint(tmp_path / "ckpt", tiny_target)
    drafter = load_drafter(tmp_path / "ckpt", tiny_target)
    assert isinstance(drafter, Eagle3Drafter) and drafter.config.warm_started
    assert drafter.config.aux_layer_ids == [
        1,
        2,
        2,
    ]  # no ids in the config: EAGLE-3's default for this target
    assert torch.equal(drafter.embed_tokens.weight, tiny_target.get_input_embeddings().weight)
    # The same weights put by hand into a drafter built here draft the same windows.
    reference = Eagle3Drafter(Eagle3DrafterConfig.from_target(tiny_target, draft_vocab_size=VD))
    reference.init_from_target(tiny_target)
    reference.load_state_dict({k: v for k, v in tensors.items()}, strict=False)
    tokens, logprobs, _ = draft(drafter, tiny_target)
    ref_tokens, ref_logprobs, _ = draft(reference.eval(), tiny_target)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logprobs, ref_logprobs)
    assert bool(drafter.t2d[tokens].all())  # drafted tokens are target ids inside the draft vocabulary
    out = generate(
        tiny_target, drafter, torch.tensor([[5, 9, 17, 33]]), num_draft_tokens=K, max_new_tokens=12
    )
    plain = tiny_target.generate(
        torch.tensor([[5, 9, 17, 33]]), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out.sequences, plain)  # greedy speculative decoding stays lossless


def test_checkpoint_without_t2d_but_with_an_embedding_imports(tiny_target, tmp_path):
    emb = {"embed_tokens.weight": tiny_target.get_input_embeddings().weight.clone()}
    write_specforge_checkpoint(tmp_path, tiny_target, bin_file=False, drop=("t2d",), add=emb)
    drafter = load_drafter(tmp_path, tiny_target)
    assert torch.equal(drafter.t2d, every_other_vocab(tiny_target.config.vocab_size)[1])


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_wrapped_drafter_is_exported_merged(tiny_target, tmp_path):
    drafter = make_drafter("eagle3", tiny_target)
    peft_model = get_peft_model(drafter, lora_for_drafter(LoraConfig(r=4, lora_alpha=8), drafter))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # non-zero adapters change the outputs
    wrapped_logprobs = draft(peft_model, tiny_target)[1]
    out = export_drafter(peft_model, tmp_path, "eagle3")
    assert hasattr(peft_model, "peft_config")  # the wrapped model itself is left as it was
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    loaded = load_drafter(out, tiny_target)
    assert torch.allclose(draft(loaded, tiny_target)[1], wrapped_logprobs, atol=1e-5)
    merged = peft_model.merge_and_unload()
    assert torch.equal(draft(loaded, tiny_target)[1], draft(merged, tiny_target)[1])


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_format_lists_the_formats(tiny_target, tmp_path):
    drafter = make_drafter("eagle3", tiny_target)
    with pytest.raises(DrafterFormatError, match="ppow, eagle3, speculators, medusa"):
        export_drafter(drafter, tmp_path, "gguf")
    with pytest.raises(DrafterFormatError, match="holds Medusa drafters"):
        export_drafter(drafter, tmp_path, "medusa")
    with pytest.raises(DrafterFormatError, match="holds EAGLE-3 drafters"):
        export_drafter(make_drafter("medusa", tiny_target), tmp_path, "eagle3")


@pytest.mark.parametrize("fmt", ["eagle3", "speculators", "medusa"])
def test_checkpoint_for_another_target_names_the_fields(fmt, tiny_target, tmp_path):
    other = build_tiny_target(vocab_size=tiny_target.config.vocab_size + 16, num_layers=6)
    drafter = make_drafter(fmt_kind(fmt), other)
    out = export_drafter(drafter, tmp_path, fmt)
    with pytest.raises(DrafterTargetMismatchError) as err:
        load_drafter(out, tiny_target)
    assert "vocab_size: drafter=336 target=320" in str(err.value)
    assert "target_num_hidden_layers: drafter=6 target=4" in str(err.value)


def test_missing_and_extra_weights_are_named(tiny_target, tmp_path):
    write_specforge_checkpoint(tmp_path / "a", tiny_target, drop=("midlayer.mlp.up_proj.weight",))
    with pytest.raises(DrafterFormatError, match=r"missing weights \['midlayer.mlp.up_proj.weight'\]"):
        load_drafter(tmp_path / "a", tiny_target)
    write_specforge_checkpoint(tmp_path / "b", tiny_target, add={"midlayer.extra.weight": torch.zeros(3)})
    with pytest.raises(DrafterFormatError, match=r"unexpected weights \['midlayer.extra.weight'\]"):
        load_drafter(tmp_path / "b", tiny_target)
    write_specforge_checkpoint(tmp_path / "c", tiny_target, add={"fc.weight": torch.zeros(64, 128)})
    with pytest.raises(
        DrafterFormatError, match=r"fc.weight: checkpoint \(64, 128\) vs expected \(64, 192\)"
    ):
        load_drafter(tmp_path / "c", tiny_target)
    write_specforge_checkpoint(tmp_path / "d", tiny_target, drop=("d2t", "t2d"))
    with pytest.raises(DrafterFormatError, match="no d2t"):
        load_drafter(tmp_path / "d", tiny_target)


def test_speculators_checkpoint_with_norm_before_residual_is_refused(tiny_target, tmp_path):
    out = export_drafter(make_drafter("eagle3", tiny_target), tmp_path, "speculators")
    config = json.loads((out / "config.json").read_text())
    config["norm_before_residual"] = True
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterFormatError, match="norm_before_residual"):
        load_drafter(out, tiny_target)


def test_serving_checkpoint_needs_the_target_and_unknown_configs_are_named(tiny_target, tmp_path):
    out = export_drafter(make_drafter("eagle3", tiny_target), tmp_path / "e", "eagle3")
    with pytest.raises(ValueError, match="pass the target model"):
        load_drafter(out)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]})
    )
    with pytest.raises(DrafterFormatError, match="readable: ppow, eagle3, speculators, medusa"):
        load_drafter(tmp_path / "x", tiny_target)


def test_export_recipe_casts_to_bfloat16_for_a_small_shipped_file(tiny_target, tmp_path, monkeypatch):
    import importlib.util
    import sys

    from safetensors import safe_open

    drafter = make_drafter("eagle3", tiny_target)
    drafter.save_pretrained(tmp_path / "trained")
    script = Path(__file__).resolve().parents[1] / "recipes" / "export_drafter.py"
    spec = importlib.util.spec_from_file_location("export_drafter_recipe", script)
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)  # its dataclass resolves its module while loading
    spec.loader.exec_module(recipe)
    out = recipe.main(
        ["--drafter", str(tmp_path / "trained"), "--format", "eagle3", "--dtype", "bfloat16",
         "--output_dir", str(tmp_path / "shipped")]
    )  # fmt: skip
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert "embed_tokens.weight" not in dtypes
    assert {d for name, d in dtypes.items() if name not in ("d2t", "t2d")} == {"BF16"}
    loaded = load_drafter(out, tiny_target)  # read back in fp32, the weights bf16-rounded
    expected = drafter.fc.weight.to(torch.bfloat16).float()
    assert loaded.fc.weight.dtype == torch.float32 and torch.equal(loaded.fc.weight, expected)
