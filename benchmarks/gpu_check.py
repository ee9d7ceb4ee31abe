"""One GPU check: the Triton verification kernel against torch, and a PPOW step and an SFT step on a
randomly initialised Llama-3.1-8B-shaped target with an EAGLE-3 drafter, with peak GPU memory.

    python benchmarks/gpu_check.py [--out DIR] [--tiny] [--parts kernel steps] [--seq-len 2048] ...

The target is built from a `LlamaConfig` with Llama-3.1-8B's shapes (hidden 4096, 32 layers, 32 heads / 8 KV
heads, intermediate 14336, vocabulary 128256) and random weights, directly on the GPU in bf16: nothing is
downloaded, and the timings are those of the real shapes (acceptance is meaningless on random weights, speed
is not). The drafter is a fresh EAGLE-3 drafter (`build_drafter`, fp32 master weights, bf16 autocast) with a
32000-token draft vocabulary. The sequences are random token ids.

Parts:
  kernel  `benchmarks/verify_kernel.py --check`: the kernel equals the torch reference on every shape, then
          kernel vs torch times (CUDA events). Without CUDA: under `--tiny` the same check runs under
          Triton's interpreter on small CPU shapes; otherwise it is skipped with a message.
  steps   one SFT (TTT) step and one PPOW step (rollout + loss + optimizer) through the trainers, the median
          wall time of `--steps` steps after a warm-up, tokens/s and windows/s, and
          `torch.cuda.max_memory_allocated` after loading and during each step.

`--tiny` (2 layers, hidden 64, vocabulary 512, fp32) runs every part on the CPU in seconds: the test of this
script. Without `--tiny` and without CUDA the parts say which GPU is missing and measure nothing; no number is
made up. The summary is written as `gpu_check.json` and `gpu_check.md` under `--out` (default: `$OUT`, else
`outputs/gpu_check`). `benchmarks/gpu_check.sh` runs this on a lent GPU machine, plus vLLM when installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402  (torch does not import triton: the interpreter choice below still applies)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Without a GPU the kernel can run only under Triton's interpreter, chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

from ppow_trl.data import collate_sequences  # noqa: E402
from ppow_trl.data.draft_vocab import build_draft_vocab  # noqa: E402
from ppow_trl.models.build import build_drafter  # noqa: E402

NO_GPU = "no CUDA GPU (torch.cuda.is_available() is False)"
PARTS = ("kernel", "steps")


@dataclass(frozen=True)
class Shapes:
    """A target's shapes and the benchmark's batch sizes."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    draft_vocab_size: int
    rope_theta: float = 500000.0

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=8192,
            rope_theta=self.rope_theta,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )


LLAMA_8B = Shapes("Llama-3.1-8B shapes (random weights)", 4096, 32, 32, 8, 14336, 128256, 32000)
TINY = Shapes("tiny (2 layers, hidden 64)", 64, 2, 4, 2, 128, 512, 64)


# ------------------------------------------------------------------------------------------------ helpers
def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if HAS_CUDA else None


def reset_peak() -> None:
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()


def median_seconds(step, steps: int, warmup: int) -> float:
    """Median wall seconds of `step` over `steps` calls after `warmup` untimed ones (GPU work included)."""
    times = []
    for i in range(warmup + steps):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def pad_only_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that knows only pad/eos/unk: the trainers read nothing else from it here (the data is
    already token ids)."""
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
    )


def random_rows(count: int, length: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """`count` sequences of `length` random token ids (ids 0-2 are special), every position supervised."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (count, length), generator=gen)
    return [{"input_ids": row.tolist(), "loss_mask": [1] * length, "index": i} for i, row in enumerate(ids)]


