"""The evaluation runner and its report: every field, valid plots, prompt sets, clear errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ppow_trl.decoding.tree import TreeSizer
from ppow_trl.evaluation import PLOT_FILES, EvaluationConfig, evaluate, load_prompt_set
from ppow_trl.models import DrafterTargetMismatchError
from ppow_trl.target import load_target
from tests.test_drafting import make_drafter

RESULT_FIELDS = {
    "prompt_set", "temperature", "method", "drafting", "window_size", "num_prompts", "num_generations",
    "generated_tokens", "verify_forwards", "tau", "tau_windows", "mean_accepted_length", "alpha",
    "accepted_length_histogram", "num_rounds", "plain_tokens", "plain_seconds", "speculative_seconds",
    "drafter_seconds", "plain_tokens_per_s", "speculative_tokens_per_s", "speedup", "greedy_matches",
    "greedy_total", "mismatched_ids", "baselines", "generations", "settings", "hardware", "mean_window",
    "num_draft_tokens", "teacher_forced_tau", "teacher_forced_window", "teacher_forced_windows",
    "teacher_forced_tree_tau", "teacher_forced_tree_width", "teacher_forced_tree_window",
}  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved_drafter(tiny_target_dir, tmp_path_factory) -> str:
    """A random EAGLE-3 drafter built for the tiny target loaded from its directory, saved to disk."""
    target, _ = load_target(tiny_target_dir)
    drafter = make_drafter("eagle3", target)
    path = tmp_path_factory.mktemp("drafter")
    drafter.save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run_cli(argv: list[str]) -> dict:
    script = Path(__file__).resolve().parents[1] / "recipes" / "evaluate_drafter.py"
    spec = importlib.util.spec_from_file_location("evaluate_drafter", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_evaluation_report_has_every_field_and_valid_plots(saved_drafter, tmp_path):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"id": "two-turns", "messages": [{"role": "user", "content": "Write a short poem about the sea."},
                                             {"role": "user", "content": "Now make it about the wind."}]},
            {"id": "one-turn", "messages": [{"role": "user", "content": "def add(a, b):"}]},
        ],
    )  # fmt: skip
    out = tmp_path / "eval"
    report = run_cli(
        [
            "--drafter", saved_drafter, "--prompt_sets", prompts, "--max_new_tokens", "8",
            "--num_draft_tokens", "3", "--temperatures", "0", "1", "--baselines", "plain", "prompt_lookup",
            "--prompt_lookup_num_tokens", "1", "3", "--output_dir", str(out), "--progress", "false", "--warmup_tokens", "2",
        ]
    )  # fmt: skip
    stored = json.loads((out / "results.json").read_text())
    assert stored["results"] and len(stored["results"]) == 2  # one per (prompt set, temperature)
    assert stored["target"] == report["target"]  # the drafter config's target (the tiny model's directory)
    assert {"cpu", "cpu_cores"} <= set(stored["hardware"]) and stored["versions"]["torch"]
    assert {"torch", "transformers", "trl", "ppow-trl"} <= set(stored["versions"])
    assert stored["settings"]["num_draft_tokens"] == 3 and stored["settings"]["temperatures"] == [0.0, 1.0]
    for result in stored["results"]:
        assert RESULT_FIELDS <= set(result), RESULT_FIELDS - set(result)
        assert result["prompt_set"] == "prompts" and result["num_prompts"] == 2
        assert result["num_generations"] == 3  # both turns of the first conversation
        assert len(result["alpha"]) == 3 and len(result["accepted_length_histogram"]) == 4
        assert result["generated_tokens"] == sum(g["speculative_tokens"] for g in result["generations"])
        assert result["tau"] == pytest.approx(result["generated_tokens"] / result["verify_forwards"])
        assert result["speedup"] > 0 and result["plain_tokens_per_s"] > 0
        assert set(result["baselines"]) == {"plain", "prompt_lookup"}
        lookup = result["baselines"]["prompt_lookup"]  # the best of K = 1 and 3 on the set, both recorded
        assert set(lookup["speedup_by_num_tokens"]) == {"1", "3"}
        assert lookup["speedup"] == max(lookup["speedup_by_num_tokens"].values())
        assert lookup["speedup_by_num_tokens"][str(lookup["num_tokens"])] == lookup["speedup"]
        assert result["speedup_over_prompt_lookup"] == pytest.approx(result["speedup"] / lookup["speedup"])
        assert result["settings"]["temperature"] == result["temperature"]
        first, second = [g for g in result["generations"] if g["id"] == "two-turns"]
        assert second["turn"] == 2 and second["prompt_tokens"] > first["prompt_tokens"] + 5
    greedy, sampled = stored["results"]
    assert greedy["greedy_matches"] == greedy["greedy_total"] == 3 and greedy["mismatched_ids"] == []
    assert sampled["greedy_matches"] is None
    # teacher-forced tau over the target's own greedy answers: one window drafting each answer token first
    assert greedy["teacher_forced_windows"] == sum(g["plain_tokens"] for g in greedy["generations"]) > 0
    assert 1.0 <= greedy["teacher_forced_tau"] <= 1.0 + greedy["teacher_forced_window"] == 6.0
    assert sampled["teacher_forced_tau"] is None and sampled["teacher_forced_windows"] == 0
    # The tree (top-4 at each of 10 depths) over the same windows contains the chain (top-1, 5 depths).
    assert (greedy["teacher_forced_tree_width"], greedy["teacher_forced_tree_window"]) == (4, 10)
    assert greedy["teacher_forced_tau"] <= greedy["teacher_forced_tree_tau"] <= 11.0
    assert sampled["teacher_forced_tree_tau"] is None
    table = (out / "results.md").read_text()
    assert "| prompt set | T | method |" in table and "prompt_lookup" in table and "3/3" in table
    assert "teacher-forced tau (K=5)" in table and f"| {greedy['teacher_forced_tau']:.3f} |" in table
    assert "teacher-forced tree tau (w=4, K=10)" in table
    assert "prompt_lookup, best K=" in table and "Against prompt lookup at its best K" in table
    assert f"| {greedy['teacher_forced_tree_tau']:.3f} |" in table

    import matplotlib.image

    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_split_prompt_set(tmp_path):
    source = write_jsonl(
        tmp_path / "all.jsonl", [{"id": f"p{i}", "prompt": f"Question {i}?"} for i in range(5)]
    )
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"settings": {"source": source}, "train_ids": ["p0", "p1", "p3"],
                                 "eval_ids": ["p2", "p4"]}))  # fmt: skip
    name, examples = load_prompt_set(f"split:{split}", max_prompts=None, max_turns=None)
    assert name == "split:all.jsonl" and [e.id for e in examples] == ["p2", "p4"]
    assert [e.id for e in load_prompt_set(f"split:{split}", 1, None)[1]] == ["p2"]
    with pytest.raises(FileNotFoundError, match="split file"):
        load_prompt_set(f"split:{tmp_path / 'missing.json'}", None, None)


def test_bad_configuration_and_inputs(saved_drafter, tiny_target_dir, tmp_path):
    with pytest.raises(ValueError, match="num_draft_tokens"):
        EvaluationConfig(drafter=saved_drafter, num_draft_tokens=0)
    with pytest.raises(ValueError, match="baselines"):
        EvaluationConfig(drafter=saved_drafter, baselines=["medusa"])
    with pytest.raises(ValueError, match="method"):
        EvaluationConfig(drafter=saved_drafter, method="tree")
    with pytest.raises(ValueError, match="temperatures"):
        EvaluationConfig(drafter=saved_drafter, temperatures=[-1.0])
    with pytest.raises(ValueError, match="teacher_forced_tree_width"):
        EvaluationConfig(drafter=saved_drafter, teacher_forced_tree_width=0)
    with pytest.raises(ValueError, match="teacher_forced_tree_window"):
        EvaluationConfig(drafter=saved_drafter, teacher_forced_tree_window=-1)

    target, tokenizer = load_target(tiny_target_dir)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello there"}])
    config = EvaluationConfig(
        drafter=saved_drafter, prompt_sets=[prompts], max_new_tokens=4, output_dir=str(tmp_path / "o"),
        progress=False, warmup_tokens=0,
    )  # fmt: skip
    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    ).eval()  # fmt: skip
    with pytest.raises(DrafterTargetMismatchError, match="vocab_size"):
        evaluate(config, target=other, tokenizer=tokenizer)

    long_text = " ".join(["speculative decoding drafts tokens"] * 200)  # far beyond the 512-token context
    config.prompt_sets = [write_jsonl(tmp_path / "long.jsonl", [{"id": "long", "prompt": long_text}])]
    with pytest.raises(ValueError, match="context"):
        evaluate(config, target=target, tokenizer=tokenizer)


def test_evaluation_with_the_batched_loop(saved_drafter, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Write a short poem about the sea."}])
    config = EvaluationConfig(
        drafter=saved_drafter, prompt_sets=[prompts], max_new_tokens=6, num_draft_tokens=2, method="loop",
        baselines=[], output_dir=str(tmp_path / "o"), progress=False, warmup_tokens=0, plots=False,
    )  # fmt: skip
    report = evaluate(config)
    (result,) = report["results"]
    assert result["method"] == "Eagle3Drafter (loop)" and result["baselines"] == {}
    assert result["greedy_matches"] == result["greedy_total"] == 1
    assert (tmp_path / "o" / "results.json").is_file() and not (tmp_path / "o" / PLOT_FILES[0]).exists()
    # unset: generate's greedy round (a tree with a lookup branch)
    assert result["drafting"] == "dynamic tree of width 4 + prompt-lookup branch of up to 4 tokens"
    # a draft tree: reported as one, output still plain greedy's; it needs greedy decoding off the assisted path
    config.draft_tree_width, config.prompt_lookup_tokens, config.output_dir = 3, 0, str(tmp_path / "tree")
    (tree,) = evaluate(config)["results"]
    assert tree["drafting"] == "dynamic tree of width 3"
    assert tree["greedy_matches"] == tree["greedy_total"] == 1
    assert "dynamic tree of width 3 drafting" in (tmp_path / "tree" / "results.md").read_text()
    with pytest.raises(ValueError, match="method: loop or auto"):
        EvaluationConfig(drafter=saved_drafter, draft_tree_width=2, method="assisted")
    with pytest.raises(ValueError, match="temperatures"):
        EvaluationConfig(drafter=saved_drafter, draft_tree_width=2, temperatures=[0.0, 1.0])
    # a lookup branch in the tree: output still plain greedy's; refused off the loop and at T > 0
    config.prompt_lookup_tokens, config.output_dir = 4, str(tmp_path / "lookup")
    (branch,) = evaluate(config)["results"]
    assert branch["greedy_matches"] == branch["greedy_total"] == 1
    with pytest.raises(ValueError, match="prompt_lookup_tokens"):
        EvaluationConfig(drafter=saved_drafter, prompt_lookup_tokens=2, method="assisted")
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        EvaluationConfig(drafter=saved_drafter, prompt_lookup_num_tokens=[0])


def test_evaluation_with_auto_draft_length(saved_drafter, tmp_path):
    """The default: each round picks its own window (possibly a plain step; a tree of at most the sizer's node
    count), reported with its mean, the per-position columns sized by the longest verified window, and output
    identical to plain greedy."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Write a short poem about the sea."}])
    config = EvaluationConfig(
        drafter=saved_drafter, prompt_sets=[prompts], max_new_tokens=12, baselines=["prompt_lookup"],
        output_dir=str(tmp_path / "o"), progress=False, warmup_tokens=0, plots=False,
    )  # fmt: skip
    assert config.num_draft_tokens == "auto"
    (result,) = evaluate(config)["results"]
    assert result["settings"]["num_draft_tokens"] == "auto"
    assert 0 <= result["mean_window"] <= TreeSizer.max_nodes
    assert len(result["alpha"]) == result["window_size"] >= 1
    assert result["greedy_matches"] == result["greedy_total"] == 1
    table = (tmp_path / "o" / "results.md").read_text()
    assert "K=auto" in table and "| mean window |" in table
    assert EvaluationConfig(drafter=saved_drafter, num_draft_tokens="4").num_draft_tokens == 4
    with pytest.raises(ValueError, match="num_draft_tokens"):
        EvaluationConfig(drafter=saved_drafter, num_draft_tokens="many")
