"""Triton verification kernel against the torch reference.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors. The interpreter must be chosen
before triton is first imported (``TRITON_INTERPRET=1``), and this test session imports triton early
(transformers does, through conftest), so unless the session was started with ``TRITON_INTERPRET=1`` the
kernel tests run in one subprocess (``test_kernel_suite_under_interpreter``) and are skipped in-process.
Sizes are small because the interpreter is slow; BLOCK_V is kept below V and several spans per row are
used so that the chunk loop and the cross-span merges run. ``test_kernels_compile_for_sm90`` compiles
every kernel for sm_90 with the ptxas that ships in the triton wheel, so that GPU-only compile errors
show up on CPU too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed (pip install 'ppow-trl[triton]')", allow_module_level=True)

from ppow_trl.decoding.verify import VerifyResult, verify_greedy, verify_sampling  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
IN_SUBPROCESS = os.environ.get("PPOW_KERNEL_TEST_SUBPROCESS") == "1"
interpreted = pytest.mark.skipif(
    not IN_INTERPRETER,
    reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernel_suite_under_interpreter",
)


@pytest.fixture(scope="module")
def vt():
    """The kernel module, imported with Triton's interpreter active."""
    module = importlib.import_module("ppow_trl.decoding.kernels.verify_triton")
    assert type(module._argmax_partial).__name__ == "InterpretedFunction", (
        "triton was imported before TRITON_INTERPRET=1"
    )
    return module


def test_kernel_suite_under_interpreter():
    """Run this file's kernel tests in a fresh interpreter-mode process (triton is already imported here)."""
    if IN_INTERPRETER:
        pytest.skip("already running under TRITON_INTERPRET=1: the kernel tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PPOW_KERNEL_TEST_SUBPROCESS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", __file__]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


def assert_same(got: VerifyResult, want: VerifyResult) -> None:
    assert torch.equal(got.accepted, want.accepted), (got.accepted.tolist(), want.accepted.tolist())
    assert torch.equal(got.next_token, want.next_token), (got.next_token.tolist(), want.next_token.tolist())


def greedy_case(batch: int, window: int, vocab: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, window + 1, vocab, generator=gen) * 3).to(dtype)
    argmax = logits.argmax(-1)
    drafts = argmax[:, :window].clone()
    drafts[1, 0] = (drafts[1, 0] + 1) % vocab  # rejected at position 0
    drafts[2, window // 2] = (drafts[2, window // 2] + 7) % vocab  # rejected in the middle
    drafts[3:] = torch.randint(0, vocab, (batch - 3, window), generator=gen)  # mostly rejected at 0
    drafts[3, :2] = argmax[3, :2]
    # window 0 is accepted in full; a tie across chunks and spans at row (0, K): first index wins
    logits[0, window, vocab - 5] = logits[0, window].max()
    logits[0, window, 3] = logits[0, window].max()
    return logits, drafts


@interpreted
@pytest.mark.parametrize(
    ("dtype", "vocab", "block_v", "num_splits"),
    [(torch.float32, 3000, 512, 3), (torch.bfloat16, 2500, 256, 2), (torch.float32, 1000, 256, 1)],
)
def test_greedy_kernel_matches_reference(vt, dtype, vocab, block_v, num_splits):
    logits, drafts = greedy_case(8, 4, vocab, dtype, seed=vocab)
    want = verify_greedy(logits, drafts)
    assert want.accepted[0] == 4 and want.accepted[1] == 0 and want.accepted[2] == 2
    assert want.next_token[0] == 3  # the tie at the bonus position
    got = vt.verify_greedy_triton(logits, drafts, block_v=block_v, num_splits=num_splits)
    assert_same(got, want)


@interpreted
def test_greedy_kernel_ties_bf16_and_fp64(vt):
    # bf16 rounding makes many equal maxima: the kernel must pick the first one, like torch.argmax
    gen = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 4, (4, 5, 1100), generator=gen).to(torch.bfloat16)
    drafts = logits[:, :4].argmax(-1)
    drafts[2, 1] = 3 if drafts[2, 1] != 3 else 2
    got = vt.verify_greedy_triton(logits, drafts, block_v=128, num_splits=4)
    assert_same(got, verify_greedy(logits, drafts))
    # fp64 logits that are equal in fp32 are still ordered in fp64
    near = torch.zeros(1, 2, 300, dtype=torch.float64)
    near[0, 0, 5], near[0, 0, 250], near[0, 1, 7] = 1.0, 1.0 + 1e-12, 1.0
    drafts = torch.tensor([[250]])
    assert_same(vt.verify_greedy_triton(near, drafts, block_v=64, num_splits=2), verify_greedy(near, drafts))
    assert verify_greedy(near, drafts).accepted.tolist() == [1]


