"""The recipes' command line: TRL's `TrlParser` plus what a user of these recipes needs from it.

- `include:` in a YAML config names base configs (paths relative to the including file) whose keys it
  overrides, so a variant states only its differences;
- an unknown key, in the YAML file or on the command line, is an error that names close field names;
- options a recipe rejects (e.g. the GRPO fields PPOW does not use) are hidden from `--help`;
- an `output_dir` that is a file fails at once, before any work;
- on a machine without an accelerator `use_cpu` defaults to true, so `accelerate launch` on CPU cores
  really runs DDP (gloo) instead of N unrelated copies; a training run started by a distributed launcher
  whose arguments are not distributed is refused instead of racing N copies into one `output_dir`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainingArguments
from transformers.training_args import ParallelMode
from trl import TrlParser


class ConfigError(ValueError):
    """A recipe's YAML config or command line names something the recipe does not know."""


def read_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its `include:` bases merged in (the including file's keys win; later bases win
    over earlier ones)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle through {[str(p) for p in _seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must contain a YAML mapping")
    includes = config.pop("include", None) or []
    merged: dict[str, Any] = {}
    for base in [includes] if isinstance(includes, str) else includes:
        merged.update(read_config(path.parent / base, (*_seen, path)))
    merged.update(config)
    return merged


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


class RecipeParser(TrlParser):
    """`TrlParser` for the recipes (see the module docstring). `hidden(name)` marks fields left out of
    `--help`: they still parse, so the recipe can refuse them with its own message."""

    def __init__(self, dataclass_types, hidden: Callable[[str], bool] | None = None, **kwargs) -> None:
        super().__init__(dataclass_types, **kwargs)
        if hidden is not None:
            for action in self._actions:
                if hidden(action.dest):
                    action.help = argparse.SUPPRESS
        if not has_accelerator() and any(a.dest == "use_cpu" for a in self._actions):
            self.set_defaults(use_cpu=True)

    def _unknown(self, names: Iterable[str], where: str) -> ConfigError:
        known = [a.dest for a in self._actions if a.dest != "help"]
        lines = []
        for name in names:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            lines.append(f"  {name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        return ConfigError(f"unknown {where}:\n" + "\n".join(lines) + "\n(`--help` lists every field)")

    def parse_args_and_config(self, args: Iterable[str] | None = None, **_: Any) -> tuple[Any, ...]:
        args = list(sys.argv[1:] if args is None else args)
        if "--config" in args:
            at = args.index("--config")
            config = read_config(args[at + 1])
            del args[at : at + 2]
            for key, value in (config.pop("env", None) or {}).items():
                os.environ[key] = str(value)
            unknown = self.set_defaults_with_config(**config)
            if unknown:
                raise self._unknown([flag[2:] for flag in unknown[::2]], "key(s) in the YAML config")
        _, remaining = self.parse_known_args(args)
        if remaining:
            flags = [a.lstrip("-").split("=")[0] for a in remaining if a.startswith("-")]
            raise self._unknown(flags or remaining, "command-line argument(s)")
        outputs = self.parse_args_into_dataclasses(args=args)
        for output in outputs:
            if isinstance(output, TrainingArguments):
                check_distributed(output)
            check_output_dir(getattr(output, "output_dir", None))
        return outputs


def check_output_dir(output_dir: str | None) -> None:
    """An output_dir that cannot hold results fails now, not after the run has done its work."""
    if output_dir and Path(output_dir).expanduser().exists() and not Path(output_dir).expanduser().is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder: results could not be written")


def check_distributed(args: TrainingArguments) -> None:
    """Refuse a run that a launcher started as several processes but whose arguments train each one alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise RuntimeError(
            f"Started as {world_size} processes (WORLD_SIZE), but the training arguments are not distributed "
            f"(parallel mode {args.parallel_mode.value}): each process would train alone and write the same "
            "output_dir. On CPU cores use recipes/accelerate_configs/cpu_ddp.yaml and `use_cpu: true`; on GPUs "
            "check that every process sees its device."
        )


def launch_command() -> str:
    """The command that started this run, as a user would retype it (the accelerate form under a launcher
    that started several processes), for model cards."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"accelerate launch --num_processes {world_size}" if world_size > 1 else "python"
    return f"{launcher} {shlex.join(sys.argv)}"
