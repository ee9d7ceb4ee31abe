"""The cost model: c(n) and the drafter's step cost, cached per hardware/dtype, shared with PPOW's gamma;
its checks (monotone, plausible, measured on an idle machine), re-measuring and the online monitor."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from ppow_trl.decoding import cost as cost_module
from ppow_trl.decoding.cost import (
    CostMonitor,
    CostTable,
    ImplausibleCostsError,
    MachineLoad,
    check_costs,
    measure_costs,
    measure_gamma,
)
from ppow_trl.models import Eagle3Drafter
from tests.test_drafting import make_drafter
from tests.test_speculative import build_varied_target


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cost cache; the machine's load is not judged (the test machine is shared, and these tests
    are about caching, not load; `test_a_loaded_machine_is_detected_and_its_table_not_cached` is)."""
    monkeypatch.setenv("PPOW_TRL_CACHE", str(tmp_path))
    monkeypatch.delenv(cost_module.REMEASURE_ENV, raising=False)
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    monkeypatch.setattr(cost_module, "LOAD_TOLERANCE", float("inf"))
    monkeypatch.setattr(cost_module, "MIN_OWN_SHARE", 0.0)
    torch.set_num_threads(1)
    return tmp_path / "costs"


def test_measure_costs_is_cached_in_memory_and_on_disk(cache, monkeypatch):
    target = build_varied_target()
    drafter = make_drafter("eagle3", target)
    table = measure_costs(target, drafter, max_tokens=6, context_length=16, repeats=2)
    assert len(table.verify) == 6 and all(v > 0 for v in table.verify)
    assert table.draft_step > 0 and table.commit > 0 and table.key
    assert table.source == "measured" and table.clock == "thread_time" and not table.problems
    assert time.time() - table.measured_at < 600 and table.load["threads"] == 1
    files = list(cache.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["verify"] == table.verify
    assert measure_costs(target, drafter, max_tokens=6, context_length=16) is table  # memory
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    again = measure_costs(target, drafter, max_tokens=6, context_length=16)  # disk: a clean table is kept
    assert again.verify == table.verify and again is not table and again.source == "cache"
    assert table.ratios()[0] == 1.0 and table.c(8) > 0  # extrapolated
    assert table.gamma(3) == table.draft_step / table.verify[3]
    assert "drafter step" in again.describe() and again.summary()["age_s"] >= 0
    # another configuration is another entry; use_cache=False measures and stores nothing
    measure_costs(target, drafter, max_tokens=4, context_length=16)  # default repeats: 1 can fail its checks
    assert len(list(cache.glob("*.json"))) == 2
    measure_costs(target, None, max_tokens=3, context_length=8, repeats=1, use_cache=False)
    assert len(list(cache.glob("*.json"))) == 2


def test_stale_implausible_or_forced_tables_are_measured_again(cache, monkeypatch):
    target = build_varied_target()
    drafter = make_drafter("eagle3", target)
    first = measure_costs(target, drafter, max_tokens=4, context_length=16, repeats=1)
    path = next(cache.glob("*.json"))

    def reread() -> CostTable:
        monkeypatch.setattr(cost_module, "_MEMORY", {})
        return measure_costs(target, drafter, max_tokens=4, context_length=16, repeats=1)

    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "draft_step": 1.0}))  # harmless shape, implausible drafter step
    assert reread().source == "measured"
    cost_module.mark_stale(first, "observed otherwise")
    assert json.loads(path.read_text())["stale"] == "observed otherwise"
    assert reread().source == "measured" and not json.loads(path.read_text())["stale"]
    assert reread().source == "cache"  # clean again: read back, not re-measured
    monkeypatch.setenv(cost_module.REMEASURE_ENV, "1")
    forced = reread()
    assert forced.source == "measured"
    assert measure_costs(target, drafter, max_tokens=4, context_length=16) is forced  # once per process
    monkeypatch.delenv(cost_module.REMEASURE_ENV)
    assert measure_costs(target, drafter, max_tokens=4, context_length=16, remeasure=True) is not forced


