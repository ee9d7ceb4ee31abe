"""Corpus mode: existing text cut into fixed-length token sequences, trained on the target's own soft labels.

This is the fixed-data practice of EAGLE-1 / Medusa-1: the drafter learns the frozen target's next-token
distribution (computed on the fly by the trainer) on text the target did not write, so no regeneration is
needed. A teacher-forced target pass over text runs ~400-800 tok/s on a CPU, regeneration ~61 tok/s.

Sources (`DataConfig.corpus_name`):
- `pydoc_topics`: the language-reference topics of the standard library's `pydoc_data.topics` (Python's own
  documentation, PSF licence; ~113k tokens with SmolLM2's tokenizer), one document per topic, sorted by name.
- a local file: `.jsonl` with a `text` column (one document per row), or plain text (any other suffix: the
  whole file is one document, read in blocks of about 64 KB that end after a blank line).
- a Hub dataset id with a `text` column, streamed with `datasets` (needs network; `corpus_config` and
  `corpus_split` select the configuration and split). The fingerprint cannot see upstream changes to it.

Refused (reserved evaluation text): HumanEval, MT-Bench, GSM8K (by name or path), and files inside the
standard library (its modules' code and docstrings are held out for evaluation; `pydoc_topics` is allowed).

Token stream: each document is tokenized without special tokens or chat template and followed by the
tokenizer's eos token (blocks of one plain-text file are joined without it). The stream is cut into
sequences of `corpus_seq_len` tokens with loss_mask 1 on every token, `corpus_max_tokens` tokens in all: the
last sequence is cut to the budget, or is shorter when the source runs out first. Collation pads.

Cache: shards of `shard_size` sequences under `<cache_dir>/corpus/<fingerprint>/`, written with the
regeneration's shard and manifest helpers. The fingerprint covers the source (name, config, split; a
content hash of local files and pydoc topics), the tokenizer's vocabulary and eos, the sequence length,
the budget and the shard size. Each shard records where the stream stands after it (document number,
token offset): an interrupted run continues after its last complete shard without re-tokenizing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .cache import check_manifest, fingerprint_of, read_token_shard, sha, shard_path, write_token_shard
from .config import DataConfig

CORPUS_CACHE_VERSION = 1
PYDOC_TOPICS = "pydoc_topics"
RESERVED_EVALUATION_TEXT = {"humaneval": "HumanEval", "mtbench": "MT-Bench", "gsm8k": "GSM8K"}
TEXT_BLOCK_CHARS = 1 << 16
TEXT_SUFFIXES = (".jsonl", ".txt", ".md", ".rst")
SITE_PACKAGES = ("site-packages", "dist-packages")  # installed packages inside a stdlib folder are allowed
Position = tuple[int, int]  # (document number, token offset in that document's tokens)


@dataclass(frozen=True)
class CorpusSource:
    """A named stream of documents: `documents(start)` yields texts (empty ones are skipped) from document
    number `start` on."""

    name: str
    identity: dict[str, Any]
    documents: Callable[[int], Iterator[str]]
    eos_between_documents: bool = True


@dataclass
class Corpus:
    """Corpus sequences (the dataset columns of regenerated data, split 'train') and where they are cached."""

    dataset: Dataset
    directory: Path
    fingerprint: str
    stats: dict[str, Any]


# ------------------------------------------------------------------------------------------------ guard
def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_corpus_allowed(name: str) -> None:
    """Raise ValueError when `name` is reserved evaluation text (HumanEval, MT-Bench, GSM8K, the stdlib)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for marker, benchmark in RESERVED_EVALUATION_TEXT.items():
        if marker in key:
            raise ValueError(
                f"Corpus {name!r} looks like {benchmark}, which is reserved evaluation text and may not be "
                "used as training corpus. Use 'pydoc_topics', another local text file or a Hub text dataset."
            )
    path = Path(name).expanduser()
    if not path.exists():
        return
    path = path.resolve()
    for scheme in ("stdlib", "platstdlib"):
        stdlib = Path(sysconfig.get_paths()[scheme]).resolve()
        if _inside(path, stdlib) and not any(_inside(path, stdlib / site) for site in SITE_PACKAGES):
            raise ValueError(
                f"Corpus file {path} lies inside the Python standard library ({stdlib}), whose code and "
                f"docstrings are reserved for evaluation; the named source '{PYDOC_TOPICS}' (the "
                "language-reference topics) is the standard library text allowed for training."
            )


