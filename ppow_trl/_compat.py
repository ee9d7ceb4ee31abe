"""Every use of a private transformers or TRL API, in one place, each behind a version check.

ppow-trl hooks into a few internals that these libraries do not promise to keep:

* transformers' assisted decoding: `GenerationMixin._assisted_decoding`, the per-model
  `_get_candidate_generator` factory it calls, and the `CandidateGenerator` protocol
  (`requires_model_outputs`, `model_kwargs_overrides`, `get_candidates(model_outputs=..., n_last_matches=...)`);
* the EOS/pad tensors transformers prepares on a `GenerationConfig` (`_eos_token_tensor`, `_pad_token_tensor`)
  that a `custom_generate` callable receives;
* the per-layer key/value tensors of transformers' `DynamicCache` (`cache.layers[i].keys` / `.values`), where
  a draft tree's accepted branch is moved into place and the refilling answer loop pads, trims and fills rows,
  and its `DynamicLayer` class, which the answer engines' growing cache (`growing_cache`) subclasses;
* transformers' `Trainer._save`, which both drafter trainers extend to write the drafter card beside every
  checkpoint (`ppow_trl.training.card`), and `Trainer._prepare_inputs`, which the SFT evaluation step calls;
* torch's oneDNN prepacked linear operators (`torch.ops.mkldnn._reorder_linear_weight`,
  `_linear_pointwise`), used by `ppow_trl.packed` with a fallback to the default matmul;
* TRL's `GRPOTrainer`: the rollout and loss hooks `PPOWTrainer` overrides (`_generate_and_score_completions`,
  `_compute_loss`) and the `_metrics` store its `log` reads.

Each accessor checks the installed version against the range this release was tested with
(`SUPPORTED`, the same bounds as pyproject.toml) and that the attribute still exists, and otherwise fails
with an error naming the supported range. These are all the private names the package calls or overrides;
beyond them it only declares TRL's trainer card attributes (`_tag_names`, and `_name` / `_paper`, which the
drafter card reads in place of TRL's `create_model_card`), and decoding prefers transformers' public `custom_generate` argument (`ppow_trl.decoding.generate`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import types
from collections.abc import Callable
from typing import Any

# Supported versions, [lower, upper): keep equal to the bounds in pyproject.toml.
# transformers' lower bound is the oldest release the suite has passed on: 5.19 lacks the `cache` output the
# decoding loop reads, and nothing between has been tested.
SUPPORTED = {"transformers": ("5.24", "5.25"), "trl": ("1.16", "1.17")}


class UnsupportedVersionError(RuntimeError):
    """An installed transformers/TRL version outside the range ppow-trl's private-API hooks support."""


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):  # 5.25.0rc1, 1.17.0.dev0: stop at the pre-release marker
            break
    return tuple(parts)


def supported_range(package: str) -> str:
    low, high = SUPPORTED[package]
    return f"{package}>={low},<{high}"


@functools.cache
def check_version(package: str) -> str:
    """The installed version of `package`; raises `UnsupportedVersionError` outside `SUPPORTED`."""
    installed = importlib.metadata.version(package)
    low, high = SUPPORTED[package]
    if not _release(low) <= _release(installed) < _release(high):
        raise UnsupportedVersionError(
            f"ppow-trl relies on {package} internals tested with {supported_range(package)}; {installed} is "
            f"installed. Install a supported version: pip install '{supported_range(package)}'"
        )
    return installed


def _require(package: str, owner: Any, name: str) -> Any:
    """`getattr(owner, name)` after the version check, with an error naming the range if it is gone."""
    installed = check_version(package)
    try:
        return getattr(owner, name)
    except AttributeError:
        owner_name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise UnsupportedVersionError(
            f"{package} {installed} has no {owner_name}.{name}, which ppow-trl needs; install "
            f"'{supported_range(package)}'"
        ) from None


# ------------------------------------------------------------------------------------------ transformers
def assisted_decoding(
    model: Any, candidate_generator_factory: Callable[..., Any], input_ids: Any, **kwargs: Any
) -> Any:
    """Run transformers' assisted decoding on `model` with candidates from `candidate_generator_factory`
    (called as `factory(model, generation_config, *args, **kwargs)`, like `_get_candidate_generator`).

    The factory is installed on this model instance for the duration of the call only.
    """
    run = _require("transformers", model, "_assisted_decoding")
    _require("transformers", model, "_get_candidate_generator")
    had_override = "_get_candidate_generator" in model.__dict__
    previous = model.__dict__.get("_get_candidate_generator")
    model._get_candidate_generator = types.MethodType(candidate_generator_factory, model)
    try:
        return run(input_ids, **kwargs)
    finally:
        if had_override:
            model._get_candidate_generator = previous
        else:
            del model._get_candidate_generator


def generation_special_tokens(generation_config: Any) -> tuple[Any, Any]:
    """(eos tensor or None, pad tensor or None) that `generate` prepared on `generation_config`."""
    check_version("transformers")
    if not hasattr(generation_config, "_eos_token_tensor"):
        raise UnsupportedVersionError(
            "transformers no longer prepares GenerationConfig._eos_token_tensor for custom_generate callables; "
            f"install '{supported_range('transformers')}'"
        )
    return generation_config._eos_token_tensor, getattr(generation_config, "_pad_token_tensor", None)


