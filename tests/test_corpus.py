"""Corpus mode: chunking, budget, cache/resume, reserved-text guard, sources, and mixing into the train split."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import ppow_trl.data.corpus as corpus_module
from ppow_trl.data import DataConfig, build_corpus, build_training_data, open_corpus
from ppow_trl.data.draft_vocab import build_draft_vocab

PROMPTS = [
    "Write a short poem about the sea.",
    "What is 12 plus 30?",
    "def add(a, b):",
    "The quick brown fox",
    "Speculative decoding drafts tokens.",
    "Why is the sky blue?",
]


def make_config(tmp_path, **overrides) -> DataConfig:
    values = dict(
        dataset_name="mt_bench",
        corpus_name="pydoc_topics",
        corpus_max_tokens=1000,
        corpus_seq_len=64,
        shard_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    values.update(overrides)
    return DataConfig(**values)


def corpus_of(config: DataConfig, tokenizer, **kwargs):
    source = open_corpus(config.corpus_name, config.corpus_config, config.corpus_split)
    return build_corpus(source, tokenizer, config, progress=False, **kwargs)


def test_config_validation():
    with pytest.raises(ValueError, match="corpus_mix"):
        DataConfig(dataset_name="mt_bench", corpus_name="pydoc_topics", corpus_mix="interleave")
    with pytest.raises(ValueError, match="needs a corpus_name"):
        DataConfig(dataset_name="mt_bench", corpus_mix="corpus_only")
    with pytest.raises(ValueError, match="eval_fraction must be > 0"):
        DataConfig(
            dataset_name="mt_bench", corpus_name="pydoc_topics", corpus_mix="corpus_only", eval_fraction=0.0
        )
    with pytest.raises(ValueError, match="online features only"):
        DataConfig(dataset_name="mt_bench", corpus_name="pydoc_topics", feature_mode="offline")
    with pytest.raises(ValueError, match="corpus_seq_len"):
        DataConfig(dataset_name="mt_bench", corpus_name="pydoc_topics", corpus_seq_len=0)


def test_pydoc_topics_chunks_deterministically_within_budget(tiny_tokenizer, tmp_path):
    from pydoc_data.topics import topics

    config = make_config(tmp_path / "a")
    corpus = corpus_of(config, tiny_tokenizer, first_index=7)
    stream: list[int] = []
    for name in sorted(topics):  # the documented token stream: sorted topics, each followed by eos
        stream += tiny_tokenizer(topics[name], add_special_tokens=False)["input_ids"]
        stream.append(tiny_tokenizer.eos_token_id)
        if len(stream) >= config.corpus_max_tokens:
            break
    sequences = corpus.dataset["input_ids"]
    assert [len(s) for s in sequences] == [64] * 15 + [1000 - 15 * 64]  # budget respected exactly
    assert [t for s in sequences for t in s] == stream[: config.corpus_max_tokens]
    assert corpus.dataset["loss_mask"] == [[1] * len(s) for s in sequences]
    assert corpus.dataset["index"] == list(range(7, 7 + len(sequences)))
    assert corpus.dataset["prompt_id"][:2] == ["corpus/0", "corpus/1"] and set(corpus.dataset["split"]) == {
        "train"
    }
    assert set(corpus.dataset["num_turns"]) == {0}
    assert corpus.stats == {
        "source": "pydoc_topics",
        "sequences": 16,
        "tokens": 1000,
        "source_exhausted": False,
    }
    assert len(list(corpus.directory.glob("shard-*"))) == math.ceil(16 / config.shard_size)

    again = corpus_of(make_config(tmp_path / "b"), tiny_tokenizer, first_index=7)
    assert again.fingerprint == corpus.fingerprint and again.dataset["input_ids"] == sequences
    smaller = corpus_of(make_config(tmp_path / "b", corpus_max_tokens=200), tiny_tokenizer)
    assert smaller.fingerprint != corpus.fingerprint and smaller.stats["tokens"] == 200


def test_cache_hit_and_resume_after_interruption(tiny_tokenizer, tmp_path, monkeypatch):
    reference = corpus_of(make_config(tmp_path / "a"), tiny_tokenizer)
    config = make_config(tmp_path / "b")
    write_shard, written = corpus_module.write_token_shard, []

    def crash_after_two(path, *args):
        write_shard(path, *args)
        written.append(path.name)
        if len(written) == 2:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(corpus_module, "write_token_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        corpus_of(config, tiny_tokenizer)
    directory = config.cache_path / "corpus" / reference.fingerprint
    assert sorted(p.name for p in directory.glob("shard-*")) == written

    starts = []
    sequences = corpus_module._sequences

    def spy(source, tokenizer, start, *args):
        starts.append(start)
        return sequences(source, tokenizer, start, *args)

    monkeypatch.setattr(corpus_module, "_sequences", spy)
    resumed = corpus_of(config, tiny_tokenizer)
    assert written == [f"shard-0000{i}-of-00004.parquet" for i in range(4)]  # only the missing two
    assert len(starts) == 1 and starts[0] != (0, 0)  # continued from the second shard's stream position
    assert resumed.dataset["input_ids"] == reference.dataset["input_ids"]
    assert resumed.dataset["prompt_id"] == reference.dataset["prompt_id"]

    def no_chunking(*args, **kwargs):
        raise AssertionError("a complete cache must not be re-chunked")

    monkeypatch.setattr(corpus_module, "_sequences", no_chunking)
    cached = corpus_of(config, tiny_tokenizer)
    assert cached.dataset["input_ids"] == reference.dataset["input_ids"]
    manifest = directory / "manifest.json"
    stored = json.loads(manifest.read_text())
    stored["inputs"]["seq_len"] = 99
    manifest.write_text(json.dumps(stored))
    with pytest.raises(RuntimeError, match="does not match"):
        corpus_of(config, tiny_tokenizer)


def test_local_text_and_jsonl_files(tiny_tokenizer, tmp_path, monkeypatch):
    text = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog.\n\n" for i in range(30))
    plain = tmp_path / "notes.txt"
    plain.write_text(text)
    monkeypatch.setattr(corpus_module, "TEXT_BLOCK_CHARS", 200)  # several blocks, joined without eos
    assert len(list(corpus_module._text_blocks(plain))) > 5
    corpus = corpus_of(make_config(tmp_path, corpus_name=str(plain), corpus_max_tokens=10**6), tiny_tokenizer)
    ids = [t for s in corpus.dataset["input_ids"] for t in s]
    assert tiny_tokenizer.decode(ids) == text and corpus.stats["source_exhausted"]
    assert corpus.stats["tokens"] == len(ids) and all(len(s) == 64 for s in corpus.dataset["input_ids"][:-1])

    rows = tmp_path / "docs.jsonl"
    rows.write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["Hello sea.", "", "Bye."]))
    )
    corpus = corpus_of(make_config(tmp_path, corpus_name=str(rows)), tiny_tokenizer)
    ids = [t for s in corpus.dataset["input_ids"] for t in s]
    assert tiny_tokenizer.decode(ids) == "Hello sea.<|im_end|>Bye.<|im_end|>"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="needs a 'text' column, found \\['content'\\]"):
        corpus_of(make_config(tmp_path, corpus_name=str(bad)), tiny_tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="yielded no text"):
        corpus_of(make_config(tmp_path, corpus_name=str(empty)), tiny_tokenizer)
    with pytest.raises(FileNotFoundError):
        open_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="Unknown corpus 'wikipedia'"):
        open_corpus("wikipedia")


def test_reserved_evaluation_text_is_refused(tiny_tokenizer, tiny_target, tmp_path, monkeypatch):
    import ast

    for name in ("humaneval", "mt_bench", "gsm8k", "openai/gsm8k", "openai/openai_humaneval"):
        with pytest.raises(ValueError, match="reserved evaluation text"):
            open_corpus(name)
    copy = tmp_path / "MT-Bench questions.jsonl"
    copy.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="looks like MT-Bench"):
        open_corpus(str(copy))
    with pytest.raises(ValueError, match="standard library.*reserved for evaluation"):
        open_corpus(ast.__file__)

    def no_generate(*args, **kwargs):
        raise AssertionError("nothing may be regenerated for a refused corpus")

    monkeypatch.setattr(tiny_target, "generate", no_generate)
    config = make_config(tmp_path, corpus_name="HumanEval.jsonl.gz")
    with pytest.raises(ValueError, match="looks like HumanEval"):
        build_training_data(config, tiny_target, tiny_tokenizer, progress=False)


def test_offline_hub_corpus_errors_clearly():
    with pytest.raises(
        RuntimeError, match="Hub corpus 'someorg/some-corpus'.*needs network access.*pydoc_topics"
    ):
        open_corpus("someorg/some-corpus")


def test_mixing_into_the_train_split(tiny_tokenizer, tiny_target, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(PROMPTS)))
    base = make_config(
        tmp_path,
        dataset_name=str(prompts),
        eval_fraction=0.3,
        max_new_tokens=8,
        regen_batch_size=3,
        draft_vocab_size=16,
        corpus_max_tokens=300,
    )
    plain = build_training_data(replace(base, corpus_name=None), tiny_target, tiny_tokenizer, progress=False)
    append = build_training_data(base, tiny_target, tiny_tokenizer, progress=False)
    only = build_training_data(
        replace(base, corpus_mix="corpus_only"), tiny_target, tiny_tokenizer, progress=False
    )

    regenerated = len(plain.train)
    assert regenerated >= 1 and len(plain.eval) >= 1
    # append: every regenerated train sequence, then every corpus sequence; eval untouched
    assert append.train["input_ids"][:regenerated] == plain.train["input_ids"]
    corpus_rows = append.train.select(range(regenerated, len(append.train)))
    assert set(corpus_rows["num_turns"]) == {0} and len(corpus_rows) == math.ceil(300 / 64)
    assert sum(map(len, corpus_rows["input_ids"])) == 300
    assert append.report["train_positions"] == plain.report["train_positions"] + 300
    assert append.report["corpus"]["tokens"] == 300 and plain.report["corpus"] is None
    first = len(plain.regeneration.dataset)  # indices stay unique over regenerated + corpus rows
    assert corpus_rows["index"] == list(range(first, first + len(corpus_rows)))
    # corpus_only: the corpus sequences alone; only the eval prompts were regenerated; same eval split
    assert only.train["input_ids"] == corpus_rows["input_ids"]
    assert sorted(only.regeneration.dataset["prompt_id"]) == sorted(plain.eval["prompt_id"])
    for data in (append, only):
        assert data.eval["input_ids"] == plain.eval["input_ids"] and set(data.eval["split"]) == {"eval"}
    # the draft vocabulary counts the whole train split, corpus tokens included
    for data in (plain, append, only):
        expected = build_draft_vocab(
            draft_vocab_size=16,
            vocab_size=len(tiny_tokenizer),
            sequences=data.train["input_ids"],
            loss_masks=data.train["loss_mask"],
        )
        assert torch.equal(data.draft_vocab.t2d, expected.t2d)
    assert len({plain.directory, append.directory, only.directory}) == 3
