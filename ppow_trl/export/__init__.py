"""Drafters that leave the project: export to the layouts vLLM / SGLang / speculators load, import of
published drafters (and of our own layout), model cards and Hub push.

    from ppow_trl.export import export_drafter, load_drafter, push_to_hub, drafter_model_card

    export_drafter(drafter, "out/eagle3", format="eagle3")        # or "speculators", "medusa", "ppow"
    drafter = load_drafter("yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", target)   # any readable layout
"""

from .formats import (
    FORMATS,
    LAYER_ID_CONVENTIONS,
    SERVING_FORMATS,
    DrafterFormatError,
    detect_format,
    export_drafter,
    hf_layer_ids,
    is_drafter_checkpoint,
    load_drafter,
    merged_drafter,
    serving_layer_ids,
)
from .hub import (
    PPOW_PAPER,
    HubAccessError,
    check_hub_access,
    drafter_model_card,
    push_to_hub,
    run_card_inputs,
    write_drafter_card,
)

__all__ = [
    "FORMATS",
    "LAYER_ID_CONVENTIONS",
    "PPOW_PAPER",
    "SERVING_FORMATS",
    "DrafterFormatError",
    "HubAccessError",
    "check_hub_access",
    "detect_format",
    "drafter_model_card",
    "export_drafter",
    "hf_layer_ids",
    "is_drafter_checkpoint",
    "load_drafter",
    "merged_drafter",
    "push_to_hub",
    "run_card_inputs",
    "serving_layer_ids",
    "write_drafter_card",
]
