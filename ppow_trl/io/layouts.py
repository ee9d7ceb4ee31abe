"""One class per on-disk drafter layout, in a registry (the shape of the `speculators` converter registry):
each layout says whether a `config.json` is its own (`detect`), reads a drafter from its folder (`load`),
writes one (`save`), and knows the K it drafts by default.

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

A new layout is one subclass decorated with `register_layout`; `detect_layout` and `resolve_layout` (which
also answers ``"auto"``: the serving layout of the drafter's kind) find it, so no caller names layouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import save_file
from transformers import AutoModel, PreTrainedModel

from ppow_trl.io import convert
from ppow_trl.io.source import RECORD_KEY, DrafterFormatError, DrafterSource, read_weights
from ppow_trl.models.common import DrafterMixin

WEIGHTS_NAME = "model.safetensors"
AUTO = "auto"
#: How error messages and cards name each drafter kind.
KIND_LABELS = {"eagle3": "EAGLE-3", "medusa": "Medusa"}


class DrafterLayout:
    """One on-disk layout. Subclasses set `name`, `kinds` (the drafter kinds it holds), `serving` (whether an
    engine loads it), `description` (for the model card), and implement `detect`, `load_weights` and
    `serving_files`."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    serving: ClassVar[bool] = True
    description: ClassVar[str]

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        """Whether `config` (a parsed `config.json`) is a checkpoint in this layout."""
        raise NotImplementedError

    @classmethod
    def holds(cls, drafter: PreTrainedModel) -> bool:
        return drafter.kind in cls.kinds

    @classmethod
    def default_num_speculative_tokens(cls, drafter: DrafterMixin) -> int:
        """K this layout drafts when nobody chose one."""
        return drafter.default_num_speculative_tokens

    @classmethod
    def load(cls, source: DrafterSource, target: PreTrainedModel | None) -> PreTrainedModel:
        """The drafter in `source`; a serving layout needs `target` (its embedding and layer count)."""
        if target is None:
            raise ValueError(
                f"{source.name} is a {cls.name!r} serving checkpoint: pass the target model (its embedding and "
                "layer count complete the drafter)"
            )
        drafter = cls.load_weights(source.config, read_weights(source.directory), target)
        # A published drafter is a trained one; our own exports say whether they were.
        record = source.config.get(RECORD_KEY) or {}
        drafter.config.warm_started = bool(record.get("warm_started", True))
        drafter.config.imported_from = {"path": source.name, "format": cls.name}
        return drafter

    @classmethod
    def load_weights(cls, config: dict[str, Any], tensors: dict, target: PreTrainedModel) -> PreTrainedModel:
        raise NotImplementedError

    @classmethod
    def save(cls, drafter: PreTrainedModel, out: Path, **options: Any) -> None:
        """Write `drafter` (merged, unwrapped) to the folder `out`; `options` are the serving ones
        (`target`, `num_speculative_tokens`, `layer_id_convention`)."""
        config, tensors = cls.serving_files(drafter, **options)
        save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")

    @classmethod
    def serving_files(cls, drafter: PreTrainedModel, **options: Any) -> tuple[dict[str, Any], dict]:
        """(config.json fields, tensors) of `drafter` in this layout."""
        raise NotImplementedError


LAYOUTS: dict[str, type[DrafterLayout]] = {}


def register_layout(layout: type[DrafterLayout]) -> type[DrafterLayout]:
    """Class decorator: add a layout to `LAYOUTS` under its `name`."""
    LAYOUTS[layout.name] = layout
    return layout


@register_layout
class PPOWLayout(DrafterLayout):
    name = "ppow"
    kinds = ("eagle3", "medusa")
    serving = False
    description = "ppow-trl's own layout (`AutoModel.from_pretrained` after `import ppow_trl`)"

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        from ppow_trl.models import Eagle3DrafterConfig, MedusaDrafterConfig

        return config.get("model_type") in (Eagle3DrafterConfig.model_type, MedusaDrafterConfig.model_type)

    @classmethod
    def load(cls, source: DrafterSource, target: PreTrainedModel | None) -> PreTrainedModel:
        drafter = AutoModel.from_pretrained(source.directory)
        if target is not None:
            drafter.check_target(target)
        return drafter

    @classmethod
    def save(cls, drafter: PreTrainedModel, out: Path, **options: Any) -> None:
        drafter.save_pretrained(out)


