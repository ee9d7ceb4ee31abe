"""The PPOW-vs-CST comparison harness (benchmarks/ppow_training.py): its arms file parses with the recipes'
own parsers (every override a real flag), the CST control trains on the PPOW stage's data, and the summary's
paired differences (to the warm start and to the control arm of the same seed) come out right."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml

from ppow_trl.metrics import paired_tau_difference
from ppow_trl.training import DrafterSFTConfig
from ppow_trl.training.parser import RecipeParser
from ppow_trl.training.ppow import PPOWConfig
from ppow_trl.training.script_args import DataArguments, DrafterModelArguments

ROOT = Path(__file__).resolve().parents[1]
ARMS = ROOT / "benchmarks" / "configs" / "compare_objectives.yaml"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("ppow_training", ROOT / "benchmarks" / "ppow_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in ("eagle_ppow", "sft_drafter"):
        sys.modules.pop(name, None)


def test_arms_parse_and_cst_uses_the_ppow_stage_data(harness):
    arms = harness.parse_arms(Namespace(arms=str(ARMS), run=None))
    assert [a["kind"] for a in arms].count("cst") == 2 and len(arms) == 10
    parsed = {}
    for arm in arms:
        config = arm.get("ppow_config" if arm["kind"] == "ppow" else "sft_config") or str(
            ROOT / "recipes/configs/smollm2-135m/ppow_eagle3.yaml"
        )
        args_class = PPOWConfig if arm["kind"] == "ppow" else DrafterSFTConfig
        parsed[arm["name"]] = RecipeParser(
            (DrafterModelArguments, DataArguments, args_class)
        ).parse_args_and_config(["--config", str(ROOT / config), *arm["overrides"]])
    assert parsed["ppow_no_proximity"][2].reward_funcs == ["cost_aware_speedup"]
    assert parsed["ppow_uniform_anchors"][2].use_adaw is False
    assert parsed["kl_only"][2].reward_weights == [0.0, 0.0]
    assert parsed["ppow_equal_wall_time"][2].max_steps == 66
    assert parsed["ppow_sampling"][2].acceptance_mode == "sampling"
    assert parsed["ppow_lr1e-4"][2].learning_rate == parsed["cst_lr1e-4"][2].learning_rate == 1e-4
    assert parsed["ppow"][2].proximity_eps_quantile == 0.25 and "proximity" in parsed["ppow"][2].reward_funcs
    (_, ppow_data, ppow_args), (cst_model, cst_data, cst_args) = parsed["ppow"], parsed["cst"]
    for name in ("dataset_name", "self_generated_prompts", "max_turns", "max_new_tokens", "eval_fraction"):
        assert getattr(cst_data, name) == getattr(ppow_data, name), name
    assert (cst_args.seed, cst_args.learning_rate, cst_args.max_steps) == (
        ppow_args.seed, ppow_args.learning_rate, ppow_args.max_steps,
    )  # fmt: skip
    assert cst_model.drafter_name_or_path == "drafters/smollm2-135m-eagle3"
    with pytest.raises(ValueError, match="kind"):
        harness.parse_arms(Namespace(arms=None, run=["sft x: --learning_rate 1"]))
    assert harness.parse_arms(Namespace(arms=None, run=["ppow lr1e-4: --learning_rate 1e-4"]))[0][
        "overrides"
    ] == (shlex.split("--learning_rate 1e-4"))


def test_medusa_arms_train_one_warm_start_on_the_same_data_at_its_heads(harness):
    arms = harness.parse_arms(Namespace(arms=str(ARMS.with_name("compare_objectives_medusa.yaml")), run=None))
    configs = {
        a["kind"]: ROOT / (a.get("sft_config") or "recipes/configs/smollm2-135m/ppow_medusa.yaml")
        for a in arms
    }
    parser = RecipeParser((DrafterModelArguments, DataArguments, DrafterSFTConfig))
    cst_model, cst_data, cst_args = parser.parse_args_and_config(["--config", str(configs["cst"])])
    ppow_model, ppow_data, ppow_args = RecipeParser(
        (DrafterModelArguments, DataArguments, PPOWConfig), hidden=PPOWConfig.is_ignored_grpo_field
    ).parse_args_and_config(["--config", str(configs["ppow"])])
    warm = parser.parse_args_and_config(
        ["--config", str(ROOT / "recipes/configs/smollm2-135m/sft_medusa.yaml")]
    )
    assert warm[2].drafter_type == cst_args.drafter_type == "medusa"
    assert cst_model.drafter_name_or_path == ppow_model.drafter_name_or_path == warm[2].output_dir
    assert ppow_args.window_size == cst_args.eval_window_size == warm[2].medusa_num_heads
    assert warm[1].seed == 0 and cst_args.seed == ppow_args.seed != 0  # the arms train on fresh prompts
    for name in ("dataset_name", "self_generated_prompts", "max_new_tokens", "eval_fraction"):
        assert getattr(cst_data, name) == getattr(ppow_data, name), name


def test_summary_pairs_each_arm_with_the_warm_start_and_the_control_of_its_seed(harness):
    rows = [0, 0, 1, 1, 2, 2]
    warm = {"5:x": {"k": [0, 1, 0, 1, 0, 1], "rows": rows}}
    runs = {
        "cst@0": {"arm": "cst", "kind": "cst", "seed": 0, "k": [1, 1, 0, 1, 0, 1], "eval_set": "5:x", "wall_s": 10.0,
                  "overrides": []},
        "cst@1": {"arm": "cst", "kind": "cst", "seed": 1, "k": [0, 1, 1, 1, 0, 1], "eval_set": "5:x", "wall_s": 12.0,
                  "overrides": []},
        "ppow@0": {"arm": "ppow", "kind": "ppow", "seed": 0, "k": [2, 1, 1, 1, 0, 2], "eval_set": "5:x",
                   "wall_s": 40.0, "overrides": ["--x", "1"]},
        "ppow@1": {"arm": "ppow", "kind": "ppow", "seed": 1, "k": [1, 2, 1, 1, 1, 1], "eval_set": "5:x",
                   "wall_s": 44.0, "overrides": ["--x", "1"]},
    }  # fmt: skip
    scored = {n: (r["k"], warm["5:x"]["k"], rows) for n, r in runs.items()}
    summary = {row["arm"]: row for row in harness.summarise(runs, scored, "cst")}
    ppow, cst = summary["ppow"], summary["cst"]
    assert ppow["tau"] == pytest.approx(1 + (7 / 6 + 7 / 6) / 2) and ppow["spread"] == pytest.approx(0.0)
    assert ppow["train_s"] == 42.0 and ppow["seeds"] == [0, 1] and cst["vs_control"] is None
    per_seed = [
        paired_tau_difference(torch.tensor(runs[f"ppow@{s}"]["k"]), torch.tensor(runs[f"cst@{s}"]["k"]),
                              torch.tensor(rows))
        for s in (0, 1)
    ]  # fmt: skip
    delta, se = ppow["vs_control"]
    assert delta == pytest.approx((per_seed[0][0] + per_seed[1][0]) / 2) and delta > 0
    assert se == pytest.approx((per_seed[0][1] ** 2 + per_seed[1][1] ** 2) ** 0.5 / 2)
    assert cst["vs_warm_start"][0] == pytest.approx((1 / 6 + 1 / 6) / 2)
    assert yaml.safe_load(ARMS.read_text())["arms"][0]["name"] == "cst"


def test_scores_share_windows_across_drafters_and_resume(
    harness, tiny_target, tiny_target_dir, tmp_path, monkeypatch
):
    from datasets import Dataset

    from tests.test_drafting import make_drafter

    monkeypatch.setenv("PPOW_TRL_CACHE", str(tmp_path / "cache"))
    for name, seed in (("warm", 0), ("same", 0), ("other", 1)):
        make_drafter("eagle3", tiny_target, seed=seed).save_pretrained(tmp_path / name)
    generator = torch.Generator().manual_seed(0)
    ids = [
        torch.randint(3, tiny_target.config.vocab_size, (n,), generator=generator).tolist() for n in (12, 9)
    ]
    masks = [[0] * 4 + [1] * (len(row) - 4) for row in ids]  # a 4-token prompt, then the answer
    held_out = Dataset.from_dict({"input_ids": ids, "loss_mask": masks, "index": [0, 1]})
    held_out.save_to_disk(str(tmp_path / "held_out"))
    run = {
        "arm": "cst", "kind": "cst", "seed": 1, "wall_s": 1.0, "overrides": [], "steps": 2, "train_s": 1.0,
        "held_out": str(tmp_path / "held_out"), "seconds_at_step": {"1": 0.5, "2": 1.0},
        "snapshots": {"1": str(tmp_path / "other")},
    }  # fmt: skip
    results = {"cst@1": {**run, "output_dir": str(tmp_path / "same")}}
    cli = Namespace(
        target=tiny_target_dir, warm_start=str(tmp_path / "warm"), transfer_prompts=2, window=3,
        tree_width=4, tree_window=5, temperatures=[0.5, 2.0], anchor_stride=1,
    )  # fmt: skip
    stored = harness.score(cli, results, {})
    sets = {"held-out", "mt_bench@T0", "humaneval@T0"}
    trees = {f"{s} tree w=4 K=5" for s in sets}
    assert set(stored) == sets | trees | {"mt_bench@T1", "humaneval@T1"}
    for set_name, entry in stored.items():
        k, warm = entry["k"]["cst@1"], entry["k"]["warm_start"]
        assert len(k) == len(warm) == len(entry["rows"]) > 0
        assert k == warm  # the same weights score the same windows identically
        assert all(0 <= x <= (5 if set_name in trees else 3) for x in k)
        # snapshots are scored on the held-out split only; the temperature control on sampled sets only
        assert ("cst@1@step-1" in entry["k"]) == set_name.startswith("held-out")
        assert ("warm_start@T0.5" in entry["k"]) == set_name.endswith("T1")
        if set_name in trees:  # a tree keeps at least the chain's depths
            chain = stored[set_name.split(" tree")[0]]["k"]["cst@1"]
            assert all(t >= c for t, c in zip(k, chain))
        if set_name.endswith("T1"):  # expected k under sampling: fractional, and the temperature changes it
            assert not all(float(x).is_integer() for x in k)
            assert entry["k"]["warm_start@T0.5"] != warm != entry["k"]["warm_start@T2"]
        else:
            assert all(float(x).is_integer() for x in k)
    assert set(stored["mt_bench@T0"]["rows"]) == {0, 1}
    # A new run is scored on the same windows; scores already stored are kept as they are.
    before = {s: list(e["k"]["cst@1"]) for s, e in stored.items()}
    results["ppow@1"] = {**run, "arm": "ppow", "kind": "ppow", "output_dir": str(tmp_path / "other")}
    stored = harness.score(cli, results, stored)
    for set_name, entry in stored.items():
        assert entry["k"]["cst@1"] == before[set_name]
        assert len(entry["k"]["ppow@1"]) == len(entry["rows"])
        if set_name.endswith("T1"):  # other weights (greedy k of random drafters is all 0 on both)
            assert entry["k"]["ppow@1"] != before[set_name]
    assert stored["held-out"]["k"]["ppow@1@step-1"] == stored["held-out"]["k"]["ppow@1"]  # same weights
    reference = harness.fitted_temperature(stored, "mt_bench@T1")
    humaneval = stored["humaneval@T1"]["k"]
    assert reference == max(("warm_start@T0.5", "warm_start@T2"), key=lambda n: sum(humaneval[n]))
    summary = harness.report(results, stored, "cst")
    assert {row["arm"]: row["vs_warm_start"][0] for row in summary["mt_bench@T1"]}["cst"] == 0.0
    assert "vs_fitted_temperature" in summary["mt_bench@T1"][0]
    curve = harness.curves(results, stored["held-out"])["cst@1"]
    assert [(sec, step) for sec, step, _ in curve] == [(0.0, 0), (0.5, 1), (1.0, 2)]


def test_argmax_arms_parse_and_share_the_shipped_dataset(harness):
    arms = harness.parse_arms(Namespace(arms=str(ARMS.with_name("argmax_objectives.yaml")), run=None))
    parsed = {}
    for arm in arms:
        ppow = arm["kind"] == "ppow"
        config = arm.get("sft_config") or "recipes/configs/smollm2-135m/ppow_eagle3.yaml"
        parser = RecipeParser(
            (DrafterModelArguments, DataArguments, PPOWConfig if ppow else DrafterSFTConfig),
            hidden=PPOWConfig.is_ignored_grpo_field if ppow else None,
        )
        parsed[arm["name"]] = parser.parse_args_and_config(
            ["--config", str(ROOT / config), *arm["overrides"]]
        )
    assert {p[1].dataset_name for p in parsed.values()} == {"data/smollm2-135m-self-generated"}
    aimed = parsed["ppow_argmax"][2]
    assert (aimed.baseline, aimed.scale_rewards, aimed.proximity_span, aimed.adaw_top_w) == (
        "greedy", "none", "first_token", 4,
    )  # fmt: skip
    assert (
        aimed.per_device_train_batch_size // aimed.num_generations == 8 and aimed.anchors_per_sequence == 32
    )
    cst = parsed["cst"][2]
    assert (aimed.adam_beta2, aimed.max_grad_norm) == (cst.adam_beta2, cst.max_grad_norm)
    assert parsed["acceptance"][2].loss == "acceptance"
    assert parsed["cst_plus_window"][2].window_loss_weight == 1.0
    assert {p[2].learning_rate for p in parsed.values()} == {1e-4}


def test_training_budget_stops_on_training_cpu_time_and_saves_snapshots(
    harness, monkeypatch, tmp_path, tiny_target
):
    from tests.test_drafting import make_drafter

    now = [0.0]
    monkeypatch.setattr(harness.time, "process_time", lambda: now[0])
    drafter = make_drafter("eagle3", tiny_target)
    save = drafter.save_pretrained

    def slow_save(path):  # saving costs 3 CPU seconds, which the budget does not count
        now[0] += 3.0
        save(path)

    drafter.save_pretrained = slow_save

    budget = harness.TrainingBudget(seconds=10.0, snapshot_every=4.0, directory=tmp_path)
    state, control = Namespace(global_step=0), Namespace(should_training_stop=False)
    budget.on_train_begin(None, state, control)
    while not control.should_training_stop:
        now[0] += 1.0  # one CPU second per step
        state.global_step += 1
        budget.on_step_end(None, state, control, model=drafter)
    assert state.global_step == 10 and now[0] == 16.0
    assert budget.seconds_at_step["10"] == 10.0 and set(budget.snapshots) == {"4", "8"}
    assert all((Path(p) / "config.json").is_file() for p in budget.snapshots.values())
    by_steps = harness.TrainingBudget(seconds=None, snapshot_every=3, directory=tmp_path / "s")
    by_steps.on_train_begin(None, state, control)
    control.should_training_stop = False
    for step in range(1, 8):
        state.global_step = step
        by_steps.on_step_end(None, state, control, model=drafter)
    assert set(by_steps.snapshots) == {"3", "6"} and not control.should_training_stop


def test_a_diverging_run_stops_and_a_failing_run_leaves_the_others_running(harness, monkeypatch, tmp_path):
    budget = harness.TrainingBudget(seconds=None, snapshot_every=None, directory=tmp_path)
    state, control = Namespace(global_step=3), Namespace(should_training_stop=False)
    budget.on_train_begin(None, state, control)
    budget.on_log(None, state, control, logs={"loss": 0.5})
    assert not control.should_training_stop and budget.diverged_at is None
    budget.on_log(None, state, control, logs={"loss": float("nan")})
    assert control.should_training_stop and budget.diverged_at == 3

    # A run that dies (an out-of-memory kill, a crash in a recipe; simulated, as neither can be produced on
    # demand) is recorded as failed and retried by the next call, while the other runs train and are kept.
    calls = []

    def run_one(arm, seed, cli, output_dir):
        calls.append(arm["name"])
        if arm["name"] == "ppow_bad" and calls.count("ppow_bad") == 1:
            raise RuntimeError("killed")
        return {"arm": arm["name"], "kind": arm["kind"], "seed": seed}

    monkeypatch.setattr(harness, "run_one", run_one)
    argv = ["--warm-start", "w", "--run", "cst good: ", "--run", "ppow bad: ", "--seeds", "1", "--train-only",
            "--json", str(tmp_path / "runs.json")]  # fmt: skip
    first = harness.main(argv)
    assert set(first["runs"]) == {"cst_good@1"} and set(first["failed"]) == {"ppow_bad@1"}
    second = harness.main(argv)
    assert calls == ["cst_good", "ppow_bad", "ppow_bad"]  # only the failed run is trained again
    assert set(second["runs"]) == {"cst_good@1", "ppow_bad@1"} and not second["failed"]
