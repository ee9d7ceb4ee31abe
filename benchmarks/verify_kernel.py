"""Benchmark the Triton verification kernel against the torch reference on a CUDA GPU.

    python benchmarks/verify_kernel.py [--check] [--json PATH] [--batch 1 8 64] [--vocab 32000 128256 151936]

For each (mode, B, V) with K = 10 and bf16 logits it times the kernel and the torch reference with CUDA
events (warm-up, then the median of repeats), counts the bytes that must move (logits read once; for
sampling also the draft-probability row at the first rejection and the gathered q(x_j); inputs and outputs
of a few bytes per window) and reports the achieved bandwidth as a fraction of this GPU's measured
device-to-device copy bandwidth (a large tensor clone: read + write). ``--check`` first asserts that the
kernel equals the reference on every benchmark shape (greedy: identical; sampling: identical accepted
counts and tokens, except draws that fall within float rounding of a decision boundary, which are counted,
checked to be such, and reported). Without CUDA it prints that a GPU is needed and exits: no numbers are
made up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppow_trl.decoding.verify import _target_probs, verify_greedy, verify_sampling  # noqa: E402

WINDOW = 10
TOLERANCE = 1e-5  # relative slack that counts a sampling mismatch as a rounding-boundary case
DEVICE = "cuda"


def copy_bandwidth(nbytes: int = 4 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (clone of a large tensor: nbytes read + nbytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    src.random_(0, 255)
    times = time_cuda(src.clone, warmup=3, repeats=repeats)
    del src
    torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(times) * 1e-3)


def time_cuda(fn, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call, one CUDA-event pair around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def make_inputs(batch: int, vocab: int, mode: str, seed: int = 0):
    """bf16 logits with a realistic spread, drafts that are often accepted, fixed uniforms."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (torch.randn(batch, WINDOW + 1, vocab, device=DEVICE, generator=gen) * 3).to(torch.bfloat16)
    inputs = {"target_logits": logits}
    if mode == "greedy":
        drafts = logits[:, :WINDOW].argmax(-1)
        cut = torch.randint(0, WINDOW + 1, (batch,), device=DEVICE, generator=gen)
        wrong = torch.arange(WINDOW, device=DEVICE) == cut[:, None]
        inputs["draft_tokens"] = torch.where(wrong, (drafts + 1) % vocab, drafts)
        return inputs
    p = torch.softmax(logits[:, :WINDOW].float(), dim=-1)
    noise = torch.softmax(torch.randn(batch, WINDOW, vocab, device=DEVICE, generator=gen) * 3, dim=-1)
    q = 0.8 * p + 0.2 * noise
    inputs["draft_tokens"] = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).reshape(batch, WINDOW)
    inputs["draft_probs"] = q
    inputs["temperature"] = 1.0
    inputs["uniforms"] = torch.rand(batch, WINDOW, device=DEVICE, generator=gen)
    inputs["residual_uniforms"] = torch.rand(batch, device=DEVICE, generator=gen)
    return inputs


def bytes_moved(batch: int, vocab: int, mode: str) -> int:
    logits = batch * (WINDOW + 1) * vocab * 2  # bf16, read once
    small = batch * (WINDOW * 8 + 16)  # draft tokens in, (accepted, next_token) out
    if mode == "greedy":
        return logits + small
    # one fp32 q row per window (position of the first rejection), gathered q(x_j), uniforms
    return logits + small + batch * vocab * 4 + batch * WINDOW * (4 + 4) + batch * 4


def explain_sampling_mismatches(inputs: dict, got, want) -> tuple[int, int]:
    """Return (mismatched windows, of which NOT explained by float rounding at a decision boundary)."""
    logits, drafts, q = inputs["target_logits"], inputs["draft_tokens"], inputs["draft_probs"].float()
    u, ru = inputs["uniforms"], inputs["residual_uniforms"]
    p = _target_probs(logits, inputs["temperature"])
    bad = ((got.accepted != want.accepted) | (got.next_token != want.next_token)).nonzero().flatten().tolist()
    unexplained = 0
    for b in bad:
        ka, kb = int(got.accepted[b]), int(want.accepted[b])
        if ka != kb:  # the decision at position min(ka, kb) flipped: u must sit at p/q within tolerance
            j = min(ka, kb)
            x = int(drafts[b, j])
            ratio = float(p[b, j, x] / q[b, j, x])
            unexplained += abs(float(u[b, j]) - ratio) > TOLERANCE * max(ratio, 1e-30)
            continue
        k, tok = kb, int(got.next_token[b])
        dist = p[b, k] if k == WINDOW else torch.clamp_min(p[b, k] - q[b, k], 0.0)
        if not bool((dist > 0).any()):
            dist = p[b, k]
        c = torch.cumsum(dist.double(), 0)
        total = float(c[-1])
        t = float(ru[b]) * total
        lo = float(c[tok - 1]) if tok > 0 else 0.0
        hi = float(c[tok])
        slack = TOLERANCE * total
        unexplained += not (dist[tok] > 0 and lo <= t + slack and hi > t - slack)
    return len(bad), unexplained


