"""Fused Triton kernels for window verification (greedy and speculative sampling).

Import this module only when triton is installed; ``ppow_trl.decoding.kernels.verify_windows`` does it lazily. On a
machine without a GPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before
this module is imported (the interpreter takes CPU tensors as they are).

Work split. Each of the B * (K+1) target rows is cut into ``num_splits`` contiguous spans of whole
``BLOCK_V`` chunks, one program per (row, span), so that B = 1 still fills the GPU:

greedy (2 launches)
  1. ``_argmax_partial``: chunked argmax per span (first index on ties).
  2. ``_greedy_finalize`` (one program per window): merge spans, accepted prefix, extra token.

sampling (5 launches; logits are read once for all rows, then only row k of each window again)
  1. ``_softmax_partial``: online max / sum-exp of z = logits * (1/T) per span.
  2. ``_sampling_accept`` (per window): merge spans -> (m, Z) per row, p(x_j) = exp(z_x - m) / Z,
     accept iff u_j < p(x_j) / q_j(x_j), k = first rejection.
  3. ``_residual_partial`` (per window and span): sum of dist = max(0, p_k - q_k) (and of p_k, for the
     all-zero fallback) in fp64, plus the last index with positive mass.
  4. ``_residual_search`` (per window and span): offset of the span from the partial sums; only the
     span whose cumulative range holds t = u * total scans it (fp64 running cumsum) for the first index
     with cumsum > t and dist > 0.
  5. ``_residual_finalize`` (per window): first hit over spans, else the last positive index.

The arithmetic follows ``ppow_trl.decoding.verify`` step for step (see its module docstring). Greedy results are
identical. Sampling results are identical except when a draw lies within float rounding of a decision
boundary: exp differs by an ulp between libraries and the softmax normaliser is summed in another order
(online, per span), so p differs from the reference by ~1e-7 relative.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..verify import VerifyResult

DEFAULT_BLOCK_V = 4096
DEFAULT_SEARCH_BLOCK_V = 2048
_PROGRAMS_PER_SM = 4


@triton.jit
def _argmax_partial(
    logits_ptr,
    stride_lb,
    stride_lk,
    vocab,
    kp1,
    span,
    part_val_ptr,
    part_idx_ptr,
    num_splits,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // kp1).to(tl.int64)
    j = (row % kp1).to(tl.int64)
    base = logits_ptr + b * stride_lb + j * stride_lk
    start = split * span
    offs = tl.arange(0, BLOCK_V)
    best_val = tl.max(tl.full([BLOCK_V], float("-inf"), ACC), axis=0)
    best_idx = start
    for c in range(0, span, BLOCK_V):
        idx = start + c + offs
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(ACC)  # exact: no ties made
        c_val, c_arg = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        better = c_val > best_val  # strict: an earlier chunk wins ties
        best_idx = tl.where(better, start + c + c_arg, best_idx)
        best_val = tl.where(better, c_val, best_val)
    out = row * num_splits + split
    tl.store(part_val_ptr + out, best_val)
    tl.store(part_idx_ptr + out, best_idx)


@triton.jit
def _greedy_finalize(
    part_val_ptr,
    part_idx_ptr,
    draft_ptr,
    stride_db,
    stride_dk,
    window,
    num_splits,
    accepted_ptr,
    next_ptr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    jj = tl.arange(0, BLOCK_K)
    ss = tl.arange(0, BLOCK_S)
    mask = (jj[:, None] <= window) & (ss[None, :] < num_splits)
    offs = (b * (window + 1) + jj[:, None]) * num_splits + ss[None, :]
    vals = tl.load(part_val_ptr + offs, mask=mask, other=float("-inf"))
    idxs = tl.load(part_idx_ptr + offs, mask=mask, other=2147483647)
    row_max = tl.max(vals, axis=1)
    cand = tl.where(mask & (vals == row_max[:, None]), idxs, 2147483647)
    argmax = tl.min(cand, axis=1).to(tl.int64)  # (BLOCK_K,): first maximal index of rows 0..K
    is_draft = jj < window
    draft = tl.load(draft_ptr + b.to(tl.int64) * stride_db + jj * stride_dk, mask=is_draft, other=-1)
    reject = is_draft & (draft.to(tl.int64) != argmax)
    k = tl.min(tl.where(reject, jj, window), axis=0)
    nxt = tl.sum(tl.where(jj == k, argmax, 0), axis=0)
    tl.store(accepted_ptr + b, k.to(tl.int64))
    tl.store(next_ptr + b, nxt.to(tl.int64))


@triton.jit
def _softmax_partial(
    logits_ptr,
    stride_lb,
    stride_lk,
    vocab,
    kp1,
    span,
    inv_temp,
    part_m_ptr,
    part_s_ptr,
    num_splits,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // kp1).to(tl.int64)
    j = (row % kp1).to(tl.int64)
    base = logits_ptr + b * stride_lb + j * stride_lk
    start = split * span
    offs = tl.arange(0, BLOCK_V)
    m_run = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    s_run = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for c in range(0, span, BLOCK_V):
        idx = start + c + offs
        z = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m_run, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
        m_run = m_new
    out = row * num_splits + split
    tl.store(part_m_ptr + out, m_run)
    tl.store(part_s_ptr + out, s_run)


@triton.jit
def _sampling_accept(
    logits_ptr,
    stride_lb,
    stride_lk,
    draft_ptr,
    stride_db,
    stride_dk,
    q_ptr,
    stride_qb,
    stride_qk,
    u_ptr,
    stride_ub,
    stride_uk,
    part_m_ptr,
    part_s_ptr,
    vocab,
    window,
    num_splits,
    inv_temp,
    accepted_ptr,
    row_m_ptr,
    row_z_ptr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    jj = tl.arange(0, BLOCK_K)
    ss = tl.arange(0, BLOCK_S)
    row_ok = jj <= window
    mask = row_ok[:, None] & (ss[None, :] < num_splits)
    offs = (b * (window + 1) + jj[:, None]) * num_splits + ss[None, :]
    pm = tl.load(part_m_ptr + offs, mask=mask, other=float("-inf"))
    ps = tl.load(part_s_ptr + offs, mask=mask, other=0.0)
    m = tl.max(pm, axis=1)  # (BLOCK_K,) global max per row
    m_safe = tl.where(row_ok, m, 0.0)
    z_sum = tl.sum(tl.where(mask, ps * tl.exp(pm - m_safe[:, None]), 0.0), axis=1)

    is_draft = jj < window
    j64 = jj.to(tl.int64)
    x = tl.load(draft_ptr + b64 * stride_db + j64 * stride_dk, mask=is_draft, other=0).to(tl.int64)
    valid = is_draft & (x >= 0) & (x < vocab)  # an out-of-range draft token is never read, only rejected
    z_x = tl.load(logits_ptr + b64 * stride_lb + j64 * stride_lk + x, mask=valid, other=0.0)
    z_x = z_x.to(tl.float32) * inv_temp
    p_x = tl.math.div_rn(tl.exp(z_x - m_safe), tl.where(is_draft, z_sum, 1.0))
    q_x = tl.load(q_ptr + b64 * stride_qb + j64 * stride_qk + x, mask=valid, other=1.0).to(tl.float32)
    u = tl.load(u_ptr + b64 * stride_ub + j64 * stride_uk, mask=is_draft, other=0.0)
    accept = (u < tl.math.div_rn(p_x, q_x)) & valid
    k = tl.min(tl.where(is_draft & (accept == 0), jj, window), axis=0)
    tl.store(accepted_ptr + b, k.to(tl.int64))
    tl.store(row_m_ptr + b, tl.sum(tl.where(jj == k, m_safe, 0.0), axis=0))
    tl.store(row_z_ptr + b, tl.sum(tl.where(jj == k, z_sum, 0.0), axis=0))


@triton.jit
def _residual_partial(
    logits_ptr,
    stride_lb,
    stride_lk,
    q_ptr,
    stride_qb,
    stride_qk,
    accepted_ptr,
    row_m_ptr,
    row_z_ptr,
    vocab,
    window,
    span,
    inv_temp,
    part_r_ptr,
    part_p_ptr,
    last_r_ptr,
    last_p_ptr,
    num_splits,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    b64 = b.to(tl.int64)
    k = tl.load(accepted_ptr + b)
    q_limit = tl.where(k < window, vocab, 0)  # q = 0 at the bonus position
    m = tl.load(row_m_ptr + b)
    z_sum = tl.load(row_z_ptr + b)
    l_base = logits_ptr + b64 * stride_lb + k * stride_lk
    q_base = q_ptr + b64 * stride_qb + tl.minimum(k, window - 1) * stride_qk
    start = split * span
    offs = tl.arange(0, BLOCK_V)
    sum_r = tl.sum(tl.zeros([BLOCK_V], tl.float64), axis=0)
    sum_p = tl.sum(tl.zeros([BLOCK_V], tl.float64), axis=0)
    last_r = start - 1
    last_p = start - 1
    for c in range(0, span, BLOCK_V):
        idx = start + c + offs
        inb = idx < vocab
        z = tl.load(l_base + idx, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
        p = tl.math.div_rn(tl.exp(z - m), z_sum)
        q = tl.load(q_base + idx, mask=idx < q_limit, other=0.0).to(tl.float32)
        r = tl.maximum(p - q, 0.0)
        sum_r += tl.sum(r.to(tl.float64), axis=0)
        sum_p += tl.sum(p.to(tl.float64), axis=0)
        last_r = tl.maximum(last_r, tl.max(tl.where(r > 0, idx, -1), axis=0))
        last_p = tl.maximum(last_p, tl.max(tl.where(p > 0, idx, -1), axis=0))
    out = b * num_splits + split
    tl.store(part_r_ptr + out, sum_r)
    tl.store(part_p_ptr + out, sum_p)
    tl.store(last_r_ptr + out, last_r)
    tl.store(last_p_ptr + out, last_p)


@triton.jit
def _residual_search(
    logits_ptr,
    stride_lb,
    stride_lk,
    q_ptr,
    stride_qb,
    stride_qk,
    accepted_ptr,
    row_m_ptr,
    row_z_ptr,
    ru_ptr,
    stride_ru,
    part_r_ptr,
    part_p_ptr,
    vocab,
    window,
    span,
    inv_temp,
    cand_ptr,
    num_splits,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    b64 = b.to(tl.int64)
    ss = tl.arange(0, BLOCK_S)
    smask = ss < num_splits
    parts_r = tl.load(part_r_ptr + b * num_splits + ss, mask=smask, other=0.0)
    parts_p = tl.load(part_p_ptr + b * num_splits + ss, mask=smask, other=0.0)
    use_p = tl.sum(parts_r, axis=0) == 0.0  # residual all zeros (p == q numerically): fall back to p
    parts = tl.where(use_p, parts_p, parts_r)
    total = tl.sum(parts, axis=0)
    running = tl.sum(tl.where(ss < split, parts, 0.0), axis=0)
    own = tl.sum(tl.where(ss == split, parts, 0.0), axis=0)
    t = tl.load(ru_ptr + b64 * stride_ru).to(tl.float64) * total
    # Only the span(s) whose cumulative range holds t need scanning: a span entirely below t has no hit,
    # and one entirely above it cannot hold the first hit. The margin covers fp64 summation-order slack.
    margin = 1e-9 * total
    scan = (t >= running - margin) & (t < running + own + margin)

    k = tl.load(accepted_ptr + b)
    q_limit = tl.where(use_p, 0, tl.where(k < window, vocab, 0))  # q = 0 at the bonus / for the fallback
    m = tl.load(row_m_ptr + b)
    z_sum = tl.load(row_z_ptr + b)
    l_base = logits_ptr + b64 * stride_lb + k * stride_lk
    q_base = q_ptr + b64 * stride_qb + tl.minimum(k, window - 1) * stride_qk
    start = split * span
    offs = tl.arange(0, BLOCK_V)
    first = vocab + 0 * start  # sentinel: no hit in this span
    if scan:
        for c in range(0, span, BLOCK_V):
            idx = start + c + offs
            inb = idx < vocab
            z = tl.load(l_base + idx, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
            p = tl.math.div_rn(tl.exp(z - m), z_sum)
            q = tl.load(q_base + idx, mask=idx < q_limit, other=0.0).to(tl.float32)
            d = tl.maximum(p - q, 0.0).to(tl.float64)
            cs = running + tl.cumsum(d, axis=0)
            hit = (cs > t) & (d > 0) & inb
            first = tl.minimum(first, tl.min(tl.where(hit, idx, vocab), axis=0))
            running += tl.sum(d, axis=0)
    tl.store(cand_ptr + b * num_splits + split, first)


@triton.jit
def _residual_finalize(
    cand_ptr,
    part_r_ptr,
    last_r_ptr,
    last_p_ptr,
    vocab,
    num_splits,
    next_ptr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    ss = tl.arange(0, BLOCK_S)
    smask = ss < num_splits
    off = b * num_splits + ss
    first = tl.min(tl.load(cand_ptr + off, mask=smask, other=vocab), axis=0)
    use_p = tl.sum(tl.load(part_r_ptr + off, mask=smask, other=0.0), axis=0) == 0.0
    last_r = tl.max(tl.load(last_r_ptr + off, mask=smask, other=-1), axis=0)
    last_p = tl.max(tl.load(last_p_ptr + off, mask=smask, other=-1), axis=0)
    last = tl.where(use_p, last_p, last_r)
    tok = tl.where(first < vocab, first, last)
    tl.store(next_ptr + b, tok.to(tl.int64))


# ----------------------------------------------------------------------------------------------------------
# launch helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _plan(
    vocab: int, rows: int, device: torch.device, block_v: int, num_splits: int | None
) -> tuple[int, int]:
    """Return (span, num_splits): spans are whole BLOCK_V chunks; enough programs to fill the GPU."""
    chunks = triton.cdiv(vocab, block_v)
    if num_splits is None:
        num_splits = triton.cdiv(_PROGRAMS_PER_SM * _num_sms(device), max(rows, 1))
    num_splits = max(1, min(int(num_splits), chunks))
    span = triton.cdiv(chunks, num_splits) * block_v
    return span, triton.cdiv(vocab, span)


def _check_block(block_v: int) -> int:
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    return block_v


def _empty_result(device: torch.device) -> VerifyResult:
    empty = torch.empty(0, dtype=torch.int64, device=device)
    return VerifyResult(accepted=empty, next_token=empty.clone())


def _default_block_v(vocab: int) -> int:
    return min(DEFAULT_BLOCK_V, max(16, _next_pow2(vocab)))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strided(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A kernel's (pointer, batch stride, position stride) arguments for a (B, K, ...) tensor."""
    return t, t.stride(0), t.stride(1)


