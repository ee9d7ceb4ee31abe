"""benchmarks/serve_check.py (vLLM serving of the exported drafters) and the eagle3 export against SGLang's
loader rules.

The pure parts (metrics, acceptance, commands, configurations, report) always run. The quick serving check
runs only where `.venv-vllm` exists (`make serve-check` builds it); elsewhere it is skipped with a message.
SGLang installs no CPU build from PyPI (its wheel requires CUDA packages: flashinfer, sglang-kernel, ...), so
the eagle3 layout is checked against the rules of SGLang's `LlamaForCausalLMEagle3` loader instead, stated
below: which checkpoint names it maps to which parameter, what it silently drops, which config fields it
reads, and how it numbers the feature layers.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import serve_check  # noqa: E402

VENV_PYTHON = serve_check.DEFAULT_VENV / "bin" / "python"
P = serve_check.SPEC_PREFIX


# ------------------------------------------------------------------------------------------ pure parts
def test_metrics_summed_over_labels_and_acceptance_from_deltas():
    before = serve_check.summarize_metrics(
        [
            {"name": P + "num_drafts", "value": 10},
            {"name": P + "num_draft_tokens", "value": 30},
            {"name": P + "num_accepted_tokens", "value": 12},
            {"name": P + "num_accepted_tokens_per_pos", "values": [8, 3, 1]},
            {"name": "vllm:num_requests_running", "value": 4},  # not a speculative-decoding metric
        ]
    )
    assert set(before) == {P + "num_drafts", P + "num_draft_tokens", P + "num_accepted_tokens",
                           P + "num_accepted_tokens_per_pos"}  # fmt: skip
    after = serve_check.summarize_metrics(
        [  # vLLM's Metric objects (attributes), one per engine label: summed
            SimpleNamespace(name=P + "num_drafts", value=15, values=None),
            SimpleNamespace(name=P + "num_drafts", value=5, values=None),
            SimpleNamespace(name=P + "num_draft_tokens", value=60, values=None),
            SimpleNamespace(name=P + "num_accepted_tokens", value=27, values=None),
            SimpleNamespace(name=P + "num_accepted_tokens_per_pos", value=None, values=[12, 6]),
            SimpleNamespace(name=P + "num_accepted_tokens_per_pos", value=None, values=[4, 2, 4]),
        ]
    )
    assert after[P + "num_drafts"] == 20 and after[P + "num_accepted_tokens_per_pos"] == [16, 8, 4]
    acc = serve_check.acceptance(before, after)
    assert acc == {
        "drafts": 10,
        "draft_tokens": 30,
        "accepted_tokens": 15,
        "mean_acceptance_length": 2.5,
        "acceptance_per_position": [0.8, 0.5, 0.3],
    }
    assert serve_check.acceptance(after, after) is None  # nothing drafted in between (no speculation)


def test_loop_acceptance_uses_vllms_definitions():
    acc = serve_check.loop_acceptance([2, 0, 1, 3], k=3)
    assert acc["drafts"] == 4 and acc["draft_tokens"] == 12 and acc["accepted_tokens"] == 6
    assert acc["mean_acceptance_length"] == 2.5  # 1 + accepted / drafts
    assert acc["acceptance_per_position"] == [0.75, 0.5, 0.25]  # share of drafts with >= i+1 accepted
    assert serve_check.loop_acceptance([], k=2)["acceptance_per_position"] == []


def test_first_difference():
    assert serve_check.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert serve_check.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert serve_check.first_difference([1, 2], [1, 2, 3]) == 2


def test_engine_command_and_environment():
    spec, out = Path("/x/spec.json"), Path("/x/out.json")
    cmd = serve_check.engine_command("/v/bin/python", spec, out)
    assert cmd[0] == "/v/bin/python" and cmd[1].endswith("benchmarks/serve_check.py")
    assert cmd[2:] == ["--engine", str(spec), "--engine-out", str(out)]
    env = serve_check.engine_env({"PYTHONPATH": "/repo", "OMP_NUM_THREADS": "8", "PATH": "/bin"})
    assert (
        env["OMP_NUM_THREADS"] == env["NUMBA_NUM_THREADS"] == "1"
        and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    )
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["HF_HUB_OFFLINE"] == "1"
    assert "PYTHONPATH" not in env and env["PATH"] == "/bin"


def test_venv_build_never_touches_the_main_venv(tmp_path, monkeypatch):
    venv = REPO / ".venv-vllm"
    cmds = serve_check.venv_build_commands(venv)
    assert cmds[0][-1] == str(venv)
    assert all(cmd[0] in ("python3", str(venv / "bin" / "python")) for cmd in cmds)
    assert ["install", "-q", serve_check.VLLM_REQUIREMENT] == cmds[2][-3:]
    assert cmds[3][:5] == [str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y"]
    assert set(serve_check.BROKEN_EXTRAS) <= set(cmds[3])
    with pytest.raises(SystemExit, match="make serve-check"):
        serve_check.ensure_venv(tmp_path / ".venv-missing", build=False)
    monkeypatch.setattr(serve_check, "REPO", tmp_path)
    with pytest.raises(SystemExit, match="refusing"):
        serve_check.ensure_venv(tmp_path / ".venv", build=True)


def test_configurations_cover_each_layout_and_k():
    folders = {"d": {"eagle3": Path("/e"), "speculators": Path("/s")}}
    configs = serve_check.build_configs(folders, [1, 2, 3], ngram=True)
    assert configs[0] == {"name": "no speculation", "speculative_config": None}
    eagle = [c for c in configs if c.get("layout")]
    assert len(eagle) == 6 and {(c["layout"], c["k"]) for c in eagle} == {
        (layout, k) for layout in ("eagle3", "speculators") for k in (1, 2, 3)
    }
    assert eagle[0]["speculative_config"] == {"method": "eagle3", "model": "/e", "num_speculative_tokens": 1}
    ngram = configs[-1]["speculative_config"]
    assert ngram["method"] == "ngram" and ngram["num_speculative_tokens"] == 3 and "model" not in ngram


def test_report_tables_have_one_cell_per_column():
    acc = {"drafts": 4, "draft_tokens": 8, "accepted_tokens": 3, "mean_acceptance_length": 1.75,
           "acceptance_per_position": [0.5, 0.25]}  # fmt: skip
    run = {"tokens": [[1, 2]], "seconds": 1.0, "new_tokens": 2, "identical": 1}
    report = {
        "command": "x", "date": "d", "machine": "m", "load_before": "l", "load_after": "l",
        "settings": {"dtype": "float32", "prompts": 1, "max_tokens": 2, "target": "t", "drafters": ["a"]},
        "engine": {"vllm": "0", "torch": "0", "configs": [
            {"name": "no speculation", "batches": {"1": {**run, "acceptance": None}}},
            {"name": "eagle3 K=2", "batches": {"1": {**run, "acceptance": acc}}},
            {"name": "broken", "error": "ValueError: no"},
        ]},
        "product": {"2": {"tokens": [[1, 2]], "acceptance": acc, "identical": 1}},
        "vllm_by_k": {"2": acc},
        "notes": ["a note"],
    }  # fmt: skip
    text = serve_check.markdown(report)
    for line in text.splitlines():
        if line.startswith("| configuration"):
            columns = line.count("|")
        elif line.startswith("| K |"):
            columns = line.count("|")
        elif line.startswith("| "):
            assert line.count("|") == columns, line
    assert "failed: ValueError: no" in text and "| 2 | 1.750 | 1.750 |" in text


def test_serving_records_hold_the_eagle3_layouts_batch_1_acceptance_per_drafter():
    acc = {"drafts": 4, "draft_tokens": 8, "accepted_tokens": 3, "mean_acceptance_length": 1.75,
           "acceptance_per_position": [0.5, 0.25]}  # fmt: skip
    run = {"tokens": [[1, 2], [3]], "seconds": 1.0, "new_tokens": 3, "identical": 2, "acceptance": acc}
    other = {**run, "acceptance": {**acc, "mean_acceptance_length": 1.1}}
    configs = serve_check.build_configs(
        {"mine": {"eagle3": Path("/x/mine"), "speculators": Path("/w/spec")}}, [2], ngram=True
    )
    engine = [
        {"name": c["name"], "batches": {"1": run if c.get("layout") == "eagle3" else other, "8": other}}
        for c in configs
    ]
    report = {"settings": {"dtype": "float32", "prompts": 2, "max_tokens": 16}, "date": "d", "command": "c",
              "engine": {"vllm": "0.32.0", "configs": engine}}  # fmt: skip
    records = serve_check.serving_records(report, configs, [Path("/x/mine"), Path("/x/absent")])
    assert list(records) == [Path("/x/mine")]  # a drafter the engine did not serve gets no record
    (row,) = records[Path("/x/mine")]["rows"]
    assert row == {"k": 2, "mean_acceptance_length": 1.75, "acceptance_per_position": [0.5, 0.25],
                   "identical": 2, "prompts": 2}  # fmt: skip
    assert '"num_speculative_tokens": K' in records[Path("/x/mine")]["call"]


# ------------------------------------------------------------------------------------------ quick vLLM run
@pytest.mark.integration
def test_quick_serving_check(tmp_path):
    if not VENV_PYTHON.exists():
        pytest.skip(f"{serve_check.DEFAULT_VENV.name} is missing: `make serve-check` builds the vLLM venv")
    results, out = tmp_path / "RESULTS.md", tmp_path / "report.json"
    code = serve_check.main(["--quick", "--results", str(results), "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["ok"], results.read_text()
    names = [c["name"] for c in report["engine"]["configs"]]
    assert names[0] == "no speculation" and any(n.startswith("eagle3 K=2") for n in names)
    spec = report["engine"]["configs"][1]["batches"]["1"]
    assert spec["identical"] == len(spec["tokens"]) == 2  # greedy identity with and without the drafter
    assert spec["acceptance"]["drafts"] > 0
    loop = report["product"]["2"]
    assert loop["identical"] == 2  # the product's loop gives vLLM's greedy tokens
    vllm_len = spec["acceptance"]["mean_acceptance_length"]
    assert abs(loop["acceptance"]["mean_acceptance_length"] - vllm_len) < 0.15


# ------------------------------------------------------------------------------------------ SGLang's rules
# SGLang's LlamaForCausalLMEagle3 (python/sglang/srt/models/llama_eagle3.py) loads a checkpoint name by name:
# d2t becomes its hot-token map (d2t + arange: offsets), t2d is skipped; q/k/v_proj are stacked into
# qkv_proj and gate/up_proj into gate_up_proj; every other name is looked up as is, then with "model."
# prepended, and names matching no parameter are dropped without a word. The decoder layer's attention
# reads [input_layernorm(embedding), hidden_norm(hidden)] concatenated (2 * hidden_size inputs); `fc` maps
# 3 * target_hidden_size (target_hidden_size, else hidden_size) to hidden_size, with a bias only when the
# config sets `bias`; num_hidden_layers > 1 adds layers; tie_word_embeddings replaces lm_head by the
# embedding; draft_vocab_size sizes lm_head. The embedding comes from the target when the checkpoint has
# none. Feature layers: eagle_config.eagle_aux_hidden_state_layer_ids, each id i capturing the residual
# stream entering target layer i + 1 (the output of layer i).
_STACKED = {".q_proj": ".qkv_proj", ".k_proj": ".qkv_proj", ".v_proj": ".qkv_proj", ".gate_proj": ".gate_up_proj",
            ".up_proj": ".gate_up_proj"}  # fmt: skip


def sglang_parameters(config: dict) -> dict[str, tuple[int, ...] | None]:
    """The parameters SGLang's EAGLE-3 Llama drafter has for `config`, with the checkpoint shape each
    checkpoint tensor mapped onto it must have (None for the stacked ones, checked separately)."""
    h, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    target_h = config.get("target_hidden_size", h)
    params = {
        "model.embed_tokens.weight": (config["vocab_size"], h),
        "model.fc.weight": (h, 3 * target_h),
        "model.midlayer.self_attn.qkv_proj.weight": None,
        "model.midlayer.self_attn.o_proj.weight": (h, heads * head_dim),
        "model.midlayer.mlp.gate_up_proj.weight": None,
        "model.midlayer.mlp.down_proj.weight": (h, inter),
        "model.midlayer.input_layernorm.weight": (h,),
        "model.midlayer.hidden_norm.weight": (h,),
        "model.midlayer.post_attention_layernorm.weight": (h,),
        "model.norm.weight": (h,),
        "lm_head.weight": (config["draft_vocab_size"], h),
    }
    if config.get("bias", False):
        params["model.fc.bias"] = (h,)
    return params


def sglang_parameter_of(name: str, params: dict) -> str | None:
    """The parameter SGLang loads checkpoint tensor `name` into (None: dropped)."""
    for shard, stacked in _STACKED.items():
        if shard in name:
            name = name.replace(shard, stacked)
            break
    for candidate in (name, f"model.{name}"):
        if candidate in params:
            return candidate
    return None


def check_sglang_loads(folder: Path, aux_layer_ids_hf: list[int]) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    assert config.get("model_type") != "llama4_text"
    params = sglang_parameters(config)
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    stacked_shapes = {
        "q_proj": (heads * head_dim, 2 * h), "k_proj": (kv * head_dim, 2 * h), "v_proj": (kv * head_dim, 2 * h),
        "gate_proj": (config["intermediate_size"], h), "up_proj": (config["intermediate_size"], h),
    }  # fmt: skip
    covered = set()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        for name in names:
            shape = tuple(f.get_slice(name).get_shape())
            if name == "d2t":
                d2t = f.get_tensor(name)
                assert shape == (config["draft_vocab_size"],) and not d2t.dtype.is_floating_point
                hot = d2t + torch.arange(len(d2t))  # SGLang's hot-token ids: target ids of the draft vocab
                assert int(hot.min()) >= 0 and int(hot.max()) < config["vocab_size"]
                assert bool((hot[1:] > hot[:-1]).all())
                continue
            if name == "t2d":
                continue
            param = sglang_parameter_of(name, params)
            assert param is not None, f"SGLang would silently drop {name}"
            covered.add(param)
            short = re.search(r"(q|k|v|gate|up)_proj", name)
            want = stacked_shapes[short.group(0)] if params[param] is None else params[param]
            assert shape == want, (name, shape, want)
    missing = set(params) - covered - {"model.embed_tokens.weight"}  # the embedding comes from the target
    assert not missing, f"SGLang would keep random weights for {sorted(missing)}"
    assert {"d2t"} <= set(names)
    served = config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert [i + 1 for i in served] == aux_layer_ids_hf, "SGLang would capture other layers than trained on"


def test_shipped_drafter_follows_sglangs_loader_but_numbers_layers_for_vllm():
    folder = REPO / "drafters" / "smollm2-135m-eagle3"
    config = json.loads((folder / "config.json").read_text())
    hf_ids = config["ppow_trl"]["aux_layer_ids"]
    assert config["ppow_trl"]["layer_id_convention"] == "vllm"
    # Weights and config load as they are; the feature layers are numbered for vLLM, so SGLang would capture
    # each one layer deeper: serve it with SGLang from an export with --layer_id_convention sglang.
    with pytest.raises(AssertionError, match="other layers"):
        check_sglang_loads(folder, hf_ids)
    check_sglang_loads(folder, [i + 1 for i in hf_ids])


def test_sglang_convention_export_loads_in_sglang(tmp_path):
    from ppow_trl.data.draft_vocab import build_draft_vocab
    from ppow_trl.export import export_drafter
    from ppow_trl.models.build import build_drafter
    from tests.conftest import build_tiny_target

    target = build_tiny_target(320, num_layers=8)
    vocab = build_draft_vocab(torch.arange(320) % 7, draft_vocab_size=40)
    torch.manual_seed(0)
    drafter = build_drafter("eagle3", target, vocab)
    out = export_drafter(drafter, tmp_path / "sglang", "eagle3", layer_id_convention="sglang")
    check_sglang_loads(out, drafter.config.aux_layer_ids)
    assert drafter.config.aux_layer_ids == [2, 4, 5]