# ------------------------------------------------------------------------------------------------ sources
def _filesha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pydoc_topics() -> CorpusSource:
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)]
    return CorpusSource(
        PYDOC_TOPICS, {"kind": PYDOC_TOPICS, "sha": sha(texts)}, lambda start: iter(texts[start:])
    )


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "text" not in row:
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"{path} line {number}: a corpus .jsonl row needs a 'text' column, found {found}"
                )
            yield row["text"] if isinstance(row["text"], str) else ""


def _text_blocks(path: Path) -> Iterator[str]:
    """A plain-text file in blocks of about TEXT_BLOCK_CHARS characters, each ending after a blank line."""
    block: list[str] = []
    size = 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            block.append(line)
            size += len(line)
            if size >= TEXT_BLOCK_CHARS and not line.strip():
                yield "".join(block)
                block, size = [], 0
    if block:
        yield "".join(block)


def _local_file(path: Path) -> CorpusSource:
    if not path.is_file():
        raise FileNotFoundError(f"Corpus file not found: {path}")
    kind = "jsonl" if path.suffix == ".jsonl" else "text"
    read = _jsonl_texts if kind == "jsonl" else _text_blocks
    return CorpusSource(
        str(path),
        {"kind": kind, "sha": _filesha(path)},
        lambda start: itertools.islice(read(path), start, None),
        eos_between_documents=kind == "jsonl",
    )


def _hub(name: str, config: str | None, split: str) -> CorpusSource:
    from datasets import load_dataset

    try:
        stream = load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # offline, unknown id, missing config, ...
        raise RuntimeError(
            f"Could not stream the Hub corpus {name!r} (config {config!r}, split {split!r}): "
            f"{type(err).__name__}: {err}. A Hub corpus needs network access; offline, use "
            f"'{PYDOC_TOPICS}' or a local .jsonl (text column) or plain-text file."
        ) from err
    columns = stream.column_names
    if columns is not None and "text" not in columns:
        raise ValueError(f"Hub corpus {name!r} has no 'text' column (columns: {sorted(columns)})")

    def documents(start: int) -> Iterator[str]:
        for row in stream.skip(start):
            yield row["text"] if isinstance(row["text"], str) else ""

    return CorpusSource(name, {"kind": "hub", "name": name, "config": config, "split": split}, documents)


