"""The data stage on its own: prompts -> filters -> the target's answers -> a dataset directory.

    python recipes/regenerate.py --config recipes/configs/smollm2-135m/regenerate_self_generated.yaml

Every `ppow_trl.data.DataConfig` field can be set in the YAML file or on the command line. The output
directory holds the cache (written prompts, answer shards), `ppow_data.json` and a README data card;
pass it as `dataset_name` to the training recipes and nothing is regenerated. Run it again with more prompts
(`self_generated_prompts`) on the same directory to grow it: only the new shards are written. Killing this
script at any point and running it again redoes only the shard it was writing. `--push_to_hub
--hub_dataset_id <id>` checks Hub access first and uploads the directory at the end.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ppow_trl.data import DataConfig, build_training_data
from ppow_trl.data.card import write_dataset_card
from ppow_trl.io import HubAccessError, check_hub_access, push_dataset
from ppow_trl.target import load_target
from ppow_trl.training.parser import RecipeParser
from ppow_trl.training.script_args import TargetArguments


@dataclass
class RegenerateArguments(TargetArguments):
    """The target that writes prompts and answers, and where the dataset directory goes."""

    output_dir: str = field(
        default="outputs/smollm2-135m/data",
        metadata={
            "help": "The dataset directory (grows in place: only new prompts and answers are written)."
        },
    )
    data_license: str | None = field(
        default=None,
        metadata={
            "help": "Licence of the target's answers for the data card (the target's own, e.g. apache-2.0)."
        },
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the dataset directory to the Hub (access checked first)."}
    )
    hub_dataset_id: str | None = field(
        default=None, metadata={"help": "Hub dataset repository for --push_to_hub, '<user or org>/<name>'."}
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: HF_TOKEN or the login)."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[RegenerateArguments, DataConfig]:
    parser = RecipeParser((RegenerateArguments, DataConfig))
    return tuple(parser.parse_args_and_config(argv))  # type: ignore[return-value]


def main(args: RegenerateArguments, data_config: DataConfig) -> Path:
    start = time.perf_counter()
    directory = Path(args.output_dir).expanduser()
    token = None
    if args.push_to_hub:  # before hours of generation, not after
        if not args.hub_dataset_id:
            raise HubAccessError("push_to_hub needs --hub_dataset_id <user or org>/<name>")
        token = check_hub_access(args.hub_dataset_id, args.hub_token)
    target, tokenizer = load_target(args.target_name_or_path, args.target_dtype, args.target_quantization)
    config = replace(data_config, cache_dir=str(directory))
    data = build_training_data(config, target, tokenizer)
    command = "python recipes/regenerate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_dataset_card(
        directory, config, data.report, time.perf_counter() - start, command, args.data_license
    )
    print(f"dataset directory: {directory} ({data.report['assistant_tokens']} answer tokens)")
    if token is not None:
        print(f"pushed: {push_dataset(directory, args.hub_dataset_id, token)}")
    return directory


if __name__ == "__main__":
    main(*parse_args())