@register_layout
class Eagle3Layout(DrafterLayout):
    name = "eagle3"
    kinds = ("eagle3",)
    description = "the original EAGLE-3 layout (`LlamaForCausalLMEagle3`) that vLLM and SGLang load"

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        return bool(set(config.get("architectures") or []) & set(convert.EAGLE3_ARCHITECTURES))

    @classmethod
    def load_weights(cls, config: dict[str, Any], tensors: dict, target: PreTrainedModel) -> PreTrainedModel:
        cfg = convert.eagle3_config_from_serving(config, config, target)
        return convert.eagle3_from_serving(cls.name, cfg, tensors, target)

    @classmethod
    def serving_files(
        cls, drafter: PreTrainedModel, *, layer_id_convention: str = "vllm", **_: Any
    ) -> tuple[dict[str, Any], dict]:
        return convert.eagle3_config(drafter, layer_id_convention), convert.eagle3_serving_tensors(drafter)


@register_layout
class SpeculatorsLayout(DrafterLayout):
    name = "speculators"
    kinds = ("eagle3",)
    description = "vLLM's speculators layout (`Eagle3Speculator`)"

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        return config.get("speculators_model_type") == "eagle3" or "Eagle3Speculator" in (
            config.get("architectures") or []
        )

    @classmethod
    def load_weights(cls, config: dict[str, Any], tensors: dict, target: PreTrainedModel) -> PreTrainedModel:
        convert.check_speculators_norms(config)
        cfg = convert.eagle3_config_from_serving(config, config["transformer_layer_config"], target)
        return convert.eagle3_from_serving(cls.name, cfg, tensors, target)

    @classmethod
    def serving_files(
        cls,
        drafter: PreTrainedModel,
        *,
        num_speculative_tokens: int | None = None,
        target: PreTrainedModel | None = None,
        **_: Any,
    ) -> tuple[dict[str, Any], dict]:
        k = num_speculative_tokens or cls.default_num_speculative_tokens(drafter)
        config = convert.speculators_config(drafter, k, *convert.verifier(drafter, target))
        return config, convert.eagle3_serving_tensors(drafter, layer_prefix="layers.0.")


@register_layout
class MedusaLayout(DrafterLayout):
    name = "medusa"
    kinds = ("medusa",)
    description = "vLLM's Medusa layout (`MedusaModel`)"

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "medusa" or "MedusaModel" in (config.get("architectures") or [])

    @classmethod
    def load_weights(cls, config: dict[str, Any], tensors: dict, target: PreTrainedModel) -> PreTrainedModel:
        return convert.medusa_from_serving(config, tensors, target)

    @classmethod
    def serving_files(cls, drafter: PreTrainedModel, **_: Any) -> tuple[dict[str, Any], dict]:
        return convert.medusa_config(drafter), convert.medusa_serving_tensors(drafter)


FORMATS = tuple(LAYOUTS)
SERVING_FORMATS = tuple(name for name, layout in LAYOUTS.items() if layout.serving)
# The order layouts are tried in: the speculators config also names LlamaForCausalLMEagle3-like fields.
_DETECT_ORDER = ("ppow", "speculators", "medusa", "eagle3")


def detect_layout(config: dict[str, Any]) -> type[DrafterLayout]:
    """The layout a parsed `config.json` describes."""
    for name in _DETECT_ORDER:
        if LAYOUTS[name].detect(config):
            return LAYOUTS[name]
    raise DrafterFormatError(
        f"config.json describes no drafter format this package reads (model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')}); readable: {', '.join(FORMATS)}"
    )


def detect_format(config: dict[str, Any]) -> str:
    """The name of the layout a parsed `config.json` describes."""
    return detect_layout(config).name


def check_format(format: str) -> str:
    """`format` if it names a layout (or ``auto``); else an error listing them."""
    if format != AUTO and format not in LAYOUTS:
        raise DrafterFormatError(
            f"unknown drafter format {format!r}; the formats are: {', '.join(FORMATS)} (or {AUTO!r})"
        )
    return format


def resolve_layout(format: str, drafter: PreTrainedModel) -> type[DrafterLayout]:
    """The layout to write `drafter` in: `format`, or for ``auto`` the first serving layout of its kind;
    a layout that cannot hold this kind of drafter is an error naming the ones that can."""
    check_format(format)
    if format == AUTO:
        return next(layout for layout in LAYOUTS.values() if layout.serving and layout.holds(drafter))
    layout = LAYOUTS[format]
    if not layout.holds(drafter):
        fitting = [repr(name) for name, other in LAYOUTS.items() if other.holds(drafter)]
        labels = " or ".join(KIND_LABELS[kind] for kind in layout.kinds)
        raise DrafterFormatError(
            f"format {format!r} holds {labels} drafters, not a {type(drafter).__name__}: use "
            f"{', '.join(fitting[:-1])} or {fitting[-1]}"
        )
    return layout
