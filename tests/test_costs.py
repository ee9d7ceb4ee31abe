"""The cost model: c(n) and the drafter's step cost, cached per hardware/dtype, shared with PPOW's gamma."""

from __future__ import annotations

import json

import torch

from ppow_trl.decoding import cost as cost_module
from ppow_trl.decoding.cost import CostTable, measure_costs, measure_gamma
from tests.test_drafting import make_drafter
from tests.test_speculative import build_varied_target


def test_measure_costs_is_cached_in_memory_and_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_TRL_CACHE", str(tmp_path))
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    torch.set_num_threads(1)
    target = build_varied_target()
    drafter = make_drafter("eagle3", target)
    table = measure_costs(target, drafter, max_tokens=6, context_length=16, repeats=2)
    assert len(table.verify) == 6 and all(v > 0 for v in table.verify)
    assert table.draft_step > 0 and table.commit > 0 and table.key
    files = list((tmp_path / "costs").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["verify"] == table.verify
    assert measure_costs(target, drafter, max_tokens=6, context_length=16) is table  # memory
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    again = measure_costs(target, drafter, max_tokens=6, context_length=16)  # disk
    assert again.verify == table.verify and again is not table
    assert table.ratios()[0] == 1.0 and table.c(8) > 0  # extrapolated
    assert table.gamma(3) == table.draft_step / table.verify[3]
    # another configuration is another entry; use_cache=False measures and stores nothing
    measure_costs(target, drafter, max_tokens=4, context_length=16, repeats=1)
    assert len(list((tmp_path / "costs").glob("*.json"))) == 2
    measure_costs(target, None, max_tokens=3, context_length=8, repeats=1, use_cache=False)
    assert len(list((tmp_path / "costs").glob("*.json"))) == 2


def test_measure_gamma_prices_a_window_like_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_TRL_CACHE", str(tmp_path))
    monkeypatch.setattr(cost_module, "_MEMORY", {})
    target = build_varied_target()
    drafter = make_drafter("medusa", target)
    gamma = measure_gamma(target, drafter, window_size=3, context_length=16, repeats=1)
    table = measure_costs(target, drafter, max_tokens=16, context_length=16)
    assert gamma == table.gamma(3) > 0
    assert CostTable([1.0, 2.0], draft_step=0.5).gamma(1) == 0.25


def test_verify_shape_pads_to_a_cheaper_token_count():
    # c(2) above c(3) and c(4), as small-M kernels make it on a 2-core CPU; c(5) 2% below c(4): not worth it
    table = CostTable([1.0, 1.14, 1.02, 1.05, 1.03, 1.3])
    assert [table.verify_shape(n) for n in range(1, 8)] == [1, 3, 3, 4, 5, 6, 7]
    assert table.padded_verify() == [1.0, 1.02, 1.02, 1.05, 1.03, 1.3]
    assert CostTable([1.0, 1.1, 1.2]).padded_verify() == [1.0, 1.1, 1.2]  # monotone: nothing padded