def gather_cache_slots(cache: Any, start: int, path: Any) -> None:
    """In every layer of a `DynamicCache`, slot `start + s` of batch row b takes the keys/values of slot
    `start + path[b, s]` ((B, n) int64): the accepted branch of a draft tree moves into the slots after the
    context before the cache is cropped."""
    check_version("transformers")
    for layer in _require("transformers", cache, "layers"):
        for name in ("keys", "values"):
            tensor = _require("transformers", layer, name)
            index = (start + path)[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
            tensor[:, :, start : start + path.shape[1]] = tensor.gather(2, index)


def cache_tensors(cache: Any) -> list[Any]:
    """Every layer's keys and values of a `DynamicCache`, in order (each (batch, heads, length, head_dim))."""
    check_version("transformers")
    return [_require("transformers", layer, name) for layer in cache.layers for name in ("keys", "values")]


def set_cache_tensors(cache: Any, tensors: list[Any]) -> None:
    """Put back tensors in `cache_tensors` order (the refilling answer loop pads, trims and appends rows)."""
    layers = _require("transformers", cache, "layers")
    for i, layer in enumerate(layers):
        layer.keys, layer.values = tensors[2 * i], tensors[2 * i + 1]


def growing_cache(config: Any) -> Any:
    """A `DynamicCache` whose full-attention layers append into preallocated buffers instead of `torch.cat`.

    transformers' `DynamicLayer` concatenates every step, copying the whole cache: at batch 32 with 300 cached
    tokens that copy was 76% of a decoding step of the 135M target on CPU. Here a layer's keys/values are views
    of a buffer with room to grow (doubled when full), so a step writes only its new columns. Crops, trims and
    in-place edits stay views of the buffer; any other tensor put into the layer is copied into a new buffer on
    the next update. Sliding-window layers keep transformers' own class.
    """
    check_version("transformers")
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layer_class = _growing_layer_class()
    cache = DynamicCache(config=config)
    _require("transformers", cache, "layers")
    cache.layers = [layer_class() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        _buffers: tuple[Any, Any] | None = None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.keys.dim() != 4 or self.keys.shape[-2] == 0:
                self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
            added = key_states.shape[-2]
            start = self._buffer_start(added)
            if start is None:
                self._regrow(added)
                start = 0
            stop = start + self.keys.shape[-2]
            for buffer, new in zip(self._buffers, (key_states, value_states)):
                buffer[:, :, stop : stop + added] = new
            self.keys = self._buffers[0][:, :, start : stop + added]
            self.values = self._buffers[1][:, :, start : stop + added]
            return self.keys, self.values

        def _buffer_start(self, added: int) -> int | None:
            """Where the current keys/values start in the buffers, if both are views with room for `added`."""
            if self._buffers is None:
                return None
            starts = []
            for buffer, tensor in zip(self._buffers, (self.keys, self.values)):
                if tensor.shape[:2] != buffer.shape[:2] or tensor.stride() != buffer.stride():
                    return None
                if tensor.dtype != buffer.dtype or tensor.device != buffer.device:
                    return None
                offset, rest = divmod(
                    tensor.data_ptr() - buffer.data_ptr(), buffer.element_size() * buffer.stride(2)
                )
                if rest or offset < 0 or offset + tensor.shape[2] + added > buffer.shape[2]:
                    return None
                starts.append(offset)
            return starts[0] if starts[0] == starts[1] else None

        def _regrow(self, added: int) -> None:
            length = self.keys.shape[-2]
            capacity = 2 * (length + added) + 64
            buffers = []
            for tensor in (self.keys, self.values):
                batch, heads, _, dim = tensor.shape
                buffer = tensor.new_empty((batch, heads, capacity, dim))
                buffer[:, :, :length] = tensor
                buffers.append(buffer)
            self._buffers = tuple(buffers)
            self.keys, self.values = buffers[0][:, :, :length], buffers[1][:, :, :length]

        def batch_select_indices(self, indices: Any) -> None:
            super().batch_select_indices(indices)
            self._buffers = None

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self._buffers = None

        def reset(self) -> None:
            self._buffers = None
            super().reset()

    return GrowingLayer


TRAINER_HOOKS = ("_save", "_prepare_inputs")


def check_trainer_hooks() -> None:
    """The `transformers.Trainer` internals the drafter trainers build on must still exist: without `_save` a
    checkpoint would silently lose its card."""
    from transformers import Trainer

    for name in TRAINER_HOOKS:
        _require("transformers", Trainer, name)


# --------------------------------------------------------------------------------------------------- TRL
GRPO_HOOKS = ("_generate_and_score_completions", "_compute_loss")


def check_grpo_hooks(trainer_class: type) -> None:
    """The GRPOTrainer methods a subclass overrides must still exist (and be called) in the installed TRL."""
    from trl import GRPOTrainer

    for name in GRPO_HOOKS:
        _require("trl", GRPOTrainer, name)
        if getattr(trainer_class, name) is getattr(GRPOTrainer, name):
            raise TypeError(f"{trainer_class.__name__} must override GRPOTrainer.{name}")


def grpo_metrics(trainer: Any) -> dict[str, dict[str, list[float]]]:
    """GRPOTrainer's per-mode metric lists (`{"train"|"eval": {name: [values]}}`), averaged into its logs."""
    return _require("trl", trainer, "_metrics")


# ----------------------------------------------------------------------------------------------- torch
def mkldnn_packed_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear operators (`ppow_trl.packed` uses them and
    falls back to the default matmul where they are missing)."""
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def mkldnn_pack_linear_weight(weight: Any, batch_hint: int) -> Any:
    """A linear weight reordered once into oneDNN's blocked layout (what torch.compile's CPU freezing emits)."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)


def mkldnn_packed_linear(x: Any, packed_weight: Any, bias: Any) -> Any:
    """x @ W.T + b through oneDNN with a weight from `mkldnn_pack_linear_weight`."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")