# Launch options: no FMA contraction, so z - m and p - q round like the torch reference.
_LAUNCH = {"enable_fp_fusion": False}


def verify_greedy_triton(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    *,
    block_v: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 8,
) -> VerifyResult:
    """Fused greedy verification; same result as ``ppow_trl.decoding.verify.verify_greedy``."""
    batch, kp1, vocab = target_logits.shape
    window = kp1 - 1
    if batch == 0:
        return _empty_result(target_logits.device)
    block_v = _check_block(block_v or _default_block_v(vocab))
    logits = _last_dim_contiguous(target_logits)
    device = logits.device
    rows = batch * kp1
    span, splits = _plan(vocab, rows, device, block_v, num_splits)
    # compare in fp32 (exact for fp16/bf16/fp32); fp64 logits keep fp64 so that no new ties appear
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    part_val = torch.empty(rows * splits, dtype=torch.float64, device=device)
    part_idx = torch.empty(rows * splits, dtype=torch.int32, device=device)
    _argmax_partial[(rows, splits)](
        *_strided(logits),
        vocab,
        kp1,
        span,
        part_val,
        part_idx,
        splits,
        BLOCK_V=block_v,
        ACC=acc,
        num_warps=num_warps,
        **_LAUNCH,
    )
    accepted = torch.empty(batch, dtype=torch.int64, device=device)
    next_token = torch.empty(batch, dtype=torch.int64, device=device)
    _greedy_finalize[(batch,)](
        part_val,
        part_idx,
        *_strided(draft_tokens),
        window,
        splits,
        accepted,
        next_token,
        BLOCK_K=_next_pow2(kp1),
        BLOCK_S=_next_pow2(splits),
        num_warps=1,
        **_LAUNCH,
    )
    return VerifyResult(accepted=accepted, next_token=next_token)


