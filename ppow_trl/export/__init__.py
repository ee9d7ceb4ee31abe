"""The export stage's names, kept where notebooks and scripts import them: the drafter I/O layer
(`ppow_trl.io`) holds the code.

    from ppow_trl.export import export_drafter, push_to_hub

    export_drafter(drafter, "out/eagle3", format="eagle3")        # or "speculators", "medusa", "ppow", "auto"
"""

from ppow_trl.io import (
    FORMATS,
    LAYER_ID_CONVENTIONS,
    PPOW_PAPER,
    SERVING_FORMATS,
    DrafterFormatError,
    HubAccessError,
    check_hub_access,
    detect_format,
    drafter_model_card,
    export_drafter,
    hf_layer_ids,
    load_drafter,
    merged_drafter,
    push_to_hub,
    run_card_inputs,
    serving_layer_ids,
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
    "load_drafter",
    "merged_drafter",
    "push_to_hub",
    "run_card_inputs",
    "serving_layer_ids",
    "write_drafter_card",
]
