"""Prompt filters: malformed turns, exact and near duplicates (MinHash), and decontamination against the
evaluation sets (MT-Bench, HumanEval, GSM8K when cached, the standard library's docstrings).

`filter_prompts` keeps the first prompt of every near-duplicate group, in input order, and counts every
drop by reason, so the data report can say what each filter removed.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..target import cache_root
from .cache import sha
from .config import DataConfig

logger = logging.getLogger(__name__)

ROLE_MARKERS = re.compile(
    r"<\|[a-z_]+\|>|\b(?:user|assistant|system|human|gpt)\s*:|\[/?inst\]|###\s*(?:instruction|response)",
    re.IGNORECASE,
)
ANSWER_OPENINGS = re.compile(
    r"^(?:sure\b|certainly\b|of course\b|absolutely\b|here(?:'s| is| are)\b|i'd be (?:happy|glad)|"
    r"i would be (?:happy|glad)|great question|as an ai\b|i'm sorry\b|i am sorry\b|hello! how can i|"
    r"hi! how can i|how can i (?:help|assist) you)",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z0-9]+")
_PRIME = np.uint64(1_000_003)


@dataclass(frozen=True)
class FilterSettings:
    min_chars: int = 16
    max_chars: int = 2000
    min_text_fraction: float = 0.5
    near_duplicate_threshold: float = 0.7
    decontamination_ngram: int = 8
    decontamination_threshold: float = 0.2

    @classmethod
    def from_config(cls, config: DataConfig) -> FilterSettings:
        return cls(
            min_chars=config.filter_min_chars,
            max_chars=config.filter_max_chars,
            min_text_fraction=config.filter_min_text_fraction,
            near_duplicate_threshold=config.near_duplicate_threshold,
            decontamination_ngram=config.decontamination_ngram,
            decontamination_threshold=config.decontamination_threshold,
        )


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def malformed_reason(text: str, ended: bool, settings: FilterSettings) -> str | None:
    """Why a written user turn is unusable (None when it is fine)."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    if not ended:
        return "unfinished"
    if len(stripped) < settings.min_chars:
        return "too_short"
    if len(stripped) > settings.max_chars:
        return "too_long"
    texty = sum(ch.isalnum() or ch.isspace() for ch in stripped)
    if texty / len(stripped) < settings.min_text_fraction:
        return "non_text"
    if ROLE_MARKERS.search(stripped):
        return "role_marker"
    if ANSWER_OPENINGS.match(stripped):
        return "answers_instead_of_asking"
    return None


# --------------------------------------------------------------------------------------------- hashing
def _word_hashes(tokens: Sequence[str], table: dict[str, int]) -> np.ndarray:
    for token in tokens:
        if token not in table:
            table[token] = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "big")
    return np.fromiter((table[t] for t in tokens), dtype=np.uint64, count=len(tokens))