def verify_sampling_triton(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    temperature: float,
    uniforms: torch.Tensor,
    residual_uniforms: torch.Tensor,
    *,
    block_v: int | None = None,
    search_block_v: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 8,
) -> VerifyResult:
    """Fused speculative-sampling verification with given draws; matches ``verify_sampling``."""
    batch, _, vocab = target_logits.shape
    if batch == 0:
        return _empty_result(target_logits.device)
    block_v = _check_block(block_v or _default_block_v(vocab))
    search_block_v = _check_block(search_block_v or min(DEFAULT_SEARCH_BLOCK_V, block_v))
    logits = _last_dim_contiguous(target_logits)
    q = _last_dim_contiguous(draft_probs)
    u = uniforms.to(torch.float32)
    ru = residual_uniforms.to(torch.float32)
    inv_temp = 1.0 / float(temperature)
    accepted, row_m, row_z = _accept_drafts(
        logits, draft_tokens, q, u, inv_temp, block_v, num_splits, num_warps
    )
    next_token = _sample_residual(
        logits, q, accepted, row_m, row_z, ru, inv_temp, search_block_v, num_splits, num_warps
    )
    return VerifyResult(accepted=accepted, next_token=next_token)


def _accept_drafts(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    inv_temp: float,
    block_v: int,
    num_splits: int | None,
    num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampling launches 1-2: accepted length k per window, and row k's softmax max m and normaliser Z."""
    batch, kp1, vocab = logits.shape
    device = logits.device
    rows = batch * kp1
    span, splits = _plan(vocab, rows, device, block_v, num_splits)
    part_m = torch.empty(rows * splits, dtype=torch.float32, device=device)
    part_s = torch.empty(rows * splits, dtype=torch.float32, device=device)
    _softmax_partial[(rows, splits)](
        *_strided(logits),
        vocab,
        kp1,
        span,
        inv_temp,
        part_m,
        part_s,
        splits,
        BLOCK_V=block_v,
        num_warps=num_warps,
        **_LAUNCH,
    )
    accepted = torch.empty(batch, dtype=torch.int64, device=device)
    row_m = torch.empty(batch, dtype=torch.float32, device=device)
    row_z = torch.empty(batch, dtype=torch.float32, device=device)
    _sampling_accept[(batch,)](
        *_strided(logits),
        *_strided(draft_tokens),
        *_strided(q),
        *_strided(u),
        part_m,
        part_s,
        vocab,
        kp1 - 1,
        splits,
        inv_temp,
        accepted,
        row_m,
        row_z,
        BLOCK_K=_next_pow2(kp1),
        BLOCK_S=_next_pow2(splits),
        num_warps=1,
        **_LAUNCH,
    )
    return accepted, row_m, row_z


def _sample_residual(
    logits: torch.Tensor,
    q: torch.Tensor,
    accepted: torch.Tensor,
    row_m: torch.Tensor,
    row_z: torch.Tensor,
    ru: torch.Tensor,
    inv_temp: float,
    block_v: int,
    num_splits: int | None,
    num_warps: int,
) -> torch.Tensor:
    """Sampling launches 3-5: next token of each window, drawn from the residual of row k with ``ru``."""
    batch, kp1, vocab = logits.shape
    window, device = kp1 - 1, logits.device
    span, splits = _plan(vocab, batch, device, block_v, num_splits)
    row_k = (*_strided(logits), *_strided(q), accepted, row_m, row_z)  # leading args of launches 3-4
    part_r = torch.empty(batch * splits, dtype=torch.float64, device=device)
    part_p = torch.empty(batch * splits, dtype=torch.float64, device=device)
    last_r = torch.empty(batch * splits, dtype=torch.int32, device=device)
    last_p = torch.empty(batch * splits, dtype=torch.int32, device=device)
    _residual_partial[(batch, splits)](
        *row_k,
        vocab,
        window,
        span,
        inv_temp,
        part_r,
        part_p,
        last_r,
        last_p,
        splits,
        BLOCK_V=block_v,
        num_warps=num_warps,
        **_LAUNCH,
    )
    cand = torch.empty(batch * splits, dtype=torch.int32, device=device)
    _residual_search[(batch, splits)](
        *row_k,
        ru,
        ru.stride(0),
        part_r,
        part_p,
        vocab,
        window,
        span,
        inv_temp,
        cand,
        splits,
        BLOCK_V=block_v,
        BLOCK_S=_next_pow2(splits),
        num_warps=num_warps,
        **_LAUNCH,
    )
    next_token = torch.empty(batch, dtype=torch.int64, device=device)
    _residual_finalize[(batch,)](
        cand,
        part_r,
        last_r,
        last_p,
        vocab,
        splits,
        next_token,
        BLOCK_S=_next_pow2(splits),
        num_warps=1,
        **_LAUNCH,
    )
    return next_token