def sampling_case(batch: int, window: int, vocab: int, dtype: torch.dtype, temperature: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, window + 1, vocab, generator=gen) * 2.5).to(dtype)
    q = torch.softmax(torch.randn(batch, window, vocab, generator=gen) * 2.5, dim=-1)
    q[:, :, : vocab // 4] = 0.0  # tokens outside the draft vocabulary
    q = q / q.sum(-1, keepdim=True)
    drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).reshape(batch, window)
    u = torch.rand(batch, window, generator=gen)
    ru = torch.rand(batch, generator=gen)
    p = torch.softmax(logits.float() / temperature, dim=-1)
    u[0] = 0.0  # window 0: accepted in full (bonus draw from p_K)
    drafts[1, 0] = (q[1, 0] - p[1, 0]).argmax()  # window 1: p/q < 1 <= u, rejected at position 0
    u[1, 0] = 1.0
    # window 2: p == q exactly at position 0 (one-hot), u = 1 rejects: residual all zero -> fall back to p
    logits[2, 0] = -30000.0
    logits[2, 0, 17] = 0.0
    q[2, 0] = 0.0
    q[2, 0, 17] = 1.0
    drafts[2, 0], u[2, 0] = 17, 1.0
    return logits, drafts, q, u, ru


@interpreted
@pytest.mark.parametrize(
    ("dtype", "vocab", "temperature", "block_v", "num_splits"),
    [
        (torch.float32, 3000, 1.0, 512, 3),
        (torch.bfloat16, 2000, 0.7, 256, 2),
        (torch.float32, 1000, 1.3, 1024, 1),
    ],
)
def test_sampling_kernel_matches_reference(vt, dtype, vocab, temperature, block_v, num_splits):
    logits, drafts, q, u, ru = sampling_case(8, 4, vocab, dtype, temperature, seed=vocab + 1)
    want = verify_sampling(logits, drafts, q, temperature, u, ru)
    assert want.accepted[0] == 4 and want.accepted[1] == 0 and want.accepted[2] == 0
    assert want.next_token[2] == 17
    got = vt.verify_sampling_triton(
        logits,
        drafts,
        q,
        temperature,
        u,
        ru,
        block_v=block_v,
        search_block_v=block_v // 2,
        num_splits=num_splits,
    )
    assert_same(got, want)


@interpreted
def test_kernel_handles_strided_inputs(vt):
    logits, drafts, q, u, ru = sampling_case(4, 3, 700, torch.float32, 1.0, seed=9)
    big = torch.randn(6, 7, 700)
    big[1:5, 2:6] = logits  # strided view: batch stride 7 * 700, position stride 700
    view = big[1:5, 2:6]
    qbig = torch.zeros(4, 5, 700)
    qbig[:, 1:4] = q
    want = verify_sampling(logits, drafts, q, 1.0, u, ru)
    got = vt.verify_sampling_triton(view, drafts, qbig[:, 1:4], 1.0, u, ru, block_v=256, num_splits=2)
    assert_same(got, want)
    got = vt.verify_greedy_triton(view, drafts, block_v=256, num_splits=2)
    assert_same(got, verify_greedy(logits, drafts))


@interpreted
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_sampling_kernel_matches_reference_on_random_windows(vt, temperature):
    """Many windows whose drafter is close to the target, so that every accept length occurs."""
    gen = torch.Generator().manual_seed(int(temperature * 100))
    batch, window, vocab = 24, 4, 1200
    logits = torch.randn(batch, window + 1, vocab, generator=gen) * 2.0
    p = torch.softmax(logits[:, :window] / temperature, dim=-1)
    q = 0.8 * p + 0.2 * torch.softmax(torch.randn(batch, window, vocab, generator=gen) * 2.0, dim=-1)
    drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).reshape(batch, window)
    u, ru = torch.rand(batch, window, generator=gen), torch.rand(batch, generator=gen)
    want = verify_sampling(logits, drafts, q, temperature, u, ru)
    assert set(want.accepted.tolist()) == set(range(window + 1))
    got = vt.verify_sampling_triton(logits, drafts, q, temperature, u, ru, block_v=512, num_splits=2)
    assert_same(got, want)


