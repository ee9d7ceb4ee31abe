"""The evaluation report shows the cost table "auto" priced windows with and the machine's load while it
timed; `remeasure_costs` measures the table again instead of reading the cached one."""

from __future__ import annotations

import json

from ppow_trl.decoding import cost as cost_module
from ppow_trl.evaluation import EvaluationConfig
from tests.test_evaluation import run_cli, saved_drafter, write_jsonl  # noqa: F401 (a fixture)


def test_report_records_the_cost_table_and_the_load_and_remeasures_on_request(
    saved_drafter,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.setenv("PPOW_TRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Write a short poem about the sea."}])
    argv = [
        "--drafter", saved_drafter, "--prompt_sets", prompts, "--max_new_tokens", "8", "--warmup_tokens", "0",
        "--progress", "false", "--plots", "false", "--teacher_forced_window", "0",
    ]  # fmt: skip
    report = run_cli([*argv, "--output_dir", str(tmp_path / "a")])
    table = report["cost_table"]
    assert table["source"] == "measured" and table["age_s"] >= 0 and table["load"]["threads"] >= 1
    assert 0 < table["draft_verify_ratio"] and report["results"][0]["cost_table"]["key"] == table["key"]
    load = report["machine_load"]
    assert set(load) == {"loaded", "max_load_average", "max_others_busy_cores"}
    assert report["results"][0]["machine_load"]["cores"] >= 1
    written = json.loads((tmp_path / "a" / "results.json").read_text())
    assert written["cost_table"]["key"] == table["key"] and "machine_load" in written
    markdown = (tmp_path / "a" / "results.md").read_text()
    assert "Cost table (measured" in markdown and "of a 1-token verification" in markdown
    assert "Machine load while timing" in markdown

    monkeypatch.setattr(cost_module, "_MEMORY", {})
    cached = run_cli([*argv, "--output_dir", str(tmp_path / "b")])["cost_table"]
    # read back when it was cached (measured on an idle enough machine), else measured again
    assert cached["source"] == ("measured" if table["problems"] else "cache")
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    again = run_cli([*argv, "--output_dir", str(tmp_path / "c"), "--remeasure_costs", "true"])["cost_table"]
    assert again["source"] == "measured" and again["measured_at"] >= table["measured_at"]
    assert EvaluationConfig(drafter=saved_drafter).remeasure_costs is False
