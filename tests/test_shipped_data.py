"""The dataset directory the repository ships (data/smollm2-135m-self-generated): `datasets` reads it as its
card says, its counts match the card, it stays small, and a fresh clone trains from it without the target
writing or answering anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_dataset

from ppow_trl.data import DataConfig, build_training_data
from ppow_trl.data.card import data_files

DATA = Path(__file__).resolve().parents[1] / "data" / "smollm2-135m-self-generated"


def test_the_shipped_dataset_is_what_its_card_says():
    card = json.loads((DATA / "ppow_data.json").read_text())
    report = card["report"]
    rows = load_dataset("parquet", data_files=str(DATA / data_files(report)), split="train")
    assert len(rows) == report["num_sequences"] > 500
    assert sum(sum(mask) for mask in rows["loss_mask"]) == report["assistant_tokens"]
    assert set(rows["task"]) == set(report["task_mix"])
    readme = (DATA / "README.md").read_text()
    assert card["license"] == "apache-2.0" and readme.startswith("---\nlicense: apache-2.0\n")
    checked = report["prompt_filters"]["decontamination"]["reference_sets"]
    assert {"mt_bench", "humaneval", "stdlib_docstrings"} <= set(checked)
    assert ("gsm8k" in checked) != ("NOT checked" in readme)  # a set that could not be read is named
    shipped = [p for p in DATA.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in shipped) < 15 * 2**20
    assert not [p for p in shipped if p.name.startswith(".") or "features-" in str(p)]


@pytest.mark.integration
def test_a_fresh_clone_trains_from_it_without_regenerating(monkeypatch):
    from ppow_trl.target import load_target

    target, tokenizer = load_target("embedded")

    def no_forward(*args, **kwargs):
        raise AssertionError("the target ran: the shipped dataset should need no regeneration")

    monkeypatch.setattr(target, "forward", no_forward)
    data = build_training_data(DataConfig(dataset_name=str(DATA), draft_vocab_size=8192), target, tokenizer)
    report = json.loads((DATA / "ppow_data.json").read_text())["report"]
    assert (len(data.train), len(data.eval)) == (report["num_train"], report["num_eval"])
    assert data.draft_vocab.draft_vocab_size == 8192