def check(shapes, modes, vt) -> list[str]:
    lines = []
    for mode in modes:
        for batch, vocab in shapes:
            inputs = make_inputs(batch, vocab, mode, seed=1)
            if mode == "greedy":
                got = vt.verify_greedy_triton(inputs["target_logits"], inputs["draft_tokens"])
                want = verify_greedy(**inputs)
                assert torch.equal(got.accepted, want.accepted), (
                    f"greedy accepted differs at B={batch} V={vocab}"
                )
                assert torch.equal(got.next_token, want.next_token), (
                    f"greedy token differs at B={batch} V={vocab}"
                )
                lines.append(f"check greedy   B={batch:<3} V={vocab:<6}: identical")
            else:
                got = vt.verify_sampling_triton(**inputs)
                want = verify_sampling(**inputs)
                mismatched, unexplained = explain_sampling_mismatches(inputs, got, want)
                assert unexplained == 0, (
                    f"sampling: {unexplained} unexplained mismatches at B={batch} V={vocab}"
                )
                lines.append(
                    f"check sampling B={batch:<3} V={vocab:<6}: {batch - mismatched}/{batch} windows identical"
                    + (f", {mismatched} within rounding of a decision boundary" if mismatched else "")
                )
            print(lines[-1], flush=True)
            del inputs, got, want
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936])
    parser.add_argument("--modes", nargs="+", choices=["greedy", "sampling"], default=["greedy", "sampling"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--check", action="store_true", help="assert kernel == reference on every shape first"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "benchmarks/verify_kernel.py needs a CUDA GPU; none is available here, so nothing was measured."
        )
        return 0
    from ppow_trl.decoding.kernels import triton_available

    if not triton_available():
        print("benchmarks/verify_kernel.py needs triton: pip install 'ppow-trl[triton]'")
        return 0
    from ppow_trl.decoding.kernels import verify_triton as vt

    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = [(b, v) for v in args.vocab for b in args.batch]
    device_name = torch.cuda.get_device_name()
    check_lines = check(shapes, args.modes, vt) if args.check else []

    bandwidth = copy_bandwidth()
    print(f"{device_name}: device-to-device copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    for mode in args.modes:
        for batch, vocab in shapes:
            inputs = make_inputs(batch, vocab, mode)
            if mode == "greedy":
                kernel = partial(vt.verify_greedy_triton, inputs["target_logits"], inputs["draft_tokens"])
                reference = partial(verify_greedy, **inputs)
            else:
                kernel = partial(vt.verify_sampling_triton, **inputs)
                reference = partial(verify_sampling, **inputs)
            t_kernel = statistics.median(time_cuda(kernel, args.warmup, args.repeats))
            t_ref = statistics.median(time_cuda(reference, args.warmup, args.repeats))
            nbytes = bytes_moved(batch, vocab, mode)
            achieved = nbytes / (t_kernel * 1e-3)
            rows.append(
                {
                    "mode": mode,
                    "B": batch,
                    "K": WINDOW,
                    "V": vocab,
                    "logits_dtype": "bf16",
                    "torch_ms": t_ref,
                    "kernel_ms": t_kernel,
                    "speedup": t_ref / t_kernel,
                    "bytes": nbytes,
                    "kernel_GBps": achieved / 1e9,
                    "fraction_of_copy_bw": achieved / bandwidth,
                }
            )
            print(
                f"{mode} B={batch} V={vocab}: kernel {t_kernel * 1e3:.1f} us, torch {t_ref * 1e3:.1f} us",
                flush=True,
            )
            del inputs, kernel, reference
            torch.cuda.empty_cache()

    header = (
        "| mode | B | K | V | torch ref (us) | kernel (us) | speedup | MB that must move | kernel GB/s "
        "| % of copy BW |"
    )
    print(
        f"\n{device_name}, bf16 logits, K = {WINDOW}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
        f"median of {args.repeats} after {args.warmup} warm-up calls\n"
    )
    print(header)
    print("|" + "---|" * 10)
    for r in rows:
        print(
            f"| {r['mode']} | {r['B']} | {r['K']} | {r['V']} | {r['torch_ms'] * 1e3:.1f} | "
            f"{r['kernel_ms'] * 1e3:.1f} | {r['speedup']:.1f}x | {r['bytes'] / 1e6:.1f} | "
            f"{r['kernel_GBps']:.0f} | {100 * r['fraction_of_copy_bw']:.0f}% |"
        )
    if args.json:
        payload = {
            "device": device_name,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "copy_bandwidth_GBps": bandwidth / 1e9,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "check": check_lines,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