def ngram_hashes(tokens: Sequence[str], n: int, table: dict[str, int]) -> np.ndarray:
    """64-bit hashes of all word n-grams (a polynomial over per-word hashes, wrapping mod 2^64)."""
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    base = _word_hashes(tokens, table)
    out = np.zeros(len(tokens) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            out = out * _PRIME + base[j : len(base) - n + 1 + j]
    return out


# ---------------------------------------------------------------------------------------- near duplicates
def near_duplicates(
    texts: Sequence[str], threshold: float, shingle: int = 3, perms: int = 64
) -> list[int | None]:
    """For each text, the index of an earlier text it near-duplicates (Jaccard of word shingles >= threshold),
    else None. MinHash signatures with LSH banding propose candidates; the exact Jaccard confirms them. The
    band width is chosen so that pairs at the threshold become candidates with probability > 0.99."""
    rows = next(r for r in (8, 4, 2, 1) if (r == 1 or (r / perms) ** (1 / r) <= threshold - 0.15))
    bands = perms // rows
    rng = np.random.default_rng(12345)
    a = rng.integers(1, 2**61 - 1, size=perms, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**61 - 1, size=perms, dtype=np.uint64)
    table: dict[str, int] = {}
    shingles, buckets = [], [dict() for _ in range(bands)]
    result: list[int | None] = []
    for index, text in enumerate(texts):
        tokens = words(text)
        grams = (
            ngram_hashes(tokens, min(shingle, max(len(tokens), 1)), table)
            if tokens
            else np.zeros(0, np.uint64)
        )
        unique = np.unique(grams)
        shingles.append(set(unique.tolist()))
        if unique.size == 0:
            result.append(None)
            continue
        with np.errstate(over="ignore"):
            signature = (a[:, None] * unique[None, :] + b[:, None]).min(axis=1)
        keys = [signature[band * rows : (band + 1) * rows].tobytes() for band in range(bands)]
        match = None
        for band, key in enumerate(keys):
            for other in buckets[band].get(key, ()):
                union = len(shingles[index] | shingles[other])
                if union and len(shingles[index] & shingles[other]) / union >= threshold:
                    match = other
                    break
            if match is not None:
                break
        result.append(match)
        if match is None:  # only kept texts become representatives
            for band, key in enumerate(keys):
                buckets[band].setdefault(key, []).append(index)
    return result


# ---------------------------------------------------------------------------------------- decontamination
def _stdlib_docstrings() -> list[str]:
    """Docstrings of the running Python's standard library modules, classes and functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) > 40:
                    texts.append(doc)
    return texts


# Every set decontamination checks when it can be read; the data card names any that could not be.
DECONTAMINATION_SETS = ("mt_bench", "humaneval", "gsm8k", "stdlib_docstrings")


def evaluation_texts() -> dict[str, list[str]]:
    """The texts training prompts must not overlap: every set that is available here, by name."""
    from .sources import load_gsm8k, load_humaneval, load_mt_bench

    sets: dict[str, list[str]] = {}
    for name, loader in (("mt_bench", load_mt_bench), ("humaneval", load_humaneval), ("gsm8k", load_gsm8k)):
        try:
            sets[name] = [turn for example in loader() for turn in example.turns]
        except (FileNotFoundError, RuntimeError) as err:
            logger.warning(
                "Decontamination: %s could NOT be checked (%s); the data card says so",
                name,
                str(err).split(".")[0],
            )
    sets["stdlib_docstrings"] = _stdlib_docstrings()
    return sets


class ContaminationIndex:
    """Word n-gram hashes of the evaluation sets; `overlap(text)` = share of the text's n-grams found there
    (a text shorter than n words counts as one n-gram of all its words)."""

    def __init__(self, hashes: np.ndarray, n: int, sets: dict[str, int]) -> None:
        self.hashes, self.n, self.sets = np.unique(hashes), n, sets
        self._table: dict[str, int] = {}

    @classmethod
    def build(cls, texts: dict[str, list[str]], n: int) -> ContaminationIndex:
        table: dict[str, int] = {}
        parts = [np.zeros(0, np.uint64)]
        for values in texts.values():
            for text in values:
                tokens = words(text)
                parts.append(ngram_hashes(tokens, min(n, len(tokens)), table) if tokens else parts[0])
        return cls(np.concatenate(parts), n, {name: len(values) for name, values in texts.items()})

    @classmethod
    def cached(cls, n: int) -> ContaminationIndex:
        """The index over `evaluation_texts()`, cached under the ppow_trl cache root per n-gram size
        and Python version (delete it to pick up an evaluation set installed later)."""
        key = sha([n, sys.version, "v1"])[:12]
        path = cache_root() / "decontamination" / f"index-{key}.npz"
        if path.is_file():
            stored = np.load(path, allow_pickle=False)
            sets = dict(zip(stored["names"].tolist(), stored["counts"].tolist()))
            return cls(stored["hashes"], n, sets)
        index = cls.build(evaluation_texts(), n)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(
            tmp,
            hashes=index.hashes,
            names=np.array(list(index.sets)),
            counts=np.array(list(index.sets.values())),
        )
        tmp.replace(path)
        return index

    def overlap(self, text: str) -> float:
        tokens = words(text)
        if not tokens:
            return 0.0
        grams = ngram_hashes(tokens, min(self.n, len(tokens)), self._table)
        # self.hashes is sorted and unique: a binary search per n-gram (np.isin would sort it on every call).
        at = np.searchsorted(self.hashes, grams).clip(max=len(self.hashes) - 1)
        return float((self.hashes[at] == grams).mean())


# ------------------------------------------------------------------------------------------------ driver
def filter_prompts(
    prompts: Sequence[dict[str, Any]],
    settings: FilterSettings,
    index: ContaminationIndex | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Apply the filters in order (malformed -> exact duplicate -> near duplicate -> contaminated).

    Each prompt is a dict with `text`, `ended` and optionally `task`; returns the kept prompts (input order)
    and a report: written, kept, a count per drop reason, the distinct share, a length histogram and the
    task mix before and after filtering.
    """
    drops: Counter[str] = Counter()
    survivors = []
    seen: set[str] = set()
    for prompt in prompts:
        reason = malformed_reason(prompt["text"], prompt.get("ended", True), settings)
        if reason is None:
            key = " ".join(words(prompt["text"]))
            if key in seen:
                reason = "exact_duplicate"
            seen.add(key)
        if reason:
            drops[reason] += 1
        else:
            survivors.append(prompt)
    texts = [p["text"] for p in survivors]
    if settings.near_duplicate_threshold < 1.0:
        duplicate_of = near_duplicates(texts, settings.near_duplicate_threshold)
    else:
        duplicate_of = [None] * len(texts)
    kept = []
    for prompt, earlier in zip(survivors, duplicate_of):
        if earlier is not None:
            drops["near_duplicate"] += 1
        elif index is not None and index.overlap(prompt["text"]) >= settings.decontamination_threshold:
            drops["contaminated"] += 1
        else:
            kept.append(prompt)
    distinct = len({" ".join(words(p["text"])) for p in prompts}) / len(prompts) if prompts else 0.0
    report = {
        "written": len(prompts),
        "kept": len(kept),
        "dropped": dict(sorted(drops.items())),
        "distinct_share": round(distinct, 4),
        "length_histogram_words": length_histogram(kept),
        "task_mix_written": dict(sorted(Counter(p.get("task", "-") for p in prompts).items())),
        "task_mix_kept": dict(sorted(Counter(p.get("task", "-") for p in kept).items())),
        "decontamination": None
        if index is None
        else {
            "ngram": index.n,
            "threshold": settings.decontamination_threshold,
            "reference_sets": index.sets,
        },
    }
    return kept, report


def length_histogram(
    prompts: Iterable[dict[str, Any]], edges: Sequence[int] = (0, 8, 16, 32, 64, 128, 256)
) -> dict[str, int]:
    counts = Counter()
    for prompt in prompts:
        length = len(words(prompt["text"]))
        bucket = max(i for i, edge in enumerate(edges) if length >= edge)
        label = (
            f"{edges[bucket]}+" if bucket == len(edges) - 1 else f"{edges[bucket]}-{edges[bucket + 1] - 1}"
        )
        counts[label] += 1
    return {label: counts[label] for label in sorted(counts, key=lambda s: int(s.split("-")[0].rstrip("+")))}
