"""Where a drafter's files are: a local folder or a Hub snapshot, its `config.json` read once, and the target
it records. Every error about a drafter's files (missing, unreadable config) is raised here, so every recipe
reports it the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ppow_trl.hub_id import is_hub_id

ADAPTER_CONFIG = "adapter_config.json"
#: Key of the record this package adds to exported configs (engines ignore unknown keys).
RECORD_KEY = "ppow_trl"
#: What a target name means when it is not a name a loader can use.
UNKNOWN_TARGETS = (None, "", "unknown")


class DrafterFormatError(ValueError):
    """A checkpoint or an export request that does not fit the drafter format."""


class DrafterNotFoundError(FileNotFoundError):
    """No drafter at the given path or Hub id."""


@dataclass(frozen=True)
class DrafterSource:
    """A drafter's folder, located and with its config read, before any weights are loaded.

    name: what the user passed; directory: the local folder (a Hub snapshot for Hub ids); config: the parsed
    `config.json` ({} for a folder of LoRA adapters); base: for a folder of LoRA adapters, the drafter they
    apply to.
    """

    name: str
    directory: Path
    config: dict[str, Any]
    base: DrafterSource | None = None

    @property
    def target_name(self) -> str | None:
        """The target the drafter records (ours: `target_name_or_path`; serving layouts: our record, else the
        speculators verifier), None when it records none."""
        if self.base is not None:
            return self.base.target_name
        verifier = (self.config.get("speculators_config") or {}).get("verifier") or {}
        for name in (
            self.config.get("target_name_or_path"),
            (self.config.get(RECORD_KEY) or {}).get("target_name_or_path"),
            verifier.get("name_or_path"),
        ):
            if name not in UNKNOWN_TARGETS:
                return name
        return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; a truncated or corrupt file raises naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DrafterFormatError(
            f"{path} is not valid JSON ({err}): the drafter's files are damaged"
        ) from err
    if not isinstance(data, dict):
        raise DrafterFormatError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def locate_drafter(
    path_or_hub_id: str | Path | DrafterSource, revision: str | None = None, token: str | bool | None = None
) -> DrafterSource:
    """The drafter folder of a local path or a Hub id (downloaded), with its config read."""
    if isinstance(path_or_hub_id, DrafterSource):
        return path_or_hub_id
    name = str(path_or_hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        directory = path
    elif is_hub_id(name):
        directory = _download(name, revision, token)
    else:
        raise DrafterNotFoundError(
            f"no drafter at {name!r}: not a directory, and not a valid Hub id ('org/name' or 'name')"
        )
    if (directory / "config.json").is_file():
        return DrafterSource(name, directory, read_json(directory / "config.json"))
    if (directory / ADAPTER_CONFIG).is_file():  # LoRA adapters saved by a peft-wrapped trainer
        base = read_json(directory / ADAPTER_CONFIG).get("base_model_name_or_path")
        if not base:
            raise DrafterFormatError(
                f"{directory} holds LoRA adapters whose base drafter was never saved (no "
                "base_model_name_or_path): export the merged drafter from the trained model instead "
                "(ppow_trl.io.export_drafter(trainer.model, out_dir, 'ppow') merges the adapters)"
            )
        return DrafterSource(name, directory, {}, base=locate_drafter(base, revision, token))
    raise DrafterNotFoundError(f"{directory} has no config.json: not a drafter checkpoint directory")


def _download(name: str, revision: str | None, token: str | bool | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                token=token,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.md", "*.txt"],
            )
        )
    except Exception as err:  # offline, missing repo, gated repo
        raise DrafterNotFoundError(
            f"no drafter at {name!r}: no such local directory, and it could not be downloaded from the Hub "
            f"({type(err).__name__}: {err}). Pass a drafter directory, or connect (and log in with "
            "`hf auth login` for gated repos)."
        ) from err


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: `*.safetensors` (sharded or not), else `pytorch_model*.bin`
    (the layout of the original EAGLE-3 releases)."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        tensors = {}
        for file in files:
            tensors.update(load_file(file))
        return tensors
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise DrafterFormatError(f"{directory} holds no *.safetensors or pytorch_model*.bin weights")
    tensors = {}
    for file in files:
        tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return tensors
