"""Export a trained drafter to the layout a serving engine loads (a stage of its own, after training).

    python recipes/export_drafter.py --drafter outputs/smollm2-135m/ppow-eagle3 --format eagle3 \
        --output_dir outputs/smollm2-135m/export/eagle3           # vLLM and SGLang
    python recipes/export_drafter.py --drafter <dir> --format speculators --output_dir <out>   # vLLM speculators
    python recipes/export_drafter.py --drafter <medusa dir> --format medusa --output_dir <out> # vLLM Medusa
    python recipes/export_drafter.py --drafter <dir> --format eagle3 --output_dir <out> \
        --push_to_hub --hub_model_id me/smollm2-135m-eagle3-ppow

`--drafter` is a directory or Hub id in any layout `ppow_trl.load_drafter` reads (this package's own,
eagle3, speculators, medusa), so the stage also converts published drafters between layouts. LoRA adapters are
merged. The output folder gets a README.md model card built from the training run's records found next to the
drafter (`eval_results.json`, `split.json`, an evaluation `results.json`), or in `--run_dir`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ppow_trl.io import (
    AUTO,
    FORMATS,
    check_format,
    check_hub_access,
    export_drafter,
    load_drafter,
    locate_drafter,
    needs_target,
    push_to_hub,
    recorded_target,
    resolve_layout,
    run_card_inputs,
)
from ppow_trl.target import load_target
from ppow_trl.training.parser import RecipeParser


@dataclass
class ExportArguments:
    """What to export, to which layout, and where."""

    drafter: str = field(metadata={"help": "Drafter directory or Hub id, in any readable layout."})
    output_dir: str = field(
        metadata={"help": "Folder to write the exported drafter (and its model card) to."}
    )
    format: str = field(
        default=AUTO,
        metadata={
            "help": f"Layout to write: one of {', '.join(FORMATS)}, or {AUTO!r} (the drafter's serving layout: "
            "eagle3 for EAGLE-3, medusa for Medusa)."
        },
    )
    target_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The target (needed to read a serving-layout drafter; default: the target the drafter records)."
        },
    )
    num_speculative_tokens: int | None = field(
        default=None,
        metadata={"help": "K written into the speculators config and the card (default 5 / Medusa heads)."},
    )
    layer_id_convention: str = field(
        default="vllm",
        metadata={
            "help": "How eagle_aux_hidden_state_layer_ids is numbered in the eagle3 layout: 'vllm' (inputs of decoder "
            "layers = HF hidden_states indices) or 'sglang' (outputs of decoder layers)."
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Cast the weights before writing, e.g. 'bfloat16' (half the size; the drafter is read back in "
            "the dtype it is run in). Default: the trained dtype."
        },
    )
    run_dir: str | None = field(
        default=None,
        metadata={"help": "Training output folder whose records feed the card (default: --drafter)."},
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the exported folder to --hub_model_id."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository id, <user or org>/<name>."}
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: HF_TOKEN or the login)."}
    )
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repository private."})

    def __post_init__(self) -> None:
        check_format(self.format)


def main(argv: list[str] | None = None) -> Path:
    (args,) = RecipeParser(ExportArguments).parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = check_hub_access(args.hub_model_id, args.hub_token) if args.push_to_hub else None
    source = locate_drafter(args.drafter)
    name = args.target_name_or_path
    if name is None and needs_target(source):  # a serving layout: its target completes it (embedding)
        name = recorded_target(source, "--target_name_or_path")
    target = load_target(name)[0] if name else None
    drafter = load_drafter(source, target, dtype=getattr(torch, args.dtype) if args.dtype else None)
    fmt = resolve_layout(args.format, drafter).name
    run_dir = Path(args.run_dir) if args.run_dir else source.directory
    card_kwargs = run_card_inputs(run_dir) if run_dir.is_dir() else {}
    out = export_drafter(
        drafter,
        args.output_dir,
        fmt,
        target=target,
        num_speculative_tokens=args.num_speculative_tokens,
        layer_id_convention=args.layer_id_convention,
        # the usage snippets name the Hub id, else the exported folder (runnable as it is)
        card_kwargs={**card_kwargs, "repo_id": args.hub_model_id or args.output_dir},
    )
    print(f"exported the drafter in the {fmt!r} layout to {out}")
    if args.push_to_hub:
        url = push_to_hub(
            drafter,
            args.hub_model_id,
            fmt,
            token=token,
            private=args.hub_private_repo,
            folder=out,
            target=target,
            num_speculative_tokens=args.num_speculative_tokens,
            layer_id_convention=args.layer_id_convention,
            card_kwargs=card_kwargs,
        )
        print(f"pushed to {url}")
    return out


if __name__ == "__main__":
    main()