def random_target(shapes: Shapes, device: torch.device, dtype: torch.dtype):
    """A frozen, randomly initialised Llama target built directly on `device` in `dtype`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shapes.llama_config(), dtype=dtype)
    model.config.ppow_target_name = shapes.name
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ kernel
def check_kernel(out: Path, tiny: bool) -> dict:
    """`verify_kernel.py --check` on the GPU (timings as JSON); under `--tiny` without CUDA, the same
    equality check under Triton's interpreter on CPU shapes."""
    import verify_kernel

    from ppow_trl.decoding.kernels import triton_available

    if not triton_available():
        return {"status": "skipped", "reason": "triton is not installed (pip install 'ppow-trl[triton]')"}
    if HAS_CUDA:
        path = out / "verify_kernel.json"
        argv = ["--check", "--json", str(path)]
        if tiny:
            argv += ["--batch", "1", "8", "--vocab", "32000", "--repeats", "5", "--warmup", "2"]
        verify_kernel.main(argv)
        payload = json.loads(path.read_text())
        return {
            "status": "ran",
            "device": payload["device"],
            "check": payload["check"],
            "rows": payload["rows"],
        }
    if not tiny:
        return {"status": "skipped", "reason": NO_GPU}
    from ppow_trl.decoding.kernels import verify_triton

    verify_kernel.DEVICE = "cpu"
    lines = verify_kernel.check([(2, 700)], ["greedy", "sampling"], verify_triton)
    return {"status": "ran", "device": "cpu (Triton interpreter)", "check": lines, "rows": []}


# ------------------------------------------------------------------------------------------------ steps
def train_steps(cli, shapes: Shapes, tmp: Path) -> dict:
    """One SFT step and one PPOW step through the trainers; wall time, throughput and peak memory."""
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtype = torch.bfloat16 if cli.bf16 else torch.float32
    on_cpu = dict(
        use_cpu=not HAS_CUDA, bf16=cli.bf16, report_to="none", disable_tqdm=True, save_strategy="no"
    )

    reset_peak()
    start = time.perf_counter()
    target = random_target(shapes, device, dtype)
    build_s = time.perf_counter() - start
    tokenizer = pad_only_tokenizer()
    sft_rows = random_rows(cli.sft_batch, cli.seq_len, shapes.vocab_size, seed=0)
    ppow_rows = random_rows(cli.ppow_sequences, cli.seq_len, shapes.vocab_size, seed=1)
    vocab = build_draft_vocab(
        draft_vocab_size=shapes.draft_vocab_size,
        vocab_size=shapes.vocab_size,
        sequences=[r["input_ids"] for r in sft_rows + ppow_rows],
        loss_masks=[r["loss_mask"] for r in sft_rows + ppow_rows],
    )
    torch.manual_seed(0)
    # Built on the CPU as everywhere else (its vocabulary checks mix CPU maps with fresh tensors), then moved.
    drafter = build_drafter("eagle3", target, vocab).to(device)
    result = {
        "target": shapes.name,
        "target_dtype": str(dtype).removeprefix("torch."),
        "drafter_dtype": "float32 master weights" + (", bf16 autocast" if cli.bf16 else ""),
        "target_params_M": sum(p.numel() for p in target.parameters()) / 1e6,
        "drafter_trainable_params_M": sum(p.numel() for p in drafter.parameters() if p.requires_grad) / 1e6,
        "aux_layer_ids": list(drafter.config.aux_layer_ids),
        "build_target_s": build_s,
        "peak_GiB_after_load": peak_gib(),
        "steps_timed": cli.steps,
        "warmup": cli.warmup,
    }

    result["sft"] = sft_step(
        cli, drafter, target, tokenizer, sft_rows, dict(output_dir=str(tmp / "sft"), **on_cpu)
    )
    if HAS_CUDA:
        torch.cuda.empty_cache()  # the SFT trainer and its optimizer state are gone
    result["ppow"] = ppow_step(
        cli, drafter, target, tokenizer, ppow_rows, dict(output_dir=str(tmp / "ppow"), **on_cpu)
    )
    result["ppow_over_sft_step"] = result["ppow"]["step_s"] / result["sft"]["step_s"]
    return result


def sft_step(cli, drafter, target, tokenizer, rows: list[dict], trainer_args: dict) -> dict:
    """SFT: target features + labels, the K-step TTT loss forward/backward, optimizer."""
    from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer

    args = DrafterSFTConfig(window_size=cli.ttt_steps, **trainer_args)
    trainer = DrafterSFTTrainer(drafter, target, args, train_dataset=rows, processing_class=tokenizer)
    batch = trainer._prepare_inputs(collate_sequences(rows, 0))
    optimizer = trainer.create_optimizer()
    trainer.model.train()

    def step() -> None:
        with trainer.accelerator.autocast():
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak()
    seconds = median_seconds(step, cli.steps, cli.warmup)
    return {
        "batch": f"{len(rows)} x {cli.seq_len} tokens",
        "ttt_steps": cli.ttt_steps,
        "step_s": seconds,
        "tokens_per_s": len(rows) * cli.seq_len / seconds,
        "peak_GiB": peak_gib(),
    }