def test_check_costs_flags_dips_and_implausible_drafter_steps():
    assert check_costs(CostTable([1.0, 1.14, 1.02, 1.05])) == []  # c(2) > c(3): kernel shapes, tolerated
    assert "below a shorter" in check_costs(CostTable([1.0, 1.1, 0.6, 1.2]))[0]
    assert check_costs(CostTable([1.0, -1.0]))
    target = build_varied_target()
    drafter = make_drafter("eagle3", target)
    low, high = cost_module.plausible_draft_ratio(target, drafter)
    assert 0 < low < high
    assert check_costs(CostTable([1.0, 1.1], draft_step=(low + high) / 2), target, drafter) == []
    assert "drafter step" in check_costs(CostTable([1.0, 1.1], draft_step=2 * high), target, drafter)[0]
    assert "drafter step" in check_costs(CostTable([1.0, 1.1], draft_step=low / 2), target, drafter)[0]


def test_a_loaded_machine_is_detected_and_its_table_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_TRL_CACHE", str(tmp_path))
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    torch.set_num_threads(1)
    cores = MachineLoad().cores
    # one busy process per core: whatever else runs, ours has to share its core
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        load = MachineLoad()
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            pass
        result = load.result()
        assert result["loaded"] and result["others_busy_cores"] > 0.5, result
        target = build_varied_target()
        # enough repeats that the measurement outlasts the 0.2 s MachineLoad needs to read /proc, not the load average
        table = measure_costs(
            target, make_drafter("eagle3", target), max_tokens=4, context_length=16, repeats=60
        )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert table.load["loaded"] and any("loaded machine" in p for p in table.problems), (
        table.load,
        table.problems,
    )
    assert not list((tmp_path / "costs").glob("*.json"))  # used in this process, never cached


class SlowEagle3(Eagle3Drafter):
    """A drafter whose step does far more work than its size says (work outside its linear layers)."""

    def draft_logits(self, hidden):
        x = torch.ones(192, 192)
        for _ in range(60):
            x = torch.tanh(x @ x)
        return super().draft_logits(hidden) + 0 * x.sum()


def test_measure_gamma_prices_a_window_like_the_table_and_refuses_an_implausible_one(cache):
    target = build_varied_target()
    drafter = make_drafter("medusa", target)
    gamma = measure_gamma(target, drafter, window_size=3, context_length=16, repeats=1)
    table = measure_costs(target, drafter, max_tokens=16, context_length=16)
    assert gamma == table.gamma(3) > 0
    assert CostTable([1.0, 2.0], draft_step=0.5).gamma(1) == 0.25
    slow = make_drafter("eagle3", target)
    slow.__class__ = SlowEagle3
    with pytest.raises(ImplausibleCostsError, match="implausible.*drafter step"):
        measure_gamma(target, slow, window_size=3, context_length=16, repeats=1)


def test_verify_shape_pads_to_a_cheaper_token_count():
    # c(2) above c(3) and c(4), as small-M kernels make it on a 2-core CPU; c(5) 2% below c(4): not worth it
    table = CostTable([1.0, 1.14, 1.02, 1.05, 1.03, 1.3])
    assert [table.verify_shape(n) for n in range(1, 8)] == [1, 3, 3, 4, 5, 6, 7]
    assert table.padded_verify() == [1.0, 1.02, 1.02, 1.05, 1.03, 1.3]
    assert CostTable([1.0, 1.1, 1.2]).padded_verify() == [1.0, 1.1, 1.2]  # monotone: nothing padded


def test_cost_monitor_corrects_a_wrong_draft_price_and_keeps_a_right_one():
    table = CostTable([1.0, 1.1, 1.2, 1.3], draft_step=0.6, commit=0.05)
    # rounds that really cost: verification as priced, a drafter step 0.05, commit 0.05
    right = CostMonitor(CostTable([1.0, 1.1, 1.2, 1.3], draft_step=0.05, commit=0.05))
    wrong = CostMonitor(table)
    for steps in [1, 0, 1, 0, 0, 1, 2, 1, 3]:
        seconds = 0.05 + 0.05 * steps if steps else 0.0
        for monitor in (right, wrong):
            monitor.record(steps, seconds, steps + 1, monitor.table.c(steps + 1) / monitor.table.verify[0])
    assert right.corrected_at == [] and right.disagreement == pytest.approx(1.0)
    assert wrong.corrected_at == [7]  # the 4th drafting round: 3 to judge, then 2 strikes in a row
    assert wrong.table.source == "observed" and wrong.table.draft_step == pytest.approx(0.05, rel=0.05)
    assert wrong.table.verify == table.verify  # verification observed as priced