@interpreted
def test_kernel_edge_cases(vt):
    empty = vt.verify_greedy_triton(torch.randn(0, 3, 50), torch.zeros(0, 2, dtype=torch.long))
    assert empty.accepted.shape == (0,) and empty.next_token.shape == (0,)
    logits, drafts, q, u, ru = sampling_case(4, 3, 300, torch.float32, 1.0, seed=4)
    u[:] = 0.0  # would accept everything ...
    drafts[3, 1] = 300  # ... but an out-of-range token (unchecked on GPUs) is never read, only rejected
    got = vt.verify_sampling_triton(logits, drafts, q, 1.0, u, ru, block_v=128)
    assert got.accepted.tolist() == [3, 3, 3, 1]
    assert vt.verify_greedy_triton(logits, drafts, block_v=128).accepted[3] <= 1
    drafts[3, 1] = 100  # in range: identical to the reference again
    assert_same(
        vt.verify_sampling_triton(logits, drafts, q, 1.0, u, ru),
        verify_sampling(logits, drafts, q, 1.0, u, ru),
    )


@interpreted
def test_dispatch_forced_triton_matches_torch(vt):
    from ppow_trl.decoding.kernels import verify_windows

    logits, drafts, q, _, _ = sampling_case(4, 3, 600, torch.float32, 0.9, seed=11)
    assert_same(
        verify_windows(logits, drafts, backend="triton"), verify_windows(logits, drafts, backend="torch")
    )
    got = verify_windows(logits, drafts, q, 0.9, generator=torch.Generator().manual_seed(2), backend="triton")
    want = verify_windows(logits, drafts, q, 0.9, generator=torch.Generator().manual_seed(2), backend="torch")
    assert_same(got, want)


COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ppow_trl.decoding.kernels import verify_triton as vt

    def compile_kernel(fn, types, consts, num_warps):
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
        src = ASTSource(fn, sig, constexprs=consts)
        opts = {"num_warps": num_warps, "enable_fp_fusion": False}
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        assert len(kernel.asm["cubin"]) > 0
        return fn.__name__

    f32, i32, i64, f64 = "*fp32", "*i32", "*i64", "*fp64"
    compile_kernel(vt._argmax_partial, {"logits_ptr": f64, "part_val_ptr": f64, "part_idx_ptr": i32},
                   {"BLOCK_V": 4096, "ACC": tl.float64}, 8)
    for ldt in ("*bf16", "*fp32"):
        row = {"logits_ptr": ldt, "q_ptr": f32, "accepted_ptr": i64, "row_m_ptr": f32, "row_z_ptr": f32,
               "inv_temp": "fp32"}
        done = [
            compile_kernel(vt._argmax_partial, {"logits_ptr": ldt, "part_val_ptr": f64, "part_idx_ptr": i32},
                           {"BLOCK_V": 4096, "ACC": tl.float32}, 8),
            compile_kernel(vt._greedy_finalize, {"part_val_ptr": f64, "part_idx_ptr": i32, "draft_ptr": i64,
                           "accepted_ptr": i64, "next_ptr": i64}, {"BLOCK_K": 16, "BLOCK_S": 64}, 1),
            compile_kernel(vt._softmax_partial, {"logits_ptr": ldt, "inv_temp": "fp32", "part_m_ptr": f32,
                           "part_s_ptr": f32}, {"BLOCK_V": 4096}, 8),
            compile_kernel(vt._sampling_accept, {**row, "draft_ptr": i64, "u_ptr": f32, "part_m_ptr": f32,
                           "part_s_ptr": f32}, {"BLOCK_K": 16, "BLOCK_S": 64}, 1),
            compile_kernel(vt._residual_partial, {**row, "part_r_ptr": f64, "part_p_ptr": f64,
                           "last_r_ptr": i32, "last_p_ptr": i32}, {"BLOCK_V": 2048}, 8),
            compile_kernel(vt._residual_search, {**row, "ru_ptr": f32, "part_r_ptr": f64, "part_p_ptr": f64,
                           "cand_ptr": i32}, {"BLOCK_V": 2048, "BLOCK_S": 64}, 8),
            compile_kernel(vt._residual_finalize, {"cand_ptr": i32, "part_r_ptr": f64, "last_r_ptr": i32,
                           "last_p_ptr": i32, "next_ptr": i64}, {"BLOCK_S": 64}, 1),
        ]
    print("compiled", len(done), "kernels")
    """
)


def test_kernels_compile_for_sm90(tmp_path):
    """Compile every kernel to a cubin for sm_90 without a GPU (catches errors the interpreter misses)."""
    if IN_SUBPROCESS:
        pytest.skip("compiled by the parent test process")
    ptxas = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("the triton wheel has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 7 kernels" in proc.stdout