def ppow_step(cli, drafter, target, tokenizer, rows: list[dict], trainer_args: dict) -> dict:
    """PPOW: rollout (features, ADAW, G windows per anchor, packed target scoring, rewards, advantages), then
    the clipped-surrogate + KL loss forward/backward and the optimizer."""
    from datasets import Dataset

    from ppow_trl.training import PPOWConfig, PPOWTrainer

    g = cli.num_generations
    args = PPOWConfig(
        window_size=cli.window_size, num_generations=g, per_device_train_batch_size=len(rows) * g,
        anchors_per_sequence=cli.anchors, gamma="0.12", adaw_warmup_steps=0, **trainer_args,
    )  # fmt: skip
    trainer = PPOWTrainer(drafter, target, args, Dataset.from_list(rows), tokenizer)
    group = [row for row in rows for _ in range(g)]
    optimizer = trainer.create_optimizer()
    trainer.model.train()
    phases: dict[str, list[float]] = {"rollout": [], "loss": []}

    def step() -> None:
        start = time.perf_counter()
        with trainer.accelerator.autocast():
            inputs = trainer._generate_and_score_completions(group)
            synchronize()
            middle = time.perf_counter()
            loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        phases["rollout"].append(middle - start)
        phases["loss"].append(time.perf_counter() - middle)

    reset_peak()
    seconds = median_seconds(step, cli.steps, cli.warmup)
    rollout_s = statistics.median(phases["rollout"][cli.warmup :])
    return {
        "batch": f"{len(rows)} x {cli.seq_len} tokens, G={g}, K={cli.window_size}, anchors/sequence={cli.anchors}",
        "step_s": seconds,
        "rollout_s": rollout_s,
        "loss_and_optimizer_s": statistics.median(phases["loss"][cli.warmup :]),
        "windows_per_s_rollout": len(rows) * cli.anchors * g / rollout_s,
        "peak_GiB": peak_gib(),
    }


# ------------------------------------------------------------------------------------------------ summary
def environment() -> dict:
    from ppow_trl.decoding.kernels import triton_available

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu",
        "gpu_memory_GiB": torch.cuda.get_device_properties(0).total_memory / 2**30 if HAS_CUDA else None,
        "triton": __import__("triton").__version__ if triton_available() else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "torch_threads": torch.get_num_threads(),
    }
    import transformers

    env["transformers"] = transformers.__version__
    return env


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [
        "# GPU check",
        "",
        f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers "
        f"{env['transformers']}, triton {env['triton']}; shapes: {summary['shapes']}; wall {summary['wall_s']:.0f} s.",
        "",
    ]
    kernel = summary.get("kernel")
    if kernel:
        lines += ["## Verification kernel vs torch", ""]
        if kernel["status"] != "ran":
            lines += [f"{kernel['status'].capitalize()}: {kernel['reason']}.", ""]
        else:
            lines += [f"On {kernel['device']}:", ""] + [f"- {line}" for line in kernel["check"]] + [""]
            if kernel["rows"]:
                lines += [
                    "| mode | B | V | torch (us) | kernel (us) | speedup | % of copy BW |",
                    "|" + "---|" * 7,
                ]
                lines += [
                    f"| {r['mode']} | {r['B']} | {r['V']} | {r['torch_ms'] * 1e3:.1f} | {r['kernel_ms'] * 1e3:.1f} "
                    f"| {r['speedup']:.1f}x | {100 * r['fraction_of_copy_bw']:.0f}% |"
                    for r in kernel["rows"]
                ] + [""]
    steps = summary.get("steps")
    if steps:
        lines += ["## PPOW and SFT steps", ""]
        if steps["status"] != "ran":
            lines += [f"{steps['status'].capitalize()}: {steps['reason']}.", ""]
        else:
            sft, ppow = steps["sft"], steps["ppow"]
            lines += [
                f"{steps['target']}: {steps['target_params_M']:.1f} M parameters in {steps['target_dtype']}; "
                f"EAGLE-3 drafter with {steps['drafter_trainable_params_M']:.0f} M trainable parameters "
                f"({steps['drafter_dtype']}), feature layers {steps['aux_layer_ids']}; median of "
                f"{steps['steps_timed']} steps after {steps['warmup']} warm-up. Peak GPU memory after loading: "
                f"{_fmt(steps['peak_GiB_after_load'], 1)} GiB.",
                "",
                "| step | batch | median s | throughput | peak GiB |",
                "|---|---|---|---|---|",
                f"| SFT (TTT, {sft['ttt_steps']} steps) | {sft['batch']} | {sft['step_s']:.3f} | "
                f"{sft['tokens_per_s']:.0f} tokens/s | {_fmt(sft['peak_GiB'], 1)} |",
                f"| PPOW (rollout + loss) | {ppow['batch']} | {ppow['step_s']:.3f} | "
                f"{ppow['windows_per_s_rollout']:.0f} windows/s (rollout) | {_fmt(ppow['peak_GiB'], 1)} |",
                f"| - PPOW rollout | | {ppow['rollout_s']:.3f} | | |",
                f"| - PPOW loss + optimizer | | {ppow['loss_and_optimizer_s']:.3f} | | |",
                "",
                f"PPOW step / SFT step: {steps['ppow_over_sft_step']:.2f}.",
                "",
            ]
    return "\n".join(lines)