def open_corpus(name: str, config: str | None = None, split: str = "train") -> CorpusSource:
    """The corpus source `name` ('pydoc_topics', a local file or a Hub dataset id), after the reserved-text guard."""
    check_corpus_allowed(name)
    path = Path(name).expanduser()
    if name == PYDOC_TOPICS:
        return _pydoc_topics()
    if path.exists() or name.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES:
        return _local_file(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return _hub(name, config, split)
    raise ValueError(
        f"Unknown corpus {name!r}: use '{PYDOC_TOPICS}', a local .jsonl (text column) or plain-text file, "
        "or a Hub dataset id 'org/name' with a text column"
    )


# ------------------------------------------------------------------------------------------------ chunking
def _sequences(
    source: CorpusSource, tokenizer: PreTrainedTokenizerBase, start: Position, seq_len: int, budget: int
) -> Iterator[tuple[list[int], Position]]:
    """Cut the token stream from `start` into sequences of `seq_len` tokens, `budget` tokens at most; yields
    each sequence with the stream position right after it."""
    if source.eos_between_documents and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to separate corpus documents")
    eos = [tokenizer.eos_token_id] if source.eos_between_documents else []
    buffer: list[int] = []
    document = start[0]
    for document, text in enumerate(source.documents(start[0]), start=start[0]):
        if not text:  # empty documents are skipped (they keep their number, so resuming stays aligned)
            continue
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + eos
        used = start[1] if document == start[0] else 0
        while budget and len(buffer) + len(ids) - used >= min(seq_len, budget):
            take = min(seq_len, budget) - len(buffer)
            sequence, buffer = buffer + ids[used : used + take], []
            used += take
            budget -= len(sequence)
            yield sequence, (document, used)
        if not budget:
            return
        buffer += ids[used:]
    if buffer:
        yield buffer, (document + 1, 0)


def corpus_inputs(source: CorpusSource, tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> dict:
    """Everything that determines the corpus sequences (hashed into the cache fingerprint)."""
    return {
        "version": CORPUS_CACHE_VERSION,
        "source": source.identity,
        "tokenizer": {
            "vocab_sha": sha(sorted(tokenizer.get_vocab().items())),
            "eos_token_id": tokenizer.eos_token_id if source.eos_between_documents else None,
        },
        "seq_len": config.corpus_seq_len,
        "max_tokens": config.corpus_max_tokens,
        "shard_size": config.shard_size,
    }


def build_corpus(
    source: CorpusSource,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    first_index: int = 0,
    progress: bool = True,
) -> Corpus:
    """Chunk `source` into the fingerprinted shard cache (missing shards only) and return its sequences.

    Rows get `prompt_id` 'corpus/<row>', `num_turns` 0, `split` 'train' and `index` first_index + row (pass
    the number of regenerated sequences so indices stay unique over both).
    """
    inputs = corpus_inputs(source, tokenizer, config)
    fingerprint = fingerprint_of(inputs)
    directory = config.cache_path / "corpus" / fingerprint
    check_manifest(directory, fingerprint, inputs)
    count = math.ceil(math.ceil(config.corpus_max_tokens / config.corpus_seq_len) / config.shard_size)
    paths = [shard_path(directory, i, count, suffix="parquet") for i in range(count)]
    shards: list[tuple[dict[str, list], dict[str, Any]]] = []
    for path in paths:
        if not path.is_file():
            break
        shards.append(read_token_shard(path))
        if shards[-1][1]["last"]:
            break
    if len(shards) < count and not (shards and shards[-1][1]["last"]):
        shards += _write_missing(source, tokenizer, config, paths, shards, progress)
    columns: dict[str, list] = {"input_ids": [], "loss_mask": [], "prompt_id": [], "num_turns": []}
    for shard_columns, _ in shards:
        for name, values in shard_columns.items():
            columns[name].extend(values)
    rows = len(columns["input_ids"])
    columns["index"] = list(range(first_index, first_index + rows))
    columns["split"] = ["train"] * rows
    tokens = sum(stats["tokens"] for _, stats in shards)
    stats = {
        "source": source.name,
        "sequences": rows,
        "tokens": tokens,
        "source_exhausted": tokens < config.corpus_max_tokens,
    }
    return Corpus(Dataset.from_dict(columns), directory, fingerprint, stats)


def _write_missing(
    source: CorpusSource,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    paths: list[Path],
    done: list[tuple[dict[str, list], dict[str, Any]]],
    progress: bool,
) -> list[tuple[dict[str, list], dict[str, Any]]]:
    """Write shards len(done).. from the stream position the last complete shard recorded."""
    start = tuple(done[-1][1]["next"]) if done else (0, 0)
    budget = config.corpus_max_tokens - sum(stats["tokens"] for _, stats in done)
    stream = _sequences(source, tokenizer, start, config.corpus_seq_len, budget)
    pending = next(stream, None)
    if pending is None and not done:
        raise ValueError(f"Corpus {source.name!r} yielded no text")
    written = []
    row = len(done) * config.shard_size
    with tqdm(total=budget, desc=f"chunking {source.name}", unit="tok", disable=not progress) as bar:
        for index in range(len(done), len(paths)):
            sequences, position = [], start
            while pending is not None and len(sequences) < config.shard_size:
                sequence, position = pending
                sequences.append(sequence)
                pending = next(stream, None)
            columns = {
                "input_ids": sequences,
                "loss_mask": [[1] * len(s) for s in sequences],
                "prompt_id": [f"corpus/{row + i}" for i in range(len(sequences))],
                "num_turns": [0] * len(sequences),
            }
            stats = {
                "tokens": sum(map(len, sequences)),
                "next": list(position),
                "last": pending is None,
            }
            write_token_shard(paths[index], columns, stats)
            written.append((columns, stats))
            bar.update(stats["tokens"])
            row += len(sequences)
            if pending is None:
                break
    return written
