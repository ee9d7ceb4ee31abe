"""The data pipeline's on-disk cache: fingerprints, manifests and atomically written shards.

Every cached stage (prompt writing, regeneration, corpus chunks, offline features) lives in a folder named
by a fingerprint of everything that determines its content; a `manifest.json` records those inputs, and
results are written shard by shard (temporary name, then rename), so a killed run redoes only the shard
it was writing. Several workers may fill one folder at once (the same command started twice on a machine, or
on machines sharing the disk): each claims a shard before writing it (`claim_shard`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file


def sha(value: Any) -> str:
    """SHA-256 of bytes, or of a value's canonical JSON."""
    payload = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()


def fingerprint_of(inputs: dict[str, Any]) -> str:
    return sha(inputs)[:20]


def shard_path(
    directory: Path, index: int, count: int, prefix: str = "shard", suffix: str = "safetensors"
) -> Path:
    return directory / f"{prefix}-{index:05d}-of-{count:05d}.{suffix}"


def content_shard_path(directory: Path, index: int, content: Any, suffix: str) -> Path:
    """Shard `index` named by a checksum of what it holds, so a dataset that grows (more prompts appended)
    keeps the names of its unchanged shards and `reuse_shard` can find them in a sibling cache folder."""
    return directory / f"shard-{index:05d}-{sha(content)[:12]}.{suffix}"


def relative_path(path: Path, root: Path) -> str:
    """`path` relative to `root` when it lies inside (reports of a dataset directory hold no machine's paths)."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def reuse_shard(path: Path) -> bool:
    """Link `path` to an identical shard in a sibling cache folder (the same stage's cache for a smaller or
    overlapping dataset); True when one was found. Names come from `content_shard_path`, so equal names mean
    equal content."""
    for twin in path.parent.parent.glob(f"*/{path.name}"):
        if twin.parent == path.parent:
            continue
        tmp = _temporary(path)
        try:
            os.link(twin, tmp)
        except OSError:  # another filesystem, or links not allowed: copy
            tmp.write_bytes(twin.read_bytes())
        os.replace(tmp, path)
        return True
    return False


TOKEN_COLUMNS = ("input_ids", "loss_mask", "prompt_id", "num_turns")
STATS_KEY = "ppow_trl.stats"
SHARD_WAIT_SECONDS = 10.0  # how often a worker with nothing left to claim checks on the others


def fill_shards(
    paths: list[Path],
    missing: list[int],
    write: Callable[[int], None],
    written_elsewhere: Callable[[int], None] | None = None,
) -> None:
    """Write the `missing` shards with `write(i)` (which must create `paths[i]`), sharing them with any other
    worker filling the same folder: each shard is claimed first, and shards claimed by others are waited for
    (a claim left by a killed worker goes stale and is taken over). `written_elsewhere(i)` is called for each
    shard another worker wrote (e.g. to advance a progress bar)."""
    mine_done: set[int] = set()
    while missing:
        for i in missing:
            with claim_shard(paths[i]) as mine:
                if mine and not paths[i].is_file():  # else another worker writes (or wrote) it
                    write(i)
                    mine_done.add(i)
        still = [i for i in missing if not paths[i].is_file()]
        if written_elsewhere is not None:
            for i in set(missing) - set(still) - mine_done:
                written_elsewhere(i)
        missing = still
        if missing:
            time.sleep(SHARD_WAIT_SECONDS)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _temporary(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_tensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    tmp = _temporary(path)
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def check_manifest(directory: Path, fingerprint: str, inputs: dict[str, Any]) -> None:
    """Create `directory` with its manifest, or check that an existing one was written for `inputs`."""
    manifest = directory / "manifest.json"
    expected = {"fingerprint": fingerprint, "inputs": json.loads(json.dumps(inputs, default=str))}
    if manifest.is_file():
        stored = json.loads(manifest.read_text())
        if stored != expected:
            raise RuntimeError(
                f"The data cache {directory} holds a manifest that does not match these settings; it was not "
                "written by this version or for this target/prompts/settings. Delete the directory to rebuild it."
            )
        return
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(manifest, json.dumps(expected, indent=1))


def write_token_shard(path: Path, columns: dict[str, list], stats: dict[str, Any]) -> None:
    """One shard of token sequences as a parquet file (any `datasets` or pandas user can read it): the
    columns `read_token_shard` returns (input_ids, loss_mask, prompt_id, num_turns), plus any extra
    per-conversation columns (e.g. `task`) for people, and the shard's `stats` in the file's metadata."""
    types = {"input_ids": pa.list_(pa.int32()), "loss_mask": pa.list_(pa.int8()), "num_turns": pa.int32()}
    table = pa.table({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})
    table = table.replace_schema_metadata({STATS_KEY: json.dumps(stats)})
    tmp = _temporary(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_token_shard(path: Path) -> tuple[dict[str, list], dict[str, Any]]:
    table = pq.read_table(path, columns=list(TOKEN_COLUMNS))
    columns = {name: table.column(name).to_pylist() for name in TOKEN_COLUMNS}
    return columns, json.loads(table.schema.metadata[STATS_KEY.encode()])


def _claim_is_stale(claim: Path) -> bool:
    """A claim left by a worker of this machine that no longer runs."""
    try:
        host, pid = claim.read_text().split()
    except (OSError, ValueError):  # being written right now, or its writer died in between
        try:
            return time.time() - claim.stat().st_mtime > 60
        except OSError:
            return False
    if host != socket.gethostname():
        return False  # another machine's worker: it cannot be checked from here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextmanager
def claim_shard(path: Path) -> Iterator[bool]:
    """Claim the right to write shard `path`: yields True when this process holds the claim (and releases it
    afterwards), False when another live worker holds it. A claim left by a killed worker of this machine is
    taken over."""
    claim = path.with_name(f".{path.name}.claim")
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _claim_is_stale(claim):
                claim.unlink(missing_ok=True)
                continue
            yield False
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{socket.gethostname()} {os.getpid()}")
        try:
            yield True
        finally:
            claim.unlink(missing_ok=True)
        return
    yield False