def default_out() -> Path:
    return Path(os.environ.get("OUT") or REPO / "outputs" / "gpu_check")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="summary folder (default: $OUT, else outputs/)"
    )
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, fp32 on CPU: seconds")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default 2048; tiny 32)"
    )
    parser.add_argument("--sft-batch", type=int, default=4)
    parser.add_argument("--ppow-sequences", type=int, default=2)
    parser.add_argument("--ttt-steps", type=int, default=7)
    parser.add_argument("--window-size", type=int, default=5, help="PPOW K")
    parser.add_argument("--num-generations", type=int, default=4, help="PPOW G")
    parser.add_argument("--anchors", type=int, default=8, help="PPOW anchors per sequence")
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None,
        help="bf16 target + bf16 autocast for the drafter (default: on CUDA; fp32 on CPU)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=1)
    cli = parser.parse_args(argv)
    if cli.bf16 is None:
        cli.bf16 = HAS_CUDA
    if cli.seq_len is None:
        cli.seq_len = 32 if cli.tiny else 2048
    if cli.tiny:
        cli.steps, cli.warmup = min(cli.steps, 1), min(cli.warmup, 1)
    return cli


def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    out = (cli.out or default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shapes = TINY if cli.tiny else LLAMA_8B
    start = time.perf_counter()
    summary: dict = {"environment": environment(), "shapes": shapes.name, "parts": cli.parts}
    print(f"gpu_check: {summary['environment']['device']}, {shapes.name}", flush=True)
    if not HAS_CUDA:
        print(f"gpu_check: {NO_GPU}: " + ("running the tiny CPU fallback" if cli.tiny else "GPU parts skip"))
    if "kernel" in cli.parts:
        summary["kernel"] = guarded("kernel", lambda: check_kernel(out, cli.tiny))
    if "steps" in cli.parts:
        if HAS_CUDA or cli.tiny:
            with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
                summary["steps"] = guarded("steps", lambda: train_steps(cli, shapes, Path(tmp)))
        else:
            summary["steps"] = {"status": "skipped", "reason": NO_GPU}
            print(f"steps: skipped: {NO_GPU}", flush=True)
    summary["wall_s"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return int(any(summary.get(part, {}).get("status") == "failed" for part in PARTS))


def guarded(name: str, part) -> dict:
    """Run one part; a part that raises is recorded as failed (with its traceback) and the others still run,
    so one device run always leaves a summary behind."""
    try:
        result = part()
    except Exception as err:
        traceback.print_exc()
        result = {
            "status": "failed",
            "reason": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
    result.setdefault("status", "ran")
    print(f"{name}: {result['status']} {result.get('reason', '')}", flush=True)
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
