"""Drafter I/O, one layer below training: every drafter that enters or leaves the package goes through here.

- `load_drafter(path_or_hub_id, target)`: the one door, for every layout (`LAYOUTS`: this package's own,
  eagle3, speculators, medusa) and folders of LoRA adapters; `locate_drafter` finds the folder (or Hub
  snapshot) and reads its config first, so a recipe can load the target the drafter records.
- `export_drafter(drafter, out_dir, format="auto")`: write a layout (``auto``: the drafter's serving one),
  with a model card rendered from `templates/drafter_card.md` (`drafter_model_card`).
- `push_to_hub`, `check_hub_access`: the Hub on top.

    from ppow_trl.io import export_drafter, load_drafter

    export_drafter(drafter, "out/eagle3", format="eagle3")        # or "speculators", "medusa", "ppow", "auto"
    drafter = load_drafter("yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", target)   # any readable layout
"""

from .card import PPOW_PAPER, drafter_model_card, record_serving_check, run_card_inputs, write_drafter_card
from .convert import LAYER_ID_CONVENTIONS, hf_layer_ids, serving_layer_ids
from .drafters import export_drafter, load_drafter, merged_drafter, needs_target, recorded_target
from .hub import HubAccessError, check_hub_access, push_dataset, push_to_hub
from .layouts import (
    AUTO,
    FORMATS,
    LAYOUTS,
    SERVING_FORMATS,
    DrafterLayout,
    check_format,
    detect_format,
    detect_layout,
    register_layout,
    resolve_layout,
)
from .source import DrafterFormatError, DrafterNotFoundError, DrafterSource, locate_drafter

__all__ = [
    "AUTO",
    "FORMATS",
    "LAYER_ID_CONVENTIONS",
    "LAYOUTS",
    "PPOW_PAPER",
    "SERVING_FORMATS",
    "DrafterFormatError",
    "DrafterLayout",
    "DrafterNotFoundError",
    "DrafterSource",
    "HubAccessError",
    "check_format",
    "check_hub_access",
    "detect_format",
    "detect_layout",
    "drafter_model_card",
    "export_drafter",
    "hf_layer_ids",
    "load_drafter",
    "locate_drafter",
    "merged_drafter",
    "needs_target",
    "push_dataset",
    "push_to_hub",
    "recorded_target",
    "register_layout",
    "resolve_layout",
    "record_serving_check",
    "run_card_inputs",
    "serving_layer_ids",
    "write_drafter_card",
]
