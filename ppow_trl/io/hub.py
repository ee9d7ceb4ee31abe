"""Pushing drafters to the Hugging Face Hub, on top of the layouts and cards.

`push_to_hub` exports the drafter (its serving layout by default), writes the card next to it and uploads the
folder. `check_hub_access` runs before any training work in the recipes so that a missing token or an
offline machine fails in seconds with a message saying how to fix it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from transformers import PreTrainedModel

from ppow_trl.io.drafters import export_drafter
from ppow_trl.io.layouts import AUTO, resolve_layout
from ppow_trl.models.common import unwrap_drafter

logger = logging.getLogger(__name__)


class HubAccessError(RuntimeError):
    """Pushing to the Hub cannot work from here (offline, no token, no write access)."""


# ------------------------------------------------------------------------------------------ access check
def check_hub_access(repo_id: str | None, token: str | None = None) -> str:
    """Fail fast, before any training work, when a push to `repo_id` cannot succeed; return the token.

    Checks in order: a repo id is given, the Hub is not switched off (`HF_HUB_OFFLINE`), a token exists
    (argument, `HF_TOKEN`, or `hf auth login`), and the endpoint answers `whoami` with it.
    """
    from huggingface_hub import constants, get_token, whoami

    if not repo_id:
        raise HubAccessError("push_to_hub needs a repository id: pass --hub_model_id <user or org>/<name>")
    if constants.HF_HUB_OFFLINE:
        raise HubAccessError(
            f"cannot push {repo_id!r}: HF_HUB_OFFLINE is set, so the Hub is not contacted. Unset HF_HUB_OFFLINE on a "
            "machine with network access, or drop --push_to_hub and push the exported folder later with "
            "`python recipes/export_drafter.py --drafter <dir> --push_to_hub --hub_model_id ...`."
        )
    token = token or get_token()
    if not token:
        raise HubAccessError(
            f"cannot push {repo_id!r}: no Hugging Face token. Run `hf auth login`, or set HF_TOKEN to a token with "
            "write access (https://huggingface.co/settings/tokens), or pass --hub_token."
        )
    try:
        whoami(token=token)
    except Exception as err:  # network down, DNS, proxy, invalid token
        raise HubAccessError(
            f"cannot push {repo_id!r}: the Hub at {constants.ENDPOINT} did not accept the token ({type(err).__name__}: "
            f"{err}). Check the network connection (HF_ENDPOINT for a mirror) and that the token is valid, or drop "
            "--push_to_hub and push the exported folder later."
        ) from err
    return token


def push_to_hub(
    drafter: PreTrainedModel,
    repo_id: str,
    format: str = AUTO,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    folder: str | Path | None = None,
    target: PreTrainedModel | None = None,
    num_speculative_tokens: int | None = None,
    layer_id_convention: str = "vllm",
    card_kwargs: dict | None = None,
) -> str:
    """Export `drafter` in `format` (LoRA merged; ``auto``: its serving layout), write its model card and
    upload the folder to `repo_id`.

    The folder is `folder` when given (kept), else a temporary directory. Access is checked first
    (`check_hub_access`). Returns the URL of the commit.
    """
    from huggingface_hub import HfApi

    format = resolve_layout(format, unwrap_drafter(drafter)).name
    token = check_hub_access(repo_id, token)
    kwargs = {"repo_id": repo_id, **(card_kwargs or {})}
    with tempfile.TemporaryDirectory(prefix="ppow-push-") as tmp:
        out = Path(folder) if folder is not None else Path(tmp)
        export_drafter(
            drafter,
            out,
            format,
            target=target,
            num_speculative_tokens=num_speculative_tokens,
            layer_id_convention=layer_id_convention,
            card_kwargs=kwargs,
        )
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out),
            commit_message=commit_message or f"Upload {format} drafter (ppow-trl)",
            revision=revision,
            token=token,
        )
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("Pushed the %s drafter to %s", format, url)
    return url


# What a dataset directory (recipes/regenerate.py) publishes: the card, the prompts and answer shards, the
# split and draft vocabulary; never the offline feature caches (large, rebuilt from the shards) or claims.
DATASET_FILES = (
    "README.md",
    "ppow_data.json",
    "prompts/**",
    "regen/*/*.parquet",
    "regen/*/*.json",
    "split-*/**",
)


def push_dataset(directory: str | Path, repo_id: str, token: str, private: bool | None = None) -> str:
    """Upload a dataset directory to the Hub dataset repository `repo_id` (access checked beforehand with
    `check_hub_access`); returns the URL of the commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(directory),
        allow_patterns=list(DATASET_FILES),
        ignore_patterns=["**/.*"],
        commit_message="Upload drafter training data (ppow-trl)",
    )
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("Pushed the dataset directory %s to %s", directory, url)
    return url
