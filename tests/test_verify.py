"""Torch reference verification: greedy and speculative-sampling acceptance."""

from __future__ import annotations

import math

import pytest
import torch

import ppow_trl.decoding.kernels as kernels
from ppow_trl.decoding.kernels import verify_windows
from ppow_trl.decoding.verify import VerifyResult, verify_greedy, verify_sampling


def one_hot_logits(argmaxes: list[list[int]], vocab: int) -> torch.Tensor:
    """(B, K+1, V) logits whose row argmaxes are the given token ids."""
    logits = torch.zeros(len(argmaxes), len(argmaxes[0]), vocab)
    for b, row in enumerate(argmaxes):
        for j, tok in enumerate(row):
            logits[b, j, tok] = 5.0
    return logits


# ---------------------------------------------------------------------------------------------- greedy


def test_greedy_full_accept_reject_at_zero_and_middle():
    vocab = 8
    argmaxes = [[1, 2, 3, 4], [5, 6, 7, 0], [2, 2, 2, 7]]
    logits = one_hot_logits(argmaxes, vocab)
    drafts = torch.tensor([[1, 2, 3], [4, 6, 7], [2, 2, 5]])
    result = verify_greedy(logits, drafts)
    assert isinstance(result, VerifyResult)
    assert result.accepted.tolist() == [3, 0, 2]
    assert result.accepted.dtype == torch.int64 and result.next_token.dtype == torch.int64
    # full accept -> bonus token (argmax of row K); rejection at j -> the target's argmax at row j
    assert result.next_token.tolist() == [4, 5, 2]


def test_greedy_ignores_matches_after_first_rejection_and_breaks_ties_to_first_index():
    logits = one_hot_logits([[3, 1, 2]], 6)
    drafts = torch.tensor([[0, 1]])  # position 1 matches but position 0 does not
    assert verify_greedy(logits, drafts).accepted.tolist() == [0]
    tied = torch.zeros(1, 2, 6)
    tied[0, 0, [2, 4]] = 1.0  # tie: index 2 is the argmax
    tied[0, 1, [5, 1]] = 1.0
    result = verify_greedy(tied, torch.tensor([[2]]))
    assert result.accepted.tolist() == [1] and result.next_token.tolist() == [1]
    result = verify_greedy(tied, torch.tensor([[4]]))
    assert result.accepted.tolist() == [0] and result.next_token.tolist() == [2]


def test_greedy_bf16_logits_match_fp32():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, 300, generator=gen).to(torch.bfloat16)
    drafts = logits[:, :4].float().argmax(-1)
    drafts[::3, 2] = (drafts[::3, 2] + 1) % 300
    got, want = verify_greedy(logits, drafts), verify_greedy(logits.float(), drafts)
    assert torch.equal(got.accepted, want.accepted) and torch.equal(got.next_token, want.next_token)


# ---------------------------------------------------------------------------------------------- sampling


def test_sampling_hand_made_draws():
    p0, p1 = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.6, 0.3])
    logits = torch.stack([p0.log(), p1.log()]).expand(5, 2, 3)
    q = torch.tensor([0.25, 0.5, 0.25]).expand(5, 1, 3)
    drafts = torch.ones(5, 1, dtype=torch.long)  # p/q = 0.3 / 0.5 = 0.6
    u = torch.tensor([[0.5], [0.5], [0.5], [0.7], [0.0]])
    ru = torch.tensor([0.05, 0.5, 0.95, 0.99, 0.0])
    result = verify_sampling(logits, drafts, q, 1.0, u, ru)
    assert result.accepted.tolist() == [1, 1, 1, 0, 1]
    # accepted: bonus from p1 by inverse CDF (cumsum 0.1, 0.7, 1.0); rejected: residual max(0, p0 - q)
    # = [0.25, 0, 0] can only give token 0
    assert result.next_token.tolist() == [0, 1, 2, 0, 0]


def test_sampling_identical_distributions_fall_back_to_p_when_residual_is_zero():
    p = torch.tensor([0.2, 0.5, 0.3])
    logits = p.log().expand(3, 2, 3).clone()
    q = torch.softmax(logits[:, :1], dim=-1)  # exactly the reference's p: ratio 1
    drafts = torch.tensor([[0], [1], [2]])
    result = verify_sampling(logits, drafts, q, 1.0, torch.ones(3, 1), torch.tensor([0.1, 0.5, 0.9]))
    assert result.accepted.tolist() == [0, 0, 0]  # u = 1 is never < 1
    assert result.next_token.tolist() == [0, 1, 2]  # drawn from p, not from the all-zero residual
    accepted = verify_sampling(logits, drafts, q, 1.0, torch.full((3, 1), 0.999), torch.zeros(3)).accepted
    assert accepted.tolist() == [1, 1, 1]


