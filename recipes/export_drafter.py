"""Export a trained drafter to the layout a serving engine loads (a stage of its own, after training).

    python recipes/export_drafter.py --drafter outputs/smollm2-135m/ppow-eagle3 --format eagle3 \
        --output_dir outputs/smollm2-135m/export/eagle3           # vLLM and SGLang
    python recipes/export_drafter.py --drafter <dir> --format speculators --output_dir <out>   # vLLM speculators
    python recipes/export_drafter.py --drafter <medusa dir> --format medusa --output_dir <out> # vLLM Medusa
    python recipes/export_drafter.py --drafter <dir> --format eagle3 --output_dir <out> \
        --push_to_hub --hub_model_id me/smollm2-135m-eagle3-ppow

`--drafter` is a directory or Hub id in any layout `ppow_trl.export.load_drafter` reads (this package's own,
eagle3, speculators, medusa), so the stage also converts published drafters between layouts. LoRA adapters are
merged. The output folder gets a README.md model card built from the training run's records found next to the
drafter (`eval_results.json`, `split.json`, an evaluation `results.json`), or in `--run_dir`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import TrlParser

from ppow_trl.export import (
    FORMATS,
    check_hub_access,
    detect_format,
    export_drafter,
    load_drafter,
    push_to_hub,
    run_card_inputs,
)


@dataclass
class ExportArguments:
    """What to export, to which layout, and where."""

    drafter: str = field(metadata={"help": "Drafter directory or Hub id, in any readable layout."})
    output_dir: str = field(
        metadata={"help": "Folder to write the exported drafter (and its model card) to."}
    )
    format: str = field(default="eagle3", metadata={"help": f"Layout to write: one of {', '.join(FORMATS)}."})
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
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; the formats are: {', '.join(FORMATS)}")


def _needs_target(drafter: str) -> bool:
    config = Path(drafter) / "config.json"
    return not config.is_file() or detect_format(json.loads(config.read_text())) != "ppow"


def main(argv: list[str] | None = None) -> Path:
    (args,) = TrlParser(ExportArguments).parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = check_hub_access(args.hub_model_id, args.hub_token) if args.push_to_hub else None
    target = None
    if args.target_name_or_path or _needs_target(args.drafter):
        from ppow_trl.target import load_target

        name = args.target_name_or_path
        if name is None:
            raise ValueError(f"{args.drafter} is a serving-layout drafter: pass --target_name_or_path")
        target, _ = load_target(name)
    drafter = load_drafter(args.drafter, target, dtype=getattr(torch, args.dtype) if args.dtype else None)
    run_dir = Path(args.run_dir or args.drafter)
    card_kwargs = run_card_inputs(run_dir) if run_dir.is_dir() else {}
    out = export_drafter(
        drafter,
        args.output_dir,
        args.format,
        target=target,
        num_speculative_tokens=args.num_speculative_tokens,
        layer_id_convention=args.layer_id_convention,
        # the usage snippets name the Hub id, else the exported folder (runnable as it is)
        card_kwargs={**card_kwargs, "repo_id": args.hub_model_id or args.output_dir},
    )
    print(f"exported the drafter in the {args.format!r} layout to {out}")
    if args.push_to_hub:
        url = push_to_hub(
            drafter,
            args.hub_model_id,
            args.format,
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
