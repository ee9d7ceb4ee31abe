"""A cost table that lies (a drafter step priced at 60% of a 1-token verification, as a table measured on a
loaded machine once did) is corrected by decoding from its timed rounds; a true one is left alone.

The target is a 16-layer tiny Llama, so that a verification costs many drafter steps as a real target's
does; the drafter is an oracle (tests/test_speculative.py) made moderately confident and right about half
the time, so the window "auto" picks depends on what drafting costs.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import LlamaForCausalLM

from ppow_trl.decoding import cost as cost_module
from ppow_trl.decoding import generate, speculative_generate
from ppow_trl.decoding.cost import measure_costs
from ppow_trl.decoding.speculative import draft_length_policy
from tests.test_speculative import build_varied_target, make_oracle, plain_greedy, prompts

NEW_TOKENS = 48
MAX_ROUNDS_TO_CORRECT = 48
SETTLE = 8  # rounds for the policy to lengthen its windows again once the table is corrected


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def deep_target() -> LlamaForCausalLM:
    return build_varied_target(num_layers=16)


@pytest.fixture(scope="module")
def case(deep_target):
    ids = prompts((4, 7, 12, 6, 9, 5))
    refs = [plain_greedy(deep_target, x, NEW_TOKENS) for x in ids]
    return ids, refs


def half_right_drafter(target, refs):
    """Right at about half of the steps, with the same moderate confidence whether right or not (a wrong
    step ranks the true token second), so only the costs tell "auto" how far to draft."""
    drafter = make_oracle(
        "eagle3", target, refs, window=8, skip=lambda r, j: (r * 7919 + j * 104729) % 97 < 48, runner_up=True
    )
    drafter.lookup.values = drafter.lookup.values * 0.2
    return drafter


def decode_all(target, drafter, case, costs, method="loop", **kwargs):
    """Window sizes of every round over the prompts (greedy output checked), and the policy used."""
    windows = []
    for ids, ref in zip(*case):
        if method == "loop":
            out = speculative_generate(target, drafter, ids, max_new_tokens=NEW_TOKENS, num_draft_tokens="auto",
                                       costs=costs, **kwargs)  # fmt: skip
        else:
            out = generate(target, drafter, ids, method="assisted", max_new_tokens=NEW_TOKENS,
                           num_draft_tokens="auto", costs=costs, **kwargs)  # fmt: skip
        assert torch.equal(out.sequences, ref)
        windows += out.window_sizes.tolist()
    padded = method == "loop"
    return windows, draft_length_policy(target, drafter, "auto", costs=costs, padded=padded)


def relative_step(table) -> float:
    return table.draft_step / table.verify[0]


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


def test_poisoned_table_is_corrected_and_a_clean_one_left_alone(deep_target, case, tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_TRL_CACHE", str(tmp_path))
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    # this test is about decoding: a table measured while other jobs share the CPU is still cached here
    monkeypatch.setattr(cost_module, "LOAD_TOLERANCE", float("inf"))
    monkeypatch.setattr(cost_module, "MIN_OWN_SHARE", 0.0)
    refs = case[1]
    # a noisy neighbour can still push one size of a single measurement up (CI once saw c(3) = 1.47 c(1) beside
    # c(4) = 1.04): this test needs a clean table to start from, so it takes the entrywise minimum of more attempts
    clean = measure_costs(
        deep_target, half_right_drafter(deep_target, refs), context_length=32, repeats=15, attempts=6
    )
    assert clean.source == "measured" and not clean.problems, clean.describe()
    poisoned = replace(clean, draft_step=0.6 * clean.verify[0])

    clean_windows, policy = decode_all(deep_target, half_right_drafter(deep_target, refs), case, clean)
    assert policy.monitor is not None and policy.monitor.corrected_at == [], policy.monitor.disagreement
    # uncorrected, the poisoned table all but switches drafting off (so this test can fail)
    stuck, policy = decode_all(
        deep_target, half_right_drafter(deep_target, refs), case, poisoned, correct_costs=False
    )
    assert policy.monitor is None and mean(stuck) < 0.5 * mean(clean_windows), (
        mean(stuck),
        mean(clean_windows),
    )

    windows, policy = decode_all(deep_target, half_right_drafter(deep_target, refs), case, poisoned)
    corrected_at = policy.monitor.corrected_at
    assert corrected_at and corrected_at[0] <= MAX_ROUNDS_TO_CORRECT, corrected_at
    after = windows[corrected_at[0] + SETTLE :]
    # 10% is the goal on a quiet machine; round timings of this tiny target (a few ms) on a 2-core CPU move these
    # means by up to ~20% from run to run (both arms are timed rounds), while the uncorrected table stays below 50%
    assert abs(mean(after) - mean(clean_windows)) <= 0.25 * mean(clean_windows), (
        mean(after),
        mean(clean_windows),
        corrected_at,
    )
    assert policy.monitor.table.source == "observed"
    # only relative prices decide windows (the correction also rescales verification to the observed clock); the
    # first corrections fit one-step probes, whose fixed per-call cost lands partly on the step
    assert relative_step(policy.monitor.table) < 0.4 * relative_step(poisoned)

    # the cached copy is marked stale: this process uses the observed table, the next one measures again
    stored = json.loads(next((tmp_path / "costs").glob("*.json")).read_text())
    assert stored["stale"] and "drafting" in stored["stale"]
    assert (
        measure_costs(deep_target, half_right_drafter(deep_target, refs), context_length=32).source
        == "observed"
    )
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    again = measure_costs(deep_target, half_right_drafter(deep_target, refs), context_length=32)
    assert again.source == "measured" and not again.stale


def test_assisted_path_corrects_a_poisoned_table_too(deep_target, case):
    refs = case[1]
    clean = measure_costs(
        deep_target, half_right_drafter(deep_target, refs), context_length=32, use_cache=False
    )
    poisoned = replace(clean, key="", draft_step=0.6 * clean.verify[0])
    _, policy = decode_all(
        deep_target, half_right_drafter(deep_target, refs), case, poisoned, method="assisted"
    )
    assert policy.monitor.corrected_at and policy.monitor.corrected_at[0] <= MAX_ROUNDS_TO_CORRECT
    # only relative prices decide windows (the correction also rescales verification to the observed clock); the
    # first corrections fit one-step probes, whose fixed per-call cost lands partly on the step
    assert relative_step(policy.monitor.table) < 0.4 * relative_step(poisoned)
