"""The one rule for "is this name a local path or a Hub id?", used by every stage that takes either.

It lives at the bottom of the package because the first stage (`target`) already needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` can only mean a Hub repository: nothing exists at that path, it does not start like a
    path (``.``, ``/``, ``~``), and it is a valid repo id (``name`` or ``org/name``)."""
    text = str(name)
    if not text or text.startswith((".", "/", "~")) or Path(text).expanduser().exists():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
