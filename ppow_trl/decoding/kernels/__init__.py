"""Optional Triton verification kernel, with dispatch to the torch reference in ``ppow_trl.decoding.verify``.

triton is imported lazily: the package works without triton and without a GPU. On CPU the Triton kernel
runs only under the interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from ..verify import (
    VerifyResult,
    _check_logits_and_tokens,
    _check_sampling_inputs,
    draw_uniforms,
    verify_greedy,
    verify_sampling,
)

__all__ = ["triton_available", "verify_windows"]

_BACKENDS = ("auto", "triton", "torch")
_INSTALL_HINT = "pip install 'ppow-trl[triton]'"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton can be imported (the result is cached; triton is imported only here, lazily)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install failing at import time
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ImportError(f"backend='triton' needs the triton package: {_INSTALL_HINT}")
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before "
            "importing triton to run the kernel under Triton's interpreter"
        )
    return "triton"


def verify_windows(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    temperature: float = 0.0,
    uniforms: torch.Tensor | None = None,
    residual_uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> VerifyResult:
    """Verify B windows: greedy when temperature == 0, lossless speculative sampling when > 0.

    backend: "auto" (Triton kernel for CUDA tensors when triton is importable, else the torch
    reference), "triton" (force the kernel), or "torch". Missing draws are taken from ``generator`` in
    the same order by both backends, so they give the same result for the same generator state.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    chosen = _resolve_backend(backend, target_logits.device)
    if temperature == 0:
        if chosen == "torch":
            return verify_greedy(target_logits, draft_tokens)
        _check_logits_and_tokens(target_logits, draft_tokens)
        from . import verify_triton

        return verify_triton.verify_greedy_triton(target_logits, draft_tokens)
    if chosen == "torch":
        return verify_sampling(
            target_logits, draft_tokens, draft_probs, temperature, uniforms, residual_uniforms, generator
        )
    batch, window, _ = _check_sampling_inputs(
        target_logits, draft_tokens, draft_probs, temperature, uniforms, residual_uniforms
    )
    uniforms, residual_uniforms = draw_uniforms(
        batch, window, target_logits.device, uniforms, residual_uniforms, generator
    )
    from . import verify_triton

    return verify_triton.verify_sampling_triton(
        target_logits, draft_tokens, draft_probs, temperature, uniforms, residual_uniforms
    )