def test_sampling_is_reproducible_from_a_generator():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 4, 50, generator=gen)
    q = torch.softmax(torch.randn(32, 3, 50, generator=gen), -1)
    drafts = torch.multinomial(q.reshape(-1, 50), 1, generator=gen).reshape(32, 3)
    a = verify_sampling(logits, drafts, q, 0.8, generator=torch.Generator().manual_seed(7))
    b = verify_sampling(logits, drafts, q, 0.8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.accepted, b.accepted) and torch.equal(a.next_token, b.next_token)
    g = torch.Generator().manual_seed(7)
    u, ru = torch.rand(32, 3, generator=g), torch.rand(32, generator=g)
    c = verify_sampling(logits, drafts, q, 0.8, u, ru)
    assert torch.equal(a.accepted, c.accepted) and torch.equal(a.next_token, c.next_token)


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: about the 99.9% point)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def _chi2(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with target probability 0 was emitted"
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


def test_speculative_sampling_reproduces_the_target_distribution():
    """Emitted tokens follow the target: first token ~ p0, and the first two tokens jointly ~ p0 x p1.

    Contexts do not change the distributions here, so a window drafted after a rejection at position 0
    starts at p1 (the second verification of a decoding loop).
    """
    n, window, vocab, temperature = 20000, 3, 6, 0.8
    gen = torch.Generator().manual_seed(1234)
    target_logits = torch.randn(window + 2, vocab, generator=gen) * 1.5  # positions 0..K+1
    p = torch.softmax(target_logits / temperature, dim=-1)
    q = torch.softmax(torch.randn(window + 1, vocab, generator=gen) * 1.5, dim=-1)
    q[:, 0] = 0.0  # token 0 lies outside the draft vocabulary: only residual draws can emit it
    q = q / q.sum(-1, keepdim=True)

    def run(first_position: int) -> tuple[torch.Tensor, VerifyResult]:
        q_rows = q[first_position : first_position + window]
        drafts = torch.multinomial(q_rows, n, replacement=True, generator=gen).T.contiguous()  # (n, K)
        logits = target_logits[first_position : first_position + window + 1].expand(n, -1, -1)
        draft_probs = q_rows.expand(n, -1, -1)
        return drafts, verify_sampling(logits, drafts, draft_probs, temperature, generator=gen)

    drafts, res = run(0)
    k, nxt = res.accepted, res.next_token
    # emitted token at position j of the window (valid where k >= j)
    emitted = torch.cat([drafts, nxt[:, None]], dim=1)
    emitted.scatter_(1, k[:, None], nxt[:, None])
    for j in range(window + 1):
        stat, df = _chi2(emitted[k >= j, j], p[j])
        assert stat < _chi2_critical(df), f"position {j}: chi2 {stat:.1f} over {df} dof"

    drafts2, res2 = run(1)
    first = emitted[:, 0]
    first_of_next_window = torch.where(res2.accepted >= 1, drafts2[:, 0], res2.next_token)
    second = torch.where(k >= 1, emitted[:, 1], first_of_next_window)
    joint = first * vocab + second
    stat, df = _chi2(joint, torch.outer(p[0], p[1]).reshape(-1))
    assert stat < _chi2_critical(df), f"joint of the first two tokens: chi2 {stat:.1f} over {df} dof"

    # power check: emitting the draft tokens unverified fails the same test badly
    stat_naive, df = _chi2(drafts[:, 0], p[0].clamp_min(1e-12))
    assert stat_naive > 10 * _chi2_critical(df)
    assert 0.2 < (k >= 1).double().mean() < 0.95  # the test covers both acceptances and rejections


# ---------------------------------------------------------------------------------------------- validation


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(2, 4, 10)
    drafts = torch.zeros(2, 3, dtype=torch.long)
    q = torch.full((2, 3, 10), 0.1)
    with pytest.raises(ValueError, match=r"\(B, K\+1, V\)"):
        verify_greedy(torch.randn(4, 10), drafts)
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 4, 10\).*\(2, 2\)"):
        verify_greedy(logits, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape mismatch"):
        verify_greedy(logits, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="K must be >= 1"):
        verify_greedy(torch.randn(2, 1, 10), torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        verify_greedy(logits, drafts.float())
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        verify_greedy(logits, drafts + 10)
    with pytest.raises(ValueError, match="temperature"):
        verify_sampling(logits, drafts, q, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        verify_sampling(logits, drafts, q, -1.0)
    with pytest.raises(ValueError, match=r"draft_probs must have shape.*\(2, 3, 10\)"):
        verify_sampling(logits, drafts, q[:, :2])
    with pytest.raises(ValueError, match=r"uniforms must have shape \(2, 3\)"):
        verify_sampling(logits, drafts, q, 1.0, uniforms=torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"residual_uniforms must have shape \(2,\)"):
        verify_sampling(logits, drafts, q, 1.0, residual_uniforms=torch.rand(2, 1))
    with pytest.raises(ValueError, match="draft_probs"):
        verify_windows(logits, drafts, None, temperature=1.0, backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        verify_windows(logits, drafts, q, temperature=-0.5)
    with pytest.raises(ValueError, match="backend"):
        verify_windows(logits, drafts, backend="cuda")


# ---------------------------------------------------------------------------------------------- dispatch


def test_dispatch_uses_the_reference_on_cpu():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 5, 40, generator=gen)
    q = torch.softmax(torch.randn(8, 4, 40, generator=gen), -1)
    drafts = torch.multinomial(q.reshape(-1, 40), 1, generator=gen).reshape(8, 4)
    for backend in ("auto", "torch"):
        got, want = verify_windows(logits, drafts, backend=backend), verify_greedy(logits, drafts)
        assert torch.equal(got.accepted, want.accepted) and torch.equal(got.next_token, want.next_token)
        got = verify_windows(
            logits, drafts, q, 0.9, generator=torch.Generator().manual_seed(5), backend=backend
        )
        want = verify_sampling(logits, drafts, q, 0.9, generator=torch.Generator().manual_seed(5))
        assert torch.equal(got.accepted, want.accepted) and torch.equal(got.next_token, want.next_token)


def test_forcing_triton_without_triton_or_gpu_says_what_to_do(monkeypatch):
    logits, drafts = torch.randn(1, 3, 10), torch.zeros(1, 2, dtype=torch.long)
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'ppow-trl\[triton\]'"):
        verify_windows(logits, drafts, backend="triton")
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        verify_windows(logits, drafts, backend="triton")
